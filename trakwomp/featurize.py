"""`featurize`: projected per-example gradients phi_m(x_i) = P_m^T grad f(x_i) and q_m,i = 1 - p_i
for every registered model m and train example i, written to the store in row chunks.

A unit of work is (model id, row chunk); see docs/store.md for the layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trakwomp.data import Dataset, load_dataset
from trakwomp.errors import UserError
from trakwomp.gradients import PerExampleGradients, select_parameters
from trakwomp.models import ModelSpec, load_checkpoint, load_weights, state_hash
from trakwomp.projectors import DenseProjector, ProjectorSpec, SparseProjector, make_projector
from trakwomp.runtime import NoProgress, Progress, Shard, resolve_device
from trakwomp.store import Store
from trakwomp.training import bind_training_inputs, check_model_fits_data, load_batch

DTYPES = ("float32", "float16")
GRADIENT_BUFFER_BYTES = 1 << 30


@dataclass
class FeaturizeReport:
    model_ids: list[int] = field(default_factory=list)
    units_done: int = 0
    units_skipped: int = 0
    examples: int = 0
    seconds: float = 0.0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def stored_dataset(handle: Store, verify: bool = True) -> Dataset:
    """The train set a store was made with (without its transform), reloaded from its recorded
    spec and, if `verify`, checked by fingerprint (which reads every example)."""
    manifest = handle.manifest
    if "dataset_source" not in manifest:
        raise UserError(f"store {handle.location!r} records no dataset yet; pass --data (and --model, --checkpoint)")
    source = manifest["dataset_source"]
    data = load_dataset(source["spec"])
    if source["has_indices"]:
        data = data.select(handle.read_array("data/train_indices"))
    if len(data) != manifest["dataset"]["num_examples"] or (verify and data.fingerprint().as_dict() != manifest["dataset"]):
        raise UserError(f"the data at {source['spec']!r} changed since the store was made (fingerprint differs); "
                        "pass --data with the original data")
    return data


def read_checkpoints(spec: ModelSpec, num_classes: int, checkpoints: list[str]) -> list[tuple[str, dict]]:
    """(path, state_dict) of each checkpoint file, checked to fit the model spec."""
    return [(str(path), load_weights(spec.build(num_classes), load_checkpoint(path), repr(str(path)), spec).state_dict())
            for path in checkpoints]


def register_models(handle: Store, checkpoints: list[tuple[str, dict]]) -> list[int]:
    """Register the models to featurize and return their ids, in registration order.

    Without checkpoints: every finished reference model that `train` put in the store.
    With checkpoints ((path, state_dict) from `read_checkpoints`): each copied into the store."""
    candidates = []  # (sha256, source, weights path), in order
    if checkpoints:
        for path, state in checkpoints:
            digest = state_hash(state)
            weights = f"models/checkpoints/{digest[:16]}/weights"
            if handle.done_info("checkpoints", digest[:16]) is None:
                handle.write_arrays(weights, {k: v.numpy() for k, v in state.items()})
                handle.mark_done("checkpoints", digest[:16])
            candidates.append((digest, path, weights))
    else:
        for name in handle.done_units("train", "reference"):
            weights = f"models/reference/{name}/weights"
            digest = state_hash({k: torch.from_numpy(v) for k, v in handle.read_arrays(weights).items()})
            candidates.append((digest, f"train:reference/{name}", weights))

    def assign_ids(manifest: dict) -> list[int]:
        registry = manifest.setdefault("models", [])
        by_hash = {entry["sha256"]: entry["id"] for entry in registry}
        for digest, source, weights in candidates:
            if digest not in by_hash:
                by_hash[digest] = len(registry)
                registry.append({"id": len(registry), "source": source, "weights": weights, "sha256": digest})
        return [by_hash[digest] for digest, _, _ in candidates]

    return handle.update(assign_ids)


def load_registered_model(handle: Store, model_id: int, spec: ModelSpec, num_classes: int) -> nn.Module:
    entry = handle.manifest["models"][model_id]
    state = {k: torch.from_numpy(v) for k, v in handle.read_arrays(entry["weights"]).items()}
    if state_hash(state) != entry["sha256"]:
        raise UserError(f"store {handle.location!r}: the weights of model {model_id} do not match their recorded hash")
    net = spec.build(num_classes)
    net.load_state_dict(state)
    return net.eval()


def featurize(
    store: str | Path,
    data: Dataset | None = None,
    model: ModelSpec | None = None,
    checkpoints: list[str] | None = None,
    *,
    projector: ProjectorSpec | None = None,
    dtype: str | None = None,
    parameters: list[str] | None = None,
    chunk_rows: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> FeaturizeReport:
    """Featurize the store's trained reference models, or the given checkpoints, on the train set.

    `parameters`: glob patterns of parameter names to take gradients for (all by default).
    `projector`, `dtype`, `parameters` and `chunk_rows` default to the store's, once it has
    features, else to ProjectorSpec(), float32, all parameters and 1024 rows. Everything is
    checked before the store is first written (or created)."""
    progress = progress or NoProgress()
    if checkpoints and (data is None or model is None):
        raise UserError("--checkpoint needs --data and --model (the train set and the architecture)")
    torch_device = resolve_device(device)
    handle = Store.open_existing(store)
    if handle is None and data is None:
        raise UserError(f"no trakwomp store at {str(store)!r}; make one with `trakwomp train`, or pass --data, "
                        "--model and --checkpoint")
    recorded = handle.manifest.get("featurize", {}) if handle else {}
    if projector is None:
        projector = ProjectorSpec(**{k: v for k, v in recorded["projector"].items() if k != "tile_rows"}) if recorded else ProjectorSpec()
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

    net = model.build(data.num_classes)
    check_model_fits_data(net, data, torch_device, model)
    parameter_names = select_parameters(net, parameters)
    num_params = sum(p.numel() for n, p in net.named_parameters() if n in set(parameter_names))
    if projector.kind == "identity" and projector.dim != num_params:
        raise UserError(f"the identity projector keeps all {num_params} gradient coordinates: pass --blocks B and "
                        f"--block-dim D with B x D = {num_params}")
    states = read_checkpoints(model, data.num_classes, checkpoints) if checkpoints else []
    if not states and (handle is None or not handle.done_units("train", "reference")):
        raise UserError(f"store {str(store)!r} has no trained reference models; run `trakwomp train` first or pass "
                        "--checkpoint")
    handle = handle or Store.open(store, create=True)
    bind_training_inputs(handle, data, model)
    handle.bind("featurize", {"projector": projector.as_dict(), "dtype": dtype, "parameters": parameters,
                              "num_params": num_params, "chunk_rows": chunk_rows},
                "featurize with the store's projector settings, or use a new store")
    model_ids = register_models(handle, states)

    settings = FeatureSettings(projector, dtype, parameter_names, num_params)
    num_chunks = math.ceil(len(data) / chunk_rows)
    units = shard.select([(m, c) for m in model_ids for c in range(num_chunks)])
    todo = [(m, c) for m, c in units if handle.done_info("featurize", f"{m:06d}/{c:06d}") is None]
    progress.plan(len(units), len(units) - len(todo), "featurize (model, row chunk) units")
    report = write_features(handle, data, model, settings, todo, chunk_rows, batch_size, torch_device, progress,
                            prefix="", stage="featurize")
    report.model_ids, report.units_skipped = model_ids, len(units) - len(todo)
    return report


@dataclass(frozen=True)
class FeatureSettings:
    """How features are made: the projector, the storage dtype and the parameters differentiated."""

    projector: ProjectorSpec
    dtype: str
    parameter_names: list[str]
    num_params: int

    @classmethod
    def of_store(cls, handle: Store, net: nn.Module) -> "FeatureSettings":
        """The settings the store's train features were made with, for featurizing targets alike."""
        recorded = handle.manifest.get("featurize")
        if recorded is None:
            raise UserError(f"store {handle.location!r} has no features yet; run `trakwomp featurize` first")
        projector = {k: v for k, v in recorded["projector"].items() if k != "tile_rows"}
        names = select_parameters(net, recorded["parameters"])
        return cls(ProjectorSpec(**projector), recorded["dtype"], names, recorded["num_params"])


