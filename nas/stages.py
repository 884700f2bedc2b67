"""The stages of `detforge run`, each a function of the Pipeline that returns its JSON outputs."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import load_model, load_space, save_model
from search_spaces.errors import ConfigError
from search_spaces.io import atomic_write_json

if TYPE_CHECKING:
    from .pipeline import Pipeline


def data(p: Pipeline) -> dict[str, Any]:
    """The dataset: the user's YOLO/COCO data.yaml, or the built-in synthetic set generated into the run."""
    from trainer.datasets import load_data_config
    from trainer.synthetic import generate

    c = p.cfg
    if c.data:
        yaml_path = Path(c.data)
    else:
        s = c.synthetic
        yaml_path = generate(p.out / "data", train=s.train, val=s.val, imgsz=s.imgsz, classes=s.classes, seed=s.seed,
                             progress=True)
    dc = load_data_config(yaml_path)
    return {"yaml": str(dc.yaml_path or yaml_path), "nc": dc.nc, "names": list(dc.names), "files": [str(yaml_path)]}


def latency_table(p: Pipeline, d: dict[str, Any]) -> dict[str, Any]:
    """Load the configured table, or build one for the space on this device (resumable)."""
    from latency_tables import LatencyTable, MeasurementConfig
    from latency_tables.table import make_backend

    c = p.cfg
    if c.latency.table:
        table = LatencyTable.load(c.latency.table)
        path = Path(c.latency.table)
    else:
        path = p.out / "latency" / f"{c.latency.backend}-{c.imgsz}.json"
        space = load_space(c.space).with_nc(d["nc"])
        protocol = MeasurementConfig(min_runs=c.latency.min_runs, max_runs=max(1000, c.latency.min_runs),
                                     max_time_s=c.latency.max_time_s, warmup=min(10, c.latency.min_runs))
        backend = make_backend(c.latency.backend, threads=c.latency.threads, config=protocol)
        # a table this stage left unfinished continues; one of other settings (threads, protocol) is measured anew
        table = LatencyTable.build(space, backend, c.imgsz, path, fit_models=c.latency.fit_models,
                                   resume=p.resume_from(path))
    return {"path": str(path), "entries": len(table), "backend": table.backend, "files": [str(path)]}


def check_budget(p: Pipeline, t: dict[str, Any]) -> float | None:
    """The search budget; an impossible one (below the smallest architecture of the space) fails here."""
    b = p.cfg.search.budget_ms
    if b is None:
        return None
    predict, space = _table_predictor(p, t)
    smallest = predict(space.smallest())
    if b < smallest:
        raise ConfigError(f"impossible latency budget {b} ms: the smallest architecture of space '{space.name}' "
                          f"is predicted at {smallest:.2f} ms", field="search.budget_ms")
    return b


def supernet(p: Pipeline, d: dict[str, Any], t: dict[str, Any], budget: float | None) -> dict[str, Any]:
    """Train the weight-sharing supernet with the sandwich rule (resumes from its last.pt), on the
    architectures within `budget` as the table predicts them when one is given."""
    from compress.distill import load_teacher
    from trainer.config import TrainConfig
    from trainer.trainer import seed_everything

    from .budget import FeasibleRegion
    from .supernet import Supernet
    from .supernet_train import SupernetTrainer

    c = p.cfg
    teacher = None if c.supernet.teacher is None else load_teacher(c.supernet.teacher, c.supernet.teacher_model)
    out = p.out / "supernet"
    cfg = TrainConfig(data=d["yaml"], out=str(out), epochs=c.supernet.epochs, imgsz=c.imgsz, batch=c.supernet.batch,
                      **c.train_settings(), resume=p.resume_from(out / "last.pt"), exist_ok=True,  # the run's own directory
                      autoanchor=c.supernet.autoanchor)
    seed_everything(c.seed)  # the initial weights are a function of the seed, as with `supernet train`
    net = Supernet(c.space, nc=d["nc"])
    region = None if budget is None else \
        FeasibleRegion.from_table(t["path"], net.space, budget, nc=d["nc"], imgsz=c.imgsz)
    trainer = SupernetTrainer(cfg, model=net, n_random=c.supernet.n_random, region=region,
                              per_head=c.supernet.per_head, sort_channels=c.supernet.sort_channels,
                              attentive=c.supernet.attentive, per_family=c.supernet.per_family, teacher=teacher)
    result = trainer.train()
    weights = out / "supernet.pt"
    return {"weights": str(weights), "best_map": result.best_map, "autoanchor": trainer.anchor_fit_record(),
            "files": [str(weights)]}


