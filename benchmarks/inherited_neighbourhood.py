"""Inherited mAP around a supernet's largest: one categorical decision changed at a time.

A weight-sharing supernet ranks architectures only as far as the paths between them are trained. This
script measures how far that is for the choices that select separate weights or functions (block types,
transitions, SPP, head type/layout/conv; `nas.supernet_train.family_decisions`): it scores the supernet's
largest (the sandwich's teacher, recorded in `supernet.pt`) and every architecture that differs from it in
exactly one such decision, with inherited weights as a `detforge search` trial scores them (BatchNorm
statistics re-estimated on the search's batches, mAP50-95 on the whole validation set). A smooth supernet
keeps the neighbours near the largest; one whose weights only work on the paths it trains most collapses
them. For scale it also scores the space's smallest architecture with each head type (the sandwich's
other end, trained every step). It writes RUN/REPORT: the largest's mAP, each neighbour's (decision, choice,
arch id, mAP), the neighbours' median as a fraction of the largest's, and the smallest's mAP per head type:

    python benchmarks/inherited_neighbourhood.py runs/bench/sort_a \
        --supernet runs/bench/sort_a/supernet_ext/supernet.pt --report neighbourhood_ext_e32.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from search_synthetic import read_run_or_exit, trial_scoring_data  # the script's directory is on sys.path

from nas.budget import pinned_space
from nas.supernet import load_supernet
from nas.supernet_train import SUPERNET_FILE, family_decisions
from search_spaces.io import atomic_write_json, load_weights
from trainer.datasets import load_data_config
from trainer.distributed import resolve_device
from trainer.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search_synthetic.py output directory (bench.json, supernet/)")
    ap.add_argument("--supernet", type=Path, default=None, help="default: RUN/supernet/supernet.pt")
    ap.add_argument("--report", default="inherited_neighbourhood.json", help="file name under RUN")
    ap.add_argument("--bn-batches", type=int, default=None, help="default: the run's search's")
    cli = ap.parse_args()
    _, args = read_run_or_exit(ap, cli.run, "supernet")
    path = cli.supernet or cli.run / "supernet" / SUPERNET_FILE
    region = load_weights(path).get("region")
    if not region:
        ap.error(f"{path} records no largest architecture: it was trained on the whole space, not for a budget")
    data = load_data_config(args.data)
    device = resolve_device(args.device)
    net = load_supernet(path).to(device)
    space = pinned_space(net.space.with_nc(net.nc), args.imgsz)
    bn_batches, batches, val = trial_scoring_data(cli.run, args, data, cli.bn_batches, device)

    def inherited_map(decisions: dict[str, Any]) -> float:
        model = net.extract(space.build_arch(decisions, nc=net.nc), bn_batches=batches)
        return float(evaluate(model, val, data.nc, data.names, device=device).metrics.map)

    largest = dict(region["largest_decisions"])
    top_id = space.arch_id(largest)
    report: dict[str, Any] = {"supernet": str(path), "largest": top_id, "bn_batches": bn_batches,
                              "threads": torch.get_num_threads(), "largest_map": inherited_map(largest),
                              "neighbours": []}
    print(f"largest {top_id}: inherited mAP50-95 {report['largest_map']:.4f}", flush=True)
    for name in family_decisions(space):
        for choice in space.decisions[name].choices:
            d = {**largest, name: choice}
            aid = space.arch_id(d)
            if choice == largest[name] or aid == top_id:  # the same architecture (a decision it does not use)
                continue
            t0 = time.perf_counter()
            row = {"decision": name, "choice": choice, "arch_id": aid, "inherited_map": inherited_map(d),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            report["neighbours"].append(row)
            print(f"{name}={choice} ({aid}): {row['inherited_map']:.4f}", flush=True)
    smallest = space.smallest_decisions()
    report["smallest_map"] = {t: inherited_map({**smallest, "head.type": t}) for t in space.decisions["head.type"].choices}
    print(f"smallest, per head type: {report['smallest_map']}", flush=True)
    maps = [r["inherited_map"] for r in report["neighbours"]]
    report["neighbours_median_map"] = statistics.median(maps)
    report["neighbours_median_ratio"] = report["neighbours_median_map"] / report["largest_map"] \
        if report["largest_map"] > 0 else None
    report["neighbours_below_half"] = sum(m < report["largest_map"] / 2 for m in maps)
    atomic_write_json(cli.run / cli.report, report)
    print(f"{len(maps)} neighbours: median {report['neighbours_median_map']:.4f} "
          f"({report['neighbours_median_ratio']}), {report['neighbours_below_half']} below half the largest's")


if __name__ == "__main__":
    main()
