"""Import a user object named `package.module:attribute`, as `python -m` would find it."""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from trakwomp.errors import UserError

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_object_spec(spec: str) -> bool:
    return bool(_SPEC.match(spec))


def import_object(spec: str, what: str) -> Any:
    """The attribute named by `package.module:attribute`; the working directory is importable."""
    if not is_object_spec(spec):
        raise UserError(f"malformed {what} spec {spec!r}: expected package.module:name")
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {what} module {module_name!r}: {e}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} spec {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{what} spec {spec!r} does not name a callable")
    return obj
