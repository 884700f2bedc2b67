"""The Pareto front of a search study: selection, plot, and export of each front architecture.

The front holds the feasible (within the latency budget), evaluated COMPLETE trials that no other
such trial dominates on the study's objectives plus predicted latency (so a scratch-mode study, which
optimises mAP alone, still gets an accuracy/latency front). `export_front` turns each into a model
directory (`arch.yaml` + `weights.pt`: from the supernet with BatchNorm recalibrated, or the model the trial
trained in scratch mode and with finetuned candidates), a fused ONNX file and a latency measured on a backend
of this machine, all listed in `front.json`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search_spaces import Detector
from search_spaces.architecture import Architecture
from search_spaces.errors import ConfigError
from search_spaces.io import atomic_path, atomic_write_json
from trainer.distributed import resolve_device

from .search import STUDY_ATTR, calibration_batches, constraint_of, file_digest
from .supernet import Supernet, load_supernet

# objective -> (user attribute, sign that turns it into "smaller is better")
_DIMS = {"map": ("map", -1.0), "latency": ("predicted_ms", 1.0), "params": ("params", 1.0),
         "gflops": ("gflops", 1.0)}
FRONT_COLUMNS = ["arch_id", "trial", "map", "map50", "predicted_ms", "measured_ms", "params", "gflops"]


@dataclass
class FrontEntry:
    """One architecture of the front."""

    number: int  # trial number
    arch_id: str
    map: float
    map50: float
    predicted_ms: float
    params: int
    gflops: float
    measured_ms: float | None = None  # filled by export_front
    path: str | None = None  # model directory, filled by export_front
    arch: str = dataclasses.field(default="", repr=False)  # architecture YAML

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the YAML, which lives in the model directory)."""
        d = dataclasses.asdict(self)
        d.pop("arch")
        return d

    def row(self) -> dict[str, Any]:
        """A table row (FRONT_COLUMNS)."""
        return {"arch_id": self.arch_id, "trial": self.number, "map": self.map, "map50": self.map50,
                "predicted_ms": self.predicted_ms, "measured_ms": "-" if self.measured_ms is None else self.measured_ms,
                "params": self.params, "gflops": self.gflops}

    def architecture(self) -> Architecture:
        """The Architecture the trial recorded."""
        import yaml

        return Architecture.from_dict(yaml.safe_load(self.arch))


def settings(study: optuna.Study) -> dict[str, Any]:
    """The search settings the study recorded (space, budget, objectives, data, supernet, imgsz)."""
    return dict(study.user_attrs.get(STUDY_ATTR) or {})


def front_objectives(study: optuna.Study) -> list[str]:
    """The dimensions of the front: the study's objectives, plus latency (always part of the trade-off)."""
    objectives = settings(study).get("objectives") or ["map", "latency"]
    return list(dict.fromkeys([*objectives, "latency"]))


def scored_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials with a measured mAP (over-budget trials the search skipped have none)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("map") is not None and t.user_attrs.get("predicted_ms") is not None]


