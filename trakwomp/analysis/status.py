"""`status`: what each stage of a store has done and has left, per role, model, view and scores.

What was asked for is what commands recorded: the number of models `train` was asked for per
role, the models `featurize` registered, the models each `finalize` view was asked for, the
scores `score` started, and the runs each `verify` asked for. A stage is complete when every
unit of that is published.
explain's answers are counted apart: they are not work that a stage has left (an answer a kill
interrupted is finished by the same query, and removed in its turn like the others).
Temporary files (`*.partial`) are counted: writes in flight, or leftovers of killed writes that
the next run of their stage removes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trakwomp.estimator.view import blocks_of_key
from trakwomp.analysis.verify import STAGE as VERIFY_STAGE
from trakwomp.stages.answers import STAGE as ANSWERS_STAGE
from trakwomp.stages.stored_scores import scores_array
from trakwomp.stages.train import ROLES
from trakwomp.store import Store, paths
from trakwomp.tasks.registry import task_of_store


@dataclass
class StageProgress:
    stage: str
    what: str
    done: int
    total: int

    @property
    def complete(self) -> bool:
        return self.done >= self.total


@dataclass
class StoreStatus:
    store: str
    format_version: int
    size_bytes: int
    dataset: dict | None
    model: dict | None
    task: str
    temporary_files: int
    stages: list[StageProgress] = field(default_factory=list)
    runs: dict[str, list[int]] = field(default_factory=dict)  # training run -> ids of its registered models
    answers: int = 0  # explain's answers kept (apart from the stages: not work that status waits for)
    unfinished_answers: int = 0  # answers a kill interrupted: the same query finishes one

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.stages)

    def as_dict(self) -> dict:
        return {**asdict(self), "complete": self.complete,
                "stages": [{**asdict(p), "complete": p.complete} for p in self.stages]}


def status(store: str | Path) -> StoreStatus:
    """Done and total units of every stage that the store was asked for."""
    handle = Store.open(store)
    manifest = handle.manifest
    report = StoreStatus(handle.location, manifest.format_version, handle.size_bytes(),
                         manifest.dataset.json if manifest.dataset else None,
                         manifest.model.json if manifest.model else None, str(task_of_store(manifest.task)),
                         len(handle.temporaries()))
    for role in ROLES:
        done = len(handle.done_units("train", role))
        if done or paths.asked_train(role) in manifest.asked:
            total = max(done, manifest.asked_count(paths.asked_train(role)))
            report.stages.append(StageProgress("train", f"{role} models", done, total))
    if manifest.featurize is not None:
        chunks = math.ceil(manifest.num_examples / manifest.featurize_record().chunk_rows)
        for entry in manifest.models:
            done = len(handle.done_units("featurize", paths.unit(entry.id)))
            report.stages.append(StageProgress("featurize", f"model {entry.id} ({entry.source}) row chunks",
                                               done, chunks))
            report.runs.setdefault(entry.training_run, []).append(entry.id)
    views = {view: list(ids) for view, ids in manifest.asked_ids(paths.asked_finalize("")).items()}
    for view in handle.children(paths.done("finalize")):  # views of stores made before "asked" recorded them
        views.setdefault(view, [int(m) for m in handle.children(paths.done("finalize", view))])
    for view, model_ids in sorted(views.items()):
        blocks = blocks_of_key(view)
        for model_id in model_ids:
            done = len(handle.done_units("finalize", paths.unit(view, model_id)))
            report.stages.append(StageProgress("finalize", f"view {view} model {model_id} blocks", done, blocks))
    finished = set(handle.children(paths.done(ANSWERS_STAGE)))
    report.answers = len(finished)
    report.unfinished_answers = len(set(handle.children(paths.ANSWERS)) - finished)
    for key, entry in sorted(manifest.scores.items()):
        done = len(handle.done_units("score", key))
        n_targets = manifest.targets[entry.targets].num_examples
        chunk_rows = handle.chunks_of(scores_array(handle, key))
        total = math.ceil(n_targets / chunk_rows[0]) if chunk_rows else max(done, 1)
        report.stages.append(StageProgress("score", f"scores {key} target chunks", done, total))
    report.stages += verify_progress(handle)
    return report


def verify_progress(handle: Store) -> list[StageProgress]:
    """Per scored target set, the runs that verifies asked for (their records) and those done."""
    found = []
    for targets_id in handle.children(paths.VERIFY):
        asked: set[str] = set()
        for experiment in handle.children(paths.verify_experiments(targets_id)):
            asked.update((handle.read_record(paths.verify_experiment(targets_id, experiment)) or {}).get("runs", []))
        done = sum(handle.done_info(VERIFY_STAGE, run) is not None for run in asked)
        found.append(StageProgress("verify", f"runs for targets {targets_id}", done, len(asked)))
    return found
