"""`featurize`: projected per-example gradients phi_m(x_i) = P_m^T grad f(x_i) and q_m,i = 1 - p_i
for every registered model m and train example i, written to the store in row chunks.

A unit of work is (model id, row chunk); see docs/store.md for the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from trakwomp.data.base import Dataset
from trakwomp.errors import UserError
from trakwomp.features.gradients import count_parameters, select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.features.memory import batch_size_that_fits
from trakwomp.features.settings import DTYPES, FeatureSettings
from trakwomp.features.writer import FeaturizeReport, coverage_batch, write_features
from trakwomp.models.registry import read_checkpoints, register_models, trained_models
from trakwomp.models.spec import ModelSpec, check_model_fits_data
from trakwomp.runtime import Progress
from trakwomp.settings import option
from trakwomp.stages.bindings import as_trained, bind_training_inputs, stored_dataset, stored_task
from trakwomp.stages.skeleton import Plan, RunSettings, Stage, Work
from trakwomp.store import Store, paths
from trakwomp.tasks.base import Task
from trakwomp.tasks.registry import task_of_store

FACTORED_FROM_PARAMS = 20_000_000


def default_projector(num_params: int) -> ProjectorSpec:
    """`sjlt` at 16 x 1,024 up to FACTORED_FROM_PARAMS differentiated parameters, `factored` at
    32 x 32 per layer beyond, where `sjlt`'s tables (12 bytes per parameter and block: 3.8 GB at
    20M) and per-example gradients outgrow a machine (docs/performance.md gives the numbers)."""
    return ProjectorSpec("factored" if num_params > FACTORED_FROM_PARAMS else "sjlt")


@dataclass(frozen=True, kw_only=True)
class FeaturizeSettings(RunSettings):
    """How `featurize` makes features; None: the store's, once it has features, else the default."""

    projector: ProjectorSpec | None = option(None, "The projection (default: the store's, else `default_projector`).")
    dtype: str | None = option(None, "Storage dtype of the features: float32 or float16 (default: the store's, else "
                                     "float32).")
    parameters: list[str] | None = option(None, "Glob of parameter names to take gradients for; repeatable. Default: "
                                                "the store's, else all.")
    chunk_rows: int | None = option(None, "Train examples per stored chunk and per unit of work (default: the store's, "
                                          "else 1024).")
    batch_size: int = option(64, "Examples per gradient batch (lowered, and said, if it would not fit in memory).")
    memory_limit: int | None = option(None, "The most memory the process may hold while featurizing, in bytes (on "
                                            "CUDA: of the GPU's) (default: what it holds now plus what is free); "
                                            "checked before any work.")
    run: str | None = option(None, "Name of the one training run the checkpoints come from: they become members of "
                                   "one model's ensemble (default: each file its own run).")
    task: Task | None = option(None, "With checkpoints in a new store: the task (default: the store's, else "
                                     "classification).")


@dataclass(frozen=True)
class Resolved:
    """featurize's settings as resolved: given, else the store's, else the defaults."""

    projector: ProjectorSpec | None
    dtype: str
    parameters: list[str] | None
    chunk_rows: int


@dataclass(frozen=True)
class FeaturizePlan(Plan):
    """What featurize resolved and checked: the data, model and task, the feature settings, the
    batch size that fits, the checkpoints read (or the trained models found), and after `bind`
    the registered models' ids."""

    data: Dataset
    model: ModelSpec
    task: Task
    settings: Resolved
    features: FeatureSettings
    batch_size: int
    states: list = field(default_factory=list)
    trained: list = field(default_factory=list)
    model_ids: tuple[int, ...] = ()


