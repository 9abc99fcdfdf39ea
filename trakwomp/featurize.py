"""`featurize`: projected per-example gradients phi_m(x_i) = P_m^T grad f(x_i) and q_m,i = 1 - p_i
for every registered model m and train example i, written to the store in row chunks.

A unit of work is (model id, row chunk); see docs/store.md for the layout.
"""

from __future__ import annotations

import math
from pathlib import Path

from trakwomp.bindings import bind_training_inputs, stored_dataset, stored_task
from trakwomp.data import Dataset
from trakwomp.errors import UserError
from trakwomp.factored import covered_parameters
from trakwomp.features import DTYPES, FeatureSettings, FeaturizeReport, batch_size_that_fits, write_features
from trakwomp.gradients import count_parameters, select_parameters
from trakwomp.models import ModelSpec, check_model_fits_data
from trakwomp.projectors import ProjectorSpec
from trakwomp.registry import read_checkpoints, register_models
from trakwomp.runtime import NoProgress, Progress, Shard, plan_work, resolve_device
from trakwomp.store import Store, layout
from trakwomp.tasks import Classification, Task


FACTORED_FROM_PARAMS = 20_000_000


def default_projector(num_params: int) -> ProjectorSpec:
    """`sjlt` at 16 x 1,024 up to FACTORED_FROM_PARAMS differentiated parameters, `factored` at
    32 x 32 per layer beyond, where `sjlt`'s tables (12 bytes per parameter and block: 3.8 GB at
    20M) and per-example gradients outgrow a machine (docs/performance.md gives the numbers)."""
    return ProjectorSpec("factored" if num_params > FACTORED_FROM_PARAMS else "sjlt")


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
    Everything is checked before the store is first written (or created), memory included: the batch size is
    lowered (report.batch_size) if the estimate of trakwomp.memory exceeds `memory_limit` bytes
    (the most the process may hold; default: what it holds now plus what is free), and the call
    refused if one example does not fit."""
    progress = progress or NoProgress()
    if checkpoints and (data is None or model is None):
        raise UserError("--checkpoint needs --data and --model (the train set and the architecture)")
    if run is not None and not checkpoints:
        raise UserError("--run names the training run of the --checkpoint files; pass them too")
    torch_device = resolve_device(device)
    handle = Store.open_existing(store)
    if handle is None and data is None:
        raise UserError(f"no trakwomp store at {str(store)!r}; make one with `trakwomp train`, or pass --data, "
                        "--model and --checkpoint")
    recorded = handle.manifest.get("featurize", {}) if handle else {}
    if projector is None and recorded:
        projector = ProjectorSpec(**recorded["projector"])
    dtype = dtype or recorded.get("dtype", "float32")
    parameters = parameters if parameters is not None else recorded.get("parameters")
    chunk_rows = chunk_rows if chunk_rows is not None else recorded.get("chunk_rows", 1024)
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if chunk_rows < 1 or batch_size < 1:
        raise UserError("--chunk-rows and --batch-size must be at least 1")
    if data is None:
        transform = handle.manifest.get("model", {}).get("transform")
        if transform is not None:
            raise UserError(f"store {handle.location!r} sees its data through the transform {transform!r}; trakwomp "
                            "imports code only when you name it: pass --data and --transform")
        data = stored_dataset(handle)
    if model is None:
        if "model" not in handle.manifest:
            raise UserError(f"store {handle.location!r} records no model; pass --model")
        model = ModelSpec.of_store(handle.manifest["model"], handle.location)

    if task is None:
        task = stored_task(handle) if handle is not None else Classification()
    output_size = task.output_size(data)
    net = model.build(output_size)
    check_model_fits_data(net, data, torch_device, model, task, output_size)
    parameter_names = select_parameters(net, parameters)
    num_params = count_parameters(net, parameter_names)
    projector = projector or default_projector(num_params)
    if projector.kind == "identity" and projector.dim != num_params:
        raise UserError(f"the identity projector keeps all {num_params} gradient coordinates: pass --blocks B and "
                        f"--block-dim D with B x D = {num_params}")
    settings = FeatureSettings.for_model(projector, dtype, net, parameter_names)
    fitted = batch_size_that_fits(net, data, task, settings, batch_size, chunk_rows, torch_device, memory_limit,
                                  "featurize")
    states = read_checkpoints(model, output_size, checkpoints) if checkpoints else []
    if not states and (handle is None or not handle.done_units("train", "reference")):
        raise UserError(f"store {str(store)!r} has no trained reference models; run `trakwomp train` first or pass "
                        "--checkpoint")
    handle = handle or Store.open(store, create=True)
    bind_training_inputs(handle, data, model, task)
    record = {"projector": settings.projector.as_dict(), "dtype": dtype, "parameters": parameters,
              "num_params": num_params, "chunk_rows": chunk_rows}
    if settings.layers:
        record["layers"] = [layer.as_dict() for layer in settings.layers]
    handle.bind("featurize", record, "featurize with the store's projector settings, or use a new store")
    model_ids = register_models(handle, states, run)

    num_chunks = math.ceil(len(data) / chunk_rows)
    units, todo = plan_work(handle, "featurize", [(m, c) for m in model_ids for c in range(num_chunks)],
                            lambda u: layout.unit(*u), shard, progress, "featurize (model, row chunk) units",
                            ["features", "done/featurize"])
    report = write_features(handle, data, model, task, settings, todo, chunk_rows, fitted, torch_device, progress,
                            prefix="", stage="featurize")
    report.model_ids, report.units_skipped = model_ids, len(units) - len(todo)
    if settings.layers:
        report.left_out = sorted(set(parameter_names) - set(covered_parameters(settings.layers)))
    return report


