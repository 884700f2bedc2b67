"""`detforge run` end to end on a micro config; resume after kill -9; config errors before any work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nas.cli import main

SPACE = Path(__file__).with_name("micro_space.yaml")


def _config(tmp_path: Path, **over) -> Path:
    cfg = {
        "name": "micro", "synthetic": {"train": 16, "val": 8, "imgsz": 64, "classes": 2, "seed": 0},
        "space": str(SPACE), "imgsz": 64, "device": "cpu", "workers": 0,
        "latency": {"backend": "ort-cpu", "threads": 1, "min_runs": 3, "max_time_s": 0.5,
                    "fit_models": 4},
        "supernet": {"epochs": 1, "batch": 8, "n_random": 1},
        "search": {"trials": 3, "budget_ms": 100.0, "bn_batches": 1, "val_batches": 1},
        "finetune": {"epochs": 1, "batch": 8}, "quantize": {"enabled": True, "calib": 4, "method": "minmax"},
        "baselines": {"models": ["yolov7-tiny"], "epochs": 1},
    }
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _stages(out: Path) -> dict:
    try:
        return json.loads((out / "stages.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


ORDER = ["data", "latency", "supernet", "search", "pareto"]


def test_pipeline_runs_and_resumes_after_kills(tmp_path, capsys):
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    done_before: set[str] = set()
    # killed in the latency stage, then (resumed) in the search stage: one run, two kill points
    for after in ("data", "supernet"):
        proc = _run(str(cfg), "--out", str(out), *(["--resume"] if done_before else []))
        deadline = time.time() + 900
        while after not in _stages(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGKILL)  # in the stage after `after`, or just after it
        proc.wait()
        log = proc.stdout.read()
        for name in done_before:
            assert f"[skip] {name}" in log  # finished stages are not redone
        done_before = set(_stages(out))
        assert set(ORDER[:ORDER.index(after) + 1]) <= done_before

    again = _run(str(cfg), "--out", str(out), "--resume")
    log, _ = again.communicate(timeout=900)
    assert again.returncode == 0, log[-3000:]
    for name in done_before:
        assert f"[skip] {name}" in log  # finished stages are not redone
    stages = _stages(out)
    assert {"search", "pareto", "baselines", "report"} <= set(stages)
    table = json.loads((out / "latency" / "ort-cpu-64.json").read_text())
    assert len(table["overhead"]["points"]) == 4  # latency.fit_models
    model_stage = next(k for k in stages if k.startswith("model:"))
    mid = model_stage.split(":", 1)[1]
    assert (out / "models" / mid / "model.onnx").is_file() and (out / "models" / mid / "model.int8.onnx").is_file()
    metrics = json.loads((out / "models" / mid / "metrics.json").read_text())
    assert {"fp32", "int8"} <= set(metrics["verify"]) and metrics["verify"]["int8"]["latency_ms"] > 0
    report = (out / "report.md").read_text()
    assert "yolov7-tiny" in report and "model.int8.onnx" in report and (out / "front.png").is_file()

    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out), "--resume"]) == 0  # in this process: no second start-up
    log = capsys.readouterr().out
    assert "[run ]" not in log and "[skip] report" in log  # nothing left to do


@pytest.mark.parametrize("over, field", [
    ({"serach": {}}, "serach"), ({"imgsz": "64"}, "imgsz"), ({"search": {"budget_ms": -1.0}}, "search.budget_ms"),
    ({"quantize": {"method": "magic"}}, "quantize.method"), ({"supernet": {"attentive": 0}}, "supernet.attentive"),
    ({"supernet": {"attentive": 2}, "search": {"trials": 3}}, "supernet.attentive"),  # no budget to rank draws in
    ({"supernet": {"per_head": True, "per_family": True}}, "supernet.per_family"),
    ({"supernet": {"teacher": "yolov7-tiny"}}, "supernet.teacher"),  # a zoo name: no trained weights
    ({"search": {"bn_batches": 0}}, "search.bn_batches"), ({"search": {"val_batches": 0}}, "search.val_batches"),
    ({"supernet": {"n_random": -1}}, "supernet.n_random"), ({"space": "nosuch"}, "space"),
    ({"space": "default", "imgsz": 352}, "imgsz"),  # the default space has P3-P6 layouts: stride 64
    ({"search": {"storage": "foo.db"}}, "search.storage"), ({"baselines": {"models": ["nosuch"]}}, "baselines.models"),
    ({"latency": {"min_runs": 0}}, "latency.min_runs"), ({"baselines": {"epochs": 0}}, "baselines.epochs"),
    ({"latency": {"fit_models": -1}}, "latency.fit_models"),
    ({"synthetic": {"classes": 0}}, "synthetic.classes"),
    ({"finetune": {"epochs": 0}}, "finetune.epochs"),  # the Trainer would refuse it after the search
    ({"nbs": 0}, "nbs"), ({"distill": {"enabled": True}}, "distill.teacher"),  # no default teacher has weights
    ({"optimizer": "adam"}, "optimizer"), ({"lr0": 0.0}, "lr0"),
    ({"prune": {"enabled": True, "finetune_epochs": 0}}, "prune.finetune_epochs"),  # disabled, 0 is fine
    ({"device": "gpu"}, "device"),  # a RuntimeError traceback after the table build, before
    ({"latency": {"table": "no/such/table.json"}}, "latency.table"),
    ({"search": {"mode": "oneshot"}}, "search.mode"), ({"search": {"scratch_epochs": 0}}, "search.scratch_epochs"),
    ({"search": {"pruner": "asha"}}, "search.pruner"), ({"search": {"sampler": "cmaes"}}, "search.sampler"),
])
def test_bad_config_fails_before_any_work(over, field, tmp_path, capsys):
    cfg = _config(tmp_path, **over)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and str(cfg) in err
    assert not out.exists()


def test_a_table_of_another_size_is_refused_before_any_work(tmp_path, capsys):
    from latency_tables import LatencyTable
    from latency_tables.backends import get_backend

    be = get_backend("ort-cpu", threads=1)
    table = LatencyTable(fingerprint=be.fingerprint(1), backend=be.name, imgsz=128, batch=1, precision="fp32",
                         threads=1, fused=True).save(tmp_path / "t128.json")
    cfg = _config(tmp_path, latency={"table": str(table)})  # the run is at 64 px
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latency.table" in err and "128" in err and not out.exists()


def test_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stages.json").write_text("{}")
    assert main(["run", str(_config(tmp_path)), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_dry_run_prints_plan(tmp_path, capsys):
    assert main(["run", str(_config(tmp_path)), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in plan["stages"]][:4] == ["data", "latency", "supernet", "search"]
    assert plan["stages"][-1]["stage"] == "total" and plan["stages"][-1]["est_s"] > 0


def test_the_plan_times_a_real_training_step_and_scales_it_by_the_work(tmp_path, monkeypatch):
    from nas import plan as planning
    from nas.pipeline_config import PipelineConfig
    from search_spaces import Detector
    from search_spaces.space import load_space

    det = Detector(load_space(str(SPACE)).largest())
    s = planning.train_seconds_per_image(det, 64)
    assert s > 0 and all(p.grad is not None for p in det.parameters() if p.requires_grad)  # it trained: loss, backward
    monkeypatch.setattr(planning, "train_seconds_per_image", lambda det, imgsz: 1.0)

    def rows(**over) -> dict[str, float]:
        return {r["stage"]: r["est_s"] for r in planning.plan(PipelineConfig.from_yaml(_config(tmp_path, **over)))}

    one, two = rows(supernet={"epochs": 1}), rows(supernet={"epochs": 2})
    assert two["supernet"] == pytest.approx(2 * one["supernet"], rel=0.02) and one["supernet"] > 0
    scratch = {"trials": 3, "budget_ms": 100.0, "mode": "scratch", "scratch_epochs": 1}
    three, six = rows(search=scratch), rows(search={**scratch, "trials": 6})
    assert "supernet" not in three and six["search"] == pytest.approx(2 * three["search"], rel=0.02)
    # 16 training images and 8 validation images at 1 s a training image (a third of that to validate)
    assert three["search"] == pytest.approx(3 * (16 + 8 / 3), abs=0.1)


def test_supernet_stage_hands_the_configured_teacher_to_the_trainer(tmp_path, monkeypatch):
    import nas.supernet_train
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig
    from search_spaces import Detector
    from search_spaces.loading import save_model
    from search_spaces.space import load_space

    trained = Detector(load_space(str(SPACE)).with_nc(2).smallest())
    teacher_dir = save_model(trained, tmp_path / "teacher")
    cfg = PipelineConfig.from_yaml(_config(tmp_path, supernet={"epochs": 1, "teacher": str(teacher_dir)}))
    seen = {}

    class Recorder:  # stands in for SupernetTrainer: what the stage would train with
        def __init__(self, cfg, **kw):
            seen.update(kw)

        def train(self):
            return type("Result", (), {"best_map": 0.0})()

        def anchor_fit_record(self):
            return None

    monkeypatch.setattr(nas.supernet_train, "SupernetTrainer", Recorder)
    stages.supernet(Pipeline(cfg, tmp_path / "run"), {"yaml": None, "nc": 2}, {"path": None}, None)
    teacher = seen["teacher"]
    assert isinstance(teacher, Detector) and teacher.arch.name == trained.arch.name
    saved = torch.load(teacher_dir / "weights.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())  # its trained weights, loaded


def test_a_stage_resumes_only_an_interrupted_attempt_with_the_same_inputs(tmp_path):
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    cfg = PipelineConfig.from_yaml(_config(tmp_path))
    out = tmp_path / "run"
    ckpt = out / "last.pt"
    seen: list[tuple[bool, bool, str]] = []

    def attempt(p: Pipeline, kill: bool = False):
        def fn():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.touch()  # what a trainer leaves behind, killed or finished
            seen.append((p.resuming, p.resume_from(ckpt), p.attempt_id()))
            if kill:
                raise KeyboardInterrupt
            return {"files": []}
        return fn

    p = Pipeline.open(cfg, out)
    with pytest.raises(KeyboardInterrupt):  # killed mid-stage
        p.stage("train", {"epochs": 1}, attempt(p, kill=True))
    p = Pipeline.open(cfg, out, resume=True)
    p.stage("train", {"epochs": 1}, attempt(p))  # the same inputs: continues the killed attempt
    p.stage("train", {"epochs": 2}, attempt(p))  # other inputs after a finished run: its checkpoint is stale
    p.stage("train", {"epochs": 2}, attempt(p))  # finished with these inputs: skipped
    assert [s[:2] for s in seen] == [(False, False), (True, True), (False, False)]
    assert seen[0][2] == seen[1][2] != seen[2][2]  # a new study (say) for new inputs, the same one to resume


def test_supernet_stage_resumes_its_checkpoint_only_when_the_pipeline_says_so(tmp_path, monkeypatch):
    import nas.supernet_train
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    cfg = PipelineConfig.from_yaml(_config(tmp_path))
    resumed = []

    class Recorder:
        def __init__(self, cfg, **kw):
            resumed.append(cfg.resume)

        def train(self):
            return type("Result", (), {"best_map": 0.0})()

        def anchor_fit_record(self):
            return None

    monkeypatch.setattr(nas.supernet_train, "SupernetTrainer", Recorder)
    p = Pipeline(cfg, tmp_path / "run")
    (p.out / "supernet").mkdir(parents=True)
    (p.out / "supernet" / "last.pt").touch()  # left by an earlier, finished run with other inputs
    for p.resuming in (False, True):
        stages.supernet(p, {"yaml": None, "nc": 2}, {"path": None}, None)
    assert resumed == [False, True]


def test_changing_imgsz_or_seed_reruns_the_baselines_too(tmp_path, monkeypatch):
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    ran: list[str] = []

    def fake(name, result):
        def fn(*args, **kw):
            ran.append(name)
            return result
        return fn

    monkeypatch.setattr(stages, "data", fake("data", {"yaml": "d.yaml", "nc": 2, "files": []}))
    monkeypatch.setattr(stages, "latency_table", fake("latency", {"path": "t.json", "files": []}))
    monkeypatch.setattr(stages, "check_budget", lambda p, t: 100.0)
    monkeypatch.setattr(stages, "supernet", fake("supernet", {"weights": "s.pt", "files": []}))
    monkeypatch.setattr(stages, "search", fake("search", {"files": []}))
    monkeypatch.setattr(stages, "pareto", fake("pareto", {"front": [], "files": []}))
    monkeypatch.setattr(stages, "baselines", fake("baselines", {"files": []}))
    monkeypatch.setattr(stages, "report", fake("report", {"files": []}))
    out = tmp_path / "run"
    for over in ({}, {"imgsz": 96}, {"seed": 3}):
        ran.clear()
        Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, **over)), out, resume=True).run()
        if over:
            assert "baselines" in ran, over  # trained and timed at the new size or seed, like the searched models


def test_the_report_depends_on_this_runs_stages_not_an_earlier_configs(tmp_path, monkeypatch):
    from nas import stages
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig

    reports = []
    fakes = {"data": lambda p: {"yaml": None, "nc": 2}, "latency_table": lambda p, d: {"path": None},
             "check_budget": lambda p, t: None, "supernet": lambda *a: {}, "search": lambda *a: {},
             "pareto": lambda *a: _front("a"), "finetune": lambda *a: {"step": "finetune"},
             "deploy": lambda *a: {}, "baselines": lambda *a: {},
             "report": lambda *a: reports.append(1) or {}}
    for name, fn in fakes.items():
        monkeypatch.setattr(stages, name, fn)
    cfg = PipelineConfig.from_yaml(_config(tmp_path))
    Pipeline.open(cfg, tmp_path / "run").run()
    p = Pipeline.open(cfg, tmp_path / "run", resume=True)
    p.records["model:zzz"] = StageRecord("model:zzz", "0" * 16, {}, 1.0)  # a model an earlier front chose
    p.run()
    assert reports == [1]  # nothing this run depends on changed: the report is not written again


def _front(*ids: str) -> dict:
    """A `pareto` stage's outputs: front rows in the order given, the first the most accurate and the slowest."""
    return {"front": [{"arch_id": a, "map": 0.5 - 0.1 * i, "predicted_ms": 9.0 - i} for i, a in enumerate(ids)]}


