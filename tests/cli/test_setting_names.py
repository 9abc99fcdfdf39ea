"""The library's errors name settings (`block_dim`); the CLI shows them as the flags that set them."""

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import trakwomp.cli.main  # noqa: F401  (registers every command, whose options are the flags)
from trakwomp.cli.common import app, as_flags, flags_of_settings
from trakwomp.errors import UserError
from trakwomp.features.projectors import ProjectorSpec

ROOT = Path(__file__).resolve().parents[2]
PACKAGES_NAMED = {"bm25s", "peft", "transformers"}  # packages a message names in backticks, not settings
QUOTED_COMMAND = re.compile(r"`trakwomp [^`]*`")  # a command to run, flags and all


def error_texts(path: Path) -> list[str]:
    """The literal text of every string in a raise or an *Error(...) call of `path`, with "{}"
    where an f-string puts a value."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        called = node.func if isinstance(node, ast.Call) else None
        name = getattr(called, "id", None) or getattr(called, "attr", "")
        if isinstance(node, ast.Raise) or name.endswith("Error"):
            parts = list(ast.walk(node))
            inside_fstrings = {id(v) for part in parts if isinstance(part, ast.JoinedStr) for v in part.values}
            for part in parts:
                if isinstance(part, ast.JoinedStr):
                    texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in part.values))
                elif isinstance(part, ast.Constant) and isinstance(part.value, str) and id(part) not in inside_fstrings:
                    texts.append(part.value)
    return texts


def library_error_texts() -> list[tuple[str, str]]:
    files = sorted((ROOT / "trakwomp").rglob("*.py")) + sorted((ROOT / "store").rglob("*.py"))
    return [(str(f.relative_to(ROOT)), text) for f in files for text in error_texts(f)]


def test_library_errors_name_settings_that_the_cli_knows_and_no_flags():
    flags = flags_of_settings()
    texts = library_error_texts()
    assert len(texts) > 300  # the walk found the library's messages
    named = [(where, name) for where, text in texts for name in re.findall(r"`([a-z][a-z0-9_]*)`", text)]
    assert {"block_dim", "max_length", "device"} <= {name for _, name in named}
    assert [(w, n) for w, n in named if n not in flags and n not in PACKAGES_NAMED] == []
    with_flags = [(where, text) for where, text in texts
                  if set(re.findall(r"--[a-z][a-z-]*", QUOTED_COMMAND.sub("", text))) & set(flags.values())]
    assert with_flags == []


def test_a_setting_named_by_the_library_shows_as_its_flag():
    assert as_flags("`block_dim` 3: `json_out`, `resamples`, `parameters`; run `trakwomp train` (`peft`)") == \
        "--block-dim 3: --json, --bootstrap, --params; run `trakwomp train` (`peft`)"
    with pytest.raises(UserError, match=r"^`blocks` and `block_dim` must be at least 1$"):
        ProjectorSpec(block_dim=0)
    result = CliRunner().invoke(app, ["featurize", "nowhere", "--block-dim", "0"])
    assert result.exit_code == 2 and "--blocks and --block-dim must be at least 1" in result.output
    assert "`" not in result.output
