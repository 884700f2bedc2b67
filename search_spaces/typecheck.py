"""Checking parsed YAML/JSON values against type hints, for validation at the config boundary."""
from __future__ import annotations

import types
import typing
from typing import Any


def type_ok(value: Any, hint: Any) -> bool:
    """Whether a parsed YAML/JSON value fits a type hint (int is not bool; an int is a valid float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(type_ok(v, args[0]) for v in value) if args else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """A readable name of a type hint."""
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
