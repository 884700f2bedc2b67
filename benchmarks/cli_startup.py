"""How long a `detforge` command takes to start: `detforge COMMAND --help`, timed in fresh processes.

    python benchmarks/cli_startup.py [--commands train search run] [--repeats 7]

Every command pays this before any work, and every subprocess the tests start pays it too. Prints one JSON
object: per command the median wall seconds over `--repeats` runs (`min` beside it), and which of the heavy
libraries (onnx, torchvision, optuna, ...) building the parser loaded.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "onnx", "onnxruntime", "torchvision", "optuna", "pycocotools", "torch_pruning", "nni")


def time_command(argv: list[str], repeats: int) -> dict[str, float]:
    """Median and min wall seconds of `python -m nas.cli ARGV` over `repeats` fresh processes."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nas.cli", *argv], stdout=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(runs), 3), "min_s": round(min(runs), 3)}


def loaded_by_the_parser() -> list[str]:
    """The heavy libraries in sys.modules after building the full parser, in a fresh process."""
    code = ("import sys; from nas.cli import build_parser; build_parser(); "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def main(argv: list[str] | None = None) -> dict:
    """Time each command's start; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", nargs="+", default=["train", "search", "run"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    doc = {"python": sys.version.split()[0], "repeats": args.repeats, "parser_loads": loaded_by_the_parser(),
           "commands": {c: time_command([c, "--help"], args.repeats) for c in args.commands}}
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