def feasible(trial: FrozenTrial) -> bool:
    """Within the budget (every recorded constraint <= 0)."""
    return max(constraint_of(trial)) <= 0


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (all dimensions minimised)."""
    return [i for i, p in enumerate(points) if not any(_dominates(q, p) for j, q in enumerate(points) if j != i)]


def pareto_front(study: optuna.Study, objectives: Sequence[str] | None = None) -> list[FrontEntry]:
    """The non-dominated feasible trials, one per architecture, sorted by predicted latency."""
    dims = list(objectives or front_objectives(study))
    unknown = [d for d in dims if d not in _DIMS]
    if unknown:
        raise ConfigError(f"unknown objective {unknown[0]!r} (known: {', '.join(_DIMS)})", field="objectives")
    best: dict[str, FrozenTrial] = {}
    for t in scored_trials(study):
        if not feasible(t):
            continue
        aid = t.user_attrs.get("arch_id") or str(t.number)
        if aid not in best or t.user_attrs["map"] > best[aid].user_attrs["map"]:  # a retry or a resample
            best[aid] = t
    trials = list(best.values())
    points = [[_DIMS[d][1] * float(t.user_attrs[_DIMS[d][0]]) for d in dims] for t in trials]
    front = [_entry(trials[i]) for i in non_dominated(points)]
    return sorted(front, key=lambda e: (e.predicted_ms, -e.map, e.number))


def _entry(t: FrozenTrial) -> FrontEntry:
    a = t.user_attrs
    return FrontEntry(number=t.number, arch_id=str(a.get("arch_id")), map=float(a["map"]),
                      map50=float(a.get("map50") or 0.0), predicted_ms=float(a["predicted_ms"]),
                      params=int(a.get("params") or 0), gflops=float(a.get("gflops") or 0.0), arch=a.get("arch", ""))


def plot_front(study: optuna.Study, path: str | Path, front: Sequence[FrontEntry] | None = None,
               budget_ms: float | None = None, html: str | Path | None = None) -> Path:
    """PNG of mAP vs predicted latency: every scored trial grey, the front highlighted, the budget line.

    With `html` and plotly installed, also Optuna's interactive Pareto-front plot (skipped without plotly).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(study) if front is None else front
    budget_ms = settings(study).get("budget_ms") if budget_ms is None else budget_ms
    trials = scored_trials(study)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [t for t in trials if feasible(t)]
    bad = [t for t in trials if not feasible(t)]
    ax.scatter([t.user_attrs["predicted_ms"] for t in ok], [t.user_attrs["map"] for t in ok], s=14, c="0.6",
               label=f"trials ({len(trials)})")
    if bad:
        ax.scatter([t.user_attrs["predicted_ms"] for t in bad], [t.user_attrs["map"] for t in bad], s=14, c="0.8",
                   marker="x", label="over budget")
    if front:
        xs, ys = [e.predicted_ms for e in front], [e.map for e in front]
        ax.step(xs, ys, where="post", c="tab:red", lw=1)
        ax.scatter(xs, ys, s=30, c="tab:red", zorder=3, label=f"Pareto front ({len(front)})")
        measured = [(e.measured_ms, e.map) for e in front if e.measured_ms is not None]
        if measured:
            ax.scatter(*zip(*measured), s=30, facecolors="none", edgecolors="tab:blue", zorder=3,
                       label="front, measured latency")
    if budget_ms:
        ax.axvline(float(budget_ms), ls="--", c="k", lw=1, label=f"budget {float(budget_ms):g} ms")
    ax.set_xlabel("latency (ms, predicted by the table)")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title(f"study {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    if html is not None and len(study.directions) in (2, 3):  # the objectives plot_pareto_front can draw
        _plot_html(study, Path(html))
    return out


def _plot_html(study: optuna.Study, path: Path) -> bool:
    """Optuna's interactive Pareto-front plot, if plotly is installed (it is optional)."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return False
    names = list(settings(study).get("objectives") or ["map", "latency"])
    fig = optuna.visualization.plot_pareto_front(study, target_names=names)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    return True


def export_front(study: optuna.Study, supernet: Supernet | str | Path | None, out_dir: str | Path, *,
                 front: Sequence[FrontEntry] | None = None, data: str | None = None, backend: Any = "ort-cpu",
                 threads: int | None = 2, measure_config: Any = None, bn_batches: int | None = None,
                 batch: int | None = None, device: str = "auto", onnx: bool = True) -> list[FrontEntry]:
    """Write `out_dir/<arch_id>/` (arch.yaml, weights.pt, model.onnx) for each front entry, measure each ONNX
    on `backend` (a name, a Backend, or None to skip), and `out_dir/front.json` + `front.png`.

    Supernet studies extract each architecture from `supernet` with BatchNorm recalibrated as the search did
    (its batches, seed and batch size, unless given); scratch studies, and supernet studies that finetune
    every candidate, copy the model each trial trained.
    """
    st = settings(study)
    entries = [dataclasses.replace(e) for e in (pareto_front(study) if front is None else front)]
    models = (_trained_models(study, entries) if trains_candidates(st)
              else _supernet_models(st, entries, supernet, data, bn_batches, batch, device))
    from compress.export import export_detector
    from search_spaces import save_model

    be = _backend(backend, threads, measure_config)
    out = Path(out_dir)
    earlier = exported_ids(out)
    for e, det in zip(entries, models):
        arch = e.architecture()
        d = out / e.arch_id
        save_model(det, d)
        e.path = str(d)
        if onnx:
            export_detector(det, d / "model.onnx", imgsz=arch.imgsz, fuse=True)
            if be is not None:
                e.measured_ms = float(be.measure(d / "model.onnx", (arch.in_channels, arch.imgsz, arch.imgsz)).median_ms)
    atomic_write_json(out / "front.json", {
        "study": study.study_name, "budget_ms": st.get("budget_ms"), "objectives": front_objectives(study),
        "imgsz": st.get("imgsz"), "backend": None if be is None else be.name, "threads": None if be is None else be.threads,
        "entries": [e.to_dict() for e in entries]})
    plot_front(study, out / "front.png", entries, html=out / "front.html")
    # only after the new front is complete: a failed export leaves the earlier one whole
    for arch_id in earlier - {e.arch_id for e in entries}:
        shutil.rmtree(out / arch_id, ignore_errors=True)
    return entries


def exported_ids(out_dir: str | Path) -> set[str]:
    """The architectures an earlier `export_front` wrote to `out_dir` (its `front.json`), else none."""
    try:
        doc = json.loads((Path(out_dir) / "front.json").read_text())
        ids = {str(e["arch_id"]) for e in doc["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # nothing exported there, or not by us: leave every folder alone
    return {i for i in ids if i and Path(i).name == i and (Path(out_dir) / i / "arch.yaml").is_file()}


def trains_candidates(st: dict[str, Any]) -> bool:
    """Whether a study's trials train their candidates (scratch mode, or finetuned inherited weights)."""
    return st.get("mode") == "scratch" or bool(st.get("finetune_epochs"))


def _trained_models(study: optuna.Study, entries: Sequence[FrontEntry]) -> Iterator[Detector]:
    """The models a study's trials trained (their `run_dir`/model), one per entry, loaded lazily."""
    from search_spaces import load_model

    paths = []
    for e in entries:  # all checked before anything is written
        run_dir = study.trials[e.number].user_attrs.get("run_dir")
        path = Path(run_dir) / "model" if run_dir else None
        if path is None or not (path / "weights.pt").is_file():
            raise ConfigError(f"trial {e.number} left no trained model ({path or 'no run_dir recorded'}); "
                              "export it from the machine that ran it", field="run_dir")
        paths.append(path)
    return (load_model(path).eval() for path in paths)


def _supernet_models(st: dict[str, Any], entries: Sequence[FrontEntry], supernet: Supernet | str | Path | None,
                     data: str | None, bn_batches: int | None, batch: int | None, device: str) -> Iterator[Detector]:
    """Each entry's subnet from the supernet after BatchNorm recalibration (checks now, extraction lazily)."""
    from trainer.trainer import resolve_data_config

    supernet = supernet or st.get("supernet")
    if not supernet:
        raise ConfigError("the study records no supernet: pass --supernet", field="supernet")
    if isinstance(supernet, (str, Path)):
        recorded, sha = st.get("supernet_sha"), file_digest(str(supernet))
        if recorded and sha and recorded != sha:  # e.g. trained on (--resume) after the search: other weights
            raise ConfigError("this is not the supernet the study searched with (its content changed): export with "
                              "that file, or search again", path=str(supernet), field="supernet")
        net = load_supernet(supernet)
    else:
        net = supernet
    if st.get("space") and net.space.name != st["space"]:
        raise ConfigError(f"the supernet is of space {net.space.name!r}, the study searched {st['space']!r}",
                          field="supernet")
    imgsz = int(st.get("imgsz") or max(net.space.decisions["imgsz"].choices))
    data_cfg = resolve_data_config(data or st.get("data"), imgsz)
    if data_cfg.nc != net.nc:
        raise ConfigError(f"the supernet has nc={net.nc}, the dataset {data_cfg.nc}", field="nc")
    dev = resolve_device(device)
    net.to(dev)
    # the shared BatchNorm statistics fit no subnet: re-estimate them per architecture, on the search's batches
    batches = calibration_batches(data_cfg, imgsz, batch or int(st.get("batch") or 16),
                                  bn_batches or int(st.get("bn_batches") or 8), seed=int(st.get("seed") or 0),
                                  device=dev) if entries else []

    return (net.extract(e.architecture(), bn_batches=batches).eval().cpu() for e in entries)


def _backend(backend: Any, threads: int | None, measure_config: Any) -> Any:
    """A latency backend from a name (None: no measurement)."""
    if backend is None or not isinstance(backend, str):
        return backend
    from latency_tables.table import make_backend

    kw: dict[str, Any] = {} if measure_config is None else {"config": measure_config}
    return make_backend(backend, threads=threads, **kw)


def front_table(entries: Sequence[FrontEntry]) -> list[dict[str, Any]]:
    """Rows for `nas.output.format_table`."""
    return [e.row() for e in entries]


__all__ = ["FRONT_COLUMNS", "FrontEntry", "export_front", "exported_ids", "feasible", "front_objectives", "front_table",
           "non_dominated", "pareto_front", "plot_front", "scored_trials", "settings"]
