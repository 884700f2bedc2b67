"""INT8 accuracy by quantization target: FP32 against ORT's CPU form and TensorRT's form, scored on CPU.

    python benchmarks/int8_targets.py --models DIR [DIR ...] --data data.yaml --imgsz 128 [--calib 64]

`target='trt'` (symmetric int8 activations, biases in float) is what TensorRT builds from; its Q/DQ scales are
the engine's, so ONNX Runtime running the same QDQ file on the CPU shows the quantization's accuracy cost
without a GPU (the engine's own kernels and fp16 layers are not). Each model is exported fused (FP32, verified
against PyTorch), quantized per target with per-channel and per-tensor weights (minmax calibration on `--calib`
training images), and every file is scored on the val split (COCO mAP, the trainer's NMS and pycocotools).
Prints one JSON object and writes it to `--out`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from compress.export import export_detector
from compress.onnx_eval import evaluate_onnx
from compress.quantize import calibration_images, quantize_onnx
from search_spaces import load_model
from search_spaces.io import atomic_write_json
from trainer.datasets import val_loader
from trainer.trainer import resolve_data_config

VARIANTS = {  # name: quantize_onnx arguments
    "cpu_per_channel": {"target": "cpu", "per_channel": True},
    "cpu_per_tensor": {"target": "cpu", "per_channel": False},
    "trt_per_channel": {"target": "trt", "per_channel": True},
    "trt_per_tensor": {"target": "trt", "per_channel": False},
}


def measure(model_dir: str, images: Iterable, val: Iterable, nc: int, imgsz: int, work: Path) -> dict:
    """FP32 and every INT8 variant of one model (calibrated on `images`): mAP on `val` and the quantizer's output
    error against FP32."""

    def score(path: Path) -> dict[str, float]:
        res = evaluate_onnx(path, val, nc)
        return {"map": round(100 * res.metrics.map, 3), "map50": round(100 * res.metrics.map50, 3)}

    det = load_model(model_dir).eval()
    fp32 = work / "fp32.onnx"
    export_detector(det, fp32, imgsz=imgsz, fuse=True)
    row = {"model": model_dir, "arch": det.arch.name, "head": det.arch.head.type, "fp32": score(fp32)}
    for name, kw in VARIANTS.items():
        t = time.perf_counter()
        q = quantize_onnx(fp32, work / f"{name}.onnx", images, method="minmax", **kw)
        seconds = round(time.perf_counter() - t, 1)
        row[name] = {**score(Path(q.path)), "score_mae": q.error["score_mae"], "box_mae_px": q.error["box_mae_px"],
                     "quantize_s": seconds}
    return row


def main(argv: list[str] | None = None) -> dict:
    """Measure every model; print and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True, help="trained model directories (arch.yaml + weights.pt)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/int8_targets.json")
    args = ap.parse_args(argv)
    cfg = resolve_data_config(args.data, args.imgsz)  # read once: every file is scored on the same loader
    val = val_loader(cfg, args.imgsz, args.batch)
    images = calibration_images(args.data, args.imgsz, n=args.calib)
    rows = []
    for m in args.models:
        with tempfile.TemporaryDirectory(prefix="detforge-int8-") as tmp:
            rows.append(measure(m, images, val, cfg.nc, args.imgsz, Path(tmp)))
    doc = {"imgsz": args.imgsz, "calib": args.calib, "method": "minmax", "models": rows}
    atomic_write_json(args.out, doc)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
