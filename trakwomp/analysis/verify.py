"""`verify`: retrain without the train examples the scores name, and see whether the target's f
moves as they predict.

For a target set Z (one target or many), train examples are ranked by their mean score over Z,
s_i = mean_{z in Z} tau_i(z) (or by a baseline's scores, `method`). verify retrains the model with
the store's recorded recipe, task and model on the whole train set (less the groups the recipe
excludes), N seeds under each condition:

    none        nothing removed: what every other condition is compared with
    supporters  the K examples of largest s_i removed
    opposers    the K examples of smallest s_i removed
    random      K examples drawn at random removed, a new draw per seed (the control)
    group       with `group`: the group's members removed (random then draws as many)

Run s of every condition starts from the same initialisation (the runs are paired by seed). The
actual change of f(z) under a condition is the mean over seeds of d_s = f_cond,s(z) - f_none,s(z),
with the 95% t-interval of the N differences; the predicted change is minus the removed examples'
scores, -sum_{i in R} tau_i(z) (the datamodel f_z(S) = sum_{i in S} tau_i(z) + c_z), and that times
the LDS models' slope where the store has LDS models on these targets (`Calibration`). The sign
and order hold when removing the supporters lowers f more than removing random examples does and
removing the opposers raises it more (a group: f moves against random removal as predicted).

Units are (condition, seed) runs, `verify/<targets>/<removal>/<seed>`: the removed positions and
f on every scored target. A run is named by what it removes (a hash of the set, or random-k<K>),
so verifies of one target set that remove the same examples share their runs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from PIL import Image, ImageDraw, ImageFont

from trakwomp.analysis.baselines import BASELINES, BaselineInputs
from trakwomp.analysis.groups import Calibration, target_rows, target_set_calibration
from trakwomp.data.base import Dataset, load_batch
from trakwomp.data.groups import Groups
from trakwomp.errors import UserError
from trakwomp.features.memory import check_dense_fits
from trakwomp.models.spec import ModelSpec
from trakwomp.outputs import check_output, write_atomically
from trakwomp.runtime import Progress, torch_seed
from trakwomp.settings import option
from trakwomp.stages.bindings import (
    as_trained,
    check_groups,
    check_model_bound,
    choose_groups,
    refuse_transform,
    stored_dataset,
    stored_task,
)
from trakwomp.stages.fit import fit, model_outputs, steps_per_epoch
from trakwomp.stages.recipe import Recipe, torch_threads
from trakwomp.stages.selection import Selection, featurized_models
from trakwomp.stages.skeleton import Plan, RunSettings, Stage, Work
from trakwomp.stages.train import examples_per_epoch
from trakwomp.store import Store, paths
from trakwomp.tasks.base import Task

STAGE = "verify"
SEED_CODE = 3  # the third entry of a run's SeedSequence (train's roles are 0, 1 and 2)
TRAK = "trak"


def run_seed(recipe_seed: int, seed: int) -> int:
    """The torch seed of verify's run `seed` (the same under every condition: runs are paired)."""
    return torch_seed(recipe_seed, SEED_CODE, seed)


def random_removal(pool: np.ndarray, size: int, recipe_seed: int, seed: int) -> np.ndarray:
    """The random condition's removed positions in run `seed`: `size` of `pool`, sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([recipe_seed, SEED_CODE, seed, size]))
    return np.sort(pool[rng.permutation(len(pool))[:size]])


@dataclass(frozen=True)
class Condition:
    """What a condition removes: `chosen` (sorted positions), or `size` random ones per seed."""

    name: str
    size: int
    chosen: np.ndarray | None = field(default=None, compare=False)

    @property
    def removal(self) -> str:
        """The name of its runs' folder: what they remove."""
        if self.chosen is None:
            return f"random-k{self.size:06d}"
        if not len(self.chosen):
            return "none"
        return "set-" + hashlib.sha256(self.chosen.astype("<i8").tobytes()).hexdigest()[:16]

    def removed(self, pool: np.ndarray, recipe_seed: int, seed: int) -> np.ndarray:
        return random_removal(pool, self.size, recipe_seed, seed) if self.chosen is None else self.chosen


