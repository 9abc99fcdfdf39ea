"""Where work runs: the device, and which units of work a shard owns."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, TypeVar

import numpy as np
import torch

from trakwomp.errors import UserError
from trakwomp.store import Store

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` owns the units whose position p satisfies p % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] = os.environ) -> "Shard":
        """`K/N`, or `auto`: the shard the batch engine that launched this process assigns it."""
        if text.strip() == "auto":
            return cls.from_environment(environ)
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(f"malformed `shard` {text!r}: expected K/N, e.g. 0/2 and 1/2 for two shards")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise UserError(f"`shard` {text!r} is out of range: K counts from 0 and must be below N (0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)})")
        return cls(index, count)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> "Shard":
        """The shard of a Slurm job array task (SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT), of a
        torchrun process (RANK, WORLD_SIZE), or of torchrun process RANK inside array task T:
        shard T x WORLD_SIZE + RANK of COUNT x WORLD_SIZE."""
        def number(name: str, default: int | None = None) -> int:
            value = environ.get(name)
            if value is None and default is not None:
                return default
            if value is None or not value.strip().lstrip("-").isdigit():
                raise UserError(f"`shard` auto: {name}={value!r} is not a whole number")
            return int(value)

        slurm, torchrun = "SLURM_ARRAY_TASK_ID" in environ, "RANK" in environ or "WORLD_SIZE" in environ
        if not slurm and not torchrun:
            raise UserError("`shard` auto: neither a Slurm job array (SLURM_ARRAY_TASK_ID) nor torchrun (RANK, "
                            "WORLD_SIZE) launched this process; pass `shard` K/N")
        index, count = 0, 1
        if slurm:
            task, first, step = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1)
            count = number("SLURM_ARRAY_TASK_COUNT")
            if step < 1 or (task - first) % step:
                raise UserError(f"`shard` auto: array task {task} is not on the grid {first}, {first + step}, ... "
                                "(give the array as a range, e.g. --array=0-7)")
            index = (task - first) // step
        if torchrun:
            rank, world = number("RANK"), number("WORLD_SIZE")
            index, count = index * world + rank, count * world
        if not 0 <= index < count:
            raise UserError(f"`shard` auto: the environment gives shard {index} of {count}, out of range")
        return cls(index, count)

    def select(self, units: Iterable[T]) -> list[T]:
        """This shard's units: every `count`-th, from the `index`-th."""
        return [u for p, u in enumerate(units) if p % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_device(name: str, environ: Mapping[str, str] = os.environ) -> torch.device:
    """A torch device from `cpu`, `cuda` or `cuda:N`, refused if it is not there. Under torchrun,
    `cuda` is the process's own GPU, cuda:LOCAL_RANK."""
    if name == "cuda" and "LOCAL_RANK" in environ:
        name = f"cuda:{environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown `device` {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"`device` {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"`device` {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported `device` {name!r}: expected cpu, cuda or cuda:N")
    return device


class Progress(Protocol):
    """What long-running library calls report; the CLI draws it, Python users may ignore it."""

    def plan(self, total_units: int, skipped: int, description: str) -> None: ...

    def unit_started(self, name: str, total_steps: int) -> None: ...

    def advance(self, steps: int) -> None: ...

    def unit_finished(self, name: str, summary: str, units: int = 1) -> None: ...


class NoProgress:
    def plan(self, total_units: int, skipped: int, description: str) -> None:
        pass

    def unit_started(self, name: str, total_steps: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def unit_finished(self, name: str, summary: str, units: int = 1) -> None:
        pass


class StepsOnly:
    """Forwards only `advance` to another Progress: for work nested inside one of its units."""

    def __init__(self, outer: Progress):
        self.outer = outer

    def plan(self, total_units: int, skipped: int, description: str) -> None:
        pass

    def unit_started(self, name: str, total_steps: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        self.outer.advance(steps)

    def unit_finished(self, name: str, summary: str, units: int = 1) -> None:
        pass


def plan_work(handle: Store, stage: str, units: Iterable[T], name: Callable[[T], str], shard: Shard,
              progress: Progress, description: str, folders: list[str]) -> tuple[list[T], list[T]]:
    """The units of `stage` this shard owns, and those of them not yet done (`name` gives a
    unit's done-marker name). Before any is redone, leftovers of killed writes in `folders` are
    removed; the plan is reported to `progress`."""
    owned = shard.select(units)
    todo = [u for u in owned if handle.done_info(stage, name(u)) is None]
    if todo:
        handle.remove_stale_temporaries(folders)
    progress.plan(len(owned), len(owned) - len(todo), description)
    return owned, todo


def torch_seed(*entropy: int) -> int:
    """A 63-bit seed for a torch generator, drawn from numpy's SeedSequence of `entropy`, so that
    seeds made of several numbers (seed, model, block, ...) never collide as a sum would."""
    return seed_of_sequence(np.random.SeedSequence(list(entropy)))


def seed_of_sequence(sequence: np.random.SeedSequence) -> int:
    """A 63-bit torch seed from a SeedSequence's first 64-bit word."""
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))

