"""What data and models share of Hugging Face: the optional `transformers` import, and the
refusal of folders that bring code of their own (nothing is downloaded, no folder's code runs)."""

from __future__ import annotations

import json
from pathlib import Path

from trakwomp.errors import UserError


def import_transformers(what: str):
    """The `transformers` package, or a one-line refusal naming `what` needs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{what} needs the Hugging Face `transformers` package: pip install 'trakwomp[hf]'") from None
    return transformers


def refuse_remote_code(config: Path, what: str) -> None:
    """Refuse a Hugging Face folder whose config names code of its own to run (`auto_map`):
    trakwomp runs no code that a folder brings, and transformers would otherwise stop to ask."""
    if not config.is_file():
        return
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read {config.name}: {e}") from None
    if isinstance(settings, dict) and "auto_map" in settings:
        raise UserError(f"{what}: {config.name} names code of its own to run (auto_map), which trakwomp does not run; "
                        "save a model or tokenizer of a class that transformers ships")
