"""Architecture search: an Optuna study over a search space, scored with inherited supernet weights.

A trial samples an architecture with `space.sample(trial)` (one `suggest_*` per open decision, so the
sampler models the real choices), reads its latency from the latency table and, in `supernet` mode,
evaluates it with the supernet's weights after BatchNorm recalibration; in `scratch` mode it trains the
candidate briefly with the Trainer, reporting each epoch's mAP to a pruner. The latency budget is a
constraint (`constraints_func`), never a penalty.

The study lives in a storage URL, so any number of processes running the same command share it:
`--trials N` bounds the COMPLETE trials of the whole study (a worker claims a trial only while fewer
than N are complete or running ahead of it), a killed worker's RUNNING trial is failed and retried with
the same parameters (RDB heartbeats, or at once when the dead worker ran on this host), and a trial that
raises a DetforgeError or runs out of GPU memory is FAILED with its `fail_reason` while the study goes on.
See docs/nas.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from search_spaces import Detector
from search_spaces.architecture import Architecture
from search_spaces.errors import ConfigError, DetforgeError
from search_spaces.space import SearchSpace, load_space
from trainer.callbacks import Callback
from trainer.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig
from trainer.distributed import resolve_device

from .budget import PredictMs, pinned_space, space_predictor, table_predictor
from .supernet import Supernet, load_supernet

if TYPE_CHECKING:
    from trainer.evaluate import EvalResult

OBJECTIVES = {"map": "maximize", "latency": "minimize", "params": "minimize", "gflops": "minimize"}
SAMPLERS = ("auto", "nsga2", "tpe", "random", "gp")
MODES = ("supernet", "scratch")
PRUNERS = ("median", "hyperband", "none")
JOURNAL_SUFFIXES = (".log", ".journal")
HOST = socket.gethostname()
STUDY_ATTR = "detforge.search"  # the study's settings, checked by every worker that joins it
NATIVE_CONSTRAINTS = hasattr(Trial, "set_constraint")


def resolve_sampler(sampler: str, mode: str) -> str:
    """'auto' as a study of `mode` takes it: NSGA-II for supernet studies (two objectives), TPE for scratch ones
    (mAP alone, pruned by epoch)."""
    return sampler if sampler != "auto" else ("tpe" if mode == "scratch" else "nsga2")


@dataclass
class SearchConfig:
    """One search (every worker of a study runs the same one). See docs/nas.md for each field."""

    space: str | None = None  # name or YAML; default: the supernet's space (required in scratch mode)
    supernet: str | None = None  # supernet.pt (supernet mode)
    table: str | None = None  # LatencyTable JSON measured on the target device
    data: str | None = None  # data.yaml; None: the built-in synthetic set
    budget_ms: float | None = None  # hard latency budget (a constraint); None: unconstrained
    trials: int = 40  # COMPLETE trials of the whole study, over all workers
    storage: str | None = None  # SQLAlchemy URL or journal file (*.log, *.journal); default sqlite:///OUT/study.db
    study: str = "detforge"
    out: str = "runs/search"
    sampler: str = "auto"  # auto (nsga2; tpe in scratch mode) | nsga2 | tpe | random | gp
    seed: int = 0
    mode: str = "supernet"  # supernet | scratch
    bn_batches: int = 8  # training batches that re-estimate a subnet's BatchNorm statistics
    val_batches: int | None = None  # validation batches per trial (None: the whole val split)
    scratch_epochs: int = 3
    # supernet mode: train each inherited subnet this many epochs before validating it (0: inherited weights
    # after BN recalibration only); E training epochs per trial, what that buys: docs/nas.md
    finetune_epochs: int = 0
    nbs: int = TrainConfig.nbs  # nominal batch of the trials' trainings (scratch epochs, finetune epochs)
    optimizer: str = TrainConfig.optimizer  # of the trials' trainings, as nbs (TrainConfig's optimizer, lr_schedule and lr0)
    lr_schedule: str = TrainConfig.lr_schedule
    lr0: float | None = TrainConfig.lr0
    objectives: tuple[str, ...] | None = None  # default (map, latency); scratch mode: (map,)
    imgsz: int | None = None  # default: the table's input size, else the space's largest
    nc: int | None = None  # default: the dataset's
    batch: int = 16
    device: str = "auto"
    workers: int = 0  # data loader processes
    pruner: str = "median"  # scratch mode: median | hyperband | none
    population: int | None = None  # NSGA-II population (default: trials / 4, in 4..50)
    skip_infeasible: bool = True  # over-budget candidates are not evaluated (their mAP is recorded as 0)
    heartbeat_s: int = 20  # a worker's heartbeat interval ...
    grace_s: int = 60  # ... and how long after the last one its RUNNING trial counts as dead
    max_retry: int = 2  # retries of a trial whose worker died
    max_failures: int = 10  # trials failing in a row before this worker gives up
    poll_s: float = 2.0  # wait between checks while other workers finish the last trials
    progress: bool = False  # one line per trial on stderr
    # architectures the new study evaluates first: 'supernet' (the largest subnet the supernet was trained
    # for within its budget) or a zoo point of the space ('yolov7-tiny'); None: 'supernet' when recorded
    enqueue: tuple[str, ...] | None = None
    # an architecture a COMPLETE trial of the study already evaluated is not evaluated again: its values are
    # copied (an evaluation is deterministic: the same weights, calibration batches and validation set)
    reuse_evaluations: bool = True

    def __post_init__(self) -> None:
        """Validate choices and ranges once (ConfigError naming the field)."""
        for key, allowed in (("sampler", SAMPLERS), ("mode", MODES), ("pruner", PRUNERS),
                             ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}", field=key)
        for key in ("trials", "bn_batches", "scratch_epochs", "batch", "nbs", "heartbeat_s", "grace_s",
                    "max_failures"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", field=key)
        if self.lr0 is not None and not self.lr0 > 0:
            raise ConfigError(f"must be > 0, got {self.lr0}", field="lr0")
        for key in ("finetune_epochs", "workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", field=key)
        if self.finetune_epochs and self.mode != "supernet":
            raise ConfigError("finetunes inherited weights: supernet mode only (scratch mode trains "
                              "--scratch-epochs)", field="finetune_epochs")
        if self.grace_s < 2 * self.heartbeat_s:  # else a live worker between two beats would count as dead
            raise ConfigError(f"must be at least twice the heartbeat ({self.heartbeat_s} s), got {self.grace_s}",
                              field="grace_s")
        if self.population is not None and self.population < 2:
            raise ConfigError(f"must be >= 2 (NSGA-II breeds pairs), got {self.population}", field="population")
        if self.val_batches is not None and self.val_batches < 1:
            raise ConfigError(f"must be >= 1, got {self.val_batches}", field="val_batches")
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise ConfigError(f"must be > 0 ms, got {self.budget_ms}", field="budget_ms")
        if self.imgsz is not None and (self.imgsz < 32 or self.imgsz % 32):
            raise ConfigError(f"must be a multiple of 32, got {self.imgsz}", field="imgsz")
        if self.mode == "supernet" and not self.supernet:
            raise ConfigError("supernet mode needs the supernet weights (detforge supernet train)", field="supernet")
        if self.mode == "scratch" and not self.space:
            raise ConfigError("scratch mode needs the search space", field="space")
        objectives = tuple(self.objectives or (("map",) if self.mode == "scratch" else ("map", "latency")))
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown or len(set(objectives)) != len(objectives) or "map" not in objectives:
            raise ConfigError(f"objectives must be distinct names of {', '.join(OBJECTIVES)} including map, got "
                              f"{list(objectives)}", field="objectives")
        if self.mode == "scratch" and objectives != ("map",):
            # Optuna prunes single-objective studies only; latency stays the constraint
            raise ConfigError("scratch mode prunes with per-epoch mAP, which Optuna supports for single-objective "
                              "studies only: use objectives (map,) with the latency budget", field="objectives")
        self.objectives = objectives
        if self.enqueue is not None:
            self.enqueue = (self.enqueue,) if isinstance(self.enqueue, str) else tuple(self.enqueue)
            if self.mode == "scratch" and SUPERNET_POINT in self.enqueue:
                raise ConfigError(f"'{SUPERNET_POINT}' needs a supernet (supernet mode)", field="enqueue")
        self.sampler = resolve_sampler(self.sampler, self.mode)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        d = dataclasses.asdict(self)
        d["objectives"] = list(self.objectives or ())
        return d


SUPERNET_POINT = "supernet"  # SearchConfig.enqueue: the supernet's trained largest architecture


class SurplusTrial(Exception):
    """Raised in a trial created after N trials were already complete or running ahead of it."""


CAUGHT = (DetforgeError, torch.cuda.OutOfMemoryError, SurplusTrial)  # a trial's failures the search goes on after


class OwnFailureFilter(logging.Filter):
    """Drops Optuna's report of a trial failed by a CAUGHT error (all its parameters and a traceback, then its
    value): the search records and prints those failures in one line itself."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CAUGHT):
            self.dropped.add(record.getMessage().split(" failed", 1)[0])  # "Trial N"
            return False
        head = record.getMessage().split(" failed with value", 1)
        if len(head) == 2 and head[0] in self.dropped:
            self.dropped.discard(head[0])
            return False
        return True


