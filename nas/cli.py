"""The `detforge` command: a thin argparse front over the library API.

Each sub-command lives in its own module under `nas/commands/` and exposes
`register(subparsers)`; this file only discovers them, parses, and turns
`DetforgeError` into one clear line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
import warnings
from collections.abc import Sequence

from search_spaces.errors import DetforgeError

from . import commands


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every command module registered."""
    parser = argparse.ArgumentParser(
        prog="detforge",
        description="Find and build the best real-time YOLO-family detector for a device.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `detforge` console script."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # fvcore's tracer, not actionable for users
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except DetforgeError as e:
        if args.debug:
            traceback.print_exc()
        print(f"detforge: error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("detforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
