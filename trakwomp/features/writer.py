"""Features: projected per-example gradients phi_m(x) = P_m^T grad f(x), q = 1 - p and margins
f(x), computed for row chunks of a dataset and written to the store, for train examples
(`featurize`) and for targets (`score`) alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from trakwomp.data.base import Batch, Dataset, length_sorted, load_batch
from trakwomp.errors import UserError
from trakwomp.features.base import GradientEngine
from trakwomp.features.settings import FeatureSettings
from trakwomp.models.registry import load_registered_model
from trakwomp.models.spec import ModelSpec
from trakwomp.runtime import Progress
from trakwomp.store import Store, paths
from trakwomp.tasks.base import Task

@dataclass
class FeaturizeReport:
    model_ids: list[int] = field(default_factory=list)
    units_done: int = 0
    units_skipped: int = 0
    examples: int = 0
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)  # chosen parameters a factored projection leaves out
    batch_size: int = 0  # the batch size used: the one asked for, or a smaller one that fits in memory

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def coverage_batch(data: Dataset, rows: np.ndarray) -> Batch:
    """The examples of `rows` that `data.coverage_probe` picks, as one batch."""
    return load_batch(data, data.coverage_probe(rows))


def write_features(handle: Store, data: Dataset, *, model: ModelSpec, task: Task, features: FeatureSettings,
                   todo: list[tuple[int, int]], chunk_rows: int, batch_size: int, device: torch.device,
                   progress: Progress, report: FeaturizeReport,
                   prefix: str = "") -> Iterator[tuple[tuple[int, int], dict]]:
    """Featurize the (model, row chunk) units `todo` of `data` into
    `<prefix>features/<model>/{phi,q,margins}` (margins: the task's outputs f, `paths.outputs`), yielding each unit
    with its done marker's info (its rows, and the hash of the weights they came from) once its
    rows are written (the caller publishes it)."""
    n = len(data)
    start = time.perf_counter()
    for model_id in sorted({m for m, _ in todo}):
        net = load_registered_model(handle, model_id, model, task.output_size(data))
        engine = features.method.engine(net, features.layout, features.parameter_names, features.num_params, model_id,
                                        device, task)
        weights = handle.manifest.models[model_id].sha256
        first = min(c for m, c in todo if m == model_id)
        engine.check(coverage_batch(data, np.arange(first * chunk_rows, min(n, (first + 1) * chunk_rows))))
        base = paths.features(model_id, prefix)
        phi = handle.require_array(f"{base}/phi", (n, features.dims), features.dtype,
                                   (chunk_rows, features.projector.block_dim))
        q = handle.require_array(f"{base}/q", (n,), "float32", (chunk_rows,))
        f = handle.require_array(paths.outputs(base), (n,), "float32", (chunk_rows,))
        for _, chunk in [u for u in todo if u[0] == model_id]:
            rows = range(chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows))
            name = f"model {model_id} rows {rows.start}-{rows.stop - 1}"
            progress.unit_started(name, len(rows))
            projected, q_rows, f_rows = featurize_rows(data, rows, engine, batch_size, progress)
            stored = projected.numpy().astype(features.dtype)
            if not np.isfinite(stored).all():
                raise UserError(f"{name}: projected features overflow {features.dtype}; featurize with `dtype` float32")
            phi[rows.start:rows.stop] = stored
            q[rows.start:rows.stop] = q_rows.numpy()
            f[rows.start:rows.stop] = f_rows.numpy()
            yield (model_id, chunk), {"rows": [rows.start, rows.stop], "weights_sha256": weights}
            report.units_done += 1
            report.examples += len(rows)
            progress.unit_finished(name, f"{len(rows)} examples")
    report.seconds = time.perf_counter() - start


def featurize_rows(data: Dataset, rows: range, engine: GradientEngine, batch_size: int,
                   progress: Progress) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected gradients, q and outputs f of the examples `rows`, as CPU tensors in row order.

    Texts are batched in order of length (so that batches pad little) and put back in row order.
    The engine's rows are projected once `engine.rows_per_projection` of them are gathered."""
    order = length_sorted(data, np.arange(rows.start, rows.stop))
    buffer_rows = engine.rows_per_projection(batch_size)
    features, qs, fs, pending = [], [], [], []
    pending_start = 0
    for start in range(0, len(order), batch_size):
        positions = order[start:start + batch_size]
        out = engine(load_batch(data, positions))
        pending.append(out.rows)
        qs.append(out.q.cpu())
        fs.append(out.outputs.cpu())
        stop = start + len(positions)
        if stop - pending_start >= buffer_rows or stop == len(order):
            gathered = pending[0] if len(pending) == 1 else torch.cat(pending)
            projected = engine.project(gathered).cpu()
            finite = torch.isfinite(projected).all(dim=1) & torch.isfinite(torch.cat(fs[-len(pending):]))
            bad = order[pending_start:stop][~finite.numpy()]
            if len(bad):
                examples = ", ".join(str(int(i)) for i in sorted(bad)[:10])
                raise UserError(f"non-finite gradients for example(s) {examples}; nothing of this chunk was published")
            features.append(projected)
            pending, pending_start = [], stop
        progress.advance(len(positions))
    back = torch.from_numpy(np.argsort(order, kind="stable"))
    return torch.cat(features)[back], torch.cat(qs)[back], torch.cat(fs)[back]
