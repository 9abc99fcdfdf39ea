"""The store's model registry: the models that `featurize` attributes, each with an id, the source
it came from (a reference model of `train`, or a checkpoint file), its weights and their hash."""

from __future__ import annotations

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.models import ModelSpec, load_checkpoint, load_weights, state_hash
from trakwomp.store import Store, layout


def read_checkpoints(spec: ModelSpec, output_size: int, checkpoints: list[str]) -> list[tuple[str, dict]]:
    """(path, state_dict) of each checkpoint file, checked to fit the model spec."""
    return [(str(path), load_weights(spec.build(output_size), load_checkpoint(path), repr(str(path)), spec).state_dict())
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
            weights = f"{layout.trained_model('reference', name)}/weights"
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


def load_registered_model(handle: Store, model_id: int, spec: ModelSpec, output_size: int) -> nn.Module:
    entry = handle.manifest["models"][model_id]
    state = {k: torch.from_numpy(v) for k, v in handle.read_arrays(entry["weights"]).items()}
    if state_hash(state) != entry["sha256"]:
        raise UserError(f"store {handle.location!r}: the weights of model {model_id} do not match their recorded hash")
    net = spec.build(output_size)
    net.load_state_dict(state)
    return net.eval()
