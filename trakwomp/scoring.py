"""`score` and `predict`: attribution scores tau(z) for targets z, and datamodel predictions.

Scores are computed per chunk of targets (the unit of work): first the targets' projected
gradients for every model (same projector and checkpoints as the train features), then

    tau(z) = [(1/M^2) sum_m q_m] * sum_m phi_m(z)[:D] K_m^-1 Phi_m[:, :D]^T

with K_m^-1 the block-diagonal inverse from `finalize`, streaming the train features by row
chunk; consecutive target chunks share one pass over the train features while their scores fit
in SCORE_PASS_BYTES, so memory is that score block plus one feature chunk.
Raw scores are stored as float32 `scores/<key>/tau` of shape (n_targets, n_train).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trakwomp.data import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator import View, relative_soft_threshold
from trakwomp.featurize import FeatureSettings, load_registered_model, stored_dataset, write_features
from trakwomp.finalize import featurized_models, store_view
from trakwomp.models import ModelSpec
from trakwomp.runtime import NoProgress, Progress, Shard, StepsOnly, resolve_device
from trakwomp.store import Store
from trakwomp.training import bind_model, check_model_fits_data

SCORE_PASS_BYTES = 256 << 20


def compact_ids(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2+5' (a name for a set of model ids)."""
    parts, start = [], None
    for i, value in enumerate(ids):
        if start is None:
            start = value
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return "+".join(parts)


def scores_key(view: View, model_ids: list[int], targets_sha: str) -> str:
    return f"{view.key}_m{compact_ids(model_ids)}_t{targets_sha[:16]}"


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


def check_finalized(handle: Store, view: View, model_ids: list[int]) -> None:
    for model_id in model_ids:
        done = len(handle.done_units("finalize", f"{view.key}/{model_id:06d}"))
        if done < view.blocks:
            raise UserError(f"view {view.key} of model {model_id} is finalized in {done} of {view.blocks} blocks; "
                            f"run `trakwomp finalize {handle.location} --dims {view.dims} --blocks {view.blocks}"
                            f"{f' --ridge {view.ridge:g}' if view.ridge else ''}` first")


def mean_q(handle: Store, model_ids: list[int]) -> torch.Tensor:
    """The train examples' weights (1/M^2) sum_m q_m,i, float32."""
    q_sum = sum(torch.from_numpy(handle.array(f"features/{m:06d}/q")[...]).double() for m in model_ids)
    return (q_sum / len(model_ids) ** 2).float()


