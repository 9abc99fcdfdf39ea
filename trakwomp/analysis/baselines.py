"""Baselines an LDS table shows beside TRAK's views: scores made without TRAK's estimator.

- `gradcos`: the cosine of the projected gradients, cos(phi_m(z), phi_m(x_i)), averaged over the
  models m: TracIn at the final weights, normalized, with neither the Gram inverse nor q. It
  reads the features `featurize` and `score` stored (the LDS targets must be scored), the train
  features chunk by chunk.
- `repsim`: the cosine of the models' last hidden representations, cos(h_m(z), h_m(x_i)),
  averaged over the models: h is the input of the model's last `nn.Linear` (its output layer, for
  every built-in and Hugging Face model), pooled over a text's tokens by the task.
- `bm25`: Okapi BM25 (Lucene's, k1 = 1.5, b = 0.75, without the constant factor k1 + 1) of the
  target's text as a query against each train text, with words of two or more letters,
  lowercased (the `bm25s` package, extra `baselines`; text data only).

An LDS of a baseline correlates each LDS model's actual output with the sum of the baseline's
scores over its train subset, exactly as for TRAK's scores; baselines are not soft-thresholded.
Baselines are `Baseline`s in the registry BASELINES (other packages' through the entry point
group `trakwomp.baselines`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
import torch
from torch import nn

from trakwomp.data.base import Dataset, TokenizedTexts, capable, length_sorted, load_batch
from trakwomp.errors import UserError
from trakwomp.models.registry import load_registered_model
from trakwomp.models.spec import ModelSpec
from trakwomp.registry import Registry
from trakwomp.stages.bindings import recorded_data, refuse_transform, stored_dataset, stored_task
from trakwomp.store import Store, paths

TARGET_ROWS = 256  # targets per chunk of baseline scores
Chunks = Callable[[], Iterator[tuple[range, np.ndarray]]]  # (targets, their (targets, n_train) scores)


@dataclass(frozen=True)
class BaselineInputs:
    """What a baseline reads: the store, the models (registered ids) and the targets'
    fingerprint (the LDS targets, or those `verify` ranks removals for), with the number of
    targets and train examples the scores must have."""

    handle: Store
    model_ids: list[int]
    targets_sha: str
    num_targets: int
    num_train: int
    device: torch.device


class Baseline(ABC):
    """A way to score train examples for targets without TRAK (`--baseline NAME`)."""

    name: ClassVar[str]
    help: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            BASELINES.add(cls.name, cls)

    @abstractmethod
    def chunks(self, inputs: BaselineInputs) -> Chunks:
        """The scores, chunk by chunk of targets (all checks done before the first chunk)."""


BASELINES: Registry[Baseline] = Registry("trakwomp.baselines", "`baseline`", lambda cls: cls(),
                                         builtins=("trakwomp.analysis.baselines",))


def baseline_help() -> str:
    """The --baseline help, made from the registry."""
    names = "; ".join(f"{name}: {baseline.help}" for name, baseline in BASELINES.items())
    return (f"A baseline's row beside the views, never thresholded; repeatable. {names} "
            "(docs/method.md).")


def unit_rows(rows: ArrayLike) -> np.ndarray:
    """Each row divided by its Euclidean norm (a zero row stays zero), float32."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def mean_cosines(targets: list, train: list, num_targets: int, num_train: int, train_rows: int) -> Chunks:
    """Chunks of the mean over models m of cos(targets[m][z], train[m][i]): `targets[m]` and
    `train[m]` are arrays of rows (in memory or stored), the train rows read `train_rows` at a time."""
    def chunks():
        for start in range(0, num_targets, TARGET_ROWS):
            rows = range(start, min(start + TARGET_ROWS, num_targets))
            total = np.zeros((len(rows), num_train), np.float32)
            for z, x in zip(targets, train, strict=True):
                z = unit_rows(z[rows.start:rows.stop])
                for first in range(0, num_train, train_rows):
                    total[:, first:first + train_rows] += z @ unit_rows(x[first:first + train_rows]).T
            yield rows, total / len(train)

    return chunks


