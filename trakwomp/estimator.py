"""The TRAK / TRAK-WOMP estimator on projected features, as plain functions on tensors.

For models m = 1..M with train features Phi_m (n x D), target features phi_m(z) (1 x D) and
q_m,i = 1 - p_m,i, a view (D, B) splits the D dims into B blocks of w = D / B and scores

    tau_i(z) = [(1/M^2) sum_m q_m,i] * [sum_m sum_b phi_m,b(z) (Phi_m,b^T Phi_m,b + r_m,b I)^-1 Phi_m,b^T]_i

(eq. 3; B = 1 is TRAK's eq. 2). Equivalently phi_m(z) K_m^-1 Phi_m^T with K_m block-diagonal
(eq. 5). The ridge is relative: r_m,b = ridge * mean(diag(Phi_m,b^T Phi_m,b)).
The soft threshold S(v, t) = sign(v) max(|v| - t, 0) is applied on export, never to stored scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from trakwomp.errors import UserError


@dataclass(frozen=True)
class ViewSpec:
    """A view as asked for: `dims` (default: all featurized dims) in `blocks` blocks (default:
    the stored blocks), with `ridge`; `selection.store_view` checks it against a store."""

    dims: int | None = None
    blocks: int | None = None
    ridge: float = 0.0


@dataclass(frozen=True)
class View:
    """The first `dims` stored feature dims, split into `blocks` blocks of `dims // blocks`."""

    dims: int
    blocks: int
    ridge: float = 0.0

    @property
    def block_width(self) -> int:
        return self.dims // self.blocks

    @property
    def key(self) -> str:
        return f"d{self.dims}-b{self.blocks}-ridge{self.ridge:g}"

    @classmethod
    def from_key(cls, key: str) -> "View":
        """The view whose `key` is `key`: View.from_key(view.key) == view."""
        match = re.fullmatch(r"d(\d+)-b(\d+)-ridge(.+)", key)
        if not match:
            raise UserError(f"{key!r} is not a view key (d<dims>-b<blocks>-ridge<ridge>)")
        return cls(int(match.group(1)), int(match.group(2)), float(match.group(3)))

    def columns(self, block: int) -> slice:
        return slice(block * self.block_width, (block + 1) * self.block_width)

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
        if ridge < 0:
            raise UserError(f"--ridge must be >= 0, got {ridge}")
        view = cls(dims, blocks, float(ridge))
        if view.block_width > num_train and ridge == 0:
            raise UserError(f"blocks of {view.block_width} dims exceed the {num_train} train examples, so each "
                            "block's Gram matrix is singular; pass --ridge > 0 (e.g. 1e-3) or more blocks")
        return view


def regularized_inverse(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + ridge * mean(diag G) * I)^-1 by a Cholesky factorization, in float64."""
    gram = gram.double()
    if ridge:
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
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
