"""`trakwomp` subcommands. Each parses its options, makes one library call and shows progress.

The commands live in `reading` (predict, lds, show, explain, groups, status) and `stages` (train,
featurize, finalize, score); importing them registers them on the app, in that order (the order
`trakwomp --help` lists them in).
"""

from __future__ import annotations

import sys

import typer
from trakwomp.cli import (
    reading,  # noqa: F401  (registers predict, lds, show, explain, groups, status)
    stages,  # noqa: F401  (registers train, featurize, finalize, score)
)
from trakwomp.cli.common import app

from trakwomp import __version__


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"trakwomp {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."),
):
    """Data attribution with TRAK and TRAK-WOMP: which training examples made a model behave as it does."""


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
