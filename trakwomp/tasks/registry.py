"""Tasks by name (`TASKS`, trakwomp.tasks.base: every module of this package, and other
packages' entry points), made with their options or as a store records them."""

from __future__ import annotations

from trakwomp.errors import UserError
from trakwomp.store.records import TaskRecord
from trakwomp.tasks.base import TASKS, Task

DEFAULT_TASK = "classification"


def make_task(name: str, **options) -> Task:
    """The task `name` with the task options given (None: not given), e.g. causal-lm's
    `lm_output`; an option of another task is refused naming the tasks that take it."""
    cls = TASKS.get(name)
    given = {option: value for option, value in options.items() if value is not None}
    for option in given:
        if option not in cls.options:
            owners = [other for other, task in TASKS.items() if option in task.options]
            raise UserError(f"`{option}` applies to `task` {' or '.join(owners)} only, not to "
                            f"`task` {name}")
    return cls(**{cls.options[option]: value for option, value in given.items()})


def task_of_store(recorded: TaskRecord | None) -> Task:
    """The task a store records (the default for a store that records none yet)."""
    if recorded is None:
        return TASKS.get(DEFAULT_TASK)()
    return TASKS.get(recorded.name).from_record(recorded.json)