def write_features(handle: Store, data: Dataset, model: ModelSpec, settings: FeatureSettings,
                   todo: list[tuple[int, int]], chunk_rows: int, batch_size: int, device: torch.device,
                   progress: Progress, prefix: str, stage: str) -> FeaturizeReport:
    """Featurize the (model, row chunk) units `todo` of `data` into
    `<prefix>features/<model>/{phi,q,margins}`, each unit published by a done marker of `stage`."""
    n = len(data)
    projector = settings.projector
    report = FeaturizeReport()
    start = time.perf_counter()
    for model_id in sorted({m for m, _ in todo}):
        net = load_registered_model(handle, model_id, model, data.num_classes)
        engine = PerExampleGradients(net, settings.parameter_names, device)
        projection = make_projector(projector, model_id, settings.num_params, device)
        base = f"{prefix}features/{model_id:06d}"
        phi = handle.require_array(f"{base}/phi", (n, projector.dim), settings.dtype, (chunk_rows, projector.block_dim))
        q = handle.require_array(f"{base}/q", (n,), "float32", (chunk_rows,))
        f = handle.require_array(f"{base}/margins", (n,), "float32", (chunk_rows,))
        for _, chunk in [u for u in todo if u[0] == model_id]:
            rows = range(chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows))
            name = f"model {model_id} rows {rows.start}-{rows.stop - 1}"
            progress.unit_started(name, len(rows))
            features, q_rows, f_rows = featurize_rows(data, rows, engine, projection, batch_size, progress)
            stored = features.numpy().astype(settings.dtype)
            if not np.isfinite(stored).all():
                raise UserError(f"{name}: projected features overflow {settings.dtype}; featurize with --dtype float32")
            phi[rows.start:rows.stop] = stored
            q[rows.start:rows.stop] = q_rows.numpy()
            f[rows.start:rows.stop] = f_rows.numpy()
            handle.mark_done(stage, f"{model_id:06d}/{chunk:06d}", {"rows": [rows.start, rows.stop]})
            report.units_done += 1
            report.examples += len(rows)
            progress.unit_finished(name, f"{len(rows)} examples")
    report.seconds = time.perf_counter() - start
    return report


