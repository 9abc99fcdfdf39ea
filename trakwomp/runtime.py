"""Where work runs: the device, and which units of work a shard owns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Protocol, TypeVar

import torch

from trakwomp.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` owns the units whose position p satisfies p % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(f"malformed --shard {text!r}: expected K/N, e.g. 0/2 and 1/2 for two shards")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise UserError(f"--shard {text!r} is out of range: K counts from 0 and must be below N (0/{max(count, 1)} .. {max(count, 1) - 1}/{max(count, 1)})")
        return cls(index, count)

    def select(self, units: Iterable[T]) -> list[T]:
        return [u for p, u in enumerate(units) if p % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_device(name: str) -> torch.device:
    """A torch device from `cpu`, `cuda` or `cuda:N`, refused if it is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported --device {name!r}: expected cpu, cuda or cuda:N")
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
