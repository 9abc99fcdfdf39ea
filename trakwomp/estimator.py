"""The TRAK / TRAK-WOMP estimator on projected features, as plain functions on tensors.

For models m = 1..M with train features Phi_m (n x D), target features phi_m(z) (1 x D) and
q_m,i = 1 - p_m,i, a view (D, B) splits the D dims into B blocks of w = D / B and scores

    tau_i(z) = [(1/M^2) sum_m q_m,i] * [sum_m sum_b phi_m,b(z) (Phi_m,b^T Phi_m,b + r_m,b I)^-1 Phi_m,b^T]_i

(eq. 3; B = 1 is TRAK's eq. 2). Equivalently phi_m(z) K_m^-1 Phi_m^T with K_m block-diagonal
(eq. 5). Blocks are equal, or, for factored features, the layers (blocks of different widths).
The ridge is relative: r_m,b = ridge * mean(diag(Phi_m,b^T Phi_m,b)). The default, ridge "auto",
needs no LDS models: ridge = AUTO_RIDGE_SCALE * sqrt(w_b n) / B^(3/4) for a block of w_b dims,
n train examples and B blocks. The rule was fitted on half of the LDS models of an image and a
text setting, over 17 and 14 views at M = 1 (docs/results.md, "A ridge that needs no tuning"):
more ridge for wider blocks and larger train sets, less the more blocks are summed.
The soft threshold S(v, t) = sign(v) max(|v| - t, 0) is applied where scores are read (by default
at DEFAULT_THRESHOLD x each target's RMS score), never to stored scores.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from trakwomp.errors import UserError

AUTO = "auto"
AUTO_RIDGE_SCALE = 7.5e-4
# The soft threshold S where scores are used, in units of each target's RMS score: fixed at 0.25
# with no LDS models, it raised the example-level and group LDS in every setting measured
# (docs/results.md, "The soft threshold").
DEFAULT_THRESHOLD = 0.25


@dataclass(frozen=True)
class ViewSpec:
    """A view as asked for: `dims` (default: all featurized dims) in `blocks` blocks (default:
    the stored blocks), with `ridge` (relative, or "auto"); `selection.store_view` checks it
    against a store."""

    dims: int | None = None
    blocks: int | None = None
    ridge: float | str = AUTO


@dataclass(frozen=True)
class View:
    """The first `dims` stored feature dims in `blocks` blocks: equal blocks of dims / blocks, or,
    for factored features, the layers (`layer_widths`, one block each)."""

    dims: int
    blocks: int
    ridge: float | str = AUTO
    layer_widths: tuple[int, ...] = ()

    @property
    def widths(self) -> tuple[int, ...]:
        return self.layer_widths or (self.dims // self.blocks,) * self.blocks

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @property
    def key(self) -> str:
        grouping = f"layers{self.blocks}" if self.layer_widths else f"b{self.blocks}"
        return f"d{self.dims}-{grouping}-ridge{ridge_text(self.ridge)}"

    def block_ridge(self, block: int, num_train: int) -> float:
        """Block `block`'s relative ridge: the view's, or by the "auto" rule (module docstring)."""
        if self.ridge == AUTO:
            return AUTO_RIDGE_SCALE * math.sqrt(self.widths[block] * num_train) / self.blocks ** 0.75
        return self.ridge

    def columns(self, block: int) -> slice:
        start = sum(self.widths[:block])
        return slice(start, start + self.widths[block])

    @classmethod
    def resolve(cls, stored_dims: int, stored_block_dim: int, dims: int | None, blocks: int | None,
                ridge: float, num_train: int) -> "View":
        """Check a requested view against what was featurized; defaults: all dims, finest blocks."""
        dims = stored_dims if dims is None else dims
        if not 0 < dims <= stored_dims:
            raise UserError(f"--dims {dims} is not available: the store holds {stored_dims} featurized dims")
        if dims % stored_block_dim:
            raise UserError(f"--dims {dims} must be a multiple of the stored block dim {stored_block_dim}")
        blocks = dims // stored_block_dim if blocks is None else blocks
        if blocks < 1 or dims % blocks or (dims // blocks) % stored_block_dim:
            raise UserError(f"--blocks {blocks} must divide --dims {dims} into whole stored blocks of "
                            f"{stored_block_dim} dims (so B must divide {dims // stored_block_dim})")
        return cls(dims, blocks, check_ridge(ridge)).checked_against(num_train)

    @classmethod
    def resolve_layers(cls, layer_widths: list[int], dims: int | None, blocks: int | None, ridge: float,
                       num_train: int) -> "View":
        """A view of factored features: the first layers up to `dims` (default: all), one block per
        layer, or `blocks` equal blocks of those dims."""
        edges = np.cumsum(layer_widths).tolist()
        dims = edges[-1] if dims is None else dims
        if dims not in edges:
            shown = ", ".join(map(str, edges[:8])) + (", ..." if len(edges) > 8 else "")
            raise UserError(f"--dims {dims} must end on a layer of the factored features: one of {shown}")
        if blocks is None:
            return cls(dims, edges.index(dims) + 1, check_ridge(ridge),
                       tuple(layer_widths[:edges.index(dims) + 1])).checked_against(num_train)
        if blocks < 1 or dims % blocks:
            raise UserError(f"--blocks {blocks} must divide --dims {dims} into equal blocks (or leave --blocks out "
                            "for one block per layer)")
        return cls(dims, blocks, check_ridge(ridge)).checked_against(num_train)

    def checked_against(self, num_train: int) -> "View":
        if self.max_width > num_train and self.ridge == 0:
            raise UserError(f"blocks of {self.max_width} dims exceed the {num_train} train examples, so each "
                            "block's Gram matrix is singular; pass --ridge auto (the default), a ridge > 0 or more "
                            "blocks")
        return self


def blocks_of_key(key: str) -> int:
    """How many blocks the view with key `key` has."""
    match = re.fullmatch(r"d\d+-(?:b|layers)(\d+)-ridge.+", key)
    if not match:
        raise UserError(f"{key!r} is not a view key (d<dims>-b<blocks>-ridge<ridge> or d<dims>-layers<L>-ridge<ridge>)")
    return int(match.group(1))


def check_ridge(ridge: float | str) -> float | str:
    """A ridge as given: "auto", or a number >= 0 (relative to each block's mean diagonal)."""
    if ridge == AUTO:
        return AUTO
    try:
        value = float(ridge)
    except ValueError:
        raise UserError(f"--ridge must be auto or a number >= 0, got {ridge!r}") from None
    if not value >= 0 or math.isinf(value):
        raise UserError(f"--ridge must be auto or a number >= 0, got {ridge}")
    return value


def ridge_text(ridge: float | str) -> str:
    return ridge if ridge == AUTO else f"{ridge:g}"


def regularized_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + ridge * mean(diag G) * I)^-1 by a Cholesky factorization G = L L^T, in float64.

    Refused as singular when a pivot L_ii^2 falls to w * eps * max(diag G) (w the width, eps
    float64's machine epsilon), the usual numerical-rank tolerance: below it the inverse is
    rounding noise, and whether the factorization fails outright depends on the CPU."""
    gram = gram.double()
    if ridge:
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    tolerance = len(gram) * torch.finfo(gram.dtype).eps * gram.diagonal().max()
    if info.item() != 0 or not bool((factor.diagonal() ** 2 > tolerance).all()):
        raise UserError("a Gram matrix is not positive definite (its features are linearly dependent); "
                        "pass --ridge > 0, e.g. 1e-3")
    return torch.cholesky_inverse(factor)


def soft_threshold(values: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """S(v, t) = sign(v) * max(|v| - t, 0)."""
    return values.sign() * (values.abs() - threshold).clamp_min(0)


def relative_soft_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft-threshold each target's row at `threshold` times that row's root mean square score,
    so that one threshold transfers across M, d and views (their raw scales differ)."""
    if threshold < 0:
        raise UserError(f"--threshold must be >= 0, got {threshold}")
    if threshold == 0:
        return scores
    scale = scores.double().pow(2).mean(dim=1, keepdim=True).sqrt().to(scores.dtype)
    return soft_threshold(scores, threshold * scale)
