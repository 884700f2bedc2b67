"""Widen a search run's rank-fidelity set with random architectures of its feasible region, trained stand-alone.

`search_synthetic.py` measures rank fidelity over the front and the study's next feasible trials. A 40-trial
search finds few feasible architectures, and those crowd at the budget's edge, where several train to within
one seed's noise of each other: six of them give a Kendall tau that moves by 0.3 with one discordant pair.
The supernet (`--table --budget-ms`) trains on the region's uniform draw, so the fair set to rank is that
draw: this script takes the study's feasible trials the run's set left out, then `--random N` architectures
drawn uniformly from the region (`FeasibleRegion.sample`, seeded by `--draw-seed`, repeats skipped), trains
each from scratch exactly as the run's rank-fidelity stage trained its own (same data, epochs, batch, nominal
batch, seed, into the same RUN/scratch/ directories; resumed after a kill) and writes RUN/REPORT: one row per
architecture in the schema of bench.json's rank_fidelity archs, plus its predicted latency and its source.

    python benchmarks/random_fidelity.py runs/bench/sort_a --random 7
    python benchmarks/inherited_fidelity.py runs/bench/sort_a --extra random_fidelity.json \\
        --report inherited_fidelity_wide.json

`inherited_fidelity.py --extra` then scores the run's set and these together with any supernet.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from search_synthetic import (  # the script's directory is on sys.path
    _last_maps_mean,
    _scratch_dir,
    _study,
    _train,
    read_run_or_exit,
    standalone_epochs,
)

from nas.budget import FeasibleRegion
from nas.pareto import feasible, scored_trials
from search_spaces import Detector
from search_spaces.architecture import Architecture
from search_spaces.io import atomic_write_json
from search_spaces.space import load_space
from trainer.datasets import load_data_config


def draw(region: FeasibleRegion, n: int, seed: int, skip: set[str]) -> list[tuple[str, Architecture]]:
    """`n` distinct architectures of the region's uniform draw (fewer if 100n draws do not find them), none of
    whose ids is in `skip`."""
    rng = np.random.default_rng(seed)
    out: dict[str, Architecture] = {}
    for _ in range(100 * n):
        if len(out) == n:
            break
        d = region.sample(rng)
        aid = region.space.arch_id(d)
        if aid not in skip and aid not in out:
            out[aid] = region.space.build_arch(d)
    return list(out.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search_synthetic.py output directory (bench.json, study.db, table)")
    ap.add_argument("--random", type=int, default=6, help="architectures drawn from the feasible region")
    ap.add_argument("--draw-seed", type=int, default=1, help="seed of the draw (the trainings use the run's seed)")
    ap.add_argument("--no-study", action="store_true", help="leave out the study's feasible trials")
    ap.add_argument("--report", default="random_fidelity.json", help="file name under RUN")
    ap.add_argument("--list", action="store_true", help="print the architectures it would train, and stop")
    cli = ap.parse_args()
    bench, args = read_run_or_exit(ap, cli.run, "rank_fidelity")
    rf = bench["rank_fidelity"]
    if rf.get("max_train_s"):
        ap.error("the run's rank-fidelity trainings were time-capped: this script trains to the epochs only")
    nc = load_data_config(args.data).nc
    region = FeasibleRegion.from_table(bench["table"]["path"], load_space(args.space), bench["budget_ms"], nc=nc,
                                       imgsz=args.imgsz)
    taken = {r["arch_id"] for r in rf["archs"]}
    chosen: list[tuple[str, Architecture, str]] = []
    if not cli.no_study:
        for t in sorted(scored_trials(_study(cli.run)), key=lambda t: t.number):
            aid = t.user_attrs["arch_id"]
            if feasible(t) and aid not in taken:
                taken.add(aid)
                chosen.append((aid, Architecture.from_dict(yaml.safe_load(t.user_attrs["arch"])), "study"))
    chosen += [(aid, arch, "random") for aid, arch in draw(region, cli.random, cli.draw_seed, taken)]
    predicted = {aid: region.predict_ms(arch) for aid, arch, _ in chosen}
    epochs = standalone_epochs(args)
    report_file = cli.run / cli.report
    report: dict[str, Any] = {"run": str(cli.run), "budget_ms": bench["budget_ms"], "draw_seed": cli.draw_seed,
                              "standalone_epochs": epochs, "seed": args.seed, "archs": []}
    for aid, arch, source in chosen:
        print(f"{aid} ({source}): {predicted[aid]:.2f} ms predicted, {arch.head.type} head, "
              f"{len(arch.head.inputs)} levels", flush=True)
    if cli.list:
        return
    earlier = json.loads(report_file.read_text())["archs"] if report_file.is_file() else []
    finished = {r["arch_id"]: r for r in earlier if r["epochs"] == epochs}  # kept with their wall times
    for aid, arch, source in chosen:
        if aid in finished:
            report["archs"].append(finished[aid])
            continue
        run = _scratch_dir(cli.run, aid, epochs, None)
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        m, done = _train(Detector(arch), args.data, run, epochs, args)
        row = {"arch_id": aid, "source": source, "predicted_ms": predicted[aid], "standalone_map": m,
               "standalone_map_last3": _last_maps_mean(run), "epochs": done, "wall_s": round(time.perf_counter() - t0, 1),
               "arch": arch.to_yaml()}
        report["archs"].append(row)
        atomic_write_json(report_file, report)  # so far: a killed run keeps the finished rows
        print(f"stand-alone {aid} ({source}, {row['predicted_ms']:.2f} ms): mAP {m:.4f}", flush=True)
    print(json.dumps([{k: r[k] for k in ("arch_id", "source", "predicted_ms", "standalone_map")}
                      for r in report["archs"]], indent=2))


if __name__ == "__main__":
    main()
