"""Block Gram matrices Phi_b^T Phi_b (streamed over row chunks, in float64) and their
regularized inverses (G + r I)^-1, the K_m^-1 of eq. 5, block by block."""

from __future__ import annotations

import torch

from trakwomp.errors import UserError


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
                        "pass `ridge` > 0, e.g. 1e-3")
    return torch.cholesky_inverse(factor)


def block_gram(phi, columns: slice, chunk_rows: int, device: torch.device) -> torch.Tensor:
    """Phi_b^T Phi_b in float64, accumulated over row chunks of the stored array `phi`."""
    width = columns.stop - columns.start
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for start in range(0, phi.shape[0], chunk_rows):
        rows = torch.from_numpy(phi[start:start + chunk_rows, columns]).to(device, torch.float64)
        gram.addmm_(rows.T, rows)
    return gram
