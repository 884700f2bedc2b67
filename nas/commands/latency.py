"""`detforge latency`: build, measure, predict, validate, pack and import latency tables."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latency_tables.table import FIT_MODELS, SAVE_EVERY_S
from nas.commands import command_group
from nas.output import emit
from search_spaces.errors import ConfigError

# A short protocol for smoke tests and quick looks; numbers taken with it are rough.
QUICK = {"warmup": 2, "warmup_s": 0.0, "min_runs": 5, "max_runs": 30, "max_time_s": 5.0,
         "target_rel_ci": 0.05}
BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda", "tensorrt")


def load_space(ref: str) -> Any:
    """A search space by name ('default', 'tiny') or YAML path."""
    from search_spaces.space import load_space as load

    return load(ref)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `latency build|measure|predict|validate|pack|import` to the `detforge` parser."""
    _, sub = command_group(subparsers, "latency", "latency tables: build on a device, predict, validate, probes")

    b = sub.add_parser("build", help="measure every block of a search space on a backend into a table")
    b.add_argument("--space", required=True, help="search space name ('default', 'tiny') or YAML")
    _backend_args(b)
    b.add_argument("--imgsz", type=int, required=True, help="input size the table is measured at")
    b.add_argument("--out", required=True, help="table JSON (resumed if it exists)")
    b.add_argument("--fit-models", type=int, default=FIT_MODELS,
                   help=f"whole models the overhead is fitted on (default {FIT_MODELS})")
    b.add_argument("--no-resume", action="store_true", help="start over instead of resuming --out")
    b.add_argument("--save-every", type=float, default=SAVE_EVERY_S,
                   help=f"seconds between saves of the finished entries, checked after each group of blocks "
                        f"(default {SAVE_EVERY_S:g}; a kill loses at most this much measuring and the group it "
                        "was in)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=run_build)

    m = sub.add_parser("measure", help="measure one model end to end (decoded output)")
    m.add_argument("model", help="zoo name, architecture .yaml, model directory or .onnx file")
    _backend_args(m)
    m.add_argument("--imgsz", type=int, default=None, help="input size (default: the architecture's)")
    m.set_defaults(func=run_measure)

    r = sub.add_parser("predict", help="predict a model's latency from a table")
    r.add_argument("arch", help="architecture .yaml, zoo name or model directory")
    r.add_argument("--table", required=True, help="latency table JSON")
    r.add_argument("--measure-missing", action="store_true",
                   help="measure blocks the table lacks on this machine instead of failing")
    r.add_argument("--blocks", action="store_true", help="include the per-block terms in --json output")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=run_predict)

    v = sub.add_parser("validate", help="measure random architectures end to end against the predictions")
    v.add_argument("--table", required=True, help="latency table JSON")
    v.add_argument("--space", required=True, help="search space name or YAML")
    v.add_argument("--n", type=int, default=50, help="random architectures (default 50)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--plot", default=None, help="scatter plot PNG of predicted vs measured")
    v.add_argument("--report", default=None, help="JSON report with every architecture's numbers")
    v.add_argument("--quick", action="store_true", help="a short measurement protocol (rough numbers)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _realtime_arg(v)
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_validate)

    k = sub.add_parser("pack", help="write a probe bundle (ONNX micro-models + runner.py) for a device")
    k.add_argument("--space", required=True, help="search space name or YAML")
    k.add_argument("--out", default="bundle.tar.gz", help="bundle path (default bundle.tar.gz)")
    k.add_argument("--imgsz", type=int, default=640)
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    k.add_argument("--fit-models", type=int, default=FIT_MODELS,
                   help=f"whole models for the overhead fit (default {FIT_MODELS})")
    k.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=run_pack)

    i = sub.add_parser("import", help="turn a probe runner's results.json into a latency table")
    i.add_argument("results", help="results.json written by the bundle's runner.py")
    i.add_argument("--out", required=True, help="table JSON to write")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_import)


def _backend_args(p: argparse.ArgumentParser) -> None:
    """Backend, threads, precision, batch and protocol options shared by build and measure."""
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16 (torch) or int8 (quantized ONNX)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-fuse", action="store_true", help="measure without folding Conv+BN/RepConv/implicit")
    p.add_argument("--quick", action="store_true", help="a short measurement protocol (rough numbers)")
    p.add_argument("--repeats", type=int, default=None, help="independent repeats per measurement")
    p.add_argument("--max-other-load", type=float, default=None,
                   help="re-measure a repeat if other processes used more of the CPU than this (0..1)")
    _realtime_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _realtime_arg(p: argparse.ArgumentParser) -> None:
    """--realtime: time at real-time priority on a busy shared machine."""
    p.add_argument("--realtime", action="store_true",
                   help="time runs at real-time priority (SCHED_FIFO; needs root or CAP_SYS_NICE), so other "
                        "processes on a shared machine do not slow them down")


