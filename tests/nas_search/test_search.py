"""The Optuna search: attributes and constraints, failures, shared studies over processes, kill + resume, CLI."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.search import SearchConfig, Searcher, _PruneReport, load_study, open_storage, prepare, run_search
from search_spaces.errors import ConfigError, DetforgeError

from . import IMGSZ, ROOT, env, search_args, spawn

BUDGET = 4.0


def _cfg(shared, out: Path, **kw) -> SearchConfig:
    """A small search; the journal storage keeps tests fast (an append per suggest instead of an SQLite commit)."""
    base = {"storage": str(out / "study.journal"), "supernet": str(shared.supernet), "table": str(shared.table), "data": str(shared.data),
            "budget_ms": BUDGET, "trials": 4, "out": str(out), "study": "s", "bn_batches": 1, "batch": 8,
            "heartbeat_s": 1, "grace_s": 30}
    return SearchConfig(**{**base, **kw})


def _check_exactly(study: optuna.Study, n: int) -> None:
    """N COMPLETE trials with distinct numbers; anything else is a surplus claim or a retried dead trial."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("surplus") or "died" in str(t.user_attrs.get("fail_reason")), t.user_attrs
            if t.user_attrs.get("surplus"):
                assert not t.params  # a surplus claim never sampled an architecture
        else:
            assert t.state == TrialState.COMPLETE, (t.number, t.state)


def test_search_records_attributes_and_constraints(shared, tmp_path):
    study = run_search(_cfg(shared, tmp_path, storage=None))  # the default: sqlite:///OUT/study.db
    assert (tmp_path / "study.db").is_file()
    _check_exactly(study, 4)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    settings = study.user_attrs["detforge.search"]
    assert settings["budget_ms"] == BUDGET and settings["imgsz"] == IMGSZ and settings["space"] == "tiny"
    for t in study.trials:
        a = t.user_attrs
        assert {"arch", "arch_id", "params", "gflops", "predicted_ms", "map", "map50", "constraint"} <= set(a)
        assert a["constraint"] == [pytest.approx(a["predicted_ms"] - BUDGET)]
        assert t.values[1] == pytest.approx(a["predicted_ms"]) and a["params"] > 0
        assert "imgsz: 64" in a["arch"] and len(t.params) > 40  # every open decision but imgsz was suggested
        if a["evaluated"]:
            assert t.values[0] == a["map"] and 0 <= a["map"] <= 1
        else:
            assert a["predicted_ms"] > BUDGET and a["map"] is None
        # Optuna knows the constraint too (what NSGA-II's constrained domination reads)
        cons = [v for k, v in t.system_attrs.items() if k.startswith("constraints")]
        assert cons and cons[0] in ([pytest.approx(a["predicted_ms"] - BUDGET)], pytest.approx(a["predicted_ms"] - BUDGET))
    # running it again finds the study complete: no new trial
    again = run_search(_cfg(shared, tmp_path, storage=None))
    assert len(again.trials) == 4


def test_failing_trials_keep_their_reason_and_the_study_goes_on(shared, tmp_path, capsys, caplog):
    from latency_tables import LatencyTable

    table = LatencyTable.load(shared.table, check_device=False)
    calls = {"n": 0}

    def flaky(arch) -> float:
        calls["n"] += 1
        if calls["n"] == 4:  # 2 probes before the study, then trials 0, 1, 2, 3
            raise ConfigError("no entry for this block", field="entries")
        if calls["n"] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return table.predict(arch)

    study = run_search(_cfg(shared, tmp_path, trials=2, sampler="random", progress=True), predictor=flaky)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1, 2]
    err = capsys.readouterr().err  # one line each, not Optuna's 60 parameters and a traceback
    assert "trial 1 failed: ConfigError: entries: no entry" in err and "trial 2 failed: OutOfMemoryError" in err
    assert not [r for r in caplog.records if r.name.startswith("optuna") and "Trial 1 " in r.getMessage()]
    assert "ConfigError" in failed[0].user_attrs["fail_reason"] and "no entry" in failed[0].user_attrs["fail_reason"]
    assert failed[1].user_attrs["fail_reason"].startswith("OutOfMemoryError")
    assert [t.number for t in study.trials if t.state == TrialState.COMPLETE] == [0, 3]


