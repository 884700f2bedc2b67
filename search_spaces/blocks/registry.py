"""The block registry: YAML block names -> nn.Module classes, with argument validation."""
from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..typecheck import type_name, type_ok


@dataclass(frozen=True)
class BlockEntry:
    """A registered block: its class and the YAML arguments it accepts."""

    name: str
    cls: type[nn.Module]
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]


BLOCKS: dict[str, BlockEntry] = {}

# Arguments the builder passes itself; YAML may not set them.
_BUILDER_ARGS = ("c_in", "act")


def register_block(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a block available in architecture YAML under `name`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        sig = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__)
        params = {k: p for k, p in sig.parameters.items() if k != "self" and k not in _BUILDER_ARGS}
        BLOCKS[name] = BlockEntry(name, cls, params, hints)
        return cls

    return wrap


def validate_block_args(block: str, args: dict[str, Any], *, where: str, path: str | None) -> BlockEntry:
    """Check a layer's block name and arguments against the block's signature; raise ConfigError on mismatch."""
    entry = BLOCKS.get(block)
    if entry is None:
        raise ConfigError(f"unknown block '{block}' (known: {', '.join(sorted(BLOCKS))})", path=path,
                          field=f"{where}.block")
    for key, value in args.items():
        if key not in entry.params:
            raise ConfigError(f"unknown argument for block '{block}' (allowed: {', '.join(entry.params)})",
                              path=path, field=f"{where}.{key}")
        hint = entry.hints.get(key, Any)
        if not type_ok(value, hint):
            raise ConfigError(f"expected {type_name(hint)}, got {type(value).__name__} {value!r}", path=path,
                              field=f"{where}.{key}")
        low = 0 if key == "p" else 1  # sizes, strides, kernels, groups, scales: a 0 divides by zero downstream
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v < low:
                raise ConfigError(f"must be >= {low}, got {value!r}", path=path, field=f"{where}.{key}")
    for key, p in entry.params.items():
        if p.default is inspect.Parameter.empty and key not in args:
            raise ConfigError(f"missing required argument of block '{block}'", path=path, field=f"{where}.{key}")
    return entry