def quiet_own_failures() -> None:
    """Install OwnFailureFilter on Optuna's trial logger (once per process)."""
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, OwnFailureFilter) for f in log.filters):
        log.addFilter(OwnFailureFilter())


# ---- storage and study ---------------------------------------------------------------------------------------
def default_storage(out: str | Path) -> str:
    """`sqlite:///OUT/study.db` (absolute)."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def is_journal(url: str) -> bool:
    """Whether a storage string names a journal file."""
    return "://" not in url and url.endswith(JOURNAL_SUFFIXES)


def check_storage(url: str) -> None:
    """Refuse a storage string that is neither an SQLAlchemy URL nor a journal file (ConfigError on `storage`)."""
    if "://" not in url and not is_journal(url):
        raise ConfigError(f"{url!r} is neither an SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db) "
                          f"nor a journal file ending in {' or '.join(JOURNAL_SUFFIXES)}", field="storage")


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):])
    return None


RETRY_ATTRS = ("enqueued",)  # what a retry keeps: the study's own marks, not a dead run's records (scores,
# duplicate_of, run_dir, surplus, worker: a stale `surplus` would stop the retrying worker, a stale
# `duplicate_of` would skip its evaluation, a stale `worker` would get it judged dead again)


def _retry_callback(max_retry: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's retry of a dead worker's trial (same parameters), without the dead worker's records."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = cls(max_retry=max_retry)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        # the copied `worker` would name the dead process: until the new run stamps its own, any worker on
        # that host would judge the retry dead too and fail it again
        clean = copy.deepcopy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in RETRY_ATTRS}
        retry(study, clean)

    return callback


class FlockLock:
    """Journal-file lock by `fcntl.flock` on a side file: the kernel drops it when its holder dies, so a
    killed worker never leaves a stale lock behind (Optuna's symlink lock waits 30 s for one)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class HeartbeatRDBStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose heartbeat check leaves a `fail_reason` on each stale trial before Optuna fails it.

    Optuna fails a trial whose heartbeat went stale without a word in it; a worker killed before it stamped
    its own records on the trial is found only this way, and its trial would read as a FAIL without a cause.
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        reason = _silent_worker_reason(self.grace_period or 2 * (self.heartbeat_interval or 0))
        for trial_id in stale:
            # a finished trial (failed by another worker meanwhile) refuses the write: it has its reason already
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self.set_trial_user_attr(trial_id, "fail_reason", reason)
        return stale


def _silent_worker_reason(grace_s: float) -> str:
    """The `fail_reason` of a trial whose worker stopped beating without leaving a record of itself."""
    return f"its worker died: no heartbeat for over {grace_s:g} s"


def open_storage(url: str, *, heartbeat_s: int = 20, grace_s: int = 60, max_retry: int = 2) -> optuna.storages.BaseStorage:
    """An RDBStorage (SQLite timeout, heartbeat + retry of dead workers' trials) or a JournalStorage file."""
    if is_journal(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from optuna.storages.journal import JournalFileBackend
        except ImportError:  # optuna < 4
            from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore[no-redef]
        # the backend only calls acquire() and release(): any object with both is a lock to it
        try:
            lock: Any = FlockLock(path.with_name(path.name + ".flock"))
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        except (OSError, ValueError, KeyError, TypeError) as e:  # not a journal (any other .log), or no access
            raise ConfigError(f"not an Optuna journal file, or not readable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})", path=str(path),
                              field="storage") from None
    check_storage(url)
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # SQLite: wait for a busy database instead of failing; servers: drop dead pooled connections
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    retry = _retry_callback(max_retry)
    kw = ({"heartbeat_stale_trial_callback": retry} if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
          else {"failed_trial_callback": retry})
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    last: Exception | None = None
    for attempt in range(5):  # several workers creating the schema of a new database at once can collide
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return HeartbeatRDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                           grace_period=grace_s, **kw)
        except ImportError as e:
            raise ConfigError(f"cannot open {redact_url(url)}: {e} (install its driver: pip install 'psycopg[binary]' "
                              "for postgresql://, psycopg2-binary for postgresql+psycopg2://, PyMySQL for "
                              "mysql+pymysql://)", field="storage") from None
        except (SQLAlchemyError, ValueError, RuntimeError) as e:  # a wrong URL, a server down, a schema race,
            # or (RuntimeError) a database of another Optuna schema version
            last = e
            race = isinstance(e, IntegrityError) or "already exists" in str(e)
            if not (race or url.startswith("sqlite")):  # a server that cannot be reached does not come back soon
                break
            time.sleep(0.2 * (attempt + 1))
    raise ConfigError(f"cannot open {redact_url(url)}: {str(last).splitlines()[0][:300]}", field="storage")


def redact_url(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


@contextlib.contextmanager
def _storage_lock(url: str) -> Iterator[None]:
    """A file lock beside a local storage file (creating a study is then never a race); no-op for servers."""
    path = Path(url) if is_journal(url) else _sqlite_path(url)
    if path is None:
        yield
        return
    from latency_tables.table import file_lock

    # not `path`.lock: Optuna's journal lock uses that name
    with file_lock(path.with_name(path.name + ".create")):
        yield


def load_study(storage: str, study: str) -> optuna.Study:
    """An existing study (ConfigError naming the storage if it is not there)."""
    path = Path(storage) if is_journal(storage) else _sqlite_path(storage)
    if path is not None and not path.is_file():  # reading a study must not leave an empty database behind
        raise ConfigError("file not found", path=path, field="storage")
    st = open_storage(storage)
    try:
        return optuna.load_study(study_name=study, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        raise ConfigError(f"no study {study!r} in {redact_url(storage)} (studies: {', '.join(names) or 'none'})",
                          field="study") from None


def make_sampler(name: str, seed: int | None, constraints: Callable[[FrozenTrial], Sequence[float]] | None,
                 population: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `name`, with the latency constraint where the sampler supports one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, multivariate=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, constraints_func=constraints)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})", field="sampler")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of scratch mode (per-epoch mAP)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def constraint_of(trial: FrozenTrial) -> Sequence[float]:
    """The constraint values a trial recorded (<= 0: feasible): [predicted_ms - budget]."""
    return trial.user_attrs.get("constraint") or [0.0]


# ---- workers and dead trials ---------------------------------------------------------------------------------
def heartbeat_enabled(storage: Any) -> bool:
    """Whether Optuna records heartbeats in this storage (RDB storages opened by `open_storage`)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


def _proc_start(pid: int) -> str | None:
    """The start time of a process (/proc/PID/stat field 22), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] == "Z" else fields[19]