@dataclass(frozen=True, kw_only=True)
class VerifySettings(RunSettings):
    """What `verify` removes, how often it retrains, and which scores it checks."""

    k: int = option(50, "K: train examples removed per condition (supporters, opposers, random).")
    seeds: int = option(3, "N: training runs per condition, paired by seed.")
    method: str = option(TRAK, "What ranks the removals: trak (the stored scores) or a baseline (gradcos, repsim, "
                               "bm25), so that their counterfactuals can be compared side by side.")
    group: str | None = option(None, "Remove this group's members (instead of the top K); random removal then "
                                     "draws as many.")
    groups: Groups | str | Path | None = option(None, "The train examples' groups (Groups, or a groups file) "
                                                      "(default: the store's, else the sources of text data).")
    target: tuple[int, ...] = option((), "Targets (positions in the scored targets).")
    target_set: str | Path | None = option(None, "An .npy of scored target positions, or a boolean mask over them.")
    selection: Selection = option(Selection(), "Which stored scores predict the changes.")
    out: str | Path | None = option(None, "Draw each target's predicted against its actual changes to this .png.")


@dataclass(frozen=True)
class VerifyPlan(Plan):
    """The data as trained on, the scored targets, the chosen rows and their (thresholded)
    scores, the conditions, the examples the recipe trains on (`pool`), and the cost."""

    data: Dataset
    targets: Dataset
    task: Task
    model: ModelSpec
    recipe: Recipe
    key: str
    targets_id: str
    rows: np.ndarray
    tau: np.ndarray  # (rows, n_train) float64
    conditions: tuple[Condition, ...]
    pool: np.ndarray
    runs_left: int  # of this shard's
    seconds_per_run: float


@dataclass
class ConditionResult:
    """A condition's actual and predicted changes of f, per target and for the target set's mean."""

    condition: str
    removed: int
    actual: list[float]
    low: list[float | None]
    high: list[float | None]
    predicted: list[float]
    calibrated: list[float] | None
    mean_actual: float
    mean_low: float | None
    mean_high: float | None
    mean_predicted: float
    mean_calibrated: float | None


@dataclass
class VerifyReport:
    """What verify did (this shard's runs) and, once every run of every shard is done, what it
    found (`conditions`, `holds`, `correlation`)."""

    scores: str
    method: str
    targets: list[int]
    k: int
    seeds: int
    group: str | None
    runs: int
    runs_done: int = 0
    runs_skipped: int = 0
    estimated_seconds: float = 0.0
    conditions: list[ConditionResult] = field(default_factory=list)
    holds: dict[str, list[bool]] = field(default_factory=dict)  # check -> per target, then the set's mean last
    correlation: float | None = None
    calibration: Calibration | None = None

    @property
    def complete(self) -> bool:
        return bool(self.conditions)

    def as_dict(self) -> dict:
        return {**asdict(self), "complete": self.complete}


Run = tuple[Condition, int]  # a unit: (condition, seed)


