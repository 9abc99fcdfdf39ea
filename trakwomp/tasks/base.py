"""The task interface: the one place that knows what a model's output means.

A task fixes the output function f that TRAK differentiates, the weight q of each train
example, the training loss, the data it accepts, the output shape it expects, and its training
recipe's defaults. Batches come from `Dataset.collate` as `Batch(inputs, labels)`: the model is
called as `model(*inputs)` (images: `(x,)`; text: `(token ids, mask)`, right-padded, mask True on
real tokens).

TRAK's score of train example i for target z is the one-step Newton estimate of what removing i
does to f(z) when the training loss is a function of f: with l_i(f) the loss of example i,
q_i = -l_i'(f_i) (docs/method.md). Where f is the log-odds log(p / (1 - p)) of a probability p
of being right and the loss is -log p = -log sigmoid(f), q = 1 - p = sigmoid(-f): the default.

A new task is one module in this package, or in another package that names it as an entry
point (group `trakwomp.tasks`, see trakwomp.registry): a subclass of `Task` with a `name` is
registered under that name in `TASKS` (which imports every module here on first use).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from trakwomp.data.base import Batch, Dataset
from trakwomp.errors import UserError
from trakwomp.registry import Registry

TASKS: Registry[type["Task"]] = Registry("trakwomp.tasks", "`task`", builtins=("trakwomp.tasks.*",))


def logits_of(output) -> torch.Tensor:
    """A model's logits: the output itself, or its `.logits` (Hugging Face models)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def log_odds_from_loss(loss: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(-loss): -loss - log(1 - exp(-loss)), computed stably."""
    return -loss - torch.log(-torch.expm1(-loss))


class Task(ABC):
    """What a model's output means. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # as given to --task and recorded in a store
    help: ClassVar[str]  # what f is, in a few words, for --help
    default_model: ClassVar[str]  # the model spec `train` uses without --model
    summary_name: ClassVar[str]  # what `summary_terms` add up to, as recorded per LDS model
    recipe_defaults: ClassVar[dict] = {}  # training recipe values that differ from `Recipe`'s defaults
    generates_text: ClassVar[bool] = False  # a language model, whose answers `explain` attributes
    options: ClassVar[dict[str, str]] = {}  # the task's own settings (`make_task`'s keywords) -> its fields

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            TASKS.add(cls.name, cls)

    @classmethod
    def from_record(cls, recorded: dict) -> "Task":
        """The task a store records (`as_dict`)."""
        return cls(**{k: v for k, v in recorded.items() if k != "name"})

    @abstractmethod
    def outputs(self, output, batch: Batch) -> torch.Tensor:
        """f, one per example of the batch, from the model's output on it."""

    def representation(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One vector per example from `hidden`, the input of the model's output layer (the
        repsim baseline): here that input itself, flattened."""
        return hidden.reshape(len(hidden), -1)

    def token_outputs(self, output, batch: Batch, texts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """f of token `positions[r]` of text `texts[r]` given the tokens before it: per-token attribution."""
        raise UserError(f"per-token attribution needs a language model (causal-lm), not the {self.name} task")

    def q(self, f: torch.Tensor, batch: Batch) -> torch.Tensor:
        """q_i = -l_i'(f_i); for a log-odds output trained with -log sigmoid(f): q = sigmoid(-f) = 1 - p."""
        return torch.sigmoid(-f)

    @abstractmethod
    def loss(self, output, batch: Batch) -> torch.Tensor:
        """The training loss of a batch (a mean)."""

    @abstractmethod
    def summary_terms(self, output, batch: Batch) -> tuple[float, float]:
        """(numerator, denominator) of the summary of a model on targets, summed over batches."""

    @abstractmethod
    def describe_summary(self, value: float) -> str:
        """The summary as `train` prints it."""

    @abstractmethod
    def check_data(self, dataset: Dataset) -> None:
        """Refuse, in one line, data this task cannot use."""

    @abstractmethod
    def output_size(self, dataset: Dataset) -> int:
        """How many outputs a model needs for `dataset` (checked to suit the task)."""

    @abstractmethod
    def output_mismatch(self, shape: tuple[int, ...], batch: Batch, output_size: int) -> str | None:
        """None if a model's output of `shape` on `batch` suits the task, else what was expected."""

    def check_targets(self, targets: Dataset, train_classes: tuple[str, ...]) -> None:  # noqa: B027 (a default)
        """Refuse targets the store's train set cannot be scored against (default: any are fine)."""

    def as_dict(self) -> dict:
        """What a store records of the task (`from_record` reads it back)."""
        return {"name": self.name}

    def __str__(self) -> str:
        return self.name
