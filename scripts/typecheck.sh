#!/usr/bin/env bash
# pyright (basic mode, pyproject.toml [tool.pyright]) over trakwomp/, cli/ and store/. The package
# maps cli/ and store/ to trakwomp.cli and trakwomp.store (package-dir), which pyright cannot follow
# through an editable install: .typecheck/trakwomp is laid out as the installed package is, with
# links to the sources, and pyright reads imports from there. Usage: scripts/typecheck.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
rm -rf .typecheck && mkdir -p .typecheck/trakwomp
for entry in trakwomp/*; do ln -s "$PWD/$entry" .typecheck/trakwomp/; done
ln -s "$PWD/store" .typecheck/trakwomp/store
ln -s "$PWD/cli" .typecheck/trakwomp/cli
"$(dirname "$python")/pyright" --pythonpath "$python"