def test_a_worker_gives_up_after_failures_in_a_row(shared, tmp_path):
    calls = {"n": 0}

    def broken(arch) -> float:
        calls["n"] += 1
        if calls["n"] > 2:  # the two probes before the study pass, every trial fails
            raise DetforgeError("device table unreadable")
        return 1.0

    with pytest.raises(DetforgeError, match="2 trials in a row failed"):
        run_search(_cfg(shared, tmp_path, trials=3, max_failures=2, sampler="random"), predictor=broken)


def test_a_trial_failed_by_another_worker_meanwhile_is_not_an_error(shared, tmp_path):
    from latency_tables import LatencyTable

    table = LatencyTable.load(shared.table, check_device=False)
    calls = {"n": 0}

    def judged_dead(arch) -> float:
        calls["n"] += 1
        if calls["n"] == 3:  # trial 0, while it runs: another worker misses its heartbeat and fails it
            study = load_study(str(tmp_path / "study.journal"), "s")
            (running,) = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            study._storage.set_trial_user_attr(running._trial_id, "fail_reason", "worker w died while running it")
            study._storage.set_trial_state_values(running._trial_id, state=TrialState.FAIL)
        return table.predict(arch)

    study = run_search(_cfg(shared, tmp_path, trials=2, sampler="random"), predictor=judged_dead)
    _check_exactly(study, 2)
    assert study.trials[0].state == TrialState.FAIL


def test_an_assertion_in_the_objective_is_raised_not_taken_for_a_lost_trial(shared, tmp_path):
    calls = {"n": 0}

    def asserts(arch) -> float:
        calls["n"] += 1
        if calls["n"] > 12:  # the search took the error for another worker's doing and went on
            raise RuntimeError("kept running trials that fail")
        if calls["n"] > 2:  # the two probes before the study pass, then a bug in the trial's own code
            raise AssertionError("a broken invariant")
        return 1.0

    with pytest.raises(AssertionError, match="a broken invariant"):
        run_search(_cfg(shared, tmp_path, trials=3, sampler="random"), predictor=asserts)
    assert calls["n"] == 3


def test_a_trial_failed_by_another_worker_after_its_objective_returned_is_not_an_error(shared, tmp_path,
                                                                                        monkeypatch):
    from nas.search import Searcher

    call = Searcher.__call__
    seen = []

    def judged_dead_at_the_end(self, trial):
        values = call(self, trial)
        if not seen:  # between the objective's return and Optuna's tell, another worker fails the trial
            trial.study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker w died while running it")
            trial.study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        seen.append(trial.number)
        return values

    monkeypatch.setattr(Searcher, "__call__", judged_dead_at_the_end)
    study = run_search(_cfg(shared, tmp_path, trials=2, sampler="random"))
    _check_exactly(study, 2)
    assert study.trials[0].state == TrialState.FAIL


def test_a_retry_does_not_inherit_the_dead_workers_records(tmp_path):
    from nas.search import _retry_callback, worker_id

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_s=1, grace_s=2,
                                                     max_retry=2))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead_run = {"worker": worker_id(), "heartbeat": 1.0, "fail_reason": "died", "arch_id": "a1", "map": 0.3,
                "evaluated": True, "duplicate_of": 0, "surplus": True, "run_dir": "x"}
    for k, v in {**dead_run, "enqueued": "yolov7-tiny"}.items():
        trial.set_user_attr(k, v)
    study.tell(trial, state=TrialState.FAIL)
    _retry_callback(2)(study, study.trials[0])
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == study.trials[0].params and retry.user_attrs["enqueued"] == "yolov7-tiny"
    # a stale duplicate_of would skip its evaluation, a stale surplus stop its worker, a stale worker fail it again
    assert not set(dead_run) & set(retry.user_attrs)


