"""Train a zoo model from scratch on the synthetic set for a wall-clock budget; record mAP per epoch and speed.

CPU (the issue's figure):  python benchmarks/train_synthetic.py --model yolov7-tiny --imgsz 320 --minutes 30
GPU AMP:                   python benchmarks/train_synthetic.py --model yolov7 --imgsz 640 --device cuda --amp bf16
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from trainer.config import OPTIMIZERS, TrainConfig
from trainer.synthetic import generate
from trainer.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov7-tiny")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--data-dir", default="runs/data/synthetic")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--data-imgsz", type=int, default=None, help="synthetic image size (default: max(imgsz, 320))")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=300, help="longest schedule; the epochs that fit --minutes (timed on epoch 1) shorten it")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=TrainConfig.nbs, help="nominal batch (gradient accumulation target)")
    ap.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS)
    ap.add_argument("--lr0", type=float, default=None, help="initial learning rate (default: the hyp's, SGD's 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/train_synthetic")
    ap.add_argument("--resume", action="store_true", help="continue OUT/last.pt after a kill")
    args = ap.parse_args()
    data = Path(args.data_dir)
    t0 = time.time()
    yaml_path = generate(data, train=args.train, val=args.val, imgsz=args.data_imgsz or max(args.imgsz, 320),
                         classes=args.classes, seed=0)
    gen_s = time.time() - t0
    cfg = TrainConfig(model=args.model, data=str(yaml_path), out=args.out, epochs=args.epochs, imgsz=args.imgsz,
                      batch=args.batch, nbs=args.nbs, device=args.device, amp=args.amp, workers=args.workers,
                      optimizer=args.optimizer, lr0=args.lr0, seed=args.seed,
                      max_time_s=args.minutes * 60, fit_epochs_to_time=True, progress=False,
                      resume=args.resume)
    t0 = time.time()
    result = Trainer(cfg).train()
    report = {
        "model": args.model, "imgsz": args.imgsz, "device": args.device, "amp": args.amp, "batch": args.batch,
        "nbs": args.nbs, "optimizer": args.optimizer, "lr0": args.lr0, "seed": args.seed,
        "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
        "data_generation_s": round(gen_s, 1), "train_wall_s": round(time.time() - t0, 1),
        "epochs": result.epochs_done, "best_map": result.best_map,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        # (no workers' figure: RUSAGE_CHILDREN counts what a forked worker inherits, so it equaled this one)
        "rows": result.rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    for r in result.rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
