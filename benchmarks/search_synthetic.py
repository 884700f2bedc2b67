"""The NAS loop end to end on the synthetic set: supernet, search, front, rank fidelity, vs yolov7-tiny.

Stages (each resumes after a kill: the supernet from its last.pt, the study from its SQLite file, every
stand-alone training from its own last.pt):

1. data: the synthetic set (or --data); latency table: --table, else built for the space with ORT on this CPU,
   starting from this machine's shipped table for the space when there is one (--no-shipped-table: not)
2. supernet training (sandwich rule + in-place distillation) for --supernet-epochs, on the architectures within
   the budget (--supernet-scope budget, the default) or on the whole space (--supernet-scope space)
3. search: --trials trials of NSGA-II under a budget (default: yolov7-tiny's latency); wall time, trials/min
4. the Pareto front, exported (model dirs + ONNX, measured latency)
5. rank fidelity: Kendall tau between inherited-weight mAP and stand-alone mAP over --fidelity-archs
   architectures of the study (the front first, then other feasible ones), each trained from scratch for
   --standalone-epochs (default: yolov7-tiny's epochs of stage 6, so the comparison's front model trained
   from scratch is one of these runs), optionally capped at --max-train-s each
6. two front models within yolov7-tiny's latency, the fastest (the issue's) and the best by inherited mAP,
   each finetuned for --finetune-epochs from its inherited weights, against yolov7-tiny trained from scratch
   for the same total epochs (supernet + finetune), all measured interleaved with ORT; and each front model
   trained from scratch for those epochs too (--no-scratch: not), so both sides of that comparison have
   exactly yolov7-tiny's training

The full run (default space at 320, 30 supernet epochs on 2,000 images, 40 trials) needs about 12 hours of
supernet training alone on a 2-core CPU (1.4 img/s measured; docs/benchmarks.md "Search" has a cut-down run).
Each stage writes OUT/bench.json with the figures so far; --stop-after STAGE ends the run there (a rerun
without it resumes). A rerun reads back every stage an earlier run finished with the same settings, its
figures and wall time included, and runs the rest (`StageRunner`). A plumbing run on the tiny space (minutes on a CPU):

    python benchmarks/search_synthetic.py --space tiny --imgsz 64 --train-images 64 --val-images 32 \\
        --supernet-epochs 2 --trials 6 --fidelity-archs 6 --standalone-epochs 1 --finetune-epochs 1 \\
        --latency-protocol quick --out runs/bench/search_tiny
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from optuna.trial import TrialState

from latency_tables import LatencyTable, get_backend
from latency_tables.measurement import MeasurementConfig
from latency_tables.table import BUILD_PROTOCOL, TABLES_DIR, table_name
from nas.budget import FeasibleRegion
from nas.pareto import FrontEntry, export_front, feasible, scored_trials
from nas.search import SearchConfig, default_storage, load_study, run_search
from nas.supernet_train import SUPERNET_FILE, SupernetTrainer
from search_spaces import Detector, load_model
from search_spaces.architecture import Architecture
from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_write_json
from search_spaces.space import SearchSpace, load_space
from trainer.config import OPTIMIZERS, TrainConfig
from trainer.synthetic import generate
from trainer.trainer import Trainer, TrainResult

COMPARE_PASSES = 7  # rotating latency passes of the stage-6 comparison
STUDY = "bench"  # the study's name in OUT/study.db
QUICK = {"warmup": 3, "warmup_s": 0.05, "min_runs": 10, "max_runs": 100, "max_time_s": 1.0, "target_rel_ci": 0.05}


def _protocol(name: str) -> MeasurementConfig:
    return MeasurementConfig(**QUICK) if name == "quick" else MeasurementConfig()


def _train(model: Detector, data: str, out: Path, epochs: int, args: argparse.Namespace,
           max_s: float | None = None) -> tuple[float, int]:
    """Train (resuming) and return the final mAP@[.5:.95] and the epochs trained.

    With `max_s` the cosine schedule is fitted to the epochs that fit in it (--fit-schedule), so a
    time-capped run still ends at a low learning rate.
    """
    cfg = TrainConfig(model=model.arch.name, data=data, out=str(out), epochs=epochs, imgsz=args.imgsz,
                      batch=args.batch, nbs=args.nbs, device=args.device, workers=args.workers, seed=args.seed,
                      **run_optimizer(args), progress=False, resume=(out / "last.pt").is_file(), max_time_s=max_s,
                      fit_epochs_to_time=max_s is not None,
                      autoanchor=False)  # every model with the anchors it is searched, extracted and ranked with
    result = Trainer(cfg, model=model).train()
    m = result.final("map")
    return (float("nan") if m is None else m), result.epochs_done


# added in session 26: a run's args from before lack them (and trained with TrainConfig's defaults)
OPTIMIZER_DEFAULTS = {k: getattr(TrainConfig, k) for k in ("optimizer", "lr0")}


def run_optimizer(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer of every training of the run (a run recorded before these options trained with SGD)."""
    return {k: getattr(args, k, default) for k, default in OPTIMIZER_DEFAULTS.items()}


