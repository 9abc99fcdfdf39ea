"""The registries of trakwomp's extension points, open to other packages.

Each registry holds trakwomp's own entries and, from the first time it is read, those that
installed packages declare as entry points in its group (`importlib.metadata`), so a package
adds a task, a dataset kind, a model kind, a projector kind or a factored layer rule without
editing trakwomp. In the package's pyproject.toml, for example:

    [project.entry-points."trakwomp.tasks"]
    poisson = "mypackage.tasks:Poisson"

| registry | group | an entry is |
| --- | --- | --- |
| `trakwomp.tasks.registry.TASKS` | `trakwomp.tasks` | a `Task` subclass |
| `trakwomp.data.base.DATASET_KINDS` | `trakwomp.dataset_kinds` | a `DatasetKind` subclass |
| `trakwomp.models.kinds.MODEL_KINDS` | `trakwomp.model_kinds` | a `ModelKind` subclass |
| `trakwomp.features.projectors.PROJECTOR_KINDS` | `trakwomp.projectors` | a `ProjectorKind` subclass |
| `trakwomp.features.factored.LAYER_RULES` | `trakwomp.layer_rules` | a `LayerRule` subclass |
| `trakwomp.analysis.baselines.BASELINES` | `trakwomp.baselines` | a `Baseline` subclass |

An entry's name is the name it is chosen by (`--task poisson`). A name already taken is refused
in one line; an entry point that does not load is left out of the choices (help still works)
and refused in one line, naming the entry point and its error, when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from trakwomp.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name: trakwomp's own (the modules `builtins`, imported on first use, add them;
    "package.*": every module of the package), then the entry points of the group `group`. `make`
    turns a registered class into the entry (an instance, for kinds that are used as objects);
    `what` names an entry in messages (a setting in backticks: `task`, which the CLI shows as its flag)."""

    def __init__(self, group: str, what: str, make: Callable[[type], T] = lambda cls: cls,
                 builtins: tuple[str, ...] = ()):
        self.group, self.what, self._make, self._builtins = group, what, make, builtins
        self._entries: dict[str, T] = {}
        self._classes: dict[str, type] = {}
        self._broken: dict[str, str] = {}  # entry points that did not load: name -> why
        self._plugins_loaded = False

    def add(self, name: str, cls: type) -> type:
        """Register `cls` (made into an entry by `make`) under `name`; returns `cls`. The same
        class twice is one entry (a plugin's class registers itself as it is imported)."""
        if self._classes.get(name) is cls:
            return cls
        if name in self._entries:
            raise UserError(f"{self.what} {name!r} is registered twice ({self._classes[name].__module__} and "
                            f"{cls.__module__})")
        self._entries[name], self._classes[name] = self._make(cls), cls
        return cls

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        modules = []
        for name in self._builtins:
            if name.endswith(".*"):
                package = importlib.import_module(name[:-2])
                modules += [f"{package.__name__}.{module.name}" for module in pkgutil.iter_modules(package.__path__)]
            else:
                modules.append(name)
        for module in modules:
            importlib.import_module(module)
        order = {module: i for i, module in enumerate(modules)}  # trakwomp's own in module order, whatever
        self._entries = dict(sorted(self._entries.items(),  # imported them first
                                    key=lambda entry: order.get(self._classes[entry[0]].__module__, len(order))))
        for point in entry_points(group=self.group):
            try:
                self.add(point.name, point.load())
            except Exception as e:  # any error of another package's code: refused when chosen
                self._broken[point.name] = (f"the {self.group} entry point {point.name!r} ({point.value}) does not "
                                            f"load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def get(self, name: str) -> T:
        """The entry `name`; an unknown name is refused naming the choices."""
        self._load_plugins()
        if name in self._broken:
            raise UserError(self._broken[name])
        if name not in self._entries:
            raise UserError(f"unknown {self.what} {name!r}: expected one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        self._load_plugins()
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_plugins()
        return iter(list(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries
