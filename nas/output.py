"""Printing results: a readable table by default, one JSON object with --json."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows of dicts as an aligned plain-text table."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def format_mapping(obj: Mapping[str, Any]) -> str:
    """Render a flat mapping as `key  value` lines."""
    width = max((len(k) for k in obj), default=0)
    return "\n".join(f"{k.ljust(width)}  {_fmt(v)}" for k, v in obj.items())


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    """Print `obj` as one JSON object, or `text` (default: a key/value listing)."""
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        print(text if text is not None else format_mapping(obj))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)
