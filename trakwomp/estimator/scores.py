"""Eq. 3 and eq. 5 on the stored features: for models m = 1..M with train features Phi_m
(n x D), target features phi_m(z) (1 x D) and weights q_m,i, a view (D, B) scores

    tau_i(z) = [(1/M^2) sum_m q_m,i] * [sum_m sum_b phi_m,b(z) (Phi_m,b^T Phi_m,b + r_m,b I)^-1 Phi_m,b^T]_i

(eq. 3; B = 1 is TRAK's eq. 2), computed as phi_m(z) K_m^-1 Phi_m^T with K_m^-1 the
block-diagonal inverse that `finalize` stores (eq. 5), streaming the train features by row chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from trakwomp.estimator.view import View
from trakwomp.store import Store, paths

SCORE_PASS_BYTES = 256 << 20

SCORE_MEANING = ("Scores: tau_i(z) is the predicted drop of the target's f if train example i were removed (positive: "
                 "it supports z; a sum over examples, their joint removal), in f's units up to one scale per target set, "
                 "calibrated by the store's LDS models where shown (docs/method.md, \"What a score means\").")


def mean_q(handle: Store, model_ids: list[int]) -> torch.Tensor:
    """The train examples' weights (1/M^2) sum_m q_m,i, float32."""
    q_sum = functools.reduce(torch.add, [torch.from_numpy(handle.array(f"{paths.features(m)}/q")[...]).double()
                                         for m in model_ids])
    return (q_sum / len(model_ids) ** 2).float()


def weighted_targets(handle: Store, view: View, model_id: int, target_prefix: str, chunks: list[range],
                     device: torch.device) -> list[torch.Tensor]:
    """phi_m(z)[:D] K_m^-1 for the targets of each range in `chunks`, float32 (rows x D), computed
    in float64 block by block, reading each block's inverse once, in its stored row chunks."""
    target_phi = handle.array(f"{paths.features(model_id, target_prefix)}/phi")
    inverse = handle.array(paths.inverse(view.key, model_id))
    step = inverse.chunks[1]
    weighted = [torch.empty(len(rows), view.dims, dtype=torch.float32, device=device) for rows in chunks]
    for b in range(view.blocks):
        columns = view.columns(b)
        phi_b = [torch.from_numpy(target_phi[rows.start:rows.stop, columns]).to(device, torch.float64)
                 for rows in chunks]
        width = view.widths[b]
        products = [torch.zeros(len(rows), width, dtype=torch.float64, device=device) for rows in chunks]
        for r in range(0, width, step):
            piece = torch.from_numpy(inverse[b, r:min(r + step, width), :width]).to(device)
            for phi, product in zip(phi_b, products, strict=True):
                product.addmm_(phi[:, r:r + step], piece)
        for out, product in zip(weighted, products, strict=True):
            out[:, columns] = product.float()
    return weighted


def score_chunks(handle: Store, view: View, model_ids: list[int], q_bar: torch.Tensor, target_prefix: str,
                 chunks: list[range], chunk_rows: int, device: torch.device) -> list[torch.Tensor]:
    """tau for the targets of each range in `chunks` against every train example, as float32 CPU
    tensors, in one pass over the train features; `q_bar` is `mean_q` of the models. Each chunk
    gets its own products, so its scores do not depend on which chunks share its pass."""
    n = len(q_bar)
    scores = [torch.zeros(len(rows), n, dtype=torch.float32, device=device) for rows in chunks]
    for model_id in model_ids:
        weighted = weighted_targets(handle, view, model_id, target_prefix, chunks, device)
        train_phi = handle.array(f"{paths.features(model_id)}/phi")
        for start in range(0, n, chunk_rows):
            block = torch.from_numpy(train_phi[start:start + chunk_rows, :view.dims]).to(device, torch.float32)
            for out, w in zip(scores, weighted, strict=True):
                out[:, start:start + len(block)].addmm_(w, block.T)
    return [out.mul_(q_bar.to(device)).cpu() for out in scores]


