"""Docs that are generated from the code are what the code generates now."""

import os
import subprocess
import sys

from conftest import REPO


def test_cli_reference_is_generated_from_the_app(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([str(REPO / "scripts" / "cli_reference.sh"), str(out)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    assert out.read_text() == (REPO / "docs" / "cli.md").read_text(), "run scripts/cli_reference.sh"