def weighted_targets(handle: Store, view: View, model_id: int, target_prefix: str, chunks: list[range],
                     device: torch.device) -> list[torch.Tensor]:
    """phi_m(z)[:D] K_m^-1 for the targets of each range in `chunks`, float32 (rows x D), computed
    in float64 block by block, reading each block's inverse once, in its stored row chunks."""
    target_phi = handle.array(f"{target_prefix}features/{model_id:06d}/phi")
    inverse = handle.array(f"finalize/{view.key}/{model_id:06d}/inverse")
    step = inverse.chunks[1]
    weighted = [torch.empty(len(rows), view.dims, dtype=torch.float32, device=device) for rows in chunks]
    for b in range(view.blocks):
        columns = view.columns(b)
        phi_b = [torch.from_numpy(target_phi[rows.start:rows.stop, columns]).to(device, torch.float64)
                 for rows in chunks]
        products = [torch.zeros(len(rows), view.block_width, dtype=torch.float64, device=device) for rows in chunks]
        for r in range(0, view.block_width, step):
            piece = torch.from_numpy(inverse[b, r:r + step]).to(device)
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
        train_phi = handle.array(f"features/{model_id:06d}/phi")
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
    dims: int | None = None,
    blocks: int | None = None,
    ridge: float = 0.0,
    models: list[int] | None = None,
    *,
    model: ModelSpec | None = None,
    target_chunk_rows: int = 256,
    batch_size: int = 64,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> ScoreReport:
    """Score every train example for every target at the view (dims, blocks, ridge); resumable by target chunk.

    `model`: the store's model spec, needed if the store was made with a user factory."""
    progress = progress or NoProgress()
    if target_chunk_rows < 1 or batch_size < 1:
        raise UserError("--chunk-rows and --batch-size must be at least 1")
    torch_device = resolve_device(device)
    handle = Store.open(store)
    view = store_view(handle, dims, blocks, ridge)
    model_ids = featurized_models(handle, models)
    check_finalized(handle, view, model_ids)
    manifest = handle.manifest
    if targets.transform_spec != manifest["model"].get("transform"):
        raise UserError(f"targets must be seen through the store's --transform "
                        f"({manifest['model'].get('transform')}), not {targets.transform_spec}")
    fingerprint = targets.fingerprint()
    spec = model or ModelSpec.of_store(manifest["model"], handle.location)
    bind_model(handle, spec, targets.transform_spec)
    if fingerprint.classes != tuple(manifest["dataset"]["classes"]):
        raise UserError("the targets' classes differ from the train set's; targets must share its labels")
    net = spec.build(len(fingerprint.classes))
    check_model_fits_data(net, targets, torch_device, spec)
    settings = FeatureSettings.of_store(handle, net)
    key = scores_key(view, model_ids, fingerprint.sha256)
    n, n_targets = manifest["dataset"]["num_examples"], len(targets)
    chunks = shard.select(range(math.ceil(n_targets / target_chunk_rows)))
    todo = [c for c in chunks if handle.done_info("score", f"{key}/{c:06d}") is None]
    for model_id in model_ids if todo else []:  # their weights against their recorded hashes, before any write
        load_registered_model(handle, model_id, spec, len(fingerprint.classes))
    target_prefix = f"targets/{fingerprint.sha256[:16]}/"
    handle.set_entry("targets", fingerprint.sha256[:16], {"spec": targets.spec, **fingerprint.as_dict()})
    handle.set_entry("scores", key, {"view": [view.dims, view.blocks, view.ridge], "models": model_ids,
                                     "targets": fingerprint.sha256[:16]})

    report = ScoreReport(key, view, model_ids, n_targets, n, chunks_skipped=len(chunks) - len(todo))
    progress.plan(len(chunks), report.chunks_skipped, f"score {key} target chunks")
    train_chunk_rows = manifest["featurize"]["chunk_rows"]
    start = time.perf_counter()
    q_bar = mean_q(handle, model_ids)
    out = handle.require_array(f"scores/{key}/tau", (n_targets, n), "float32", (target_chunk_rows, min(n, 8192)))
    for group in score_passes(todo, target_chunk_rows, n):
        ranges = [range(c * target_chunk_rows, min(n_targets, (c + 1) * target_chunk_rows)) for c in group]
        name = f"targets {ranges[0].start}-{ranges[-1].stop - 1}"
        progress.unit_started(name, (ranges[-1].stop - ranges[0].start) * len(model_ids))
        features_todo = [(m, chunk) for m in model_ids for chunk in group
                         if handle.done_info(f"featurize_targets/{fingerprint.sha256[:16]}", f"{m:06d}/{chunk:06d}") is None]
        write_features(handle, targets, spec, settings, features_todo, target_chunk_rows, batch_size, torch_device,
                       StepsOnly(progress), prefix=target_prefix, stage=f"featurize_targets/{fingerprint.sha256[:16]}")
        taus = score_chunks(handle, view, model_ids, q_bar, target_prefix, ranges, train_chunk_rows, torch_device)
        for chunk, rows, tau in zip(group, ranges, taus):
            out[rows.start:rows.stop] = tau.numpy()
            handle.mark_done("score", f"{key}/{chunk:06d}", {"rows": [rows.start, rows.stop]})
            report.chunks_done += 1
        progress.unit_finished(name, f"{ranges[-1].stop - ranges[0].start} targets scored", len(group))
    report.seconds = time.perf_counter() - start
    return report


def find_scores(handle: Store, view: View, model_ids: list[int], targets_sha: str | None) -> str:
    """The key of finished scores for the view and models (and targets, if given)."""
    scored = handle.manifest.get("scores", {})
    candidates = [k for k, v in scored.items() if v["view"] == [view.dims, view.blocks, view.ridge]
                  and v["models"] == model_ids and (targets_sha is None or v["targets"] == targets_sha[:16])]
    if len(candidates) > 1:
        raise UserError(f"several target sets are scored at view {view.key}; pass --targets to choose one")
    if not candidates:
        raise UserError(f"no scores at view {view.key} for models {compact_ids(model_ids)}"
                        f"{' and these targets' if targets_sha else ''}; run `trakwomp score` first")
    return find_scores_by_key(handle, candidates[0])


def find_view_scores(handle: Store, targets: Dataset | None, dims: int | None, blocks: int | None, ridge: float,
                     models: list[int] | None) -> str:
    """The key of finished scores of the view (dims, blocks, ridge) and models, for `targets`
    (needed only if several target sets are scored)."""
    return find_scores(handle, store_view(handle, dims, blocks, ridge), featurized_models(handle, models),
                       targets.fingerprint().sha256 if targets is not None else None)