def score_passes(chunks: list[int], bytes_per_chunk: int) -> list[list[int]]:
    """`chunks` (sorted target chunk numbers) in runs of consecutive chunks scored in one pass over
    the train features: as many as keep what the pass holds per chunk (`bytes_per_chunk`: its
    scores, or with top-k only its weighted targets) within SCORE_PASS_BYTES."""
    per_pass = max(1, SCORE_PASS_BYTES // bytes_per_chunk)
    passes: list[list[int]] = []
    for chunk in chunks:
        if passes and chunk == passes[-1][-1] + 1 and len(passes[-1]) < per_pass:
            passes[-1].append(chunk)
        else:
            passes.append([chunk])
    return passes


@dataclass
class RunningTopK:
    """Each target's k largest and k smallest raw scores among the train examples seen so far, with
    their train indices (ties: the lower index first, as a stable sort of the whole row orders
    them), and the sum of its squared scores (float64), whose mean gives the RMS score that the
    soft threshold is measured in."""

    largest: torch.Tensor
    largest_index: torch.Tensor
    smallest: torch.Tensor
    smallest_index: torch.Tensor
    sum_squares: torch.Tensor

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> RunningTopK:
        values, index = torch.empty(rows, 0, device=device), torch.empty(rows, 0, dtype=torch.int64, device=device)
        return cls(values, index, values, index, torch.zeros(rows, dtype=torch.float64, device=device))

    def add(self, tau: torch.Tensor, start: int, k: int) -> None:
        """Fold in `tau` (rows x w), the scores of train examples start .. start + w - 1, keeping k."""
        self.sum_squares += tau.double().pow(2).sum(dim=1)
        index = torch.arange(start, start + tau.shape[1], device=tau.device).expand_as(tau)
        self.largest, self.largest_index = kept(self.largest, self.largest_index, tau, index, k, descending=True)
        self.smallest, self.smallest_index = kept(self.smallest, self.smallest_index, tau, index, k, descending=False)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, train indices), rows x 2k: the k largest (largest first) then the k smallest."""
        return torch.cat([self.largest, self.smallest], 1), torch.cat([self.largest_index, self.smallest_index], 1)


def kept(values: torch.Tensor, index: torch.Tensor, new: torch.Tensor, new_index: torch.Tensor, k: int,
         descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k first of `values` (kept so far, lower indices) then `new`, by a stable sort."""
    merged, order = torch.cat([values, new], 1).sort(dim=1, descending=descending, stable=True)
    return merged[:, :k].contiguous(), torch.cat([index, new_index], 1).gather(1, order[:, :k])


def top_k_chunks(handle: Store, view: View, model_ids: list[int], q_bar: torch.Tensor, target_prefix: str,
                 chunks: list[range], chunk_rows: int, k: int, device: torch.device) -> list[RunningTopK]:
    """Each range's running top k (`RunningTopK`) over every train example, in one pass over the
    train features that never holds the (targets x train) matrix: per train row chunk, tau of the
    chunk, summed over the models in order (as `score_chunks` adds them) and times `q_bar`, is
    folded into the top k; memory is the weighted targets of every model plus a row chunk's scores."""
    n = len(q_bar)
    weighted = [weighted_targets(handle, view, m, target_prefix, chunks, device) for m in model_ids]
    features = [handle.array(f"{paths.features(m)}/phi") for m in model_ids]
    tops = [RunningTopK.empty(len(rows), device) for rows in chunks]
    for start in range(0, n, chunk_rows):
        width = min(chunk_rows, n - start)
        taus = [torch.zeros(len(rows), width, device=device) for rows in chunks]
        for targets_weighted, phi in zip(weighted, features, strict=True):
            block = torch.from_numpy(phi[start:start + width, :view.dims]).to(device, torch.float32)
            for tau, w in zip(taus, targets_weighted, strict=True):
                tau.addmm_(w, block.T)
        q = q_bar[start:start + width].to(device)
        for top, tau in zip(tops, taus, strict=True):
            top.add(tau.mul_(q), start, k)
    return tops