def search(p: Pipeline, d: dict[str, Any], sup: dict[str, Any] | None, t: dict[str, Any], budget: float | None
           ) -> dict[str, Any]:
    """The Optuna search under the budget (the study in the run directory resumes after a kill): candidates scored
    with the supernet's weights (`sup`), or, in scratch mode (`sup` None), each trained from scratch."""
    from .search import SearchConfig, run_search, trials_dir

    c = p.cfg
    storage = c.search.storage or f"sqlite:///{(p.out / 'study.db').resolve()}"
    name = f"{c.name}-{p.attempt_id()}"  # other inputs, another study: a finished one would not search again
    run_id = p.run_id()
    if c.search.storage and run_id:  # shared with other runs: this run's own study, also after `rm -rf` there
        name += f"-{run_id}"
    # a supernet trial re-estimates BatchNorm on the supernet's batch size
    scoring = c.scratch_trials() if sup is None else \
        {"supernet": sup["weights"], "batch": c.supernet.batch, "seed": c.seed, "device": c.device}
    out = p.out / "search"
    cfg = SearchConfig(space=c.space, table=t["path"], data=d["yaml"], budget_ms=budget, trials=c.search.trials,
                       storage=storage, study=name, out=str(out), sampler=c.search.sampler,
                       bn_batches=c.search.bn_batches, val_batches=c.search.val_batches, imgsz=c.imgsz, nc=d["nc"],
                       progress=True, **scoring)
    study = run_search(cfg)
    # a scratch study's front is exported from its trials' trained models: without them the search runs again
    files = [str(trials_dir(out, study.study_name))] if sup is None else []
    return {"storage": storage, "study": study.study_name, "trials": len(study.trials), "files": files}


def pareto(p: Pipeline, sup: dict[str, Any] | None, s: dict[str, Any], t: dict[str, Any], budget: float | None
           ) -> dict[str, Any]:
    """The Pareto front, exported as model directories + ONNX (which of them go on is `choose`'s)."""
    from .pareto import export_front, pareto_front
    from .search import load_study
    from .supernet import load_supernet

    study = load_study(s["storage"], s["study"])
    if not pareto_front(study):
        raise ConfigError("the search found no architecture within the budget", field="search.budget_ms")
    c = p.cfg
    supernet = None if sup is None else load_supernet(sup["weights"])  # scratch mode: the trials' trained models
    entries = export_front(study, supernet, p.out / "pareto", data=p.records["data"].outputs["yaml"],
                           threads=c.latency.threads, bn_batches=c.search.bn_batches, batch=c.supernet.batch,
                           device=c.device)
    return {"front": [e.to_dict() for e in entries], "files": []}


def choose(front: list[dict[str, Any]], k: int, budgets: list[float]) -> list[str]:
    """Arch ids of the k best front models by mAP, or the best one meeting each budget (front: `pareto`'s rows)."""
    if budgets:
        ids = []
        for b in budgets:
            ok = [e for e in front if e["predicted_ms"] <= b]
            if ok:
                ids.append(max(ok, key=lambda e: e["map"])["arch_id"])
        return list(dict.fromkeys(ids))
    return [e["arch_id"] for e in sorted(front, key=lambda e: -e["map"])[:k]]