TWO = {"k": 2}  # the selection that takes both of `_fake_stages`' front models


def _fake_stages(monkeypatch, ran: list[str]) -> None:
    """Every stage of `detforge run` replaced by a recorder of its name (a front of two; `select: TWO` takes both)."""
    from nas import stages

    results = {"data": {"yaml": "d.yaml", "nc": 2}, "latency_table": {"path": "t.json"},
               "supernet": {"weights": "s.pt"}, "pareto": _front("a", "b")}
    for name in ("data", "latency_table", "supernet", "search", "pareto", "finetune", "prune", "distill", "deploy",
                 "baselines", "report"):
        result = results.get(name, {"step": name, "model": "m"})
        monkeypatch.setattr(stages, name, lambda *a, name=name, result=result: ran.append(name) or result)
    monkeypatch.setattr(stages, "check_budget", lambda p, t: 100.0)


@pytest.mark.parametrize("change, rerun", [
    ({"quantize": {"enabled": True, "calib": 8, "method": "minmax"}}, ["deploy"]),
    ({"latency": {"backend": "ort-cpu", "threads": 2, "min_runs": 3, "max_time_s": 0.5, "fit_models": 4}},
     ["latency_table", "supernet", "search", "pareto", "finetune", "prune", "distill", "deploy", "baselines"]),
    ({"distill": {"enabled": True, "epochs": 2}}, ["distill", "deploy"]),
    ({"prune": {"enabled": True, "macs": 0.5, "finetune_epochs": 1}}, ["prune", "distill", "deploy"]),
    ({"finetune": {"epochs": 2, "batch": 8}}, ["finetune", "prune", "distill", "deploy", "baselines"]),  # epoch budget
    ({"nbs": 16}, ["supernet", "search", "pareto", "finetune", "prune", "distill", "deploy", "baselines"]),
    ({"optimizer": "adamw", "lr0": 0.002},
     ["supernet", "search", "pareto", "finetune", "prune", "distill", "deploy", "baselines"]),
    # scratch mode: no supernet; the baselines' epochs follow the front models' (3 scratch + 1 finetune, not 1 + 1)
    ({"search": {"trials": 3, "budget_ms": 100.0, "mode": "scratch"}},
     ["search", "pareto", "finetune", "prune", "distill", "deploy", "baselines"]),
])
def test_a_changed_compression_step_reruns_only_itself_and_the_steps_after_it(change, rerun, tmp_path, monkeypatch):
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig
    from search_spaces import Detector
    from search_spaces.loading import save_model
    from search_spaces.space import load_space

    ran: list[str] = []
    _fake_stages(monkeypatch, ran)
    teacher = str(save_model(Detector(load_space(str(SPACE)).with_nc(2).largest()), tmp_path / "teacher"))
    steps = {"prune": {"enabled": True, "macs": 0.7, "finetune_epochs": 1},
             "distill": {"enabled": True, "epochs": 1, "teacher": teacher}}
    if "distill" in change:
        change["distill"]["teacher"] = teacher
    Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, select=TWO, **steps)), tmp_path / "run").run()
    ran.clear()
    Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, select=TWO, **{**steps, **change})), tmp_path / "run",
                  resume=True).run()
    per_model = [s for s in rerun if s in ("finetune", "prune", "distill", "deploy")]
    before = [s for s in rerun if s in ("latency_table", "supernet", "search", "pareto")]
    after = [s for s in rerun if s == "baselines"] + ["report"]
    assert ran == before + per_model * 2 + after  # both models' steps from the changed one on; nothing before it


