"""trakwomp's own projector kinds (`--projector`), each with its feature method: four projections
of per-example gradients (trakwomp.features.projectors) and the factored per-layer projection
from hooks (trakwomp.features.factored)."""

from __future__ import annotations

import torch

from trakwomp.features.methods import Factored, ProjectedGradients
from trakwomp.features.projectors import (
    PROJECTOR_KINDS,
    ProjectorKind,
    ProjectorSpec,
    SparseProjector,
    gaussian_rows,
    identity_rows,
    rademacher_rows,
    sjlt_rows,
)

PROJECTED, FACTORED = ProjectedGradients(), Factored()


class Sjlt(ProjectorKind):
    name, help, method = "sjlt", "sparse, O(p) per block", PROJECTED
    def rows(self, spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int,
             num_params: int) -> torch.Tensor:
        return sjlt_rows(spec, model_id, block, tile, rows, num_params)

    def projector(self, spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device):
        return SparseProjector(spec, model_id, num_params, device)

    def memory(self, spec: ProjectorSpec, num_params: int) -> tuple[str, int, str]:
        return SparseProjector.memory(spec, num_params)


class Gaussian(ProjectorKind):
    name, method = "gaussian", PROJECTED
    def rows(self, spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int,
             num_params: int) -> torch.Tensor:
        return gaussian_rows(spec, model_id, block, tile, rows, num_params)


class Rademacher(ProjectorKind):
    name, method = "rademacher", PROJECTED
    def rows(self, spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int,
             num_params: int) -> torch.Tensor:
        return rademacher_rows(spec, model_id, block, tile, rows, num_params)


class Identity(ProjectorKind):
    name, help, method = "identity", "no projection", PROJECTED
    keeps_every_coordinate = True
    def rows(self, spec: ProjectorSpec, model_id: int, block: int, tile: int, rows: int,
             num_params: int) -> torch.Tensor:
        return identity_rows(spec, model_id, block, tile, rows, num_params)


class FactoredKind(ProjectorKind):
    name, method = "factored", FACTORED
    help = "one k x k block per layer from hooks, no per-example gradients; block dim k x k"


for _kind in (Sjlt, Gaussian, Rademacher, Identity, FactoredKind):
    PROJECTOR_KINDS.add(_kind.name, _kind)
