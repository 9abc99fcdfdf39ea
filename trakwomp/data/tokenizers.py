"""Tokenizers: `bytes` (UTF-8 bytes 0..255 after a start token 256; needs no files) or `hf:DIR`
(a Hugging Face tokenizer saved in a local folder, its chat template included)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from trakwomp.errors import UserError
from trakwomp.huggingface import import_transformers, refuse_remote_code

MAX_TOKENS = (1 << 31) - 1  # token positions are int32


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
        raise self._no_chat_template()

    def encode_conversations(self, conversations: list[list[dict]], limit: int | None):
        raise self._no_chat_template()

    def chat_ids(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        raise self._no_chat_template()

    @staticmethod
    def _no_chat_template() -> UserError:
        return UserError("rows of \"messages\" need `tokenizer` hf:DIR, a tokenizer with a chat template that "
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
            raise UserError(f"`tokenizer` {self.spec}: no folder {folder!r}")
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")):
            raise UserError(f"`tokenizer` {self.spec}: the folder holds no tokenizer files (tokenizer.json, "
                            "vocab.json, tokenizer.model or vocab.txt); save one there with tokenizer.save_pretrained")
        refuse_remote_code(path / "tokenizer_config.json", f"`tokenizer` {self.spec}")
        transformers = import_transformers(self.spec)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                                        trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"`tokenizer` {self.spec}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
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


Tokenizer = ByteTokenizer | HuggingFaceTokenizer  # what a TokenizedTexts dataset's tokenizer is


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a --tokenizer spec names."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:") and len(spec) > 3:
        return HuggingFaceTokenizer(spec[3:])
    raise UserError(f"unknown `tokenizer` {spec!r}: expected bytes or hf:DIR")