def test_a_worker_killed_before_it_stamped_the_trial_is_found_by_its_heartbeat(tmp_path):
    from nas.search import recover_dead_trials

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_s=1, grace_s=2,
                                                     max_retry=2))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no `worker` record: only a heartbeat
    study._storage.record_heartbeat(trial._trial_id)
    assert recover_dead_trials(study, grace_s=2, max_retry=2) == []  # a fresh heartbeat: alive
    time.sleep(3.5)  # SQLite's clock has whole seconds
    recover_dead_trials(study, grace_s=2, max_retry=2)
    dead = study.trials[0]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == dead.params and "fail_reason" not in retry.user_attrs


def test_a_worker_killed_before_its_first_heartbeat_is_found_by_its_start_time(tmp_path):
    from nas.search import recover_dead_trials

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_s=1, grace_s=2,
                                                     max_retry=2))
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no `worker` record and no heartbeat
    assert recover_dead_trials(study, grace_s=2, max_retry=2) == []  # just started: not yet given up
    time.sleep(3.5)
    assert recover_dead_trials(study, grace_s=2, max_retry=2) == [0]
    dead = study.trials[0]
    assert dead.state == TrialState.FAIL and "fail_reason" in dead.user_attrs
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == dead.params


def test_a_dead_worker_whose_pid_this_process_now_has_is_found(tmp_path):
    from nas.search import recover_dead_trials, worker_id

    # a journal file has no Optuna heartbeat; a worker restarted in its container comes back with the same pid
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.journal"), heartbeat_s=1, grace_s=2,
                                                     max_retry=2))
    mine, earlier = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(2))
    me = worker_id()
    for trial, w in ((mine, me), (earlier, {**me, "start": str(int(me["start"]) - 100)})):
        trial.set_user_attr("worker", w)
        trial.set_user_attr("heartbeat", time.time())
    assert recover_dead_trials(study, grace_s=2, max_retry=2) == [earlier.number]
    assert study.trials[mine.number].state == TrialState.RUNNING  # this process's own trial is alive


def test_worker_records_name_the_pid_namespace():
    from nas.search import _local, worker_id

    me = worker_id()
    assert _local(me) and me["boot"] and me["pidns"]
    assert not _local({**me, "pidns": me["pidns"] + 1})  # same host name, another container: pids not visible