def _machine() -> dict[str, Any]:
    """What makes another process's pid visible here: the host, its boot, and this process's pid namespace."""
    # containers can share a host name (--network host) but never a pid namespace with their neighbours
    try:
        boot: str | None = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    try:
        pidns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": HOST, "boot": boot, "pidns": pidns}


MACHINE = _machine()


def worker_id() -> dict[str, Any]:
    """This process as a trial records it: host, boot, pid namespace, pid and start time (pids get reused)."""
    return {**MACHINE, "pid": os.getpid(), "start": _proc_start(os.getpid())}


def _local(w: Any) -> bool:
    """Whether worker record `w` names a process whose pid this process can look up."""
    return isinstance(w, dict) and all(w.get(k) == v for k, v in MACHINE.items())


def _is_me(w: Any) -> bool:
    """Whether worker record `w` is this process (not an earlier one given the same pid, as a restarted
    container's worker is: its start time differs)."""
    return _local(w) and w.get("pid") == os.getpid() and w.get("start") == _proc_start(os.getpid())


def _worker_dead(w: Any) -> bool:
    """Whether `w` is a process of this machine that is gone (elsewhere only heartbeats can tell)."""
    if not _local(w) or _is_me(w):
        return False
    start = _proc_start(int(w["pid"]))
    return start is None or (w.get("start") is not None and start != w["start"])


