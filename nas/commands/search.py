"""`detforge supernet train`, `detforge search`, `detforge pareto`: the architecture search commands."""
from __future__ import annotations

import argparse

from nas.commands import add_optimizer_args, command_group, optimizer_settings
from nas.output import emit, format_table


def register(sub: argparse._SubParsersAction) -> None:
    _, ss = command_group(sub, "supernet", help="the weight-sharing supernet of a search space", metavar="COMMAND")
    t = ss.add_parser("train", help="train a supernet with the sandwich rule and in-place distillation")
    t.add_argument("--space", default="default", help="search space: name or YAML path")
    t.add_argument("--data", default=None, help="data.yaml or dataset dir (default: the built-in synthetic set)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--imgsz", type=int, default=None, help="default: the space's largest imgsz choice")
    t.add_argument("--batch", type=int, default=16, help="total batch size over all processes")
    t.add_argument("--out", default="runs/supernet", help="writes last.pt (resume) and supernet.pt")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--exist-ok", action="store_true", help="train over an earlier run in OUT (default: refuse)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--n-random", type=int, default=2, help="random subnets per batch besides largest and smallest")
    t.add_argument("--kd-weight", type=float, default=1.0, help="in-place distillation weight (0: off)")
    t.add_argument("--per-head", action="store_true",
                   help="draw each batch's sandwich inside one head configuration (type x layout), drawn uniformly, "
                        "so every head is trained equally (default: one sandwich over all of them)")
    t.add_argument("--sort-channels", action="store_true",
                   help="before every epoch but the first, reorder each conv block's filters by importance (BN "
                        "|gamma|), so narrow subnets run the strongest channels (OFA)")
    t.add_argument("--attentive", type=int, default=1, metavar="K",
                   help="each random subnet is the one of K feasible draws predicted to spend the most of the budget "
                        "(AttentiveNAS best-up; needs --table and --budget-ms; default 1: a uniform draw)")
    t.add_argument("--per-family", action="store_true",
                   help="draw each batch's sandwich inside one family (every block type, transition, SPP and head "
                        "choice fixed), with that family's largest as the teacher (default: one sandwich for all)")
    t.add_argument("--teacher", default=None, metavar="MODEL",
                   help="a trained detector (model dir, or weights.pt beside arch.yaml) whose outputs teach every "
                        "sandwich member, the largest included (default: the largest teaches the others); or an "
                        "official checkpoint with --teacher-model")
    t.add_argument("--teacher-model", default=None, help="zoo name of an official --teacher checkpoint")
    add_optimizer_args(t, trains="the supernet's training")
    t.add_argument("--multi-scale", action="store_true",
                   help="train each batch at a random size in 0.5-1.5x --imgsz, a multiple of the space's largest "
                        "stride (YOLOv7's --multi-scale)")
    t.add_argument("--noautoanchor", action="store_true",
                   help="keep the space's anchors (default: each head layout's anchors are refit, as `detforge train` "
                        "does, when their best possible recall on the training boxes is below 0.98)")
    t.add_argument("--table", default=None, help="latency table of the target device: with --budget-ms, train only "
                                                 "the architectures predicted within the budget")
    t.add_argument("--budget-ms", type=float, default=None, help="the search's latency budget (needs --table)")
    t.add_argument("--hyp", default="auto", help="p5 | p6 | tiny | a hyp YAML (auto: from the space)")
    t.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-ema", action="store_true")
    t.add_argument("--max-time", type=float, default=None, help="wall-clock budget in seconds")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=run_supernet_train)

    p = sub.add_parser("search", help="Optuna architecture search; run the same command in N processes to share "
                                      "the study")
    p.add_argument("--space", default=None, help="search space (default: the supernet's; required with --mode scratch)")
    p.add_argument("--supernet", default=None, help="supernet.pt from `detforge supernet train`")
    p.add_argument("--table", default=None, help="latency table JSON of the target device")
    p.add_argument("--data", default=None, help="data.yaml (default: the built-in synthetic set)")
    p.add_argument("--budget-ms", type=float, default=None, help="hard latency budget (a constraint)")
    p.add_argument("--trials", type=int, default=40, help="COMPLETE trials of the whole study, over all workers")
    p.add_argument("--storage", default=None, help="sqlite:///study.db, postgresql://..., or a journal file "
                                                   "(*.log, *.journal); default sqlite:///OUT/study.db")
    p.add_argument("--study", default="detforge", help="study name")
    p.add_argument("--sampler", default="auto", choices=["auto", "nsga2", "tpe", "random", "gp"],
                   help="auto: nsga2 (tpe in scratch mode)")
    p.add_argument("--mode", default="supernet", choices=["supernet", "scratch"],
                   help="supernet: inherited weights; scratch: brief training with pruning")
    p.add_argument("--out", default="runs/search")
    p.add_argument("--objectives", default=None, help="comma list of map,latency,params,gflops (default map,latency)")
    p.add_argument("--imgsz", type=int, default=None, help="default: the table's input size")
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--val-batches", type=int, default=None, help="validation batches per trial (default: all)")
    p.add_argument("--scratch-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="supernet mode: train each inherited subnet this many epochs before validating (default 0)")
    add_optimizer_args(p, trains="the trials' trainings (scratch, finetune)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--population", type=int, default=None, help="NSGA-II population size")
    p.add_argument("--eval-infeasible", action="store_true", help="also evaluate over-budget candidates")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--enqueue", action="append", default=None, metavar="NAME",
                   help="evaluate this architecture first (repeatable): 'supernet' (its trained largest; the "
                        "default when recorded) or a zoo point of the space, e.g. yolov7-tiny")
    q.add_argument("--no-enqueue", action="store_true", help="enqueue nothing (the sampler picks every trial)")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate an architecture the study already evaluated again (default: copy its values)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat", type=int, default=20, help="seconds between a worker's heartbeats")
    p.add_argument("--grace", type=int, default=60, help="seconds without heartbeat before a trial counts as dead")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_search)

    p = sub.add_parser("pareto", help="the Pareto front of a study; --export writes model dirs + ONNX")
    p.add_argument("--storage", required=True)
    p.add_argument("--study", default="detforge")
    p.add_argument("--export", default=None, metavar="DIR", help="write DIR/<arch_id>/ and DIR/front.json")
    p.add_argument("--supernet", default=None, help="default: the one the study was searched with")
    p.add_argument("--data", default=None, help="for BatchNorm recalibration (default: the study's)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the front plot here")
    p.add_argument("--backend", default="ort-cpu", help="latency backend of the export, or none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a short measurement protocol (plumbing checks)")
    p.add_argument("--bn-batches", type=int, default=None, help="default: the search's")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_pareto)


