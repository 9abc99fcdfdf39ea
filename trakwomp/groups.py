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

import csv
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse
import scipy.stats

from trakwomp.bindings import stored_dataset
from trakwomp.data import Dataset, load_indices, read_npy
from trakwomp.errors import UserError
from trakwomp.estimator import DEFAULT_THRESHOLD, ViewSpec
from trakwomp.lds_models import GroundTruth
from trakwomp.store import Store
from trakwomp.stored_scores import find_view_scores, iterate_scores

GROUPS_HELP = "an .npy of one label per train example, or a CSV of index,group rows"


@dataclass(frozen=True, eq=False)
class Groups:
    """`names` (sorted, distinct) and `codes[i]`, the position in `names` of train example i's group."""

    names: tuple[str, ...]
    codes: np.ndarray
    origin: str

    @classmethod
    def from_labels(cls, labels, origin: str) -> "Groups":
        """Groups from one label per train example (any values; compared as text)."""
        text = np.asarray([str(label) for label in labels])
        names, codes = np.unique(text, return_inverse=True)
        return cls(tuple(str(name) for name in names), codes.astype(np.int32), origin)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256("\0".join(self.names).encode("utf-8") + b"\1")
        digest.update(self.codes.astype("<i4").tobytes())
        return digest.hexdigest()

    def record(self) -> dict:
        return {"names": list(self.names), "num_examples": len(self.codes), "sha256": self.sha256,
                "origin": self.origin}

    def sizes(self) -> np.ndarray:
        return np.bincount(self.codes, minlength=len(self.names))

    def positions(self, names: list[str]) -> np.ndarray:
        return group_positions(self.names, names)

    def members(self, positions: np.ndarray) -> np.ndarray:
        """A boolean mask over the train set: the members of the groups at `positions`."""
        return np.isin(self.codes, positions)

    def membership(self) -> scipy.sparse.csr_matrix:
        """The (n_train, n_groups) 0/1 matrix with a 1 at (i, group of i)."""
        n = len(self.codes)
        return scipy.sparse.csr_matrix((np.ones(n, np.float64), (np.arange(n), self.codes)),
                                       shape=(n, len(self.names)))


def group_positions(all_names: tuple[str, ...] | list[str], names: list[str]) -> np.ndarray:
    """The positions of `names` in `all_names`; an unknown name is refused."""
    where = {name: g for g, name in enumerate(all_names)}
    unknown = [name for name in names if name not in where]
    if unknown:
        listed = ", ".join(all_names[:8]) + (", ..." if len(all_names) > 8 else "")
        raise UserError(f"unknown group {unknown[0]!r}: the {len(all_names)} groups are {listed}")
    return np.array([where[name] for name in names], dtype=np.int64)


