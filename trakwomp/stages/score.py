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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trakwomp.data.base import Dataset, Fingerprint
from trakwomp.errors import UserError
from trakwomp.estimator.scores import mean_q, score_chunks, score_passes, top_k_chunks
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD, check_threshold
from trakwomp.estimator.view import View, ViewSpec, ridge_text
from trakwomp.features.memory import batch_size_that_fits, check_dense_fits
from trakwomp.features.settings import FeatureSettings
from trakwomp.features.writer import FeaturizeReport, write_features
from trakwomp.models.registry import check_made_from, load_registered_model
from trakwomp.models.spec import ModelSpec, check_model_fits_data
from trakwomp.outputs import check_output
from trakwomp.runtime import (
    Progress,
    StepsOnly,
)
from trakwomp.settings import option
from trakwomp.stages.bindings import bind_model, bind_tokenizer, check_model_bound, check_tokenizer, stored_task
from trakwomp.stages.export import (
    TABLE_SUFFIXES,
    export_scores,
    top_k_rows,
    write_table,
)
from trakwomp.stages.selection import featurized_models, store_view
from trakwomp.stages.skeleton import Plan, RunSettings, Stage, Work
from trakwomp.stages.stored_scores import scores_key, view_record
from trakwomp.store import Store, paths
from trakwomp.store.zarr_store import StoredArray
from trakwomp.tasks.base import Task


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
    exported: str | None = None  # the .npy the scores were written to
    top_k_file: str | None = None  # the table of each target's strongest train examples
    top_k_rows: list[dict] = field(default_factory=list, metadata={"json": False})


def check_finalized(handle: Store, view: View, model_ids: list[int]) -> None:
    """Every block of the view finalized for each model, from that model's registered weights."""
    for model_id in model_ids:
        blocks = handle.done_units("finalize", paths.unit(view.key, model_id))
        check_made_from(handle, "finalize", [paths.unit(view.key, model_id, int(b)) for b in blocks], model_id)
        done = len(blocks)
        if done < view.blocks:
            raise UserError(f"view {view.key} of model {model_id} is finalized in {done} of {view.blocks} blocks; "
                            f"run `trakwomp finalize {handle.location} --dims {view.dims} --blocks {view.blocks}"
                            f" --ridge {ridge_text(view.ridge)}` first")


@dataclass(frozen=True, kw_only=True)
class ScoreSettings(RunSettings):
    """Which scores `score` computes, how, and what it writes out of the store once they are done."""

    view: ViewSpec = option(ViewSpec(), "The view: its dims, blocks and ridge.")
    models: list[int] | None = option(None, "Model ids to use, e.g. 0,2,5-7 (default: all featurized).")
    model: ModelSpec | None = option(None, "The store's model; needed (and checked) if it is a package.module:factory.")
    target_chunk_rows: int = option(256, "Targets per unit of work.")
    batch_size: int = option(64, "Targets per gradient batch (lowered, and said, if it would not fit in memory).")
    memory_limit: int | None = option(None, "The most memory the process may hold, in bytes (see featurize).")
    out: Path | None = option(None, "Write the (n_targets, n_train) scores to this .npy file.")
    top_k: int = option(0, "Write the K most supporting and opposing train examples per target.")
    top_k_out: Path = option(Path("top-k.csv"), "Where --top-k goes (.csv or .json).")
    top_k_only: bool = option(False, "Keep only each target's --top-k most supporting and opposing train examples "
                                     "(and its RMS score, for the threshold), never the (targets x train) scores: for "
                                     "target sets whose scores would not fit in memory or on disk.")
    threshold: float = option(DEFAULT_THRESHOLD, "Soft threshold for --out and --top-k, in units of each target's "
                                                 "RMS score (0 for the raw scores, as the store holds them).")

    def __post_init__(self):
        """Paths given as text are paths."""
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "top_k_out", Path(self.top_k_out))


@dataclass(frozen=True)
class TargetsPlan:
    """The targets checked against a store: the task, the model and its outputs, the network
    (for memory estimates) and the feature settings the train features were made with."""

    task: Task
    model: ModelSpec
    output_size: int
    net: nn.Module
    features: FeatureSettings
    fingerprint: Fingerprint


