"""`score`: attribution scores tau(z) of every train example for targets z.

Scores are computed per chunk of targets (the unit of work): first the targets' projected
gradients for every model (same projector and checkpoints as the train features), then

    tau(z) = [(1/M^2) sum_m q_m] * sum_m phi_m(z)[:D] K_m^-1 Phi_m[:, :D]^T

with K_m^-1 the block-diagonal inverse from `finalize`, streaming the train features by row
chunk; consecutive target chunks share one pass over the train features while their scores fit
in SCORE_PASS_BYTES, so memory is that score block plus one feature chunk.
Raw scores are stored as float32 `scores/<key>/tau` of shape (n_targets, n_train).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trakwomp.bindings import bind_model, bind_tokenizer, stored_task
from trakwomp.data import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator import View, ViewSpec, ridge_text
from trakwomp.features import FeatureSettings, batch_size_that_fits, write_features
from trakwomp.models import ModelSpec, check_model_fits_data
from trakwomp.registry import load_registered_model
from trakwomp.runtime import NoProgress, Progress, Shard, StepsOnly, plan_work, resolve_device
from trakwomp.selection import featurized_models, store_view
from trakwomp.store import Store, layout
from trakwomp.stored_scores import scores_key, view_record
from trakwomp.tasks import Classification

SCORE_PASS_BYTES = 256 << 20


@dataclass
class ScoreReport:
    key: str
    view: View
    model_ids: list[int]
    num_targets: int
    num_train: int
    chunks_done: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    batch_size: int = 0  # the batch size used for the targets' features (lowered to fit in memory)


def check_finalized(handle: Store, view: View, model_ids: list[int]) -> None:
    for model_id in model_ids:
        done = len(handle.done_units("finalize", layout.unit(view.key, model_id)))
        if done < view.blocks:
            raise UserError(f"view {view.key} of model {model_id} is finalized in {done} of {view.blocks} blocks; "
                            f"run `trakwomp finalize {handle.location} --dims {view.dims} --blocks {view.blocks}"
                            f" --ridge {ridge_text(view.ridge)}` first")


def mean_q(handle: Store, model_ids: list[int]) -> torch.Tensor:
    """The train examples' weights (1/M^2) sum_m q_m,i, float32."""
    q_sum = sum(torch.from_numpy(handle.array(f"{layout.features(m)}/q")[...]).double() for m in model_ids)
    return (q_sum / len(model_ids) ** 2).float()


def weighted_targets(handle: Store, view: View, model_id: int, target_prefix: str, chunks: list[range],
                     device: torch.device) -> list[torch.Tensor]:
    """phi_m(z)[:D] K_m^-1 for the targets of each range in `chunks`, float32 (rows x D), computed
    in float64 block by block, reading each block's inverse once, in its stored row chunks."""
    target_phi = handle.array(f"{layout.features(model_id, target_prefix)}/phi")
    inverse = handle.array(layout.inverse(view.key, model_id))
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
            for phi, product in zip(phi_b, products):
                product.addmm_(phi[:, r:r + step], piece)
        for out, product in zip(weighted, products):
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
        train_phi = handle.array(f"{layout.features(model_id)}/phi")
        for start in range(0, n, chunk_rows):
            block = torch.from_numpy(train_phi[start:start + chunk_rows, :view.dims]).to(device, torch.float32)
            for out, w in zip(scores, weighted):
                out[:, start:start + len(block)].addmm_(w, block.T)
    return [out.mul_(q_bar.to(device)).cpu() for out in scores]


