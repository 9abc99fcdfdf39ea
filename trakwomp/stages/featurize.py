"""`featurize`: projected per-example gradients phi_m(x_i) = P_m^T grad f(x_i) and q_m,i = 1 - p_i
for every registered model m and train example i, written to the store in row chunks.

A unit of work is (model id, row chunk); see docs/store.md for the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trakwomp.data.base import Dataset
from trakwomp.errors import UserError
from trakwomp.features.gradients import count_parameters, select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.features.writer import (
    DTYPES,
    FeatureSettings,
    FeaturizeReport,
    batch_size_that_fits,
    coverage_batch,
    write_features,
)
from trakwomp.models.registry import read_checkpoints, register_models, trained_models
from trakwomp.models.spec import ModelSpec, check_model_fits_data
from trakwomp.runtime import Progress, Shard
from trakwomp.settings import option
from trakwomp.stages.bindings import as_trained, bind_training_inputs, stored_dataset, stored_task
from trakwomp.stages.skeleton import RunSettings, Stage, Work
from trakwomp.store import Store, layout
from trakwomp.tasks.base import Task
from trakwomp.tasks.registry import task_of_store

FACTORED_FROM_PARAMS = 20_000_000


def default_projector(num_params: int) -> ProjectorSpec:
    """`sjlt` at 16 x 1,024 up to FACTORED_FROM_PARAMS differentiated parameters, `factored` at
    32 x 32 per layer beyond, where `sjlt`'s tables (12 bytes per parameter and block: 3.8 GB at
    20M) and per-example gradients outgrow a machine (docs/performance.md gives the numbers)."""
    return ProjectorSpec("factored" if num_params > FACTORED_FROM_PARAMS else "sjlt")


@dataclass(frozen=True)
class FeaturizeSettings(RunSettings):
    """How `featurize` makes features; None: the store's, once it has features, else the default."""

    projector: ProjectorSpec | None = option(None, "The projection [default: the store's, else `default_projector`].")
    dtype: str | None = option(None, "Storage dtype of the features: float32 or float16 [default: the store's, else "
                                     "float32].")
    parameters: list[str] | None = option(None, "Glob of parameter names to take gradients for; repeatable. Default: "
                                                "the store's, else all.")
    chunk_rows: int | None = option(None, "Train examples per stored chunk and per unit of work [default: the store's, "
                                          "else 1024].")
    batch_size: int = option(64, "Examples per gradient batch (lowered, and said, if it would not fit in memory).")
    memory_limit: int | None = option(None, "The most memory the process may hold while featurizing, in bytes (on "
                                            "CUDA: of the GPU's) [default: what it holds now plus what is free]; "
                                            "checked before any work.")
    run: str | None = option(None, "Name of the one training run the checkpoints come from: they become members of "
                                   "one model's ensemble [default: each file its own run].")
    task: Task | None = option(None, "With checkpoints in a new store: the task [default: the store's, else "
                                     "classification].")


