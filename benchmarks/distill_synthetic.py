"""Distillation gain (issue 6): a small student trained from scratch with and without a larger trained teacher.

    python benchmarks/train_synthetic.py --imgsz 128 --data-imgsz 128 --train 1000 --val 200 --classes 4 \\
        --epochs 80 --minutes 60 --nbs 16 --data-dir runs/data/synth128 --out runs/bench/teacher128
    python benchmarks/distill_synthetic.py --teacher runs/bench/teacher128/model \\
        --data runs/data/synth128/data.yaml --imgsz 128 --epochs 20 --out runs/bench/distill128

The student is `--student` (a zoo name or architecture file) with every width multiplied by `--student-width`,
trained twice from the same random initialisation, seed, data order and epochs: once plainly and once with
the teacher's `Distiller` terms added to the loss. Both final (EMA) models are scored on the training run's
validation split and on a held-out test split (`--test-data`, by default a synthetic set drawn with another
seed), so term weights chosen on validation are not also judged on it. Each run resumes after a kill;
finished runs are kept in OUT/distill.json and skipped on a rerun (`--redo plain,distill` repeats them).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.distill import DistillConfig, Distiller
from compress.report import detector_size
from search_spaces import load_model
from search_spaces.architecture import Architecture
from search_spaces.io import atomic_write_json
from search_spaces.loading import resolve_arch
from search_spaces.model import Detector
from trainer.config import TrainConfig
from trainer.datasets import val_loader
from trainer.evaluate import evaluate
from trainer.synthetic import generate, generation_params
from trainer.trainer import Trainer, resolve_data_config

RUNS = ("plain", "distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/bench/teacher128/model", help="trained model directory")
    ap.add_argument("--student", default="yolov7-tiny", help="zoo name or architecture file")
    ap.add_argument("--student-width", type=float, default=0.5, help="multiplier of every layer's channels")
    ap.add_argument("--data", default="runs/data/synth128/data.yaml")
    ap.add_argument("--test-data", default=None,
                    help="data.yaml whose val split is the test set (default: a synthetic set drawn with seed 1)")
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=16, help="nominal batch (16: 4x YOLOv7's optimizer steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-feat", type=float, default=DistillConfig.w_feat)
    ap.add_argument("--w-obj", type=float, default=DistillConfig.w_obj)
    ap.add_argument("--w-cls", type=float, default=DistillConfig.w_cls)
    ap.add_argument("--w-box", type=float, default=DistillConfig.w_box)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--redo", default="", help="comma-separated runs to train again")
    ap.add_argument("--out", default="runs/bench/distill128")
    return ap.parse_args(argv)


def scaled_arch(ref: str, width: float, nc: int) -> Architecture:
    """`ref`'s architecture with every layer's `out` and `width` channels times `width` (at least 8)."""
    arch, _ = resolve_arch(ref, None, nc)
    arch = arch.copy()
    for layer in arch.layers:
        for key in ("out", "width"):
            if key in layer.args:
                layer.args[key] = max(8, round(layer.args[key] * width))
    if width != 1.0:
        arch.name = f"{arch.name}-w{width:g}"
    return arch


def test_data(args: argparse.Namespace, nc: int) -> str:
    """The held-out test set's data.yaml: `--test-data`, or the training set's synthetic recipe with seed 1."""
    if args.test_data:
        return args.test_data
    # drawn at the size the training images were drawn at (their scenes scale with it), else at --imgsz
    size = (generation_params(Path(args.data).parent) or {}).get("imgsz", args.imgsz)
    out = Path(args.out) / f"test-seed1-{size}px-{nc}c"
    return str(generate(out, train=1, val=args.test_images, imgsz=size, classes=nc, seed=1))


def score(det: Detector, data: str, imgsz: int) -> dict[str, float]:
    """mAP50-95 and mAP50 of `det` on the val split of `data`."""
    cfg = resolve_data_config(data, imgsz)
    r = evaluate(det.eval(), val_loader(cfg, imgsz, workers=2), det.nc, cfg.names, device="cpu")
    return {"map": r.metrics.map, "map50": r.metrics.map50}


def train_student(args: argparse.Namespace, init: Detector, name: str, kd: DistillConfig | None,
                  teacher: Detector) -> tuple[Detector, dict[str, Any]]:
    """Train a copy of `init` for the run `name`, with the teacher's terms when `kd` is given; resumable."""
    out = Path(args.out) / name
    cfg = TrainConfig(data=args.data, out=str(out), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                      nbs=args.nbs, seed=args.seed, device="cpu", progress=False, resume=(out / "last.pt").is_file())
    student = copy.deepcopy(init)
    callbacks = [Distiller(teacher, student, kd)] if kd is not None else []
    t0 = time.time()
    res = Trainer(cfg, model=student, callbacks=callbacks).train()
    rows = [{k: v for k, v in r.items() if k not in ("lr", "train_s", "val_img_s")} for r in res.rows]
    return load_model(out / "model"), {"wall_s": round(time.time() - t0, 1), "epochs": res.epochs_done,
                                       "curve": rows}


