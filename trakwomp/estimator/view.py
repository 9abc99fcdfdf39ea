"""Views of the projected dims and the ridge rule.

A view (D, B) takes the first D stored dims in B blocks: equal blocks of w = D / B, or, for
factored features, the layers (blocks of different widths). The ridge of block b is relative:
r_m,b = ridge * mean(diag(Phi_m,b^T Phi_m,b)). The default, ridge "auto", needs no LDS models:
ridge = AUTO_RIDGE_SCALE * sqrt(w_b n) / B^(3/4) for a block of w_b dims, n train examples and B
blocks. The rule was fitted on half of the LDS models of an image and a text setting, over 17 and
14 views at M = 1 (docs/results.md, "A ridge that needs no tuning"): more ridge for wider blocks
and larger train sets, less the more blocks are summed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from trakwomp.errors import UserError
from trakwomp.settings import option

AUTO = "auto"


AUTO_RIDGE_SCALE = 7.5e-4


@dataclass(frozen=True)
class ViewSpec:
    """A view as asked for: `dims` (default: all featurized dims) in `blocks` blocks (default:
    the stored blocks), with `ridge` (relative, or "auto"); `selection.store_view` checks it
    against a store."""

    dims: int | None = option(None, "Use the first D featurized dims (default: all).")
    blocks: int | None = option(None, "Split the D dims into B equal blocks (default: the stored blocks, one per layer "
                                      "for factored features; 1 is plain TRAK).")
    ridge: float | str = option(AUTO, "Ridge added to each block Gram matrix, relative to the mean of its diagonal, or "
                                      "auto: 7.5e-4 sqrt(w n) / B^(3/4) for B blocks of w dims and n train examples "
                                      "(needs no LDS models; docs/method.md); 0 for none.")


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
        if self.ridge != AUTO:
            return float(self.ridge)
        return AUTO_RIDGE_SCALE * math.sqrt(self.widths[block] * num_train) / self.blocks ** 0.75

    def columns(self, block: int) -> slice:
        start = sum(self.widths[:block])
        return slice(start, start + self.widths[block])

    @classmethod
    def resolve(cls, stored_dims: int, stored_block_dim: int, dims: int | None, blocks: int | None,
                ridge: float | str, num_train: int) -> "View":
        """Check a requested view against what was featurized; defaults: all dims, finest blocks."""
        dims = stored_dims if dims is None else dims
        if not 0 < dims <= stored_dims:
            raise UserError(f"`dims` {dims} is not available: the store holds {stored_dims} featurized dims")
        if dims % stored_block_dim:
            raise UserError(f"`dims` {dims} must be a multiple of the stored block dim {stored_block_dim}")
        blocks = dims // stored_block_dim if blocks is None else blocks
        if blocks < 1 or dims % blocks or (dims // blocks) % stored_block_dim:
            raise UserError(f"`blocks` {blocks} must divide `dims` {dims} into whole stored blocks of "
                            f"{stored_block_dim} dims (so B must divide {dims // stored_block_dim})")
        return cls(dims, blocks, check_ridge(ridge)).checked_against(num_train)

    @classmethod
    def resolve_layers(cls, layer_widths: list[int], dims: int | None, blocks: int | None, ridge: float | str,
                       num_train: int) -> "View":
        """A view of factored features: the first layers up to `dims` (default: all), one block per
        layer, or `blocks` equal blocks of those dims."""
        edges: list[int] = np.cumsum(layer_widths).tolist()
        dims = edges[-1] if dims is None else dims
        if dims not in edges:
            shown = ", ".join(map(str, edges[:8])) + (", ..." if len(edges) > 8 else "")
            raise UserError(f"`dims` {dims} must end on a layer of the factored features: one of {shown}")
        if blocks is None:
            return cls(dims, edges.index(dims) + 1, check_ridge(ridge),
                       tuple(layer_widths[:edges.index(dims) + 1])).checked_against(num_train)
        if blocks < 1 or dims % blocks:
            raise UserError(f"`blocks` {blocks} must divide `dims` {dims} into equal blocks (or leave `blocks` out "
                            "for one block per layer)")
        return cls(dims, blocks, check_ridge(ridge)).checked_against(num_train)

    def checked_against(self, num_train: int) -> "View":
        if self.max_width > num_train and self.ridge == 0:
            raise UserError(f"blocks of {self.max_width} dims exceed the {num_train} train examples, so each "
                            "block's Gram matrix is singular; pass `ridge` auto (the default), a ridge > 0 or more "
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
        raise UserError(f"`ridge` must be auto or a number >= 0, got {ridge!r}") from None
    if not value >= 0 or math.isinf(value):
        raise UserError(f"`ridge` must be auto or a number >= 0, got {ridge}")
    return value


def ridge_text(ridge: float | str) -> str:
    return AUTO if ridge == AUTO else f"{float(ridge):g}"
