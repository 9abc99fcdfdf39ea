"""explain's answers in the store: each scored like any target (`score`'s checks and math), but
kept apart from `score`'s scores, found in O(1), and bounded.

- `answers/<key>/`: an answer's features, `tau` (1, n_train) and, once asked, `token_tau` (one
  row per answer token); `key` is the scores key of the answer at the view and models.
- `done/answers/<key>`: its marker, written last: the answer's place in the order (`seq`), the
  hash of every model's weights it was made from, and whether it holds per-token scores. A
  query reads this one marker by its key, however many answers are kept.
- `answer_order/<seq>`: which answer was begun `seq`-th; the manifest's "answers" section keeps
  only the range of places still kept, {"first", "next"}, so the manifest does not grow.

A new answer takes the next place; once more than `max_answers` are kept the oldest are removed
(marker first, so it is never served half removed): first in, first out. An answer a kill
interrupted has no marker: it is never served and is not work that `status` waits for; the same
query does it again, and it is removed in its turn like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trakwomp.data.base import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator.scores import mean_q, score_chunks
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.memory import batch_size_that_fits
from trakwomp.features.writer import FeaturizeReport, write_features
from trakwomp.models.registry import verified_state
from trakwomp.runtime import NoProgress, Progress, StepsOnly
from trakwomp.stages.score import Score, ScorePlan, ScoreSettings
from trakwomp.store import Store, paths
from trakwomp.store.records import take_answer_place

STAGE = "answers"
DEFAULT_MAX_ANSWERS = 1000


@dataclass
class AnswerScores:
    key: str
    tau: np.ndarray  # (1, n_train), raw
    token_tau: np.ndarray | None  # (answer tokens, n_train), raw; None unless asked

    def token_scores(self) -> np.ndarray:
        """`token_tau`, which scores asked per token have."""
        if self.token_tau is None:
            raise ValueError(f"answer {self.key}: its scores were not asked per token")
        return self.token_tau
    cached: bool  # read from the store (True) or computed now


def reserve(handle: Store, key: str, max_answers: int) -> int:
    """The next place in the order for answer `key`; the oldest answers beyond `max_answers`
    removed."""
    seq, evicted = handle.update(take_answer_place(max_answers))
    handle.write_record(paths.answer_order(seq), {"key": key})
    handle.write_record(paths.answer(key).rstrip("/"), {})  # its folder: unfinished until its marker
    for old in evicted:
        forget(handle, old)
    return seq


def forget(handle: Store, seq: int) -> None:
    """Remove the answer begun `seq`-th (unless the same query finished it again later, under a
    newer place), then its order entry."""
    order = handle.read_record(paths.answer_order(seq))
    if order is not None:
        info = handle.done_info(STAGE, order["key"])
        if info is None or info["seq"] == seq:
            handle.remove(paths.done(STAGE, order["key"]))
            handle.remove(paths.answer(order["key"]).rstrip("/"))
    handle.remove(paths.answer_order(seq))


def cached_info(handle: Store, key: str, model_ids: list[int], per_token: bool) -> dict | None:
    """The marker of the finished answer `key` (with per-token scores if asked), or None; an
    answer made from other weights than the models' now, or whose models' stored weights no
    longer match their hashes, is refused."""
    info = handle.done_info(STAGE, key)
    if info is None:
        return None
    registry = handle.manifest.models
    for model_id in model_ids:
        if info["weights"].get(str(model_id)) != registry[model_id].sha256:
            raise UserError(f"store {handle.location!r}: the stored answer {key} was made from other weights than model "
                            f"{model_id}'s; remove {paths.answer(key)} and {paths.done(STAGE, key)}")
        verified_state(handle, model_id)
    return info if info["tokens"] or not per_token else None


def answer_features_scores(handle: Store, plan: ScorePlan, data: Dataset, prefix: str, batch_size: int,
                           device: torch.device, progress: Progress) -> np.ndarray:
    """tau of every row of `data` (the answer, or its tokens): their features for every model
    under `prefix`, then eq. 3 at the stage's view, as `score` computes them."""
    ids, targets = plan.model_ids, plan.targets
    batch_size = batch_size_that_fits(targets.net, data, targets.task, targets.features, batch_size, len(data), device,
                                      None, "explain")
    for _ in write_features(handle, data, model=targets.model, task=targets.task, features=targets.features,
                            todo=[(m, 0) for m in ids], chunk_rows=len(data), batch_size=batch_size, device=device,
                            progress=StepsOnly(progress), prefix=prefix, report=FeaturizeReport()):
        pass
    taus = score_chunks(handle, plan.view, ids, mean_q(handle, ids), prefix, [range(len(data))],
                        handle.manifest.featurize_record().chunk_rows, device)
    return taus[0].numpy()


def score_answer(store: str | Path, target: Dataset, view: ViewSpec, per_token: bool = False,
                 max_answers: int = DEFAULT_MAX_ANSWERS, device: str = "cpu",
                 progress: Progress | None = None) -> AnswerScores:
    """The answer `target`'s scores at the view with every featurized model (and, with
    `per_token`, each answer token's), read from the store if it holds them, else computed and
    kept, the oldest answers beyond `max_answers` removed."""
    if max_answers < 1:
        raise UserError(f"`max_answers` must be at least 1, got {max_answers}")
    progress = progress or NoProgress()
    stage = Score(ScoreSettings(device=device, view=view, target_chunk_rows=1, batch_size=1), target)
    plan = stage.check(store)
    handle = stage.open(store, plan)
    plan = stage.bind(handle, plan)
    key, folder = plan.key, paths.answer(plan.key)
    info = cached_info(handle, key, plan.model_ids, per_token)
    if info is not None:
        token_tau = handle.read_array(folder + "token_tau") if per_token else None
        return AnswerScores(key, handle.read_array(folder + "tau"), token_tau, True)
    done = handle.done_info(STAGE, key)
    seq = reserve(handle, key, max_answers) if done is None else done["seq"]
    progress.plan(1, 0, "explain: the answer's scores")
    progress.unit_started("answer", len(plan.model_ids) * (1 + (len(target.per_token()) if per_token else 0)))
    if done is None:
        handle.write_array(folder + "tau", answer_features_scores(handle, plan, target, folder, 1, stage.device,
                                                                  progress))
    token_tau = None
    if per_token:
        tokens = Score(ScoreSettings(device=device, view=view), target.per_token())
        token_plan = tokens.check(store)
        token_tau = answer_features_scores(handle, token_plan, tokens.targets, folder + "tokens/", 16, stage.device,
                                           progress)
        handle.write_array(folder + "token_tau", token_tau)
    weights = {str(m): handle.manifest.models[m].sha256 for m in plan.model_ids}
    handle.mark_done(STAGE, key, {"seq": seq, "weights": weights, "tokens": per_token})
    progress.unit_finished("answer", "scored")
    return AnswerScores(key, handle.read_array(folder + "tau"), token_tau, False)