class Featurize(Stage[FeaturizePlan, tuple[int, int], FeaturizeReport]):
    """Units (model, row chunk): projected gradients, q and f of the chunk's train examples."""

    stage = "featurize"
    settings: FeaturizeSettings

    def __init__(self, settings: FeaturizeSettings, data: Dataset | None = None, model: ModelSpec | None = None,
                 checkpoints: list[str] | None = None):
        super().__init__(settings)
        self.data, self.model = data, model
        adapter = [model.adapter] if model is not None and model.adapter is not None else []
        self.checkpoints = checkpoints or adapter  # --model hf:ADAPTER: the adapter's weights, unless others given

    def check(self, store: str | Path) -> FeaturizePlan:
        """Resolve the inputs and settings (the store's where not given), then check the model
        fits the data and the memory, all before the store is first written (or created)."""
        given = self.settings
        if self.checkpoints and (self.data is None or self.model is None):
            raise UserError("`checkpoint` needs `data` and `model` (the train set and the architecture)")
        if given.run is not None and not self.checkpoints:
            raise UserError("`run` names the training run of the `checkpoint` files; pass them too")
        handle = Store.open_existing(store)
        resolved = self.resolved_settings(handle)
        data, model, task = self.inputs(store, handle)
        output_size = task.output_size(data)
        features, batch_size = self.checked_model(data, model, task, output_size, resolved)
        states = read_checkpoints(model, output_size, self.checkpoints) if self.checkpoints else []
        if states:
            trained = []
        elif handle is None or not handle.done_units("train", "reference"):
            raise UserError(f"store {str(store)!r} has no trained reference models; run `trakwomp train` first or "
                            "pass `checkpoint`")
        else:
            trained = trained_models(handle)  # their weights checked before any write
        return FeaturizePlan(data, model, task, resolved, features, batch_size, states, trained, existing=handle)

    def resolved_settings(self, handle: Store | None) -> Resolved:
        """The projector, dtype, parameters and chunk rows: as given, else the store's, else the defaults."""
        given = self.settings
        recorded = handle.manifest.featurize if handle else None
        projector = given.projector or (ProjectorSpec.of_store(recorded.projector) if recorded else None)
        dtype = given.dtype or (recorded.dtype if recorded else "float32")
        parameters = list(recorded.parameters) if recorded and recorded.parameters is not None else None
        parameters = given.parameters if given.parameters is not None else parameters
        chunk_rows = given.chunk_rows if given.chunk_rows is not None else (recorded.chunk_rows if recorded else 1024)
        if dtype not in DTYPES:
            raise UserError(f"unknown `dtype` {dtype!r}: expected one of {', '.join(DTYPES)}")
        if chunk_rows < 1 or given.batch_size < 1:
            raise UserError("`chunk_rows` and `batch_size` must be at least 1")
        return Resolved(projector, dtype, parameters, chunk_rows)

    def inputs(self, store: str | Path, handle: Store | None) -> tuple[Dataset, ModelSpec, Task]:
        """The train set, model spec and task: as given, else the store's (`handle`, None where
        there is no store yet)."""
        data, model = self.data, self.model
        if handle is None:
            if data is None or model is None:
                raise UserError(f"no trakwomp store at {str(store)!r}; make one with `trakwomp train`, or pass "
                                "`data`, `model` and `checkpoint`")
            return data, model, self.settings.task or task_of_store(None)
        if data is None:
            transform = handle.manifest.model.transform if handle.manifest.model else None
            if transform is not None:
                raise UserError(f"store {handle.location!r} sees its data through the transform {transform!r}; "
                                "trakwomp imports code only when you name it: pass `data` and `transform`")
            data = stored_dataset(handle)
        if model is None:
            if handle.manifest.model is None:
                raise UserError(f"store {handle.location!r} records no model; pass `model`")
            model = ModelSpec.of_store(handle.manifest.model, handle.location)
        return data, model, self.settings.task or stored_task(handle)

    def checked_model(self, data: Dataset, model: ModelSpec, task: Task, output_size: int,
                      resolved: Resolved) -> tuple[FeatureSettings, int]:
        """The model checked on the data; the feature settings, and the batch size that fits in memory."""
        net = model.build(output_size)
        check_model_fits_data(net, data, self.device, model, task, output_size)
        names = select_parameters(net, resolved.parameters)
        projector = resolved.projector or default_projector(count_parameters(net, names))
        features = FeatureSettings.for_model(projector, resolved.dtype, net, names)
        batch_size = batch_size_that_fits(net, data, task, features, self.settings.batch_size, resolved.chunk_rows,
                                          self.device, self.settings.memory_limit, "featurize")
        features.method.check(net, features.layout, names, features.num_params, self.device, task,
                              coverage_batch(data, np.arange(min(len(data), resolved.chunk_rows))))
        return features, batch_size

    def open(self, store: str | Path, plan: FeaturizePlan) -> Store:
        return plan.existing or Store.open(store, create=True)

    def bind(self, handle: Store, plan: FeaturizePlan) -> FeaturizePlan:
        bind_training_inputs(handle, plan.data, plan.model, plan.task)
        handle.bind("featurize", plan.features.record(plan.settings.parameters, plan.settings.chunk_rows),
                    "featurize with the store's projector settings, or use a new store")
        model_ids = register_models(handle, plan.states, self.settings.run, plan.trained)
        return replace(plan, data=as_trained(handle, plan.data), model_ids=tuple(model_ids))

    def work(self, plan: FeaturizePlan) -> Work[tuple[int, int]]:
        chunks = range(math.ceil(len(plan.data) / plan.settings.chunk_rows))
        return Work([(m, c) for m in plan.model_ids for c in chunks], lambda u: paths.unit(*u),
                    "featurize (model, row chunk) units", [paths.FEATURES, paths.done("featurize")])

    def start(self, handle: Store, plan: FeaturizePlan, owned: list, todo: list) -> FeaturizeReport:
        return FeaturizeReport(list(plan.model_ids), units_skipped=len(owned) - len(todo), batch_size=plan.batch_size,
                               left_out=plan.features.left_out())

    def do(self, handle: Store, plan: FeaturizePlan, todo: list, report: FeaturizeReport, progress: Progress):
        return write_features(handle, plan.data, model=plan.model, task=plan.task, features=plan.features, todo=todo,
                              chunk_rows=plan.settings.chunk_rows, batch_size=plan.batch_size, device=self.device,
                              progress=progress, report=report)


def featurize(store: str | Path, data: Dataset | None = None, model: ModelSpec | None = None,
              checkpoints: list[str] | None = None, *, progress: Progress | None = None, **settings) -> FeaturizeReport:
    """Featurize the store's trained reference models (with the checkpoints kept along their runs),
    or the given checkpoints, on the train set. `settings`: `FeaturizeSettings`' fields by
    keyword (projector, dtype, parameters, chunk_rows, batch_size, memory_limit, run, task,
    device, shard), each with its default and meaning there.

    Everything is checked before the store is first written (or created), memory included: the
    batch size is lowered (report.batch_size) if the estimate of trakwomp.features.memory exceeds
    `memory_limit` bytes, and the call refused if one example does not fit."""
    return Featurize(FeaturizeSettings(**settings), data, model, checkpoints).run(store, progress)