def recover_dead_trials(study: optuna.Study, grace_s: float, max_retry: int) -> list[int]:
    """Fail RUNNING trials whose worker is dead and re-queue them (same parameters); their numbers.

    A worker on this host is dead when its process is gone; elsewhere, RDB storages rely on Optuna's
    heartbeat, journal files on the `heartbeat` time this module's workers record in the trial.
    """
    heartbeat = heartbeat_enabled(study._storage)
    if heartbeat:  # Optuna checks heartbeats only when a trial starts; a waiting worker checks here too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    now, failed = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        dead = _worker_dead(w)
        # without a `worker` stamp the process died before the trial's first step, maybe before its first
        # Optuna heartbeat too, which fail_stale_trials then never sees: its start time is the last sign of life
        if not dead and (not heartbeat or w is None) and not _is_me(w):
            last = max(float(t.user_attrs.get("heartbeat") or 0.0),
                       t.datetime_start.timestamp() if t.datetime_start else now)
            dead = now - last > grace_s
        if not dead:
            continue
        storage = study._storage  # Optuna's own fail_stale_trials works on the storage the same way
        try:
            reason = f"worker {w} died while running the trial" if w else _silent_worker_reason(grace_s)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another worker failed it first
        _retry_callback(max_retry)(study, storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


@contextlib.contextmanager
def _attr_heartbeat(trial: Trial, interval: float) -> Iterator[None]:
    """Record `heartbeat` in the trial every `interval` seconds (for storages without Optuna heartbeats)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next one comes
                trial.set_user_attr("heartbeat", time.time())

    trial.set_user_attr("heartbeat", time.time())
    thread = threading.Thread(target=beat, daemon=True, name="detforge-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


# ---- evaluation ---------------------------------------------------------------------------------------------
def calibration_batches(data: Any, imgsz: int, batch: int, n: int, *, seed: int = 0, workers: int = 0,
                        device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """`n` shuffled training batches, letterboxed without augmentation, as floats in [0, 1] on `device`."""
    from trainer.datasets import YoloDataset, build_dataloader

    ds = YoloDataset.from_config(data, "train", imgsz=imgsz, augment=False, seed=seed)
    loader = build_dataloader(ds, batch, workers, shuffle=True, seed=seed)
    out: list[torch.Tensor] = []
    for imgs, *_ in loader:
        out.append(imgs.to(device).float() / 255.0)  # Supernet.recalibrate_bn feeds batches as they are
        if len(out) >= n:
            break
    return out


@dataclass
class _Counts:
    complete: int
    running: int
    waiting: int


def _counts(study: optuna.Study) -> _Counts:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    return _Counts(sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.RUNNING for t in trials),
                   sum(t.state == TrialState.WAITING for t in trials))


class _PruneReport(Callback):
    """Trainer callback of scratch mode: report each epoch's mAP to the trial and prune when told."""

    def __init__(self, trial: Trial):
        self.trial = trial

    def on_epoch_end(self, trainer: Any, epoch: int, row: dict[str, Any]) -> None:
        if "map" in row:
            self.trial.report(float(row["map"]), epoch)
            if self.trial.should_prune():
                self.trial.set_user_attr("pruned_at_epoch", epoch + 1)
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (mAP {row['map']:.4f})")


@dataclass
class Searcher:
    """Everything one worker needs to evaluate trials (loaded once, lazily)."""

    cfg: SearchConfig
    space: SearchSpace  # pinned to imgsz, with the dataset's nc
    imgsz: int
    nc: int
    names: list[str]
    data: Any  # DataConfig
    predict_ms: PredictMs
    supernet: Supernet | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    failures_in_a_row: int = 0
    last_failure: str = ""
    current_id: int | None = None  # the trial this worker runs (or ran last)
    current_number: int | None = None
    own_error: BaseException | None = None  # what the current trial's objective raised, if anything
    _bn: list[torch.Tensor] | None = None
    _val: Any = None
    _stats: dict[str, tuple[int, float]] = field(default_factory=dict)

    # ---- data -------------------------------------------------------------------------------------------
    def bn_batches(self) -> list[torch.Tensor]:
        """The same few training batches for every trial (see `calibration_batches`)."""
        if self._bn is None:
            self._bn = calibration_batches(self.data, self.imgsz, self.cfg.batch, self.cfg.bn_batches,
                                           seed=self.cfg.seed, workers=self.cfg.workers, device=self.device)
        return self._bn

    def val_loader(self) -> Any:
        """The validation loader (built once)."""
        if self._val is None:
            from trainer.datasets import YoloDataset, build_dataloader

            ds = YoloDataset.from_config(self.data, "val", imgsz=self.imgsz, seed=self.cfg.seed)
            self._val = build_dataloader(ds, self.cfg.batch, self.cfg.workers, shuffle=False, seed=self.cfg.seed)
        return self._val

    def check_data(self) -> None:
        """Scan both splits now: a bad dataset is one error before the study has trials, not one per trial."""
        if self.supernet is not None:
            self.bn_batches()  # needed by the first trial anyway
        else:
            from trainer.datasets import YoloDataset

            YoloDataset.from_config(self.data, "train", imgsz=self.imgsz, seed=self.cfg.seed)
        self.val_loader()

    def stats(self, arch: Architecture, arch_id: str) -> tuple[int, float]:
        """(params, GFLOPs) of an architecture at the search's input size (cached)."""
        if arch_id not in self._stats:
            from search_spaces.stats import model_stats

            s = model_stats(Detector(arch), self.imgsz)
            self._stats[arch_id] = (s.params, s.gflops)
        return self._stats[arch_id]

    def lost_trial(self, study: optuna.Study) -> bool:
        """Whether another worker failed the trial this one was running (it judged this worker dead)."""
        if self.current_id is None or self.own_error is not None:
            return False  # an objective that raised was failed here, by Optuna, for its own error
        return study._storage.get_trial(self.current_id).state == TrialState.FAIL

    def seed_points(self) -> list[tuple[str, dict[str, Any]]]:
        """The (name, open decisions) the study enqueues when it is created (`SearchConfig.enqueue`).

        Named points must exist (ConfigError naming `enqueue`); a point over the budget, one beyond
        `--trials`, or a default one that no longer fits the space is left out with a warning.
        """
        explicit = self.cfg.enqueue is not None
        trained = (self.supernet.trained_region or {}) if self.supernet is not None else {}
        names = self.cfg.enqueue if explicit else (SUPERNET_POINT,) if trained.get("largest_decisions") else ()
        points = []
        for name in dict.fromkeys(names):
            try:
                decisions = self._seed_decisions(name, trained)
            except ConfigError as e:
                if explicit:
                    raise ConfigError(f"cannot enqueue {name!r}: {e.line()}", field="enqueue") from None
                warnings.warn(f"not enqueueing the supernet's trained largest: {e.line()}", RuntimeWarning,
                              stacklevel=2)
                continue
            if self.cfg.budget_ms is not None and self.cfg.skip_infeasible:
                ms = float(self.predict_ms(self.space.build_arch(decisions, nc=self.nc)))
                if ms > self.cfg.budget_ms:  # it would spend a trial without an evaluation
                    warnings.warn(f"not enqueueing {name!r}: predicted {ms:.2f} ms, over the budget of "
                                  f"{self.cfg.budget_ms:g} ms", RuntimeWarning, stacklevel=2)
                    continue
            points.append((name, {k: v for k, v in decisions.items() if not self.space.decisions[k].fixed}))
        if len(points) > self.cfg.trials:
            warnings.warn(f"{len(points)} architectures to enqueue, {self.cfg.trials} trials: enqueueing the first "
                          f"{self.cfg.trials}", RuntimeWarning, stacklevel=2)
        return points[: self.cfg.trials]

    def _seed_decisions(self, name: str, trained: Mapping[str, Any]) -> dict[str, Any]:
        """The decisions of one enqueue name in the search's space (ConfigError if it has none there)."""
        if name != SUPERNET_POINT:
            return self.space.zoo_point(name, imgsz=self.imgsz)
        recorded = trained.get("largest_decisions")
        if not recorded:
            why = ("it was trained on the whole space (train it with --table and --budget-ms)"
                   if not trained else "its supernet.pt predates the record (retrain or resume it)")
            raise ConfigError(f"the supernet records no trained largest architecture: {why}", path=self.cfg.supernet,
                              field="largest_decisions")
        open_ = {k: v for k, v in recorded.items() if k in self.space.decisions and not self.space.decisions[k].fixed}
        return self.space.complete(open_)

    # ---- one trial --------------------------------------------------------------------------------------------
    def claim(self, trial: Trial) -> None:
        """Raise SurplusTrial if N trials are complete or ahead of this one (retries queued go first)."""
        # Optuna pops the queue lowest number first: the trials queued after a queued one are behind it,
        # while a fresh trial comes after every queued one
        queued = "fixed_params" in trial.study._storage.get_trial(trial._trial_id).system_attrs
        ahead = done = 0
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                                 TrialState.WAITING)):
            if t.number == trial.number:
                continue
            if t.state == TrialState.COMPLETE:
                done += 1
            elif t.number < trial.number or (t.state == TrialState.WAITING and not queued):
                ahead += 1
        if done + ahead >= self.cfg.trials:
            raise SurplusTrial(f"{done} trials complete and {ahead} ahead of this one reach --trials "
                               f"{self.cfg.trials}")

    def __call__(self, trial: Trial) -> tuple[float, ...] | float:
        """The objective: sample, predict latency, evaluate; errors become FAIL with `fail_reason`."""
        self.current_id, self.current_number, self.own_error = trial._trial_id, trial.number, None
        try:
            return self._run(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise  # another worker finished this trial meanwhile (see lost_trial)
        except BaseException as e:
            self.own_error = e
            raise

    def _run(self, trial: Trial) -> tuple[float, ...] | float:
        try:
            self.claim(trial)
        except SurplusTrial as e:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", f"surplus: {e}")
            raise
        trial.set_user_attr("worker", worker_id())
        beat = (contextlib.nullcontext() if heartbeat_enabled(trial.study._storage)
                else _attr_heartbeat(trial, self.cfg.heartbeat_s))
        try:
            with beat:
                values = self.evaluate(trial)
        except optuna.TrialPruned:
            self.failures_in_a_row = 0  # it trained and was scored: not a failure, and it ends a run of them
            raise
        except (DetforgeError, torch.cuda.OutOfMemoryError) as e:
            self.failures_in_a_row += 1
            self.last_failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            trial.set_user_attr("fail_reason", self.last_failure)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if self.cfg.progress:
                print(f"trial {trial.number} failed: {self.last_failure}", file=sys.stderr, flush=True)
            raise
        self.failures_in_a_row = 0
        return values

    def evaluate(self, trial: Trial) -> tuple[float, ...] | float:
        """Sample the architecture, record its attributes, score it; the objective values."""
        t0 = time.perf_counter()
        cfg = self.cfg
        decisions = self.space.sample_decisions(trial)
        arch = self.space.build_arch(decisions, nc=self.nc)
        arch_id = self.space.arch_id(decisions)
        predicted = float(self.predict_ms(arch))
        params, gflops = self.stats(arch, arch_id)
        attrs: dict[str, Any] = {"arch_id": arch_id, "arch": arch.to_yaml(), "predicted_ms": predicted,
                                 "params": params, "gflops": gflops}
        feasible = cfg.budget_ms is None or predicted <= cfg.budget_ms
        if cfg.budget_ms is not None:
            attrs["constraint"] = [predicted - cfg.budget_ms]
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if cfg.budget_ms is not None and NATIVE_CONSTRAINTS:
            with warnings.catch_warnings():  # a retried trial inherits the (equal) value: Optuna warns and keeps it
                warnings.simplefilter("ignore")
                trial.set_constraint("latency_ms", predicted - cfg.budget_ms)
        prior = self.evaluated_before(trial, arch_id) if cfg.reuse_evaluations else None
        if prior is not None:
            m, m50, evaluated = float(prior.user_attrs["map"]), float(prior.user_attrs["map50"]), True
            trial.set_user_attr("duplicate_of", prior.number)
            if "run_dir" in prior.user_attrs:  # where `detforge pareto` finds a scratch trial's model
                trial.set_user_attr("run_dir", prior.user_attrs["run_dir"])
        elif feasible or not cfg.skip_infeasible:
            m, m50 = self.score(trial, arch)
            evaluated = True
        else:  # dominated by every feasible trial under the constraint: not worth an evaluation
            m, m50, evaluated = 0.0, 0.0, False
        trial.set_user_attr("map", m if evaluated else None)
        trial.set_user_attr("map50", m50 if evaluated else None)
        trial.set_user_attr("evaluated", evaluated)
        trial.set_user_attr("eval_s", round(time.perf_counter() - t0, 3))
        if cfg.progress:
            state = f"map {m:.4f}  map50 {m50:.4f}" if evaluated else "over budget, not evaluated"
            if prior is not None:
                state += f" (trial {prior.number}'s, the same architecture)"
            print(f"trial {trial.number}: {arch_id}  {predicted:.2f} ms  {params / 1e6:.2f}M  {gflops:.2f} GFLOPs  "
                  f"{state}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        values = {"map": m, "latency": predicted, "params": float(params), "gflops": gflops}
        out = tuple(values[o] for o in cfg.objectives or ())
        return out[0] if len(out) == 1 else out

    @staticmethod
    def evaluated_before(trial: Trial, arch_id: str) -> FrozenTrial | None:
        """The first COMPLETE trial of the study that evaluated `arch_id` (samplers do draw an architecture
        twice: NSGA-II's crossover of two parents that agree, TPE's exploitation)."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("arch_id") == arch_id and a.get("evaluated") and "duplicate_of" not in a:
                return t
        return None

    def score(self, trial: Trial, arch: Architecture) -> tuple[float, float]:
        """(mAP50-95, mAP50) of `arch`: inherited weights after BN recalibration (then finetuned if asked),
        or a short training from scratch."""
        from trainer.evaluate import evaluate

        cfg = self.cfg
        if cfg.mode == "scratch":
            # reports each epoch's mAP to the pruner (single-objective studies, the scratch mode's)
            return self.train_trial(trial, Detector(arch), cfg.scratch_epochs, [_PruneReport(trial)])
        assert self.supernet is not None
        net = self.supernet
        net.set_active(arch)
        net.recalibrate_bn(self.bn_batches())
        if cfg.finetune_epochs:
            return self.train_trial(trial, net.extract(), cfg.finetune_epochs, autoanchor=False)  # inherited
        res = evaluate(net, self.val_loader(), self.nc, self.names, device=self.device, max_batches=cfg.val_batches)
        return float(res.metrics.map), float(res.metrics.map50)

    def train_trial(self, trial: Trial, model: Detector, epochs: int, callbacks: Sequence[Callback] = (),
                    autoanchor: bool = True) -> tuple[float, float]:
        """Train `model` for `epochs` in the trial's run directory: (mAP50-95, mAP50) of its last validation."""
        cfg = self.cfg
        # per study: one storage (and --out) holds several studies, whose trial numbers all start at 0
        out = trials_dir(cfg.out, trial.study.study_name) / f"{trial.number:05d}"
        trial.set_user_attr("run_dir", str(out.resolve()))  # where `detforge pareto` finds the model
        result = train_candidate(model, self.data_arg(), out, epochs, imgsz=self.imgsz, batch=cfg.batch, nbs=cfg.nbs,
                                 optimizer=cfg.optimizer, lr_schedule=cfg.lr_schedule, lr0=cfg.lr0,
                                 device=cfg.device, workers=cfg.workers, seed=cfg.seed, val_batches=cfg.val_batches,
                                 callbacks=callbacks, autoanchor=autoanchor)
        return float(result.metrics.map), float(result.metrics.map50)

    def data_arg(self) -> str | None:
        """The dataset as a TrainConfig names it (the resolved data.yaml; None: the built-in synthetic set)."""
        return str(self.data.yaml_path) if self.data.yaml_path else self.cfg.data


def train_candidate(model: Detector, data: str | None, out: str | Path, epochs: int, *, imgsz: int, batch: int = 16,
                    nbs: int = TrainConfig.nbs, device: str = "auto", workers: int = 0, seed: int = 0,
                    val_batches: int | None = None, callbacks: Sequence[Callback] = (),
                    autoanchor: bool = True, optimizer: str = TrainConfig.optimizer,
                    lr_schedule: str = TrainConfig.lr_schedule, lr0: float | None = TrainConfig.lr0) -> EvalResult:
    """Train a candidate (from its current weights) for `epochs` into `out`; its last validation result.

    Used by scratch-mode trials, finetuned supernet trials and the benchmarks that check them. `autoanchor`
    refits the anchors first where they match the boxes badly (off for inherited weights, trained with them).
    """
    from trainer.trainer import Trainer

    tcfg = TrainConfig(model=model.arch.name, data=data, out=str(out), epochs=epochs, imgsz=imgsz, batch=batch,
                       nbs=nbs, device=device, workers=workers, seed=seed, progress=False,
                       max_val_batches=val_batches, autoanchor=autoanchor, optimizer=optimizer,
                       lr_schedule=lr_schedule, lr0=lr0, exist_ok=True)  # a candidate starts afresh
    result = Trainer(tcfg, model=model, callbacks=list(callbacks)).train()
    if result.last is None:
        raise DetforgeError("training produced no validation result", field="epochs")
    return result.last


# ---- the search -------------------------------------------------------------------------------------------
def file_digest(path: str | None) -> str | None:
    """A short content hash of a local file (the same table or supernet may sit at other paths elsewhere)."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def trials_dir(out: str | Path, study: str) -> Path:
    """Where a study's trials train under a search's `out`: one directory per trial number."""
    return Path(out) / "trials" / _slug(study)


def _slug(name: str) -> str:
    """A study name as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _abs(path: str | None) -> str | None:
    """An existing local path made absolute (the pareto command may run elsewhere); anything else as given."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _study_settings(cfg: SearchConfig, space: SearchSpace, imgsz: int, nc: int) -> dict[str, Any]:
    return {"space": space.name, "space_path": space.source, "supernet": _abs(cfg.supernet), "table": _abs(cfg.table),
            "data": _abs(cfg.data), "budget_ms": cfg.budget_ms, "objectives": list(cfg.objectives or ()), "mode": cfg.mode,
            "imgsz": imgsz, "nc": nc, "trials": cfg.trials, "seed": cfg.seed, "batch": cfg.batch,
            "bn_batches": cfg.bn_batches, "val_batches": cfg.val_batches, "finetune_epochs": cfg.finetune_epochs,
            "scratch_epochs": cfg.scratch_epochs if cfg.mode == "scratch" else None,
            **_training_settings(cfg), "heartbeat_s": cfg.heartbeat_s,
            "table_sha": file_digest(cfg.table), "supernet_sha": file_digest(cfg.supernet),
            "data_sha": file_digest(cfg.data)}


# YOLOv7's, as TrainConfig states them: not recorded
TRAINING_DEFAULTS = {k: getattr(TrainConfig, k) for k in ("optimizer", "lr_schedule", "lr0")}


def _trials_train(cfg: SearchConfig) -> bool:
    """Whether the search's trials train: scratch mode, or inherited weights finetuned before validation."""
    return cfg.mode == "scratch" or cfg.finetune_epochs > 0


def _training_settings(cfg: SearchConfig) -> dict[str, Any]:
    """How the trials train (None where they do not): nbs, and the optimizer where it is not YOLOv7's default,
    so studies created before these were recorded keep matching."""
    trains = _trials_train(cfg)
    out: dict[str, Any] = {"nbs": cfg.nbs if trains else None}
    for key, default in TRAINING_DEFAULTS.items():
        value = getattr(cfg, key)
        if trains and value != default:
            out[key] = value
    return out


def _unused_training_settings(cfg: SearchConfig) -> list[str]:
    """The training settings set away from their defaults in a search whose trials train nothing."""
    if _trials_train(cfg):
        return []
    return [k for k in ("nbs", *TRAINING_DEFAULTS) if getattr(cfg, k) != getattr(TrainConfig, k)]


NOT_RECORDED = object()  # a setting a study created before it was recorded cannot be compared on
# values in studies created before they were recorded
SETTINGS_BEFORE = {"finetune_epochs": 0, "val_batches": None, "scratch_epochs": NOT_RECORDED, "nbs": NOT_RECORDED,
                   "heartbeat_s": NOT_RECORDED, "seed": NOT_RECORDED}
# Settings that change a trial's score: workers that differ in one would mix incomparable mAPs into one front.
# seed too: it draws the calibration batches and the trials' trainings, and `pareto --export` recalibrates with
# the creator's. heartbeat_s too: a worker judges the others' trials dead by its own interval and grace.
SHARED_SETTINGS = ("space", "objectives", "mode", "budget_ms", "imgsz", "nc", "finetune_epochs", "bn_batches",
                   "val_batches", "batch", "scratch_epochs", "nbs", "optimizer", "lr_schedule", "lr0", "heartbeat_s",
                   "seed")
SETTINGS_WAIT_S = 30.0  # how long a joining worker waits for the creator to record the study's settings


def _check_settings(study: optuna.Study, mine: dict[str, Any], created: bool = True) -> None:
    """Refuse to join a study created by a different search (paths may differ between machines)."""
    theirs = study.user_attrs.get(STUDY_ATTR)
    deadline = time.monotonic() + (0.0 if created else SETTINGS_WAIT_S)
    while not theirs and time.monotonic() < deadline:  # the creator records them right after creating it
        time.sleep(0.5)
        theirs = study.user_attrs.get(STUDY_ATTR)  # read from the storage on every access
    if not theirs:
        study.set_user_attr(STUDY_ATTR, mine)
        return
    for key in SHARED_SETTINGS:
        recorded = theirs.get(key, SETTINGS_BEFORE.get(key))
        if recorded is not NOT_RECORDED and recorded != mine.get(key):
            shown = TRAINING_DEFAULTS.get(key)  # a default optimizer setting is not written (_training_settings)
            raise ConfigError(f"study {study.study_name!r} was created with {key}={theirs.get(key, shown)!r}, this "
                              f"search has {mine.get(key, shown)!r}: use another --study", field=key)
    if (theirs.get("data") is None) != (mine.get("data") is None):  # the built-in synthetic set against a file
        raise ConfigError(f"study {study.study_name!r} was searched on {theirs.get('data') or 'the built-in synthetic set'}"
                          f", this search on {mine.get('data') or 'the built-in synthetic set'}: every worker must "
                          "use the same data", field="data")
    for key, what in (("table_sha", "table"), ("supernet_sha", "supernet"), ("data_sha", "data")):  # any path
        if theirs.get(key) and mine.get(key) and theirs[key] != mine[key]:
            raise ConfigError(f"study {study.study_name!r} was searched with another {what} file ({theirs.get(what)}): "
                              "every worker must use the same one", field=what)


def prepare(cfg: SearchConfig, *, predictor: PredictMs | None = None, supernet: Supernet | None = None
            ) -> Searcher:
    """Load the space, supernet, data and latency predictor of a search (ConfigErrors before any trial)."""
    from trainer.trainer import resolve_data_config

    unused = _unused_training_settings(cfg)
    if unused:
        warnings.warn(f"{', '.join(unused)} ignored: in supernet mode the trials train only with finetune_epochs "
                      "(--finetune-epochs)", RuntimeWarning, stacklevel=2)
    if supernet is None and cfg.mode == "supernet":
        supernet = load_supernet(cfg.supernet, space=cfg.space)  # refuses a space it was not trained on
    space = supernet.space if supernet is not None and cfg.mode == "supernet" else load_space(cfg.space)
    imgsz = cfg.imgsz
    from_table = predictor is None
    if predictor is None:
        if not cfg.table:
            raise ConfigError("a latency table is needed (detforge latency build)", field="table")
        predictor, imgsz = table_predictor(cfg.table, cfg.imgsz)
    imgsz = imgsz or max(space.decisions["imgsz"].choices)
    data = resolve_data_config(cfg.data, imgsz)
    nc = data.nc
    if cfg.nc is not None and cfg.nc != nc:
        raise ConfigError(f"the dataset has {nc} classes, the search asks for {cfg.nc}", field="nc")
    if supernet is not None and cfg.mode == "supernet" and supernet.nc != nc:
        raise ConfigError(f"the supernet has nc={supernet.nc}, the dataset {nc}", path=cfg.supernet, field="nc")
    predictor, space = space_predictor(predictor, space, nc, imgsz, cfg.table if from_table else None)
    fastest = predictor(space.smallest())  # a table for another space fails here, not per trial
    predictor(space.largest())
    trained = supernet.trained_region if supernet is not None and cfg.mode == "supernet" else None
    if trained and (cfg.budget_ms is None or cfg.budget_ms > trained["budget_ms"]):
        warnings.warn(f"the supernet was trained on the architectures within {trained['budget_ms']:g} ms only; "
                      f"with a budget of {cfg.budget_ms} ms the search scores others with untrained weights",
                      RuntimeWarning, stacklevel=2)
    if cfg.budget_ms is not None and fastest > cfg.budget_ms:
        warnings.warn(f"budget_ms={cfg.budget_ms:g} is below the space's smallest architecture ({fastest:.2f} ms "
                      "predicted): most or all trials will be over budget and the front may be empty",
                      RuntimeWarning, stacklevel=2)
    device = resolve_device(cfg.device)
    if supernet is not None:
        supernet.to(device)
    searcher = Searcher(cfg=cfg, space=space, imgsz=imgsz, nc=nc, names=list(data.names), data=data,
                        predict_ms=predictor, supernet=supernet if cfg.mode == "supernet" else None, device=device)
    searcher.check_data()
    return searcher


def create_study(cfg: SearchConfig, searcher: Searcher) -> optuna.Study:
    """Create or join the study (every worker runs this; the settings must agree)."""
    url = cfg.storage or default_storage(cfg.out)
    storage = open_storage(url, heartbeat_s=cfg.heartbeat_s, grace_s=cfg.grace_s, max_retry=cfg.max_retry)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial (progress) instead of 60 params
    quiet_own_failures()
    # Optuna >= 5 reads constraints the trial set (Trial.set_constraint); older ones call constraints_func
    constraints = constraint_of if cfg.budget_ms is not None and not NATIVE_CONSTRAINTS else None
    population = cfg.population or min(max(cfg.trials // 4, 4), 50)
    pruner = make_pruner(cfg.pruner, cfg.scratch_epochs) if cfg.mode == "scratch" else None
    directions = [OBJECTIVES[o] for o in cfg.objectives or ()]
    with _storage_lock(url):
        # exactly one worker creates the study (the storage refuses a second one): it samples with --seed as
        # given, so a one-worker search is reproducible; every other worker (or a resumed run) mixes its pid
        # in, so that no two draw the same sequence
        points = searcher.seed_points()  # a bad name fails before the study exists
        try:
            optuna.create_study(storage=storage, study_name=cfg.study, directions=directions)
            seed, created = cfg.seed, True
        except optuna.exceptions.DuplicatedStudyError:
            seed, created = (cfg.seed * 1_000_003 + os.getpid()) % 2**31, False
        sampler = make_sampler(cfg.sampler or "nsga2", seed, constraints, population)
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner)
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(f"study {cfg.study!r} optimises {[d.name.lower() for d in study.directions]}, this "
                              f"search {directions}: use another --study", field="study")
        _check_settings(study, _study_settings(cfg, searcher.space, searcher.imgsz, searcher.nc), created)
        if created:  # only the creator enqueues, under the lock: a joining or resumed worker adds none
            for name, params in points:
                study.enqueue_trial(params, user_attrs={"enqueued": name}, skip_if_exists=True)
        elif cfg.enqueue:
            warnings.warn(f"study {cfg.study!r} exists: --enqueue applies to a new study only", RuntimeWarning,
                          stacklevel=2)
    return study


def run_search(cfg: SearchConfig, *, predictor: PredictMs | None = None, supernet: Supernet | None = None,
               study_callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> optuna.Study:
    """Run (or join, or resume) the study until it holds `cfg.trials` COMPLETE trials; return it."""
    searcher = prepare(cfg, predictor=predictor, supernet=supernet)
    study = create_study(cfg, searcher)

    def stop_on_surplus(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("surplus") or searcher.failures_in_a_row >= cfg.max_failures:
            study.stop()

    callbacks = [optuna.study.MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE,)), stop_on_surplus,
                 *study_callbacks]
    catch = CAUGHT
    while True:
        recover_dead_trials(study, cfg.grace_s, cfg.max_retry)
        n = _counts(study)
        if n.complete >= cfg.trials:
            break
        if searcher.failures_in_a_row >= cfg.max_failures:
            raise DetforgeError(f"{searcher.failures_in_a_row} trials in a row failed; the last: "
                                f"{searcher.last_failure}", field="trials")
        free = cfg.trials - n.complete - n.running
        # other workers hold the remaining trials: wait for them (or their death). A queued retry waits too: run
        # now, claim() would close it as surplus, and the dead trial's architecture would never be scored.
        if free <= 0:
            time.sleep(cfg.poll_s)
            continue
        try:
            study.optimize(searcher, n_trials=max(free, 1), catch=catch, callbacks=callbacks, gc_after_trial=False)
        except (ValueError, AssertionError) as e:
            # Optuna cannot tell a trial that is already finished: another worker judged this one dead (a
            # missed heartbeat) and failed it, and a retry is queued. Not an error of this worker: go on.
            # (Failed after the objective returned, Optuna's own bookkeeping asserts instead of raising that.)
            told = isinstance(e, AssertionError) or str(e).startswith("Cannot tell a")
            if not (told and searcher.lost_trial(study)):
                raise
            if cfg.progress:
                print(f"trial {searcher.current_number} was failed by another worker meanwhile; continuing",
                      file=sys.stderr, flush=True)
    return study


def trial_rows(study: optuna.Study, states: Sequence[TrialState] = (TrialState.COMPLETE,)) -> list[dict[str, Any]]:
    """One plain row per trial: number, state, arch_id, map, map50, predicted_ms, params, gflops, fail_reason."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=tuple(states)):
        a = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name, "arch_id": a.get("arch_id"), "map": a.get("map"),
                     "map50": a.get("map50"), "predicted_ms": a.get("predicted_ms"), "params": a.get("params"),
                     "gflops": a.get("gflops"), "feasible": max(constraint_of(t)) <= 0,
                     "fail_reason": a.get("fail_reason")})
    return rows


def summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state and the settings of a study."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        if "duplicate_of" in t.user_attrs:
            counts["reused"] = counts.get("reused", 0) + 1
    return {"study": study.study_name, **counts, "settings": study.user_attrs.get(STUDY_ATTR, {})}


__all__ = ["OBJECTIVES", "SAMPLERS", "SUPERNET_POINT", "SearchConfig", "Searcher", "SurplusTrial", "calibration_batches", "constraint_of", "create_study",
           "default_storage", "file_digest", "heartbeat_enabled", "load_study", "make_pruner", "make_sampler", "open_storage", "pinned_space",
           "prepare", "recover_dead_trials", "redact_url", "run_search", "summary", "trial_rows"]
