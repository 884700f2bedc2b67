"""Compression figures on a trained model: fusion, INT8 (mAP drop, speedup), pruning (both backends), distillation.

    python benchmarks/compress_synthetic.py --model runs/bench/train_synthetic/model \\
        --data runs/data/synthetic/data.yaml --imgsz 320 --finetune-epochs 2

MODEL is a trained model directory (arch.yaml + weights.pt), e.g. the one `benchmarks/train_synthetic.py`
writes. Every section is saved to OUT/compress.json as soon as it finishes and skipped on a rerun (delete its
key or pass --redo SECTION), so a killed run resumes. Latencies: ONNX Runtime CPU, 2 threads, batch 1, the
models of one comparison each timed alone in rotating passes by `compress.report.measure_latency_ms`.

Sections:
  fusion    yolov7 (random weights) training form -> fused deploy form: max abs diff, ORT speedup
  baseline  the trained model: mAP (PyTorch, EMA weights) and its fused FP32 ONNX mAP
  int8      ORT QDQ INT8 of the fused ONNX: mAP and latency vs FP32
  qat       quantization-aware finetuning (--qat-epochs) exported as QDQ: mAP and latency vs FP32 and PTQ
  prune     50% of MACs removed with torch-pruning and with NNI, each finetuned --finetune-epochs:
            mAP and latency vs the unpruned model
  latency   every exported file of the run measured in one call, --measurements times (the
            sections' own latencies compare a few files each; this puts them on one footing)
  distill   the torch-pruning student finetuned the same epochs and seed with the trained model as teacher
            (output + feature terms): its mAP vs the plain finetune's
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.distill import DistillConfig, Distiller
from compress.export import export_detector
from compress.fuse import fuse_detector
from compress.onnx_eval import evaluate_onnx
from compress.prune import prune_detector
from compress.qat import export_qat, qat_finetune
from compress.quantize import calibration_images, quantize_onnx
from compress.report import detector_size, measure_latency_ms
from search_spaces import load_model, save_model
from search_spaces.io import atomic_write_json
from search_spaces.model import Detector
from tests.helpers import randomize
from trainer.config import TrainConfig
from trainer.datasets import val_loader
from trainer.evaluate import evaluate
from trainer.trainer import Trainer, resolve_data_config

SECTIONS = ("fusion", "baseline", "int8", "qat", "prune", "distill", "latency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/bench/train_synthetic/model", help="trained model directory")
    ap.add_argument("--data", default="runs/data/synthetic/data.yaml")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--macs", type=float, default=0.5, help="fraction of MACs the pruned models keep")
    ap.add_argument("--round-to", type=int, default=16,
                    help="pruned channel counts are multiples of this (16: AVX-512 NCHWc blocks in ORT's MLAS)")
    ap.add_argument("--finetune-epochs", type=int, default=2, help="finetune budget after pruning (and distill)")
    ap.add_argument("--nbs", type=int, default=64, help="nominal batch of the finetunes (16: 4x the optimizer steps)")
    ap.add_argument("--w-feat", type=float, default=DistillConfig.w_feat,
                    help="`distill`: feature (CWD) weight; the session-2/4 rows in docs/benchmarks.md used 1")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=128, help="INT8 calibration images (train split)")
    ap.add_argument("--measurements", type=int, default=3, help="measurements of all files in `latency`")
    ap.add_argument("--repeats", type=int, default=7, help="latency passes per comparison")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--redo", default="", help="comma-separated sections to measure again")
    ap.add_argument("--out", default="runs/bench/compress")
    return ap.parse_args(argv)


# the sections whose figures or files each section reads
READS = {"int8": {"baseline"}, "qat": {"baseline", "int8"}, "prune": {"baseline"}, "distill": {"baseline", "prune"},
         "latency": {"baseline", "int8", "qat", "prune", "distill"}}


class Bench:
    """The shared state of one run: arguments, the validation loader, and the results file."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "compress.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data_cfg = resolve_data_config(args.data, args.imgsz)
        self.val_loader = val_loader(self.data_cfg, args.imgsz, workers=2)
        # what a section's figures depend on: a section recorded with other settings is measured again, and
        # so is every section that reads its figures or files (READS)
        self.settings = {k: v for k, v in vars(args).items() if k not in ("sections", "redo", "out", "measurements")}
        self.rerun: set[str] = set()

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        redo = set(filter(None, self.args.redo.split(",")))
        if name not in self.args.sections.split(","):
            return
        earlier = self.results.get(name)
        stale = earlier is not None and earlier.get("settings", self.settings) != self.settings  # none: older
        if earlier is not None and name not in redo and not stale and not READS.get(name, set()) & self.rerun:
            return
        self.rerun.add(name)
        t0 = time.time()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        res = fn()
        res["wall_s"] = round(time.time() - t0, 1)
        res["settings"] = self.settings
        self.results[name] = res
        self.results["machine"] = {"cpu": platform.processor() or platform.machine(),
                                   "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
        atomic_write_json(self.path, self.results)
        print(f"[{name}] {json.dumps(res)}", file=sys.stderr, flush=True)

    def map_torch(self, det: Detector) -> dict[str, float]:
        r = evaluate(det.eval(), self.val_loader, det.nc, self.data_cfg.names, device="cpu")
        return {"map": r.metrics.map, "map50": r.metrics.map50}

    def map_onnx(self, path: Path) -> dict[str, float]:
        r = evaluate_onnx(path, self.val_loader, self.data_cfg.nc, self.data_cfg.names)
        return {"map": r.metrics.map, "map50": r.metrics.map50}

    def latency(self, models: list[Any]) -> list[float]:
        return measure_latency_ms(models, self.args.imgsz, repeats=self.args.repeats, max_time_s=8.0)

    def finetune(self, det: Detector, name: str, callbacks: list[Any] = ()) -> Detector:
        a = self.args
        cfg = TrainConfig(model=a.model, data=a.data, out=str(self.out / name), epochs=a.finetune_epochs,
                          imgsz=a.imgsz, batch=a.batch, nbs=a.nbs, device="cpu", progress=False, seed=0,
                          exist_ok=True, autoanchor=False)  # a trained model's anchors stay
        trainer = Trainer(cfg, model=det, callbacks=callbacks)
        trainer.train()
        return trainer.eval_model


def model_stats(det: Detector, imgsz: int) -> dict[str, float]:
    params, gflops = detector_size(det, imgsz)
    return {"params": params, "gflops": gflops}


def fusion(b: Bench) -> dict[str, Any]:
    torch.manual_seed(0)
    det = load_model("yolov7", form="training").eval()
    randomize(det, seed=0)  # non-trivial BN statistics and implicit tensors, so every fold is exercised
    fused, rep = fuse_detector(det, b.args.imgsz, check_imgsz=b.args.imgsz)
    x = torch.rand(2, 3, b.args.imgsz, b.args.imgsz, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (dec0, raw0), (dec1, raw1) = det(x), fused(x)
    # decoded boxes are in pixels (float32 spacing ~3e-5 at 500 px), so also compare the head's raw maps
    # (logits) and the scores, whose scale is 1
    raw_diff = max((a - c).abs().max().item() for a, c in zip(raw0, raw1))
    score_diff = (dec0[..., 4:] - dec1[..., 4:]).abs().max().item()
    ms_train, ms_fused = b.latency([det, fused])
    return {"model": "yolov7", "max_abs_diff": rep.details["max_abs_diff"],
            "max_abs_diff_raw": raw_diff, "max_abs_diff_scores": score_diff,
            "max_abs_output": rep.details["max_abs_output"], "params_before": rep.params_before,
            "params_after": rep.params_after, "latency_ms_training_form": ms_train, "latency_ms_fused": ms_fused,
            "speedup": ms_train / ms_fused}


def baseline(b: Bench) -> dict[str, Any]:
    det = load_model(b.args.model)
    fused, _ = fuse_detector(det, b.args.imgsz)
    onnx = export_detector(fused, b.out / "base.fp32.onnx", b.args.imgsz).path
    return {"model": b.args.model, **model_stats(fused, b.args.imgsz), "torch": b.map_torch(det),
            "onnx_fp32": b.map_onnx(Path(onnx))}


def int8(b: Bench) -> dict[str, Any]:
    fp32 = b.out / "base.fp32.onnx"
    calib = calibration_images(b.args.data, b.args.imgsz, n=b.args.calib)
    rep = quantize_onnx(fp32, b.out / "base.int8.onnx", calib, method="entropy")
    ms_fp32, ms_int8 = b.latency([fp32, b.out / "base.int8.onnx"])
    m32 = b.results["baseline"]["onnx_fp32"]
    m8 = b.map_onnx(b.out / "base.int8.onnx")
    return {"calib_images": len(calib), "method": "entropy", "excluded": rep.to_dict().get("excluded_sensitive"),
            "fp32": m32, "int8": m8, "map_drop_points": 100 * (m32["map"] - m8["map"]),
            "latency_ms_fp32": ms_fp32, "latency_ms_int8": ms_int8, "speedup": ms_fp32 / ms_int8}


def qat(b: Bench) -> dict[str, Any]:
    a = b.args
    cfg = TrainConfig(model=a.model, data=a.data, out=str(b.out / "qat"), epochs=a.qat_epochs, imgsz=a.imgsz,
                      batch=a.batch, device="cpu", progress=False, seed=0, exist_ok=True)
    model, rep = qat_finetune(load_model(a.model), cfg)
    path = export_qat(model, b.out / "base.qat.onnx", a.imgsz)
    ms_fp32, ms_ptq, ms_qat = b.latency([b.out / "base.fp32.onnx", b.out / "base.int8.onnx", path])
    m = b.map_onnx(path)
    fp32, ptq = b.results["baseline"]["onnx_fp32"], b.results["int8"]["int8"]
    return {"epochs": rep.epochs, "convs": rep.convs, "fp32": fp32, "ptq": ptq, "qat": m,
            "map_drop_points": 100 * (fp32["map"] - m["map"]), "latency_ms_fp32": ms_fp32,
            "latency_ms_ptq": ms_ptq, "latency_ms_qat": ms_qat, "speedup": ms_fp32 / ms_qat}


def prune(b: Bench) -> dict[str, Any]:
    det = load_model(b.args.model)
    base_map = b.results["baseline"]["torch"]["map"]
    rows: dict[str, Any] = {}
    onnx = [b.out / "base.fp32.onnx"]
    for backend in ("torch-pruning", "nni"):
        pruned, rep = prune_detector(det, b.args.macs, backend=backend, imgsz=b.args.imgsz,
                                     round_to=b.args.round_to)
        save_model(pruned, b.out / f"pruned-{backend}")  # before finetuning: the distillation student
        tuned = b.finetune(copy.deepcopy(pruned), f"finetune-{backend}")
        save_model(tuned, b.out / f"pruned-{backend}-finetuned")
        fused, _ = fuse_detector(tuned, b.args.imgsz)
        onnx.append(Path(export_detector(fused, b.out / f"pruned-{backend}.fp32.onnx", b.args.imgsz).path))
        m = b.map_torch(tuned)
        rows[backend] = {**model_stats(fused, b.args.imgsz), "macs_kept": rep.details.get("macs_ratio"),
                         "map_after_prune": b.map_torch(pruned)["map"], **m,
                         "map_drop_points": 100 * (base_map - m["map"])}
    lat = b.latency(onnx)
    for backend, ms in zip(rows, lat[1:]):
        rows[backend].update(latency_ms=ms, latency_ms_unpruned=lat[0], latency_change=ms / lat[0] - 1.0)
    return {"finetune_epochs": b.args.finetune_epochs, "round_to": b.args.round_to, "base_map": base_map,
            "base": b.results["baseline"].get("params"), **rows}


def distill(b: Bench) -> dict[str, Any]:
    teacher = load_model(b.args.model)
    student = load_model(b.out / "pruned-torch-pruning")
    kd = Distiller(teacher, student, DistillConfig(w_feat=b.args.w_feat))
    tuned = b.finetune(student, "finetune-distill", callbacks=[kd])
    m = b.map_torch(tuned)
    plain = b.results["prune"]["torch-pruning"]
    return {"teacher": b.args.model, "teacher_map": b.results["baseline"]["torch"]["map"],
            "student": "pruned-torch-pruning", "epochs": b.args.finetune_epochs, "plain": plain["map"],
            "distilled": m["map"], "distilled_map50": m["map50"], "gain_points": 100 * (m["map"] - plain["map"])}


FILES = ("base.fp32.onnx", "base.int8.onnx", "base.qat.onnx", "pruned-torch-pruning.fp32.onnx",
         "pruned-nni.fp32.onnx")


def latency(b: Bench) -> dict[str, Any]:
    files = [f for f in FILES if (b.out / f).is_file()]
    rows: dict[str, list[float]] = {f: [] for f in files}
    for _ in range(b.args.measurements):
        for f, ms in zip(files, b.latency([b.out / f for f in files])):
            rows[f].append(ms)
    ref = rows[files[0]]
    return {"files": {f: {"latency_ms": v, "vs_fp32": [m / r for m, r in zip(v, ref)]} for f, v in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    b = Bench(args)
    for name, fn in (("fusion", fusion), ("baseline", baseline), ("int8", int8), ("qat", qat),
                     ("prune", prune), ("distill", distill), ("latency", latency)):
        b.run(name, lambda fn=fn: fn(b))
    print(json.dumps(b.results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