# the journal's two-process runs are the kill test's and the reproducibility test's: make bench runs this one
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("journal", marks=pytest.mark.slow)])
def test_two_worker_processes_share_one_study(shared, tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else str(tmp_path / "study.journal")
    n = 4
    procs = [spawn(search_args(shared, storage, "shared", n, "--out", str(tmp_path / f"w{i}")), tmp_path / f"w{i}.log")
             for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=240) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    study = load_study(storage, "shared")
    _check_exactly(study, n)
    workers = {t.user_attrs["worker"]["pid"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert workers <= {p.pid for p in procs}
    for i in range(2):  # each worker printed the finished study
        doc = json.loads((tmp_path / f"w{i}.log").read_text().strip().splitlines()[-1])
        assert doc["complete"] == n


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_worker_is_resumed_by_a_rerun(shared, tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else str(tmp_path / "study.journal")
    n = 4
    proc = spawn(search_args(shared, storage, "k", n, "--out", str(tmp_path)), tmp_path / "w.log")
    # the observer waits at most 2 s for SQLite's lock: a worker frozen inside a transaction must not block it
    st = (optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 2}}) if kind == "sqlite"
          else open_storage(storage))

    def states() -> list[TrialState]:
        from sqlalchemy.exc import OperationalError

        try:
            return [t.state for t in optuna.load_study(study_name="k", storage=st).get_trials(deepcopy=False)]
        except (KeyError, OperationalError, optuna.exceptions.StorageInternalError):  # no study yet, or locked
            return []

    deadline = time.time() + 180
    try:
        while True:  # wait for the first trial to complete and the next one to be under way
            assert proc.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
            assert time.time() < deadline, states()
            if TrialState.COMPLETE in states() and TrialState.RUNNING in states():
                proc.send_signal(signal.SIGSTOP)  # frozen: the trial cannot finish between the check and the kill
                if TrialState.RUNNING in states():
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = [t.number for t in optuna.load_study(study_name="k", storage=st).trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    study = run_search(_cfg(shared, tmp_path, storage=storage, study="k", trials=n))
    _check_exactly(study, n)
    dead = study.trials[killed[0]]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    # the retry keeps every decision the dead trial had sampled (it may have been killed half-way through)
    assert all(retry[0].params[k] == v for k, v in dead.params.items())


def test_scratch_mode_trains_reports_and_prunes(shared, tmp_path):
    cfg = _cfg(shared, tmp_path, mode="scratch", space="tiny", supernet=None, trials=2, scratch_epochs=2,
               budget_ms=None)
    study = run_search(cfg)
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and all(sorted(t.intermediate_values) == [0, 1] for t in complete)
    assert all(t.values[0] == t.user_attrs["map"] for t in complete)
    # the front exports the models the trials trained (no supernet in this mode)
    from nas.pareto import export_front
    from search_spaces import load_model

    entries = export_front(study, None, tmp_path / "front", backend=None)
    assert entries
    for e in entries:
        # per study: another study in the same storage and --out numbers its trials from 0 too
        assert study.trials[e.number].user_attrs["run_dir"] == str((tmp_path / "trials" / "s" / f"{e.number:05d}").resolve())
        trained = load_model(tmp_path / "trials" / "s" / f"{e.number:05d}" / "model").state_dict()
        exported = load_model(e.path).state_dict()
        assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
        assert (Path(e.path) / "model.onnx").is_file()

    class Trial:  # should_prune says yes: the Trainer callback stops training with TrialPruned
        def __init__(self):
            self.reported, self.user_attrs = [], {}

        def report(self, v, step):
            self.reported.append((step, v))

        def should_prune(self):
            return True

        def set_user_attr(self, k, v):
            self.user_attrs[k] = v

    trial = Trial()
    with pytest.raises(optuna.TrialPruned):
        _PruneReport(trial).on_epoch_end(None, 0, {"map": 0.1})
    assert trial.reported == [(0, 0.1)] and trial.user_attrs["pruned_at_epoch"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "cmaes"], "invalid choice"),
    (["--mode", "evolution"], "invalid choice"),
    (["--trials", "x"], "invalid int"),
    (["--budget-ms"], "expected one argument"),
])
def test_malformed_flags_exit_2(shared, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["search", "--supernet", str(shared.supernet), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, field", [
    (["--trials", "0"], "trials"),
    (["--storage", "study.txt"], "storage"),
    (["--objectives", "map,speed"], "objectives"),
    (["--mode", "scratch", "--objectives", "map,latency", "--space", "tiny"], "objectives"),
    (["--budget-ms", "-1"], "budget_ms"),
    (["--imgsz", "128"], "imgsz"),  # the table was measured at 64
    (["--heartbeat", "20", "--grace", "30"], "grace_s"),  # a live worker between two beats would look dead
    (["--population", "1"], "population"),
    (["--finetune-epochs", "-1"], "finetune_epochs"),
    (["--workers", "-1"], "workers"),
    (["--nbs", "0"], "nbs"),
    (["--lr0", "0"], "lr0"),
    (["--enqueue", "yolov9"], "enqueue"),  # no such zoo point
    (["--enqueue", "supernet"], "enqueue"),  # the shared supernet was trained on the whole space
])
def test_bad_values_are_one_line_errors_with_exit_2(shared, tmp_path, capsys, argv, field):
    base = ["search", "--supernet", str(shared.supernet), "--table", str(shared.table), "--data", str(shared.data),
            "--out", str(tmp_path), "--quiet"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detforge: error:") and field in err and len(err.splitlines()) == 1


def test_a_table_built_at_the_spaces_nc_predicts_heads_at_that_nc(shared, tmp_path):
    from latency_tables import LatencyTable
    from search_spaces.space import load_space
    from tests.latency_table import SizeBackend

    table = tmp_path / "t80.json"  # what `detforge latency build --space tiny` writes: heads for the YAML's nc=80
    LatencyTable.build(load_space("tiny"), SizeBackend(), IMGSZ, table, progress=False, fit_models=0, group=64)
    with pytest.warns(UserWarning, match="nc=80"):
        searcher = prepare(_cfg(shared, tmp_path, table=str(table)))
    arch = searcher.space.smallest()
    assert arch.nc == 3 and searcher.predict_ms(arch) == LatencyTable.load(table).predict(arch.with_nc(80))


def test_joining_a_study_with_other_settings_is_refused(shared, tmp_path):
    run_search(_cfg(shared, tmp_path, trials=1))
    with pytest.raises(ConfigError, match="budget_ms"):
        run_search(_cfg(shared, tmp_path, trials=2, budget_ms=9.0))
    # another calibration, validation, finetuning batch, calibration draw or liveness judgement
    for over in ({"bn_batches": 3}, {"val_batches": 1}, {"seed": 1}, {"heartbeat_s": 2}):
        with pytest.raises(ConfigError) as e:
            run_search(_cfg(shared, tmp_path, trials=2, **over))
        assert e.value.field == next(iter(over))
    from nas.search import STUDY_ATTR, _check_settings

    study = load_study(str(tmp_path / "study.journal"), "s")
    theirs = study.user_attrs[STUDY_ATTR]
    assert theirs["data"] and theirs["nbs"] is None and theirs["scratch_epochs"] is None  # neither trains here
    with pytest.raises(ConfigError, match="synthetic") as e:  # the built-in set (same nc) against a data file
        _check_settings(study, {**theirs, "data": None, "data_sha": None})
    assert e.value.field == "data"
    with pytest.raises(ConfigError) as e:  # trials trained with another optimizer: incomparable mAPs
        _check_settings(study, {**theirs, "optimizer": "adamw"})
    assert e.value.field == "optimizer"
    other = tmp_path / "other_table.json"  # another device's table: same path rules, different content
    doc = json.loads(Path(shared.table).read_text())
    doc["entries"] = {k: {**v, "median_ms": v["median_ms"] * 2} if isinstance(v, dict) and "median_ms" in v else v
                      for k, v in doc["entries"].items()}
    other.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="another table"):
        run_search(_cfg(shared, tmp_path, trials=2, table=str(other)))
    copy = tmp_path / "same_table.json"  # the same table at another path joins
    shutil.copy(shared.table, copy)
    assert len(run_search(_cfg(shared, tmp_path, trials=2, table=str(copy))).trials) >= 2