def read_groups_file(path: str | Path, num_examples: int) -> Groups:
    """Groups from an .npy of one label per train example, or a CSV of index,group rows (a header
    row is allowed); a wrong length, a missing or repeated example, or an empty label is refused."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        labels = read_npy(path, "groups file")
        if labels.ndim != 1 or labels.dtype.kind not in "iuUSb":
            raise UserError(f"groups file {str(path)!r} must hold a 1-d array of integer or text labels, "
                            f"got {labels.dtype} {labels.shape}")
        if len(labels) != num_examples:
            raise UserError(f"groups file {str(path)!r} has {len(labels)} labels for the {num_examples} train examples")
        labels = [label.decode() if isinstance(label, bytes) else label for label in labels.tolist()]
        empty = [i for i, label in enumerate(labels) if str(label).strip() == ""]
    elif path.suffix.lower() == ".csv":
        labels, empty = read_groups_csv(path, num_examples)
    else:
        raise UserError(f"groups file {str(path)!r} must be {GROUPS_HELP} (.npy or .csv)")
    if empty:
        raise UserError(f"groups file {str(path)!r} has no group for {len(empty)} of the {num_examples} train "
                        f"examples (first: {empty[0]})")
    return Groups.from_labels(labels, str(path))


def read_groups_csv(path: Path, num_examples: int) -> tuple[list[str], list[int]]:
    """(label per train example, the examples without one) from a CSV of index,group rows."""
    labels: list[str | None] = [None] * num_examples
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if line == 1 and row and not row[0].strip().lstrip("-").isdigit():
                    continue  # a header
                if len(row) != 2 or not row[0].strip().lstrip("-").isdigit():
                    raise UserError(f"groups file {str(path)!r} line {line}: expected index,group, got {','.join(row)!r}")
                index = int(row[0])
                if not 0 <= index < num_examples:
                    raise UserError(f"groups file {str(path)!r} line {line}: index {index} is outside the train set "
                                    f"(0 to {num_examples - 1})")
                if labels[index] is not None:
                    raise UserError(f"groups file {str(path)!r} line {line}: train example {index} is given twice")
                labels[index] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read groups file {str(path)!r}: {e}") from None
    return labels, [i for i, label in enumerate(labels) if not label]


def sources_of(data: Dataset) -> Groups:
    """Groups from the sources of a text dataset; refused if some text has none."""
    source = getattr(data, "source", None)
    if source is None:
        raise UserError(f"{data.spec} has no sources; pass --groups FILE ({GROUPS_HELP})")
    labels = [source(i) for i in range(len(data))]
    missing = [i for i, label in enumerate(labels) if not label]
    if missing:
        raise UserError(f"{len(missing)} of the {len(data)} texts of {data.spec} have no source (first: {missing[0]}); "
                        f"pass --groups FILE ({GROUPS_HELP})")
    return Groups.from_labels(labels, f"sources of {data.spec}")


def stored_groups(handle: Store) -> Groups | None:
    recorded = handle.manifest.get("groups")
    if recorded is None:
        return None
    codes = handle.read_array("groups/codes")
    groups = Groups(tuple(recorded["names"]), codes, recorded["origin"])
    if groups.sha256 != recorded["sha256"]:
        raise handle.damaged("its groups (groups/codes does not match the recorded SHA-256)")
    return groups


def check_groups(handle: Store, groups: Groups) -> None:
    """Refuse `groups` that do not cover the store's train set or differ from those it records."""
    recorded = handle.manifest.get("groups")
    num_examples = handle.manifest.get("dataset", {}).get("num_examples", len(groups.codes))
    if len(groups.codes) != num_examples:
        raise UserError(f"the groups ({groups.origin}) cover {len(groups.codes)} examples, but the store's train set "
                        f"has {num_examples}")
    if recorded is not None and recorded["sha256"] != groups.sha256:
        raise UserError(f"the groups of {groups.origin} ({len(groups.names)} groups) differ from those store "
                        f"{handle.location!r} records ({recorded['origin']}, {len(recorded['names'])} groups); "
                        "leave out --groups to use the store's, or use a new store")


def bind_groups(handle: Store, groups: Groups) -> None:
    """Record `groups` in the store, or check them against those it records."""
    check_groups(handle, groups)
    if "groups" not in handle.manifest:
        handle.write_array("groups/codes", groups.codes)
        handle.set_section("groups", groups.record())


def choose_groups(handle: Store | None, given: Groups | str | Path | None, num_examples: int,
                  data: Callable[[], Dataset]) -> Groups:
    """The groups of a train set of `num_examples`: `given` (Groups, or a groups file) if any,
    else those the store records, else the sources of the train set (`data()`, called only
    then). Nothing is recorded."""
    if isinstance(given, (str, Path)):
        return read_groups_file(given, num_examples)
    if given is not None:
        return given
    recorded = stored_groups(handle) if handle is not None else None
    return recorded if recorded is not None else sources_of(data())


def resolve_groups(handle: Store, given: Groups | str | Path | None) -> Groups:
    """The groups of a store's train set (see `choose_groups`), recorded in the store."""
    groups = choose_groups(handle, given, handle.manifest["dataset"]["num_examples"],
                           lambda: stored_dataset(handle, verify=False))
    bind_groups(handle, groups)
    return groups


