"""`detforge distill`: train a student with output- and feature-level distillation from a teacher."""
from __future__ import annotations

import argparse

from nas.commands import add_optimizer_args, optimizer_settings
from nas.output import emit
from search_spaces.loading import load_for_classes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a student with knowledge distillation from a teacher")
    p.add_argument("--teacher", required=True,
                   help="a trained model dir (arch.yaml + weights.pt), or an official checkpoint with --teacher-model "
                        "(e.g. yolov7-e6.pt --teacher-model yolov7-e6)")
    p.add_argument("--teacher-model", default=None, help="zoo name of an official teacher checkpoint")
    p.add_argument("--teacher-scale", type=float, default=1.0, help="teacher input size / student input size")
    p.add_argument("--student", default="yolov7-tiny")
    p.add_argument("--data", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    add_optimizer_args(p, trains="the student's training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--w-feat", type=float, default=None,
                   help="channel-wise feature distillation weight (default 0: off, see docs/training.md)")
    p.add_argument("--w-obj", type=float, default=None, help="x the detection loss's objectness gain (default 1)")
    p.add_argument("--w-cls", type=float, default=None, help="x the detection loss's class gain (default 1)")
    p.add_argument("--w-box", type=float, default=None, help="x the detection loss's box gain (default 1)")
    p.add_argument("--random-teacher", action="store_true",
                   help="allow a --teacher without trained weights (a zoo name, a YAML): random weights, for plumbing "
                        "checks only (it teaches nothing)")
    p.add_argument("--noautoanchor", action="store_true", help="keep the student's anchors (see `detforge train`)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--exist-ok", action="store_true", help="train over an earlier run in OUT (default: refuse)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from compress.distill import DistillConfig, Distiller, load_teacher
    from trainer.config import TrainConfig
    from trainer.trainer import Trainer, resolve_data_config

    cfg = TrainConfig(model=args.student, data=args.data, out=args.out, epochs=args.epochs, imgsz=args.imgsz,
                      batch=args.batch, seed=args.seed, workers=args.workers, device=args.device,
                      resume=args.resume, exist_ok=args.exist_ok, autoanchor=not args.noautoanchor, **optimizer_settings(args))
    teacher = load_teacher(args.teacher, args.teacher_model, random_ok=args.random_teacher)
    # a student trained for other classes (a converted COCO checkpoint) starts from its transferred weights
    student, transfer = load_for_classes(args.student, resolve_data_config(args.data, args.imgsz).nc)
    weights = {k: getattr(args, k) for k in ("w_obj", "w_cls", "w_box", "w_feat") if getattr(args, k) is not None}
    kd = Distiller(teacher, student, DistillConfig(teacher_scale=args.teacher_scale, **weights))
    result = Trainer(cfg, model=student, callbacks=[kd], transfer=transfer).train()
    emit({**result.summary(), "level_pairs": kd.pairs, "transfer": None if transfer is None else transfer.to_dict()}, args.json)
