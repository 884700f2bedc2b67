"""`detforge prune` and `detforge quantize`: structured pruning of a model, INT8 quantization of its ONNX."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nas.commands import add_optimizer_args, optimizer_settings
from nas.output import emit, format_mapping
from search_spaces.errors import ConfigError, DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune channels to a MACs ratio or a latency budget; writes arch.yaml + weights")
    p.add_argument("model", help="zoo name, architecture .yaml or model directory (arch.yaml + weights.pt)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--macs", type=float, help="keep this fraction of the MACs, e.g. 0.5")
    target.add_argument("--latency-ms", type=float, help="predicted latency budget (needs --table)")
    p.add_argument("--table", help="latency table JSON (from `detforge latency build`) to predict with")
    p.add_argument("--data", help="data.yaml or dataset directory (finetuning, sensitivity images)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="epochs of finetuning after each step (needs --data)")
    p.add_argument("--steps", type=int, default=1, help="prune -> finetune rounds (default 1)")
    p.add_argument("--imgsz", type=int, default=None, help="finetune / report input size (default: the model's)")
    p.add_argument("--backend", choices=["torch-pruning", "nni"], default="torch-pruning")
    p.add_argument("--importance", choices=["l2", "bn", "taylor"], default="l2",
                   help="channel importance (taylor: first-order, from the detection loss of a --data batch)")
    p.add_argument("--nni-pruner", choices=["l1", "l2", "fpgm"], default="l2")
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (default 8)")
    p.add_argument("--max-ratio", type=float, default=0.9, help="most any layer may lose (default 0.9)")
    p.add_argument("--sensitivity", action="store_true", help="scale stage ratios by a measured sensitivity "
                   "scan on --data images")
    p.add_argument("--batch", type=int, default=16)
    add_optimizer_args(p, trains="the finetunes")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_prune)

    q = sub.add_parser("quantize", help="INT8 QDQ ONNX (ONNX Runtime static quantization) calibrated on real images")
    q.add_argument("model", help="an FP32 .onnx, or a model (exported fused to ONNX first)")
    q.add_argument("--data", help="calibration images: an image directory, list file or data.yaml (train split)")
    q.add_argument("--calib", type=int, default=256,
                   help="calibration images (default 256; QAT calibrates on 8 training batches instead)")
    q.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="entropy",
                   help="calibration method of post-training quantization (QAT observes min/max ranges)")
    q.add_argument("--target", choices=["cpu", "trt"], default="cpu",
                   help="cpu: uint8 activations (ORT kernels); trt: symmetric int8 (TensorRT)")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    q.add_argument("--sensitive", type=int, default=0,
                   help="scan every conv and keep the K whose quantization hurts the outputs most in float")
    q.add_argument("--scan-images", type=int, default=8)
    q.add_argument("--exclude", nargs="*", default=[], help="node names to keep in float")
    q.add_argument("--imgsz", type=int, default=None, help="input size (default: the ONNX input's, or the model's)")
    q.add_argument("--measure", action="store_true", help="measure FP32 and INT8 latency (ORT CPU, 2 threads)")
    q.add_argument("--engine", help="also build a TensorRT engine here (GPU; use --target trt)")
    q.add_argument("--qat-epochs", type=int, default=0,
                   help="quantization-aware finetuning for this many epochs on --data instead of PTQ "
                        "(MODEL must be a model, not an .onnx)")
    q.add_argument("--qat-lr-scale", type=float, default=0.1, help="QAT learning rate / the training lr0 (an "
                   "interrupted QAT run at --out resumes only with the same model, data, size, epochs and rate)")
    q.add_argument("--batch", type=int, default=16, help="QAT batch size")
    q.add_argument("--device", default="auto", help="QAT device")
    q.add_argument("--out", required=True, help="output .onnx")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_quantize)


def run_prune(args: argparse.Namespace) -> None:
    import torch

    from compress.prune import prune_detector
    from search_spaces import load_model, save_model
    from search_spaces.io import atomic_write_json

    det = load_model(args.model)
    imgsz = args.imgsz or det.arch.imgsz
    predict = None
    if args.latency_ms is not None:
        if not args.table:
            raise ConfigError("--latency-ms needs --table (a latency table for the target device)", field="table")
        from latency_tables.table import table_predictor

        # widths the table lacks are measured once and kept in it
        predict, _ = table_predictor(args.table, imgsz, measure_missing=True, check_device=True)
    if (args.finetune_epochs or args.sensitivity or args.importance == "taylor") and not args.data:
        raise DataError("finetuning, Taylor importance and the sensitivity scan need real data: give --data",
                        field="data")
    loss_fn = None
    if args.importance == "taylor":
        from compress.prune import batch_loss

        loss_fn = batch_loss(args.data, imgsz, batch=min(args.batch, 16))
    sample = None
    if args.sensitivity:
        from compress.quantize import calibration_images

        images = calibration_images(args.data, 4 * det.max_stride, n=8)  # small: a relative measure
        sample = torch.cat([torch.from_numpy(images[i]) for i in range(len(images))])
    pruned, report = prune_detector(
        det, args.macs, latency_ms=args.latency_ms, predict_ms=predict, steps=args.steps,
        finetune=_finetuner(args, imgsz) if args.finetune_epochs else None, finetune_epochs=args.finetune_epochs,
        importance=args.importance, loss_fn=loss_fn, backend=args.backend, nni_pruner=args.nni_pruner,
        round_to=args.round_to,
        max_ratio=args.max_ratio, stage_sensitivity=args.sensitivity, sample=sample, imgsz=imgsz)
    out = save_model(pruned, args.out)
    result = {"out": str(out), **report.to_dict()}
    atomic_write_json(out / "prune_report.json", result)
    emit(result, args.json, report.summary() + "\n" + "\n".join(report.changes) + f"\nwrote {out}")


def _finetuner(args: argparse.Namespace, imgsz: int):
    """finetune(det, epochs) with the Trainer on --data, one output folder per pruning step."""
    import dataclasses

    from trainer.config import TrainConfig
    from trainer.trainer import Trainer

    # validated now, before any pruning: a bad --nbs or --lr0 is one line, not an error after the work
    template = TrainConfig(model=str(args.model), data=args.data, out=args.out, epochs=args.finetune_epochs,
                           imgsz=imgsz, batch=args.batch, **optimizer_settings(args),
                           device=args.device, exist_ok=True,  # each pruning step's finetune starts afresh
                           autoanchor=False)  # a trained model's anchors stay
    rounds = [0]

    def finetune(det: Any, epochs: int) -> Any:
        rounds[0] += 1
        cfg = dataclasses.replace(template, out=str(Path(args.out) / f"finetune{rounds[0]}"), epochs=epochs)
        trainer = Trainer(cfg, model=det)
        trainer.train()
        return trainer.eval_model

    return finetune


def run_quantize(args: argparse.Namespace) -> None:
    from compress.export import export_detector, verified_file
    from compress.quantize import (
        build_trt_int8_engine,
        calibration_images,
        quantize_onnx,
        verify_trt_int8_engine,
    )
    from latency_tables.onnx_utils import input_specs
    from search_spaces import load_model
    from search_spaces.io import atomic_write_json

    if not args.data:
        raise DataError("quantization needs real calibration images: --data IMAGE_DIR|data.yaml (random "
                        "images would calibrate the wrong ranges)", field="data")
    out = Path(args.out)
    src = Path(args.model)
    if args.qat_epochs:
        return _run_qat(args, out)
    if args.engine:  # known from the arguments: refused before the calibration, not after it
        from latency_tables.backends.tensorrt import import_tensorrt

        if args.target != "trt":
            raise ConfigError("--engine builds a TensorRT engine, which takes symmetric int8 only: add --target trt",
                              field="engine")
        import_tensorrt()
    if src.suffix == ".onnx":
        fp32 = src
        dims = input_specs(fp32)[0][1]
        imgsz = args.imgsz or (dims[-1] if isinstance(dims[-1], int) and dims[-1] > 0 else None)
        if imgsz is None:
            raise ConfigError("the ONNX input has a dynamic size: give --imgsz", field="imgsz")
    else:
        det = load_model(args.model)
        imgsz = args.imgsz or det.arch.imgsz
        fp32 = out.with_name(out.name.removesuffix(".onnx").removesuffix(".int8") + ".fp32.onnx")
        export_detector(det, fp32, imgsz, fuse=True)
    calib = calibration_images(args.data, imgsz, n=args.calib)
    report = quantize_onnx(fp32, out, calib, method=args.method, per_channel=not args.per_tensor, target=args.target,
                           exclude=args.exclude, sensitivity_scan=args.sensitive, scan_images=args.scan_images,
                           measure_latency=args.measure)
    result = report.to_dict()
    if args.engine:
        with verified_file(args.engine) as tmp:
            build_trt_int8_engine(out, tmp)
            diff = verify_trt_int8_engine(out, tmp, [calib[i] for i in range(min(4, len(calib)))])
        result["engine"], result["engine_max_abs_diff"] = args.engine, diff
    atomic_write_json(out.with_suffix(".json"), result)
    brief = {k: result[k] for k in ("path", "fp32_path", "method", "target", "calib_images", "excluded_sensitive",
                                    "latency_ms_fp32", "latency_ms_int8")}
    emit(result, args.json, format_mapping({**brief, **{f"error.{k}": v for k, v in report.error.items()}}))


def _run_qat(args: argparse.Namespace, out: Path) -> None:
    """`detforge quantize MODEL --qat-epochs N`: fake-quant finetune, then QDQ ONNX export."""
    from compress.qat import export_qat, qat_finetune
    from compress.quantize import qdq_counts
    from latency_tables.onnx_utils import load_onnx_model
    from search_spaces import load_model
    from search_spaces.io import atomic_write_json
    from trainer.config import TrainConfig

    if Path(args.model).suffix == ".onnx":
        raise ConfigError("QAT trains the model: give a model directory or zoo name, not an .onnx",
                          path=args.model, field="qat_epochs")
    # what post-training quantization takes and QAT does not do (its export is ORT CPU's uint8 QDQ)
    unsupported = {"target": args.target != "cpu", "engine": bool(args.engine), "per_tensor": args.per_tensor,
                   "sensitive": bool(args.sensitive)}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise ConfigError(f"{flags} apply to post-training quantization; --qat-epochs exports per-channel QDQ "
                          "for ONNX Runtime on the CPU (leave --qat-epochs out to use them)", field=bad[0])
    det = load_model(args.model)
    imgsz = args.imgsz or det.arch.imgsz
    run_dir = out.with_name(out.name.removesuffix(".onnx") + "_qat")
    cfg = TrainConfig(model=str(args.model), data=args.data, out=str(run_dir), epochs=args.qat_epochs, imgsz=imgsz,
                      batch=args.batch, device=args.device, resume=(run_dir / "last.pt").is_file(), autoanchor=False)
    qat, report = qat_finetune(det, cfg, lr_scale=args.qat_lr_scale, exclude=args.exclude)
    export_qat(qat.cpu(), out, imgsz)
    result = {"path": str(out), "method": "qat", "run": str(run_dir), **report.to_dict(),
              "qdq": qdq_counts(load_onnx_model(out))}
    result["map"] = report.rows[-1].get("map") if report.rows else None
    if args.measure:
        from compress.report import measure_latency_ms

        result["latency_ms_int8"] = measure_latency_ms([out], imgsz)[0]
    atomic_write_json(out.with_suffix(".json"), result)
    emit(result, args.json, format_mapping({k: result[k] for k in ("path", "run", "epochs", "convs",
                                                                   "float_outputs", "map")}))