def run_supernet_train(args: argparse.Namespace) -> None:
    from compress.distill import load_teacher
    from nas.budget import FeasibleRegion, space_predictor, table_predictor
    from nas.supernet_train import SUPERNET_FILE, SupernetTrainer
    from search_spaces.errors import ConfigError
    from search_spaces.space import load_space
    from trainer import distributed
    from trainer.config import TrainConfig
    from trainer.trainer import resolve_data_config

    space = load_space(args.space)
    if (args.table is None) != (args.budget_ms is None):
        raise ConfigError("--table and --budget-ms go together", field="budget_ms" if args.table else "table")
    region = None
    imgsz = args.imgsz or max(space.decisions["imgsz"].choices)
    if args.table:  # the table's input size, then the dataset's classes (the synthetic set needs the size)
        distributed.setup(args.device)  # under torchrun rank 0 makes the synthetic set, the rest wait at a barrier
        predict, imgsz = table_predictor(args.table, args.imgsz)
        predict, pinned = space_predictor(predict, space, resolve_data_config(args.data, imgsz).nc, imgsz, args.table)
        region = FeasibleRegion(pinned, predict, args.budget_ms)
    if args.teacher_model and not args.teacher:
        raise ConfigError("names the model of a --teacher checkpoint: give --teacher too", field="teacher_model")
    teacher = load_teacher(args.teacher, args.teacher_model) if args.teacher else None
    cfg = TrainConfig(model=f"supernet:{space.name}", data=args.data, out=args.out, epochs=args.epochs, imgsz=imgsz,
                      batch=args.batch, resume=args.resume, exist_ok=args.exist_ok, device=args.device, hyp=args.hyp, amp=args.amp,
                      workers=args.workers, seed=args.seed, ema=not args.no_ema, max_time_s=args.max_time,
                      autoanchor=not args.noautoanchor, multi_scale=args.multi_scale, **optimizer_settings(args))
    try:
        result = SupernetTrainer(cfg, space=space, n_random=args.n_random, kd_weight=args.kd_weight,
                                 region=region, per_head=args.per_head,
                                 sort_channels=args.sort_channels, attentive=args.attentive,
                                 per_family=args.per_family, teacher=teacher).train()
    finally:
        distributed.cleanup()
    if distributed.is_main():
        emit({**result.summary(), "supernet": str(result.out / SUPERNET_FILE)}, args.json)


