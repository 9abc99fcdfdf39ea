"""Groups of train examples (data sources): their scores, and what training without some of them
is predicted to do.

A group G's score for target z is the sum of its members' scores, T_G(z) = sum_{i in G} tau_i(z).
The datamodel f_z(S) = sum_{i in S} tau_i(z) + c_z predicts that training on all the train set
but G changes f(z) by -T_G(z), and training on the groups K only changes it by
-sum_{G not in K} T_G(z). Over a target set Z, a group's score is the mean of T_G(z) over z in Z:
the predicted change of the targets' mean output, with the sign flipped, if G were removed.

Groups come from the `source` of each text (`jsonl:` data, fortunes-mini) or from a file (an
.npy of labels, or a CSV of index,group), and a store records the groups it was given with a
SHA-256 over their names and every example's group, so other groups are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import scipy.stats

from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.data.files import load_indices
from trakwomp.data.groups import Groups, group_positions
from trakwomp.errors import UserError
from trakwomp.features.memory import check_dense_fits
from trakwomp.stages.bindings import resolve_groups
from trakwomp.stages.selection import Selection
from trakwomp.store import Store, paths


def target_rows(num_targets: int, chosen: list[int] | None = None, target_set: str | Path | None = None) -> np.ndarray:
    """Positions of the chosen scored targets: `chosen`, or an .npy (indices or a boolean mask
    over the scored targets), or all of them."""
    if chosen and target_set is not None:
        raise UserError("give `target` or `target_set`, not both")
    if target_set is not None:
        values = load_indices(target_set, "`target_set`")
        if values.dtype == bool:
            if values.shape != (num_targets,):
                raise UserError(f"`target_set` mask has {len(values)} entries for the {num_targets} scored targets")
            values = np.flatnonzero(values)
        if not len(values):
            raise UserError("`target_set` chooses no target")
        chosen = values.tolist()
    if not chosen:
        return np.arange(num_targets)
    rows = np.asarray(chosen, dtype=np.int64)
    if rows.min() < 0 or rows.max() >= num_targets:
        raise UserError(f"target {int(rows.max() if rows.max() >= num_targets else rows.min())} is out of range: "
                        f"the scores hold targets 0 to {num_targets - 1}")
    if len(np.unique(rows)) != len(rows):
        raise UserError("a target is chosen twice")
    return rows


@dataclass
class Calibration:
    """The datamodel's scale on a target set Z, from LDS models j (trained on subsets D_j): the
    least-squares slope of y_j = mean_{z in Z} f_j(z) on x_j = mean_{z in Z} sum_{i in D_j} tau_i(z),
    their correlation r and the slope's two-sided p-value (t-test, J - 2 degrees of freedom).
    Scores are fitted up to scale (TRAK-WOMP's grow with the number of blocks), so slope x (a
    predicted change) is that change in the output's units; only a slope that is positive at
    p < 0.05 is used (`usable`): where removing groups barely moves the targets, the fit is noise."""

    slope: float
    correlation: float
    p_value: float
    num_models: int
    by_group: bool

    @classmethod
    def fit(cls, predicted: np.ndarray, actual: np.ndarray, by_group: bool) -> "Calibration | None":
        """From the models' predicted and actual mean outputs; None if fewer than 3 models or
        a constant prediction or output."""
        if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
            return None
        fit: Any = scipy.stats.linregress(predicted, actual)  # (a result whose fields scipy's stubs do not type)
        return cls(float(fit.slope), float(fit.rvalue), float(fit.pvalue), len(predicted), by_group)

    @property
    def usable(self) -> bool:
        return self.slope > 0 and self.p_value < 0.05

    def describe(self) -> str:
        kind = "group LDS models" if self.by_group else "LDS models"
        return f"slope {self.slope:.4g} fitted on {self.num_models} {kind} (r = {self.correlation:.2f}, p = {self.p_value:.2g})"


def calibration_truth(handle: Store, key: str) -> tuple[GroundTruth | None, bool]:
    """The LDS models to calibrate scores `key` with, and whether they are group LDS models:
    those if the store has them, else the LDS models; None if it has neither, or they were
    measured on other targets."""
    recorded = handle.manifest.lds_targets
    if recorded is None or paths.short_id(recorded.sha256) != handle.manifest.scores[key].targets:
        return None, False
    for by_group in (True, False):
        if handle.done_units("train", "lds-groups" if by_group else "lds"):
            return GroundTruth.from_store(handle, by_group), by_group
    return None, False


def target_set_calibration(handle: Store, key: str, rows: np.ndarray, mean_scores: np.ndarray) -> Calibration | None:
    """The calibration of the scores `key` on the target set `rows` (`mean_scores`: their mean
    score per train example) by the store's LDS models, if they were measured on these targets."""
    truth, by_group = calibration_truth(handle, key)
    if truth is None:
        return None  # model j's prediction, averaged over the targets: mask_j . (their mean scores)
    return Calibration.fit(truth.masks @ mean_scores, truth.outputs[:, rows].mean(axis=1), by_group)


