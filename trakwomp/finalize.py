"""`finalize`: per model and view block, the inverse of the block's regularized Gram matrix
(Phi_m,b^T Phi_m,b + r I)^-1, streamed over row chunks of the stored features.

A unit of work is (view, model, block): it reads only that block's column chunks, holds one
chunk and one Gram matrix in memory, and writes inverse[b] of the (B, w, w) float64 array
`finalize/<view>/<model>/inverse` (one chunk per block, split by rows beyond 512 MiB; w is the
widest block, and a narrower block w_b fills inverse[b, :w_b, :w_b], zeros around it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trakwomp.errors import UserError
from trakwomp.estimator import View, ViewSpec, regularized_inverse
from trakwomp.selection import featurized_models, store_view
from trakwomp.runtime import NoProgress, Progress, Shard, plan_work, resolve_device
from trakwomp.store import Store, layout


def block_gram(phi, columns: slice, chunk_rows: int, device: torch.device) -> torch.Tensor:
    """Phi_b^T Phi_b in float64, accumulated over row chunks of the stored array `phi`."""
    width = columns.stop - columns.start
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for start in range(0, phi.shape[0], chunk_rows):
        rows = torch.from_numpy(phi[start:start + chunk_rows, columns]).to(device, torch.float64)
        gram.addmm_(rows.T, rows)
    return gram


INVERSE_CHUNK_BYTES = 512 << 20  # under the 2 GiB that a compressor takes in one buffer


def inverse_chunks(width: int) -> tuple[int, int, int]:
    """Chunks of the (B, w, w) float64 inverse: one block per chunk, split by rows if it is too big."""
    return 1, max(1, min(width, INVERSE_CHUNK_BYTES // (8 * width))), width


@dataclass
class FinalizeReport:
    view: View
    model_ids: list[int] = field(default_factory=list)
    units_done: int = 0
    units_skipped: int = 0
    seconds: float = 0.0


def finalize(
    store: str | Path,
    view: ViewSpec = ViewSpec(),
    models: list[int] | None = None,
    *,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> FinalizeReport:
    """Invert every block Gram matrix of the view (dims, blocks, ridge) for the chosen models."""
    progress = progress or NoProgress()
    torch_device = resolve_device(device)
    handle = Store.open(store)
    view = store_view(handle, view)
    model_ids = featurized_models(handle, models)
    chunk_rows = handle.manifest["featurize"]["chunk_rows"]
    handle.ask(f"finalize/{view.key}", model_ids)
    units, todo = plan_work(handle, "finalize", [(m, b) for m in model_ids for b in range(view.blocks)],
                            lambda u: layout.unit(view.key, *u), shard, progress,
                            f"finalize {view.key} (model, block) units", [f"finalize/{view.key}", f"done/finalize/{view.key}"])
    report = FinalizeReport(view, model_ids, units_skipped=len(units) - len(todo))
    start = time.perf_counter()
    w = view.max_width
    layers = handle.manifest["featurize"].get("layers") if view.layer_widths else None
    for model_id, block in todo:
        name = f"model {model_id} block {block}" + (f" (layer {layers[block]['name']})" if layers else "")
        progress.unit_started(name, 1)
        phi = handle.array(f"{layout.features(model_id)}/phi")
        try:
            inverse = regularized_inverse(block_gram(phi, view.columns(block), chunk_rows, torch_device),
                                          view.block_ridge(block, phi.shape[0]))
        except UserError as e:
            hint = (" (a classifier's output layer kept exactly on its class side always is: the margin's gradient "
                    "sums to zero over the classes)") if layers else ""
            raise UserError(f"{name} of view {view.key}: {e}{hint}") from None
        out = handle.require_array(layout.inverse(view.key, model_id), (view.blocks, w, w), "float64",
                                   inverse_chunks(w))
        padded = torch.zeros(w, w, dtype=torch.float64)
        padded[:len(inverse), :len(inverse)] = inverse.cpu()
        out[block] = padded.numpy()
        handle.mark_done("finalize", layout.unit(view.key, model_id, block))
        report.units_done += 1
        progress.advance(1)
        progress.unit_finished(name, f"{len(inverse)} x {len(inverse)} inverse")
    report.seconds = time.perf_counter() - start
    return report