def _scratch_dir(out: Path, arch_id: str, epochs: int, max_s: float | None) -> Path:
    """Where an architecture's from-scratch training of this budget lives: one run per (arch, epochs, cap),
    shared by the rank fidelity and the comparison stages (same seed and settings, same run)."""
    cap = f"-{max_s:g}s" if max_s else ""
    return out / "scratch" / f"{arch_id}-{epochs}e{cap}"


def _baseline_dir(out: Path, epochs: int) -> Path:
    """yolov7-tiny's from-scratch training of the comparison, one run per epoch budget (a rerun with another
    budget must not extend or reuse it)."""
    return out / f"yolov7-tiny-{epochs}e"


def _finetune_dir(out: Path, arch_id: str, epochs: int) -> Path:
    """A front model's finetune from its inherited weights, one run per epoch budget."""
    return out / "finetune" / f"{arch_id}-{epochs}e"


def _maps(run: Path) -> list[float]:
    """A run's validation mAPs, epoch by epoch (results.csv; none without it)."""
    import csv

    if not (run / "results.csv").is_file():
        return []
    with open(run / "results.csv", newline="") as f:
        return [float(r["map"]) for r in csv.DictReader(f) if r.get("map") not in (None, "")]


def _last_maps_mean(run: Path, k: int = 3) -> float:
    """The mean mAP of a run's last `k` validations (results.csv): a short run's last epoch alone is noisy."""
    maps = _maps(run)[-k:]
    return sum(maps) / len(maps) if maps else float("nan")


def _run_arch_yaml(run: Path, arch_id: str) -> str | None:
    """An architecture of a run by id, as YAML: its front export, else the run's report, else the trial of
    the run's study that evaluated it (None: none has it)."""
    exported = run / "pareto" / arch_id / "arch.yaml"
    if exported.is_file():
        return exported.read_text()
    report = run / "bench.json"
    if report.is_file():
        bench = json.loads(report.read_text())
        for entry in [*bench.get("front", []), *bench.get("rank_fidelity", {}).get("archs", [])]:
            if entry.get("arch_id") == arch_id and entry.get("arch"):
                return entry["arch"]
    return _studied_archs(run).get(arch_id) if (run / "study.db").is_file() else None


@functools.cache
def _study(run: Path) -> Any:
    """The run's Optuna study (loaded once per run), opened as `detforge search` opens it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_study(default_storage(run), STUDY)


@functools.cache
def _studied_archs(run: Path) -> dict[str, str]:
    """{arch_id: YAML} of every trial of the run's study that sampled an architecture."""
    return {t.user_attrs["arch_id"]: t.user_attrs["arch"] for t in _study(run).trials if "arch" in t.user_attrs}


