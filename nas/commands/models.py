"""`detforge models`, `detforge info`, `detforge convert`, `detforge export`: the model zoo and model files."""
from __future__ import annotations

import argparse

from nas.output import emit, format_table
from search_spaces import list_models, load_model, resolve_arch, save_model
from search_spaces.convert import load_official_into, read_official_checkpoint
from search_spaces.errors import ConfigError
from search_spaces.model import Detector
from search_spaces.stats import model_stats


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_models)

    p = sub.add_parser("info", help="params, fused params, MACs and GFLOPs of a model")
    p.add_argument("model", help="zoo name, architecture .yaml or model directory")
    p.add_argument("--form", choices=["training", "deploy"], default=None)
    p.add_argument("--imgsz", type=int, default=None, help="input size (default: 640 for P5, 1280 for P6)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_info)

    p = sub.add_parser("convert", help="official YOLOv7 checkpoint -> arch.yaml + weights.pt")
    p.add_argument("checkpoint", help="official .pt (pickled model) or a plain state dict")
    p.add_argument("--model", required=True, help="zoo name of the checkpoint's architecture")
    p.add_argument("--form", choices=["training", "deploy"], default="training")
    p.add_argument("--nc", type=int, default=None, help="number of classes (default: the zoo's 80)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("export", help="export a model to ONNX, verified against PyTorch")
    p.add_argument("model", help="zoo name, architecture .yaml or model directory")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--fuse", action="store_true", help="fold Conv+BN / RepConv / implicit layers first")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--nms", action="store_true",
                   help="end-to-end: NMS inside the graph (ONNX NonMaxSuppression); output [K, 7] = image, "
                        "x1, y1, x2, y2, score, class")
    p.add_argument("--nms-iou", type=float, default=0.45)
    p.add_argument("--nms-conf", type=float, default=0.25)
    p.add_argument("--max-det", type=int, default=100, help="boxes kept per class and image (per image with trt)")
    p.add_argument("--nms-op", choices=["onnx", "trt"], default="onnx",
                   help="onnx: NonMaxSuppression (any runtime); trt (implies --nms): TensorRT's EfficientNMS_TRT "
                        "plugin, outputs num_dets, det_boxes, det_scores, det_classes (TensorRT only)")
    p.add_argument("--engine", default=None, help="also build a TensorRT engine here and verify it (GPU)")
    p.add_argument("--engine-precision", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--max-batch", type=int, default=1, help="the engine accepts batches 1..N (tuned for N)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_export)


def run_models(args: argparse.Namespace) -> None:
    rows = []
    for name in list_models():
        arch, _ = resolve_arch(name)
        rows.append({"name": name, "levels": len(arch.head.inputs), "imgsz": arch.imgsz, "head": arch.head.type,
                     "description": arch.description})
    emit({"models": rows}, args.json, format_table(rows))


def run_info(args: argparse.Namespace) -> None:
    det = load_model(args.model, form=args.form)
    stats = model_stats(det, args.imgsz).to_dict()
    emit(stats, args.json)


def run_convert(args: argparse.Namespace) -> None:
    arch, _ = resolve_arch(args.model, form=args.form)  # a wrong name fails before a large file is read
    sd = read_official_checkpoint(args.checkpoint)
    if args.nc is not None:
        arch = arch.with_nc(args.nc)
    det = load_official_into(Detector(arch), sd, source=args.checkpoint)
    out = save_model(det, args.out)
    emit({"out": str(out), "model": arch.name, "form": det.form, "tensors": len(sd)}, args.json)


def run_export(args: argparse.Namespace) -> None:
    from compress.export import (
        ENGINE_NEEDS_FIXED_OUTPUTS,
        build_trt_engine,
        export_detector,
        verified_file,
        verify_engine,
    )
    from compress.graph_nms import NmsSpec

    det = load_model(args.model)
    nms = NmsSpec(iou=args.nms_iou, conf=args.nms_conf, max_det=args.max_det, op=args.nms_op) \
        if args.nms or args.nms_op == "trt" else None
    if args.engine:  # refused before the ONNX file is written, not after
        from latency_tables.backends.tensorrt import import_tensorrt

        if nms is not None and nms.op != "trt":
            raise ConfigError(ENGINE_NEEDS_FIXED_OUTPUTS, field="engine")
        import_tensorrt()
    report = export_detector(det, args.out, args.imgsz, fuse=args.fuse, opset=args.opset, nms=nms)
    if args.engine:
        with verified_file(args.engine) as tmp:
            build_trt_engine(args.out, tmp, precision=args.engine_precision, max_batch=args.max_batch)
            diff, agree = verify_engine(det, tmp, report.imgsz, nms=nms, batch=args.max_batch,
                                        precision=args.engine_precision)
        report.engine, report.engine_precision = args.engine, args.engine_precision
        report.engine_max_abs_diff, report.engine_agreement = diff, agree
    emit(report.to_dict(), args.json)


