"""The manifest as typed records: one frozen dataclass per section, parsed from the JSON the store
keeps, and checked as it is parsed, whenever a store is opened or updated. Nothing else reads the
manifest's JSON: `Store.manifest` is a `Manifest`.

A record's fields are its schema: a field's type (int, float, str, bool, a record, a tuple,
a dict by name, `X | None`, a `Literal`) and its bounds (`bounded`) say what the JSON may hold;
a field of the wrong type, out of range or missing is refused in one line that names it
(`its manifest field featurize.chunk_rows is 0, expected an integer from 1`). Keys a record does
not name are kept, unread: each record holds its section's JSON as `json`, which is what the
domain objects that wrote it read back (`Task.from_record`, `ModelSpec.of_store`, ...).

Stores written by older versions are read here, in `_upgraded`, and matched here, in
`as_recorded_by` (docs/store.md):
- a store made before tasks were recorded is a classification store;
- a recipe recorded before `threads` and `optimizer` were (trakwomp 0.1, SGD only) matches
  today's recipe without them;
- groups recorded before 2026-12-03 keep their `names` in the manifest (not in arrays);
- format version 1 stores have no chunk checksums (store/zarr_store.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from trakwomp.store.errors import StoreError

HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_LAYERS, MAX_TOKENS, MAX_THREADS = 1024, (1 << 31) - 1, 1024


class ManifestError(Exception):
    """A field of the manifest that does not fit its record (the message names it)."""


def bounded(low: int | None = None, high: int | None = None, default: Any = dataclasses.MISSING,
            pattern: re.Pattern | None = None, key: str | None = None, at_least: int = 0):
    """A record field with bounds: an integer in [low, high], a string matching `pattern`, a list
    of `at_least` items; `key`: its JSON name where that is not a Python name."""
    metadata = {"low": low, "high": high, "pattern": pattern, "key": key, "at_least": at_least}
    return field(default=default, metadata=metadata)


def _fail(name: str, value: Any, expected: str) -> typing.NoReturn:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    raise ManifestError(f"its manifest field {name} is {shown[:60]}, expected {expected}")


@dataclass(frozen=True, kw_only=True)
class Record:
    """A JSON object read as a dataclass; `json`: the object as the store keeps it."""

    json: dict = field(default_factory=dict, kw_only=True, repr=False, compare=False)

    @classmethod
    def parse(cls, value: Any, name: str):
        if not isinstance(value, dict):
            _fail(name, value, "an object")
        hints = typing.get_type_hints(cls)
        given = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key") or f.name
            if f.name == "json" or key not in value:
                if f.name != "json" and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"its manifest field {_join(name, key)} is missing")
                continue
            given[f.name] = _parse(hints[f.name], value[key], _join(name, key), f.metadata)
        return cls(**given, json=value)


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _parse(kind: Any, value: Any, name: str, rules: typing.Mapping = types.MappingProxyType({})) -> Any:
    """`value` read as the type `kind` with the field's `rules` (bounds, pattern)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # int | tuple[int, ...]: chosen by the JSON type
            options = [a for a in options if (typing.get_origin(a) is tuple) == isinstance(value, list)] or options
        return _parse(options[0], value, name, rules)
    if origin is tuple:
        if not isinstance(value, list) or len(value) < rules.get("at_least", 0):
            at_least = rules.get("at_least", 0)
            _fail(name, value, "a list" + (f" of at least {at_least}" if at_least else ""))
        return tuple(_parse(args[0], item, f"{name}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(name, value, "an object")
        return {key: _parse(args[1], item, f"{name}.{key}") for key, item in value.items()}
    if origin is Literal:
        if value not in args:
            _fail(name, value, " or ".join(map(repr, args)))
        return value
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.parse(value, name)
    return SCALARS[kind](value, name, rules)


def _integer(value, name, rules) -> int:
    low, high = rules.get("low"), rules.get("high")
    low = 0 if low is None else low
    if type(value) is not int or value < low or (high is not None and value > high):
        _fail(name, value, f"an integer from {low}" + (f" to {high}" if high is not None else ""))
    return value


def _number(value, name, rules) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        _fail(name, value, "a finite number")
    return value


def _text(value, name, rules) -> str:
    pattern = rules.get("pattern")
    if pattern is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
        _fail(name, value, "a sha256 (64 hex digits)")
    if not isinstance(value, str):
        _fail(name, value, "a string")
    return value


def _flag(value, name, rules) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "true or false")
    return value


def _any(value, name, rules) -> Any:
    return value


SCALARS: dict[Any, Callable[[Any, str, typing.Mapping], Any]] = {
    int: _integer, float: _number, str: _text, bool: _flag, Any: _any}


def sha256(default: Any = dataclasses.MISSING):
    return bounded(pattern=HEX64, default=default)


@dataclass(frozen=True, kw_only=True)
class Fingerprint(Record):
    """A data set's identity: `dataset`, `lds_targets` and each `targets` entry."""

    num_examples: int = bounded(1)
    classes: tuple[str, ...]
    sha256: str = sha256()


@dataclass(frozen=True, kw_only=True)
class TargetsRecord(Fingerprint):
    """A scored target set: its fingerprint and the spec it was read from."""

    spec: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskRecord(Record):
    name: str


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord(Record):
    spec: str
    vocab_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class LoraRecord(Record):
    r: int = bounded(1)
    alpha: float
    dropout: float
    targets: tuple[str, ...] | None = bounded(at_least=1, default=None)


@dataclass(frozen=True, kw_only=True)
class ModelRecord(Record):
    name: str
    width: float | None = None
    layers: int | None = bounded(1, MAX_LAYERS, default=None)
    heads: int | None = bounded(1, default=None)
    transform: str | None = None
    lora: LoraRecord | None = None
    base_sha256: str | None = sha256(default=None)


@dataclass(frozen=True, kw_only=True)
class DatasetSource(Record):
    """Where a train set was first found, and how text was read."""

    spec: str
    has_indices: bool = False
    tokenizer: str | None = None
    max_length: int | None = bounded(2, MAX_TOKENS, default=None)


@dataclass(frozen=True, kw_only=True)
class RecipeRecord(Record):
    """A role's training recipe (its JSON is `Recipe.as_recorded`'s)."""

    seed: int | None = bounded(0, default=None)
    epochs: int | None = bounded(1, default=None)
    threads: int | None = bounded(1, MAX_THREADS, default=None)
    train_on_prompt: bool = False


@dataclass(frozen=True, kw_only=True)
class ProjectorRecord(Record):
    kind: str
    seed: int = bounded(0)
    blocks: int = bounded(1)
    block_dim: int = bounded(1)
    tile_rows: int | None = bounded(1, default=None)


@dataclass(frozen=True, kw_only=True)
class LayerRecord(Record):
    """A factored layer (its JSON is `LayerSpec.as_dict`'s): its module's name and projected ranks."""

    name: str
    rank_rows: int = bounded(1)
    rank_cols: int = bounded(1)

    @property
    def width(self) -> int:
        return self.rank_rows * self.rank_cols


@dataclass(frozen=True, kw_only=True)
class FeaturizeRecord(Record):
    projector: ProjectorRecord
    dtype: Literal["float32", "float16"]
    parameters: tuple[str, ...] | None
    num_params: int = bounded(1)
    chunk_rows: int = bounded(1)
    layers: tuple[LayerRecord, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RegisteredModel(Record):
    """A model in the store's registry: id, where it came from, its weights and their hash."""

    id: int = bounded(0)
    source: str
    weights: str
    sha256: str = sha256()
    run: str | None = None
    epoch: int | None = bounded(0, default=None)

    @property
    def training_run(self) -> str:
        """The training run it belongs to (stores from before runs were recorded: each model its
        own run, named by its source)."""
        return self.run if self.run is not None else self.source


@dataclass(frozen=True, kw_only=True)
class ScoresEntry(Record):
    view: tuple[Any, ...] = bounded(at_least=3)
    models: tuple[int, ...] = bounded(at_least=1)
    targets: str
    top_k: int | None = bounded(1, default=None)  # kept only each target's top k (`score --top-k-only`)


@dataclass(frozen=True, kw_only=True)
class AnswersRange(Record):
    """The places in the order of the answers kept: first .. next - 1."""

    first: int = bounded(0, default=0)
    next: int = bounded(0, default=0)

    @property
    def kept(self) -> int:
        return self.next - self.first


@dataclass(frozen=True, kw_only=True)
class GroupsRecord(Record):
    sha256: str
    origin: str
    num_groups: int | None = None
    names: tuple[str, ...] | None = None  # stores made before 2026-12-03

    @property
    def count(self) -> int:
        return self.num_groups if self.num_groups is not None else len(self.names or ())


@dataclass(frozen=True, kw_only=True)
class Manifest(Record):
    """The whole manifest (docs/store.md lists the sections); a section not yet written is None
    (or empty)."""

    format_version: int = bounded(1)
    task: TaskRecord | None = None
    tokenizer: TokenizerRecord | None = None
    dataset: Fingerprint | None = None
    dataset_source: DatasetSource | None = None
    model: ModelRecord | None = None
    train_reference: RecipeRecord | None = None
    train_lds: RecipeRecord | None = None
    train_lds_groups: RecipeRecord | None = bounded(key="train_lds-groups", default=None)
    groups: GroupsRecord | None = None
    lds_targets: Fingerprint | None = None
    lds_targets_source: DatasetSource | None = None
    asked: dict[str, int | tuple[int, ...]] = field(default_factory=dict)
    featurize: FeaturizeRecord | None = None
    models: tuple[RegisteredModel, ...] = ()
    targets: dict[str, TargetsRecord] = field(default_factory=dict)
    scores: dict[str, ScoresEntry] = field(default_factory=dict)
    answers: AnswersRange = AnswersRange()

    @property
    def num_examples(self) -> int:
        """The train set's size (the store must have one)."""
        return self.dataset_record().num_examples

    def asked_count(self, work: str) -> int:
        """How many units of `work` were asked for (0 if never; a list of ids counts its ids)."""
        value = self.asked.get(work, 0)
        return value if isinstance(value, int) else len(value)

    def asked_ids(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """The ids asked for by each work under `prefix`, named without it (a count asks for none)."""
        return {work.removeprefix(prefix): value if isinstance(value, tuple) else ()
                for work, value in self.asked.items() if work.startswith(prefix)}

    def dataset_record(self) -> Fingerprint:
        """The train set's fingerprint, which a stage reading it requires."""
        return _required(self.dataset, "train set (train or featurize first)")

    def model_record(self) -> ModelRecord:
        """The model section, which a stage building the model requires."""
        return _required(self.model, "model (train or featurize first)")

    def source_record(self) -> DatasetSource:
        """Where the train set was read from, which a stage reading it again requires."""
        return _required(self.dataset_source, "train set source (train or featurize first)")

    def featurize_record(self) -> FeaturizeRecord:
        """The featurize settings, which finalize and score require."""
        return _required(self.featurize, "features (run featurize first)")

    def recipe(self, role: str) -> RecipeRecord | None:
        return {"reference": self.train_reference, "lds": self.train_lds, "lds-groups": self.train_lds_groups}[role]


Section = TypeVar("Section")


def _required(section: Section | None, what: str) -> Section:
    if section is None:
        raise StoreError(f"the store records no {what}")
    return section


def read_manifest(value: Any, newest_version: int) -> Manifest:
    """The manifest `value` (the store's JSON) as records, upgraded from older versions; raises
    ManifestError naming the first field that does not fit."""
    if not isinstance(value, dict):
        _fail("(the whole manifest)", value, "an object")
    manifest = Manifest.parse(_upgraded(value, newest_version), "")
    _check_references(manifest)
    return dataclasses.replace(manifest, json=value)


def _upgraded(value: dict, newest_version: int) -> dict:
    """`value` as this version reads it: a store made before tasks were recorded is a
    classification store; the format version, if absent, is this version's."""
    value = {"format_version": newest_version, **value}
    if "task" not in value and "dataset" in value:
        value["task"] = {"name": "classification"}
    return value


def _check_references(manifest: Manifest) -> None:
    """What one section says of another: model ids are their places, scores name registered
    models and recorded targets, the answers' range runs forward."""
    for i, entry in enumerate(manifest.models):
        if entry.id != i:
            raise ManifestError(f"its manifest field models[{i}].id is {entry.id}, expected {i}")
    for key, entry in manifest.scores.items():
        if entry.targets not in manifest.targets:
            raise ManifestError(f"its manifest field scores.{key}.targets names targets {entry.targets!r} "
                                "that the manifest does not record")
        if any(m >= len(manifest.models) for m in entry.models):
            raise ManifestError(f"its manifest field scores.{key}.models names a model that is not registered")
    if manifest.answers.next < manifest.answers.first:
        raise ManifestError("its manifest field answers.next is below answers.first")


# Edits: each a function of the manifest's JSON, applied under the store's lock by `Store.update`.

def as_recorded_by(recipe: dict, recorded: dict | None) -> dict:
    """A training recipe's JSON as a store that recorded `recorded` records it: a store made
    before `threads` and `optimizer` were recorded (trakwomp 0.1, SGD only) is matched without them."""
    recipe = dict(recipe)
    for added in ("threads", "optimizer"):
        if recorded is not None and added not in recorded and (added == "threads" or recipe.get(added) == "sgd"):
            recipe.pop(added, None)
    return recipe


def registering(candidates: list[tuple[str, dict]]) -> Callable[[dict], list[int]]:
    """The edit that gives each candidate (sha256, entry without id) the id of the registered
    model with its hash, registering those not yet there in order; it returns their ids."""
    def edit(manifest: dict) -> list[int]:
        registry = manifest.setdefault("models", [])
        by_hash = {entry["sha256"]: entry["id"] for entry in registry}
        for digest, entry in candidates:
            if digest not in by_hash:
                by_hash[digest] = len(registry)
                registry.append({"id": len(registry), **entry, "sha256": digest})
        return [by_hash[digest] for digest, _ in candidates]
    return edit


def take_answer_place(max_answers: int) -> Callable[[dict], tuple[int, list[int]]]:
    """The edit that gives a new answer the next place in the order and drops the oldest places
    beyond `max_answers`; it returns (the place, the places dropped)."""
    def edit(manifest: dict) -> tuple[int, list[int]]:
        kept = manifest.setdefault("answers", {"first": 0, "next": 0})
        seq, kept["next"] = kept["next"], kept["next"] + 1
        evicted = list(range(kept["first"], max(kept["first"], kept["next"] - max_answers)))
        kept["first"] += len(evicted)
        return seq, evicted
    return edit


def record_asked(work: str, amount: int | list[int]) -> Callable[[dict], None]:
    """The edit that records in "asked" that `work` was asked for: a number of units (the largest
    asked is kept) or a list of ids (their union is kept)."""
    def edit(manifest: dict) -> None:
        asked = manifest.setdefault("asked", {})
        before = asked.get(work)
        if isinstance(amount, int):
            asked[work] = max(before or 0, amount)
        else:
            asked[work] = sorted(set(before or []) | set(amount))
    return edit
