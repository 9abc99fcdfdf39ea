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
from trakwomp.estimator.inverse import block_gram, regularized_inverse
from trakwomp.estimator.view import View, ViewSpec
from trakwomp.runtime import Progress
from trakwomp.settings import option
from trakwomp.stages.selection import featurized_models, store_view
from trakwomp.stages.skeleton import Plan, RunSettings, Stage, Work
from trakwomp.store import Store, paths

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


@dataclass(frozen=True, kw_only=True)
class FinalizeSettings(RunSettings):
    """What `finalize` inverts: a view of the features, for some of the models."""

    view: ViewSpec = option(ViewSpec(), "The view: its dims, blocks and ridge.")
    models: list[int] | None = option(None, "Model ids to use, e.g. 0,2,5-7 (default: all featurized).")


@dataclass(frozen=True)
class FinalizePlan(Plan):
    view: View
    model_ids: list[int]


class Finalize(Stage[FinalizePlan, tuple[int, int], FinalizeReport]):
    """Units (model, block): Phi_b^T Phi_b accumulated over row chunks, then its regularized inverse."""

    stage = "finalize"
    settings: FinalizeSettings

    def check(self, store: str | Path) -> FinalizePlan:
        handle = Store.open(store)
        return FinalizePlan(store_view(handle, self.settings.view), featurized_models(handle, self.settings.models),
                            existing=handle)

    def bind(self, handle: Store, plan: FinalizePlan) -> FinalizePlan:
        handle.ask(paths.asked_finalize(plan.view.key), plan.model_ids)
        return plan

    def work(self, plan: FinalizePlan) -> Work[tuple[int, int]]:
        key = plan.view.key
        return Work([(m, b) for m in plan.model_ids for b in range(plan.view.blocks)],
                    lambda u: paths.unit(key, *u), f"finalize {key} (model, block) units",
                    [paths.view_folder(key), paths.done("finalize", key)])

    def start(self, handle: Store, plan: FinalizePlan, owned: list, todo: list) -> FinalizeReport:
        return FinalizeReport(plan.view, plan.model_ids, units_skipped=len(owned) - len(todo))

    def do(self, handle: Store, plan: FinalizePlan, todo: list, report: FinalizeReport, progress: Progress):
        start = time.perf_counter()
        view, width = plan.view, plan.view.max_width
        chunk_rows = handle.manifest.featurize_record().chunk_rows
        layers = handle.manifest.featurize_record().layers if view.layer_widths else None
        for model_id, block in todo:
            name = f"model {model_id} block {block}" + (f" (layer {layers[block].name})" if layers else "")
            progress.unit_started(name, 1)
            inverse = block_inverse(handle, view, model_id, block, chunk_rows, self.device, name, bool(layers))
            out = handle.require_array(paths.inverse(view.key, model_id), (view.blocks, width, width), "float64",
                                       inverse_chunks(width))
            padded = torch.zeros(width, width, dtype=torch.float64)
            padded[:len(inverse), :len(inverse)] = inverse.cpu()
            out[block] = padded.numpy()
            yield (model_id, block), {"weights_sha256": handle.manifest.models[model_id].sha256}
            report.units_done += 1
            progress.advance(1)
            progress.unit_finished(name, f"{len(inverse)} x {len(inverse)} inverse")
        report.seconds = time.perf_counter() - start


def block_inverse(handle: Store, view: View, model_id: int, block: int, chunk_rows: int, device: torch.device,
                  name: str, per_layer: bool) -> torch.Tensor:
    """(Phi_b^T Phi_b + r I)^-1 of one model's block; a singular one refused in one line naming it."""
    phi = handle.array(f"{paths.features(model_id)}/phi")
    try:
        return regularized_inverse(block_gram(phi, view.columns(block), chunk_rows, device),
                                   view.block_ridge(block, phi.shape[0]))
    except UserError as e:
        hint = (" (a classifier's output layer kept exactly on its class side always is: the margin's gradient "
                "sums to zero over the classes)") if per_layer else ""
        raise UserError(f"{name} of view {view.key}: {e}{hint}") from None


def finalize(store: str | Path, view: ViewSpec = ViewSpec(), models: list[int] | None = None, *,
             progress: Progress | None = None, **settings) -> FinalizeReport:
    """Invert every block Gram matrix of the view (dims, blocks, ridge) for the chosen models
    (default: all featurized); `settings`: `FinalizeSettings`' other fields (device, shard)."""
    return Finalize(FinalizeSettings(view=view, models=models, **settings)).run(store, progress)