def test_the_trials_optimizer_is_a_study_setting_only_where_they_train():
    from nas.search import _training_settings

    sup = {"supernet": "supernet.pt"}
    assert _training_settings(SearchConfig(**sup, optimizer="adamw", lr0=0.002)) == {"nbs": None}  # inherited only
    assert _training_settings(SearchConfig(**sup, finetune_epochs=1, optimizer="adamw", lr0=0.002)) == \
        {"nbs": 64, "optimizer": "adamw", "lr0": 0.002}
    # YOLOv7's defaults are not written: a study created before they were recorded keeps matching
    assert _training_settings(SearchConfig(mode="scratch", space="tiny")) == {"nbs": 64}


def test_one_worker_search_is_reproducible_from_its_seed(shared, tmp_path):
    # separate processes (a pid-mixed seed would differ), run side by side with a study each
    procs = [spawn(search_args(shared, str(tmp_path / f"r{i}.journal"), "r", 3, "--seed", seed,
                               "--out", str(tmp_path / f"r{i}")), tmp_path / f"r{i}.log")
             for i, seed in enumerate(("7", "7", "8"))]
    params = []
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=240) == 0, (tmp_path / f"r{i}.log").read_text()[-3000:]
        params.append([t.params for t in load_study(str(tmp_path / f"r{i}.journal"), "r").trials])
    assert params[0] == params[1] and params[0] != params[2]


