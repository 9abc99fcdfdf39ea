"""The store's model registry: the models that `featurize` attributes, each with an id, the source
it came from (a reference model of `train`, one of the checkpoints kept along its run, or a
checkpoint file), its weights and their hash, and the training run it belongs to.

Every registered model is one member of TRAK's ensemble (M counts members); checkpoints of one
run are members as independent runs are, and the registry records which run each came from."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.models.checkpoints import load_checkpoint, load_weights, state_hash
from trakwomp.models.lora import adapter_state, read_adapter
from trakwomp.models.spec import ModelSpec
from trakwomp.store import Store, paths
from trakwomp.store.records import registering


def read_checkpoints(spec: ModelSpec, output_size: int, checkpoints: list[str]) -> list[tuple[str, dict]]:
    """(path, the weights a store keeps) of each checkpoint: a state_dict file checked to fit the
    model spec, or, for a LoRA model, a peft adapter folder of its base and settings."""
    return [(str(path), checkpoint_state(spec, output_size, str(path))) for path in checkpoints]


def checkpoint_state(spec: ModelSpec, output_size: int, path: str) -> dict:
    net = spec.build(output_size)
    if read_adapter(path) is None:
        return spec.stored_state(load_weights(net, load_checkpoint(path), repr(path), spec))
    adapter = ModelSpec.parse(f"hf:{path}")
    if (adapter.lora, adapter.base_sha256) != (spec.lora, spec.base_sha256):
        raise UserError(f"the adapter in {path!r} is not a fine-tune of the model {spec} (its base or its settings "
                        "differ)")
    return adapter_state(net, path)


def register_models(handle: Store, checkpoints: list[tuple[str, dict]], run: str | None = None,
                    trained: Sequence[tuple[str, dict]] = ()) -> list[int]:
    """Register the models to featurize and return their ids, in registration order.

    Without checkpoints: every finished reference model that `train` put in the store, each with
    the checkpoints kept along its run (`train --save-checkpoints`), in epoch order; the run is
    `train:reference/<index>`.
    With checkpoints ((path, state_dict) from `read_checkpoints`): each copied into the store, all
    members of `run` if given, else each its own run (named by its path). Without checkpoints,
    `trained`: the store's reference models as `trained_models` gave them (checked already)."""
    candidates = []  # (sha256, entry without id), in order
    if checkpoints:
        for path, state in checkpoints:
            digest = state_hash(state)
            weights = paths.weights(paths.user_checkpoint(digest))
            if handle.done_info("checkpoints", paths.short_id(digest)) is None:
                handle.write_arrays(weights, {k: v.numpy() for k, v in state.items()})
                handle.mark_done("checkpoints", paths.short_id(digest))
            candidates.append((digest, {"source": path, "weights": weights, "run": run or path}))
    else:
        candidates = list(trained)

    return handle.update(registering(candidates))


def trained_models(handle: Store) -> list[tuple[str, dict]]:
    """(sha256, registry entry) of every finished reference model of `train` and the checkpoints
    kept along its run, each checked (see `trained_candidates`)."""
    return [candidate for name in handle.done_units("train", "reference")
            for candidate in trained_candidates(handle, name)]


def trained_candidates(handle: Store, name: str) -> list[tuple[str, dict]]:
    """(sha256, entry) of reference model `name` and the checkpoints kept along its run, in epoch
    order, each checked against the hash its run published (stores of trakwomp 0.1 have none): a
    unit whose arrays two runs of it wrote (the same shard run twice, on CUDA say) is refused."""
    info = handle.done_info("train", paths.unit("reference", name))
    if info is None:
        raise UserError(f"store {handle.location!r}: reference model {name} is not trained yet")
    trained_run = f"train:reference/{name}"
    epochs = info.get("checkpoint_epochs") or [None]
    candidates = []
    for epoch in epochs:
        last = epoch == epochs[-1]
        folder = paths.trained_model("reference", name) if last or epoch is None else \
            paths.checkpoint("reference", name, epoch)
        weights = paths.weights(folder)
        digest = state_hash({k: torch.from_numpy(v) for k, v in handle.read_arrays(weights).items()})
        published = info.get("sha256") if last else info.get("checkpoint_sha256", {}).get(str(epoch))
        if published is not None and published != digest:
            raise UserError(f"store {handle.location!r}: the weights in {folder} are not those its training run "
                            f"published (two runs of unit reference/{name} wrote them); remove {folder} and "
                            f"{paths.done('train', paths.unit('reference', name))}, then train it again")
        entry = {"source": trained_run if last else f"{trained_run}@epoch{epoch}", "weights": weights,
                 "run": trained_run}
        candidates.append((digest, entry if epoch is None else {**entry, "epoch": epoch}))
    return candidates


def verified_state(handle: Store, model_id: int) -> dict[str, torch.Tensor]:
    """Registered model `model_id`'s stored weights, checked against the hash its registry
    entry records (weights copied in from elsewhere are refused)."""
    entry = handle.manifest.models[model_id]
    state = {k: torch.from_numpy(v) for k, v in handle.read_arrays(entry.weights).items()}
    if state_hash(state) != entry.sha256:
        raise UserError(f"store {handle.location!r}: the weights of model {model_id} do not match their recorded hash")
    return state


def load_registered_model(handle: Store, model_id: int, spec: ModelSpec, output_size: int) -> nn.Module:
    return spec.load_state(spec.build(output_size), verified_state(handle, model_id))


def check_made_from(handle: Store, stage: str, units: list[str], model_id: int) -> None:
    """Refuse features (the done units `units` of `stage`) that record other weights than
    registered model `model_id`'s (features copied in from another store or model); markers of
    stores made before they recorded weights are taken as they are."""
    digest = handle.manifest.models[model_id].sha256
    for unit in units:
        recorded = (handle.done_info(stage, unit) or {}).get("weights_sha256", digest)
        if recorded != digest:
            raise UserError(f"store {handle.location!r}: the features {stage}/{unit} were made from other weights than "
                            f"model {model_id}'s (sha256 {recorded[:16]}, not {digest[:16]}); remove them and "
                            "featurize again")
