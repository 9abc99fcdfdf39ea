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
    rows = staticmethod(sjlt_rows)

    def projector(self, spec: ProjectorSpec, model_id: int, num_params: int, device: torch.device):
        return SparseProjector(spec, model_id, num_params, device)

    def memory(self, spec: ProjectorSpec, num_params: int) -> tuple[str, int, str]:
        return SparseProjector.memory(spec, num_params)


class Gaussian(ProjectorKind):
    name, method = "gaussian", PROJECTED
    rows = staticmethod(gaussian_rows)


class Rademacher(ProjectorKind):
    name, method = "rademacher", PROJECTED
    rows = staticmethod(rademacher_rows)


class Identity(ProjectorKind):
    name, help, method = "identity", "no projection", PROJECTED
    keeps_every_coordinate = True
    rows = staticmethod(identity_rows)


class FactoredKind(ProjectorKind):
    name, method = "factored", FACTORED
    help = "one k x k block per layer from hooks, no per-example gradients; block dim k x k"


for _kind in (Sjlt, Gaussian, Rademacher, Identity, FactoredKind):
    PROJECTOR_KINDS.add(_kind.name, _kind)
