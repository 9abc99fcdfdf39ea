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

import gzip
import hashlib
import json
from importlib import resources
from typing import Sequence

import numpy as np
import torch

from trakwomp.data.base import (
    Batch,
    Dataset,
    DatasetKind,
    Fingerprint,
    LoadOptions,
    TokenBatch,
    TokenizedTexts,
    check_indices,
)
from trakwomp.errors import UserError
from trakwomp.data.jsonl import is_text, read_jsonl
from trakwomp.data.tokenizers import MAX_TOKENS, Tokenizer, make_tokenizer
from trakwomp.data.tokens import GivenTokens, Tokens, padded


class TextDataset(TokenizedTexts):
    """An ordered text dataset: example i is `(token ids, label, first predicted token)`; `text(i)`
    and `source(i)` give the text and where it came from. Labels index `classes` (the sorted
    distinct labels given); texts without labels have label 0 and no classes.

    Prompt/completion texts (`prompts` given, text j = prompts[j] + its completion) are predicted
    at their completion's tokens, conversations (`conversations` given, text j their rendering)
    at their assistant turns' tokens: batches carry `Batch.predicted`, unless
    `predicting_prompts()` asked for every token (a model trained with --train-on-prompt)."""

    def __init__(self, spec: str, texts: Sequence[str], sources: Sequence[str], labels: np.ndarray,
                 classes: Sequence[str], tokenizer: Tokenizer, max_length: int | None, tokens: "Tokens | None" = None,
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

    def predicting_prompts(self) -> Dataset:
        """The same examples with every token predicted, prompts included (--train-on-prompt)."""
        if not self.has_prompts:
            return super().predicting_prompts()
        return self._copy(prompts_predicted=True)

    def per_token(self) -> Dataset:
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

    def completion_mask(self, i: int) -> np.ndarray:
        """True at the tokens of example i's completion (prompt/completion texts, conversations)."""
        mask = self.predicted_mask(i)
        if mask is None:
            raise UserError(f"{self.spec} holds plain texts, without prompts: they have no completion")
        return mask

    def coverage_probe(self, positions: np.ndarray) -> list[int]:
        """The base choice, and the text that repeats one token most often (a layer may treat a
        repeated token apart: Embedding(scale_grad_by_freq))."""
        chosen = super().coverage_probe(positions)
        repeats = [int(np.unique(self._ids(int(self.indices[int(i)])), return_counts=True)[1].max()) for i in positions]
        return list(dict.fromkeys([*chosen, int(positions[int(np.argmax(repeats))])]))

    def completion_ids(self, i: int) -> list[int]:
        """The ids of example i's predicted tokens (its completion's)."""
        return [int(t) for t in self._ids(int(self.indices[i]))[self.completion_mask(i)]]

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
                if counted is not None:  # (always, for texts with prompts whose prompts are not predicted)
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


class CompletionTokens(TokenizedTexts):
    """The completion tokens of prompt/completion texts, each its own example: row r, token t of
    text i, has f_r = log(p_t / (1 - p_t)), p_t the model's probability of token t given the
    tokens before it (under either causal-lm output: one predicted token). Its batches are token
    batches (`TokenBatch`): each text in a batch is run forward once, whatever the number of
    its tokens there, and each token gets its own backward pass."""

    def __init__(self, texts: TextDataset):
        self.texts = texts
        self.rows = np.array([(i, int(t)) for i in range(len(texts)) for t in np.flatnonzero(texts.completion_mask(i))],
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
        return TokenBatch(padded(list(first.values())), torch.zeros(len(items), dtype=torch.long), tokens=tokens)

    def select(self, indices: np.ndarray) -> "Dataset":
        raise UserError("per-token targets cannot be selected; select the texts before `per_token`")

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
        first = int(np.flatnonzero(self.texts.completion_mask(i))[0])
        return {**self.texts.describe(i), "text_index": i, "token": self.token(r), "token_id": self.token_id(r),
                "token_position": t - first}


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


def answer_dataset(prompt: str, like: TextDataset, completion: str | None = None,
                   completion_ids: list[int] | None = None) -> TextDataset:
    """One prompt/completion target for the text dataset `like`'s store: the prompt's ids as a
    train prompt begins, then exactly `completion_ids` (a generated answer: the ids themselves,
    never decoded and tokenized again), or `completion` tokenized as a train completion is (its
    end token included). An answer that the store's --max-length would cut is refused: it is
    scored whole or not at all."""
    if not prompt or not is_text(prompt):
        raise UserError("`prompt` must be non-empty text")
    tokenizer = like.tokenizer
    if completion_ids is None:
        if not completion or not is_text(completion):
            raise UserError("`completion` must be non-empty text (the answer to attribute)")
        ids, mask = like.encode_answer(prompt, completion)
    else:
        prompt_ids = like.answer_prompt_ids(prompt)
        ids = np.asarray(prompt_ids + list(completion_ids), dtype=np.int32)
        mask = np.arange(len(ids)) >= len(prompt_ids)
    if like.max_length is not None and len(ids) > like.max_length:
        raise UserError(f"the prompt and its answer take {len(ids)} tokens, more than the store's `max_length` "
                        f"{like.max_length}; a shorter answer (`max_new_tokens`) is scored whole")
    text = prompt + tokenizer.decode([int(i) for i in ids[mask]])
    name = hashlib.sha256(ids.astype("<i4").tobytes() + np.packbits(mask).tobytes()).hexdigest()[:16]
    tokens = GivenTokens([ids], [mask])
    return TextDataset(f"answer:{name}", [text], ["(the answer)"], np.zeros(1), (), tokenizer, like.max_length,
                       tokens=tokens, prompts=[prompt])


def text_dataset(spec: str, rows: list[dict], tokenizer: str, max_length: int | None) -> TextDataset:
    """The texts of `rows` (with their labels and sources), tokenized with `tokenizer`."""
    if max_length is not None and not 2 <= max_length <= MAX_TOKENS:
        raise UserError(f"`max_length` must lie between 2 and {MAX_TOKENS} tokens, got {max_length}")
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