def _objectives(text: str | None) -> tuple[str, ...] | None:
    return tuple(o.strip() for o in text.split(",") if o.strip()) if text else None


def run_search(args: argparse.Namespace) -> None:
    from nas.pareto import FRONT_COLUMNS, front_table, pareto_front
    from nas.search import SearchConfig, default_storage, redact_url, summary
    from nas.search import run_search as search

    cfg = SearchConfig(space=args.space, supernet=args.supernet, table=args.table, data=args.data,
                       budget_ms=args.budget_ms, trials=args.trials, storage=args.storage, study=args.study,
                       out=args.out, sampler=args.sampler, seed=args.seed, mode=args.mode, bn_batches=args.bn_batches,
                       val_batches=args.val_batches, scratch_epochs=args.scratch_epochs,
                       finetune_epochs=args.finetune_epochs, **optimizer_settings(args),
                       objectives=_objectives(args.objectives), imgsz=args.imgsz, batch=args.batch,
                       device=args.device, workers=args.workers, pruner=args.pruner, population=args.population,
                       skip_infeasible=not args.eval_infeasible, heartbeat_s=args.heartbeat, grace_s=args.grace,
                       progress=not args.quiet, enqueue=() if args.no_enqueue else args.enqueue,
                       reuse_evaluations=not args.reevaluate)
    study = search(cfg)
    front = pareto_front(study)
    info = summary(study)
    info["storage"] = redact_url(cfg.storage or default_storage(cfg.out))  # printed: never a database password
    counts = ", ".join(f"{v} {k}" for k, v in info.items() if isinstance(v, int))
    text = f"study {study.study_name} ({info['storage']}): {counts}\n\nPareto front\n" + \
        format_table(front_table(front), FRONT_COLUMNS)
    emit({**info, "front": [e.to_dict() for e in front]}, args.json, text)


def run_pareto(args: argparse.Namespace) -> None:
    from nas.pareto import FRONT_COLUMNS, export_front, front_table, pareto_front, plot_front, settings
    from nas.search import load_study

    study = load_study(args.storage, args.study)
    front = pareto_front(study)
    out: dict = {"study": study.study_name, "budget_ms": settings(study).get("budget_ms")}
    if args.export:
        config = None
        if args.quick:
            from latency_tables.measurement import MeasurementConfig

            config = MeasurementConfig(warmup=3, warmup_s=0.0, min_runs=10, max_runs=50, max_time_s=2.0,
                                       target_rel_ci=0.05)
        front = export_front(study, args.supernet, args.export, front=front, data=args.data,
                             backend=None if args.backend == "none" else args.backend, threads=args.threads,
                             measure_config=config, bn_batches=args.bn_batches, device=args.device)
        out["export"] = args.export
    if args.plot:
        out["plot"] = str(plot_front(study, args.plot, front))
    out["front"] = [e.to_dict() for e in front]
    emit(out, args.json, format_table(front_table(front), FRONT_COLUMNS))
