"""`train`: reference models and LDS evaluation models, each on its own random alpha-subset.

Model j of role r is a function of (recipe, r, j): its subset mask, its initialisation, its
data order and its augmentation all come from generators seeded by
SeedSequence([seed, role code, j]), so reference and LDS models never coincide and any unit can
be (re)trained by any process of any shard. Its subset mask is the same everywhere; its weights
are bitwise the same on CPUs of one kind with one torch version, since the recipe fixes the
thread count (`Recipe.threads`). Other CPUs, torch versions or CUDA round differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trakwomp.data.base import Dataset, TokenizedTexts, load_batch
from trakwomp.data.groups import Groups
from trakwomp.errors import UserError
from trakwomp.models.checkpoints import state_hash
from trakwomp.models.spec import ModelSpec, check_model_fits_data
from trakwomp.runtime import Progress, seed_of_sequence
from trakwomp.settings import option
from trakwomp.stages.bindings import (
    bind_groups,
    bind_model,
    bind_training_inputs,
    check_groups,
    choose_groups,
)
from trakwomp.stages.fit import fit, model_outputs
from trakwomp.stages.recipe import Recipe, torch_threads
from trakwomp.stages.skeleton import Plan, RunSettings, Stage, Work
from trakwomp.store import Store, paths
from trakwomp.tasks.base import Task
from trakwomp.tasks.classification import Classification

ROLES = {"reference": 0, "lds": 1, "lds-groups": 2}  # lds-groups: LDS models on random halves of the groups


@dataclass
class TrainReport:
    """What a `train` run did: the models it trained and skipped (done before), and each LDS
    model's summary on the targets."""

    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    summaries: dict[str, dict[int, float]] = field(default_factory=dict)  # the task's summary name -> per LDS model


def unit_generators(seed: int, role: str, index: int) -> tuple[np.random.Generator, int]:
    """The numpy generator for model (role, index)'s subset and the seed of its torch generator."""
    sequence = np.random.SeedSequence([seed, ROLES[role], index])
    mask_sequence, torch_sequence = sequence.spawn(2)
    return np.random.default_rng(mask_sequence), seed_of_sequence(torch_sequence)


def subset_mask(num_examples: int, alpha: float, rng: np.random.Generator,
                pool: np.ndarray | None = None) -> np.ndarray:
    """A boolean mask selecting exactly round(alpha * m) of the m examples `pool` (default: all
    n) uniformly at random."""
    pool = np.arange(num_examples) if pool is None else pool
    mask = np.zeros(num_examples, dtype=bool)
    mask[pool[rng.permutation(len(pool))[: max(1, round(alpha * len(pool)))]]] = True
    return mask


def training_mask(num_examples: int, recipe: Recipe, rng: np.random.Generator, groups: Groups | None) -> np.ndarray:
    """A model's train subset: an alpha-subset of the examples outside the excluded groups, or,
    with `group_alpha`, the members of round(group_alpha x G) of the G other groups at random."""
    if groups is None:
        return subset_mask(num_examples, recipe.alpha, rng)
    excluded = groups.positions(list(recipe.exclude_groups))
    if recipe.group_alpha is None:
        return subset_mask(num_examples, recipe.alpha, rng, np.flatnonzero(~groups.members(excluded)))
    kept = np.setdiff1d(np.arange(len(groups.names)), excluded)
    return groups.members(kept[rng.permutation(len(kept))[: max(1, round(recipe.group_alpha * len(kept)))]])


@dataclass(frozen=True, kw_only=True)
class TrainSettings(RunSettings):
    """Which models `train` trains, and how."""

    task: Task = option(Classification(), "What the models output and are trained for.")
    role: str = option("reference", "reference: models to attribute; lds: evaluation models.")
    num_models: int = option(1, "Number of models of this role (ids 0..M-1).")
    recipe: Recipe | None = option(None, "The training recipe (default: the task's).")
    groups: Groups | str | Path | None = option(None, "The train examples' groups (Groups, or a groups file) "
                                                      "(default: the store's, else the sources of text data).")


@dataclass(frozen=True)
class TrainPlan(Plan):
    """The train set as trained on (with the prompts' tokens with --train-on-prompt), the role's
    units (lds-groups for LDS models on halves of groups), the model's outputs, the groups."""

    data: Dataset
    role: str
    output_size: int
    groups: Groups | None