def _finished_fake_run(tmp_path: Path, monkeypatch, ran: list[str]):
    """A finished run of `_fake_stages` choosing both front models: its config and the Pipeline."""
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    _fake_stages(monkeypatch, ran)
    cfg = PipelineConfig.from_yaml(_config(tmp_path, select=TWO))
    p = Pipeline.open(cfg, tmp_path / "run")
    p.run()
    return cfg, p


@pytest.mark.parametrize("select, models", [
    ({"k": 1}, ["a"]),  # one of the two already trained: nothing trains again
    ({"budgets_ms": [8.5]}, ["b"]),  # the best within 8.5 ms is b (a is predicted 9 ms)
    ({"k": 3}, ["a", "b", "c"]),  # only c is new
])
def test_a_changed_selection_trains_only_the_models_not_trained_yet(select, models, tmp_path, monkeypatch):
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    ran: list[str] = []
    _fake_stages(monkeypatch, ran)
    monkeypatch.setattr(stages, "pareto", lambda *a: ran.append("pareto") or _front("a", "b", "c"))
    Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, select={"k": 2})), tmp_path / "run").run()
    ran.clear()
    p = Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, select=select)), tmp_path / "run", resume=True)
    p.run()
    new = [m for m in models if m == "c"]
    assert ran == ["finetune", "deploy"] * len(new) + ["report"]  # the front is not exported again
    assert [k.split(":", 1)[1] for k in p.stage_names(models) if k.startswith("model:")] == models
    assert all(f"model:{m}" in p.records for m in models)