def _config(args: argparse.Namespace, base: Any = None) -> Any:
    """The MeasurementConfig the options ask for, on top of `base` (default: the standard protocol)."""
    from latency_tables.measurement import MeasurementConfig

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if getattr(args, "repeats", None) is not None:
        overrides["repeats"] = args.repeats
    if getattr(args, "max_other_load", None) is not None:
        overrides["max_other_load"] = args.max_other_load
    return (base or MeasurementConfig()).with_overrides(**overrides)


def _backend(args: argparse.Namespace, base: Any = None) -> Any:
    """The backend the options ask for."""
    from latency_tables.table import make_backend

    return make_backend(args.backend, threads=args.threads, precision=args.precision,
                        config=_config(args, base))


def _fmt(d: dict[str, Any], keys: list[str]) -> str:
    """`key  value` lines for the keys people look at first."""
    from nas.output import format_mapping

    return format_mapping({k: d[k] for k in keys if k in d})


def run_build(args: argparse.Namespace) -> int:
    """`detforge latency build`."""
    from latency_tables.table import BUILD_PROTOCOL, LatencyTable

    table = LatencyTable.build(load_space(args.space), _backend(args, BUILD_PROTOCOL), args.imgsz, args.out,
                               batch=args.batch,
                               progress=not args.no_progress,
                               resume=not args.no_resume, fit_models=args.fit_models, fuse=not args.no_fuse,
                               realtime=args.realtime, save_every_s=args.save_every)
    s = table.summary()
    emit(s, args.json)
    return 0


def run_measure(args: argparse.Namespace) -> int:
    """`detforge latency measure`."""
    from latency_tables.table import decoded_model, measure_group

    be = _backend(args)
    src = Path(args.model)
    if src.suffix == ".onnx":
        model, shape, name = src, None if args.imgsz is None else [(3, args.imgsz, args.imgsz)], src.name
    else:
        from search_spaces import load_model

        det = load_model(args.model)
        imgsz = det.check_imgsz(args.imgsz or det.arch.imgsz)
        model, name = decoded_model(det, not args.no_fuse), det.arch.name
        shape = [(det.arch.in_channels, imgsz, imgsz)]
    m = measure_group({name: (model, shape)}, be, batch=args.batch, realtime=args.realtime)[name]
    d = {"model": name, **m.to_dict()}
    emit(d, args.json, f"{name}: {m.summary()}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """`detforge latency predict`."""
    from latency_tables.table import LatencyTable, resolve_architecture

    table = LatencyTable.load(args.table)
    arch = resolve_architecture(args.arch)
    p = table.breakdown(arch, measure_missing=args.measure_missing)
    d = {"arch": arch.name, "predicted_ms": p.predicted_ms, "sum_ms": p.sum_ms, "a_ms": p.a_ms, "b": p.b,
         "c_ms": p.c_ms, "blocks": len(p.blocks), "imgsz": table.imgsz, "backend": table.backend,
         "device": table.fingerprint.slug()}
    if args.blocks:
        d["block_ms"] = [{"key": k, "ms": ms} for k, ms in p.blocks]
    emit(d, args.json, _fmt(d, ["arch", "predicted_ms", "sum_ms", "blocks", "backend", "imgsz", "device"]))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """`detforge latency validate`."""
    from latency_tables.table import LatencyTable
    from latency_tables.validate import validate

    table = LatencyTable.load(args.table)
    be = table.backend_instance(config=_config(args))
    rep = validate(table, load_space(args.space), n=args.n, seed=args.seed, backend=be, plot=args.plot,
                   report=args.report, progress=not args.no_progress, realtime=args.realtime)
    d = rep.figures()
    emit(d, args.json, _fmt(d, ["n", "mape", "kendall_tau", "spearman", "within_5", "within_10", "bias",
                                "max_error", "plot", "report"]))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """`detforge latency pack`."""
    from latency_tables.probe import bundle_manifest, pack

    out = pack(load_space(args.space), args.out, args.imgsz, args.batch, precision=args.precision,
               fit_models=args.fit_models, progress=not args.no_progress)
    man = bundle_manifest(out)
    d = {"out": str(out), "bytes": out.stat().st_size, "blocks": len(man["blocks"]),
         "models": len(man["models"]), "imgsz": man["imgsz"], "batch": man["batch"],
         "precision": man["precision"], "bundle_id": man["bundle_id"],
         "run": "tar xzf BUNDLE && python detforge-probe/runner.py --threads 2 --out results.json"}
    emit(d, args.json)
    return 0


def run_import(args: argparse.Namespace) -> int:
    """`detforge latency import`."""
    from latency_tables.probe import import_results

    if not Path(args.results).is_file():
        raise ConfigError("file not found", path=args.results)
    table = import_results(args.results, args.out)
    summary = table.summary()
    if table.info.get("incomplete"):
        summary["incomplete"] = table.info["incomplete"]  # saying which gaps a rerun fills
    emit(summary, args.json)
    return 0
