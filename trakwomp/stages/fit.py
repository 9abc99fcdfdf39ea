"""Fitting one model to a subset of the train set with a recipe and the task's loss, and its
outputs f on targets afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from trakwomp.data.base import Dataset, length_sorted, load_batch
from trakwomp.runtime import Progress, torch_seed
from trakwomp.stages.recipe import CLIP_NORM, Recipe, one_cycle_lr
from trakwomp.tasks.base import Task


def steps_per_epoch(examples: int, batch_size: int) -> int:
    """Full batches per epoch (the rest is left out); a subset smaller than one batch is one batch."""
    return examples // batch_size if examples > batch_size else 1


def epoch_batches(dataset: Dataset, positions: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> list[np.ndarray]:
    """One epoch's batches: the examples in a random order, cut into full batches (the rest is
    left out; a subset smaller than one batch is one batch). Texts are then sorted by length
    within windows of 16 batches and the batches shuffled, so that a batch pads little."""
    n = len(positions)
    steps = steps_per_epoch(n, batch_size)
    order = positions[torch.randperm(n, generator=generator)].numpy()
    if dataset.lengths is None:
        return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    kept, window = order[:steps * batch_size], 16 * batch_size
    grouped = np.concatenate([length_sorted(dataset, kept[w:w + window]) for w in range(0, len(kept), window)])
    batches = [grouped[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    return [batches[int(i)] for i in torch.randperm(steps, generator=generator)]


def model_noise_seed(generator: torch.Generator) -> int:
    """The seed of torch's global generator while a model trains, which the model's own noise
    (dropout) draws from: derived from `generator`'s seed, without drawing from `generator`."""
    return torch_seed(generator.initial_seed(), 1)


def fit(model: nn.Module, dataset: Dataset, positions: np.ndarray, recipe: Recipe, task: Task,
        generator: torch.Generator, device: torch.device, progress: Progress,
        epoch_done: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train `model` on the examples `positions` of `dataset` with `recipe` and the task's loss;
    `epoch_done(epoch, model)` is called after each epoch (counted from 1) but the last. Data
    order and augmentation draw from `generator`, the model's dropout from torch's global
    generator seeded by `model_noise_seed` (and restored after), so a model trains alike in
    any process, shard or order."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(model_noise_seed(generator))
        model.to(device).train()
        optimizer = recipe.make_optimizer(model)
        order = torch.as_tensor(positions)
        steps = steps_per_epoch(len(order), recipe.batch_size)
        total_steps = recipe.epochs * steps
        for epoch in range(recipe.epochs):
            for step, batch_positions in enumerate(epoch_batches(dataset, order, recipe.batch_size, generator)):
                for group in optimizer.param_groups:
                    group["lr"] = one_cycle_lr(epoch * steps + step, total_steps, recipe)
                batch = load_batch(dataset, batch_positions)
                if recipe.augment:
                    batch = dataset.augmented(batch, generator)
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
def model_outputs(model: nn.Module, dataset: Dataset, task: Task, device: torch.device,
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
