"""The soft threshold S(v, t) = sign(v) max(|v| - t, 0), applied where scores are read (by
default at DEFAULT_THRESHOLD x each target's RMS score), never to stored scores."""

from __future__ import annotations

import math

import torch

from trakwomp.errors import UserError

# The soft threshold S where scores are used, in units of each target's RMS score: fixed at 0.25
# with no LDS models, it raised the example-level and group LDS in every setting measured
# (docs/results.md, "The soft threshold").
DEFAULT_THRESHOLD = 0.25


def soft_threshold(values: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """S(v, t) = sign(v) * max(|v| - t, 0)."""
    return values.sign() * (values.abs() - threshold).clamp_min(0)


def check_threshold(threshold: float) -> float:
    """`threshold` if it is a finite number >= 0 (NaN or infinity would turn every score into NaN or 0)."""
    if not (math.isfinite(threshold) and threshold >= 0):
        raise UserError(f"`threshold` must be a finite number >= 0, got {threshold}")
    return threshold


def relative_soft_threshold(scores: torch.Tensor, threshold: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-threshold each target's row at `threshold` times that row's root mean square score,
    so that one threshold transfers across M, d and views (their raw scales differ); `scale`:
    the rows' RMS scores (rows x 1) where `scores` holds only some of each row's scores."""
    if check_threshold(threshold) == 0:
        return scores
    if scale is None:
        scale = scores.double().pow(2).mean(dim=1, keepdim=True).sqrt()
    return soft_threshold(scores, threshold * scale.to(scores.dtype))
