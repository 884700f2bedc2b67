"""How long a `detforge` command takes to start: `detforge COMMAND --help`, timed in fresh processes.

    python benchmarks/cli_startup.py [--commands train search run] [--repeats 7]

Every command pays this before any work, and every subprocess the tests start pays it too. Prints one JSON
object: per command the median wall seconds over `--repeats` runs (`min` beside it). Which libraries building
the parser may load is tests/test_cli_startup.py's to check.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def time_command(argv: list[str], repeats: int) -> dict[str, float]:
    """Median and min wall seconds of `python -m nas.cli ARGV` over `repeats` fresh processes."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nas.cli", *argv], stdout=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(runs), 3), "min_s": round(min(runs), 3)}


def main(argv: list[str] | None = None) -> dict:
    """Time each command's start; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", nargs="+", default=["train", "search", "run"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    doc = {"python": sys.version.split()[0], "repeats": args.repeats,
           "commands": {c: time_command([c, "--help"], args.repeats) for c in args.commands}}
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