def find_scores_by_key(handle: Store, key: str) -> str:
    """`key`, checked to name finished scores."""
    if key not in handle.manifest.get("scores", {}):
        raise UserError(f"store {handle.location!r} has no scores {key!r}")
    tau = handle.array(f"scores/{key}/tau")
    n_targets, chunk_rows = tau.shape[0], tau.chunks[0]
    missing = [c for c in range(math.ceil(n_targets / chunk_rows)) if handle.done_info("score", f"{key}/{c:06d}") is None]
    if missing:
        raise UserError(f"scores {key} are unfinished ({len(missing)} target chunks left); run `trakwomp score` again")
    return key


def iterate_scores(handle: Store, key: str, threshold: float = 0.0):
    """(rows, soft-thresholded scores) for successive target chunks of stored scores."""
    tau = handle.array(f"scores/{key}/tau")
    step = tau.chunks[0]
    for start in range(0, tau.shape[0], step):
        block = torch.from_numpy(tau[start:start + step])
        yield range(start, start + len(block)), relative_soft_threshold(block, threshold).numpy()


def export_scores(store: str | Path, key: str, out: str | Path, threshold: float = 0.0) -> tuple[int, int]:
    """Write the (n_targets, n_train) scores `key`, soft-thresholded, to an .npy file, streaming."""
    handle = Store.open(store)
    find_scores_by_key(handle, key)
    tau = handle.array(f"scores/{key}/tau")
    try:
        array = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=tau.shape)
        for rows, block in iterate_scores(handle, key, threshold):
            array[rows.start:rows.stop] = block
        array.flush()
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    return tau.shape


def top_k_rows(store: str | Path, key: str, targets: Dataset, k: int, threshold: float = 0.0) -> list[dict]:
    """For each target, its k most positive and k most negative train examples of scores `key`."""
    handle = Store.open(store)
    find_scores_by_key(handle, key)
    train = stored_dataset(handle, verify=False)
    rows = []
    for target_rows, block in iterate_scores(handle, key, threshold):
        for local, t in enumerate(target_rows):
            for direction, rank, i in strongest(block[local], k):
                rows.append({
                    "target": t, "target_label": targets.classes[int(targets.labels[t])],
                    "target_path": targets.path(t), "direction": direction, "rank": rank, "train_index": i,
                    "train_label": train.classes[int(train.labels[i])], "train_path": train.path(i),
                    "score": float(block[local, i]),
                })
    return rows


def strongest(scores: np.ndarray, k: int) -> list[tuple[str, int, int]]:
    """(direction, rank, train index) of the k largest scores ("supports", largest first) and
    the k smallest ("opposes", smallest first); ties keep the lower index first."""
    order = np.argsort(scores, kind="stable")
    supports = np.argsort(-scores, kind="stable")[:k]
    return ([("supports", rank, int(i)) for rank, i in enumerate(supports, 1)]
            + [("opposes", rank, int(i)) for rank, i in enumerate(order[:k], 1)])


def write_table(rows: list[dict], out: str | Path) -> None:
    """Rows as CSV, or as JSON if `out` ends in .json."""
    out = Path(out)
    try:
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=1))
            return
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["target"])
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r}: {e.strerror or e}") from None


def predict(
    store: str | Path,
    subset: np.ndarray,
    targets: Dataset | None = None,
    dims: int | None = None,
    blocks: int | None = None,
    ridge: float = 0.0,
    models: list[int] | None = None,
    threshold: float = 0.0,
) -> tuple[str, np.ndarray]:
    """The datamodel prediction sum_{i in S} tau_i(z) for every scored target z, for a train
    subset S (a boolean mask over the train set, or train indices), from the stored scores of the
    view and models (and `targets`, needed if several target sets are scored). Only differences
    between subsets are meaningful: the datamodel's intercept is not estimated."""
    handle = Store.open(store)
    key = find_view_scores(handle, targets, dims, blocks, ridge, models)
    n = handle.manifest["dataset"]["num_examples"]
    if subset.dtype != bool:
        if not np.issubdtype(subset.dtype, np.integer) or subset.ndim != 1:
            raise UserError("--subset must be a boolean mask over the train set or a 1-d array of train indices")
        if len(subset) and (subset.min() < 0 or subset.max() >= n):
            raise UserError(f"--subset indices must lie in [0, {n})")
        mask = np.zeros(n, dtype=bool)
        mask[subset] = True
        subset = mask
    if subset.shape != (n,):
        raise UserError(f"--subset mask has shape {subset.shape}, expected ({n},) for the store's train set")
    parts = [block @ subset.astype(np.float32) for _, block in iterate_scores(handle, key, threshold)]
    return key, np.concatenate(parts)
