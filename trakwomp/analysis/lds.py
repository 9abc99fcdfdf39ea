"""The linear datamodeling score (LDS).

For LDS models j = 1..J trained on random subsets D_j (masks, J x n) with actual outputs f
y_j(z) on the targets, and a score matrix tau (n_targets x n_train), the prediction for model j
is sum_{i in D_j} tau_i(z). LDS(z) is the Spearman correlation over j of actual and predicted
outputs; the reported LDS is its mean over targets, with a bootstrap interval over targets.
A target whose predictions are all equal (e.g. all scores thresholded to 0) counts as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from trakwomp.analysis.baselines import BASELINES, BaselineInputs
from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.data.files import read_npy
from trakwomp.errors import UserError
from trakwomp.estimator.threshold import (
    DEFAULT_THRESHOLD,
    check_threshold,
    relative_soft_threshold,
)
from trakwomp.estimator.view import AUTO, ViewSpec, check_ridge
from trakwomp.runtime import resolve_device
from trakwomp.stages.selection import featurized_models, store_view
from trakwomp.stages.stored_scores import find_scores, iterate_scores
from trakwomp.store import Store, paths

THRESHOLD_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
SIZE_BASELINE = "examples kept (baseline)"


def spearman_columns(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of `actual` with the same column of `predicted`
    (average ranks for ties); 0 where either column is constant."""
    ra = rankdata(actual, axis=0)
    rp = rankdata(predicted, axis=0)
    ra -= ra.mean(axis=0)
    rp -= rp.mean(axis=0)
    denominator = np.sqrt((ra ** 2).sum(axis=0) * (rp ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rp).sum(axis=0) / denominator
    return np.where(denominator > 0, rho, 0.0)


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of `values` (resampling its entries)."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 100):
        idx = rng.integers(0, len(values), (min(100, resamples - start), len(values)))
        means[start:start + len(idx)] = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def lds_per_target(chunks: Iterable[tuple[range, np.ndarray]], truth: GroundTruth) -> np.ndarray:
    """LDS of each target from score chunks (rows, scores of those targets x n_train)."""
    masks = torch.from_numpy(truth.masks.astype(np.float64))
    out = np.empty(truth.outputs.shape[1])
    for rows, block in chunks:
        predicted = (masks @ torch.from_numpy(np.asarray(block, dtype=np.float64)).T).numpy()
        out[rows.start:rows.stop] = spearman_columns(truth.outputs[:, rows.start:rows.stop], predicted)
    return out


@dataclass
class LdsResult:
    name: str
    mean: float
    low: float
    high: float
    num_targets: int
    num_models: int
    threshold: float
    per_target: np.ndarray = field(repr=False)
    selected_on_half: bool = False

    def as_dict(self) -> dict:
        return {"name": self.name, "lds": self.mean, "ci95": [self.low, self.high], "targets": self.num_targets,
                "models": self.num_models, "threshold": self.threshold, "threshold_selected_on_half": self.selected_on_half}


@dataclass
class PairedDifference:
    name: str
    baseline: str
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"name": self.name, "baseline": self.baseline, "difference": self.mean, "ci95": [self.low, self.high]}


def size_baseline(num_targets: int, num_train: int, chunk_rows: int = 256) -> "ScoreSource":
    """Every score 1: each model's prediction is the number of examples it was trained on."""
    def chunks():
        for start in range(0, num_targets, chunk_rows):
            rows = range(start, min(start + chunk_rows, num_targets))
            yield rows, np.ones((len(rows), num_train), np.float32)

    return ScoreSource(SIZE_BASELINE, chunks, num_targets, num_train)