def finetune(p: Pipeline, d: dict[str, Any], mid: str) -> dict[str, Any]:
    """Train a chosen front model further from its inherited (or, in scratch mode, trial-trained) weights (resumes
    from its last.pt)."""
    return _train_step(p, d, load_model(p.out / "pareto" / mid), mid, "finetune", p.cfg.finetune.epochs)


def prune(p: Pipeline, d: dict[str, Any], mid: str, prev: dict[str, Any]) -> dict[str, Any]:
    """Structured pruning of the previous step's model to `prune.macs`, then finetuning."""
    from compress.prune import prune_detector

    c = p.cfg
    pruned, rep = prune_detector(load_model(prev["model"]), c.prune.macs, backend=c.prune.backend, imgsz=c.imgsz)
    return {**_train_step(p, d, pruned, mid, "prune", c.prune.finetune_epochs), "changes": rep.changes[:5]}


def distill(p: Pipeline, d: dict[str, Any], mid: str, prev: dict[str, Any]) -> dict[str, Any]:
    """Distillation of the previous step's model from the configured teacher."""
    from compress.distill import DistillConfig, Distiller, load_teacher

    c = p.cfg
    student = load_model(prev["model"])
    teacher = load_teacher(c.distill.teacher, c.distill.teacher_model)
    return _train_step(p, d, student, mid, "distill", c.distill.epochs, [Distiller(teacher, student, DistillConfig())])


def deploy(p: Pipeline, d: dict[str, Any], mid: str, steps: list[dict[str, Any]], t: dict[str, Any]
           ) -> dict[str, Any]:
    """The last trained step's model -> fuse -> ONNX FP32 -> INT8 -> verify (mAP, measured latency)."""
    from compress.export import export_detector
    from compress.fuse import fuse_detector
    from compress.onnx_eval import evaluate_onnx
    from compress.report import measure_latency_ms
    from trainer.datasets import val_loader

    c = p.cfg
    root = p.out / "models" / mid
    last = steps[-1]["model"]
    steps = [{k: v for k, v in s.items() if k not in ("model", "files")} for s in steps]
    fused, _ = fuse_detector(load_model(last))
    save_model(fused, root / "fused")
    steps.append({"step": "fuse", "map": steps[-1]["map"], **_size(fused, c.imgsz)})
    onnx_fp32 = root / "model.onnx"
    export_detector(fused, onnx_fp32, c.imgsz)
    files = [str(onnx_fp32)]
    loader = val_loader(d["yaml"], c.imgsz, batch=8)
    verify = {"fp32": {"map": evaluate_onnx(onnx_fp32, loader, d["nc"], d["names"]).metrics.map}}
    lat_models: list[Any] = [onnx_fp32]
    if c.quantize.enabled:
        from compress.quantize import calibration_images, quantize_onnx

        onnx_int8 = root / "model.int8.onnx"
        calib = calibration_images(Path(d["yaml"]).parent / "images" / "train", c.imgsz, c.quantize.calib) \
            if not c.data else calibration_images(_train_images(d), c.imgsz, c.quantize.calib)
        quantize_onnx(onnx_fp32, onnx_int8, calib, method=c.quantize.method)
        verify["int8"] = {"map": evaluate_onnx(onnx_int8, loader, d["nc"], d["names"]).metrics.map}
        lat_models.append(onnx_int8)
        files.append(str(onnx_int8))
    lat = measure_latency_ms(lat_models, c.imgsz, threads=c.latency.threads)
    for key, ms in zip(verify, lat):
        verify[key]["latency_ms"] = ms
    predicted = _table_predictor(p, t)[0](fused.arch) if not c.prune.enabled else None
    result = {"steps": steps, "verify": verify, "predicted_ms": predicted, "files": files}
    atomic_write_json(root / "metrics.json", result)
    return result