@dataclass(frozen=True)
class ScorePlan(Plan):
    """The view and models to score with, the targets as checked, and the scores' key."""

    location: str | Path
    view: View
    model_ids: list[int]
    targets: TargetsPlan
    key: str
    targets_id: str


class Score(Stage[ScorePlan, int, ScoreReport]):
    """Units: chunks of targets, scored against every train example (see the module docstring)."""

    stage = "score"
    settings: ScoreSettings

    def __init__(self, settings: ScoreSettings, targets: Dataset):
        super().__init__(settings)
        self.targets = targets

    def check(self, store: str | Path) -> ScorePlan:
        self.check_settings(store)
        handle = Store.open(store)
        view = store_view(handle, self.settings.view)
        model_ids = featurized_models(handle, self.settings.models)
        check_finalized(handle, view, model_ids)
        targets = self.checked_targets(handle)
        sha, kept = targets.fingerprint.sha256, f"_k{self.settings.top_k}" if self.settings.top_k_only else ""
        return ScorePlan(store, view, model_ids, targets, scores_key(view, model_ids, sha) + kept, paths.short_id(sha),
                         existing=handle)

    def check_settings(self, store: str | Path) -> None:
        given = self.settings
        if given.target_chunk_rows < 1 or given.batch_size < 1:
            raise UserError("`chunk_rows` and `batch_size` must be at least 1")
        if (given.out or (given.top_k and not given.top_k_only)) and given.shard.count > 1:
            raise UserError("`out` and `top_k` need all shards' scores: run them without `shard` once every shard is "
                            "done")
        if given.top_k < 0:
            raise UserError("`top_k` must be >= 0")
        if given.top_k_only and not given.top_k:
            raise UserError("`top_k_only` keeps each target's `top_k` examples: give `top_k`")
        if given.top_k_only and given.out:
            raise UserError("`out` writes the (targets x train) scores, which `top_k_only` never makes")
        check_threshold(given.threshold)
        check_output("`out`", given.out, (".npy",), store)
        check_output("`top_k_out`", given.top_k_out if given.top_k else None, TABLE_SUFFIXES, store)

    def checked_targets(self, handle: Store) -> TargetsPlan:
        """The targets against the store (transform, tokenizer, classes) and the model on them."""
        manifest, targets = handle.manifest, self.targets
        if targets.transform_spec != manifest.model_record().transform:
            raise UserError(f"targets must be seen through the store's `transform` "
                            f"({manifest.model_record().transform}), not {targets.transform_spec}")
        task = stored_task(handle)
        check_tokenizer(handle, targets)
        fingerprint = targets.fingerprint()
        model = self.settings.model or ModelSpec.of_store(manifest.model_record(), handle.location)
        check_model_bound(handle, model, targets.transform_spec)
        task.check_targets(targets, manifest.dataset_record().classes)
        output_size = task.output_size(targets)
        net = model.build(output_size)
        check_model_fits_data(net, targets, self.device, model, task, output_size)
        return TargetsPlan(task, model, output_size, net, FeatureSettings.of_store(handle, net), fingerprint)

    def bind(self, handle: Store, plan: ScorePlan) -> ScorePlan:
        bind_tokenizer(handle, self.targets)
        bind_model(handle, plan.targets.model, self.targets.transform_spec)
        return plan

    def work(self, plan: ScorePlan) -> Work[int]:
        key, stage = plan.key, paths.target_features_stage(plan.targets_id)
        return Work(list(range(math.ceil(len(self.targets) / self.settings.target_chunk_rows))),
                    lambda c: paths.unit(key, c), f"score {key} target chunks",
                    [paths.scores_folder(key), paths.done("score", key), paths.targets_prefix(plan.targets_id),
                     paths.done(stage)])

    def start(self, handle: Store, plan: ScorePlan, owned: list[int], todo: list[int]) -> ScoreReport:
        """Before the first write: the models' weights against their recorded hashes, and the
        batch size that fits; then the targets and scores entries."""
        batch_size, targets = self.settings.batch_size, plan.targets
        for model_id in plan.model_ids if todo else []:
            load_registered_model(handle, model_id, targets.model, targets.output_size)
        if todo:
            batch_size = batch_size_that_fits(targets.net, self.targets, targets.task, targets.features, batch_size,
                                              self.settings.target_chunk_rows, self.device, self.settings.memory_limit,
                                              "score")
        if not self.settings.top_k_only and (todo or self.settings.out or self.settings.top_k):
            self.check_dense_fits(len(self.targets), handle.manifest.num_examples)
        kept = {"top_k": self.settings.top_k} if self.settings.top_k_only else {}
        handle.set_entry("targets", plan.targets_id, {"spec": self.targets.spec, **targets.fingerprint.as_dict()})
        handle.set_entry("scores", plan.key, {"view": view_record(plan.view), "models": plan.model_ids,
                                              "targets": plan.targets_id, **kept})
        return ScoreReport(plan.key, plan.view, plan.model_ids, len(self.targets),
                           handle.manifest.num_examples, chunks_skipped=len(owned) - len(todo),
                           batch_size=batch_size)

    def check_dense_fits(self, num_targets: int, num_train: int) -> None:
        """Refuse, before any write, dense scores of which one target chunk (held on the CPU once
        scored, and read back for `out` and `top_k`) would not fit in `memory_limit` or in the
        memory the machine has free."""
        rows = min(self.settings.target_chunk_rows, num_targets)
        need, what = 4 * rows * num_train, f"the scores of one target chunk ({rows} x {num_train} train examples)"
        check_dense_fits(need, what, "lower `chunk_rows`, or keep only the top k with `top_k` and `top_k_only`",
                         self.settings.memory_limit)

    def do(self, handle: Store, plan: ScorePlan, todo: list[int], report: ScoreReport, progress: Progress):
        """Consecutive target chunks share one pass over the train features (`score_passes`)."""
        start, rows_per_chunk = time.perf_counter(), self.settings.target_chunk_rows
        n, n_targets = report.num_train, report.num_targets
        q_bar = mean_q(handle, plan.model_ids)
        held_per_chunk = 4 * rows_per_chunk * (plan.view.dims * len(plan.model_ids) if self.settings.top_k_only else n)
        arrays = self.output_arrays(handle, plan, n)
        write = self.top_k_pass if self.settings.top_k_only else self.dense_pass
        for group in score_passes(todo, held_per_chunk):
            ranges = [range(c * rows_per_chunk, min(n_targets, (c + 1) * rows_per_chunk)) for c in group]
            name = f"targets {ranges[0].start}-{ranges[-1].stop - 1}"
            progress.unit_started(name, (ranges[-1].stop - ranges[0].start) * len(plan.model_ids))
            self.featurize_targets(handle, plan, group, report.batch_size, progress)
            for chunk, rows in zip(group, write(handle, plan, ranges, q_bar, arrays), strict=True):
                yield chunk, {"rows": [rows.start, rows.stop]}
                report.chunks_done += 1
            progress.unit_finished(name, f"{ranges[-1].stop - ranges[0].start} targets scored", len(group))
        report.seconds = time.perf_counter() - start

    def output_arrays(self, handle: Store, plan: ScorePlan, n: int) -> list[StoredArray]:
        """The arrays the scores go to, made (or checked) before any other write: `tau`, or with
        `top_k_only` each target's candidates' values and indices and its sum of squares."""
        n_targets, rows = len(self.targets), self.settings.target_chunk_rows
        if not self.settings.top_k_only:
            return [handle.require_array(paths.scores(plan.key), (n_targets, n), "float32", (rows, min(n, 8192)))]
        width = 2 * min(self.settings.top_k, n)
        return [handle.require_array(paths.top_k(plan.key, "values"), (n_targets, width), "float32", (rows, width)),
                handle.require_array(paths.top_k(plan.key, "index"), (n_targets, width), "int64", (rows, width)),
                handle.require_array(paths.top_k(plan.key, "sum_squares"), (n_targets,), "float64", (rows,))]

    def dense_pass(self, handle: Store, plan: ScorePlan, ranges: list[range], q_bar: torch.Tensor,
                   arrays: list[StoredArray]):
        """Score the targets of `ranges` against every train example into `tau`, yielding each range once written."""
        [out] = arrays
        taus = score_chunks(handle, plan.view, plan.model_ids, q_bar, paths.targets_prefix(plan.targets_id), ranges,
                            handle.manifest.featurize_record().chunk_rows, self.device)
        for rows, tau in zip(ranges, taus, strict=True):
            out[rows.start:rows.stop] = tau.numpy()
            yield rows

    def top_k_pass(self, handle: Store, plan: ScorePlan, ranges: list[range], q_bar: torch.Tensor,
                   arrays: list[StoredArray]):
        """Keep each target's top k of `ranges` (`top_k_chunks`), yielding each range once written."""
        values, index, sum_squares = arrays
        tops = top_k_chunks(handle, plan.view, plan.model_ids, q_bar, paths.targets_prefix(plan.targets_id), ranges,
                            handle.manifest.featurize_record().chunk_rows, self.settings.top_k, self.device)
        for rows, top in zip(ranges, tops, strict=True):
            candidates, indices = top.candidates()
            values[rows.start:rows.stop] = candidates.cpu().numpy()
            index[rows.start:rows.stop] = indices.cpu().numpy()
            sum_squares[rows.start:rows.stop] = top.sum_squares.cpu().numpy()
            yield rows

    def featurize_targets(self, handle: Store, plan: ScorePlan, chunks: list[int], batch_size: int,
                          progress: Progress) -> None:
        """The targets' features of `chunks` for every model (those not yet published), made as the
        train features were, each (model, chunk) published on its own."""
        stage, targets = paths.target_features_stage(plan.targets_id), plan.targets
        todo = [(m, chunk) for m in plan.model_ids for chunk in chunks
                if handle.done_info(stage, paths.unit(m, chunk)) is None]
        for m in plan.model_ids:
            check_made_from(handle, stage, [paths.unit(m, c) for c in chunks if (m, c) not in todo], m)
        for unit, info in write_features(handle, self.targets, model=targets.model, task=targets.task,
                                         features=targets.features, todo=todo,
                                         chunk_rows=self.settings.target_chunk_rows, batch_size=batch_size,
                                         device=self.device, progress=StepsOnly(progress),
                                         prefix=paths.targets_prefix(plan.targets_id), report=FeaturizeReport()):
            handle.mark_done(stage, paths.unit(*unit), info)

    def finish(self, plan: ScorePlan, report: ScoreReport) -> ScoreReport:
        """The exports asked for, from the finished scores (soft-thresholded at `threshold`)."""
        given = self.settings
        if given.out:
            export_scores(plan.location, report.key, given.out, given.threshold)
            report.exported = str(given.out)
        if given.top_k and not self.left_to_other_shards(plan):
            report.top_k_rows = top_k_rows(plan.location, report.key, self.targets, given.top_k, given.threshold)
            write_table(report.top_k_rows, given.top_k_out)
            report.top_k_file = str(given.top_k_out)
        return report

    def left_to_other_shards(self, plan: ScorePlan) -> bool:
        """Whether some target chunks are not yet scored (by another shard's run)."""
        handle = Store.open(plan.location)
        return len(handle.done_units("score", plan.key)) < len(self.work(plan).units)


def score(store: str | Path, targets: Dataset, view: ViewSpec = ViewSpec(), models: list[int] | None = None, *,
          progress: Progress | None = None, **settings) -> ScoreReport:
    """Score every train example for every target at the view (dims, blocks, ridge) with the
    chosen models (default: all featurized); resumable by target chunk. Then, if asked, write the
    scores (soft-thresholded at `threshold`) to the .npy `out`, and each target's `top_k` most
    supporting and opposing train examples to `top_k_out` (.csv or .json; the rows are also in
    the report). `settings`: `ScoreSettings`' other fields by keyword (model, target_chunk_rows,
    batch_size, memory_limit, out, top_k, top_k_out, threshold, device, shard)."""
    return Score(ScoreSettings(view=view, models=models, **settings), targets).run(store, progress)