@dataclass
class GroupScores:
    """Each group's score T_G(z) for each chosen target z (`per_target`, targets x groups), from
    the stored scores `scores`, and the scale of predictions on the chosen targets if the store's
    LDS models were measured on them (`calibration`)."""

    scores: str
    origin: str
    targets: list[int]
    names: list[str]
    sizes: list[int]
    per_target: np.ndarray
    calibration: Calibration | None = None

    @property
    def over_targets(self) -> np.ndarray:
        """Each group's mean score over the chosen targets."""
        return self.per_target.mean(axis=0)

    def ranked(self) -> list[int]:
        """Group positions by score over the targets, most supporting first."""
        return [int(g) for g in np.argsort(-self.over_targets, kind="stable")]

    def strongest(self, k: int) -> list[int]:
        """The k groups of largest |score| over the targets, by score (supporting first)."""
        top = np.argsort(-np.abs(self.over_targets), kind="stable")[:k]
        return sorted((int(g) for g in top), key=lambda g: -self.over_targets[g])

    def strongest_rows(self, k: int) -> list[dict]:
        """The rows (see `rows`) of the k groups of largest |score|, ranked."""
        shown = {self.names[g] for g in self.strongest(k)}
        return [row for row in self.rows() if row["group"] in shown]

    def rows(self) -> list[dict]:
        """One row per group, ranked: its size, score over the targets (the mean over them of
        the sum of its members' scores), mean score per member, the predicted change of the
        targets' mean output if it were removed, and that change calibrated (if it can be)."""
        total = self.over_targets
        rows = [{"rank": rank, "group": self.names[g], "examples": self.sizes[g], "score": float(total[g]),
                 "score_per_example": float(total[g] / self.sizes[g]), "change_if_removed": float(-total[g])}
                for rank, g in enumerate(self.ranked(), start=1)]
        if self.calibration is not None and self.calibration.usable:
            for row in rows:
                row["calibrated_change_if_removed"] = self.calibration.slope * row["change_if_removed"]
        return rows

    def as_dict(self) -> dict:
        return {"scores": self.scores, "groups_origin": self.origin, "targets": self.targets,
                "calibration": None if self.calibration is None else asdict(self.calibration), "groups": self.rows(),
                "per_target": {name: self.per_target[:, g].tolist() for g, name in enumerate(self.names)}}


def group_scores(
    store: str | Path,
    groups: Groups | str | Path | None = None,
    selection: Selection = Selection(),
    chosen_targets: list[int] | None = None,
    target_set: str | Path | None = None,
) -> GroupScores:
    """Each group's score for each chosen target (default: every scored target), from the
    selected stored scores, and the calibration of predictions on those targets by the store's
    LDS models (see `Calibration`). `groups`: Groups or a groups file; default the store's, else
    the train set's sources."""
    handle = Store.open(store)
    key = selection.key(handle)
    chosen = resolve_groups(handle, groups)
    num_targets = handle.array(paths.scores(key)).shape[0]
    rows = target_rows(num_targets, chosen_targets, target_set)
    check_dense_fits(2 * 8 * len(rows) * len(chosen.names), f"the group scores of {len(rows)} targets x "
                     f"{len(chosen.names)} groups", "choose fewer targets (`target`, `target_set`) or fewer groups")
    membership, position = chosen.membership(), np.full(num_targets, -1)
    position[rows] = np.arange(len(rows))
    per_target, row_sum = np.zeros((len(rows), len(chosen.names))), np.zeros(len(chosen.codes))
    for block_rows, block in selection.read(handle, key):
        at = position[block_rows.start:block_rows.stop]
        block = block[at >= 0].astype(np.float64)
        per_target[at[at >= 0]] = membership.T.dot(block.T).T
        row_sum += block.sum(axis=0)
    return GroupScores(key, chosen.origin, rows.tolist(), list(chosen.names), chosen.sizes().tolist(),
                       per_target, target_set_calibration(handle, key, rows, row_sum / len(rows)))


def predicted_change(scores: GroupScores, drop: Sequence[str] = (), keep: Sequence[str] = ()) -> np.ndarray:
    """Per chosen target, the predicted change of its output if the groups `drop` were removed
    from the train set, or if only the groups `keep` were kept: minus the removed groups' scores."""
    if bool(drop) == bool(keep):
        raise UserError("give the groups to drop (`drop_group`) or to keep (`keep_groups`), not both")
    where = group_positions(scores.names, list(drop or keep))
    removed = where if drop else np.setdiff1d(np.arange(len(scores.names)), where)
    return -scores.per_target[:, removed].sum(axis=1)


@dataclass
class GroupPrediction:
    """The predicted change of every scored target's output (`change`) for a change of the
    train set's groups, from the scores `scores`, and its mean over the targets, calibrated where
    the calibration is usable."""

    scores: str
    change: np.ndarray
    calibration: Calibration | None

    @property
    def mean_change(self) -> float:
        return float(self.change.mean())

    @property
    def calibrated_mean_change(self) -> float | None:
        calibration = self.calibration
        return calibration.slope * self.mean_change if calibration is not None and calibration.usable else None

    def as_dict(self) -> dict:
        return {"scores": self.scores, "predicted_change": self.change.tolist(), "mean_predicted_change": self.mean_change,
                "mean_calibrated_change": self.calibrated_mean_change,
                "calibration": None if self.calibration is None else asdict(self.calibration)}


def predict_groups(
    store: str | Path,
    drop: Sequence[str] = (),
    keep: Sequence[str] = (),
    groups: Groups | str | Path | None = None,
    selection: Selection = Selection(),
) -> GroupPrediction:
    """The predicted change of every scored target's output if the groups `drop` were removed
    from the train set, or if only the groups `keep` were kept."""
    scores = group_scores(store, groups, selection)
    return GroupPrediction(scores.scores, predicted_change(scores, drop, keep), scores.calibration)
