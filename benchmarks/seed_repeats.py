"""Train a search run's front models and yolov7-tiny again with other seeds: how much of a mAP gap is noise.

`search_synthetic.py` trains every compared model once, with seed 0. At 1-3% mAP50-95 a model's last
validations move by tenths of a point from epoch to epoch, so one seed cannot tell a 0.05-point gap from noise.
This script repeats the from-scratch trainings of the search run RUN (same data, epochs, batch, nominal batch
and input size as the run's own, read from RUN/bench.json) with the given seeds and writes RUN/seeds.json: per
model and seed the final mAP and the mean of the last 3 validations, seed 0 taken from the run itself.

    python benchmarks/seed_repeats.py runs/bench/search128d --archs d0e1d91499 --seeds 1 2

Each model is also set against yolov7-tiny over the seeds both have (`vs_yolov7_tiny`: mean ratio, seed-by-seed
wins, Welch's t-test). `--report NAME` writes RUN/NAME instead, so another set of models keeps its own file:

    python benchmarks/seed_repeats.py runs/bench/search128d --archs 7a07c45330 --seeds 1 2 3 --report seeds_7a07.json

A model the run never trained from scratch (a front model of a run with --no-scratch, say) gets the run's
own seed too by naming it (`--seeds 0`); a model the run did train keeps that training for seed 0:

    python benchmarks/seed_repeats.py runs/bench/adamw320s33 --archs 6a3d9b869e --seeds 0 --latency

Without --archs it repeats the front models the run's comparison trained (the fastest and the best);
with --fidelity, every architecture of the run's rank-fidelity set, into RUN/seeds_fidelity.json. With two
or more seeds of each of them, the report also gives the noise ceiling of rank fidelity: Kendall tau
between the stand-alone mAPs of two seeds (a proxy cannot be expected to rank one seed's results better
than another seed of the same training does), and tau between inherited-weight mAP and the seed-mean mAP.

    python benchmarks/seed_repeats.py runs/bench/search128d --fidelity --seeds 1

Where the run's rank-fidelity trainings were shorter than its yolov7-tiny's (`--standalone-epochs`), they are
repeated at their own length, without yolov7-tiny:

    python benchmarks/seed_repeats.py runs/bench/adamw128 --fidelity --seeds 1 --no-baseline
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from search_synthetic import (  # the script's directory is on sys.path
    COMPARE_PASSES,
    _baseline_dir,
    _last_maps_mean,
    _maps,
    _run_arch_yaml,
    _scratch_dir,
    _tau,
    _train,
    baseline_epochs,
    read_run_or_exit,
)

from search_spaces import Detector, load_model
from search_spaces.architecture import Architecture
from search_spaces.io import atomic_write_json
from trainer.datasets import load_data_config


def _row(run: Path, m: float, done: int, seed: int) -> dict[str, Any]:
    return {"seed": seed, "map": m, "map_last3": _last_maps_mean(run), "epochs": done, "run": str(run)}


def noise_ceiling(models: dict[str, Any], fidelity: dict[str, Any]) -> dict[str, Any]:
    """Kendall tau between seeds of the rank-fidelity architectures, and of inherited mAP with the seed mean."""
    archs = [a for a in fidelity if a in models and len(models[a]["seeds"]) >= 2]
    if len(archs) < 2:
        return {}
    res: dict[str, Any] = {"archs": archs}
    for key in ("map", "map_last3"):
        first = [models[a]["seeds"][0][key] for a in archs]
        second = [models[a]["seeds"][1][key] for a in archs]
        mean = [models[a]["mean_" + key] for a in archs]
        res[f"tau_seed_vs_seed_{key}"] = _tau(first, second)
        res[f"tau_inherited_vs_seed_mean_{key}"] = _tau([fidelity[a]["inherited_map"] for a in archs], mean)
    # and within one training: how well the first seed's mAP some epochs before the end ranks its final mAP
    curves = [_maps(Path(models[a]["seeds"][0]["run"])) for a in archs]
    n = min(len(c) for c in curves)
    res["tau_epoch_vs_final"] = {str(e): _tau([c[e - 1] for c in curves], [c[n - 1] for c in curves])
                                 for e in sorted({n // 2, (3 * n) // 4, n - 4, n - 2}) if 1 <= e < n}
    return res


def versus_baseline(models: dict[str, Any], baseline: str = "yolov7-tiny") -> dict[str, Any]:
    """Each model's mAP against the baseline's over the seeds both have: mean ratio, seed-by-seed wins and
    Welch's t-test (two-sided p; with a handful of seeds only a large gap reaches significance)."""
    from scipy.stats import ttest_ind

    if baseline not in models:
        return {}
    base = {r["seed"]: r for r in models[baseline]["seeds"]}
    res: dict[str, Any] = {}
    for name, m in models.items():
        seeds = [r["seed"] for r in m["seeds"] if r["seed"] in base]
        if name == baseline or len(seeds) < 2:
            continue
        mine = {r["seed"]: r for r in m["seeds"]}
        row: dict[str, Any] = {"seeds": seeds}
        for key in ("map", "map_last3"):
            a, b = [mine[s][key] for s in seeds], [base[s][key] for s in seeds]
            mean_b = statistics.fmean(b)
            row[key] = {"mean": statistics.fmean(a), "baseline_mean": mean_b,
                        "ratio": statistics.fmean(a) / mean_b if mean_b else None,  # an untrained baseline: none
                        "wins": sum(x > y for x, y in zip(a, b)),
                        "welch_p": float(ttest_ind(a, b, equal_var=False).pvalue)}
        res[name] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a search_synthetic.py output directory (with bench.json)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--archs", nargs="+", default=None,
                       help="arch ids of the run's front or study; default: the models its comparison trained")
    which.add_argument("--fidelity", action="store_true", help="the run's rank-fidelity architectures (all of them)")
    ap.add_argument("--seeds", nargs="+", type=int, required=True, help="seeds to train; the run's own is read from the run where it trained the model")
    ap.add_argument("--no-baseline", action="store_true", help="do not repeat yolov7-tiny")
    ap.add_argument("--latency", action="store_true",
                    help="then measure each model's latency (ORT CPU, the run's threads, 7 rotating passes)")
    ap.add_argument("--report", default=None,
                    help="file name in RUN (default seeds.json; with --fidelity, seeds_fidelity.json)")
    cli = ap.parse_args()
    report_path = cli.run / "bench.json"
    # --fidelity repeats the rank-fidelity set; otherwise the run's settings are enough
    bench, args = read_run_or_exit(ap, cli.run, "rank_fidelity" if cli.fidelity else "data_and_table")
    data = args.data
    nc = load_data_config(data).nc
    epochs = baseline_epochs(args)

    def build(name: str) -> Detector:
        if name == "yolov7-tiny":
            return load_model("yolov7-tiny", nc=nc)
        text = _run_arch_yaml(cli.run, name)
        if text is None:
            ap.error(f"{name}: neither in {cli.run / 'pareto'} nor in the run's study")
        return Detector(Architecture.from_dict(yaml.safe_load(text)))

    compared = bench.get("vs_yolov7_tiny", {})
    fidelity = {r["arch_id"]: r for r in bench.get("rank_fidelity", {}).get("archs", [])}
    if cli.fidelity:
        archs = list(fidelity)
        rf = bench["rank_fidelity"]
        if rf.get("max_train_s"):
            ap.error(f"the run's rank-fidelity trainings were capped at {rf['max_train_s']} s: a repeat would "
                     "not be the same training")
        if rf["standalone_epochs"] != epochs and not cli.no_baseline:
            ap.error(f"the run's rank-fidelity trainings ({rf['standalone_epochs']} epochs) differ from its "
                     f"yolov7-tiny's ({epochs} epochs): pass --no-baseline")
        epochs = rf["standalone_epochs"]
    else:
        archs = cli.archs or list(dict.fromkeys(compared[k]["arch_id"] for k in ("fastest_front_model",
                                                                                  "front_model") if k in compared))
    if not archs:
        ap.error(f"{report_path} compares no front model: pass --archs")
    names = [*archs, *(() if cli.no_baseline else ("yolov7-tiny",))]
    out: dict[str, Any] = {"epochs": epochs, "models": {}}
    report_file = cli.run / (cli.report or ("seeds_fidelity.json" if cli.fidelity else "seeds.json"))
    for name in names:
        first = _baseline_dir(cli.run, epochs) if name == "yolov7-tiny" else _scratch_dir(cli.run, name, epochs, None)
        rows = []
        if (first / "results.csv").is_file():  # the run's own seed
            torch.manual_seed(args.seed)
            m, done = _train(build(name), data, first, epochs, args)
            rows.append(_row(first, m, done, args.seed))
        for seed in cli.seeds:
            if rows and seed == rows[0]["seed"]:  # the run's own training is that seed already
                continue
            run = cli.run / "seeds" / f"{name}-{epochs}e-s{seed}"  # per budget: another must not extend it
            args.seed = seed
            torch.manual_seed(seed)
            m, done = _train(build(name), data, run, epochs, args)
            rows.append(_row(run, m, done, seed))
            print(f"{name} seed {seed}: mAP {m:.4f}  last-3 mean {rows[-1]['map_last3']:.4f}", flush=True)
        args.seed = bench["args"]["seed"]
        finals, last3 = [r["map"] for r in rows], [r["map_last3"] for r in rows]
        out["models"][name] = {"seeds": rows, "mean_map": statistics.fmean(finals),
                               "mean_map_last3": statistics.fmean(last3),
                               "stdev_map": statistics.stdev(finals) if len(finals) > 1 else None}
        out["rank_fidelity"] = noise_ceiling(out["models"], fidelity)  # so far: a killed run keeps it
        out["vs_yolov7_tiny"] = versus_baseline(out["models"])
        atomic_write_json(report_file, out)
    if cli.latency:  # after the trainings, so that the timing has the cores to itself
        from compress.report import measure_latency_ms

        ms = measure_latency_ms([load_model(Path(out["models"][n]["seeds"][0]["run"]) / "model") for n in names], args.imgsz,
                                threads=args.threads, repeats=COMPARE_PASSES)
        out["latency"] = {"backend": "ort-cpu", "threads": args.threads, "passes": COMPARE_PASSES,
                          "median_ms": dict(zip(names, ms))}
        atomic_write_json(report_file, out)
    print(json.dumps({k: out[k] for k in ("rank_fidelity", "vs_yolov7_tiny", "latency") if k in out}, indent=2))
    print(json.dumps({k: {m: v[m] for m in ("mean_map", "mean_map_last3", "stdev_map")}
                      for k, v in out["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
