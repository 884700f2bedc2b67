"""`detforge train`, `detforge val`, `detforge predict`."""
from __future__ import annotations

import argparse
from pathlib import Path

from nas.commands import add_optimizer_args, optimizer_settings
from nas.output import emit, format_table
from search_spaces import load_model
from search_spaces.errors import ConfigError
from trainer.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector (DDP under torchrun)")
    p.add_argument("--model", default="yolov7-tiny", help="zoo name, arch .yaml, model dir or weights.pt")
    p.add_argument("--data", default=None, help="data.yaml or dataset dir (default: the built-in synthetic set)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16, help="total batch size over all processes")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--exist-ok", action="store_true", help="train over an earlier run in OUT (default: refuse)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--hyp", default="auto", help="p5 | p6 | tiny | path to a hyp YAML")
    add_optimizer_args(p)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--noautoanchor", action="store_true",
                   help="keep the model's anchors (by default they are refit when their best possible recall on the "
                        "training boxes is below 0.98, as YOLOv7 does)")
    p.add_argument("--multi-scale", action="store_true",
                   help="train each batch at a random size in 0.5-1.5x --imgsz, a multiple of the largest stride "
                        "(YOLOv7's --multi-scale)")
    p.add_argument("--single-cls", action="store_true",
                   help="train every class of the data as one, 'item' (YOLOv7's --single-cls): a 1-class model")
    p.add_argument("--freeze", type=int, default=0, metavar="N",
                   help="train with the first N layers frozen, numbered as YOLOv7 does (its --freeze; "
                        "--freeze 51 is yolov7's backbone, layers 0-50, and 29 yolov7-tiny's); for finetuning")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--strict", action="store_true", help="bad data is an error instead of a skipped sample")
    p.add_argument("--val-interval", type=int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--save-every", type=float, default=0.0, metavar="SECONDS",
                   help="write last.pt at most every SECONDS (default 0: after every epoch; the last always); "
                        "a kill loses at most that much training")
    p.add_argument("--max-time", type=float, default=None, help="wall-clock budget in seconds, over every --resume of the run")
    p.add_argument("--fit-schedule", action="store_true",
                   help="with --max-time: shorten the LR schedule (--epochs) to the epochs that fit the budget")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_train)

    p = sub.add_parser("val", help="COCO mAP of a model on a dataset's val split")
    p.add_argument("--weights", required=True,
                   help="model dir (arch.yaml + weights.pt), weights.pt beside one, or an exported .onnx")
    p.add_argument("--data", default=None)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.65)
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--single-cls", action="store_true", help="score every class of the data as one (a model "
                                                              "trained with --single-cls)")
    p.add_argument("--rect", action="store_true",
                   help="letterbox each batch to its own rectangle, images ordered by aspect ratio (YOLOv7's test.py "
                        "default): less padding than squares; not for an exported .onnx")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_val)

    p = sub.add_parser("predict", help="detect objects in images; writes drawn images and detections.json")
    p.add_argument("--weights", required=True)
    p.add_argument("--source", required=True, help="an image or a directory of images")
    p.add_argument("--out", required=True)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.45)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> None:
    from trainer import distributed
    from trainer.trainer import Trainer

    cfg = TrainConfig(model=args.model, data=args.data, out=args.out, epochs=args.epochs, imgsz=args.imgsz,
                      batch=args.batch, resume=args.resume, exist_ok=args.exist_ok, device=args.device, hyp=args.hyp,
                      **optimizer_settings(args), amp=args.amp, workers=args.workers,
                      seed=args.seed, ema=not args.no_ema, sync_bn=args.sync_bn, strict_data=args.strict,
                      autoanchor=not args.noautoanchor, freeze=args.freeze, multi_scale=args.multi_scale,
                      single_cls=args.single_cls,
                      max_time_s=args.max_time, fit_epochs_to_time=args.fit_schedule,
                      val_interval=args.val_interval, save_every_s=args.save_every)
    try:
        trainer = Trainer(cfg)
        result = trainer.train()
    finally:
        distributed.cleanup()
    if distributed.is_main():
        emit({**result.summary(), "frozen": len(trainer.frozen),
              "transfer": None if trainer.transfer is None else trainer.transfer.to_dict()}, args.json)


def run_val(args: argparse.Namespace) -> None:
    from trainer.datasets import val_loader
    from trainer.distributed import resolve_device
    from trainer.evaluate import evaluate
    from trainer.trainer import resolve_data_config

    if Path(args.weights).suffix == ".onnx":  # an exported file (FP32 or INT8 QDQ), run by ONNX Runtime
        from compress.onnx_eval import OnnxDetector

        if args.rect:
            raise ConfigError("an exported file is scored at one square input size: rectangular batches need the "
                              "model directory", path=args.weights, field="rect")

        model, device = OnnxDetector(args.weights), "cpu"
        if model.imgsz is not None and model.imgsz != args.imgsz:
            raise ConfigError(f"the ONNX input is {model.imgsz} px: pass --imgsz {model.imgsz}",
                              path=args.weights, field="imgsz")
    else:
        model = load_model(args.weights)
        model.check_imgsz(args.imgsz)
        device = resolve_device(args.device)
        model = model.to(device)
    cfg = resolve_data_config(args.data, args.imgsz)
    if args.single_cls:
        cfg = cfg.single_class()
    stride = model.max_stride if args.rect else None
    loader = val_loader(cfg, args.imgsz, args.batch, strict=args.strict, rect_stride=stride)
    if model.nc is not None and model.nc != cfg.nc:
        hint = " (a model trained with --single-cls: pass --single-cls)" if model.nc == 1 else ""
        raise ConfigError(f"the model has {model.nc} classes, the dataset {cfg.nc}{hint}", path=args.weights,
                          field="nc")
    res = evaluate(model, loader, cfg.nc, cfg.names, args.conf, args.iou, device)
    d = res.to_dict()
    rows = [{"class": n, "ap": a, "ap50": a50} for n, a, a50 in zip(cfg.names, d["per_class"], d["per_class_ap50"])]
    text = (f"map      {d['map']:.4f}\nmap50    {d['map50']:.4f}\nimages   {d['images']}  ({d['images_per_s']} img/s)\n\n"
            + format_table(rows))
    emit({k: d[k] for k in ("map", "map50", "map75", "per_class", "per_class_ap50", "names", "images",
                            "images_per_s")}, args.json, text)


def run_predict(args: argparse.Namespace) -> None:
    from trainer.predict import predict

    model = load_model(args.weights)
    res = predict(model, args.source, args.out, args.imgsz, args.conf, args.iou)
    emit({"out": args.out, "images": len(res), "detections": sum(len(v) for v in res.values())}, args.json)
