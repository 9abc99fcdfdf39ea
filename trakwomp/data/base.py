"""The dataset interface: what every dataset kind implements, the batch it collates, its
content fingerprint, and helpers over any dataset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np
import torch

from trakwomp.errors import UserError
from trakwomp.registry import Registry

if TYPE_CHECKING:
    from trakwomp.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class Batch:
    """What the model is called with (`model(*inputs)`), the labels, and for prompt/completion
    text `predicted`: (batch, T) True at the tokens whose prediction the loss and f count (the
    completion's); None where every real token after the first counts."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    predicted: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _moved(self, device: torch.device) -> dict:
        return {"inputs": tuple(t.to(device) for t in self.inputs), "labels": self.labels.to(device),
                "predicted": None if self.predicted is None else self.predicted.to(device)}

    def to(self, device: torch.device) -> "Batch":
        return Batch(**self._moved(device))

    def rows(self, start: int, stop: int) -> "Batch":
        """Examples start..stop-1 of the batch."""
        return Batch(tuple(t[start:stop] for t in self.inputs), self.labels[start:stop],
                     None if self.predicted is None else self.predicted[start:stop])

    def backward_groups(self) -> list[tuple[torch.Tensor | slice, torch.Tensor | slice]]:
        """(rows, the inputs they are computed from) for each group of rows whose f one backward
        pass can differentiate together, each row's f depending on its own input alone: here all
        rows (slices: views, no copy)."""
        return [(slice(None), slice(None))]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Inputs, labels, then `predicted` if any: what a per-example function is mapped over."""
        return (*self.inputs, self.labels, *(() if self.predicted is None else (self.predicted,)))

    @property
    def parts(self) -> tuple[int, bool]:
        """How `tensors` splits back into a batch: (number of inputs, whether `predicted` follows)."""
        return len(self.inputs), self.predicted is not None

    @classmethod
    def of_tensors(cls, tensors: tuple[torch.Tensor, ...], parts: tuple[int, bool]) -> "Batch":
        count, with_predicted = parts
        return cls(tuple(tensors[:count]), tensors[count], tensors[count + 1] if with_predicted else None)


@dataclass(frozen=True)
class TokenBatch(Batch):
    """A batch of token examples, which calls the model once per text: its rows are tokens,
    `tokens[r]` = (the row's text among `inputs`, the token's position), and `labels` has a row
    each; the texts' forward pass is shared by their tokens."""

    tokens: torch.Tensor = field(kw_only=True)

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(**self._moved(device), tokens=self.tokens.to(device))

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """Token rows start..stop-1, with the texts they need."""
        texts, where = torch.unique(self.tokens[start:stop, 0], return_inverse=True)
        return TokenBatch(tuple(t[texts] for t in self.inputs), self.labels[start:stop],
                          None if self.predicted is None else self.predicted[texts],
                          tokens=torch.stack([where, self.tokens[start:stop, 1]], dim=1))

    def text_rows(self) -> list[torch.Tensor]:
        """The rows of each text, in order."""
        return [torch.nonzero(self.tokens[:, 0] == text).flatten() for text in range(len(self.inputs[0]))]

    def backward_groups(self) -> list[tuple[torch.Tensor | slice, torch.Tensor | slice]]:
        """The k-th token of each text: rows whose f one backward pass differentiates together."""
        per_text = self.text_rows()
        groups = [torch.stack([rows[k] for rows in per_text if len(rows) > k])
                  for k in range(max(len(rows) for rows in per_text))]
        return [(rows, self.tokens[rows, 0]) for rows in groups]


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a dataset's content: later stages record it and refuse other data."""

    num_examples: int
    classes: tuple[str, ...]
    sha256: str

    def as_dict(self) -> dict:
        """What a store records of it (store.records.Fingerprint reads it)."""
        return {"num_examples": self.num_examples, "classes": list(self.classes), "sha256": self.sha256}


class Dataset(ABC, torch.utils.data.Dataset):
    """The interface every dataset kind implements: an ordered dataset whose example i is
    `(model input, label)`; the examples are `indices` of a source, whose labels index `classes`
    (or, where `classes` is empty, are the values to predict or 0).

    What a kind does not have, it leaves at the defaults here: images have no `lengths` or
    `source`; texts have no `transform` and no `path`. A capability that only some kinds have is
    a subclass (`TokenizedTexts`) that a caller asks for by type (`capable`)."""

    spec: str
    indices: np.ndarray
    classes: tuple[str, ...]
    has_explicit_indices: bool
    _labels: np.ndarray
    lengths: np.ndarray | None = None  # tokens per example, for data batched by length
    transform = None  # a user's callable applied to every input tensor, and its spec
    transform_spec: str | None = None
    needs: ClassVar[str] = "a dataset"  # what a user gives for a capability (`capable`) this kind is
    preview: str = "image"  # how `show` draws examples: "image" (a PNG grid) or "text" (an HTML page)

    def __len__(self) -> int:
        return len(self.indices)

    def predicting_prompts(self) -> "Dataset":
        """The same examples with the prompts' tokens predicted too (--train-on-prompt)."""
        raise UserError(f"`train_on_prompt` needs prompt/completion data (jsonl rows with \"prompt\" and "
                        f"\"completion\"), not {self.spec}")

    def per_token(self) -> "Dataset":
        """Each completion token its own example (--per-token)."""
        raise UserError(f"`per_token` needs prompt/completion targets (jsonl rows with \"prompt\" and "
                        f"\"completion\"), not {self.spec}")

    def augmented(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The batch as training sees it with the recipe's augmentation (default: as it is)."""
        return batch

    def coverage_probe(self, positions: np.ndarray) -> list[int]:
        """A few of `positions` whose gradients exercise what an engine could get wrong, for its
        check (`GradientEngine.check`): the first two, and where examples have lengths the
        longest and the shortest (batched with the longest: padded)."""
        given, lengths = [int(i) for i in positions], self.lengths
        chosen = given[:2]
        if lengths is not None:
            by_length = sorted(given, key=lambda i: lengths[i])
            chosen += [by_length[-1], by_length[0]]
        return list(dict.fromkeys(chosen))

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def real_valued(self) -> bool:
        """Whether the labels are real values to predict (regression) rather than class indices."""
        return self._labels.dtype.kind == "f"

    def label_name(self, i: int) -> str | float | None:
        """Example i's label as shown: its class name, its value, or None for data without labels."""
        if self.real_valued:
            return float(self.labels[i])
        return self.classes[int(self.labels[i])] if self.classes else None

    def source(self, i: int) -> str | None:
        """Where example i came from (its group by default), or None if the data does not say."""
        return None

    @abstractmethod
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | float]: ...

    @abstractmethod
    def collate(self, items: list[tuple[torch.Tensor, int | float]]) -> Batch:
        """A batch of examples as the model is called with them."""

    @abstractmethod
    def select(self, indices: np.ndarray) -> "Dataset":
        """The examples `indices` of this dataset, in that order."""

    @abstractmethod
    def fingerprint(self) -> Fingerprint:
        """Number of examples, class names and a SHA-256 over every example's content and label."""

    @abstractmethod
    def source_record(self) -> dict:
        """What, beyond the spec, is needed to load this data again (a store records it)."""

    @abstractmethod
    def describe(self, i: int) -> dict:
        """What a table row says of example i: its label, and its path or its text and source."""


class TokenizedTexts(Dataset):
    """The capability of language-model data: texts that `tokenizer` made token ids of (its
    `record()` is bound to a store); `vocab_size` ids, `text(i)` example i's text."""

    needs: ClassVar[str] = "text data (fortunes-mini:..., jsonl:PATH)"
    tokenizer: Tokenizer
    lengths: np.ndarray  # tokens per example, which every text has
    fewest_tokens: np.ndarray | None = None  # a lower bound of `lengths` known before tokenizing
    has_prompts: bool = False  # prompt/completion texts, of which the completions are predicted
    completion_tokens: np.ndarray | None = None  # per example, how many of its tokens are predicted
    max_length: int | None = None  # where texts are cut (None: nowhere)
    truncated: int = 0  # how many examples `max_length` cut
    preview = "text"

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def text(self, i: int) -> str: ...


Capability = TypeVar("Capability", bound=Dataset)


def capable(data: Dataset, capability: type[Capability], needed_by: str) -> Capability:
    """`data` as a dataset with `capability` (a subclass of Dataset that declares `needs`: what
    the user must give), refused in one line naming `needed_by` where it has not."""
    if not isinstance(data, capability):
        raise UserError(f"{needed_by} needs {capability.needs}, not {data.spec}")
    return data


# spec prefix -> kind: every module of this package, and other packages' entry points (trakwomp.registry)
DATASET_KINDS: Registry["DatasetKind"] = Registry("trakwomp.dataset_kinds", "dataset kind", lambda cls: cls(),
                                                  builtins=("trakwomp.data.*",))


@dataclass(frozen=True)
class LoadOptions:
    """How to read a dataset: `download` (for kinds that can), and for text the tokenizer spec and
    the length to cut texts at."""

    download: bool = False
    tokenizer: str | None = None
    max_length: int | None = None


class DatasetKind(ABC):
    """A kind of dataset, named by the prefix of its spec (`npz:PATH`): a subclass with a `name`
    is registered under it in DATASET_KINDS."""

    name: ClassVar[str]  # the spec prefix
    usage: ClassVar[str]  # the spec as help shows it, e.g. "npz:PATH"
    tokenized: ClassVar[bool] = False  # text read with a tokenizer (--tokenizer, --max-length; no --transform)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            DATASET_KINDS.add(cls.name, cls)

    @abstractmethod
    def load(self, spec: str, rest: str, options: LoadOptions) -> Dataset:
        """The dataset of `spec` (`rest`: what follows the prefix and its colon)."""


def check_indices(spec: str, indices: np.ndarray, size: int) -> np.ndarray:
    """`indices` if they are a non-empty 1-d integer array within [0, size)."""
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"indices for {spec} must be a 1-d array of integers, got {indices.dtype} {indices.shape}")
    if not len(indices):
        raise UserError(f"indices for {spec} select no examples")
    if indices.min() < 0 or indices.max() >= size:
        raise UserError(f"indices for {spec} must lie in [0, {size}), got values from {indices.min()} to {indices.max()}")
    return indices


def load_batch(dataset: Dataset, positions) -> Batch:
    return dataset.collate([dataset[int(i)] for i in positions])


def length_sorted(dataset: Dataset, positions: np.ndarray) -> np.ndarray:
    """`positions` ordered by token count (stable), so that batches cut from them pad little;
    unchanged for data without lengths."""
    positions = np.asarray(positions)
    if dataset.lengths is None:
        return positions
    return positions[np.argsort(dataset.lengths[positions], kind="stable")]
