"""What a store is bound to: its task, its train set (by fingerprint and where it was found, with
the tokenizer that read it) and its model spec."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from trakwomp.data.base import Dataset, TokenizedTexts
from trakwomp.data.groups import Groups, read_groups_file, sources_of
from trakwomp.data.specs import dataset_kind, load_dataset
from trakwomp.errors import UserError
from trakwomp.models.spec import ModelSpec
from trakwomp.store import Store, paths
from trakwomp.tasks.base import Task
from trakwomp.tasks.registry import task_of_store

BIND_HINT = "use a new store for other data or another model"


def bind_model(handle: Store, model: ModelSpec, transform: str | None) -> None:
    """Record (or check) the model spec, and the transform of its inputs, that a store is made for."""
    handle.bind("model", {**model.as_dict(), "transform": transform}, BIND_HINT)


def check_model_bound(handle: Store, model: ModelSpec, transform: str | None) -> None:
    """Refuse what `bind_model` would refuse; writes nothing."""
    handle.check_bound("model", {**model.as_dict(), "transform": transform}, BIND_HINT)


def bind_tokenizer(handle: Store, data: Dataset) -> None:
    """Record (or check) the tokenizer of a store's text (its vocabulary, wherever it lies)."""
    check_tokenizer(handle, data)
    if isinstance(data, TokenizedTexts):
        handle.bind("tokenizer", data.tokenizer.record(), BIND_HINT)


def check_tokenizer(handle: Store, data: Dataset) -> None:
    """Refuse text read with another tokenizer than the store's; a store of images or arrays
    refuses text, and a store of text refuses anything else. Writes nothing."""
    tokenizer = data.tokenizer if isinstance(data, TokenizedTexts) else None
    recorded = handle.manifest.tokenizer
    if tokenizer is None:
        if recorded is None:
            return
        raise UserError(f"store {handle.location!r} holds text read with the tokenizer {recorded.spec!r}; "
                        f"{data.spec} is not text")
    if recorded is None and handle.manifest.dataset is not None:
        raise UserError(f"store {handle.location!r} holds images or arrays, not text; {data.spec} is text")
    if recorded is not None and recorded.json != tokenizer.record():
        size = f", a vocabulary of {recorded.vocab_size}" if recorded.vocab_size is not None else ""
        raise UserError(f"the tokenizer {tokenizer.spec} differs from the one store {handle.location!r} was made with "
                        f"({recorded.spec}{size}); pass `tokenizer` as given to `trakwomp train`")


def bind_task(handle: Store, task: Task) -> None:
    """Record (or check) the task a store is made for."""
    if handle.manifest.task is not None and stored_task(handle) != task:
        raise UserError(f"store {handle.location!r} was made for the task {stored_task(handle)}, not {task}; "
                        "use a new store for another task")
    handle.bind("task", task.as_dict(), BIND_HINT)


def bind_training_inputs(handle: Store, data: Dataset, model: ModelSpec, task: Task) -> None:
    """Record (or check) the task, train set and model spec that a store is made for."""
    bind_task(handle, task)
    bind_tokenizer(handle, data)
    handle.bind("dataset", data.fingerprint().as_dict(), BIND_HINT)
    bind_model(handle, model, data.transform_spec)
    if handle.manifest.dataset_source is None:  # where the data was first found; a moved copy is the same data
        handle.set_section("dataset_source", {"spec": data.spec, "has_indices": data.has_explicit_indices,
                                              **data.source_record()})
    if data.has_explicit_indices and handle.done_info("data", "train_indices") is None:
        handle.write_array(paths.TRAIN_INDICES, data.indices)
        handle.mark_done("data", "train_indices")


def recorded_data(handle: Store, spec: str | None, sha256: str, what: str, hint: str) -> Dataset:
    """Data a store records by its spec and fingerprint (scored targets, LDS targets), read again
    and checked: a spec not recorded, or data changed since, is refused in one line ending `hint`."""
    if spec is None:
        raise UserError(f"the store does not record where the {what} were read from; {hint}")
    data = load_store_data(handle.location, spec)
    if data.fingerprint().sha256 != sha256:
        raise UserError(f"the {what} at {spec!r} are not those the store recorded (fingerprint differs); {hint}")
    return data


def load_store_data(store: str | Path, spec: str, indices=None, transform: str | None = None, tokenizer: str | None = None,
                    max_length: int | None = None) -> Dataset:
    """Data (train examples or targets) for the store `store`: text is read with the store's
    tokenizer and cut at its --max-length unless others are given (and then checked against
    the store's)."""
    handle = Store.open_existing(store)
    source = handle.manifest.dataset_source if handle is not None else None
    if dataset_kind(spec).tokenized and source is not None:
        tokenizer = tokenizer or source.tokenizer
        max_length = max_length if max_length is not None else source.max_length
    return load_dataset(spec, indices, transform, tokenizer=tokenizer, max_length=max_length)


