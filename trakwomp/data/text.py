"""Text datasets: texts turned into token ids by a tokenizer, with optional labels and sources.

Specs:
    fortunes-mini:train | fortunes-mini:test   the embedded 2,000 + 200 fortunes (see assets/fortunes_mini.md)
    jsonl:PATH                                 one JSON object per line: `text`, optional `label` and `source`;
                                               or `prompt` and `completion`, optional `source`; or
                                               `messages` (role, content), optional `source`, with an
                                               hf: tokenizer that has a chat template; a row's
                                               keys say its kind, and any other key is refused

Tokenizers: `bytes` (UTF-8 bytes 0..255 after a start token 256; needs no files) or `hf:DIR`
(a Hugging Face tokenizer saved in a local folder). With `max_length`, longer texts are cut to
their first `max_length` tokens and `truncated` counts them; without it, nothing is cut.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from trakwomp.data.base import (
    Batch,
    Dataset,
    DatasetKind,
    Fingerprint,
    LoadOptions,
    check_indices,
)
from trakwomp.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, after a start token 256 (so the first byte is predicted too)."""

    spec = "bytes"
    vocab_size = 257
    start = 256
    end = None  # no end token: nothing is appended to a completion (a newline ends the fortunes' completions)

    def encode(self, texts: list[str], limit: int | None) -> tuple[list[np.ndarray], np.ndarray]:
        """Each text's first `limit` token ids (all without a limit), and its full token count,
        1 + its UTF-8 bytes: the bytes past the limit are never turned into tokens."""
        encoded = [t.encode("utf-8") for t in texts]
        cut = None if limit is None else limit - 1
        ids = [np.concatenate([[self.start], np.frombuffer(b[:cut], dtype=np.uint8)]).astype(np.int32) for b in encoded]
        return ids, self.fewest_tokens(texts)

    def encode_pairs(self, prompts: list[str], completions: list[str], limit: int | None):
        """(ids, full token counts, prompt token counts) of each prompt followed by its completion:
        the bytes of both after one start token, the completion starting at 1 + the prompt's bytes."""
        ids, lengths = self.encode([p + c for p, c in zip(prompts, completions, strict=True)], limit)
        return ids, lengths, np.array([1 + len(p.encode("utf-8")) for p in prompts], dtype=np.int64)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The ids a prompt starts a prompt/completion text with: the start token, then its bytes."""
        return [self.start, *prompt.encode("utf-8")]

    def token_name(self, token: int) -> str:
        """How one token shows: its byte as text, a byte that is part of a longer UTF-8 character
        as its escape (\\xe2), the start token by name."""
        if token == self.start:
            return "<start>"
        return bytes([token]).decode("utf-8", errors="backslashreplace")

    def render(self, conversations: list[list[dict]]) -> list[str]:
        raise UserError("rows of \"messages\" need --tokenizer hf:DIR, a tokenizer with a chat template that "
                        "renders them; the bytes tokenizer has none")

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids: their bytes as UTF-8 (a byte sequence that is not UTF-8
        shows as U+FFFD, and is attributed as shown)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def stop(self) -> int:
        """The id that ends a generated text: the start token, which begins the next one."""
        return self.start

    def fewest_tokens(self, texts: list[str]) -> np.ndarray:
        """Tokens per text, known from the byte length alone (here exactly)."""
        return np.array([1 + len(t.encode("utf-8")) for t in texts], dtype=np.int64)

    def record(self) -> dict:
        return {"spec": self.spec}


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer saved in a local folder (`save_pretrained`); nothing is downloaded."""

    def __init__(self, folder: str):
        self.spec = f"hf:{folder}"
        path = Path(folder)
        if not path.is_dir():
            raise UserError(f"--tokenizer {self.spec}: no folder {folder!r}")
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")):
            raise UserError(f"--tokenizer {self.spec}: the folder holds no tokenizer files (tokenizer.json, "
                            "vocab.json, tokenizer.model or vocab.txt); save one there with tokenizer.save_pretrained")
        refuse_remote_code(path / "tokenizer_config.json", f"--tokenizer {self.spec}")
        transformers = import_transformers(self.spec)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                                        trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--tokenizer {self.spec}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
        self.vocab_size = len(self.tokenizer)
        vocabulary = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
        self._record = {"spec": "hf", "vocab_size": self.vocab_size, "sha256": hashlib.sha256(vocabulary).hexdigest()}
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._longest_token = max(len(token.encode("utf-8")) for token in self.tokenizer.get_vocab()) \
            if backend is not None and backend.normalizer is None else None

    def encode(self, texts: list[str], limit: int | None) -> tuple[list[np.ndarray], np.ndarray]:
        """Each text's first `limit` token ids (all without a limit), and its full token count."""
        ids = [np.asarray(i, dtype=np.int32) for i in self.tokenizer(texts)["input_ids"]]
        return [i[:limit] for i in ids], np.array([len(i) for i in ids], dtype=np.int64)

    def encode_pairs(self, prompts: list[str], completions: list[str], limit: int | None):
        """(ids, full token counts, prompt token counts): each prompt as `encode_prompt` gives it,
        its completion tokenized on its own after it (without special tokens), so the boundary
        between them is a token boundary, then the end token (if the tokenizer has one), so that
        the model learns to stop."""
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        ending = [] if self.end is None else [self.end]
        completion_ids = self.tokenizer(completions, add_special_tokens=False)["input_ids"]
        ids = [np.asarray(p + c + ending, dtype=np.int32) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        return ([i[:limit] for i in ids], np.array([len(i) for i in ids], dtype=np.int64),
                np.array([len(p) for p in prompt_ids], dtype=np.int64))

    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt's ids with the special tokens the tokenizer puts before a text (a BOS), but
        not those it puts after one (a post-processor's EOS): nothing ends between a prompt and
        its completion."""
        plain = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        special = self.tokenizer(prompt)["input_ids"]
        for start in range(len(special) - len(plain) + 1):
            if special[start:start + len(plain)] == plain:
                return special[:start] + plain
        return plain

    @property
    def end(self) -> int | None:
        """The end-of-sequence token appended to every completion, if the tokenizer has one."""
        return self.tokenizer.eos_token_id

    def token_name(self, token: int) -> str:
        """How one token shows: a special token by its name, any other as its text."""
        if token in self.tokenizer.all_special_ids:
            return self.tokenizer.convert_ids_to_tokens(token)
        return self.tokenizer.decode([token])

    def render(self, conversations: list[list[dict]]) -> list[str]:
        """Each conversation as the tokenizer's chat template writes it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"rows of \"messages\" need a tokenizer with a chat template; the one at {self.spec} has "
                            "none (set tokenizer.chat_template and save it again)")
        return [self._template(messages, tokenize=False) for messages in conversations]

    def encode_conversations(self, conversations: list[list[dict]], limit: int | None):
        """(ids, full token counts, masks): each conversation tokenized by its chat template,
        True at the tokens of each assistant turn, from after the template's generation prompt
        to the end of the turn (its closing tokens included: the model learns to stop). A turn's
        tokens are found by rendering the conversation up to it; a template that does not render
        a conversation's beginning as the beginning of the whole is refused."""
        ids, masks = [], []
        for number, messages in enumerate(conversations):
            full = self.chat_ids(messages, False)
            mask = np.zeros(len(full), dtype=bool)
            for turn in (a for a, m in enumerate(messages) if m["role"] == "assistant"):
                before, through = self.chat_ids(messages[:turn], True), self.chat_ids(messages[:turn + 1], False)
                if full[:len(through)] != through or through[:len(before)] != before:
                    raise UserError(f"the chat template of {self.spec} does not render the beginning of conversation "
                                    f"{number} as the beginning of the whole, so its assistant turns cannot be found")
                mask[len(before):len(through)] = True
            ids.append(np.asarray(full, dtype=np.int32))
            masks.append(mask)
        return [i[:limit] for i in ids], np.array([len(i) for i in ids], dtype=np.int64), [m[:limit] for m in masks]

    def chat_ids(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        """The ids of `messages` rendered by the chat template (then the generation prompt, if asked:
        what the template writes before an assistant turn)."""
        if not messages and not generation_prompt:
            return []
        return list(self._template(messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt))

    def _template(self, messages: list[dict], **how):
        """The chat template applied to `messages`; a template that fails (it refuses the roles'
        order, say) is refused in one line with its own message."""
        try:
            return self.tokenizer.apply_chat_template(messages, **how)
        except Exception as e:  # a template raises whatever its author wrote (jinja2's TemplateError, ...)
            message = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"the chat template of {self.spec} fails on a conversation: {message}") from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def stop(self) -> int | None:
        """The id that ends a generated text: the end token, if the tokenizer has one."""
        return self.end

    def fewest_tokens(self, texts: list[str]) -> np.ndarray:
        """A lower bound of the tokens per text from its UTF-8 length: a vocabulary entry spells
        at least the bytes it stands for (byte-level BPE: a character per byte), so a text needs
        at least bytes / longest entry tokens. A normalizer may delete characters (accents,
        controls), so with one the bound is 0."""
        if self._longest_token is None:
            return np.zeros(len(texts), dtype=np.int64)
        return np.array([-(-len(t.encode("utf-8")) // self._longest_token) for t in texts], dtype=np.int64)

    def record(self) -> dict:
        """The vocabulary itself, by hash (computed once, on loading): the same tokenizer in
        another folder is the same tokenizer."""
        return self._record


def import_transformers(what: str):
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what} needs the Hugging Face `transformers` package: pip install 'trakwomp[hf]'") from None
    return transformers


def refuse_remote_code(config: Path, what: str) -> None:
    """Refuse a Hugging Face folder whose config names code of its own to run (`auto_map`):
    trakwomp runs no code that a folder brings, and transformers would otherwise stop to ask."""
    if not config.is_file():
        return
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read {config.name}: {e}") from None
    if isinstance(settings, dict) and "auto_map" in settings:
        raise UserError(f"{what}: {config.name} names code of its own to run (auto_map), which trakwomp does not run; "
                        "save a model or tokenizer of a class that transformers ships")


def make_tokenizer(spec: str) -> ByteTokenizer | HuggingFaceTokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:") and len(spec) > 3:
        return HuggingFaceTokenizer(spec[3:])
    raise UserError(f"unknown --tokenizer {spec!r}: expected bytes or hf:DIR")


class Tokens:
    """The token ids of a list of texts, made on first use (and shared by its selections), cut
    to `max_length`, with every text's full token count; for prompt/completion texts (`prompts`
    given: text j is prompts[j] followed by its completion) and conversations (`conversations`:
    role/content messages, rendered by the tokenizer's chat template) also each text's mask of
    predicted tokens (the completion's; the assistant turns')."""

    def __init__(self, texts: list[str], tokenizer, max_length: int | None, prompts: list[str] | None = None,
                 conversations: list[list[dict]] | None = None):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.prompts, self.conversations = prompts, conversations

    @functools.cached_property
    def fewest(self) -> np.ndarray:
        return self.tokenizer.fewest_tokens(self.texts)

    @functools.cached_property
    def _encoded(self) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
        if self.conversations is not None:
            return self.tokenizer.encode_conversations(self.conversations, self.max_length)
        if self.prompts is None:
            return (*self.tokenizer.encode(self.texts, self.max_length), None)
        completions = [text[len(prompt):] for text, prompt in zip(self.texts, self.prompts, strict=True)]
        ids, lengths, starts = self.tokenizer.encode_pairs(self.prompts, completions, self.max_length)
        return ids, lengths, [np.arange(len(i)) >= start for i, start in zip(ids, starts, strict=True)]

    @property
    def ids(self) -> list[np.ndarray]:
        return self._encoded[0]

    @property
    def lengths(self) -> np.ndarray:
        return self._encoded[1]

    @property
    def masks(self) -> list[np.ndarray] | None:
        """Per text, True at the tokens whose prediction counts (after the cut); None for plain texts."""
        return self._encoded[2]


class GivenTokens(Tokens):
    """Token ids given as they are (an answer's generated ids), with their masks of predicted
    tokens: nothing is made from the texts."""

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray]):
        self._given = (ids, np.array([len(i) for i in ids], dtype=np.int64), masks)

    @property
    def _encoded(self):
        return self._given

    @property
    def fewest(self) -> np.ndarray:
        return self._given[1]


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 to the longest, and the mask of real tokens."""
    longest = max(len(ids) for ids in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = True
    return ids, mask


class TextDataset(Dataset):
    """An ordered text dataset: example i is `(token ids, label, first predicted token)`; `text(i)`
    and `source(i)` give the text and where it came from. Labels index `classes` (the sorted
    distinct labels given); texts without labels have label 0 and no classes.

    Prompt/completion texts (`prompts` given, text j = prompts[j] + its completion) are predicted
    at their completion's tokens, conversations (`conversations` given, text j their rendering)
    at their assistant turns' tokens: batches carry `Batch.predicted`, unless
    `predicting_prompts()` asked for every token (a model trained with --train-on-prompt)."""

    preview = "text"

    def __init__(self, spec: str, texts: Sequence[str], sources: Sequence[str], labels: np.ndarray,
                 classes: Sequence[str], tokenizer, max_length: int | None, tokens: "Tokens | None" = None,
                 indices: np.ndarray | None = None, prompts: Sequence[str] | None = None,
                 prompts_predicted: bool = False, conversations: list[list[dict]] | None = None):
        self.spec = spec
        self._texts, self._sources, self._labels = list(texts), list(sources), np.asarray(labels, dtype=np.int64)
        self._prompts = None if prompts is None else list(prompts)
        self._conversations = conversations
        self.classes = tuple(classes)
        self.tokenizer, self.max_length = tokenizer, max_length
        self._tokens = tokens if tokens is not None else Tokens(self._texts, tokenizer, max_length, self._prompts, conversations)
        self.has_explicit_indices = indices is not None
        self.indices = np.arange(len(self._texts)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.has_prompts = prompts is not None or conversations is not None
        self.prompts_predicted = prompts_predicted

    def _copy(self, **changes) -> "TextDataset":
        given = {"tokens": self._tokens, "indices": self.indices, "prompts": self._prompts,
                 "prompts_predicted": self.prompts_predicted, "conversations": self._conversations, **changes}
        return TextDataset(self.spec, self._texts, self._sources, self._labels, self.classes, self.tokenizer,
                           self.max_length, **given)

    def predicting_prompts(self) -> "TextDataset":
        """The same examples with every token predicted, prompts included (--train-on-prompt)."""
        if not self.has_prompts:
            return super().predicting_prompts()
        return self._copy(prompts_predicted=True)

    def per_token(self) -> "CompletionTokens":
        """Each completion token its own example (--per-token)."""
        if not self.has_prompts:
            return super().per_token()
        return CompletionTokens(self._copy(prompts_predicted=False))

    def answer_prompt_ids(self, prompt: str) -> list[int]:
        """The ids `prompt` begins an answer with, as the train set's prompts begin theirs: a
        conversation store's as a user turn in the chat template, then its generation prompt;
        otherwise the tokenizer's prompt ids."""
        if self._conversations is not None:
            return self.tokenizer.chat_ids([{"role": "user", "content": prompt}], True)
        return self.tokenizer.encode_prompt(prompt)

    def encode_answer(self, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, predicted mask) of a given answer to `prompt`, tokenized as the train set's
        completions are (a conversation store's: a user turn and an assistant turn)."""
        if self._conversations is not None:
            ids, _, masks = self.tokenizer.encode_conversations([[{"role": "user", "content": prompt},
                                                                  {"role": "assistant", "content": completion}]], None)
            return ids[0], masks[0]
        ids, _, starts = self.tokenizer.encode_pairs([prompt], [completion], None)
        return ids[0], np.arange(len(ids[0])) >= starts[0]

    def predicted_mask(self, i: int) -> np.ndarray | None:
        """True at the tokens of example i whose prediction counts (None for plain texts)."""
        masks = self._tokens.masks
        return None if masks is None else masks[int(self.indices[i])]

    def coverage_probe(self, positions: np.ndarray) -> list[int]:
        """The base choice, and the text that repeats one token most often (a layer may treat a
        repeated token apart: Embedding(scale_grad_by_freq))."""
        chosen = super().coverage_probe(positions)
        repeats = [int(np.unique(self._ids(int(self.indices[int(i)])), return_counts=True)[1].max()) for i in positions]
        return list(dict.fromkeys([*chosen, int(positions[int(np.argmax(repeats))])]))

    def completion_ids(self, i: int) -> list[int]:
        """The ids of example i's predicted tokens (its completion's)."""
        return [int(t) for t in self._ids(int(self.indices[i]))[self.predicted_mask(i)]]

    @property
    def completion_tokens(self) -> np.ndarray | None:
        """Per example, how many of its tokens are predicted after the cut (None for plain texts)."""
        masks = self._tokens.masks
        return None if masks is None else np.array([int(masks[j].sum()) for j in self.indices], dtype=np.int64)

    def _ids(self, j: int) -> np.ndarray:
        return self._tokens.ids[j]

    @property
    def _lengths(self) -> np.ndarray:
        return self._tokens.lengths

    @property
    def fewest_tokens(self) -> np.ndarray:
        """A lower bound of the tokens per example after truncation, from byte lengths alone:
        a text too long for a model's context is refused before it is tokenized."""
        fewest = self._tokens.fewest[self.indices]
        return fewest if self.max_length is None else np.minimum(fewest, self.max_length)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(token ids, label, True at the tokens whose prediction counts; None: all after the first)."""
        j = int(self.indices[i])
        mask = None if self.prompts_predicted else self.predicted_mask(i)
        return (torch.from_numpy(self._ids(j).astype(np.int64)), int(self._labels[j]),
                None if mask is None else torch.from_numpy(mask))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example after truncation."""
        full = self._lengths[self.indices]
        return full if self.max_length is None else np.minimum(full, self.max_length)

    @property
    def truncated(self) -> int:
        """How many examples `max_length` cut."""
        return 0 if self.max_length is None else int((self._lengths[self.indices] > self.max_length).sum())

    def text(self, i: int) -> str:
        """Example i's text, as read."""
        return self._texts[int(self.indices[i])]

    def source(self, i: int) -> str:
        return self._sources[int(self.indices[i])]

    def prompt(self, i: int) -> str | None:
        """The prompt of example i (None for plain texts and conversations); its completion is the
        rest of `text(i)`."""
        return None if self._prompts is None else self._prompts[int(self.indices[i])]

    def describe(self, i: int) -> dict:
        described = {"label": self.label_name(i), "text": self.text(i), "source": self.source(i)}
        prompt = self.prompt(i)
        if prompt is not None:
            described.update(prompt=prompt, completion=self.text(i)[len(prompt):])
        if self._conversations is not None:
            described["messages"] = self._conversations[int(self.indices[i])]
        return described

    def source_record(self) -> dict:
        """How to load this data again: the spec, tokenizer and truncation."""
        return {"tokenizer": self.tokenizer.spec, "max_length": self.max_length}

    def collate(self, items: list[tuple[torch.Tensor, int, torch.Tensor | None]]) -> Batch:
        """Token ids right-padded with 0 to the longest, the mask of real tokens, and for
        prompt/completion texts and conversations the mask of the tokens whose prediction counts."""
        ids, mask = padded([tokens for tokens, _, _ in items])
        predicted = None
        if self.has_prompts and not self.prompts_predicted:
            predicted = torch.zeros_like(mask)
            for row, (_, _, counted) in enumerate(items):
                predicted[row, :len(counted)] = counted
        return Batch((ids, mask), torch.tensor([y for _, y, _ in items], dtype=torch.long), predicted)

    def select(self, indices: np.ndarray) -> "TextDataset":
        """The examples `indices` of this dataset, in that order."""
        indices = check_indices(self.spec, np.asarray(indices), len(self))
        return self._copy(indices=self.indices[indices])

    def fingerprint(self) -> Fingerprint:
        """Number of examples, class names and a SHA-256 over the tokenizer and, per example, its
        token ids (after truncation), text, source and label, and for prompt/completion texts and
        conversations which tokens are predicted (what the loss and f leave out)."""
        digest = hashlib.sha256(json.dumps(self.tokenizer.record(), sort_keys=True).encode())
        for j in self.indices:
            j = int(j)
            ids = self._ids(j).astype("<i4")
            if self._tokens.masks is not None:
                digest.update(b"predicted|" + np.packbits(self._tokens.masks[j]).tobytes() + b"|")
            digest.update(f"{len(ids)}|{int(self._labels[j])}|{self._sources[j]}|".encode("utf-8"))
            digest.update(ids.tobytes())
            digest.update(self._texts[j].encode("utf-8") + b"\x00")
        return Fingerprint(len(self), self.classes, digest.hexdigest())


class CompletionTokens(Dataset):
    """The completion tokens of prompt/completion texts, each its own example: row r, token t of
    text i, has f_r = log(p_t / (1 - p_t)), p_t the model's probability of token t given the
    tokens before it (under either causal-lm output: one predicted token). Its batches are token
    batches (`Batch.tokens`): each text in a batch is run forward once, whatever the number of
    its tokens there, and each token gets its own backward pass."""

    preview = "text"

    def __init__(self, texts: TextDataset):
        self.texts = texts
        self.rows = np.array([(i, int(t)) for i in range(len(texts)) for t in np.flatnonzero(texts.predicted_mask(i))],
                             dtype=np.int64).reshape(-1, 2)
        self.spec = f"{texts.spec} (per token)"
        self.indices, self.classes, self.has_explicit_indices = np.arange(len(self.rows)), (), False
        self._labels = np.zeros(len(self.rows), dtype=np.int64)
        self.tokenizer, self.max_length, self.has_prompts = texts.tokenizer, texts.max_length, True

    @property
    def lengths(self) -> np.ndarray:
        """The length of each token's text: batches cut in length order keep a text's tokens together."""
        return self.texts.lengths[self.rows[:, 0]]

    @property
    def vocab_size(self) -> int:
        return self.texts.vocab_size

    def __getitem__(self, r: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
        i, t = (int(v) for v in self.rows[r])
        return self.texts[i][0], 0, (i, t)

    def collate(self, items: list[tuple[torch.Tensor, int, tuple[int, int]]]) -> Batch:
        """A token batch: the distinct texts of the rows, once each, and each row's (text, position)."""
        first = {}  # text -> its ids, in the order the rows name the texts
        for ids, _, (i, _) in items:
            first.setdefault(i, ids)
        slot = {i: k for k, i in enumerate(first)}
        tokens = torch.tensor([(slot[i], t) for _, _, (i, t) in items], dtype=torch.long)
        return Batch(padded(list(first.values())), torch.zeros(len(items), dtype=torch.long), None, tokens)

    def select(self, indices: np.ndarray) -> "Dataset":
        raise UserError("per-token targets cannot be selected; select the texts before --per-token")

    def fingerprint(self) -> Fingerprint:
        digest = hashlib.sha256(f"{self.texts.fingerprint().sha256}|per token".encode())
        return Fingerprint(len(self.rows), (), digest.hexdigest())

    def source_record(self) -> dict:
        return {**self.texts.source_record(), "per_token": True}

    def token_id(self, r: int) -> int:
        i, t = (int(v) for v in self.rows[r])
        return int(self.texts[i][0][t])

    def token(self, r: int) -> str:
        """How row r's token shows (a special token by its name)."""
        return self.tokenizer.token_name(self.token_id(r))

    def text(self, r: int) -> str:
        return self.texts.text(int(self.rows[r, 0]))

    def source(self, r: int) -> str:
        return self.texts.source(int(self.rows[r, 0]))

    def describe(self, r: int) -> dict:
        i, t = (int(v) for v in self.rows[r])
        first = int(np.flatnonzero(self.texts.predicted_mask(i))[0])
        return {**self.texts.describe(i), "text_index": i, "token": self.token(r), "token_id": self.token_id(r),
                "token_position": t - first}


# A row's kind is decided by its exact keys: the kind's own, and optionally its others.
ROW_KINDS = {"text": (("text",), ("label", "source")), "prompt": (("prompt", "completion"), ("source",)),
             "messages": (("messages",), ("source",))}
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"
MAX_TOKENS = (1 << 31) - 1  # token positions are int32


def read_jsonl(spec: str, path: str) -> list[dict]:
    """The objects of a JSON-lines file, all of one kind (`checked_row`). A UTF-8 byte-order mark
    at the start of the file is read as one."""
    if not Path(path).is_file():
        raise UserError(f"dataset spec {spec!r}: no file {path!r}")
    rows, first_kind = [], None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.removeprefix(BOM) if number == 1 else line
            if not line or line.isspace():
                continue
            row = parsed_line(line, f"{path}:{number}")
            kind = checked_row(row, f"{path}:{number}")
            first_kind = first_kind or (kind, number)
            if kind != first_kind[0]:
                raise UserError(f"{path}:{number}: a {kind} row, but line {first_kind[1]} is a {first_kind[0]} row; "
                                "give every row a \"text\", or every row a \"prompt\" and a \"completion\", or every "
                                "row \"messages\"")
            rows.append(row)
    if not rows:
        raise UserError(f"dataset spec {spec!r}: {path!r} holds no texts")
    return rows


def parsed_line(line: bytes, where: str):
    """One line's JSON value, or one line saying why it is not JSON that can be read."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise UserError(f"{where}: a number too long to read ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deep to read") from None


def row_kind(row, where: str) -> str:
    """The kind whose own keys `row` holds, refused unless it is exactly one kind's, with only
    that kind's optional keys besides."""
    kinds = [kind for kind, (own, _) in ROW_KINDS.items() if set(own) & set(row)] if isinstance(row, dict) else []
    if not kinds:
        raise UserError(f"{where}: each line must be a JSON object with a \"text\" field, or with \"prompt\" and "
                        "\"completion\" fields, or with \"messages\"")
    if len(kinds) > 1:
        raise UserError(f"{where}: the row mixes the keys of {' and '.join(kinds)} rows ({', '.join(sorted(row))}); "
                        "keep the keys of one kind (text; prompt and completion; or messages)")
    own, optional = ROW_KINDS[kinds[0]]
    missing = [key for key in own if key not in row]
    if missing:
        raise UserError(f"{where}: a row with a \"prompt\" needs a \"completion\" too, and the other way round")
    unknown = sorted(set(row) - set(own) - set(optional))
    if unknown:
        allowed = ", ".join(own + optional)
        raise UserError(f"{where}: a {kinds[0]} row takes the keys {allowed}, not {', '.join(map(repr, unknown))}")
    return kinds[0]


def checked_row(row, where: str) -> str:
    """The kind of a JSON-lines row (`row_kind`), checked field by field."""
    kind = row_kind(row, where)
    own, optional = ROW_KINDS[kind]
    if kind == "messages":
        check_messages(row["messages"], where)
    for field in own if kind != "messages" else ():
        if not isinstance(row[field], str) or not row[field]:
            raise UserError(f"{where}: \"{field}\" must be a non-empty string")
    for field in optional:
        if field in row and not isinstance(row[field], (str, int)):
            raise UserError(f"{where}: \"{field}\" must be a string or an integer")
    for field in (*own, *optional):
        if isinstance(row.get(field), str) and not is_text(row[field]):
            raise UserError(f"{where}: \"{field}\" holds a lone surrogate (an escape such as \\ud800 without its "
                            "pair), which is not text")
    return kind


def check_messages(messages, where: str) -> None:
    """A conversation: a list of {"role", "content"} messages, roles system, user or assistant,
    contents non-empty text, at least one assistant turn (what is predicted)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) \
                or not m["content"] or not is_text(m["content"]):
            raise UserError(f"{where}: each message must be {{\"role\": {' | '.join(ROLES)}, \"content\": non-empty "
                            f"text}}, got {json.dumps(m)[:80]}")
    if messages[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation begins with the assistant's turn; nothing prompts it (begin with "
                        "a system or user message)")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing in it is predicted")


def is_text(value: str) -> bool:
    """Whether `value` is text that UTF-8 can encode (JSON lets \\ud800 alone through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_fortunes_mini(spec: str, split: str) -> list[dict]:
    if split not in ("train", "test"):
        raise UserError(f"dataset spec {spec!r}: the split must be 'train' or 'test', got {split!r}")
    with resources.files("trakwomp").joinpath("assets/fortunes_mini.jsonl.gz").open("rb") as f:
        rows = [json.loads(line) for line in gzip.decompress(f.read()).decode("utf-8").splitlines()]
    return [row for row in rows if row["split"] == split]


class FortunesMini(DatasetKind):
    name, usage, tokenized = "fortunes-mini", "fortunes-mini:train|test", True

    def load(self, spec: str, rest: str, options: LoadOptions) -> TextDataset:
        return text_dataset(spec, read_fortunes_mini(spec, rest), options.tokenizer or "bytes", options.max_length)


class Jsonl(DatasetKind):
    name, usage, tokenized = "jsonl", "jsonl:PATH", True

    def load(self, spec: str, rest: str, options: LoadOptions) -> TextDataset:
        return text_dataset(spec, read_jsonl(spec, rest), options.tokenizer or "bytes", options.max_length)


def answer_dataset(prompt: str, like: Dataset, completion: str | None = None,
                   completion_ids: list[int] | None = None) -> TextDataset:
    """One prompt/completion target for the text dataset `like`'s store: the prompt's ids as a
    train prompt begins, then exactly `completion_ids` (a generated answer: the ids themselves,
    never decoded and tokenized again), or `completion` tokenized as a train completion is (its
    end token included). An answer that the store's --max-length would cut is refused: it is
    scored whole or not at all."""
    if not prompt or not is_text(prompt):
        raise UserError("--prompt must be non-empty text")
    tokenizer = like.tokenizer
    if completion_ids is None:
        if not completion or not is_text(completion):
            raise UserError("--completion must be non-empty text (the answer to attribute)")
        ids, mask = like.encode_answer(prompt, completion)
    else:
        prompt_ids = like.answer_prompt_ids(prompt)
        ids = np.asarray(prompt_ids + list(completion_ids), dtype=np.int32)
        mask = np.arange(len(ids)) >= len(prompt_ids)
    if like.max_length is not None and len(ids) > like.max_length:
        raise UserError(f"the prompt and its answer take {len(ids)} tokens, more than the store's --max-length "
                        f"{like.max_length}; a shorter answer (--max-new-tokens) is scored whole")
    text = prompt + tokenizer.decode([int(i) for i in ids[mask]])
    name = hashlib.sha256(ids.astype("<i4").tobytes() + np.packbits(mask).tobytes()).hexdigest()[:16]
    tokens = GivenTokens([ids], [mask])
    return TextDataset(f"answer:{name}", [text], ["(the answer)"], np.zeros(1), (), tokenizer, like.max_length,
                       tokens=tokens, prompts=[prompt])


def text_dataset(spec: str, rows: list[dict], tokenizer: str, max_length: int | None) -> TextDataset:
    """The texts of `rows` (with their labels and sources), tokenized with `tokenizer`."""
    if max_length is not None and not 2 <= max_length <= MAX_TOKENS:
        raise UserError(f"--max-length must lie between 2 and {MAX_TOKENS} tokens, got {max_length}")
    labels = [row.get("label") for row in rows]
    given = [label for label in labels if label is not None]
    if given and len(given) != len(labels):
        raise UserError(f"dataset spec {spec!r}: {len(labels) - len(given)} of {len(labels)} texts have no \"label\"; "
                        "give every text a label, or none")
    classes = sorted({str(label) for label in given})
    index = {name: i for i, name in enumerate(classes)}
    label_ids = np.array([index[str(label)] for label in given] if given else np.zeros(len(rows)), dtype=np.int64)
    prompts = [row["prompt"] for row in rows] if "prompt" in rows[0] else None
    conversations = [row["messages"] for row in rows] if "messages" in rows[0] else None
    reader = make_tokenizer(tokenizer)
    texts = ([row["text"] for row in rows] if "text" in rows[0] else reader.render(conversations) if conversations
             else [row["prompt"] + row["completion"] for row in rows])
    return TextDataset(spec, texts, [str(row.get("source", "")) for row in rows], label_ids, classes,
                       reader, max_length, prompts=prompts, conversations=conversations)