def parse_group_names(values: list[str]) -> list[str]:
    """Group names from repeated options, each a name or a comma-separated list of names."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise UserError(f"a group is named twice in {', '.join(names)}")
    return names


def target_rows(num_targets: int, chosen: list[int] | None = None, target_set: str | Path | None = None) -> np.ndarray:
    """Positions of the chosen scored targets: `chosen`, or an .npy (indices or a boolean mask
    over the scored targets), or all of them."""
    if chosen and target_set is not None:
        raise UserError("give --target or --target-set, not both")
    if target_set is not None:
        values = load_indices(target_set, "--target-set")
        if values.dtype == bool:
            if values.shape != (num_targets,):
                raise UserError(f"--target-set mask has {len(values)} entries for the {num_targets} scored targets")
            values = np.flatnonzero(values)
        if not len(values):
            raise UserError("--target-set chooses no target")
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
        fit = scipy.stats.linregress(predicted, actual)
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
    recorded = handle.manifest.get("lds_targets")
    if recorded is None or recorded["sha256"][:16] != handle.manifest["scores"][key]["targets"]:
        return None, False
    for by_group in (True, False):
        if handle.done_units("train", "lds-groups" if by_group else "lds"):
            return GroundTruth.from_store(handle, by_group), by_group
    return None, False


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
    targets: Dataset | None = None,
    view: ViewSpec = ViewSpec(),
    models: list[int] | None = None,
    chosen_targets: list[int] | None = None,
    target_set: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> GroupScores:
    """Each group's score for each chosen target (default: every scored target), from the stored
    scores of the view and models (`targets`: which scored target set, if several are), and the
    calibration of predictions on those targets by the store's LDS models (see `Calibration`).
    `groups`: Groups or a groups file; default the store's, else the train set's sources."""
    handle = Store.open(store)
    key = find_view_scores(handle, targets, view, models)
    chosen = resolve_groups(handle, groups)
    num_targets = handle.array(f"scores/{key}/tau").shape[0]
    rows = target_rows(num_targets, chosen_targets, target_set)
    membership, chosen_rows = chosen.membership(), np.isin(np.arange(num_targets), rows)
    totals, row_sum = [], np.zeros(len(chosen.codes))
    for block_rows, block in iterate_scores(handle, key, threshold):
        block = block.astype(np.float64)
        totals.append(membership.T.dot(block.T).T)
        row_sum += block[chosen_rows[block_rows.start:block_rows.stop]].sum(axis=0)
    truth, by_group = calibration_truth(handle, key)
    calibration = None
    if truth is not None:  # model j's prediction, averaged over the chosen targets: mask_j . (their mean scores)
        calibration = Calibration.fit(truth.masks @ (row_sum / len(rows)), truth.margins[:, rows].mean(axis=1), by_group)
    return GroupScores(key, chosen.origin, rows.tolist(), list(chosen.names), chosen.sizes().tolist(),
                       np.concatenate(totals)[rows], calibration)


def predicted_change(scores: GroupScores, drop: list[str] = (), keep: list[str] = ()) -> np.ndarray:
    """Per chosen target, the predicted change of its output if the groups `drop` were removed
    from the train set, or if only the groups `keep` were kept: minus the removed groups' scores."""
    if bool(drop) == bool(keep):
        raise UserError("give the groups to drop (--drop-group) or to keep (--keep-groups), not both")
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
        usable = self.calibration is not None and self.calibration.usable
        return self.calibration.slope * self.mean_change if usable else None

    def as_dict(self) -> dict:
        return {"scores": self.scores, "predicted_change": self.change.tolist(), "mean_predicted_change": self.mean_change,
                "mean_calibrated_change": self.calibrated_mean_change,
                "calibration": None if self.calibration is None else asdict(self.calibration)}


def predict_groups(
    store: str | Path,
    drop: list[str] = (),
    keep: list[str] = (),
    groups: Groups | str | Path | None = None,
    targets: Dataset | None = None,
    view: ViewSpec = ViewSpec(),
    models: list[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> GroupPrediction:
    """The predicted change of every scored target's output if the groups `drop` were removed
    from the train set, or if only the groups `keep` were kept."""
    scores = group_scores(store, groups, targets, view, models, threshold=threshold)
    return GroupPrediction(scores.scores, predicted_change(scores, drop, keep), scores.calibration)