def refuse_transform(handle: Store, needed_by: str) -> None:
    """Refuse a store that sees its data through a user transform: trakwomp imports code only when
    the user names it, and `needed_by` (a baseline, verify) reads the data without one."""
    transform = handle.manifest.model_record().transform
    if transform is not None:
        raise UserError(f"store {handle.location!r} sees its data through the transform {transform!r}, "
                        f"which {needed_by} does not import")


def stored_task(handle: Store) -> Task:
    return task_of_store(handle.manifest.task)


def stored_dataset(handle: Store) -> Dataset:
    """The train set a store was made with (without its transform), reloaded from its recorded
    spec (and tokenizer) and checked by fingerprint (which reads every example): data edited or
    reordered since is refused, wherever train examples are featurized, shown or grouped."""
    source, recorded = handle.manifest.dataset_source, handle.manifest.dataset
    if source is None or recorded is None:
        raise UserError(f"store {handle.location!r} records no dataset yet; pass `data` (and `model`, `checkpoint`)")
    data = load_dataset(source.spec, tokenizer=source.tokenizer, max_length=source.max_length)
    if source.has_indices:
        data = data.select(handle.read_array(paths.TRAIN_INDICES))
    if len(data) != recorded.num_examples or data.fingerprint().as_dict() != recorded.json:
        raise UserError(f"the data at {source.spec!r} changed since the store was made (fingerprint differs); "
                        "put the original data back there (featurize also takes it as `data`)")
    return data


def as_trained(handle: Store, data: Dataset) -> Dataset:
    """The train set as the store's reference models were trained on it: with the prompts' tokens
    predicted too if their recipe says --train-on-prompt (per-example gradients are those of the
    loss the model was trained on)."""
    recipe = handle.manifest.train_reference
    return data.predicting_prompts() if recipe is not None and recipe.train_on_prompt else data


def stored_groups(handle: Store) -> Groups | None:
    recorded = handle.manifest.groups
    if recorded is None:
        return None
    codes = handle.read_array(paths.GROUP_CODES)
    names = recorded.names if recorded.names is not None else \
        Groups.decoded_names(handle.read_array(paths.GROUP_NAMES), handle.read_array(paths.GROUP_NAME_ENDS))
    groups = Groups(names, codes, recorded.origin)
    if groups.sha256 != recorded.sha256:
        raise handle.damaged("its groups (groups/codes does not match the recorded SHA-256)")
    return groups


def check_groups(handle: Store, groups: Groups) -> None:
    """Refuse `groups` that do not cover the store's train set or differ from those it records."""
    recorded, dataset = handle.manifest.groups, handle.manifest.dataset
    num_examples = dataset.num_examples if dataset is not None else len(groups.codes)
    if len(groups.codes) != num_examples:
        raise UserError(f"the groups ({groups.origin}) cover {len(groups.codes)} examples, but the store's train set "
                        f"has {num_examples}")
    if recorded is not None and recorded.sha256 != groups.sha256:
        raise UserError(f"the groups of {groups.origin} ({len(groups.names)} groups) differ from those store "
                        f"{handle.location!r} records ({recorded.origin}, {recorded.count} groups); "
                        "leave out `groups` to use the store's, or use a new store")


def bind_groups(handle: Store, groups: Groups) -> None:
    """Record `groups` in the store, or check them against those it records."""
    check_groups(handle, groups)
    if handle.manifest.groups is None:
        joined, ends = groups.encoded_names()
        handle.write_array(paths.GROUP_NAMES, joined, chunks=(max(1, min(len(joined), 1 << 22)),))
        handle.write_array(paths.GROUP_NAME_ENDS, ends)
        handle.write_array(paths.GROUP_CODES, groups.codes)
        handle.set_section("groups", groups.record())


def choose_groups(handle: Store | None, given: Groups | str | Path | None, num_examples: int,
                  data: Callable[[], Dataset]) -> Groups:
    """The groups of a train set of `num_examples`: `given` (Groups, or a groups file) if any,
    else those the store records, else the sources of the train set (`data()`, called only
    then). Nothing is recorded."""
    if isinstance(given, (str, Path)):
        return read_groups_file(given, num_examples)
    if given is not None:
        return given
    recorded = stored_groups(handle) if handle is not None else None
    return recorded if recorded is not None else sources_of(data())


def resolve_groups(handle: Store, given: Groups | str | Path | None) -> Groups:
    """The groups of a store's train set (see `choose_groups`), recorded in the store."""
    groups = choose_groups(handle, given, handle.manifest.num_examples,
                           lambda: stored_dataset(handle))
    bind_groups(handle, groups)
    return groups