def test_a_budget_below_the_smallest_architecture_warns(shared, tmp_path):
    with pytest.warns(RuntimeWarning, match="below the space's smallest"):
        run_search(_cfg(shared, tmp_path, trials=1, budget_ms=1e-6, sampler="random"))


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on a Unix socket (skips with the reason when it cannot run here)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    driver = next((d for d in ("psycopg", "psycopg2") if importlib.util.find_spec(d)), None)
    if driver is None:
        pytest.skip("no PostgreSQL driver installed: pip install 'psycopg[binary]' (or psycopg2-binary)")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="detforge-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    os.chmod(base, 0o777)  # the socket lives here
    data, port = base / "data", 20000 + os.getpid() % 20000
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120)
    try:
        run([*prefix, initdb, "-D", str(data), "-U", "detforge", "--auth=trust"])
        run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "pg.log"), "-w", "-o",
             f"-p {port} -k {base} -c listen_addresses=''", "start"])
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {e.stderr.decode(errors='replace')[-300:]}")
    yield f"postgresql+{driver}://detforge@/postgres?host={base}&port={port}"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "stop", "-m", "immediate"], check=False, capture_output=True,
                   timeout=120)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("mode", ["supernet", "scratch"])
def test_a_bad_dataset_fails_before_the_study_has_trials(shared, tmp_path, mode):
    from search_spaces.errors import DataError

    doc = yaml.safe_load(Path(shared.data).read_text())
    doc["path"] = str(Path(shared.data).parent.resolve())
    (tmp_path / "empty").mkdir()
    doc["val"] = str(tmp_path / "empty")  # it exists: only a scan of the split finds it holds no images
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(doc))
    extra = {"space": "tiny", "supernet": None, "scratch_epochs": 1} if mode == "scratch" else {}
    with pytest.raises(DataError) as e:
        run_search(_cfg(shared, tmp_path, data=str(data), mode=mode, **extra))
    assert "empty" in str(e.value)
    assert not (tmp_path / "study.journal").exists() or not load_study(str(tmp_path / "study.journal"), "s").trials


def test_a_space_the_supernet_was_not_trained_on_is_refused(shared, tmp_path):
    from search_spaces.space import SPACES_DIR

    with pytest.raises(ConfigError, match="trained on space 'tiny', not 'default'") as e:
        prepare(_cfg(shared, tmp_path, space="default"))
    assert e.value.field == "space" and str(shared.supernet) in str(e.value)
    renamed = tmp_path / "mine.yaml"  # the same decisions under another name: not the space it was trained on
    renamed.write_text((SPACES_DIR / "tiny.yaml").read_text().replace("name: tiny", "name: mine", 1))
    with pytest.raises(ConfigError, match="not 'mine'"):
        prepare(_cfg(shared, tmp_path, space=str(renamed)))
    assert prepare(_cfg(shared, tmp_path, space="tiny")).space.name == "tiny"


def test_a_storage_url_is_printed_without_its_password():
    from nas.search import redact_url

    assert redact_url("postgresql://ann:s3cr@t@db:5432/nas") == "postgresql://ann:***@db:5432/nas"
    assert redact_url("mysql+pymysql://ann@db/nas") == "mysql+pymysql://ann@db/nas"  # no password to hide
    assert redact_url("sqlite:////runs/study.db") == "sqlite:////runs/study.db"