def test_a_run_recorded_when_the_front_digested_the_selection_keeps_its_models(tmp_path, monkeypatch):
    from nas.pipeline import StageRecord, _digest

    ran: list[str] = []
    cfg, p = _finished_fake_run(tmp_path, monkeypatch, ran)
    # as such a run recorded its front: digested with `select`, the finetunes chained to that digest
    legacy = _digest({"search": p.digest("search"), "select": vars(cfg.select)})
    p.records["pareto"] = StageRecord("pareto", legacy, {**p.records["pareto"].outputs, "chosen": ["a", "b"]}, 1.0)
    for mid in ("a", "b"):
        del p.records[f"finetune:{mid}"]
        p.stage(f"finetune:{mid}", {"pareto": legacy, "finetune": vars(cfg.finetune)}, lambda: {"step": "finetune"})
    ran.clear()
    p.run()
    assert ran == ["deploy", "deploy", "report"]  # the finetunes are kept (their deploys digest the new records)


def test_choose_takes_the_k_most_accurate_or_the_best_within_each_budget():
    from nas.stages import choose

    front = [{"arch_id": "fast", "map": 0.1, "predicted_ms": 2.0}, {"arch_id": "mid", "map": 0.3, "predicted_ms": 4.0},
             {"arch_id": "slow", "map": 0.4, "predicted_ms": 8.0}]
    assert choose(front, 2, []) == ["slow", "mid"]
    assert choose(front, 1, [5.0, 4.0, 1.0, 9.0]) == ["mid", "slow"]  # one per budget met, duplicates once


