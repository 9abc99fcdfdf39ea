"""The one skeleton of every stage (`train`, `featurize`, `finalize`, `score`).

    check   refuse bad input before anything is written (the store is opened, never created);
            returns the stage's plan: a frozen record of everything resolved
    open    open the store, or create it
    bind    record in the store what it is made of, or check it against what it records; returns
            the plan with what the store assigned (model ids)
    work    the plan's units of work; then this shard's share (`--shard K/N`), less those done
    start   the report, once the units to do are known
    do      each unit's data written, then its done marker published

Each step takes the plan and the store handle; a stage keeps no state of its own beyond its
settings and inputs.

A kill between two units loses at most the unit in flight; a rerun redoes only units without a
marker, and first removes what killed writes left in the stage's folders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from trakwomp.runtime import NoProgress, Progress, Shard, plan_work, resolve_device
from trakwomp.settings import option
from trakwomp.store import Store

Unit = TypeVar("Unit")
Report = TypeVar("Report")
PlanT = TypeVar("PlanT", bound="Plan")


@dataclass(frozen=True)
class Plan:
    """What `check` resolved; every stage's plan extends it. `existing`: the store as `check`
    found it (None where there is none yet)."""

    existing: Store | None = field(default=None, kw_only=True, repr=False)


@dataclass(frozen=True, kw_only=True)
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


class Stage(ABC, Generic[PlanT, Unit, Report]):
    """check, open, bind, work, start, do, finish: `run` calls the steps in that order, handing
    each the plan."""

    stage: ClassVar[str]  # the done markers' stage

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)

    def run(self, store: str | Path, progress: Progress | None = None) -> Report:
        progress = progress or NoProgress()
        plan = self.check(store)
        handle = self.open(store, plan)
        plan = self.bind(handle, plan)
        work = self.work(plan)
        owned, todo = plan_work(handle, self.stage, work.units, work.name, self.settings.shard, progress,
                                work.description, work.folders)
        report = self.start(handle, plan, owned, todo)
        for unit, info in self.do(handle, plan, todo, report, progress):
            handle.mark_done(self.stage, work.name(unit), info)
        return self.finish(plan, report)

    @abstractmethod
    def check(self, store: str | Path) -> PlanT:
        """Refuse bad input before any write; the plan (with the store, if it exists)."""

    def open(self, store: str | Path, plan: PlanT) -> Store:
        """The store to write (default: the existing one that `check` opened)."""
        return plan.existing if plan.existing is not None else Store.open(store)

    def bind(self, handle: Store, plan: PlanT) -> PlanT:
        """Record in the store what it is made of, or check it (default: nothing); the plan."""
        return plan

    @abstractmethod
    def work(self, plan: PlanT) -> Work[Unit]:
        """All units of the stage."""

    @abstractmethod
    def start(self, handle: Store, plan: PlanT, owned: list[Unit], todo: list[Unit]) -> Report:
        """The report, once the units are known (and anything to check or record before the first unit)."""

    @abstractmethod
    def do(self, handle: Store, plan: PlanT, todo: list[Unit], report: Report,
           progress: Progress) -> Iterator[tuple[Unit, dict | None]]:
        """Do the units `todo`, yielding each with its done marker's info once its data are written."""

    def finish(self, plan: PlanT, report: Report) -> Report:
        return report
