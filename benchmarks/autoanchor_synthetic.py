"""AutoAnchor on the synthetic set: the zoo anchors' best possible recall (BPR) per training size, the refit's,
the check's time, and (with --train-epochs) the same model trained with and without it, seed for seed.

BPR only (seconds):  python benchmarks/autoanchor_synthetic.py
With training:       python benchmarks/autoanchor_synthetic.py --train-epochs 12 --seeds 0 1 --nbs 16
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from search_spaces import load_model
from search_spaces.io import atomic_write_json
from search_spaces.space import LAYOUTS, load_space
from trainer.autoanchor import check_anchors, fit_anchors
from trainer.config import TrainConfig
from trainer.datasets import YoloDataset
from trainer.synthetic import generate
from trainer.trainer import Trainer


def _bpr_rows(data: Path, models: list[str], sizes: list[int], nc: int) -> list[dict]:
    rows = []
    for imgsz in sizes:
        ds = YoloDataset.from_config(data, "train", imgsz=imgsz)
        for name in models:
            times, fit = [], None
            for _ in range(3):
                det = load_model(name, nc=nc)
                t0 = time.perf_counter()
                fit = check_anchors(det, ds.shapes, ds.labels, imgsz, seed=0)
                times.append(time.perf_counter() - t0)
            rows.append({"model": name, "imgsz": imgsz, "boxes": int(sum(len(x) for x in ds.labels)),
                         "bpr": round(fit.bpr, 4), "anchors_per_target": round(fit.anchors_per_target, 2),
                         "refit_bpr": None if fit.new_bpr is None else round(fit.new_bpr, 4),
                         "replaced": fit.replaced, "check_s_median": round(statistics.median(times), 3),
                         "anchors": fit.anchors})
            print(rows[-1], flush=True)
    return rows


def _space_rows(data: Path, space_name: str, sizes: list[int]) -> list[dict]:
    """A search space's anchors per head layout: their BPR and the supernet's AutoAnchor refit (median of 3 times)."""
    space = load_space(space_name)
    rows = []
    for imgsz in sizes:
        ds = YoloDataset.from_config(data, "train", imgsz=imgsz)
        for layout, levels in space.anchors.items():
            times, fit = [], None
            for _ in range(3):
                t0 = time.perf_counter()
                fit = fit_anchors(np.array(levels, dtype=float).reshape(-1, 2), [2 ** lvl for lvl in LAYOUTS[layout]],
                                  ds.shapes, ds.labels, imgsz, seed=0)
                times.append(time.perf_counter() - t0)
            rows.append({"space": space.name, "layout": layout, "imgsz": imgsz, "bpr": round(fit.bpr, 4),
                         "anchors_per_target": round(fit.anchors_per_target, 2),
                         "refit_bpr": None if fit.new_bpr is None else round(fit.new_bpr, 4),
                         "replaced": fit.replaced, "check_s_median": round(statistics.median(times), 3),
                         "anchors": fit.anchors})
            print(rows[-1], flush=True)
    return rows


def _maps(run: Path) -> list[float]:
    with open(run / "results.csv") as f:
        return [float(r["map"]) for r in csv.DictReader(f) if r.get("map")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="runs/data/synth128")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--data-imgsz", type=int, default=128)
    ap.add_argument("--models", nargs="*", default=["yolov7-tiny", "yolov7", "yolov7-e6"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 320, 640])
    ap.add_argument("--space", default="default", help="also this search space's anchors per layout (the supernet's "
                                                       "AutoAnchor)")
    ap.add_argument("--train-model", default="yolov7-tiny")
    ap.add_argument("--imgsz", type=int, default=128, help="training size")
    ap.add_argument("--train-epochs", type=int, default=0, help="0: the BPR table only")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench/autoanchor")
    args = ap.parse_args()
    out = Path(args.out)
    data = generate(args.data_dir, train=args.train, val=args.val, imgsz=args.data_imgsz, classes=args.classes,
                    seed=0)
    report: dict = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "data": str(data), "bpr": _bpr_rows(data, args.models, args.sizes, args.classes),
                    "space_bpr": _space_rows(data, args.space, args.sizes), "training": []}
    atomic_write_json(out / "autoanchor.json", report)
    print(f"wrote {out / 'autoanchor.json'}")
    for seed in args.seeds if args.train_epochs else []:  # 0: the BPR tables only
        for auto in (False, True):
            run = out / f"{args.train_model}-{args.imgsz}-{'auto' if auto else 'zoo'}-s{seed}"
            cfg = TrainConfig(model=args.train_model, data=str(data), out=str(run), epochs=args.train_epochs,
                              imgsz=args.imgsz, batch=args.batch, nbs=args.nbs, device=args.device,
                              workers=args.workers, seed=seed, progress=False, autoanchor=auto,
                              resume=(run / "last.pt").is_file())
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            result = trainer.train()
            maps = _maps(run)
            report["training"].append({
                "seed": seed, "autoanchor": auto, "epochs": result.epochs_done, "map": maps[-1] if maps else None,
                "map_last3_mean": statistics.mean(maps[-3:]) if maps else None, "wall_s": round(time.perf_counter() - t0),
                "anchors": load_model(run / "model").arch.head.anchors})
            print(report["training"][-1], flush=True)
            atomic_write_json(out / "autoanchor.json", report)


if __name__ == "__main__":
    main()