class Train(Stage[TrainPlan, int, TrainReport]):
    """Units: model j of the role, trained on its subset mask (see the module docstring)."""

    stage = "train"
    settings: TrainSettings

    def __init__(self, settings: TrainSettings, data: Dataset, model: ModelSpec, targets: Dataset | None = None):
        super().__init__(settings)
        self.data, self.model, self.targets = data, model, targets
        self.recipe = settings.recipe or Recipe.for_task(settings.task)
        self.task = settings.task

    def check(self, store: str | Path) -> TrainPlan:
        self.check_role()
        output_size = self.task.output_size(self.data)
        with torch.random.fork_rng(devices=[]):
            net = self.model.build(output_size)
        for examples in (self.data, self.targets) if self.targets is not None else (self.data,):
            check_model_fits_data(net, examples, self.device, self.model, self.task, output_size)
        if isinstance(self.targets, TokenizedTexts) and isinstance(self.data, TokenizedTexts) and \
                self.targets.tokenizer.record() != self.data.tokenizer.record():
            raise UserError("`targets` must be read with the train set's tokenizer")
        data = self.data.predicting_prompts() if self.recipe.train_on_prompt else self.data
        if self.recipe.augment:  # before anything is written: data the augmentation refuses
            data.augmented(load_batch(data, [0]), torch.Generator())
        existing = Store.open_existing(store)
        role = "lds-groups" if self.recipe.group_alpha is not None else self.settings.role
        return TrainPlan(data, role, output_size, self.chosen_groups(existing, data), existing=existing)

    def check_role(self) -> None:
        role, recipe = self.settings.role, self.recipe
        if role not in ("reference", "lds"):
            raise UserError(f"unknown `role` {role!r}: expected reference or lds")
        if recipe.group_alpha is not None and role != "lds":
            raise UserError("`group_alpha` is for `role` lds (LDS models on random halves of the groups)")
        if recipe.save_checkpoints > 1 and role != "reference":
            raise UserError("`save_checkpoints` is for reference models (LDS models keep only their outputs)")
        if self.settings.num_models < 1:
            raise UserError("`num_models` must be at least 1")
        if role == "lds" and self.targets is None:
            raise UserError("`role` lds needs `targets`: the examples whose outputs the LDS models are scored on")
        if role == "reference" and self.targets is not None:
            raise UserError("`targets` is only for `role` lds")

    def chosen_groups(self, existing: Store | None, data: Dataset) -> Groups | None:
        """The groups the recipe refers to (None if it refers to none), checked against the store's."""
        given, recipe = self.settings.groups, self.recipe
        if given is None and recipe.group_alpha is None and not recipe.exclude_groups:
            return None
        groups = choose_groups(existing, given, len(data), lambda: data)
        if len(groups.positions(list(recipe.exclude_groups))) == len(groups.names):
            raise UserError("`exclude_groups` names every group: no example is left to train on")
        if existing is not None and existing.manifest.dataset is not None:
            check_groups(existing, groups)
        return groups

    def open(self, store: str | Path, plan: TrainPlan) -> Store:
        return Store.open(store, create=True)

    def bind(self, handle: Store, plan: TrainPlan) -> TrainPlan:
        bind_training_inputs(handle, plan.data, self.model, self.task)
        if plan.groups is not None:
            bind_groups(handle, plan.groups)
        handle.bind(f"train_{plan.role}", self.recipe.as_recorded(handle.manifest.recipe(plan.role)),
                    "pass the same recipe flags as before, or use a new store")
        handle.ask(paths.asked_train(plan.role), self.settings.num_models)
        if self.targets is not None:
            handle.bind("lds_targets", self.targets.fingerprint().as_dict(),
                        "LDS models of one store share their targets; use a new store for other targets")
            if handle.manifest.lds_targets_source is None:  # a moved copy of the targets is the same targets
                handle.set_section("lds_targets_source", {"spec": self.targets.spec})
        return plan

    def work(self, plan: TrainPlan) -> Work[int]:
        role = plan.role
        return Work(list(range(self.settings.num_models)), lambda j: paths.unit(role, j), f"train {role} models",
                    [paths.role_folder(role), paths.done("train", role)])

    def start(self, handle: Store, plan: TrainPlan, owned: list[int], todo: list[int]) -> TrainReport:
        return TrainReport(skipped=[j for j in owned if j not in todo])

    def do(self, handle: Store, plan: TrainPlan, todo: list[int], report: TrainReport, progress: Progress):
        for j in todo:
            info = self.train_model(handle, plan, j, report, progress)
            yield j, info
            report.trained.append(j)
            progress.unit_finished(f"{plan.role} model {j}", _summary(info, self.task))

    def train_model(self, handle: Store, plan: TrainPlan, j: int, report: TrainReport, progress: Progress) -> dict:
        """Model j: its subset, initialisation and data order from (seed, role, j); its mask and
        weights (with the checkpoints kept along the run) or its outputs on the targets written."""
        role, recipe, path = plan.role, self.recipe, paths.trained_model(plan.role, j)
        rng, torch_seed = unit_generators(recipe.seed, role, j)
        mask = training_mask(len(plan.data), recipe, rng, plan.groups)
        generator = torch.Generator().manual_seed(torch_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            net = self.model.build(plan.output_size)
        progress.unit_started(f"{role} model {j}", recipe.epochs * examples_per_epoch(int(mask.sum()), recipe))
        keep = set(recipe.checkpoint_epochs) if role == "reference" else set()
        kept: dict[str, str] = {}  # epoch -> the hash of the checkpoint's weights, published with the unit

        def keep_checkpoint(epoch: int, net: nn.Module) -> None:
            if epoch in keep:
                handle.write_arrays(paths.weights(paths.checkpoint(role, j, epoch)), self._state_arrays(net))
                kept[str(epoch)] = state_hash(self.model.stored_state(net))

        with torch_threads(recipe.threads):
            fit(net, plan.data, np.flatnonzero(mask), recipe, self.task, generator, self.device, progress,
                keep_checkpoint)
            if role != "reference":
                assert self.targets is not None, "check_role refuses LDS models without targets"
                target_outputs, summary = model_outputs(net, self.targets, self.task, self.device)
        handle.write_array(f"{path}/mask", mask)
        info: dict = {"num_examples": int(mask.sum())}
        if role == "reference":
            handle.write_arrays(paths.weights(path), self._state_arrays(net))
            info["sha256"] = state_hash(self.model.stored_state(net))
            if recipe.save_checkpoints > 1:
                info.update(checkpoint_epochs=recipe.checkpoint_epochs, checkpoint_sha256=kept)
            return info
        handle.write_array(paths.outputs(path), target_outputs)
        for name, value in summary.items():
            report.summaries.setdefault(name, {})[j] = value
        return {**info, **summary}

    def _state_arrays(self, net: nn.Module) -> dict[str, np.ndarray]:
        """What the store keeps of a trained model (a LoRA fine-tune: its adapter weights)."""
        return {k: v.detach().cpu().numpy() for k, v in self.model.stored_state(net).items()}


def train(store: str | Path, data: Dataset, model: ModelSpec, *, targets: Dataset | None = None,
          progress: Progress | None = None, **settings) -> TrainReport:
    """Train models 0..num_models-1 of `role` into `store`, skipping finished ones. `settings`:
    `TrainSettings`' fields by keyword (task, role, num_models, recipe, groups, device, shard).

    role "reference": store each model's subset mask and weights.
    role "lds": store each model's subset mask and its outputs f on `targets` (the LDS ground
    truth); with `recipe.group_alpha`, these are group LDS models, kept apart as role "lds-groups".
    """
    return Train(TrainSettings(**settings), data, model, targets).run(store, progress)


def examples_per_epoch(n: int, recipe: Recipe) -> int:
    """Examples a model trains on per epoch: its full batches (all n if fewer than a batch)."""
    return (n // recipe.batch_size) * recipe.batch_size if n > recipe.batch_size else n


def _summary(info: dict, task: Task) -> str:
    text = f"{info['num_examples']} examples"
    if task.summary_name in info:
        text += f", {task.describe_summary(info[task.summary_name])}"
    return text


def load_reference_model(store: str | Path, index: int, output_size: int, model: ModelSpec | None = None) -> nn.Module:
    """Reference model `index` of a store, rebuilt from its stored weights and its model spec
    (`model`, which a store made with a user factory needs)."""
    handle = Store.open(store)
    if handle.done_info("train", paths.unit("reference", index)) is None:
        raise UserError(f"store {str(store)!r} has no finished reference model {index}")
    spec = model or ModelSpec.of_store(handle.manifest.model_record(), handle.location)
    bind_model(handle, spec, handle.manifest.model_record().transform)
    state = {k: torch.from_numpy(v) for k, v in handle.read_arrays(paths.weights(paths.trained_model("reference", index))).items()}
    return spec.load_state(spec.build(output_size), state)
