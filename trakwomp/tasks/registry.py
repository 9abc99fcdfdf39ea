"""Tasks by name: every module of this package is imported, so each `Task` subclass in it is
registered under its `name` (a new task needs no line here)."""

from __future__ import annotations

import importlib
import pkgutil

import trakwomp.tasks
from trakwomp.errors import UserError
from trakwomp.store.records import TaskRecord
from trakwomp.tasks.base import REGISTERED, Task

for _module in pkgutil.iter_modules(trakwomp.tasks.__path__):
    importlib.import_module(f"trakwomp.tasks.{_module.name}")

TASKS = tuple(REGISTERED)
DEFAULT_TASK = "classification"


def task_class(name: str) -> type[Task]:
    if name not in REGISTERED:
        raise UserError(f"unknown --task {name!r}: expected one of {', '.join(REGISTERED)}")
    return REGISTERED[name]


def make_task(name: str, lm_output: str | None = None) -> Task:
    """The task `name`, with the command-line options given (`lm_output`: causal-lm's output function)."""
    return task_class(name).create(lm_output)


def task_of_store(recorded: TaskRecord | None) -> Task:
    """The task a store records (the default for a store that records none yet)."""
    if recorded is None:
        return task_class(DEFAULT_TASK)()
    return task_class(recorded.name).from_record(recorded.json)