class Verify(Stage[VerifyPlan, Run, VerifyReport]):
    """Units: run `seed` of each condition (seed by seed), trained without what it removes."""

    stage = STAGE
    settings: VerifySettings

    def __init__(self, settings: VerifySettings, model: ModelSpec | None = None):
        super().__init__(settings)
        self.model = model

    def check(self, store: str | Path) -> VerifyPlan:
        settings = self.settings
        if settings.seeds < 1 or settings.k < 1:
            raise UserError("`seeds` and `k` must be at least 1")
        if settings.method != TRAK and settings.method not in BASELINES.names():
            raise UserError(f"unknown `method` {settings.method!r}: expected {TRAK} or a baseline "
                            f"({', '.join(BASELINES.names())})")
        if settings.group is not None and settings.method != TRAK:
            raise UserError("give `group` or `method`: a group is removed whole, not ranked")
        if not settings.target and settings.target_set is None and settings.group is None:
            raise UserError("choose what to verify: `target`, `target_set` or `group`")
        check_output("`out`", settings.out, (".png",), store, "verify draws a PNG of predicted against actual changes")
        handle = Store.open(store)
        recorded = handle.manifest.train_reference
        if recorded is None:
            raise UserError(f"store {handle.location!r} records no training recipe (its models were not trained by "
                            "`trakwomp train`: checkpoints given to featurize); verify retrains with that recipe")
        try:
            recipe = Recipe(**recorded.json)
        except TypeError:
            raise handle.damaged("its reference recipe (fields this trakwomp does not know)") from None
        key = self.settings.selection.key(handle)
        model = self.checked_model(handle)
        data, task = as_trained(handle, stored_dataset(handle)), stored_task(handle)
        rows = target_rows(handle.array(paths.scores(key)).shape[0], list(settings.target) or None, settings.target_set)
        tau = self.target_scores(handle, key, rows)
        pool, conditions = self.chosen_conditions(handle, data, recipe, tau, key, rows)
        targets_id = handle.manifest.scores[key].targets
        left = [run for run in settings.shard.select(runs(conditions, settings.seeds))
                if handle.done_info(STAGE, run_name(targets_id, run)) is None]
        seconds = seconds_per_run(data, pool, settings.k, model, task, recipe, self.device) if left else 0.0
        return VerifyPlan(data, self.settings.selection.scored_targets(handle, key), task, model, recipe, key,
                          targets_id, rows, tau, conditions, pool, len(left), seconds,
                          existing=handle)

    def checked_model(self, handle: Store) -> ModelSpec:
        refuse_transform(handle, "verify")
        model = self.model or ModelSpec.of_store(handle.manifest.model_record(), handle.location)
        check_model_bound(handle, model, None)
        return model

    def target_scores(self, handle: Store, key: str, rows: np.ndarray) -> np.ndarray:
        """The chosen targets' scores, soft-thresholded as selected, (rows, n_train) float64."""
        n = handle.manifest.num_examples
        check_dense_fits(16 * len(rows) * n, f"the scores of {len(rows)} targets x {n} train examples",
                         "choose fewer targets")
        position = np.full(handle.array(paths.scores(key)).shape[0], -1)
        position[rows] = np.arange(len(rows))
        tau = np.zeros((len(rows), n))
        for block_rows, block in self.settings.selection.read(handle, key):
            at = position[block_rows.start:block_rows.stop]
            tau[at[at >= 0]] = block[at >= 0]
        return tau

    def chosen_conditions(self, handle: Store, data: Dataset, recipe: Recipe, tau: np.ndarray, key: str,
                          rows: np.ndarray) -> tuple[np.ndarray, tuple[Condition, ...]]:
        """The examples the recipe trains on, and the conditions: none, then supporters, opposers
        and random (K each), or the group and random (as many)."""
        settings, n = self.settings, len(data)
        groups = None
        if recipe.exclude_groups or settings.group is not None:
            groups = choose_groups(handle, settings.groups, n, lambda: data)
            check_groups(handle, groups)
        pool = np.arange(n)
        if groups is not None and recipe.exclude_groups:
            pool = np.flatnonzero(~groups.members(groups.positions(list(recipe.exclude_groups))))
        none = Condition("none", 0, np.zeros(0, np.int64))
        if settings.group is not None:
            assert groups is not None, "choose_groups gives the groups when a group is named"
            if settings.group in recipe.exclude_groups:
                raise UserError(f"`group` {settings.group!r} is one the recipe excludes: no model trains on it")
            members = np.flatnonzero(groups.members(groups.positions([settings.group])))
            check_removal(len(members), len(pool), f"group {settings.group!r} has {len(members)} examples; it")
            return pool, (none, Condition("group", len(members), members), Condition("random", len(members)))
        check_removal(settings.k, len(pool), f"`k` ({settings.k})")
        ranking = tau.mean(axis=0) if settings.method == TRAK else \
            baseline_ranking(handle, settings.method, key, rows, featurized_models(handle, settings.selection.models),
                             self.device)
        order = pool[np.argsort(-ranking[pool], kind="stable")]
        return pool, (none, Condition("supporters", settings.k, np.sort(order[:settings.k])),
                      Condition("opposers", settings.k, np.sort(order[-settings.k:])),
                      Condition("random", settings.k))

    def bind(self, handle: Store, plan: VerifyPlan) -> VerifyPlan:
        names = sorted({run_name(plan.targets_id, run) for run in runs(plan.conditions, self.settings.seeds)})
        experiment = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        record = paths.verify_experiment(plan.targets_id, experiment)
        if handle.read_record(record) != {"runs": names}:  # a finished verify reads only (a read-only store too)
            handle.write_record(record, {"runs": names})
        return plan

    def work(self, plan: VerifyPlan) -> Work[Run]:
        units = runs(plan.conditions, self.settings.seeds)
        cost = f"{len(units)} training runs ({len(plan.conditions)} conditions x {self.settings.seeds} seeds)"
        if plan.runs_left:
            here = " here" if self.settings.shard.count > 1 else ""
            cost += f", {plan.runs_left} to do{here}, about {plan.runs_left * plan.seconds_per_run / 60:.1f} min"
        return Work(units, lambda run: run_name(plan.targets_id, run), f"verify: {cost}",
                    [paths.verify_folder(plan.targets_id), paths.done(STAGE, plan.targets_id)])

    def start(self, handle: Store, plan: VerifyPlan, owned: list[Run], todo: list[Run]) -> VerifyReport:
        settings = self.settings
        return VerifyReport(plan.key, settings.method, plan.rows.tolist(), settings.k, settings.seeds, settings.group,
                            len(runs(plan.conditions, settings.seeds)), runs_skipped=len(owned) - len(todo),
                            estimated_seconds=plan.runs_left * plan.seconds_per_run)

    def do(self, handle: Store, plan: VerifyPlan, todo: list[Run], report: VerifyReport, progress: Progress):
        for condition, seed in todo:
            name = f"{condition.name} run {seed}"
            started = time.perf_counter()
            removed, outputs = self.retrained(plan, condition, seed, name, progress)
            folder = paths.verify_run_folder(run_name(plan.targets_id, (condition, seed)))
            handle.write_array(f"{folder}/removed", removed.astype(np.int64))
            handle.write_array(paths.outputs(folder), outputs)
            seconds = time.perf_counter() - started
            yield (condition, seed), {"removed": len(removed)}  # no timing: a rerun leaves the same store
            report.runs_done += 1
            progress.unit_finished(name, f"{len(removed)} removed, {seconds:.1f} s")

    def retrained(self, plan: VerifyPlan, condition: Condition, seed: int, name: str,
                  progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """The removed positions, and f on every scored target of the model trained without them."""
        recipe = plan.recipe
        removed = condition.removed(plan.pool, recipe.seed, seed)
        positions = np.setdiff1d(plan.pool, removed)
        torch_seed = run_seed(recipe.seed, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            net = plan.model.build(plan.task.output_size(plan.data))
        progress.unit_started(name, recipe.epochs * examples_per_epoch(len(positions), recipe))
        with torch_threads(recipe.threads):
            fit(net, plan.data, positions, recipe, plan.task, torch.Generator().manual_seed(torch_seed), self.device,
                progress)
            outputs, _ = model_outputs(net, plan.targets, plan.task, self.device)
        return removed, outputs

    def finish(self, plan: VerifyPlan, report: VerifyReport) -> VerifyReport:
        handle = plan.existing
        assert handle is not None, "check opens the store"
        names = [run_name(plan.targets_id, run) for run in runs(plan.conditions, self.settings.seeds)]
        if all(handle.done_info(STAGE, name) is not None for name in names):
            findings(handle, plan, report)
            if self.settings.out is not None:
                draw_changes(report, self.settings.out)
        return report


def runs(conditions: tuple[Condition, ...], seeds: int) -> list[Run]:
    """Every run, seed by seed (a run cut short leaves whole seeds done first)."""
    return [(condition, seed) for seed in range(seeds) for condition in conditions]


def run_name(targets_id: str, run: Run) -> str:
    condition, seed = run
    return paths.verify_run(targets_id, condition.removal, seed)


def check_removal(size: int, pool: int, what: str) -> None:
    if size >= pool:
        raise UserError(f"{what} must be smaller than the {pool} train examples the recipe trains on")


def baseline_ranking(handle: Store, method: str, key: str, rows: np.ndarray, model_ids: list[int],
                     device: torch.device) -> np.ndarray:
    """The mean over the chosen targets of a baseline's scores (`method`), (n_train,)."""
    entry = handle.manifest.targets[handle.manifest.scores[key].targets]
    n = handle.manifest.num_examples
    inputs = BaselineInputs(handle, model_ids, entry.sha256, entry.num_examples, n, device)
    total, chosen = np.zeros(n), set(rows.tolist())
    for block_rows, block in BASELINES.get(method).chunks(inputs)():
        at = [i for i, row in enumerate(block_rows) if row in chosen]
        total += block[at].sum(axis=0)
    return total / len(rows)


def seconds_per_run(data: Dataset, pool: np.ndarray, k: int, model: ModelSpec, task: Task, recipe: Recipe,
                    device: torch.device) -> float:
    """A run's training time, estimated from two timed steps of the recipe (after one that warms
    up): steps per run x seconds per step; evaluation and data loading beyond a batch left out."""
    with torch.random.fork_rng(devices=[]):
        net = model.build(task.output_size(data)).to(device).train()
    optimizer = recipe.make_optimizer(net)
    batch = load_batch(data, pool[:recipe.batch_size]).to(device)
    times = []
    with torch_threads(recipe.threads), torch.random.fork_rng(devices=[]):
        for _ in range(3):
            started = time.perf_counter()
            loss = task.loss(net(*batch.inputs), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
    return recipe.epochs * steps_per_epoch(len(pool) - k, recipe.batch_size) * float(np.mean(times[1:]))


def t_interval(differences: np.ndarray) -> tuple[np.ndarray, list[float | None], list[float | None]]:
    """Per column, the mean of the rows (seeds) and its two-sided 95% t-interval (None for one seed)."""
    mean = differences.mean(axis=0)
    if len(differences) < 2:
        return mean, [None] * len(mean), [None] * len(mean)
    half = scipy.stats.t.ppf(0.975, len(differences) - 1) * differences.std(axis=0, ddof=1) / np.sqrt(len(differences))
    return mean, (mean - half).tolist(), (mean + half).tolist()


def condition_result(name: str, removed: int, actual: np.ndarray, predicted: np.ndarray,
                     calibration: Calibration | None) -> ConditionResult:
    """A condition's result from its per-seed actual and predicted changes, (seeds, targets)."""
    mean, low, high = t_interval(actual)
    set_mean, set_low, set_high = t_interval(actual.mean(axis=1, keepdims=True))
    prediction = predicted.mean(axis=0)
    slope = calibration.slope if calibration is not None and calibration.usable else None
    return ConditionResult(name, removed, mean.tolist(), low, high, prediction.tolist(),
                           None if slope is None else (slope * prediction).tolist(), float(set_mean[0]), set_low[0],
                           set_high[0], float(prediction.mean()), None if slope is None else slope * float(prediction.mean()))


def findings(handle: Store, plan: VerifyPlan, report: VerifyReport) -> None:
    """The conditions' results, the checks of sign and order and the correlation of predicted and
    actual changes (over targets and conditions), from the stored runs."""
    seeds = range(report.seeds)

    def stored(condition: Condition) -> tuple[np.ndarray, list[np.ndarray]]:
        folders = [paths.verify_run_folder(run_name(plan.targets_id, (condition, s))) for s in seeds]
        return (np.stack([handle.read_array(paths.outputs(f))[plan.rows] for f in folders]).astype(np.float64),
                [handle.read_array(f"{f}/removed") for f in folders])

    base, _ = stored(plan.conditions[0])
    report.calibration = target_set_calibration(handle, plan.key, plan.rows, plan.tau.mean(axis=0))
    for condition in plan.conditions[1:]:
        outputs, removed = stored(condition)
        predicted = np.stack([-plan.tau[:, r].sum(axis=1) for r in removed])
        report.conditions.append(condition_result(condition.name, condition.size, outputs - base, predicted,
                                                  report.calibration))
    report.holds = order_checks({c.condition: c for c in report.conditions})
    actual = np.concatenate([c.actual for c in report.conditions])
    predicted = np.concatenate([c.predicted for c in report.conditions])
    if len(actual) > 2 and np.ptp(actual) > 0 and np.ptp(predicted) > 0:
        report.correlation = float(np.corrcoef(predicted, actual)[0, 1])


def order_checks(results: dict[str, ConditionResult]) -> dict[str, list[bool]]:
    """Per target, then for the set's mean: supporters' removal lowers f more than random removal,
    opposers' raises it more; a group's moves f against random removal in the predicted direction."""
    random = results["random"]

    def per_target(name: str, holds) -> list[bool]:
        chosen = results[name]
        pairs = zip(chosen.actual + [chosen.mean_actual], random.actual + [random.mean_actual],
                    chosen.predicted + [chosen.mean_predicted], random.predicted + [random.mean_predicted], strict=True)
        return [bool(holds(*pair)) for pair in pairs]

    if "group" in results:
        return {"group_moves_as_predicted": per_target("group", lambda a, ra, p, rp: np.sign(a - ra) == np.sign(p - rp))}
    return {"supporters_lower_than_random": per_target("supporters", lambda a, ra, p, rp: a < ra),
            "opposers_higher_than_random": per_target("opposers", lambda a, ra, p, rp: a > ra)}


COLOURS = {"supporters": (59, 111, 182), "opposers": (217, 130, 43), "random": (128, 128, 128),
           "group": (59, 111, 182)}
PLOT = 560  # pixels: the side of the plot area


def draw_changes(report: VerifyReport, png: str | Path) -> None:
    """A scatter of each target's predicted change (calibrated where it can be) against its actual
    change, one colour per condition, with the zero lines and the diagonal."""
    calibrated = report.conditions[0].calibrated is not None
    points = [(c.condition, p, a) for c in report.conditions
              for p, a in zip(c.calibrated if c.calibrated is not None else c.predicted, c.actual, strict=True)]
    xs, ys = np.array([p for _, p, _ in points]), np.array([a for _, _, a in points])
    span = max(float(np.abs(xs).max()), 1e-30), max(float(np.abs(ys).max()), 1e-30)
    if calibrated:
        span = (max(span), max(span))  # one scale: the diagonal is predicted = actual
    left, top = 70, 60
    image = Image.new("RGB", (left + PLOT + 40, top + PLOT + 90), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()

    def at(x: float, y: float) -> tuple[float, float]:
        return left + PLOT / 2 * (1 + x / span[0] / 1.05), top + PLOT / 2 * (1 - y / span[1] / 1.05)

    which = f"target {report.targets[0]}" if len(report.targets) == 1 else f"{len(report.targets)} targets"
    draw.text((8, 6), f"verify: {which}, K = {report.k}, {report.seeds} seeds, removals ranked by {report.method}",
              fill="black", font=font)
    draw.text((8, 22), f"x: predicted change of f ({'calibrated' if calibrated else 'score units'}); "
                       f"y: actual change (mean over seeds); scores/{report.scores}", fill="black", font=font)
    draw.rectangle([left, top, left + PLOT, top + PLOT], outline="black")
    draw.line([*at(-span[0] * 1.05, 0), *at(span[0] * 1.05, 0)], fill=(200, 200, 200))
    draw.line([*at(0, -span[1] * 1.05), *at(0, span[1] * 1.05)], fill=(200, 200, 200))
    if calibrated:
        draw.line([*at(-span[0], -span[0]), *at(span[0], span[0])], fill=(120, 180, 120))
    for condition, x, y in points:
        cx, cy = at(x, y)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=COLOURS[condition])
    for row, name in enumerate(c.condition for c in report.conditions):
        draw.ellipse([left, top + PLOT + 16 + 16 * row, left + 8, top + PLOT + 24 + 16 * row], fill=COLOURS[name])
        draw.text((left + 14, top + PLOT + 14 + 16 * row), f"{name} removed", fill="black", font=font)
    draw.text((left + 180, top + PLOT + 14), f"x from {-span[0]:+.3g} to {span[0]:+.3g}; "
                                             f"y from {-span[1]:+.3g} to {span[1]:+.3g}", fill="black", font=font)
    write_atomically(png, lambda f: image.save(f, format="PNG"))


def verify(store: str | Path, *, model: ModelSpec | None = None, progress: Progress | None = None,
           **settings) -> VerifyReport:
    """Retrain the store's model without the K train examples that most support the chosen
    targets, without the K that most oppose them, without K random ones, and without none (or
    without a group, and as many random ones), N seeds each, and compare the actual changes of
    f with those the scores predict (see the module docstring). `settings`: `VerifySettings`'
    fields by keyword (k, seeds, method, group, groups, target, target_set, selection, out, device,
    shard).
    The findings are filled in once every run (of every shard) is done."""
    return Verify(VerifySettings(**settings), model).run(store, progress)
