"""What a store is bound to: its train set (by fingerprint and where it was found) and its model spec."""

from __future__ import annotations

from trakwomp.data import Dataset, load_dataset
from trakwomp.errors import UserError
from trakwomp.models import ModelSpec
from trakwomp.store import Store


BIND_HINT = "use a new store for other data or another model"


def bind_model(store: Store, model: ModelSpec, transform: str | None) -> None:
    """Record (or check) the model spec, and the transform of its inputs, that a store is made for."""
    store.bind("model", {**model.as_dict(), "transform": transform}, BIND_HINT)


def bind_training_inputs(store: Store, data: Dataset, model: ModelSpec) -> None:
    """Record (or check) the train set and model spec that a store is made for."""
    store.bind("dataset", data.fingerprint().as_dict(), BIND_HINT)
    bind_model(store, model, data.transform_spec)
    if "dataset_source" not in store.manifest:  # where the data was first found; a moved copy is the same data
        store.set_section("dataset_source", {"spec": data.spec, "has_indices": data.has_explicit_indices})
    if data.has_explicit_indices and store.done_info("data", "train_indices") is None:
        store.write_array("data/train_indices", data.indices)
        store.mark_done("data", "train_indices")


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
