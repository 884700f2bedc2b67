"""Pareto front: non-domination, feasibility and de-duplication, plots, export to model dirs + ONNX, CLI."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from latency_tables.measurement import MeasurementConfig
from nas.cli import main
from nas.pareto import FrontEntry, export_front, non_dominated, pareto_front, plot_front
from nas.search import STUDY_ATTR, SearchConfig, open_storage, run_search
from search_spaces import load_model
from search_spaces.errors import ConfigError

from . import IMGSZ, NC

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = MeasurementConfig(warmup=2, warmup_s=0.0, min_runs=5, max_runs=20, max_time_s=1.0, target_rel_ci=0.1,
                          check_load=False)


@pytest.fixture(scope="module")
def searched(shared, tmp_path_factory):
    """A real 3-trial search (journal storage) on the shared tiny supernet, unconstrained."""
    out = tmp_path_factory.mktemp("searched")
    storage = str(out / "study.journal")
    cfg = SearchConfig(supernet=str(shared.supernet), table=str(shared.table), data=str(shared.data), trials=3,
                       storage=storage, study="p", out=str(out), bn_batches=1, batch=8, sampler="random")
    return run_search(cfg), storage


def test_non_dominated_points_are_exactly_the_front():
    rng = np.random.default_rng(0)
    pts = rng.random((60, 2)).round(2).tolist() + [[0.5, 0.5], [0.5, 0.5]]  # ties and duplicates too
    front = set(non_dominated(pts))

    def dom(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    for i, p in enumerate(pts):
        dominated = any(dom(q, p) for q in pts)
        assert (i in front) == (not dominated)


def _study_with(trials: list[dict], budget: float | None = 3.0, objectives=("map", "latency")) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(STUDY_ATTR, {"objectives": list(objectives), "budget_ms": budget})
    for t in trials:
        attrs = {"arch_id": t["id"], "map": t["map"], "map50": 0.0, "predicted_ms": t["ms"],
                 "params": t.get("params", 1000), "gflops": 0.1, "arch": "", "evaluated": t["map"] is not None}
        if budget is not None:
            attrs["constraint"] = [t["ms"] - budget]
        state = t.get("state", TrialState.COMPLETE)
        values = [t["map"] or 0.0, t["ms"]] if state == TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, values=values, user_attrs=attrs))
    return study


def test_front_keeps_feasible_non_dominated_architectures_once():
    study = _study_with([
        {"id": "a", "map": 0.50, "ms": 2.0},
        {"id": "b", "map": 0.60, "ms": 3.0},
        {"id": "c", "map": 0.40, "ms": 3.0},  # dominated by a and b
        {"id": "d", "map": 0.90, "ms": 6.0},  # best, but over the budget
        {"id": "e", "map": 0.55, "ms": 2.5},
        {"id": "a", "map": 0.45, "ms": 2.0},  # a retry of a: counted once, with its better result
        {"id": "g", "map": None, "ms": 5.0},  # over budget, never evaluated
        {"id": "h", "map": 0.99, "ms": 1.0, "state": TrialState.FAIL},
    ])
    front = pareto_front(study)
    assert [(e.arch_id, e.number) for e in front] == [("a", 0), ("e", 4), ("b", 1)]
    assert all(isinstance(e, FrontEntry) and e.measured_ms is None for e in front)
    # without a budget the fast-enough-but-slower d joins; with params as a third objective, so does c (fewest)
    assert "d" in {e.arch_id for e in pareto_front(_study_with([{"id": "a", "map": 0.5, "ms": 2.0},
                                                                 {"id": "d", "map": 0.9, "ms": 6.0}], budget=None))}
    three = _study_with([{"id": "b", "map": 0.6, "ms": 3.0}, {"id": "c", "map": 0.4, "ms": 3.0, "params": 10}],
                        objectives=("map", "latency", "params"))
    assert {e.arch_id for e in pareto_front(three)} == {"b", "c"}


def test_plot_writes_a_png(tmp_path):
    study = _study_with([{"id": "a", "map": 0.5, "ms": 2.0}, {"id": "d", "map": 0.9, "ms": 6.0}])
    path = plot_front(study, tmp_path / "front.png", html=tmp_path / "front.html")
    assert path.read_bytes()[:8] == PNG
    assert (tmp_path / "front.html").is_file() == (importlib.util.find_spec("plotly") is not None)


def test_export_writes_loadable_model_dirs_and_onnx(shared, searched, tmp_path):
    study, _ = searched
    front = pareto_front(study)
    assert front and all(e.map >= 0 for e in front)
    entries = export_front(study, shared.supernet, tmp_path / "pareto", backend="ort-cpu", threads=1,
                           measure_config=QUICK, bn_batches=1, batch=8)
    assert [e.arch_id for e in entries] == [e.arch_id for e in front]
    doc = json.loads((tmp_path / "pareto" / "front.json").read_text())
    assert doc["study"] == "p" and doc["backend"] == "ort-cpu" and len(doc["entries"]) == len(front)
    assert (tmp_path / "pareto" / "front.png").read_bytes()[:8] == PNG
    import onnxruntime as ort

    for e in entries:
        d = tmp_path / "pareto" / e.arch_id
        det = load_model(d)  # arch.yaml + weights.pt
        assert det.arch == e.architecture() and det.nc == NC and e.path == str(d)
        assert e.measured_ms is not None and e.measured_ms > 0
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert out.shape[0] == 1 and out.shape[2] == 5 + NC
        with torch.no_grad():
            ref = det.eval().fuse()(torch.from_numpy(x))[0].numpy()
        assert np.abs(out - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_export_again_removes_the_models_that_left_the_front(shared, searched, tmp_path):
    study, _ = searched
    out = tmp_path / "pareto"
    entries = export_front(study, shared.supernet, out, backend=None, onnx=False, bn_batches=1, batch=8)
    gone, mine = out / "0123456789", out / "mine"  # an earlier front's model, and a folder the user put there
    for d in (gone, mine):
        d.mkdir()
        (d / "arch.yaml").write_text("x")
    doc = json.loads((out / "front.json").read_text())
    doc["entries"].append({**doc["entries"][0], "arch_id": gone.name})
    (out / "front.json").write_text(json.dumps(doc))
    again = export_front(study, shared.supernet, out, backend=None, onnx=False, bn_batches=1, batch=8)
    assert [e.arch_id for e in again] == [e.arch_id for e in entries]
    assert not gone.exists() and mine.is_dir()
    assert all((out / e.arch_id / "weights.pt").is_file() for e in again)


def test_export_refuses_a_supernet_other_than_the_searched_one(shared, searched, tmp_path):
    study, _ = searched
    changed = tmp_path / "supernet.pt"  # e.g. trained further (--resume) after the search
    changed.write_bytes(Path(shared.supernet).read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="not the supernet the study searched with") as e:
        export_front(study, changed, tmp_path / "front", backend=None, onnx=False)
    assert e.value.field == "supernet" and not (tmp_path / "front").exists()


def test_pareto_cli(shared, searched, tmp_path, capsys):
    study, storage = searched
    assert main(["pareto", "--storage", storage, "--study", "p", "--plot", str(tmp_path / "f.png"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["arch_id"] for e in doc["front"]] == [e.arch_id for e in pareto_front(study)]
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG
    assert main(["pareto", "--storage", storage, "--study", "p", "--export", str(tmp_path / "x"), "--backend", "none",
                 "--bn-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "arch_id" in text and "predicted_ms" in text and "measured_ms" in text
    first = pareto_front(study)[0].arch_id
    assert (tmp_path / "x" / first / "model.onnx").is_file() and load_model(tmp_path / "x" / first).nc == NC
    assert main(["pareto", "--storage", storage, "--study", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    for missing in (f"sqlite:///{tmp_path / 'none.db'}", str(tmp_path / "none.journal")):
        assert main(["pareto", "--storage", missing, "--study", "p"]) == 2
        assert "file not found" in capsys.readouterr().err
    assert not list(tmp_path.glob("none*")), "reading a missing study must not create its storage"
    log = tmp_path / "train.log"  # a .log that is not a journal: one line naming it, and it is left as it was
    log.write_text('{"epoch": 1}\n')
    assert main(["pareto", "--storage", str(log), "--study", "p"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an Optuna journal" in err and str(log) in err
    assert log.read_text() == '{"epoch": 1}\n'
    bare = str(tmp_path / "bare.journal")
    optuna.create_study(storage=open_storage(bare), study_name="bare", directions=["maximize", "minimize"])
    assert main(["pareto", "--storage", bare, "--study", "bare", "--export", str(tmp_path / "y")]) == 2
    assert "--supernet" in capsys.readouterr().err