def test_the_nominal_batch_and_the_optimizer_reach_every_training(tmp_path, monkeypatch):
    import nas.supernet_train
    import trainer.trainer
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    seen: list[tuple[str, int, str, float]] = []

    class Recorder:  # stands in for the trainers: the configuration each training gets
        def __init__(self, cfg, **kw):
            seen.append((type(self).__name__, cfg.nbs, cfg.optimizer, cfg.lr0))

        def train(self):
            raise KeyboardInterrupt  # what it would train is all this test needs

    monkeypatch.setattr(nas.supernet_train, "SupernetTrainer", type("SupernetTrainer", (Recorder,), {}))
    monkeypatch.setattr(trainer.trainer, "Trainer", type("Trainer", (Recorder,), {}))
    p = Pipeline(PipelineConfig.from_yaml(_config(tmp_path, nbs=16, optimizer="adamw", lr0=0.002)), tmp_path / "run")
    monkeypatch.setattr(stages, "load_model", lambda *a, **kw: None)
    for call in (lambda: stages.supernet(p, {"yaml": None, "nc": 2}, {"path": None}, None),
                 lambda: stages.finetune(p, {"yaml": None, "nc": 2}, "a"),
                 lambda: stages.baselines(p, {"yaml": None, "nc": 2}, {})):
        with pytest.raises(KeyboardInterrupt):
            call()
    assert seen == [(name, 16, "adamw", 0.002) for name in ("SupernetTrainer", "Trainer", "Trainer")]


def test_a_run_recorded_before_the_steps_were_split_keeps_its_models(tmp_path, monkeypatch):
    from nas.pipeline import StageRecord, _digest

    ran: list[str] = []
    cfg, p = _finished_fake_run(tmp_path, monkeypatch, ran)
    for mid in ("a", "b"):  # as the single model stage recorded it
        for step in ("finetune", "model"):
            del p.records[f"{step}:{mid}"]
        legacy = {"pareto": p.digest("pareto"), "finetune": vars(cfg.finetune), "prune": vars(cfg.prune),
                  "distill": {**vars(cfg.distill), "teacher": "yolov7-e6"}, "quantize": vars(cfg.quantize)}
        p.records[f"model:{mid}"] = StageRecord(f"model:{mid}", _digest(legacy), {"steps": []}, 1.0)
    ran.clear()
    p.run()
    assert ran == ["report"]  # the report depends on other stage records now; no model is trained again


def test_a_dataset_edited_in_place_reruns_the_stages_that_read_it(tmp_path, monkeypatch):
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig
    from trainer.synthetic import generate

    data = generate(tmp_path / "data", train=4, val=2, imgsz=64, classes=2, seed=0, progress=False)
    ran: list[str] = []
    _fake_stages(monkeypatch, ran)
    cfg = PipelineConfig.from_yaml(_config(tmp_path, data=str(data)))
    Pipeline.open(cfg, tmp_path / "run").run()
    ran.clear()
    Pipeline.open(cfg, tmp_path / "run", resume=True).run()
    assert ran == []  # nothing changed
    label = min((tmp_path / "data" / "labels" / "train").glob("*.txt"))
    label.write_text(label.read_text() + "1 0.5 0.5 0.2 0.2\n")  # a label fixed by hand, same path
    Pipeline.open(cfg, tmp_path / "run", resume=True).run()
    assert ran[:3] == ["data", "supernet", "search"]  # the table depends on the class count only
    # a run recorded before data files were digested (here: as if without them) is not redone on resume
    with monkeypatch.context() as m:
        m.setattr(Pipeline, "run_id", lambda self: "")
        Pipeline.open(cfg, tmp_path / "legacy").run()
    ran.clear()
    Pipeline.open(cfg, tmp_path / "legacy", resume=True).run()
    assert ran == []


def test_a_tensorrt_table_on_a_machine_without_it_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    if torch.cuda.is_available():
        pytest.skip("this machine may run TensorRT: the stage would measure, not fail")
    cfg = _config(tmp_path, latency={"backend": "tensorrt", "threads": 1, "min_runs": 3, "max_time_s": 0.5})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()  # the data stage's progress bar, then the error
    # the backend is made as a table records it (TensorRT takes no thread count): no TypeError traceback
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("detforge: error: backend:") and "TensorRT" in last, err


def test_the_report_says_what_was_measured_where_and_times_this_runs_stages(tmp_path):
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig
    from nas.report import write_report

    p = Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path)), tmp_path / "run")
    for name in ("data", "latency", "model:aaa", "model:zzz"):  # zzz: a model an earlier config chose
        p.records[name] = StageRecord(name, "0" * 16, {}, 1.5)
    p.records["supernet"] = StageRecord("supernet", "0" * 16, {"autoanchor": {
        "p3-p6": {"bpr": 0.887, "new_bpr": 1.0, "replaced": True},
        "p3-p5": {"bpr": 0.991, "new_bpr": None, "replaced": False}}}, 1.5)
    (tmp_path / "t.json").write_text(json.dumps({"device": {"gpu_name": "H100"}}))
    front = {"front": [{"arch_id": "aaa", "map": 0.2, "map50": 0.4, "predicted_ms": 3.0, "measured_ms": 9.0}]}
    models = {"aaa": {"steps": [{"step": "finetune", "map": 0.25, "params": 1000, "gflops": 0.1}],
                      "verify": {"fp32": {"map": 0.25, "latency_ms": 9.0}}, "predicted_ms": 3.0}}
    base = {"yolov7-tiny": {"epochs": 2, "map": 0.1, "map50": 0.2, "latency_ms": 12.0,
                            "autoanchor": {"bpr": 0.957, "new_bpr": 1.0, "replaced": True}}}
    text = write_report(p, {"yaml": "d.yaml", "nc": 2}, {"path": str(tmp_path / "t.json"), "backend": "tensorrt"},
                        front, models, base, 4.0).read_text()
    assert ("AutoAnchor refit the anchors of yolov7-tiny (best possible recall 0.957 -> 1.000), the supernet's "
            "p3-p6 heads (best possible recall 0.887 -> 1.000); the searched models keep") in text
    assert "p3-p5" not in text
    # the CPU measurement (9 ms) says nothing about a TensorRT budget of 4 ms: the table's 3 ms does
    assert "Meets the budget: yes (by the table's prediction" in text and "ort-cpu" in text
    assert "1 supernet + 1 finetune epochs" in text  # the budget the chosen models had, not "the same"
    times = text.split("## Stage times")[1]
    assert "| model:aaa | 1.5 |" in times and "model:zzz" not in times
    # an ort-cpu table of this machine at the run's threads: the measurements (9 ms > 4 ms) decide...
    from dataclasses import asdict, replace

    from latency_tables.fingerprint import DeviceFingerprint

    here = DeviceFingerprint.collect(backend="ort-cpu", threads=1, precision="fp32")
    for device, verdict in ((here, "Meets the budget: no."), (replace(here, cpu_model="Raspberry Pi 5"),
                                                               "Meets the budget: yes (by the table's prediction")):
        (tmp_path / "t.json").write_text(json.dumps({"device": asdict(device)}))
        text = write_report(p, {"yaml": "d.yaml", "nc": 2}, {"path": str(tmp_path / "t.json"), "backend": "ort-cpu"},
                            front, models, base, 4.0).read_text()
        assert verdict in text, device  # ...but a probe table of another CPU is judged by its prediction


