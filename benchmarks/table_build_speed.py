"""How long `LatencyTable.build` takes from scratch: blocks, then the overhead fit, on this machine.

    python benchmarks/table_build_speed.py [--space tiny] [--imgsz 128] [--backend ort-cpu] [--repeats 1]

Every pipeline run (`make demo` included) and every new device starts with this build. Prints one JSON
object: the wall seconds of each from-scratch build (a temporary table, deleted after), their median, and the
table's size. To compare two commits, run it from a worktree of each in alternation (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from latency_tables import LatencyTable
from search_spaces.space import load_space


def main(argv: list[str] | None = None) -> dict:
    """Build the table `--repeats` times from scratch; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="tiny")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--fit-models", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    space = load_space(args.space)
    seconds, entries = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            path = Path(tmp) / f"table{r}.json"
            t = time.perf_counter()
            table = LatencyTable.build(space, args.backend, args.imgsz, path, progress=False, resume=False,
                                       fit_models=args.fit_models)
            seconds.append(round(time.perf_counter() - t, 1))
            entries = len(table)
    out = {"space": args.space, "imgsz": args.imgsz, "backend": args.backend, "fit_models": args.fit_models,
           "entries": entries, "build_s": seconds, "median_s": statistics.median(seconds)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