def score_passes(chunks: list[int], chunk_rows: int, num_train: int) -> list[list[int]]:
    """`chunks` (sorted target chunk numbers) in runs of consecutive chunks scored in one pass over
    the train features: as many as keep the pass's scores within SCORE_PASS_BYTES."""
    per_pass = max(1, SCORE_PASS_BYTES // (4 * num_train * chunk_rows))
    passes: list[list[int]] = []
    for chunk in chunks:
        if passes and chunk == passes[-1][-1] + 1 and len(passes[-1]) < per_pass:
            passes[-1].append(chunk)
        else:
            passes.append([chunk])
    return passes


def score(
    store: str | Path,
    targets: Dataset,
    view: ViewSpec = ViewSpec(),
    models: list[int] | None = None,
    *,
    model: ModelSpec | None = None,
    target_chunk_rows: int = 256,
    batch_size: int = 64,
    memory_limit: int | None = None,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> ScoreReport:
    """Score every train example for every target at the view (dims, blocks, ridge); resumable by target chunk.

    `model`: the store's model spec, needed if the store was made with a user factory.
    `batch_size` is lowered to fit in `memory_limit` bytes (see `featurize`)."""
    progress = progress or NoProgress()
    if target_chunk_rows < 1 or batch_size < 1:
        raise UserError("--chunk-rows and --batch-size must be at least 1")
    torch_device = resolve_device(device)
    handle = Store.open(store)
    view = store_view(handle, view)
    model_ids = featurized_models(handle, models)
    check_finalized(handle, view, model_ids)
    manifest = handle.manifest
    if targets.transform_spec != manifest["model"].get("transform"):
        raise UserError(f"targets must be seen through the store's --transform "
                        f"({manifest['model'].get('transform')}), not {targets.transform_spec}")
    task = stored_task(handle)
    bind_tokenizer(handle, targets)
    fingerprint = targets.fingerprint()
    spec = model or ModelSpec.of_store(manifest["model"], handle.location)
    bind_model(handle, spec, targets.transform_spec)
    if fingerprint.classes != tuple(manifest["dataset"]["classes"]) and isinstance(task, Classification):
        raise UserError("the targets' classes differ from the train set's; targets must share its labels")
    output_size = task.output_size(targets)
    net = spec.build(output_size)
    check_model_fits_data(net, targets, torch_device, spec, task, output_size)
    settings = FeatureSettings.of_store(handle, net)
    key = scores_key(view, model_ids, fingerprint.sha256)
    n, n_targets = manifest["dataset"]["num_examples"], len(targets)
    target_prefix = layout.targets_prefix(fingerprint.sha256[:16])
    chunks, todo = plan_work(handle, "score", range(math.ceil(n_targets / target_chunk_rows)),
                             lambda c: layout.unit(key, c), shard, progress, f"score {key} target chunks",
                             [f"scores/{key}", f"done/score/{key}", target_prefix,
                              f"done/featurize_targets/{fingerprint.sha256[:16]}"])
    for model_id in model_ids if todo else []:  # their weights against their recorded hashes, before any write
        load_registered_model(handle, model_id, spec, output_size)
    if todo:
        batch_size = batch_size_that_fits(net, targets, task, settings, batch_size, target_chunk_rows, torch_device,
                                          memory_limit, "score")
    handle.set_entry("targets", fingerprint.sha256[:16], {"spec": targets.spec, **fingerprint.as_dict()})
    handle.set_entry("scores", key, {"view": view_record(view), "models": model_ids,
                                     "targets": fingerprint.sha256[:16]})
    report = ScoreReport(key, view, model_ids, n_targets, n, chunks_skipped=len(chunks) - len(todo),
                         batch_size=batch_size)
    train_chunk_rows = manifest["featurize"]["chunk_rows"]
    start = time.perf_counter()
    q_bar = mean_q(handle, model_ids)
    out = handle.require_array(f"scores/{key}/tau", (n_targets, n), "float32", (target_chunk_rows, min(n, 8192)))
    for group in score_passes(todo, target_chunk_rows, n):
        ranges = [range(c * target_chunk_rows, min(n_targets, (c + 1) * target_chunk_rows)) for c in group]
        name = f"targets {ranges[0].start}-{ranges[-1].stop - 1}"
        progress.unit_started(name, (ranges[-1].stop - ranges[0].start) * len(model_ids))
        features_todo = [(m, chunk) for m in model_ids for chunk in group
                         if handle.done_info(f"featurize_targets/{fingerprint.sha256[:16]}", layout.unit(m, chunk)) is None]
        write_features(handle, targets, spec, task, settings, features_todo, target_chunk_rows, batch_size, torch_device,
                       StepsOnly(progress), prefix=target_prefix, stage=f"featurize_targets/{fingerprint.sha256[:16]}")
        taus = score_chunks(handle, view, model_ids, q_bar, target_prefix, ranges, train_chunk_rows, torch_device)
        for chunk, rows, tau in zip(group, ranges, taus):
            out[rows.start:rows.stop] = tau.numpy()
            handle.mark_done("score", layout.unit(key, chunk), {"rows": [rows.start, rows.stop]})
            report.chunks_done += 1
        progress.unit_finished(name, f"{ranges[-1].stop - ranges[0].start} targets scored", len(group))
    report.seconds = time.perf_counter() - start
    return report


