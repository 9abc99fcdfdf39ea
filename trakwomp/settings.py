"""Settings objects: dataclasses whose fields carry their command-line help, so that an option
is declared once. The CLI builds its options from these fields (`trakwomp.cli.common.setting`)
and passes the same objects to the library that a Python user passes."""

from __future__ import annotations

from dataclasses import field


def option(default, help: str):
    """A settings field with its default and its command-line help."""
    return field(default=default, metadata={"help": help})
