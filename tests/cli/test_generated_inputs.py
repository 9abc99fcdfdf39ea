"""Generated bad input, beyond the catalogue: JSON-lines rows and manifest fields drawn by a
seeded generator of values of every JSON type (wrong types, empty, zero, negative, huge, deeply
nested, control characters, lone surrogates). Every input gives exit 0, or one line on stderr
with exit 2 and the store byte for byte as it was; never a traceback."""

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import plain, tree_digest, write_scored_text_store
from trakwomp.cli.main import app
from typer.testing import CliRunner

SEED = 20261206


def json_value(rng: random.Random, depth: int = 0):
    """A JSON value of any type, good or bad for a field that wants text or a count."""
    kinds = ["text", "empty", "int", "zero", "negative", "huge", "float", "bool", "null", "list", "object",
             "control", "surrogate", "deep", "big-integer"]
    kind = rng.choice(kinds if depth < 2 else kinds[:9])
    return {
        "text": lambda: rng.choice(["a fortune", "Q: why?\nA: ", "[bold]x[/]", "x" * 300]),
        "empty": lambda: "", "int": lambda: rng.randint(1, 9), "zero": lambda: 0, "negative": lambda: -rng.randint(1, 9),
        "huge": lambda: 10 ** rng.randint(10, 30), "float": lambda: rng.choice([0.5, 1e300, -1e-300]),
        "bool": lambda: rng.random() < 0.5, "null": lambda: None,
        "list": lambda: [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "object": lambda: {rng.choice(["role", "content", "x"]): json_value(rng, depth + 1) for _ in range(2)},
        "control": lambda: "\x1b[31mred\x1b]52;c;aGk=\x07\x00", "surrogate": lambda: "\ud800",
        "deep": lambda: DEEP, "big-integer": lambda: BIG_INTEGER,
    }[kind]()


class Raw(str):
    """JSON text written as it is (a value `json.dumps` would not write)."""


DEEP, BIG_INTEGER = Raw("[" * 50000 + "]" * 50000), Raw("7" * 5000)
ROW_KEYS = ["text", "prompt", "completion", "messages", "label", "source", "instruction"]


def dumps(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def jsonl_file(rng: random.Random, path: Path) -> Path:
    """1 to 3 rows, each a valid text row with some keys replaced or added."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        row = {"text": "a fortune"}
        for key in rng.sample(ROW_KEYS, rng.randint(0, 3)):
            row[key] = json_value(rng) if rng.random() < 0.7 else "good text"
        lines.append(dumps(row) if rng.random() < 0.9 else dumps(json_value(rng)))
    path.write_bytes((b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + "\n".join(lines).encode("utf-8", "surrogatepass"))
    return path


@pytest.fixture(scope="module")
def text_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generated")
    return write_scored_text_store(root, "store", "train.jsonl", "targets.jsonl")


def run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) or result.exception is None, (args, result.exception)
    return result


def check_outcome(result, store: Path, before: str, allowed: tuple[int, ...] = (0, 2)) -> None:
    assert result.exit_code in allowed, (result.exit_code, plain(result.output))
    if result.exit_code == 2:
        text = plain(result.stderr).strip()
        assert len(text.splitlines()) == 1 and text.startswith("error: "), text
        assert tree_digest(store) == before


def test_generated_jsonl_rows_are_read_or_refused_in_one_line(text_store, tmp_path):
    store = shutil.copytree(text_store, tmp_path / "store")
    rng = random.Random(SEED)
    outcomes = set()
    for i in range(40):
        path = jsonl_file(rng, tmp_path / f"rows-{i}.jsonl")
        before = tree_digest(store)
        result = run(["score", str(store), "--targets", f"jsonl:{path}", "--quiet"])
        check_outcome(result, store, before)
        outcomes.add(result.exit_code)
    assert outcomes == {0, 2}  # the generator reaches both readable and refused rows


MANIFEST_FIELDS = [("format_version",), ("task",), ("task", "name"), ("tokenizer",), ("dataset",),
                   ("dataset", "num_examples"), ("dataset", "classes"), ("dataset", "sha256"), ("model",),
                   ("model", "name"), ("model", "width"), ("model", "layers"), ("model", "heads"),
                   ("dataset_source", "max_length"), ("featurize", "chunk_rows"), ("featurize", "dtype"),
                   ("featurize", "num_params"), ("featurize", "projector", "block_dim"), ("models",),
                   ("models", 0, "id"), ("models", 0, "sha256"), ("models", 0, "weights"), ("scores",),
                   ("targets",), ("asked",), ("train_reference", "threads"), ("answers",)]
COMMANDS = [["status"], ["finalize"], ["show", "--target", "0", "--out", "page.html"], ["groups", "--json"],
            ["explain", "--prompt", "hi", "--completion", "there"], ["score", "--targets", "jsonl:TARGETS"]]


def set_field(manifest: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        manifest = manifest[part]
    manifest[path[-1]] = value


def test_generated_manifest_fields_are_read_or_refused_in_one_line(text_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED + 1)
    document = json.loads((text_store / "zarr.json").read_text())
    for i in range(50):
        store = tmp_path / f"store-{i}"
        shutil.copytree(text_store, store)
        edited = json.loads(json.dumps(document))
        set_field(edited["attributes"]["trakwomp"], rng.choice(MANIFEST_FIELDS), json_value(rng))
        (store / "zarr.json").write_text(dumps(edited))
        command = rng.choice(COMMANDS)
        args = [command[0], str(store), *[a.replace("TARGETS", str(text_store.parent / "targets.jsonl"))
                                          for a in command[1:]]]
        before = tree_digest(store)
        check_outcome(run(args), store, before, (0, 2, 3) if command[0] == "status" else (0, 2))
        shutil.rmtree(store)