def test_a_table_built_at_the_spaces_own_nc_predicts_the_budget_check_for_the_datasets_classes(tmp_path):
    from latency_tables import LatencyTable
    from nas import stages
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig
    from search_spaces.space import load_space

    from ..latency_table import SizeBackend

    space = load_space(str(SPACE))  # nc 80, as `detforge latency build --space` measures it
    path = tmp_path / "t80.json"
    LatencyTable.build(space, SizeBackend(), 64, path, progress=False, fit_models=0)
    p = Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, latency={"table": str(path)})), tmp_path / "run")
    p.records["data"] = StageRecord("data", "0" * 16, {"nc": 2}, 0.0)  # the dataset has 2 classes
    with pytest.warns(UserWarning, match="nc=80"):  # heads predicted at the table's nc, as the search does
        assert stages.check_budget(p, {"path": str(path)}) == 100.0


def test_a_latency_stage_with_other_settings_measures_a_new_table(tmp_path):
    from latency_tables import LatencyTable
    from latency_tables.backends import get_backend
    from nas import stages
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig

    cfg = _config(tmp_path, latency={"backend": "ort-cpu", "threads": 1, "min_runs": 1, "max_time_s": 0.2,
                                     "fit_models": 0})
    p = Pipeline.open(PipelineConfig.from_yaml(cfg), tmp_path / "run")
    old = p.out / "latency" / "ort-cpu-64.json"  # an earlier config's table, measured with 2 threads
    old.parent.mkdir(parents=True)
    be = get_backend("ort-cpu", threads=2)
    LatencyTable(fingerprint=be.fingerprint(1), backend=be.name, imgsz=64, batch=1, precision="fp32", threads=2,
                 fused=True).save(old)
    p.records["data"] = StageRecord("data", "0" * 16, {"nc": 2}, 0.0)
    out = stages.latency_table(p, {"nc": 2})  # the README's promise: changed inputs start afresh, no error
    table = LatencyTable.load(out["path"])
    assert table.threads == 1 and len(table) == out["entries"] > 0


def test_a_table_rebuilt_in_place_reruns_the_stages_that_read_it(tmp_path, monkeypatch):
    from latency_tables import LatencyTable
    from latency_tables.backends import get_backend
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    ran: list[str] = []
    for name in ("data", "latency_table", "supernet", "search", "pareto", "baselines", "report"):
        result = {"yaml": "d.yaml", "nc": 2} if name == "data" else {"front": []} if name == "pareto" else {}
        monkeypatch.setattr(stages, name, lambda *a, name=name, result=result: ran.append(name) or result)
    monkeypatch.setattr(stages, "check_budget", lambda p, t: 100.0)
    be = get_backend("ort-cpu", threads=1)
    table = LatencyTable(fingerprint=be.fingerprint(1), backend=be.name, imgsz=64, batch=1, precision="fp32",
                         threads=1, fused=True)
    path = table.save(tmp_path / "t.json")
    cfg = PipelineConfig.from_yaml(_config(tmp_path, latency={"table": str(path)}))
    Pipeline.open(cfg, tmp_path / "run").run()
    ran.clear()
    Pipeline.open(cfg, tmp_path / "run", resume=True).run()
    assert ran == []  # nothing changed
    table.info["rebuilt"] = True  # the same path, new content
    table.save(path)
    Pipeline.open(cfg, tmp_path / "run", resume=True).run()
    assert "latency_table" in ran and "supernet" in ran and "data" not in ran