class ScoreSource:
    """A score matrix to evaluate: stored scores or an .npy file, read in target chunks."""

    def __init__(self, name: str, chunks_fn, num_targets: int, num_train: int):
        self.name, self._chunks_fn, self.num_targets, self.num_train = name, chunks_fn, num_targets, num_train

    def chunks(self, threshold: float):
        for rows, block in self._chunks_fn():
            yield rows, relative_soft_threshold(torch.from_numpy(np.asarray(block)), threshold).numpy()

    @classmethod
    def from_file(cls, path: str | Path, chunk_rows: int = 256) -> "ScoreSource":
        matrix = read_npy(path, "scores file", mmap_mode="r")
        if matrix.ndim != 2:
            raise UserError(f"scores file {str(path)!r} must hold a 2-d (n_targets, n_train) array, got {matrix.shape}")

        def chunks():
            for start in range(0, matrix.shape[0], chunk_rows):
                block = np.array(matrix[start:start + chunk_rows], dtype=np.float32)
                if not np.isfinite(block).all():
                    raise UserError(f"scores file {str(path)!r} holds NaN or infinite values")
                yield range(start, start + len(block)), block

        return cls(Path(path).name, chunks, matrix.shape[0], matrix.shape[1])


def lds_of_source(source: ScoreSource, truth: GroundTruth, threshold: float = 0.0, tune_threshold: bool = False,
             resamples: int = 2000, seed: int = 0) -> LdsResult:
    """LDS of one score source; with `tune_threshold`, the soft threshold is chosen on half of the
    LDS models and the LDS is reported on the other half."""
    n_models, n_train = truth.masks.shape
    if (source.num_targets, source.num_train) != (truth.outputs.shape[1], n_train):
        raise UserError(f"scores {source.name} are {source.num_targets} x {source.num_train}, but the LDS ground "
                        f"truth has {truth.outputs.shape[1]} targets x {n_train} train examples")
    if tune_threshold:
        if n_models < 4:
            raise UserError("`tune_threshold` needs at least 4 LDS models")
        selection = truth.split(0)
        threshold = max(THRESHOLD_GRID, key=lambda t: lds_per_target(source.chunks(t), selection).mean())
        truth = truth.split(1)
    per_target = lds_per_target(source.chunks(threshold), truth)
    low, high = bootstrap_interval(per_target, resamples, seed)
    return LdsResult(source.name, float(per_target.mean()), low, high, len(per_target), len(truth.masks), threshold,
                     per_target, tune_threshold)


def paired_difference(result: LdsResult, baseline: LdsResult, resamples: int = 2000, seed: int = 0) -> PairedDifference:
    """Mean per-target LDS difference with a bootstrap interval that resamples the same targets."""
    if len(result.per_target) != len(baseline.per_target) or result.num_models != baseline.num_models:
        raise UserError("paired differences need the same targets and LDS models")
    diff = result.per_target - baseline.per_target
    low, high = bootstrap_interval(diff, resamples, seed)
    return PairedDifference(result.name, baseline.name, float(diff.mean()), low, high)


@dataclass
class LdsReport:
    results: list[LdsResult]
    differences: list[PairedDifference]

    def as_dict(self) -> dict:
        return {"results": [r.as_dict() for r in self.results], "paired_differences": [d.as_dict() for d in self.differences]}


def view_name(view, num_models: int) -> str:
    method = "TRAK" if view.blocks == 1 else "TRAK-WOMP"
    ridge = "" if view.ridge == AUTO else f" ridge={view.ridge:g}"
    blocks = f"{view.blocks} layers" if view.layer_widths else f"B={view.blocks}"
    return f"{method} d={view.dims} {blocks}{ridge} M={num_models}"


def pair_views(dims: Sequence[int], blocks: Sequence[int], ridges: Sequence[float | str] = ()) -> list[ViewSpec]:
    """Views from repeated dims, blocks and ridges: paired by position, a single value (or none)
    applying to every view."""
    lists = {"`dims`": list(dims), "`blocks`": list(blocks), "`ridge`": list(ridges)}
    count = max(len(v) for v in lists.values())
    repeated = {name: len(v) for name, v in lists.items() if len(v) > 1}
    if any(n != count for n in repeated.values()):
        given = " and ".join(f"{n} {name}" for name, n in repeated.items())
        raise UserError(f"{given}: give one of each per view, or one value for all")

    def pick(values: list, i: int, default):
        return values[i] if len(values) > 1 else (values[0] if values else default)

    return [ViewSpec(pick(lists["`dims`"], i, None), pick(lists["`blocks`"], i, None), check_ridge(pick(lists["`ridge`"], i, AUTO)))
            for i in range(max(count, 1))]