def _comparable(plain: dict[str, Any], distill: dict[str, Any]) -> bool:
    """Whether the two runs trained alike (the distilled run's key adds its teacher and weights); runs recorded
    before the keys were kept count as comparable."""
    a, b = plain.get("run"), distill.get("run")
    return a is None or b is None or all(b.get(k) == v for k, v in a.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "distill.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    nc = resolve_data_config(args.data, args.imgsz).nc
    test = test_data(args, nc)
    teacher = load_model(args.teacher)
    if results.get("teacher", {}).get("model") != args.teacher or results["teacher"].get("test_data") != test:
        results["teacher"] = {"model": args.teacher, "test_data": test, "params": detector_size(teacher, args.imgsz)[0],
                              "val": score(teacher, args.data, args.imgsz), "test": score(teacher, test, args.imgsz)}
    arch = scaled_arch(args.student, args.student_width, nc)
    arch.to_yaml(out / "student.yaml")
    torch.manual_seed(args.seed)
    init = Detector(arch)  # one initialisation for both runs
    kd = DistillConfig(w_feat=args.w_feat, w_obj=args.w_obj, w_cls=args.w_cls, w_box=args.w_box)
    results["student"] = {"arch": arch.name, "params": detector_size(init, args.imgsz)[0]}
    redo = set(filter(None, args.redo.split(",")))
    # what makes the plain and distilled runs comparable: both must have been trained with these
    run_key = {k: getattr(args, k) for k in ("student", "student_width", "data", "imgsz", "epochs", "batch", "nbs",
                                             "seed")}
    # the distilled run also depends on its teacher and loss weights: another is another run
    keys = {"plain": run_key, "distill": {**run_key, "teacher": args.teacher, **kd.to_dict()}}
    for name in filter(None, args.runs.split(",")):
        if name not in RUNS:
            raise SystemExit(f"--runs: unknown run {name!r} (choose from {', '.join(RUNS)})")
        if name in results and name not in redo:
            if results[name].get("run") not in (None, keys[name]):
                raise SystemExit(f"OUT/distill.json holds a {name!r} run with other settings "
                                 f"({results[name]['run']}); pass --redo {name} or another --out")
            continue
        if name in results:  # --redo: a finished run's last.pt would resume as done; a killed one resumes
            shutil.rmtree(Path(args.out) / name, ignore_errors=True)
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        det, rec = train_student(args, init, name, kd if name == "distill" else None, teacher)
        rec.update(run=keys[name], val=score(det, args.data, args.imgsz), test=score(det, test, args.imgsz))
        if name == "distill":
            rec["config"] = kd.to_dict()
        results[name] = rec
        results["settings"] = {k: v for k, v in vars(args).items() if k not in ("runs", "redo")}
        results["machine"] = {"cpu": platform.processor() or platform.machine(),
                              "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
        if "plain" in results and "distill" in results and _comparable(results["plain"], results["distill"]):
            results["gain_points"] = {s: 100 * (results["distill"][s]["map"] - results["plain"][s]["map"])
                                      for s in ("val", "test")}
        atomic_write_json(path, results)
        print(f"[{name}] val {rec['val']} test {rec['test']}", file=sys.stderr, flush=True)
    print(json.dumps({k: v for k, v in results.items() if k not in ("plain", "distill")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
