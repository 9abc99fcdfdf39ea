"""The manifest's schema, checked whenever a store is opened: a manifest edited by hand or
damaged (a field of the wrong type, a count of 0, a scores entry naming targets that are not
there, a model of 100,000 layers) is refused in one line that names the field, before any
command reads it (docs/store.md lists the sections).

A schema is a checker: a function of (value, field name) that raises ManifestError. Sections
that this version does not know are left alone (format_version guards what they may mean).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Checker = Callable[[Any, str], None]
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_LAYERS, MAX_TOKENS, MAX_THREADS = 1024, (1 << 31) - 1, 1024


class ManifestError(Exception):
    """A field of the manifest that does not fit its schema (the message names it)."""


def _fail(field: str, value: Any, expected: str) -> None:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    raise ManifestError(f"its manifest field {field} is {shown[:60]}, expected {expected}")


def integer(low: int = 0, high: int | None = None) -> Checker:
    def check(value, field):
        if type(value) is not int or value < low or (high is not None and value > high):
            _fail(field, value, f"an integer from {low}" + (f" to {high}" if high is not None else ""))
    return check


def number(value, field) -> None:
    if type(value) not in (int, float) or value != value or value in (float("inf"), float("-inf")):
        _fail(field, value, "a finite number")


def text(value, field) -> None:
    if not isinstance(value, str):
        _fail(field, value, "a string")


def sha256(value, field) -> None:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        _fail(field, value, "a sha256 (64 hex digits)")


def flag(value, field) -> None:
    if not isinstance(value, bool):
        _fail(field, value, "true or false")


def one_of(*choices) -> Checker:
    def check(value, field):
        if value not in choices:
            _fail(field, value, " or ".join(map(repr, choices)))
    return check


def optional(inner: Checker) -> Checker:
    def check(value, field):
        if value is not None:
            inner(value, field)
    return check


def items(inner: Checker, at_least: int = 0) -> Checker:
    def check(value, field):
        if not isinstance(value, list) or len(value) < at_least:
            _fail(field, value, "a list" + (f" of at least {at_least}" if at_least else ""))
        for i, item in enumerate(value):
            inner(item, f"{field}[{i}]")
    return check


def record(required: dict[str, Checker], optional_fields: dict[str, Checker] | None = None) -> Checker:
    """A JSON object with the `required` fields and, if present, the optional ones; others are left alone."""
    def check(value, field):
        if not isinstance(value, dict):
            _fail(field, value, "an object")
        for name, inner in required.items():
            if name not in value:
                raise ManifestError(f"its manifest field {field}.{name} is missing")
            inner(value[name], f"{field}.{name}")
        for name, inner in (optional_fields or {}).items():
            if name in value:
                inner(value[name], f"{field}.{name}")
    return check


def mapping(inner: Checker) -> Checker:
    def check(value, field):
        if not isinstance(value, dict):
            _fail(field, value, "an object")
        for key, item in value.items():
            inner(item, f"{field}.{key}")
    return check


def asked_amount(value, field) -> None:
    (integer() if not isinstance(value, list) else items(integer()))(value, field)


FINGERPRINT = record({"num_examples": integer(1), "classes": items(text), "sha256": sha256})
SECTIONS: dict[str, Checker] = {
    "task": record({"name": text}),
    "tokenizer": record({"spec": text}),
    "dataset": FINGERPRINT,
    "lds_targets": FINGERPRINT,
    "model": record({"name": text}, {"width": optional(number), "layers": optional(integer(1, MAX_LAYERS)),
                                     "heads": optional(integer(1)), "transform": optional(text),
                                     "lora": optional(record({"r": integer(1), "targets": optional(items(text, 1))})),
                                     "base_sha256": optional(sha256)}),
    "dataset_source": record({"spec": text}, {"has_indices": flag, "tokenizer": optional(text),
                                              "max_length": optional(integer(2, MAX_TOKENS))}),
    "train_reference": record({}, {"seed": integer(), "epochs": integer(1), "threads": integer(1, MAX_THREADS)}),
    "train_lds": record({}, {"seed": integer(), "epochs": integer(1), "threads": integer(1, MAX_THREADS)}),
    "asked": mapping(asked_amount),
    "featurize": record({"projector": record({"kind": text, "seed": integer(), "blocks": integer(1),
                                              "block_dim": integer(1)}, {"tile_rows": integer(1)}),
                         "dtype": one_of("float32", "float16"), "parameters": optional(items(text)),
                         "num_params": integer(1), "chunk_rows": integer(1)}, {"layers": items(record({}))}),
    "models": items(record({"id": integer(), "source": text, "weights": text, "sha256": sha256},
                           {"run": text, "epoch": integer()})),
    "targets": mapping(FINGERPRINT),
    "scores": mapping(record({"view": items(lambda v, f: None, 3), "models": items(integer(), 1),
                              "targets": text})),
    "answers": record({"first": integer(), "next": integer()}),
}


def check_manifest(manifest: Any, newest_version: int) -> None:
    """Raise ManifestError naming the first field of `manifest` that does not fit the schema."""
    if not isinstance(manifest, dict):
        _fail("(the whole manifest)", manifest, "an object")
    integer(1, None)(manifest.get("format_version", newest_version), "format_version")
    for section, check in SECTIONS.items():
        if section in manifest:
            check(manifest[section], section)
    _check_references(manifest)


def _check_references(manifest: dict) -> None:
    """What one section says of another: model ids are their places, scores name registered
    models and recorded targets, the answers' range runs forward."""
    for i, entry in enumerate(manifest.get("models", [])):
        if entry["id"] != i:
            raise ManifestError(f"its manifest field models[{i}].id is {entry['id']}, expected {i}")
    registered, targets = len(manifest.get("models", [])), manifest.get("targets", {})
    for key, entry in manifest.get("scores", {}).items():
        if entry["targets"] not in targets:
            raise ManifestError(f"its manifest field scores.{key}.targets names targets {entry['targets']!r} "
                                "that the manifest does not record")
        if any(m >= registered for m in entry["models"]):
            raise ManifestError(f"its manifest field scores.{key}.models names a model that is not registered")
    answers = manifest.get("answers")
    if answers is not None and answers["next"] < answers["first"]:
        raise ManifestError("its manifest field answers.next is below answers.first")
