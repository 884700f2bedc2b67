"""Rank fidelity of finetuned inherited weights (`detforge search --finetune-epochs E`) on a search run.

`search_synthetic.py` measures how well inherited-weight mAP ranks the run's rank-fidelity architectures
against their stand-alone training. This script scores the same architectures the way a search with
`--finetune-epochs E` does (the supernet's subnet, BatchNorm recalibrated on the search's batches, extracted
and trained E epochs by `nas.search.train_candidate`), and, as the control that says whether the inherited
weights matter, the same E epochs from a fresh initialisation. It writes RUN/finetune_fidelity.json: per
architecture both proxies' mAP and wall time, and Kendall tau of each proxy (and of plain inherited mAP)
against the stand-alone mAP of seed 0 (final, last-3 mean) and, where `seed_repeats.py --fidelity` ran,
against the mean over seeds (over the architectures it repeated). A finished training is read back from its
proxy.json; an interrupted one starts over.

    python benchmarks/finetune_fidelity.py runs/bench/search128d --epochs 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from search_synthetic import (  # the script's directory is on sys.path
    _run_arch_yaml,
    _tau,
    read_run_or_exit,
    run_optimizer,
)

from nas.search import calibration_batches, train_candidate
from nas.supernet import load_supernet
from nas.supernet_train import SUPERNET_FILE
from search_spaces import Detector
from search_spaces.architecture import Architecture
from search_spaces.io import atomic_write_json
from trainer.datasets import load_data_config
from trainer.distributed import resolve_device

PROXIES = ("finetuned", "scratch")


def _trained(run: Path, epochs: int, model: Any, args: argparse.Namespace, nbs: int) -> dict[str, Any]:
    """Train `model()` for `epochs` into `run` unless a finished run of the same settings is there; its final mAP
    and wall time."""
    settings = {"nbs": nbs, **run_optimizer(args), **{k: getattr(args, k) for k in ("data", "imgsz", "batch", "seed",
                                                                                     "val_batches")}}
    if (run / "proxy.json").is_file():  # written once the training finished
        row = json.loads((run / "proxy.json").read_text())
        if row.get("settings") == settings:
            return row
    shutil.rmtree(run, ignore_errors=True)  # an interrupted one (or one of other settings) starts over: a few epochs
    t0 = time.perf_counter()
    res = train_candidate(model(), args.data, run, epochs, imgsz=args.imgsz, batch=args.batch, nbs=nbs,
                          **run_optimizer(args), device=args.device, workers=args.workers, seed=args.seed,
                          val_batches=args.val_batches,
                          autoanchor=False)  # inherited and scratch arms differ only in their start
    row = {"map": float(res.metrics.map), "map50": float(res.metrics.map50), "wall_s": round(time.perf_counter() - t0, 1),
           "settings": settings}
    atomic_write_json(run / "proxy.json", row)
    return row


def _taus(proxy: list[float], targets: dict[str, list[float]]) -> dict[str, float | None]:
    return {f"tau_vs_{k}": _tau(proxy, v) for k, v in targets.items()}


def seed_means(run: Path) -> dict[str, dict[str, Any]]:
    """{arch_id: {'standalone_seed_mean', 'standalone_seeds'}} of the architectures `seed_repeats.py
    --fidelity` repeated in `run` (empty when it did not run)."""
    path = run / "seeds_fidelity.json"
    seeded = json.loads(path.read_text())["models"] if path.is_file() else {}
    return {aid: {"standalone_seed_mean": statistics.fmean(s["map"] for s in m["seeds"]),
                  "standalone_seeds": len(m["seeds"])} for aid, m in seeded.items() if m.get("seeds")}


def fidelity_taus(report: dict[str, Any], proxies: dict[str, list[float]]) -> None:
    """Kendall tau of each proxy (one score per row of report['archs']) against the stand-alone mAP of seed 0
    (final, last-3 mean) and, over the rows that have one, the mean over seeds; into report['kendall_tau']."""
    rows = report["archs"]
    targets = {"standalone": [x["standalone_map"] for x in rows],
               "standalone_last3": [x["standalone_map_last3"] for x in rows]}
    report["kendall_tau"] = {p: _taus(v, targets) for p, v in proxies.items()}
    seeded_rows = [i for i, x in enumerate(rows) if "standalone_seed_mean" in x]
    if len(seeded_rows) >= 2:  # over the architectures seed_repeats.py --fidelity repeated
        report["seed_mean_archs"] = [rows[i]["arch_id"] for i in seeded_rows]
        mean = [rows[i]["standalone_seed_mean"] for i in seeded_rows]
        for p, v in proxies.items():
            report["kendall_tau"][p]["tau_vs_seed_mean"] = _tau([v[i] for i in seeded_rows], mean)
    report["seeds_per_arch"] = sorted({x.get("standalone_seeds", 1) for x in rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search_synthetic.py output directory (bench.json, supernet/)")
    ap.add_argument("--epochs", type=int, default=2, help="finetune epochs (and the control's)")
    ap.add_argument("--nbs", type=int, default=None, help="nominal batch (default: the run's)")
    ap.add_argument("--no-control", action="store_true", help="skip the from-scratch control")
    cli = ap.parse_args()
    bench, args = read_run_or_exit(ap, cli.run, "rank_fidelity")
    nbs = cli.nbs or args.nbs
    fidelity = bench["rank_fidelity"]["archs"]
    if len(fidelity) < 2:
        ap.error(f"{cli.run / 'bench.json'} has fewer than 2 rank-fidelity architectures")
    device = resolve_device(args.device)
    net = load_supernet(cli.run / "supernet" / SUPERNET_FILE).to(device)
    batches = calibration_batches(load_data_config(args.data), args.imgsz, args.batch, args.bn_batches,
                                  seed=args.seed, workers=args.workers, device=device)
    seeded = seed_means(cli.run)
    out_dir = cli.run / "finetune_fidelity"
    report: dict[str, Any] = {"epochs": cli.epochs, "nbs": nbs, "imgsz": args.imgsz, "batch": args.batch,
                              "bn_batches": args.bn_batches, "threads": torch.get_num_threads(), "archs": []}
    for r in fidelity:
        aid = r["arch_id"]
        text = _run_arch_yaml(cli.run, aid)
        if text is None:
            ap.error(f"{aid}: neither in {cli.run / 'pareto'} nor in the run's study")
        arch = Architecture.from_dict(yaml.safe_load(text))

        def inherited(arch: Architecture = arch) -> Detector:
            return net.extract(arch, bn_batches=batches).cpu()

        def fresh(arch: Architecture = arch) -> Detector:
            torch.manual_seed(args.seed)
            return Detector(arch)

        row = {"arch_id": aid, "inherited_map": r["inherited_map"], "standalone_map": r["standalone_map"],
               "standalone_map_last3": r["standalone_map_last3"]}
        row.update(seeded.get(aid, {}))
        row["finetuned"] = _trained(out_dir / f"{aid}-ft{cli.epochs}", cli.epochs, inherited, args, nbs)
        if not cli.no_control:
            row["scratch"] = _trained(out_dir / f"{aid}-scratch{cli.epochs}", cli.epochs, fresh, args, nbs)
        report["archs"].append(row)
        print(f"{aid}: inherited {row['inherited_map']:.4f}  finetuned {row['finetuned']['map']:.4f}"
              + (f"  scratch {row['scratch']['map']:.4f}" if "scratch" in row else "")
              + f"  stand-alone {row['standalone_map']:.4f}", flush=True)
        atomic_write_json(cli.run / "finetune_fidelity.json", report)  # so far: a killed run keeps it
    rows = report["archs"]
    fidelity_taus(report, {"inherited": [x["inherited_map"] for x in rows],
                           **{p: [x[p]["map"] for x in rows] for p in PROXIES if all(p in x for x in rows)}})
    atomic_write_json(cli.run / "finetune_fidelity.json", report)
    print(json.dumps(report["kendall_tau"], indent=2))


if __name__ == "__main__":
    main()
