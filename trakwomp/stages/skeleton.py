"""The one skeleton of every stage (`train`, `featurize`, `finalize`, `score`).

    check   refuse bad input before anything is written (the store is opened, never created)
    open    open the store, or create it
    bind    record in the store what it is made of, or check it against what it records
    plan    the units of work: this shard's share (`--shard K/N`), less those already done
    do      each unit's data written, then its done marker published

A kill between two units loses at most the unit in flight; a rerun redoes only units without a
marker, and first removes what killed writes left in the stage's folders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from trakwomp.runtime import NoProgress, Progress, Shard, plan_work, resolve_device
from trakwomp.settings import option
from trakwomp.store import Store

Unit = TypeVar("Unit")
Report = TypeVar("Report")


@dataclass(frozen=True)
class RunSettings:
    """Where a stage runs and which share of its units (every stage's settings extend these)."""

    device: str = option("cpu", "cpu, cuda or cuda:N (under torchrun, cuda is cuda:LOCAL_RANK).")
    shard: Shard = option(Shard(), "Run only shard K of N (K from 0), e.g. 0/2 and 1/2; auto: the Slurm array task "
                                   "or torchrun rank.")


@dataclass
class Work(Generic[Unit]):
    """A stage's units of work: their names (done markers), what the plan is called, and the
    folders whose leftovers of killed writes a rerun removes."""

    units: list[Unit]
    name: Callable[[Unit], str]
    description: str
    folders: list[str]


class Stage(ABC, Generic[Unit, Report]):
    """check, open, bind, plan, do: `run` calls the steps in that order."""

    stage: ClassVar[str]  # the done markers' stage

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)

    def run(self, store: str | Path, progress: Progress | None = None) -> Report:
        progress = progress or NoProgress()
        handle = self.check(store)
        handle = self.open(store, handle)
        self.bind(handle)
        work = self.work(handle)
        owned, todo = plan_work(handle, self.stage, work.units, work.name, self.settings.shard, progress,
                                work.description, work.folders)
        report = self.start(handle, owned, todo)
        for unit, info in self.do(handle, todo, report, progress):
            handle.mark_done(self.stage, work.name(unit), info)
        return self.finish(report)

    @abstractmethod
    def check(self, store: str | Path) -> Store | None:
        """Refuse bad input before any write; the store if it exists (and the stage needs it)."""

    def open(self, store: str | Path, handle: Store | None) -> Store:
        """The store to write (default: the existing one that `check` opened)."""
        return handle if handle is not None else Store.open(store)

    def bind(self, handle: Store) -> None:
        """Record in the store what it is made of, or check it (default: nothing)."""

    @abstractmethod
    def work(self, handle: Store) -> Work[Unit]:
        """All units of the stage."""

    @abstractmethod
    def start(self, handle: Store, owned: list[Unit], todo: list[Unit]) -> Report:
        """The report, once the plan is known (and anything to check or record before the first unit)."""

    @abstractmethod
    def do(self, handle: Store, todo: list[Unit], report: Report, progress: Progress) -> Iterator[tuple[Unit, dict | None]]:
        """Do the units `todo`, yielding each with its done marker's info once its data are written."""

    def finish(self, report: Report) -> Report:
        return report