def _search_settings(run: Path) -> dict[str, Any]:
    """The settings the run's study was searched with (`detforge search` records them in the study)."""
    from nas.search import STUDY_ATTR

    return dict(_study(run).user_attrs.get(STUDY_ATTR, {}))


def trial_scoring_data(run: Path, args: argparse.Namespace, data: Any, bn_batches: int | None,
                       device: torch.device) -> tuple[int, list[torch.Tensor], Any]:
    """What the run's search trials score a subnet with: the number of BatchNorm batches (`bn_batches`, else
    the study's, else the run's argument), those training batches, and the validation loader."""
    from nas.search import calibration_batches
    from trainer.datasets import YoloDataset, build_dataloader

    n = bn_batches or int(_search_settings(run).get("bn_batches") or args.bn_batches)
    batches = calibration_batches(data, args.imgsz, args.batch, n, seed=args.seed, workers=args.workers, device=device)
    val = build_dataloader(YoloDataset.from_config(data, "val", imgsz=args.imgsz, seed=args.seed), args.batch,
                           args.workers, shuffle=False, seed=args.seed)
    return n, batches, val


def _tau(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's tau (None when undefined: fewer than 2 points or a constant column)."""
    from scipy.stats import kendalltau

    tau = kendalltau(xs, ys).statistic if len(xs) >= 2 else float("nan")
    return None if tau is None or math.isnan(tau) else float(tau)


def train_supernet(args: argparse.Namespace, space: SearchSpace, data: str, table: Path | None, budget_ms: float,
                   out: Path, *, per_head: bool = False, sort_channels: bool = False, attentive: int = 1,
                   per_family: bool = False) -> tuple[SupernetTrainer, TrainResult]:
    """Train the run's supernet (resuming from out/last.pt): on the region of `table` under `budget_ms`, or on
    the whole space without a table; the run's epochs, batch, nominal batch, device and seed."""
    cfg = TrainConfig(model=f"supernet:{space.name}", data=data, out=str(out), epochs=args.supernet_epochs,
                      imgsz=args.imgsz, batch=args.batch, nbs=args.nbs, device=args.device, workers=args.workers,
                      seed=args.seed, **run_optimizer(args), progress=False, resume=(out / "last.pt").is_file())
    region = None if table is None else FeasibleRegion.from_table(table, space, budget_ms, nc=space.nc, imgsz=args.imgsz)
    trainer = SupernetTrainer(cfg, space=space, region=region, per_head=per_head, sort_channels=sort_channels,
                              attentive=attentive, per_family=per_family)
    return trainer, trainer.train()


LATER_SUPERNET_OPTIONS = {"attentive": 1, "per_family": False}  # name: default
STAGES = ("data_and_table", "supernet", "search", "front", "rank_fidelity", "vs_yolov7_tiny")


class StopAfter(Exception):
    """Raised after the --stop-after stage: its partial report is written."""


def _previous_report(out: Path) -> dict[str, Any]:
    """The bench.json an earlier run into OUT wrote (empty for a new run)."""
    path = out / "bench.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _finished_stages(previous: dict[str, Any]) -> dict[str, float]:
    """Wall times of the stages an earlier run finished."""
    return {k: v for k, v in previous.get("wall_s", {}).items() if k != "total"}


def read_report(run: Path, stage: str) -> dict[str, Any]:
    """A run's bench.json, which must hold `stage`'s figures (ValueError naming the file otherwise)."""
    path = run / "bench.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run search_synthetic.py first)")
    report = _previous_report(run)
    if stage not in _finished_stages(report):
        raise ValueError(f"{path}: the run has not finished its {stage} stage (rerun search_synthetic.py "
                         "without --stop-after)")
    return report


def read_run(run: Path, stage: str) -> tuple[dict[str, Any], argparse.Namespace]:
    """A finished run's bench.json (as `read_report`) and the arguments it ran with, `data` filled in where the
    run generated the synthetic set."""
    report = read_report(run, stage)
    args = argparse.Namespace(**report["args"])
    args.data = args.data or str(run / "data" / "data.yaml")
    return report, args


