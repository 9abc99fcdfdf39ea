"""Text datasets: texts turned into token ids by a tokenizer, with optional labels and sources.

Specs:
    fortunes-mini:train | fortunes-mini:test   the embedded 2,000 + 200 fortunes (see assets/fortunes_mini.md)
    jsonl:PATH                                 one JSON object per line: `text`, optional `label` and `source`;
                                               or `prompt` and `completion`, optional `source`

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
        ids, lengths = self.encode([p + c for p, c in zip(prompts, completions)], limit)
        return ids, lengths, np.array([1 + len(p.encode("utf-8")) for p in prompts], dtype=np.int64)

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
        """(ids, full token counts, prompt token counts): each prompt tokenized as a text (with the
        tokenizer's special tokens), its completion on its own after it (without them), so the
        boundary between them is a token boundary."""
        prompt_ids = self.tokenizer(prompts)["input_ids"]
        completion_ids = self.tokenizer(completions, add_special_tokens=False)["input_ids"]
        ids = [np.asarray(p + c, dtype=np.int32) for p, c in zip(prompt_ids, completion_ids)]
        return ([i[:limit] for i in ids], np.array([len(i) for i in ids], dtype=np.int64),
                np.array([len(p) for p in prompt_ids], dtype=np.int64))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def stop(self) -> int | None:
        """The id that ends a generated text: the end-of-sequence token, if the tokenizer has one."""
        return self.tokenizer.eos_token_id

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
    given: text j is prompts[j] followed by its completion) also each prompt's token count."""

    def __init__(self, texts: list[str], tokenizer, max_length: int | None, prompts: list[str] | None = None):
        self.texts, self.tokenizer, self.max_length, self.prompts = texts, tokenizer, max_length, prompts

    @functools.cached_property
    def fewest(self) -> np.ndarray:
        return self.tokenizer.fewest_tokens(self.texts)

    @functools.cached_property
    def _encoded(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        if self.prompts is None:
            return (*self.tokenizer.encode(self.texts, self.max_length), None)
        completions = [text[len(prompt):] for text, prompt in zip(self.texts, self.prompts)]
        return self.tokenizer.encode_pairs(self.prompts, completions, self.max_length)

    @property
    def ids(self) -> list[np.ndarray]:
        return self._encoded[0]

    @property
    def lengths(self) -> np.ndarray:
        return self._encoded[1]

    @property
    def starts(self) -> np.ndarray | None:
        return self._encoded[2]


class TextDataset(Dataset):
    """An ordered text dataset: example i is `(token ids, label, first predicted token)`; `text(i)`
    and `source(i)` give the text and where it came from. Labels index `classes` (the sorted
    distinct labels given); texts without labels have label 0 and no classes.

    Prompt/completion texts (`prompts` given, text j = prompts[j] + its completion) are predicted
    from their completion's first token on: batches carry `Batch.predicted`, unless
    `predicting_prompts()` asked for every token (a model trained with --train-on-prompt)."""

    preview = "text"

    def __init__(self, spec: str, texts: Sequence[str], sources: Sequence[str], labels: np.ndarray,
                 classes: Sequence[str], tokenizer, max_length: int | None, tokens: "Tokens | None" = None,
                 indices: np.ndarray | None = None, prompts: Sequence[str] | None = None,
                 prompts_predicted: bool = False):
        self.spec = spec
        self._texts, self._sources, self._labels = list(texts), list(sources), np.asarray(labels, dtype=np.int64)
        self._prompts = None if prompts is None else list(prompts)
        self.classes = tuple(classes)
        self.tokenizer, self.max_length = tokenizer, max_length
        self._tokens = tokens if tokens is not None else Tokens(self._texts, tokenizer, max_length, self._prompts)
        self.has_explicit_indices = indices is not None
        self.indices = np.arange(len(self._texts)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.has_prompts, self.prompts_predicted = prompts is not None, prompts_predicted

    def _copy(self, **changes) -> "TextDataset":
        given = {"tokens": self._tokens, "indices": self.indices, "prompts": self._prompts,
                 "prompts_predicted": self.prompts_predicted, **changes}
        return TextDataset(self.spec, self._texts, self._sources, self._labels, self.classes, self.tokenizer,
                           self.max_length, **given)

    def predicting_prompts(self) -> "TextDataset":
        """The same examples with every token predicted, prompts included (--train-on-prompt)."""
        if not self.has_prompts:
            return super().predicting_prompts()
        return self._copy(prompts_predicted=True)

    @property
    def completion_starts(self) -> np.ndarray | None:
        """Per example, the position of its completion's first token (None for plain texts)."""
        starts = self._tokens.starts
        return None if starts is None else starts[self.indices]

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(token ids, label, the first token whose prediction counts)."""
        j = int(self.indices[i])
        first = 1 if self._tokens.starts is None or self.prompts_predicted else int(self._tokens.starts[j])
        return torch.from_numpy(self._ids(j).astype(np.int64)), int(self._labels[j]), first

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
        return self._texts[int(self.indices[i])]

    def source(self, i: int) -> str:
        return self._sources[int(self.indices[i])]

    def prompt(self, i: int) -> str | None:
        """The prompt of example i (None for plain texts); its completion is the rest of `text(i)`."""
        return None if self._prompts is None else self._prompts[int(self.indices[i])]

    def describe(self, i: int) -> dict:
        described = {"label": self.label_name(i), "text": self.text(i), "source": self.source(i)}
        prompt = self.prompt(i)
        if prompt is not None:
            described.update(prompt=prompt, completion=self.text(i)[len(prompt):])
        return described

    def source_record(self) -> dict:
        """How to load this data again: the spec, tokenizer and truncation."""
        return {"tokenizer": self.tokenizer.spec, "max_length": self.max_length}

    def collate(self, items: list[tuple[torch.Tensor, int, int]]) -> Batch:
        """Token ids right-padded with 0 to the longest, the mask of real tokens, and for
        prompt/completion texts the mask of the tokens whose prediction counts."""
        longest = max(len(ids) for ids, _, _ in items)
        ids = torch.zeros(len(items), longest, dtype=torch.long)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        predicted = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, (tokens, _, first) in enumerate(items):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = True
            predicted[row, first:len(tokens)] = True
        masked = self.has_prompts and not self.prompts_predicted
        return Batch((ids, mask), torch.tensor([y for _, y, _ in items], dtype=torch.long),
                     predicted if masked else None)

    def select(self, indices: np.ndarray) -> "TextDataset":
        """The examples `indices` of this dataset, in that order."""
        indices = check_indices(self.spec, np.asarray(indices), len(self))
        return self._copy(indices=self.indices[indices])

    def fingerprint(self) -> Fingerprint:
        """Number of examples, class names and a SHA-256 over the tokenizer and, per example, its
        token ids (after truncation), text, source and label, and for prompt/completion texts
        where the completion starts (what the loss and f leave out)."""
        digest = hashlib.sha256(json.dumps(self.tokenizer.record(), sort_keys=True).encode())
        for j in self.indices:
            j = int(j)
            ids = self._ids(j).astype("<i4")
            if self._prompts is not None:
                digest.update(f"completion from {int(self._tokens.starts[j])}|".encode())
            digest.update(f"{len(ids)}|{int(self._labels[j])}|{self._sources[j]}|".encode("utf-8"))
            digest.update(ids.tobytes())
            digest.update(self._texts[j].encode("utf-8") + b"\x00")
        return Fingerprint(len(self), self.classes, digest.hexdigest())


ROW_KINDS = {"text": ("text",), "prompt": ("prompt", "completion")}


def read_jsonl(spec: str, path: str) -> list[dict]:
    """The objects of a JSON-lines file: every row a non-empty string `text`, or every row a
    non-empty `prompt` and `completion` (optional `label` and `source` each)."""
    if not Path(path).is_file():
        raise UserError(f"dataset spec {spec!r}: no file {path!r}")
    rows, first_kind = [], None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line or line.isspace():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
            kind = checked_row(row, f"{path}:{number}")
            first_kind = first_kind or (kind, number)
            if kind != first_kind[0]:
                raise UserError(f"{path}:{number}: a {kind} row, but line {first_kind[1]} is a {first_kind[0]} row; "
                                "give every row a \"text\", or every row a \"prompt\" and a \"completion\"")
            rows.append(row)
    if not rows:
        raise UserError(f"dataset spec {spec!r}: {path!r} holds no texts")
    return rows


def checked_row(row, where: str) -> str:
    """The kind of a JSON-lines row ("text" or "prompt"), checked field by field."""
    if not isinstance(row, dict) or not ({"text", "prompt", "completion"} & set(row)):
        raise UserError(f"{where}: each line must be a JSON object with a \"text\" field, or with \"prompt\" and "
                        "\"completion\" fields")
    kind = "text" if "text" in row else "prompt"
    if kind == "prompt" and "label" in row:
        raise UserError(f"{where}: a prompt/completion row has no \"label\" (its completion is what is predicted)")
    for field in ROW_KINDS[kind]:
        if field not in row:
            raise UserError(f"{where}: a row with a \"prompt\" needs a \"completion\" too, and the other way round")
        if not isinstance(row[field], str) or not row[field]:
            raise UserError(f"{where}: \"{field}\" must be a non-empty string")
    for field in ("label", "source"):
        if field in row and not isinstance(row[field], (str, int)):
            raise UserError(f"{where}: \"{field}\" must be a string or an integer")
    for field in (*ROW_KINDS[kind], "label", "source"):
        if isinstance(row.get(field), str) and not is_text(row[field]):
            raise UserError(f"{where}: \"{field}\" holds a lone surrogate (an escape such as \\ud800 without its "
                            "pair), which is not text")
    return kind


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


def answer_dataset(prompt: str, completion: str, like: Dataset) -> TextDataset:
    """One prompt/completion target, tokenized as the text dataset `like` is."""
    for name, value in (("--prompt", prompt), ("the answer", completion)):
        if not value or not is_text(value):
            raise UserError(f"{name} must be non-empty text")
    return TextDataset(f"answer:{hashlib.sha256((prompt + chr(0) + completion).encode()).hexdigest()[:16]}",
                       [prompt + completion], ["(the answer)"], np.zeros(1), (), like.tokenizer, like.max_length,
                       prompts=[prompt])


def text_dataset(spec: str, rows: list[dict], tokenizer: str, max_length: int | None) -> TextDataset:
    """The texts of `rows` (with their labels and sources), tokenized with `tokenizer`."""
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length must be at least 2 tokens, got {max_length}")
    labels = [row.get("label") for row in rows]
    given = [label for label in labels if label is not None]
    if given and len(given) != len(labels):
        raise UserError(f"dataset spec {spec!r}: {len(labels) - len(given)} of {len(labels)} texts have no \"label\"; "
                        "give every text a label, or none")
    classes = sorted({str(label) for label in given})
    index = {name: i for i, name in enumerate(classes)}
    label_ids = np.array([index[str(label)] for label in given] if given else np.zeros(len(rows)), dtype=np.int64)
    prompts = [row["prompt"] for row in rows] if "prompt" in rows[0] else None
    texts = [row["text"] for row in rows] if prompts is None else [row["prompt"] + row["completion"] for row in rows]
    return TextDataset(spec, texts, [str(row.get("source", "")) for row in rows], label_ids, classes,
                       make_tokenizer(tokenizer), max_length, prompts=prompts)