STEP_DIRS = {"finetune": "finetuned", "prune": "pruned", "distill": "distilled"}  # models/<mid>/<dir>/


def _train_step(p: Pipeline, d: dict[str, Any], model: Any, mid: str, step: str, epochs: int,
                callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """One training step of a chosen model: its mAP, size and trained model directory."""
    from trainer.config import TrainConfig
    from trainer.trainer import Trainer

    c = p.cfg
    out = p.out / "models" / mid / STEP_DIRS[step]
    cfg = TrainConfig(data=d["yaml"], out=str(out), epochs=epochs, imgsz=c.imgsz, batch=c.finetune.batch,
                      **c.train_settings(), resume=p.resume_from(out / "last.pt"), exist_ok=True,
                      autoanchor=False)  # trained weights: they were trained with these anchors (supernet's or trial's)
    res = Trainer(cfg, model=model, callbacks=list(callbacks)).train()
    trained = load_model(out / "model")
    m = res.final("map")  # also when a resume found the training finished (nothing validated this run)
    return {"step": step, "map": float("nan") if m is None else m, **_size(trained, c.imgsz),
            "model": str(out / "model"), "files": [str(out / "model" / "weights.pt")]}


def baselines(p: Pipeline, d: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """Zoo baselines trained from scratch with the same epoch budget; their mAP and measured latency."""
    from compress.export import export_detector
    from compress.report import measure_latency_ms
    from trainer.config import TrainConfig
    from trainer.trainer import Trainer

    c = p.cfg
    epochs = c.baseline_epochs()
    out: dict[str, Any] = {}
    for name in c.baselines.models:
        run = p.out / "baselines" / name
        cfg = TrainConfig(model=name, data=d["yaml"], out=str(run), epochs=epochs, imgsz=c.imgsz,
                          batch=c.finetune.batch, **c.train_settings(), resume=p.resume_from(run / "last.pt"),
                          exist_ok=True)
        trainer = Trainer(cfg)
        res = trainer.train()
        det = load_model(run / "model").eval().fuse()
        onnx = run / "model.onnx"
        export_detector(det, onnx, c.imgsz)
        out[name] = {"map": res.final("map"), "map50": res.final("map50"),
                     "latency_ms": measure_latency_ms([onnx], c.imgsz, threads=c.latency.threads)[0],
                     "epochs": epochs, "autoanchor": trainer.anchor_fit_record()}
    return out


def report(p: Pipeline, d, t, front, models, base, budget) -> dict[str, Any]:
    """report.md + plots in the run directory; returns the summary."""
    from .report import write_report

    path = write_report(p, d, t, front, models, base, budget)
    return {"report": str(path), "files": [str(path)]}


# ---- small helpers -------------------------------------------------------------------------------------------
def _nc(p: Pipeline) -> int:
    return int(p.records["data"].outputs["nc"])


def _table_predictor(p: Pipeline, t: dict[str, Any]) -> tuple[Any, Any]:
    """The table's prediction for the space's architectures at the dataset's classes, and that space.

    As in the search: a table built for the space's own nc (`detforge latency build`) predicts the heads there.
    """
    from .budget import space_predictor, table_predictor

    predict, _ = table_predictor(t["path"], p.cfg.imgsz)
    return space_predictor(predict, load_space(p.cfg.space), _nc(p), p.cfg.imgsz, table=t["path"])


def _size(det: Any, imgsz: int) -> dict[str, Any]:
    from compress.report import detector_size

    params, gflops = detector_size(det, imgsz)
    return {"params": params, "gflops": gflops}


def _train_images(d: dict[str, Any]) -> Path:
    from trainer.datasets import load_data_config

    train = load_data_config(d["yaml"]).train
    return train[0] if isinstance(train, list) else train


__all__ = ["baselines", "check_budget", "choose", "data", "deploy", "distill", "finetune", "latency_table", "pareto",
           "prune", "report", "search", "supernet"]
