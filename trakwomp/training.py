"""`train`: reference models and LDS evaluation models, each on its own random alpha-subset.

Model j of role r is a function of (recipe, r, j): its subset mask, its initialisation, its
data order and its augmentation all come from generators seeded by
SeedSequence([seed, role code, j]), so reference and LDS models never coincide and any unit can
be (re)trained by any process of any shard. Its subset mask is the same everywhere; its weights
are bitwise the same on CPUs of one kind with one torch version, since the recipe fixes the
thread count (`Recipe.threads`). Other CPUs, torch versions or CUDA round differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trakwomp.bindings import bind_model, bind_training_inputs
from trakwomp.data import Dataset, length_sorted, load_batch
from trakwomp.errors import UserError
from trakwomp.groups import Groups, bind_groups, check_groups, choose_groups
from trakwomp.models import ModelSpec, check_model_fits_data
from trakwomp.runtime import NoProgress, Progress, Shard, plan_work, resolve_device
from trakwomp.store import Store, layout
from trakwomp.tasks import Batch, CausalLM, Classification, Task

ROLES = {"reference": 0, "lds": 1, "lds-groups": 2}  # lds-groups: LDS models on random halves of the groups


OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETA2 = 0.95
CLIP_NORM = 1.0
LANGUAGE_MODEL_RECIPE = {"optimizer": "adamw", "epochs": 8, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.1,
                         "augment": False}


@dataclass(frozen=True)
class Recipe:
    """A one-cycle (linear up, linear down) learning rate with one of two optimizers:

    sgd:   SGD with Nesterov momentum `momentum` (the image classifiers' recipe); images are
           augmented with random flips and 4-pixel reflect-padded crops.
    adamw: AdamW with betas (momentum, 0.95), decoupled weight decay and gradients clipped to
           norm 1 (the small language models' recipe, `Recipe.for_task`); texts are batched with
           texts of similar length.

    `threads`: the CPU threads torch uses while a model trains and records its outputs. A CPU
    sums in an order that depends on the thread count, so the same recipe trained with 1 and
    with 2 threads gives different weights; recording the count makes every rerun use it.

    `save_checkpoints`: K, the number of checkpoints a reference model keeps along its run, at
    the ends of epochs floor(k E / K) for k = 1..K (the last is the trained model); featurize
    makes each a member of the run's ensemble (TRAK's M counts members).
    `exclude_groups`: groups whose examples no model sees (the subsets are drawn from the rest).
    `group_alpha`: each model trains on the examples of round(group_alpha x G) of the G groups
    (not excluded), chosen at random, instead of on an alpha-subset of the examples."""

    alpha: float = 0.5
    epochs: int = 24
    batch_size: int = 64
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.25
    seed: int = 0
    augment: bool = True
    threads: int = 1
    optimizer: str = "sgd"
    group_alpha: float | None = None
    exclude_groups: tuple[str, ...] = ()
    save_checkpoints: int = 1

    @classmethod
    def for_task(cls, task: Task, **given) -> "Recipe":
        """The default recipe of `task` (causal-lm: LANGUAGE_MODEL_RECIPE), with the values
        `given` that are not None in place of its defaults."""
        defaults = LANGUAGE_MODEL_RECIPE if isinstance(task, CausalLM) else {}
        return cls(**{**defaults, **{k: v for k, v in given.items() if v is not None}})

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UserError(f"--alpha must lie in (0, 1], got {self.alpha}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be at least 1")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        object.__setattr__(self, "exclude_groups", tuple(sorted(set(self.exclude_groups))))
        if self.group_alpha is not None and not 0 < self.group_alpha < 1:
            raise UserError(f"--group-alpha must lie in (0, 1), got {self.group_alpha}")
        if not 1 <= self.save_checkpoints <= self.epochs:
            raise UserError(f"--save-checkpoints must lie between 1 and --epochs ({self.epochs}), "
                            f"got {self.save_checkpoints}")

    @property
    def checkpoint_epochs(self) -> list[int]:
        """The epochs after which a reference model's checkpoints are kept: floor(k E / K), k = 1..K."""
        return [k * self.epochs // self.save_checkpoints for k in range(1, self.save_checkpoints + 1)]

    def as_recorded(self, recorded: dict | None) -> dict:
        """The recipe as a store's manifest records it; a store made before `threads` and
        `optimizer` were recorded (by trakwomp 0.1, SGD only) is matched without them. Group
        options and checkpoints are recorded only when set."""
        recipe = asdict(self)
        recipe["exclude_groups"] = list(self.exclude_groups)
        for optional, unset in (("group_alpha", None), ("exclude_groups", []), ("save_checkpoints", 1)):
            if recipe[optional] == unset:
                recipe.pop(optional)
        for added in ("threads", "optimizer"):
            if recorded is not None and added not in recorded and (added == "threads" or recipe[added] == "sgd"):
                recipe.pop(added)
        return recipe

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=self.lr, betas=(self.momentum, ADAMW_BETA2),
                                     weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, nesterov=True,
                               weight_decay=self.weight_decay)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainReport:
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    target_accuracy: dict[int, float] = field(default_factory=dict)  # classification
    target_token_loss: dict[int, float] = field(default_factory=dict)  # causal-lm: nats per predicted token


def unit_generators(seed: int, role: str, index: int) -> tuple[np.random.Generator, int]:
    """The numpy generator for model (role, index)'s subset and the seed of its torch generator."""
    sequence = np.random.SeedSequence([seed, ROLES[role], index])
    mask_sequence, torch_sequence = sequence.spawn(2)
    torch_seed = int(torch_sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return np.random.default_rng(mask_sequence), torch_seed


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


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flips and random crops of the reflect-padded images, per example."""
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return x.gather(3, cols)


def one_cycle_lr(step: int, total_steps: int, recipe: Recipe) -> float:
    """The learning rate of step `step` (from 0) of `total_steps`: linear from lr / 25 up to lr at
    step t = warmup_fraction * total_steps - 1, then linear down to lr / 250,000 at the last step.
    This is torch's OneCycleLR (linear, no momentum cycle), float for float, but also defined
    when the warm-up ends at or before step 0 (t <= 0: it starts at the peak), where OneCycleLR
    divides by zero."""
    peak = recipe.lr
    start = peak / 25
    end = start / 1e4
    top = recipe.warmup_fraction * total_steps - 1
    if 0 < top and step <= top:
        return (peak - start) * (step / top) + start
    last = total_steps - 1
    if last <= top:
        return peak
    return (end - peak) * ((step - top) / (last - top)) + peak


def epoch_batches(dataset: Dataset, positions: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's batches: the examples in a random order, cut into full batches (the rest is
    left out; a subset smaller than one batch is one batch). Texts are then sorted by length
    within windows of 16 batches and the batches shuffled, so that a batch pads little."""
    n = len(positions)
    steps = n // batch_size if n > batch_size else 1
    order = positions[torch.randperm(n, generator=generator)].numpy()
    if dataset.lengths is None:
        return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    kept, window = order[:steps * batch_size], 16 * batch_size
    grouped = np.concatenate([length_sorted(dataset, kept[w:w + window]) for w in range(0, len(kept), window)])
    batches = [grouped[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    return [batches[int(i)] for i in torch.randperm(steps, generator=generator)]


def fit(model: nn.Module, dataset: Dataset, positions: np.ndarray, recipe: Recipe, task: Task,
        generator: torch.Generator, device: torch.device, progress: Progress,
        epoch_done: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train `model` on the examples `positions` of `dataset` with `recipe` and the task's loss;
    `epoch_done(epoch, model)` is called after each epoch (counted from 1) but the last."""
    model.to(device).train()
    optimizer = recipe.make_optimizer(model)
    positions = torch.as_tensor(positions)
    steps_per_epoch = len(positions) // recipe.batch_size if len(positions) > recipe.batch_size else 1
    total_steps = recipe.epochs * steps_per_epoch
    for epoch in range(recipe.epochs):
        for step, batch_positions in enumerate(epoch_batches(dataset, positions, recipe.batch_size, generator)):
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(epoch * steps_per_epoch + step, total_steps, recipe)
            batch = load_batch(dataset, batch_positions)
            if recipe.augment and batch.inputs[0].ndim == 4:
                batch = Batch((augment(batch.inputs[0], generator),), batch.labels)
            batch = batch.to(device)
            loss = task.loss(model(*batch.inputs), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.optimizer == "adamw":
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            progress.advance(len(batch))
        if epoch_done is not None and epoch + 1 < recipe.epochs:
            epoch_done(epoch + 1, model)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, task: Task, device: torch.device,
             batch_size: int = 512) -> tuple[np.ndarray, dict]:
    """The outputs f(z) (float32) of `model` in eval mode on every example of `dataset`, and the
    task's summary of them (classification: top-1 accuracy; causal-lm: mean cross-entropy per
    predicted token), as {task.summary_name: value}."""
    model.to(device).eval()
    order = length_sorted(dataset, np.arange(len(dataset)))
    out = np.empty(len(dataset), dtype=np.float32)
    numerator = denominator = 0.0
    for start in range(0, len(order), batch_size):
        positions = order[start:start + batch_size]
        batch = load_batch(dataset, positions).to(device)
        output = model(*batch.inputs)
        out[positions] = task.outputs(output, batch).float().cpu().numpy()
        terms = task.summary_terms(output, batch)
        numerator, denominator = numerator + terms[0], denominator + terms[1]
    return out, {task.summary_name: numerator / denominator}


def train(
    store: str | Path,
    data: Dataset,
    model: ModelSpec,
    *,
    task: Task = Classification(),
    role: str = "reference",
    num_models: int = 1,
    targets: Dataset | None = None,
    recipe: Recipe | None = None,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
    groups: Groups | str | Path | None = None,
) -> TrainReport:
    """Train models 0..num_models-1 of `role` into `store`, skipping finished ones.

    role "reference": store each model's subset mask and weights.
    role "lds": store each model's subset mask and its outputs f on `targets` (the LDS ground
    truth); with `recipe.group_alpha`, these are group LDS models, kept apart as role "lds-groups".
    `recipe`: default `Recipe.for_task(task)`. `groups` (Groups, or a groups file): the groups
    that `recipe.group_alpha` and `recipe.exclude_groups` refer to, recorded in the store;
    default the store's, else the sources of `data`.
    """
    progress = progress or NoProgress()
    recipe = recipe or Recipe.for_task(task)
    if role not in ("reference", "lds"):
        raise UserError(f"unknown --role {role!r}: expected reference or lds")
    if recipe.group_alpha is not None and role != "lds":
        raise UserError("--group-alpha is for --role lds (LDS models on random halves of the groups)")
    if recipe.save_checkpoints > 1 and role != "reference":
        raise UserError("--save-checkpoints is for reference models (LDS models keep only their outputs)")
    if num_models < 1:
        raise UserError("--num-models must be at least 1")
    if role == "lds" and targets is None:
        raise UserError("--role lds needs --targets: the examples whose margins the LDS models are scored on")
    if role == "reference" and targets is not None:
        raise UserError("--targets is only for --role lds")
    torch_device = resolve_device(device)
    output_size = task.output_size(data)
    with torch.random.fork_rng(devices=[]):
        net = model.build(output_size)
    for examples in (data, targets) if targets is not None else (data,):
        check_model_fits_data(net, examples, torch_device, model, task, output_size)
    if targets is not None and getattr(targets, "tokenizer", None) is not None and \
            targets.tokenizer.record() != data.tokenizer.record():
        raise UserError("--targets must be read with the train set's tokenizer")
    existing = Store.open_existing(store)
    chosen_groups = None
    if groups is not None or recipe.group_alpha is not None or recipe.exclude_groups:
        chosen_groups = choose_groups(existing, groups, len(data), lambda: data)
        if len(chosen_groups.positions(list(recipe.exclude_groups))) == len(chosen_groups.names):
            raise UserError("--exclude-groups names every group: no example is left to train on")
        if existing is not None and "dataset" in existing.manifest:
            check_groups(existing, chosen_groups)
    if recipe.group_alpha is not None:
        role = "lds-groups"
    handle = Store.open(store, create=True)
    bind_training_inputs(handle, data, model, task)
    if chosen_groups is not None:
        bind_groups(handle, chosen_groups)
    handle.bind(f"train_{role}", recipe.as_recorded(handle.manifest.get(f"train_{role}")), "pass the same recipe flags as before, or use a new store")
    handle.ask(f"train/{role}", num_models)
    if targets is not None:
        handle.bind("lds_targets", targets.fingerprint().as_dict(),
                    "LDS models of one store share their targets; use a new store for other targets")
        if "lds_targets_source" not in handle.manifest:  # a moved copy of the targets is the same targets
            handle.set_section("lds_targets_source", {"spec": targets.spec})

    report = TrainReport()
    units, todo = plan_work(handle, "train", range(num_models), lambda j: layout.unit(role, j), shard, progress,
                            f"train {role} models", [f"models/{role}", f"done/train/{role}"])
    report.skipped = [j for j in units if j not in todo]
    for j in todo:
        rng, torch_seed = unit_generators(recipe.seed, role, j)
        mask = training_mask(len(data), recipe, rng, chosen_groups)
        generator = torch.Generator().manual_seed(torch_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            net = model.build(output_size)
        progress.unit_started(f"{role} model {j}", recipe.epochs * _examples_per_epoch(int(mask.sum()), recipe))
        path = layout.trained_model(role, j)
        keep = set(recipe.checkpoint_epochs) if role == "reference" else set()

        def keep_checkpoint(epoch: int, net: nn.Module) -> None:
            if epoch in keep:
                handle.write_arrays(f"{layout.checkpoint(role, j, epoch)}/weights", _state_arrays(net))

        with torch_threads(recipe.threads):
            fit(net, data, np.flatnonzero(mask), recipe, task, generator, torch_device, progress, keep_checkpoint)
            if role != "reference":
                target_outputs, summary = evaluate(net, targets, task, torch_device)
        handle.write_array(f"{path}/mask", mask)
        info: dict = {"num_examples": int(mask.sum())}
        if role == "reference":
            handle.write_arrays(f"{path}/weights", _state_arrays(net))
            if recipe.save_checkpoints > 1:
                info["checkpoint_epochs"] = recipe.checkpoint_epochs
        else:
            handle.write_array(f"{path}/margins", target_outputs)
            info.update(summary)
            for name, value in summary.items():
                getattr(report, name)[j] = value
        handle.mark_done("train", layout.unit(role, j), info)
        report.trained.append(j)
        progress.unit_finished(f"{role} model {j}", _summary(info))
    return report


def _state_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def _examples_per_epoch(n: int, recipe: Recipe) -> int:
    return (n // recipe.batch_size) * recipe.batch_size if n > recipe.batch_size else n


def _summary(info: dict) -> str:
    text = f"{info['num_examples']} examples"
    if "target_accuracy" in info:
        text += f", target accuracy {info['target_accuracy']:.1%}"
    if "target_token_loss" in info:
        text += f", target loss {info['target_token_loss']:.3f} nats/token"
    return text


def load_reference_model(store: str | Path, index: int, output_size: int, model: ModelSpec | None = None) -> nn.Module:
    """Reference model `index` of a store, rebuilt from its stored weights and its model spec
    (`model`, which a store made with a user factory needs)."""
    handle = Store.open(store)
    if handle.done_info("train", layout.unit("reference", index)) is None:
        raise UserError(f"store {str(store)!r} has no finished reference model {index}")
    spec = model or ModelSpec.of_store(handle.manifest["model"], handle.location)
    bind_model(handle, spec, handle.manifest["model"].get("transform"))
    state = {k: torch.from_numpy(v) for k, v in handle.read_arrays(f"{layout.trained_model('reference', index)}/weights").items()}
    net = spec.build(output_size)
    net.load_state_dict(state)
    return net.eval()