class Featurize(Stage[tuple[int, int], FeaturizeReport]):
    """Units (model, row chunk): projected gradients, q and f of the chunk's train examples."""

    stage = "featurize"

    def __init__(self, settings: FeaturizeSettings, data: Dataset | None = None, model: ModelSpec | None = None,
                 checkpoints: list[str] | None = None):
        super().__init__(settings)
        self.data, self.model = data, model
        adapter = [model.adapter] if model is not None and model.adapter is not None else []
        self.checkpoints = checkpoints or adapter  # --model hf:ADAPTER: the adapter's weights, unless others given

    def check(self, store: str | Path) -> Store | None:
        """Resolve the inputs and settings (the store's where not given), then check the model
        fits the data and the memory, all before the store is first written (or created)."""
        given = self.settings
        if self.checkpoints and (self.data is None or self.model is None):
            raise UserError("--checkpoint needs --data and --model (the train set and the architecture)")
        if given.run is not None and not self.checkpoints:
            raise UserError("--run names the training run of the --checkpoint files; pass them too")
        handle = Store.open_existing(store)
        if handle is None and self.data is None:
            raise UserError(f"no trakwomp store at {str(store)!r}; make one with `trakwomp train`, or pass --data, "
                            "--model and --checkpoint")
        self.resolve_settings(handle)
        self.resolve_inputs(handle)
        self.check_model()
        self.states = read_checkpoints(self.model, self.output_size, self.checkpoints) if self.checkpoints else []
        if not self.states and (handle is None or not handle.done_units("train", "reference")):
            raise UserError(f"store {str(store)!r} has no trained reference models; run `trakwomp train` first or "
                            "pass --checkpoint")
        self.trained = [] if self.states else trained_models(handle)  # their weights checked before any write
        return handle

    def resolve_settings(self, handle: Store | None) -> None:
        """dtype, parameters and chunk rows: as given, else the store's, else the defaults."""
        given = self.settings
        recorded = handle.manifest.get("featurize", {}) if handle else {}
        self.projector = given.projector or (ProjectorSpec(**recorded["projector"]) if recorded else None)
        self.dtype = given.dtype or recorded.get("dtype", "float32")
        self.parameters = given.parameters if given.parameters is not None else recorded.get("parameters")
        self.chunk_rows = given.chunk_rows if given.chunk_rows is not None else recorded.get("chunk_rows", 1024)
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.chunk_rows < 1 or given.batch_size < 1:
            raise UserError("--chunk-rows and --batch-size must be at least 1")

    def resolve_inputs(self, handle: Store | None) -> None:
        """The train set, model spec and task: as given, else the store's."""
        if self.data is None:
            transform = handle.manifest.get("model", {}).get("transform")
            if transform is not None:
                raise UserError(f"store {handle.location!r} sees its data through the transform {transform!r}; "
                                "trakwomp imports code only when you name it: pass --data and --transform")
            self.data = stored_dataset(handle)
        if self.model is None:
            if "model" not in handle.manifest:
                raise UserError(f"store {handle.location!r} records no model; pass --model")
            self.model = ModelSpec.of_store(handle.manifest["model"], handle.location)
        self.task = self.settings.task or (stored_task(handle) if handle is not None else task_of_store(None))

    def check_model(self) -> None:
        """The model on the data, the feature settings, and the batch size that fits in memory."""
        self.output_size = self.task.output_size(self.data)
        net = self.model.build(self.output_size)
        check_model_fits_data(net, self.data, self.device, self.model, self.task, self.output_size)
        names = select_parameters(net, self.parameters)
        projector = self.projector or default_projector(count_parameters(net, names))
        self.features = FeatureSettings.for_model(projector, self.dtype, net, names)
        self.batch_size = batch_size_that_fits(net, self.data, self.task, self.features, self.settings.batch_size,
                                               self.chunk_rows, self.device, self.settings.memory_limit, "featurize")
        self.features.method.check(net, self.features.layout, names, self.features.num_params, self.device, self.task,
                                   coverage_batch(self.data, np.arange(min(len(self.data), self.chunk_rows))))

    def open(self, store: str | Path, handle: Store | None) -> Store:
        return handle or Store.open(store, create=True)

    def bind(self, handle: Store) -> None:
        bind_training_inputs(handle, self.data, self.model, self.task)
        self.data = as_trained(handle, self.data)
        handle.bind("featurize", self.features.record(self.parameters, self.chunk_rows),
                    "featurize with the store's projector settings, or use a new store")
        self.model_ids = register_models(handle, self.states, self.settings.run, self.trained)

    def work(self, handle: Store) -> Work[tuple[int, int]]:
        chunks = range(math.ceil(len(self.data) / self.chunk_rows))
        return Work([(m, c) for m in self.model_ids for c in chunks], lambda u: layout.unit(*u),
                    "featurize (model, row chunk) units", [layout.FEATURES, layout.done("featurize")])

    def start(self, handle: Store, owned: list, todo: list) -> FeaturizeReport:
        return FeaturizeReport(self.model_ids, units_skipped=len(owned) - len(todo), batch_size=self.batch_size,
                               left_out=self.features.left_out())

    def do(self, handle: Store, todo: list, report: FeaturizeReport, progress: Progress):
        return write_features(handle, self.data, self.model, self.task, self.features, todo, self.chunk_rows,
                              self.batch_size, self.device, progress, "", report)


def featurize(
    store: str | Path,
    data: Dataset | None = None,
    model: ModelSpec | None = None,
    checkpoints: list[str] | None = None,
    *,
    run: str | None = None,
    task: Task | None = None,
    projector: ProjectorSpec | None = None,
    dtype: str | None = None,
    parameters: list[str] | None = None,
    chunk_rows: int | None = None,
    batch_size: int = 64,
    memory_limit: int | None = None,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> FeaturizeReport:
    """Featurize the store's trained reference models (with the checkpoints kept along their runs),
    or the given checkpoints, on the train set.

    `run`: the name of the one training run the `checkpoints` come from (so that the store records
    them as members of one model's ensemble); default: each checkpoint is its own run.
    `task`: default the store's (classification for a new store).
    `parameters`: glob patterns of parameter names to take gradients for (all by default).
    `projector`, `dtype`, `parameters` and `chunk_rows` default to the store's, once it has
    features, else to `default_projector` of the model, float32, all parameters and 1024 rows.
    Everything is checked before the store is first written (or created), memory included: the
    batch size is lowered (report.batch_size) if the estimate of trakwomp.features.memory exceeds
    `memory_limit` bytes (the most the process may hold; default: what it holds now plus what is
    free), and the call refused if one example does not fit."""
    settings = FeaturizeSettings(device, shard, projector, dtype, parameters, chunk_rows, batch_size, memory_limit,
                                 run, task)
    return Featurize(settings, data, model, checkpoints).run(store, progress)
