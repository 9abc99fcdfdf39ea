"""The training recipe: optimizer, one-cycle learning rate, epochs and what each model keeps.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.settings import check_seed, check_threads, option
from trakwomp.store.records import RecipeRecord, as_recorded_by
from trakwomp.tasks.base import Task

OPTIMIZERS = ("sgd", "adamw")


ADAMW_BETA2 = 0.95


CLIP_NORM = 1.0


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

    alpha: float = option(0.5, "Fraction of --data in each model's random subset.")
    epochs: int = option(24, "Epochs of training.")
    batch_size: int = option(64, "Examples per training batch.")
    lr: float = option(0.2, "Peak learning rate of the one-cycle schedule.")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.25
    seed: int = option(0, "Seed of every model's subset, initialisation, data order and augmentation.")
    augment: bool = True
    threads: int = option(1, "CPU threads for training; recorded, since results depend on it.")
    optimizer: str = "sgd"
    group_alpha: float | None = option(None, "With --role lds: train each model on the examples of a random "
                                             "group_alpha-fraction of the groups (group LDS models, kept apart from "
                                             "the others; --alpha does not apply).")
    exclude_groups: tuple[str, ...] = option((), "Groups (comma-separated or repeated) whose examples no model sees; "
                                                 "subsets are drawn from the rest.")
    train_on_prompt: bool = option(False, "With prompt/completion data: train on the prompts' tokens too (by default "
                                          "the loss covers the completions' only).")
    save_checkpoints: int = option(1, "K: keep K checkpoints along each reference model's run (after epochs "
                                      "floor(kE/K), the last being the model); featurize makes each a member of "
                                      "TRAK's ensemble.")

    @classmethod
    def for_task(cls, task: Task, **given) -> "Recipe":
        """The default recipe of `task` (its `recipe_defaults` over this class's), with the values
        `given` that are not None in place of its defaults."""
        return cls(**{**task.recipe_defaults, **{k: v for k, v in given.items() if v is not None}})

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UserError(f"`alpha` must lie in (0, 1], got {self.alpha}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("`epochs` and `batch_size` must be at least 1")
        if not self.lr > 0:
            raise UserError(f"`lr` must be positive, got {self.lr}")
        check_threads(self.threads)
        check_seed("`seed`", self.seed)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        object.__setattr__(self, "exclude_groups", tuple(sorted(set(self.exclude_groups))))
        if self.group_alpha is not None and not 0 < self.group_alpha < 1:
            raise UserError(f"`group_alpha` must lie in (0, 1), got {self.group_alpha}")
        if not 1 <= self.save_checkpoints <= self.epochs:
            raise UserError(f"`save_checkpoints` must lie between 1 and `epochs` ({self.epochs}), "
                            f"got {self.save_checkpoints}")

    @property
    def checkpoint_epochs(self) -> list[int]:
        """The epochs after which a reference model's checkpoints are kept: floor(k E / K), k = 1..K."""
        return [k * self.epochs // self.save_checkpoints for k in range(1, self.save_checkpoints + 1)]

    def as_recorded(self, recorded: RecipeRecord | None) -> dict:
        """The recipe as a store's manifest records it, as the store that recorded `recorded`
        records it (`as_recorded_by`). Group options, checkpoints and --train-on-prompt are
        recorded only when set."""
        recipe = asdict(self)
        recipe["exclude_groups"] = list(self.exclude_groups)
        for optional, unset in (("group_alpha", None), ("exclude_groups", []), ("save_checkpoints", 1),
                                ("train_on_prompt", False)):
            if recipe[optional] == unset:
                recipe.pop(optional)
        return as_recorded_by(recipe, None if recorded is None else recorded.json)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the model's trainable parameters (a LoRA fine-tune: its adapter's)."""
        trained = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            return torch.optim.AdamW(trained, lr=self.lr, betas=(self.momentum, ADAMW_BETA2),
                                     weight_decay=self.weight_decay)
        return torch.optim.SGD(trained, lr=self.lr, momentum=self.momentum, nesterov=True,
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
    if top > 0 and step <= top:
        return (peak - start) * (step / top) + start
    last = total_steps - 1
    if last <= top:
        return peak
    return (end - peak) * ((step - top) / (last - top)) + peak
