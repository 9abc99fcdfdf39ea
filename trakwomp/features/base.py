"""The gradient-engine interface: what turns a batch of examples into projected gradients.

For a model with parameters theta and a task's output f, an engine gives, per example x of a
batch, phi(x) = P^T grad_theta f(x) (d dims), f(x) and the task's weight q(x). Two kinds exist:
per-example gradients then a projector (`methods.ProjectedGradients`), and factored per-layer
projections from hooks (`methods.Factored`). Both return `BatchFeatures`; what an engine returns
for a batch is projected by its `project`, which may gather rows of several batches first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from trakwomp.data.base import Batch
from trakwomp.tasks.base import Task

if TYPE_CHECKING:
    from trakwomp.features.memory import MemoryNeed
    from trakwomp.features.projectors import ProjectorSpec


@dataclass
class BatchFeatures:
    """One batch's rows (projected gradients, or gradients that `GradientEngine.project` projects),
    its outputs f and q = -l'(f), each (batch, ...) float32."""

    rows: torch.Tensor
    outputs: torch.Tensor
    q: torch.Tensor


class GradientEngine(ABC):
    """Projected gradients of one model, batch by batch."""

    @abstractmethod
    def __call__(self, batch: Batch) -> BatchFeatures:
        """The rows, outputs f and q of a batch (on the engine's device)."""

    def check(self, batch: Batch) -> None:  # noqa: B027 (a hook with a default: nothing to check)
        """Check, before any features are kept, that the engine's features of every example of
        `batch` (chosen by `Dataset.coverage_probe` to exercise what could differ) are right;
        refuse in one line if not (default: nothing to check, the engine cannot be wrong so)."""

    def rows_per_projection(self, batch_size: int) -> int:
        """How many rows to gather before calling `project` (default: one batch)."""
        return batch_size

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows gathered from `__call__`, projected to the engine's d dims (default: as they are)."""
        return rows


@dataclass(frozen=True)
class FeatureLayout:
    """How a store's feature dims are laid out: the projector (its blocks resolved) and, for
    per-layer features, the layers (one block each, in feature order)."""

    projector: ProjectorSpec
    layers: tuple = ()

    @property
    def dims(self) -> int:
        return sum(layer.width for layer in self.layers) if self.layers else self.projector.dim


class FeatureMethod(ABC):
    """A kind of gradient engine: how it lays out the feature dims for a model, what memory it
    needs, and the engine it builds for one model."""

    @abstractmethod
    def layout(self, projector: ProjectorSpec, net: nn.Module, names: list[str]) -> FeatureLayout:
        """The layout for differentiating the parameters `names` of `net` (refused in one line
        if this method cannot)."""

    @abstractmethod
    def add_memory(self, need: MemoryNeed, layout: FeatureLayout, num_params: int, activations: int) -> None:
        """Add this method's terms to `need` (see trakwomp.features.memory)."""

    @abstractmethod
    def engine(self, net: nn.Module, layout: FeatureLayout, names: list[str], num_params: int, model_id: int,
               device: torch.device, task: Task) -> GradientEngine:
        """The engine of model `model_id` (its projection regenerated from the recorded seed)."""

    def check(self, net: nn.Module, layout: FeatureLayout, names: list[str], num_params: int,  # noqa: B027 (a default)
              device: torch.device, task: Task, batch: Batch) -> None:
        """Check the method's features of `net` on `batch` before any work (`GradientEngine.check`);
        default: nothing to check."""

    def left_out(self, layout: FeatureLayout, names: list[str]) -> list[str]:
        """The chosen parameters whose gradients the features leave out (default: none)."""
        return []
