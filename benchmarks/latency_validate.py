"""Build latency tables for a search space and validate them end to end (ORT CPU and PyTorch CPU by default).

    python benchmarks/latency_validate.py [--space default] [--imgsz 320] [--n 50] [--backends ort-cpu,...]

Per backend it builds (or resumes) a table, then predicts and measures `n` random architectures, and writes
runs/bench/latency_validate_<backend>.json (+ .png scatter plot); the summary of all backends goes to
runs/bench/latency_validate.json and stdout. With --ship the ORT CPU table is built in latency_tables/tables/
under its fingerprint's name, which is how the shipped table is made. With --needed-only the tables hold only
the blocks of the overhead-fit and validation architectures (a quick check of the method, not a full table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from latency_tables.measurement import MeasurementConfig
from latency_tables.table import (
    BUILD_PROTOCOL,
    FIT_MODELS,
    FIT_SEED,
    TABLES_DIR,
    LatencyTable,
    eval_signatures,
    make_backend,
    sample_architectures,
    table_name,
)
from latency_tables.validate import validate
from search_spaces.io import atomic_write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="default")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="ort-cpu,torch-cpu")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--ship", action="store_true", help="build the ORT CPU table in latency_tables/tables/")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    ap.add_argument("--needed-only", action="store_true",
                    help="measure only the blocks the fit and validation architectures use (quick check)")
    ap.add_argument("--rebuild", action="store_true", help="measure the tables again, not resuming them")
    ap.add_argument("--refit", action="store_true", help="measure the overhead-fit models again and refit")
    ap.add_argument("--realtime", action="store_true",
                    help="time at real-time priority (SCHED_FIFO) instead of waiting for a quiet machine")
    ap.add_argument("--max-other-load", type=float, default=0.1,
                    help="re-measure repeats during which other processes used more of the CPU than this")
    ap.add_argument("--max-retries", type=int, default=3000,
                    help="re-measurements of a busy repeat before giving up (the default waits for hours)")
    ap.add_argument("--retry-wait", type=float, default=2.0, help="seconds to wait before re-measuring")
    return ap.parse_args(argv)


class NeededOnly:
    """A search space reduced to the blocks of some of its architectures (the rest of its API delegates)."""

    def __init__(self, space: Any, archs: list, imgsz: int):
        self.space, self.archs, self.imgsz = space, archs, imgsz
        self.name = f"{space.name} (needed blocks only)"

    def block_signatures(self, imgsz: int | None = None, batch: int = 1) -> list:
        """The distinct signatures of the chosen architectures."""
        sigs = {s.key(): s for a in self.archs for s in eval_signatures(a, imgsz or self.imgsz, batch)}
        return [sigs[k] for k in sorted(sigs)]

    def __getattr__(self, name: str) -> Any:
        """random, largest, smallest, ... of the full space."""
        return getattr(self.space, name)


def main(argv: list[str] | None = None) -> int:
    """Build, validate and record every backend."""
    from search_spaces.space import load_space

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(args.space)
    if args.needed_only:
        archs = (sample_architectures(space, FIT_MODELS, FIT_SEED, extremes=True)
                 + sample_architectures(space, args.n, args.seed))
        space = NeededOnly(space, archs, args.imgsz)
    # On a shared machine the protocol waits for quiet periods: a repeat during which other processes used
    # more than --max-other-load of the CPU is measured again (docs/latency.md, "Noise on a shared 2-vCPU
    # machine"). With --realtime the timed runs preempt the other load instead (other_load is still reported).
    gate = {"max_other_load": None if args.realtime else args.max_other_load, "max_retries": args.max_retries,
            "retry_wait_s": args.retry_wait}
    build_cfg = BUILD_PROTOCOL.with_overrides(**gate)
    validate_cfg = MeasurementConfig(max_time_s=15.0, **gate)
    # One summary for all runs: backends measured by an earlier invocation (other flags) stay in it.
    summary_path = out / "latency_validate.json"
    prev = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary = {"space": args.space, "imgsz": args.imgsz, "n": args.n, "threads": args.threads,
               "backends": prev.get("backends", {})}
    for name in args.backends.split(","):
        be = make_backend(name, threads=args.threads, config=build_cfg)
        fp = be.fingerprint()
        if args.ship and name == "ort-cpu":
            path = TABLES_DIR / table_name(fp, args.imgsz)
        else:
            path = out / f"table_{args.space}_{table_name(fp, args.imgsz)}"
        t0 = time.perf_counter()
        table = LatencyTable.build(space, be, args.imgsz, path, resume=not args.rebuild,
                                   progress=not args.no_progress, realtime=args.realtime)
        if args.refit:
            table.fit_space(space, be, progress=not args.no_progress, realtime=args.realtime, remeasure=True)
            table.save()
        wall = time.perf_counter() - t0
        be.config = validate_cfg
        rep = validate(table, space, n=args.n, seed=args.seed, backend=be, progress=not args.no_progress,
                       realtime=args.realtime,
                       plot=out / f"latency_validate_{name}.png",
                       report=out / f"latency_validate_{name}.json")
        overhead = {k: v for k, v in table.overhead.to_dict().items() if k != "points"}
        row = {**rep.figures(), "needed_only": args.needed_only, "realtime": args.realtime,
               "table": str(path),
               "entries": len(table), "build_s": table.info.get("build_s"),
               "build_wall_s_this_run": round(wall, 1), "overhead": overhead,
               "passed": rep.passed()}
        summary["backends"][name] = row
        print(f"{name}: {rep.text()}; {len(table)} entries, build {table.info.get('build_s')} s",
              file=sys.stderr)
        atomic_write_json(summary_path, summary)  # after each backend: a cut-off run keeps what it finished
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
