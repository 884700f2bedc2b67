"""Rank fidelity of a supernet's inherited weights over a search run's rank-fidelity architectures.

`search_synthetic.py` trains each rank-fidelity architecture stand-alone, which is most of its cost. This
script scores those same architectures with the inherited weights of any supernet trained for the run's
space, data and budget (the run's own, or one trained another way, e.g. `detforge supernet train
--per-head`), evaluated as a `detforge search` trial is: the subnet extracted with its BatchNorm statistics
recalibrated on the search's batches, then mAP50-95 on the whole validation set. It writes RUN/REPORT: per
architecture the inherited mAP and head configuration, and Kendall tau against the stand-alone mAP of seed 0
(final, last-3 mean), against the mean over seeds (where `seed_repeats.py --fidelity` ran) and within each
head configuration that holds at least 3 of the architectures. Beside mAP50-95 it scores each architecture by
its inherited mAP50 and its validation loss (box, objectness, classification and their sum; YOLOv7's loss
with the tiny hyp's gains, unscaled, so every head layout is weighed alike): at this compute the inherited
mAPs sit near the evaluation's floor, where a continuous loss may still order the candidates.

    python benchmarks/inherited_fidelity.py runs/bench/search128d \\
        --supernet runs/bench/search128e/supernet/supernet.pt --report inherited_fidelity_per_head.json

With --per-head it first trains (or resumes) the supernet to score, with `detforge supernet train --per-head`'s
sandwich and the run's own supernet settings (space, data, table, budget, epochs, batch, nominal batch,
seed), into RUN/supernet_per_head/:

    python benchmarks/inherited_fidelity.py runs/bench/search128d --per-head --report inherited_fidelity_per_head.json

With --extra FILE it scores, beside the run's set, the architectures of a `random_fidelity.py` report (random
architectures of the run's feasible region, trained stand-alone the same way); each row says its `source`:

    python benchmarks/inherited_fidelity.py runs/bench/sort_a --extra random_fidelity.json --report inherited_fidelity_wide.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from finetune_fidelity import fidelity_taus, seed_means  # the script's directory is on sys.path
from search_synthetic import _run_arch_yaml, _tau, read_run_or_exit, train_supernet, trial_scoring_data

from nas.supernet import load_supernet
from nas.supernet_train import SUPERNET_FILE
from search_spaces.architecture import Architecture
from search_spaces.io import atomic_write_json
from search_spaces.space import load_space
from trainer.datasets import load_data_config
from trainer.distributed import resolve_device
from trainer.evaluate import evaluate
from trainer.hyp import load_hyp
from trainer.loss import HeadInfo, YoloLoss

MIN_GROUP = 3  # architectures a head configuration needs for a within-group tau
LOSS_HYP = "tiny"  # one set of loss gains for every architecture, so their losses compare
LOSS_TERMS = ("box", "obj", "cls")


def head_of(arch: Architecture) -> str:
    """An architecture's head configuration, e.g. 'idetect p3-p4'."""
    return f"{arch.head.type} p{arch.head_strides()[0].bit_length() - 1}-p{arch.head_strides()[-1].bit_length() - 1}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search_synthetic.py output directory (bench.json, supernet/)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--supernet", type=Path, default=None, help="default: RUN/supernet/supernet.pt")
    which.add_argument("--per-head", action="store_true",
                       help="train RUN/supernet_per_head/ with a sandwich per head configuration, then score it")
    ap.add_argument("--report", default="inherited_fidelity.json", help="file name under RUN")
    ap.add_argument("--bn-batches", type=int, default=None, help="default: the run's search's")
    ap.add_argument("--extra", default=None,
                    help="a random_fidelity.py report under RUN: score its architectures with the run's set")
    cli = ap.parse_args()
    bench, args = read_run_or_exit(ap, cli.run, "rank_fidelity")
    fidelity = [{**r, "source": "run"} for r in bench["rank_fidelity"]["archs"]]
    if cli.extra:
        extra = json.loads((cli.run / cli.extra).read_text())
        if extra["standalone_epochs"] != bench["rank_fidelity"]["standalone_epochs"]:
            ap.error(f"{cli.extra}: its stand-alone trainings ran {extra['standalone_epochs']} epochs, the run's "
                     f"{bench['rank_fidelity']['standalone_epochs']}")
        fidelity += extra["archs"]
    if len(fidelity) < 2:
        ap.error(f"{cli.run / 'bench.json'} has fewer than 2 rank-fidelity architectures")
    data = load_data_config(args.data)
    supernet = cli.supernet or cli.run / "supernet" / SUPERNET_FILE
    if cli.per_head:
        supernet = cli.run / "supernet_per_head" / SUPERNET_FILE
        if bench["supernet"].get("scope") != "budget":
            ap.error("--per-head trains for the run's budget: the run's supernet was trained on the whole space")
        t0 = time.perf_counter()
        train_supernet(args, load_space(args.space).with_nc(data.nc), args.data, Path(bench["table"]["path"]),
                       bench["budget_ms"], supernet.parent, per_head=True)
        print(f"per-head supernet: {time.perf_counter() - t0:.0f} s", flush=True)
    device = resolve_device(args.device)
    net = load_supernet(supernet).to(device)
    bn_batches, batches, val = trial_scoring_data(cli.run, args, data, cli.bn_batches, device)
    seeded = seed_means(cli.run)
    report: dict[str, Any] = {"supernet": str(supernet), "imgsz": args.imgsz, "batch": args.batch,
                              "bn_batches": bn_batches, "threads": torch.get_num_threads(), "archs": []}
    for r in fidelity:
        aid = r["arch_id"]
        text = r.get("arch") or _run_arch_yaml(cli.run, aid)
        if text is None:
            ap.error(f"{aid}: neither in {cli.run / 'pareto'} nor in the run's study")
        arch = Architecture.from_dict(yaml.safe_load(text))
        t0 = time.perf_counter()
        model = net.extract(arch, bn_batches=batches)
        res = evaluate(model, val, data.nc, data.names, device=device,
                       loss_fn=YoloLoss(HeadInfo.from_detector(model), load_hyp(LOSS_HYP)))
        assert res.loss is not None
        row = {"arch_id": aid, "head": head_of(arch), "inherited_map": float(res.metrics.map),
               "inherited_map50": float(res.metrics.map50),
               **{f"inherited_loss_{k}": v for k, v in zip(LOSS_TERMS, res.loss)},
               "inherited_loss": res.total_loss, "run_inherited_map": r.get("inherited_map"), "source": r["source"],
               "standalone_map": r["standalone_map"], "standalone_map_last3": r["standalone_map_last3"],
               "wall_s": round(time.perf_counter() - t0, 1), **seeded.get(aid, {})}
        report["archs"].append(row)
        print(f"{aid} ({row['head']}, {r['source']}): inherited {row['inherited_map']:.4f}, loss "
              f"{row['inherited_loss']:.4f}  stand-alone {r['standalone_map']:.4f}", flush=True)
    rows = report["archs"]
    # a lower loss ranks higher: negated so every proxy is "more is better"
    proxies = {"inherited": [x["inherited_map"] for x in rows],
               "inherited_map50": [x["inherited_map50"] for x in rows],
               "inherited_neg_loss": [-x["inherited_loss"] for x in rows],
               **{f"inherited_neg_loss_{k}": [-x[f"inherited_loss_{k}"] for x in rows] for k in LOSS_TERMS}}
    if all(x["run_inherited_map"] is not None for x in rows):  # the search's own scores (none for --extra's)
        proxies["run_inherited"] = [x["run_inherited_map"] for x in rows]
    fidelity_taus(report, proxies)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, x in enumerate(rows):
        groups[x["head"]].append(i)
    report["kendall_tau_within_head"] = {
        h: {"archs": len(g), **{f"{p}_tau_vs_standalone": _tau([v[i] for i in g], [rows[i]["standalone_map"] for i in g])
                                for p, v in proxies.items()}}
        for h, g in groups.items() if len(g) >= MIN_GROUP}
    atomic_write_json(cli.run / cli.report, report)
    print(json.dumps({"kendall_tau": report["kendall_tau"], "within_head": report["kendall_tau_within_head"]},
                     indent=2))


if __name__ == "__main__":
    main()