# the report keys each stage writes: a stage read back from an earlier run's bench.json restores these
STAGE_KEYS = {"data_and_table": ("table", "table_seeded_from", "yolov7_tiny", "budget_ms"), "supernet": ("supernet",),
              "search": ("search",), "front": ("front",), "rank_fidelity": ("rank_fidelity",),
              "vs_yolov7_tiny": ("vs_yolov7_tiny",)}


def read_run_or_exit(ap: argparse.ArgumentParser, run: Path, stage: str) -> tuple[dict[str, Any], argparse.Namespace]:
    """`read_run` for a follow-up script's command line: a run without the stage is its usage error (exit 2)."""
    try:
        return read_run(run, stage)
    except ValueError as e:
        ap.error(str(e))


class StageRunner:
    """Runs the bench's stages in order and writes bench.json after each.

    A stage that an earlier run into OUT finished with the same settings is read back from that run's
    bench.json (its figures and wall time) instead of run again: a resume would only reload its work, and
    its timings and latency measurements, taken on the machine as it was, must not be replaced by a reload's
    or by measurements beside other work. Once a stage runs, every later one runs too (their inputs changed);
    each stage's own work resumes (the supernet and the trainings from last.pt, the search from its study).
    """

    def __init__(self, out: Path, report: dict[str, Any], stop_after: str | None) -> None:
        self.out, self.report, self.stop_after = out, report, stop_after
        self.previous = _previous_report(out)
        self.finished = _finished_stages(self.previous)
        self.running = False
        stage_keys = {k for keys in STAGE_KEYS.values() for k in keys} | {"wall_s", "stage_settings"}
        for key, value in self.previous.items():  # notes added to the report by hand (e.g. report_note) stay
            if key not in stage_keys:
                self.report.setdefault(key, value)

    def __call__(self, name: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Stage `name`'s report keys: read back, or from `compute()` (timed); then the report is written."""
        settings = json.loads(json.dumps(settings))  # as bench.json holds them
        recorded = self.previous.get("stage_settings", {}).get(name, settings)  # older reports: none recorded
        if not self.running and name in self.finished and recorded == settings:
            section = {k: self.previous[k] for k in STAGE_KEYS[name] if k in self.previous}
            seconds, note = self.finished[name], " (finished by an earlier run, read back)"
        else:
            self.running = True
            t0 = time.time()
            section = compute()
            seconds, note = round(time.time() - t0, 1), ""
        for key in STAGE_KEYS[name]:  # a key the stage no longer writes must not stay from an earlier run
            self.report.pop(key, None)
        self.report.update(section)
        self.report.setdefault("stage_settings", {})[name] = settings
        wall = self.report.setdefault("wall_s", {})
        wall[name] = seconds
        if name == STAGES[-1]:
            wall["total"] = round(sum(v for k, v in wall.items() if k != "total"), 1)
        atomic_write_json(self.out / "bench.json", self.report)
        print(f"[{name}] {seconds:.1f} s{note}", flush=True)
        if name == self.stop_after:
            raise StopAfter(name)
        return section


@dataclass(frozen=True)
class BenchContext:
    """What every stage reads: the run's arguments, directory, data, space and latency table file."""

    args: argparse.Namespace
    out: Path
    data: str
    space: SearchSpace
    table_path: Path

    @property
    def supernet_dir(self) -> Path:
        return self.out / "supernet"

    def settings(self, *names: str) -> dict[str, Any]:
        """The arguments a stage's figures depend on."""
        return {n: getattr(self.args, n) for n in names}


def stage_table(ctx: BenchContext) -> dict[str, Any]:
    """Stage 1: the latency table (--table, else built with ORT here), yolov7-tiny's latency and the budget."""
    args, out = ctx.args, ctx.out
    section: dict[str, Any] = {}
    if args.table:
        table = LatencyTable.load(ctx.table_path, check_device=False)
    else:
        # a table's protocol is `latency build`'s (as the shipped tables were measured): a seeded build resumes one
        config = _protocol("quick") if args.latency_protocol == "quick" else BUILD_PROTOCOL
        backend = get_backend("ort-cpu", threads=args.threads, config=config)
        shipped = TABLES_DIR / table_name(backend.fingerprint(1), args.imgsz)
        # a quick run measures with a rough protocol: it does not finish a shipped table measured with the full one
        if not ctx.table_path.is_file() and not args.no_shipped_table and args.latency_protocol != "quick" \
                and shipped.is_file() \
                and LatencyTable.load(shipped, check_device=False).space == ctx.space.name:
            # this machine's shipped table for the space: the build then measures only what it lacks (the
            # heads at this class count) and refits the overhead on models of this class count
            shutil.copyfile(shipped, ctx.table_path)
            section["table_seeded_from"] = str(shipped)
        table = LatencyTable.build(ctx.space, backend, args.imgsz, ctx.table_path, progress=True)
    section["table"] = table.summary()

    from compress.report import measure_latency_ms

    yolo = load_model("yolov7-tiny", nc=ctx.space.nc)
    quick = QUICK if args.latency_protocol == "quick" else {}
    yolo_ms = measure_latency_ms([yolo], args.imgsz, threads=args.threads, **quick)[0]
    try:
        yolo_pred = table.predict(yolo.arch, args.imgsz)
    except DetforgeError:
        yolo_pred = None  # the space does not contain yolov7-tiny's blocks at this size
    budget_file = out / "budget.json"  # a rerun resumes the same study, which must keep its budget
    if args.budget_ms:
        budget = args.budget_ms
    elif budget_file.is_file():
        budget = float(json.loads(budget_file.read_text())["budget_ms"])
    else:
        budget = yolo_pred or yolo_ms
        atomic_write_json(budget_file, {"budget_ms": budget, "source": "predicted" if yolo_pred else "measured"})
    print(f"yolov7-tiny: measured {yolo_ms:.2f} ms, predicted {yolo_pred} ms; budget {budget:.2f} ms", flush=True)
    return {**section, "yolov7_tiny": {"measured_ms": yolo_ms, "predicted_ms": yolo_pred}, "budget_ms": budget}


def stage_supernet(ctx: BenchContext, budget: float) -> dict[str, Any]:
    """Stage 2: the supernet, on the region within `budget` (--supernet-scope budget) or the whole space."""
    args = ctx.args
    table = ctx.table_path if args.supernet_scope == "budget" else None
    trainer, sup = train_supernet(args, ctx.space, ctx.data, table, budget, ctx.supernet_dir,
                                  per_head=args.per_head, sort_channels=args.sort_channels, attentive=args.attentive,
                                  per_family=args.per_family)
    return {"supernet": {"epochs": sup.epochs_done, "largest_map": sup.best_map, "scope": args.supernet_scope,
                         "region": trainer.region_record(),
                         "img_s": [round(r["train_img_s"], 2) for r in sup.rows if "train_img_s" in r]}}


def stage_search(ctx: BenchContext, budget: float) -> dict[str, Any]:
    """Stage 3: the study's --trials trials under `budget`; trials/min over the trials this run completed."""
    args = ctx.args
    scfg = SearchConfig(space=None, supernet=str(ctx.supernet_dir / SUPERNET_FILE), table=str(ctx.table_path),
                        data=ctx.data, budget_ms=budget, trials=args.trials, out=str(ctx.out), study=STUDY,
                        sampler=args.sampler, seed=args.seed, bn_batches=args.bn_batches, val_batches=args.val_batches,
                        imgsz=args.imgsz, batch=args.batch, device=args.device, progress=True)
    t0 = time.time()
    study = run_search(scfg)
    wall = time.time() - t0
    # the rate counts the trials this run started and completed: not the killed run's trial it closed as failed,
    # nor failed or surplus ones (a rerun that only reloads a finished study times none: no rate)
    done = sum(1 for t in study.trials if t.state == TrialState.COMPLETE and t.datetime_start is not None
               and t.datetime_start.timestamp() >= t0)
    return {"search": {"trials": args.trials, "trials_timed": done, "wall_s": round(wall, 1),
                       "trials_per_min": round(done / (wall / 60), 2) if done else None}}


def stage_front(ctx: BenchContext, study: Any) -> dict[str, Any]:
    """Stage 4: the Pareto front, exported (model dirs + ONNX) and measured."""
    args = ctx.args
    front = export_front(study, ctx.supernet_dir / SUPERNET_FILE, ctx.out / "pareto", backend="ort-cpu",
                         threads=args.threads, measure_config=_protocol(args.latency_protocol),
                         bn_batches=args.bn_batches, batch=args.batch, device=args.device)
    # each architecture's YAML goes into the report: the run directory (study, exports) is not kept
    return {"front": [{**e.to_dict(), "arch": e.arch} for e in front]}


def stage_rank_fidelity(ctx: BenchContext, study: Any, front: list[FrontEntry]) -> dict[str, Any]:
    """Stage 5: Kendall tau between inherited and stand-alone mAP over --fidelity-archs architectures (the
    front first, then the study's other feasible ones in trial order), each trained from scratch."""
    args = ctx.args
    chosen: dict[str, Any] = {e.arch_id: e for e in front}
    for t in sorted(scored_trials(study), key=lambda t: t.number):
        if len(chosen) >= args.fidelity_archs:
            break
        if feasible(t) and t.user_attrs["arch_id"] not in chosen:
            chosen[t.user_attrs["arch_id"]] = t
    rows = []
    epochs = standalone_epochs(args)
    for aid, item in list(chosen.items())[: args.fidelity_archs]:
        attrs = item.user_attrs if hasattr(item, "user_attrs") else {"map": item.map, "arch": item.arch}
        arch = Architecture.from_dict(yaml.safe_load(attrs["arch"]))
        torch.manual_seed(args.seed)
        run = _scratch_dir(ctx.out, aid, epochs, args.max_train_s)
        m, done = _train(Detector(arch), ctx.data, run, epochs, args, max_s=args.max_train_s)
        rows.append({"arch_id": aid, "inherited_map": float(attrs["map"]), "standalone_map": m,
                     "standalone_map_last3": _last_maps_mean(run), "epochs": done, "arch": attrs["arch"]})
        print(f"stand-alone {aid}: inherited {attrs['map']:.4f}  stand-alone {m:.4f}", flush=True)
    inherited = [r["inherited_map"] for r in rows]
    return {"rank_fidelity": {
        "kendall_tau": _tau(inherited, [r["standalone_map"] for r in rows]),
        # the same against the mean of each run's last 3 validations, less sensitive to one noisy epoch
        "kendall_tau_last3": _tau(inherited, [r["standalone_map_last3"] for r in rows]),
        "archs": rows, "standalone_epochs": epochs, "max_train_s": args.max_train_s}}


def stage_vs_yolov7_tiny(ctx: BenchContext, front: list[FrontEntry], budget: float) -> dict[str, Any]:
    """Stage 6: the fastest and the best front model within `budget`, finetuned (and trained from scratch),
    against yolov7-tiny trained from scratch for the same epochs; latencies measured interleaved."""
    args, out = ctx.args, ctx.out
    comparison: dict[str, Any] = {"budget_ms": budget}
    within = [e for e in front if e.predicted_ms <= budget]
    if not within:
        return {"vs_yolov7_tiny": {**comparison, "note": "no front model within yolov7-tiny's latency"}}
    epochs = baseline_epochs(args)
    torch.manual_seed(args.seed)
    base_run = _baseline_dir(out, epochs)
    base, base_done = _train(load_model("yolov7-tiny", nc=ctx.space.nc), ctx.data, base_run, epochs, args)
    # the model (the fastest front model within the budget) and the one the search rates best
    picks = {"fastest_front_model": min(within, key=lambda e: e.predicted_ms),
             "front_model": max(within, key=lambda e: e.map)}
    for key, e in picks.items():
        ft, ft_done = _train(load_model(out / "pareto" / e.arch_id), ctx.data,
                             _finetune_dir(out, e.arch_id, args.finetune_epochs), args.finetune_epochs, args)
        entry = {"arch_id": e.arch_id, "inherited_map": e.map, "finetuned_map": ft,
                 "epochs": f"{args.supernet_epochs} supernet + {ft_done} finetune",
                 "predicted_ms": e.predicted_ms, "params": e.params, "gflops": e.gflops}
        if not args.no_scratch:
            # the same architecture with yolov7-tiny's training exactly: random init, same epochs and seed
            torch.manual_seed(args.seed)
            run = _scratch_dir(out, e.arch_id, epochs, None)
            scratch, scratch_done = _train(Detector(e.architecture()), ctx.data, run, epochs, args)
            entry["from_scratch"] = {"map": scratch, "map_last3": _last_maps_mean(run), "epochs": scratch_done}
        comparison[key] = entry
    aids = list(dict.fromkeys(e.arch_id for e in picks.values()))
    from compress.report import measure_latency_ms

    # 7 rotating passes, not 3: on a shared VM one slow pass in three moved a model's median by 2x
    kw = {**(QUICK if args.latency_protocol == "quick" else {}), "repeats": COMPARE_PASSES}
    ms = measure_latency_ms([load_model(_finetune_dir(out, a, args.finetune_epochs) / "model") for a in aids]
                            + [load_model(base_run / "model")], args.imgsz, threads=args.threads, **kw)
    for key in picks:
        comparison[key]["measured_ms"] = ms[aids.index(comparison[key]["arch_id"])]
    comparison["yolov7_tiny"] = {"map": base, "map_last3": _last_maps_mean(base_run),
                                 "epochs": base_done, "measured_ms": ms[-1]}
    return {"vs_yolov7_tiny": comparison}


def baseline_epochs(args: argparse.Namespace) -> int:
    """yolov7-tiny's epochs in the comparison: --baseline-epochs, else the front model's supernet + finetune."""
    return args.baseline_epochs or args.supernet_epochs + args.finetune_epochs


def standalone_epochs(args: argparse.Namespace) -> int:
    """Epochs of each rank-fidelity training: --standalone-epochs, else yolov7-tiny's (`baseline_epochs`)."""
    return args.standalone_epochs or baseline_epochs(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="default")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--out", default="runs/bench/search_synthetic")
    ap.add_argument("--data", default=None, help="data.yaml (default: generate the synthetic set into OUT/data)")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--table", default=None, help="latency table (default: build OUT/table.json with ort-cpu)")
    ap.add_argument("--no-shipped-table", action="store_true",
                    help="measure every block, not starting from this machine's shipped table for the space")
    ap.add_argument("--latency-protocol", default="standard", choices=["standard", "quick"])
    ap.add_argument("--threads", type=int, default=2, help="ORT threads for the table and the measurements")
    ap.add_argument("--supernet-epochs", type=int, default=30)
    ap.add_argument("--per-head", action="store_true", help="the supernet's sandwich per head configuration")
    ap.add_argument("--sort-channels", action="store_true", help="the supernet sorts its channels every epoch")
    ap.add_argument("--attentive", type=int, default=1, metavar="K",
                    help="the supernet's random subnets: the most budget-spending of K feasible draws (default 1)")
    ap.add_argument("--per-family", action="store_true",
                    help="the supernet's sandwich per family of named choices (block types, transitions, SPP, head)")
    ap.add_argument("--supernet-scope", default="budget", choices=["budget", "space"],
                    help="budget: the sandwich draws only architectures within the search's budget; space: all")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--sampler", default="nsga2")
    ap.add_argument("--budget-ms", type=float, default=None, help="default: yolov7-tiny's latency")
    ap.add_argument("--bn-batches", type=int, default=8)
    ap.add_argument("--val-batches", type=int, default=None)
    ap.add_argument("--fidelity-archs", type=int, default=6)
    ap.add_argument("--standalone-epochs", type=int, default=None,
                    help="epochs of each rank-fidelity training (default: yolov7-tiny's, supernet + finetune)")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--baseline-epochs", type=int, default=None, help="default: supernet + finetune epochs")
    ap.add_argument("--stop-after", default=None, choices=STAGES[1:-1],
                    help="stop after this stage, its report written to OUT/bench.json (a rerun resumes)")
    ap.add_argument("--no-scratch", action="store_true",
                    help="skip training the compared front model from scratch for the baseline's epochs")
    ap.add_argument("--max-train-s", type=float, default=None,
                    help="wall-clock cap of each stand-alone (rank fidelity) training, its schedule fitted to it")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nbs", type=int, default=TrainConfig.nbs, help="nominal batch of every training (16: 4x the optimizer steps)")
    ap.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS, help="of every training")
    ap.add_argument("--lr0", type=float, default=None, help="of every training (default: the hyp's, SGD's 0.01)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.fidelity_archs < 2:
        ap.error("--fidelity-archs must be >= 2 (a rank correlation needs pairs)")
    if args.standalone_epochs is not None and args.standalone_epochs < 1:
        ap.error("--standalone-epochs must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args), "machine": platform.processor() or platform.machine(),
                              "torch_threads": torch.get_num_threads(),
                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    data = args.data or str(generate(out / "data", train=args.train_images, val=args.val_images,
                                     imgsz=max(args.imgsz, 64), classes=args.classes, seed=args.seed))
    from trainer.datasets import load_data_config

    space = load_space(args.space).with_nc(load_data_config(data).nc)
    ctx = BenchContext(args, out, data, space, Path(args.table) if args.table else out / "table.json")
    stage = StageRunner(out, report, args.stop_after)

    stage("data_and_table", ctx.settings("space", "imgsz", "data", "train_images", "val_images", "classes", "table",
                                         "no_shipped_table", "latency_protocol", "threads", "budget_ms", "seed"),
          lambda: stage_table(ctx))
    budget = report["budget_ms"]
    # options added after the first runs are recorded only when not at their default, so those runs keep
    # their finished stages
    later = [k for k, default in LATER_SUPERNET_OPTIONS.items() if getattr(args, k) != default]
    optim = [k for k, default in OPTIMIZER_DEFAULTS.items() if getattr(args, k) != default]  # as `later`, every stage
    stage("supernet", ctx.settings("supernet_epochs", "per_head", "sort_channels", "supernet_scope", "batch", "nbs",
                                   "seed", *later, *optim),
          lambda: stage_supernet(ctx, budget))
    stage("search", ctx.settings("trials", "sampler", "bn_batches", "val_batches"), lambda: stage_search(ctx, budget))
    study = _study(out)
    stage("front", {}, lambda: stage_front(ctx, study))
    front = [FrontEntry(**e) for e in report["front"]]
    stage("rank_fidelity", ctx.settings("fidelity_archs", "standalone_epochs", "baseline_epochs", "max_train_s", *optim),
          lambda: stage_rank_fidelity(ctx, study, front))
    stage("vs_yolov7_tiny", ctx.settings("finetune_epochs", "baseline_epochs", "no_scratch", *optim),
          lambda: stage_vs_yolov7_tiny(ctx, front, budget))

    summary = {k: report[k] for k in ("budget_ms", "search", "rank_fidelity", "vs_yolov7_tiny", "wall_s")}
    summary["front"] = [{k: e[k] for k in ("arch_id", "map", "predicted_ms", "measured_ms", "params", "gflops")}
                        for e in report["front"]]
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    try:
        main()
    except StopAfter as stopped:
        print(f"stopped after the {stopped} stage; a rerun without --stop-after resumes from there", flush=True)
