"""`detforge run CONFIG.yaml`: the whole pipeline, from a dataset and a device to deployable detectors."""
from __future__ import annotations

import argparse
from pathlib import Path

from nas.output import emit, format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: table, supernet, search, front, compression, report")
    p.add_argument("config", help="pipeline YAML (see configs/demo.yaml)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue a run directory; finished stages are skipped")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimated cost, run nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    cfg = PipelineConfig.from_yaml(args.config)
    out = Path(args.out or f"runs/{cfg.name}")
    if args.dry_run:
        from nas.plan import plan

        rows = plan(cfg)
        emit({"out": str(out), "stages": rows}, args.json, format_table(rows))
        return
    summary = Pipeline.open(cfg, out, resume=args.resume).run()
    emit({"out": str(out), **summary}, args.json)