def lds(
    store: str | Path,
    views: list[ViewSpec] | None = None,
    models: list[int] | None = None,
    score_files: Sequence[str | Path] = (),
    *,
    baselines: Sequence[str] = (),
    threshold: float | None = None,
    tune_threshold: bool = False,
    half: int | None = None,
    resamples: int = 2000,
    seed: int = 0,
    by_group: bool = False,
    device: str = "cpu",
) -> LdsReport:
    """LDS of the store's scores at each of `views` (default: the default view, unless score
    files are given), of each score file and of each baseline (trakwomp.analysis.baselines), against
    the store's LDS models (or `half` 0 or 1 of them, see `GroundTruth.split`); paired differences
    are taken against the first. `threshold` soft-thresholds the views and score files (default:
    the store's views at DEFAULT_THRESHOLD, score files as given, since they may have been
    thresholded when exported; baselines never). `by_group`:
    against the group LDS models, each trained on a random half of the groups, so that the
    prediction sum_{i in D_j} tau_i(z) is a sum of group scores (the group LDS); a last row
    gives the LDS of predicting by the number of examples kept (`size_baseline`), which the
    varying sizes of the groups let reach a high group LDS with no attribution at all."""
    if half is not None and (half not in (0, 1) or tune_threshold):
        raise UserError("`half` must be 0 or 1, and cannot go with `tune_threshold` (which uses both halves)")
    if resamples < 1:
        raise UserError("`resamples` must be at least 1")
    if threshold is not None:
        check_threshold(threshold)
    handle = Store.open(store)
    truth = GroundTruth.from_store(handle, by_group)
    if half is not None:
        truth = truth.split(half)
    if views is None:
        views = [] if score_files else [ViewSpec()]
    sources = view_sources(handle, views, models, truth, DEFAULT_THRESHOLD if threshold is None else threshold)
    sources += [(ScoreSource.from_file(path), 0.0 if threshold is None else threshold) for path in score_files]
    sources += baseline_sources(handle, baselines, models, truth, resolve_device(device))
    results = [lds_of_source(s, truth, t, tune_threshold, resamples, seed) for s, t in sources]
    if by_group and sources:  # on the LDS models the others are reported on, never thresholded
        baseline = size_baseline(sources[0][0].num_targets, sources[0][0].num_train)
        results.append(lds_of_source(baseline, truth.split(1) if tune_threshold else truth, resamples=resamples, seed=seed))
    return LdsReport(results, [paired_difference(r, results[0], resamples, seed) for r in results[1:]])


def view_sources(handle: Store, views: list[ViewSpec], models: list[int] | None, truth: GroundTruth,
                 threshold: float) -> list[tuple[ScoreSource, float]]:
    """The store's finished scores of the LDS targets at each view, with the threshold to apply."""
    if not views:
        return []
    model_ids, sources = featurized_models(handle, models), []
    for spec in views:
        view = store_view(handle, spec)
        key = find_scores(handle, view, model_ids, truth.targets_sha)
        shape = handle.array(paths.scores(key)).shape
        sources.append((ScoreSource(view_name(view, len(model_ids)), lambda key=key: iterate_scores(handle, key),
                                    *shape), threshold))
    return sources


def baseline_sources(handle: Store, names: Sequence[str], models: list[int] | None, truth: GroundTruth,
                     device: torch.device) -> list[tuple[ScoreSource, float]]:
    """Each baseline's scores of the LDS targets (never thresholded), all checked before any is read."""
    if not names:
        return []
    baselines = [BASELINES.get(name) for name in dict.fromkeys(names)]
    n_targets, n_train = truth.outputs.shape[1], truth.masks.shape[1]
    inputs = BaselineInputs(handle, featurized_models(handle, models), truth.targets_sha, n_targets, n_train, device)
    return [(ScoreSource(f"{baseline.name} (baseline)", baseline.chunks(inputs), n_targets, n_train), 0.0)
            for baseline in baselines]