@pytest.mark.postgres
def test_postgresql_storage_with_two_workers(shared, tmp_path, postgres_url):
    procs = [spawn(search_args(shared, postgres_url, "pg", 4, "--out", str(tmp_path / f"w{i}")),
                   tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=240) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    _check_exactly(load_study(postgres_url, "pg"), 4)


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nas.cli", "search", "--help"], check=False, cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--budget-ms" in out.stdout and "--storage" in out.stdout


def _seeding_searcher(budget_ms: float | None, ms: float, **cfg) -> Searcher:
    """A Searcher of the default space pinned to 320 px whose predictor says `ms` for everything (no data)."""
    from nas.budget import pinned_space
    from search_spaces.space import load_space

    space = pinned_space(load_space("default").with_nc(3), 320)
    scfg = SearchConfig(space="default", supernet="supernet.pt", budget_ms=budget_ms, **cfg)
    return Searcher(cfg=scfg, space=space, imgsz=320, nc=3, names=["a", "b", "c"], data=None,
                    predict_ms=lambda arch: ms)


def test_a_pruned_trial_ends_a_run_of_failures(tmp_path, monkeypatch):
    searcher = _seeding_searcher(None, 1.0, trials=10, max_failures=2)
    outcomes = iter([DetforgeError("a bad block"), optuna.TrialPruned(), DetforgeError("a bad block"), 0.5])

    def evaluate(trial):
        out = next(outcomes)
        if isinstance(out, BaseException):
            raise out
        return out

    monkeypatch.setattr(searcher, "evaluate", evaluate)
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.journal")))
    in_a_row: list[int] = []
    study.optimize(searcher, n_trials=4, catch=(DetforgeError,),
                   callbacks=[lambda st, t: in_a_row.append(searcher.failures_in_a_row)])
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL,
                                               TrialState.COMPLETE]
    assert in_a_row == [1, 0, 1, 0]  # never 2 (max_failures): the prune between the failures reset the count


def test_queued_trials_behind_a_queued_one_are_not_ahead_of_it(tmp_path):
    from nas.search import SurplusTrial

    searcher = _seeding_searcher(None, 1.0, trials=2)
    study = optuna.create_study(storage=open_storage(str(tmp_path / "s.journal")))
    for x in (0.1, 0.2, 0.3):  # e.g. retries of dead trials, left queued by a killed search
        study.enqueue_trial({"x": x})
    first = study.ask()  # the lowest-numbered of the queue
    searcher.claim(first)  # the two queued behind it come after it: one slot of two taken
    fresh = optuna.trial.Trial(study, study._storage.create_new_trial(study._study_id))
    with pytest.raises(SurplusTrial):  # the queue goes first: the first and the two queued fill --trials 2
        searcher.claim(fresh)


def test_a_zoo_point_is_enqueued_at_the_searchs_input_size():
    from search_spaces.space import load_space

    [(name, params)] = _seeding_searcher(5.0, 4.0, enqueue="yolov7-tiny").seed_points()
    point = {k: v for k, v in load_space("default").zoo_point("yolov7-tiny").items() if k != "imgsz"}
    assert name == "yolov7-tiny" and "imgsz" not in params and params == {k: point[k] for k in params}
    with pytest.warns(RuntimeWarning, match="over the budget"):  # it would spend a trial unevaluated
        assert _seeding_searcher(3.0, 4.0, enqueue=("yolov7-tiny",)).seed_points() == []
    with pytest.raises(ConfigError) as e:
        _seeding_searcher(None, 1.0, enqueue=("yolov7-tiny", "yolov9")).seed_points()
    assert e.value.field == "enqueue" and "yolov9" in e.value.message
    # a supernet trained for a budget records its largest; with it, two points and one trial: the first
    two = _seeding_searcher(None, 1.0, enqueue=("supernet", "yolov7-tiny"), trials=1)
    two.supernet = SimpleNamespace(trained_region={"largest_decisions": two.space.smallest_decisions()})
    with pytest.warns(RuntimeWarning, match="1 trials"):
        [(name, params)] = two.seed_points()
    assert name == "supernet" and params == {k: v for k, v in two.space.smallest_decisions().items() if k in params}