def test_runs_sharing_a_storage_search_their_own_studies(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import nas.search
    from nas import stages
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    studies: list[str] = []
    monkeypatch.setattr(nas.search, "run_search",
                        lambda cfg: studies.append(cfg.study) or SimpleNamespace(study_name=cfg.study, trials=[]))
    for name in ("data", "latency_table", "supernet", "pareto", "baselines", "report"):
        result = {"yaml": "d.yaml", "nc": 2} if name == "data" else {"front": []} if name == "pareto" else \
            {"path": "t.json"} if name == "latency_table" else {"weights": "s.pt"} if name == "supernet" else {}
        monkeypatch.setattr(stages, name, lambda *a, result=result: result)
    monkeypatch.setattr(stages, "check_budget", lambda p, t: 100.0)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = PipelineConfig.from_yaml(_config(tmp_path, search={"trials": 3, "budget_ms": 100.0, "storage": storage}))
    Pipeline.open(cfg, tmp_path / "a").run()
    Pipeline.open(cfg, tmp_path / "b").run()
    shutil.rmtree(tmp_path / "a")  # and run again there: a new supernet would not match the old study's
    Pipeline.open(cfg, tmp_path / "a").run()
    assert len(set(studies)) == 3 and all(s.startswith("micro-") for s in studies)
    (tmp_path / "b" / "run.id").unlink()  # a run begun before run ids: its study name stays NAME-<inputs id>
    more = PipelineConfig.from_yaml(_config(tmp_path, search={"trials": 4, "budget_ms": 100.0, "storage": storage}))
    Pipeline.open(more, tmp_path / "b", resume=True).run()
    assert studies[-1].count("-") == 1 and not (tmp_path / "b" / "run.id").exists()


def test_a_cuda_config_plans_anywhere_and_runs_only_where_cuda_is(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the run would start")
    cfg = _config(tmp_path, device="cuda")
    assert main(["run", str(cfg), "--dry-run"]) == 0  # a plan for the GPU machine, made on a laptop
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err
    assert not (out / "stages.json").exists()  # before the data stage, not after the latency table


def test_the_supernets_autoanchor_setting_reaches_it_and_its_default_keeps_recorded_digests(tmp_path, monkeypatch):
    import nas.supernet_train
    from nas import stages
    from nas.pipeline import Pipeline, _added, _recorded_keys
    from nas.pipeline_config import PipelineConfig

    seen: list[bool] = []

    class Recorder:
        def __init__(self, cfg, **kw):
            seen.append(cfg.autoanchor)

        def train(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(nas.supernet_train, "SupernetTrainer", Recorder)
    for value in (True, False):
        cfg = PipelineConfig.from_yaml(_config(tmp_path, supernet={"epochs": 1, "autoanchor": value}))
        with pytest.raises(KeyboardInterrupt):
            stages.supernet(Pipeline(cfg, tmp_path / f"run{value}"), {"yaml": None, "nc": 2}, {"path": None}, None)
        # the supernet stage's inputs: the setting appears only when it is not the default (runs recorded
        # before it existed keep their digest)
        inputs = {"supernet": _recorded_keys(cfg.supernet, "autoanchor"), **_added(cfg.supernet, "autoanchor")}
        assert "autoanchor" not in inputs["supernet"] and inputs.get("autoanchor", True) is value
    assert seen == [True, False]


def test_scratch_mode_searches_without_a_supernet_and_trains_candidates_as_the_run_trains(tmp_path, capsys):
    import optuna

    search = {"trials": 2, "budget_ms": 100.0, "val_batches": 1, "mode": "scratch", "scratch_epochs": 1}
    quick = {"backend": "ort-cpu", "threads": 1, "min_runs": 1, "max_time_s": 0.1, "fit_models": 0}  # not the subject
    cfg = _config(tmp_path, search=search, optimizer="adamw", lr0=0.002, nbs=8, baselines={"models": ["yolov7-tiny"]},
                  supernet={"epochs": 3, "batch": 8}, finetune={"epochs": 1, "batch": 4}, latency=quick)  # supernet: unused
    assert main(["run", str(cfg), "--dry-run", "--json"]) == 0
    plan = [s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert plan[:4] == ["data", "latency", "search", "pareto"]  # no supernet to train
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    stages = _stages(out)
    assert "supernet" not in stages and not (out / "supernet").exists()
    storage = f"sqlite:///{out / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    settings = optuna.load_study(study_name=name, storage=storage).user_attrs["detforge.search"]
    # the candidates train with the run's optimizer, nominal batch and finetune batch
    assert settings["mode"] == "scratch" and settings["supernet"] is None and settings["scratch_epochs"] == 1
    assert (settings["optimizer"], settings["nbs"], settings["lr0"], settings["batch"]) == ("adamw", 8, 0.002, 4)
    front = json.loads((out / "pareto" / "front.json").read_text())["entries"]
    assert front and all((out / "pareto" / e["arch_id"] / "weights.pt").is_file() for e in front)
    chosen = next(k for k in stages if k.startswith("finetune:")).split(":", 1)[1]
    assert (out / "models" / chosen / "model.onnx").is_file()
    base = json.loads((out / "stages.json").read_text())["baselines"]["outputs"]["yolov7-tiny"]
    assert base["epochs"] == 2  # as many as the front model had: 1 in the search + 1 finetune
    assert "1 search (from scratch) + 1 finetune epochs" in (out / "report.md").read_text()


def test_the_search_stage_digests_what_its_mode_reads_and_recorded_runs_keep_theirs(tmp_path):
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig

    search = {"trials": 3, "budget_ms": 100.0, "sampler": "nsga2", "storage": None, "bn_batches": 1,
              "val_batches": 1}
    # the sampler explicit or the default 'auto'; scratch-mode settings, unused here, change nothing
    for given in (search, {k: v for k, v in search.items() if k != "sampler"},
                  {**search, "scratch_epochs": 5, "pruner": "hyperband"}):
        p = Pipeline(PipelineConfig.from_yaml(_config(tmp_path, search=given)), tmp_path / "run")
        p.records.update({n: StageRecord(n, n * 2, {}, 1.0) for n in ("data", "latency", "supernet")})
        # what runs recorded before scratch mode digested: the section as it was, the budget and the upstream stages
        assert p._search_inputs(100.0) == {"search": search, "budget": 100.0, "supernet": "supernetsupernet",
                                           "latency": "latencylatency"}

    def scratch_inputs(search_over: dict | None = None, **over) -> dict:
        cfg = _config(tmp_path, search={**search, "mode": "scratch", **(search_over or {})}, **over)
        p = Pipeline(PipelineConfig.from_yaml(cfg), tmp_path / "run")
        p.records.update({n: StageRecord(n, n * 2, {}, 1.0) for n in ("data", "latency")})
        return p._search_inputs(100.0)

    inputs = scratch_inputs()  # a scratch study trains: it digests what its trainings read, not a supernet
    assert "supernet" not in inputs and inputs["data"] == "datadata" and inputs["imgsz"] == 64
    # what the trials learn from changes the study; BatchNorm batches and the supernet section do not
    for changed in (scratch_inputs(nbs=8), scratch_inputs(optimizer="adamw"), scratch_inputs({"scratch_epochs": 1}),
                    scratch_inputs(finetune={"epochs": 1, "batch": 4}), scratch_inputs(seed=1)):
        assert changed != inputs
    unused = {"epochs": 5, "attentive": 2, "scope": "space"}
    for same in (scratch_inputs({"bn_batches": 4}), scratch_inputs(supernet=unused)):
        assert same == inputs  # attentive without a budget's scope is refused in supernet mode only


def test_a_scratch_runs_report_names_its_training_not_an_earlier_supernet(tmp_path):
    from nas.pipeline import Pipeline, StageRecord
    from nas.pipeline_config import PipelineConfig
    from nas.report import write_report

    search = {"trials": 3, "budget_ms": 100.0, "mode": "scratch", "scratch_epochs": 2}
    p = Pipeline.open(PipelineConfig.from_yaml(_config(tmp_path, search=search)), tmp_path / "run")
    for name in ("data", "latency"):
        p.records[name] = StageRecord(name, "0" * 16, {}, 1.5)
    p.records["supernet"] = StageRecord("supernet", "0" * 16, {"autoanchor": {  # from the run in supernet mode
        "p3-p6": {"bpr": 0.887, "new_bpr": 1.0, "replaced": True}}}, 1.5)
    (tmp_path / "t.json").write_text(json.dumps({"device": {}}))
    front = {"front": [{"arch_id": "aaa", "map": 0.2, "map50": 0.4, "predicted_ms": 3.0, "measured_ms": 9.0}]}
    base = {"yolov7-tiny": {"epochs": 3, "map": 0.1, "map50": 0.2, "latency_ms": 12.0}}
    text = write_report(p, {"yaml": "d.yaml", "nc": 2}, {"path": str(tmp_path / "t.json"), "backend": "ort-cpu"},
                        front, {}, base, 4.0).read_text()
    assert "2 search (from scratch) + 1 finetune epochs" in text and "supernet" not in text


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_are_valid(path):
    from nas.pipeline_config import PipelineConfig, _build

    _build(PipelineConfig, yaml.safe_load(path.read_text()), str(path), "")  # keys and types, in every one
    if path.name.startswith("demo"):  # everything it names exists here: the whole check
        assert PipelineConfig.from_yaml(path).name == path.stem


def test_a_killed_attempt_resumes_only_its_own_checkpoints_and_never_reuses_the_record_it_replaced(tmp_path):
    from nas.pipeline import Pipeline
    from nas.pipeline_config import PipelineConfig

    cfg = PipelineConfig.from_yaml(_config(tmp_path))
    ck = tmp_path / "run" / "stage" / "last.pt"

    def attempt(p, inputs, write=None, kill=True):
        """Run stage 's' with `inputs`; it records what resume_from said, writes `write` into its checkpoint, and
        is killed (KeyboardInterrupt) unless told to finish."""
        said = []

        def fn():
            said.append(p.resume_from(ck))
            if write is not None:
                ck.parent.mkdir(parents=True, exist_ok=True)
                ck.write_text(write)
            if kill:
                raise KeyboardInterrupt
            return {}

        if kill:
            with pytest.raises(KeyboardInterrupt):
                p.stage("s", inputs, fn)
        else:
            p.stage("s", inputs, fn)
        return said

    p = Pipeline.open(cfg, tmp_path / "run")
    assert attempt(p, {"epochs": 3}, write="D1 finished", kill=False) == [False]
    # the config changes; the new attempt is killed before its first checkpoint: D1's last.pt is still there
    assert attempt(Pipeline.open(cfg, tmp_path / "run", resume=True), {"epochs": 5}) == [False]
    # --resume: the same inputs, but that checkpoint is the earlier run's, not this attempt's: not resumed
    assert attempt(Pipeline.open(cfg, tmp_path / "run", resume=True), {"epochs": 5}, write="D2 epoch 1") == [False]
    # killed after its first checkpoint: the next --resume continues it
    assert attempt(Pipeline.open(cfg, tmp_path / "run", resume=True), {"epochs": 5}) == [True]
    # back to the first config: the files now hold the killed attempt's work, so D1 runs again (no "[skip]")
    assert attempt(Pipeline.open(cfg, tmp_path / "run", resume=True), {"epochs": 3}, kill=False) == [False]
