"""How fast a latency table predicts: `LatencyTable.predict` and `FeasibleRegion.latency_ms` per architecture.

    python benchmarks/predict_speed.py [--table latency_tables/tables/<shipped>.json] [--space default] [--n 200]

Search trials, the supernet's budget-scoped sandwich (rejection sampling) and `detforge run` call these
thousands of times. Prints one JSON object: median ms per call over `--repeats` passes of `n` random
architectures (fresh ones for the region, whose cache would otherwise answer).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from latency_tables import LatencyTable
from latency_tables.table import shipped_tables
from nas.budget import FeasibleRegion
from search_spaces.space import load_space


def main(argv: list[str] | None = None) -> dict:
    """Time the two calls; print and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(shipped_tables()[0]))
    ap.add_argument("--space", default="default")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    table = LatencyTable.load(args.table, check_device=False)
    space = load_space(args.space)
    region = FeasibleRegion.from_table(args.table, space, 1e9, nc=space.nc)
    archs = [region.space.build_arch(region.space.random_decisions(random.Random(i))) for i in range(args.n)]
    predict, region_ms = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        for a in archs:
            table.predict(a)
        predict.append((time.perf_counter() - t) * 1e3 / args.n)
        fresh = FeasibleRegion(region.space, region.predict_ms, region.budget_ms)  # an empty cache each pass
        draws = [region.space.random_decisions(random.Random(10_000 * (r + 1) + i)) for i in range(args.n)]
        t = time.perf_counter()
        for d in draws:
            fresh.latency_ms(d)
        region_ms.append((time.perf_counter() - t) * 1e3 / args.n)
    out = {"table": args.table, "space": args.space, "n": args.n, "repeats": args.repeats,
           "predict_ms": statistics.median(predict), "region_latency_ms": statistics.median(region_ms)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