def featurize_rows(data: Dataset, rows: range, engine: PerExampleGradients, projection: DenseProjector | SparseProjector,
                   batch_size: int, progress: Progress) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected gradients, q and margins of the examples `rows`, as CPU tensors.

    Each batch is projected as soon as it is computed, unless the projection regenerates its
    matrix per call: then gradient rows are gathered up to GRADIENT_BUFFER_BYTES first, so that
    it does so as rarely as memory allows."""
    buffer_rows = batch_size
    if projection.regenerates:
        buffer_rows = max(batch_size, GRADIENT_BUFFER_BYTES // (4 * engine.num_params))
    features, qs, fs, pending = [], [], [], []
    pending_start = rows.start
    for start in range(rows.start, rows.stop, batch_size):
        positions = range(start, min(start + batch_size, rows.stop))
        x, y = load_batch(data, positions)
        out = engine(x, y)
        pending.append(out.grads)
        qs.append(out.q.cpu())
        fs.append(out.margins.cpu())
        if positions.stop - pending_start >= buffer_rows or positions.stop == rows.stop:
            projected = projection.project(pending[0] if len(pending) == 1 else torch.cat(pending)).cpu()
            finite = torch.isfinite(projected).all(dim=1) & torch.isfinite(torch.cat(fs[-len(pending):]))
            bad = (~finite).nonzero().flatten() + pending_start
            if len(bad):
                examples = ", ".join(str(int(i)) for i in bad[:10])
                raise UserError(f"non-finite gradients for train example(s) {examples}; nothing of this chunk was published")
            features.append(projected)
            pending, pending_start = [], positions.stop
        progress.advance(len(positions))
    return torch.cat(features), torch.cat(qs), torch.cat(fs)