class GradientCosine(Baseline):
    name, help = "gradcos", "cosine of the projected gradients, no inverse (TracIn at the final weights)"

    def chunks(self, inputs: BaselineInputs) -> Chunks:
        handle, targets_id = inputs.handle, paths.short_id(inputs.targets_sha)
        chunk_rows = handle.manifest.featurize_record().chunk_rows
        chunks = -(-inputs.num_targets // chunk_rows)
        for m in inputs.model_ids:
            done = len(handle.done_units(paths.target_features_stage(targets_id), paths.unit(m)))
            if done < chunks:
                raise UserError(f"the gradcos baseline reads the LDS targets' features, which model {m} has for "
                                f"{done} of {chunks} chunks; run `trakwomp score` on the LDS targets first")

        prefix = paths.targets_prefix(targets_id)  # the train features are read by stored chunk, as score does
        return mean_cosines([handle.array(f"{paths.features(m, prefix)}/phi") for m in inputs.model_ids],
                            [handle.array(f"{paths.features(m)}/phi") for m in inputs.model_ids],
                            inputs.num_targets, inputs.num_train, chunk_rows)


def baseline_targets(handle: Store, targets_sha: str, needed_by: str) -> Dataset:
    """The targets a baseline scores (a scored target set, or the LDS targets), read again from
    their recorded spec and checked by fingerprint."""
    scored, source = handle.manifest.targets.get(paths.short_id(targets_sha)), handle.manifest.lds_targets_source
    spec = scored.spec if scored is not None else None
    if spec is None and source is not None:
        spec = source.spec
    return recorded_data(handle, spec, targets_sha, "targets",
                         f"the {needed_by} baseline reads them: put them back where they were")


@torch.no_grad()
def representations(net: nn.Module, data: Dataset, pool, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(examples, h): the input of `net`'s last nn.Linear on each example, pooled by `pool`."""
    linears = [module for module in net.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError("the repsim baseline reads the input of the model's output layer (its last nn.Linear); "
                        "this model has none")
    seen: list[torch.Tensor] = []
    hook = linears[-1].register_forward_hook(lambda module, args, output: seen.append(args[0]))
    out, order = None, length_sorted(data, np.arange(len(data)))
    try:
        net.to(device).eval()
        for start in range(0, len(order), batch_size):
            positions = order[start:start + batch_size]
            batch = load_batch(data, positions).to(device)
            seen.clear()
            net(*batch.inputs)
            pooled = pool(seen[-1], batch).float().cpu().numpy()
            out = np.empty((len(data), pooled.shape[1]), np.float32) if out is None else out
            out[positions] = pooled
    finally:
        hook.remove()
    assert out is not None
    return out


class RepresentationCosine(Baseline):
    name, help = "repsim", "cosine of the model's last hidden representations (the input of its output layer)"

    def chunks(self, inputs: BaselineInputs) -> Chunks:
        handle = inputs.handle
        refuse_transform(handle, "the repsim baseline")
        model = handle.manifest.model_record()
        train, task = stored_dataset(handle), stored_task(handle)
        targets = baseline_targets(handle, inputs.targets_sha, "repsim")
        spec, output_size = ModelSpec.of_store(model, handle.location), task.output_size(train)
        nets = [load_registered_model(handle, m, spec, output_size) for m in inputs.model_ids]
        return mean_cosines([representations(net, targets, task.representation, inputs.device) for net in nets],
                            [representations(net, train, task.representation, inputs.device) for net in nets],
                            inputs.num_targets, inputs.num_train, inputs.num_train)


def import_bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise UserError("the bm25 baseline needs the `bm25s` package: pip install 'trakwomp[baselines]'") from None
    return bm25s


class Bm25(Baseline):
    name, help = "bm25", "Okapi BM25 of the target's text against each train text (text data; bm25s)"

    def chunks(self, inputs: BaselineInputs) -> Chunks:
        bm25s = import_bm25s()
        handle = inputs.handle
        train = capable(stored_dataset(handle), TokenizedTexts, "the bm25 baseline")
        targets = capable(baseline_targets(handle, inputs.targets_sha, "bm25"), TokenizedTexts, "the bm25 baseline")
        words = {"stopwords": None, "show_progress": False}
        index = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        index.index(bm25s.tokenize([train.text(i) for i in range(len(train))], **words), show_progress=False)
        queries = bm25s.tokenize([targets.text(i) for i in range(len(targets))], return_ids=False, **words)

        def chunks():
            for start in range(0, len(queries), TARGET_ROWS):
                rows = range(start, min(start + TARGET_ROWS, len(queries)))
                yield rows, np.stack([index.get_scores(queries[t]) if queries[t] else np.zeros(len(train))
                                      for t in rows]).astype(np.float32)

        return chunks
