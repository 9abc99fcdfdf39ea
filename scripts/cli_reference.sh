#!/usr/bin/env bash
# Writes docs/cli.md, the command reference, from the Typer app itself (tests/cli/test_docs.py checks
# that the committed page is what this writes, so the reference cannot drift from the code).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m typer trakwomp.cli.main utils docs --name trakwomp --title "Command reference" --output "${1:-docs/cli.md}"
