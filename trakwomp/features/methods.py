"""The two gradient engines, behind `FeatureMethod`: a projector kind names its method
(trakwomp.features.kinds).

- `ProjectedGradients`: per-example gradients with torch.func, then a seeded projection of them
  (`sjlt`, `gaussian`, `rademacher`, `identity`), in `blocks` blocks of `block_dim` dims.
- `Factored`: per-layer Kronecker projections from hooks on one batched backward pass, never
  building a per-example gradient (`factored`), one block of k x k dims per layer.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.features.base import (
    BatchFeatures,
    FeatureLayout,
    FeatureMethod,
    GradientEngine,
)
from trakwomp.features.factored import (
    FactoredFeatures,
    covered_parameters,
    factored_layers,
)
from trakwomp.features.gradients import PerExampleGradients, count_parameters
from trakwomp.features.layer_rules import LAYER_RULES
from trakwomp.features.memory import MemoryNeed
from trakwomp.features.projectors import (
    DEFAULT_BLOCKS,
    GRADIENT_BUFFER_BYTES,
    PROJECTOR_KINDS,
    ProjectorSpec,
    make_projector,
)
from trakwomp.tasks.base import Task


class ProjectedGradientsEngine(GradientEngine):
    """Per-example gradients of one model, projected by its seeded projector. A projector that
    regenerates its matrix per call is given gradient rows gathered up to GRADIENT_BUFFER_BYTES,
    so that it does so as rarely as memory allows."""

    def __init__(self, net: nn.Module, layout: FeatureLayout, names: list[str], num_params: int, model_id: int,
                 device: torch.device, task: Task):
        self.gradients = PerExampleGradients(net, names, device, task)
        self.projection = make_projector(layout.projector, model_id, num_params, device)
        self.num_params = num_params

    def __call__(self, batch) -> BatchFeatures:
        return self.gradients(batch)

    def rows_per_projection(self, batch_size: int) -> int:
        if self.projection.regenerates:
            return max(batch_size, GRADIENT_BUFFER_BYTES // (4 * self.num_params))
        return batch_size

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.projection.project(rows)


class ProjectedGradients(FeatureMethod):
    def layout(self, projector: ProjectorSpec, net: nn.Module, names: list[str]) -> FeatureLayout:
        """`blocks` blocks (default DEFAULT_BLOCKS) of `block_dim` dims; `identity` keeps every coordinate."""
        projector = replace(projector, blocks=projector.blocks or DEFAULT_BLOCKS)
        num_params = count_parameters(net, names)
        if PROJECTOR_KINDS.get(projector.kind).keeps_every_coordinate and projector.dim != num_params:
            raise UserError(f"the identity projector keeps all {num_params} gradient coordinates: pass `blocks` B and "
                            f"`block_dim` D with B x D = {num_params}")
        return FeatureLayout(projector)

    def add_memory(self, need: MemoryNeed, layout: FeatureLayout, num_params: int, activations: int) -> None:
        """The projector's tables or matrix cache, and 3 x p floats per example: the mapped
        gradients, their parameter-major copy, and autograd's per-example weight gradients."""
        what, size, setting = PROJECTOR_KINDS.get(layout.projector.kind).memory(layout.projector, num_params)
        need.fixed[what] = (size, setting)
        need.per_example["per-example gradients"] = (3 * 4 * num_params, "pass `projector` factored")
        need.per_example["activations"] = (activations, "lower `batch_size`")

    def engine(self, net, layout, names, num_params, model_id, device, task) -> GradientEngine:
        return ProjectedGradientsEngine(net, layout, names, num_params, model_id, device, task)


class Factored(FeatureMethod):
    def layout(self, projector: ProjectorSpec, net: nn.Module, names: list[str]) -> FeatureLayout:
        """One block per supported layer among `names` (`blocks`, if given, must be their number)."""
        layers = tuple(factored_layers(net, names, projector.block_dim))
        if not layers:
            raise UserError("none of the chosen parameters is the weight of a layer factored projections support "
                            f"({', '.join(rule.module_name for _, rule in LAYER_RULES.items())}); use `projector` sjlt")
        if projector.blocks not in (None, len(layers)):
            raise UserError(f"`blocks` {projector.blocks} does not go with `projector` factored, which makes one block "
                            f"per layer ({len(layers)} here)")
        return FeatureLayout(replace(projector, blocks=len(layers)), layers)

    def add_memory(self, need: MemoryNeed, layout: FeatureLayout, num_params: int, activations: int) -> None:
        """The side matrices and one example's gradient (the coverage check on the first batch), and
        per example the activations, the copies of outputs changed in place, and the gradients at
        every layer output."""
        sides = sum(4 * (layer.rows * layer.rank_rows + layer.cols * layer.rank_cols) for layer in layout.layers)
        need.fixed["factored side projections"] = (sides, "lower `block_dim`")
        need.fixed["coverage check (one example's gradient)"] = (4 * num_params, "pass `projector` sjlt")
        need.per_example["activations, copies and their gradients"] = (3 * activations, "lower `batch_size`")

    def engine(self, net, layout, names, num_params, model_id, device, task) -> GradientEngine:
        return FactoredFeatures(net, list(layout.layers), layout.projector.seed, model_id, device, task)

    def check(self, net, layout, names, num_params, device, task, batch) -> None:
        """The hooks' features of every example of `batch` against autograd (`FactoredFeatures.check`)."""
        self.engine(net, layout, names, num_params, 0, device, task).check(batch)

    def left_out(self, layout: FeatureLayout, names: list[str]) -> list[str]:
        return sorted(set(names) - set(covered_parameters(list(layout.layers))))


def feature_method(projector: ProjectorSpec) -> FeatureMethod:
    """The gradient engine kind that a projector kind names."""
    return PROJECTOR_KINDS.get(projector.kind).method
