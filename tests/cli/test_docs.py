"""Docs that are generated from the code are what the code generates now."""

import os
import subprocess
import sys

from conftest import REPO, plain


def test_cli_reference_is_generated_from_the_app(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([str(REPO / "scripts" / "cli_reference.sh"), str(out)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    assert out.read_text() == (REPO / "docs" / "cli.md").read_text(), "run scripts/cli_reference.sh"


def test_no_help_text_holds_what_rich_would_read_as_markup():
    """The terminal help renders option help through Rich, which takes "[word ...]" for a style
    tag and drops it ("gpt: embedding width [default: 64]" was shown as "gpt: embedding width .");
    every command's help, and every option's, says its defaults in parentheses."""
    import re

    import typer

    from trakwomp.cli.main import app

    command = typer.main.get_command(app)
    eaten = re.compile(r"(?<!\\)\[[a-z#/@]")
    found = [f"{name}: {text}" for name, sub in command.commands.items()
             for text in [sub.help or ""] + [param.help or "" for param in sub.params if hasattr(param, "help")]
             if eaten.search(text)]
    assert not found, found


def test_every_command_that_prints_scores_states_their_unit_and_sign(cli):
    """docs/method.md, "What a score means": the help of each command that prints scores says it."""
    for command in ("score", "show", "explain", "groups", "predict", "verify"):
        text = " ".join(plain(cli(command, "--help").output).split())
        assert "the predicted drop of the target's f if train example i were removed (positive: it supports z" \
            in text, command