def test_enqueue_flags_exclude_each_other(shared, capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--supernet", str(shared.supernet), "--enqueue", "yolov7-tiny", "--no-enqueue"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_an_architecture_drawn_twice_is_evaluated_once(shared, tmp_path):
    first = run_search(_cfg(shared, tmp_path, trials=1, budget_ms=None, sampler="random"))
    t0 = first.trials[0]
    assert t0.user_attrs["evaluated"]
    # the same architecture twice more, as a sampler may draw it: once reused, once evaluated again
    first.enqueue_trial(t0.params)
    study = run_search(_cfg(shared, tmp_path, trials=2, budget_ms=None, sampler="random"))
    first.enqueue_trial(t0.params)
    study = run_search(_cfg(shared, tmp_path, trials=3, budget_ms=None, sampler="random", reuse_evaluations=False))
    _check_exactly(study, 3)
    reused, again = study.trials[1], study.trials[2]
    assert reused.user_attrs["arch_id"] == again.user_attrs["arch_id"] == t0.user_attrs["arch_id"]
    assert reused.user_attrs["duplicate_of"] == 0 and "duplicate_of" not in again.user_attrs
    # the premise of reuse: evaluating the same architecture again gives the same values
    assert reused.values == again.values == t0.values
    from nas.search import summary

    assert summary(study)["reused"] == 1


def test_finetune_mode_trains_each_candidate_from_its_inherited_weights(shared, tmp_path):
    from nas.pareto import export_front
    from nas.supernet import load_supernet
    from search_spaces import Detector, load_model
    from search_spaces.architecture import Architecture
    from trainer.config import TrainConfig

    study = run_search(_cfg(shared, tmp_path, trials=2, budget_ms=None, sampler="random", finetune_epochs=1, nbs=8))
    _check_exactly(study, 2)
    assert study.user_attrs["detforge.search"]["finetune_epochs"] == 1
    net = load_supernet(shared.supernet)
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())).epochs == 1
        assert t.values[0] == t.user_attrs["map"]
        assert t.values[0] == pytest.approx(json.loads((run / "summary.json").read_text())["last"]["map"], abs=1e-6)
        trained = load_model(run / "model").state_dict()
        arch = Architecture.from_dict(yaml.safe_load(t.user_attrs["arch"]))
        inherited = net.extract(arch).state_dict()
        torch.manual_seed(0)
        fresh = Detector(arch).state_dict()
        convs = [k for k in trained if k.endswith("conv.weight")]
        assert convs
        d_inherited, d_fresh = (sum(float((trained[k] - other[k]).norm()) for k in convs)
                                for other in (inherited, fresh))
        # one short epoch moves the weights a little: training started from the supernet's, not afresh
        assert 0 < d_inherited < 0.5 * d_fresh
    # the front is the finetuned models, not re-extracted ones
    for e in export_front(study, shared.supernet, tmp_path / "front", backend=None, onnx=False):
        trained = load_model(tmp_path / "trials" / "s" / f"{e.number:05d}" / "model").state_dict()
        exported = load_model(e.path).state_dict()
        assert all(torch.equal(trained[k], exported[k]) for k in trained)
    # joining with another evaluation is refused; scratch mode has no inherited weights to finetune
    with pytest.raises(ConfigError, match="finetune_epochs"):
        run_search(_cfg(shared, tmp_path, trials=3, budget_ms=None, sampler="random"))
    with pytest.raises(ConfigError, match="finetune_epochs"):
        _cfg(shared, tmp_path, mode="scratch", space="tiny", supernet=None, finetune_epochs=1, objectives=("map",))


def test_training_settings_a_search_does_not_use_warn(shared, tmp_path, recwarn):
    with pytest.warns(RuntimeWarning, match="nbs, optimizer, lr0 ignored"):
        prepare(_cfg(shared, tmp_path, nbs=16, optimizer="adamw", lr0=0.002))
    recwarn.clear()
    prepare(_cfg(shared, tmp_path, nbs=16, optimizer="adamw", lr0=0.002, finetune_epochs=1))  # they train there
    prepare(_cfg(shared, tmp_path))
    assert not [w for w in recwarn if "ignored" in str(w.message)]
