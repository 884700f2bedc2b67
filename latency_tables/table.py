"""`LatencyTable`: block latencies measured on one device, summed and corrected to predict whole detectors."""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from search_spaces.errors import ConfigError, DetforgeError
from search_spaces.io import atomic_write_json, read_json

from .backends import Backend, get_backend
from .fingerprint import DeviceFingerprint, check_fingerprint
from .measurement import (
    LoadMonitor,
    Measurement,
    MeasurementConfig,
)
from .predictor import OverheadModel, fit_overhead

if TYPE_CHECKING:
    from search_spaces import Architecture

SCHEMA = "detforge.latency_table"
SCHEMA_VERSION = 2  # 2: a YOLO head level is keyed by its anchor count, not its anchor sizes (1 is read and migrated)
TABLES_DIR = Path(__file__).resolve().parent / "tables"  # tables shipped with the package
BLOCK_GROUP = 8  # blocks measured interleaved together
MODEL_GROUP = 4  # whole models measured interleaved together (where the backend interleaves)
MODEL_PASSES = 3  # passes over the whole models of a fit or a validation; each model's fastest pass counts
FIT_MODELS = 16  # whole models the overhead is fitted on (three coefficients: a few models per coefficient)
SAVE_EVERY_S = 10.0  # a build saves at most this often (a save re-reads, merges and rewrites the whole file)
FIT_PASSES = "fit_passes"  # info key: the overhead fit's finished passes (medians per model), until it is fitted
FIT_SEED = 1234  # a different stream from validate()'s default seed 0, so fit and validation models differ

# The protocol `detforge latency build` uses: thousands of blocks, so each stops at a 2 % CI of the median or
# after 300 rounds / 8 s per group (a 1 % CI needs hundreds more runs of a noisy 20 us block for no better
# sum).
BUILD_PROTOCOL = MeasurementConfig(warmup=5, warmup_s=0.1, min_runs=15, max_runs=300, max_time_s=8.0,
                                   target_rel_ci=0.02)
# The protocol settings that shape a measured median (not the load-retry policy): a resumed table keeps them.
STATISTIC_SETTINGS = ("warmup", "warmup_s", "min_runs", "max_runs", "max_time_s", "target_rel_ci", "confidence",
                      "outlier_k", "repeats")
QUIET_WINDOW_S = 1.0  # how long the machine is watched before a group is measured
REALTIME_PRIORITY = 10  # SCHED_FIFO priority of timed runs with realtime=True (low among real-time tasks)

EntryCallback = Callable[[str, Measurement], None]


def arch_signatures(arch: Architecture, imgsz: int, batch: int = 1) -> list[Any]:
    """Per-layer block signatures of `arch`, head levels included (search_spaces.space.arch_signatures)."""
    from search_spaces.space import arch_signatures as signatures  # lazy: the search space imports torch

    return signatures(arch, imgsz, batch)


def sample_shapes(sig: Any) -> list[tuple[int, ...]]:
    """Per-sample input shapes (C, H, W) of a block signature, whose input_shapes() include the batch."""
    return [tuple(int(d) for d in s[1:]) for s in sig.input_shapes()]


def eval_signatures(arch: Architecture, imgsz: int, batch: int = 1) -> list[Any]:
    """The signatures of the layers an eval-mode forward pass runs, then the head levels."""
    # arch_signatures lists every layer; an auxiliary head's branch (IAuxDetect) is training-only and is not
    # part of the latency, so the layers the deploy form drops are left out.
    sigs = arch_signatures(arch, imgsz, batch)
    n = len(arch.layers)
    if len(sigs) < n:  # not one per layer: nothing to filter by position
        return sigs
    kept = set(arch.deploy_layers())
    return [s for i, s in enumerate(sigs) if i >= n or i in kept]


def resolve_architecture(arch: Architecture | str | Path) -> Architecture:
    """An Architecture, or the one named by a zoo name / architecture YAML / model directory."""
    from search_spaces import Architecture, resolve_arch

    return arch if isinstance(arch, Architecture) else resolve_arch(arch)[0]


def make_backend(name: str, *, threads: int | None = 2, precision: str = "fp32", **kw: Any) -> Backend:
    """get_backend with the settings a table records (TensorRT takes no thread count)."""
    if name != "tensorrt":
        kw["threads"] = threads
    return get_backend(name, precision=precision, **kw)


# ---- what gets measured
# --------------------------------------------------------------------------------------
def deploy_ready(module: nn.Module, fuse: bool = True) -> nn.Module:
    """`module` in eval mode, with Conv+BN, RepConv and implicit layers folded in place when `fuse`."""
    # Blocks and whole models go through the same folding, so a table's entries add up to what is deployed.
    module.eval()
    if fuse:
        for sub in list(module.modules()):
            fold = getattr(sub, "fuse", None)
            if callable(fold):
                fold()
    return module


class DecodedOutput(nn.Module):
    """A Detector in eval mode returning only its decoded tensor `[B, N, 5 + nc]` (one ONNX output)."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.det = det

    def forward(self, x: Tensor) -> Tensor:
        """Decoded predictions; the raw levels are computed on the way but not returned."""
        return self.det(x)[0]


class FirstOutput(nn.Module):
    """A block whose output is a tuple (a head level returns decoded and raw) reduced to its first tensor."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *xs: Tensor) -> Tensor:
        """The block's output, or the first element of it."""
        y = self.block(*xs)
        return y[0] if isinstance(y, (tuple, list)) else y


class EmptyModel(nn.Module):
    """One elementwise op on one number: what a backend charges for a call, with nothing to compute."""

    def forward(self, x: Tensor) -> Tensor:
        """x + 1."""
        return x + 1.0


EMPTY_SHAPE = (1, 1, 1)


def block_model(sig: Any, fuse: bool = True) -> nn.Module:
    """A block signature's module as a table times it: eval, folded, one output (like the whole model)."""
    return FirstOutput(deploy_ready(sig.build_module(), fuse)).eval()


def decoded_model(det: nn.Module, fuse: bool = True) -> nn.Module:
    """A Detector as tables time it: eval mode, folded when `fuse` (in place), returning decoded boxes."""
    return DecodedOutput(deploy_ready(det, fuse)).eval()


def whole_model(arch: Architecture, fuse: bool = True) -> nn.Module:
    """The end-to-end model a table predicts for `arch` (a fresh Detector, see decoded_model)."""
    from search_spaces import Detector

    return decoded_model(Detector(arch.copy()), fuse)  # a copy: folding marks the Detector's arch as fused


def empty_model() -> nn.Module:
    """A model that does nothing worth timing, to measure the per-call cost every block entry includes."""
    return EmptyModel().eval()


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most n items."""
    for i in range(0, len(items), max(1, n)):
        yield items[i:i + n]


def wait_for_quiet(max_other_load: float, *, window_s: float = QUIET_WINDOW_S, timeout_s: float | None = None,
                   monitor: LoadMonitor | None = None) -> float | None:
    """Block until other processes use at most `max_other_load` of the CPU over a window; the last reading."""
    # Cheaper than letting the protocol measure a whole repeat, find it was busy and throw it away: on a
    # shared 2-vCPU machine a 2-thread model runs several times slower while anything else runs
    # (docs/latency.md).
    mon = monitor or LoadMonitor()
    t0 = time.perf_counter()
    while True:
        mon.start()
        time.sleep(window_s)
        load = mon.stop()
        if load is None or load <= max_other_load:
            return load
        if timeout_s is not None and time.perf_counter() - t0 >= timeout_s:
            return load


def _thread_ids() -> list[int]:
    """Kernel ids of this process's threads (the main thread, ORT's and torch's pools, ...)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


@contextlib.contextmanager
def realtime_priority(enabled: bool = True, priority: int = REALTIME_PRIORITY) -> Iterator[bool]:
    """Run the block under SCHED_FIFO (every thread of this process) where permitted; yields whether it is."""
    # On a shared machine a 2-thread model runs several times slower whenever another process holds a core,
    # and waiting for a quiet machine may never end; at real-time priority the timed runs preempt other work
    # (the kernel still leaves others 5 % of each second). Only the timed runs are elevated, so others keep
    # the machine while models are exported and sessions built. Without the permission this is a no-op.
    if not enabled or not hasattr(os, "sched_setscheduler") or os.sched_getscheduler(0) != os.SCHED_OTHER:
        yield False
        return
    done = False
    try:
        for tid in _thread_ids():
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
                done = True
        yield done
    finally:
        for tid in _thread_ids():  # threads started meanwhile inherited the policy: reset them too
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def measure_group(pairs: Mapping[str, tuple[Any, Sequence | None]], backend: Backend, *, batch: int = 1,
                  realtime: bool = False) -> dict[str, Measurement]:
    """Measure (model, input shapes) pairs like Backend.measure_many (round-robin where the backend interleaves).

    Only the timed runs (not the export and session set-up) run at real-time priority with `realtime`.
    """
    def prepare(model: Any, shapes: Sequence | None) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=Warning, module=r"torch\..*")  # tracer notes per block
            return backend.prepare(model, None if shapes is None else [tuple(s) for s in shapes], batch)

    runners = {}
    try:
        for k, (model, shapes) in pairs.items():
            runners[k] = prepare(model, shapes)
        with realtime_priority(realtime):
            res = backend.measure_prepared(runners)
    finally:
        for r in runners.values():
            r.close()
    assert isinstance(res, dict)
    return res


def measure_modules(items: Mapping[str, tuple[Callable[[], nn.Module], Sequence]], backend: Backend, *,
                    batch: int = 1, group: int = BLOCK_GROUP, progress: bool = False, desc: str = "measuring",
                    on_group: Callable[[dict[str, Measurement]], None] | None = None,
                    skip: Callable[[str], bool] | None = None, realtime: bool = False
                    ) -> dict[str, Measurement]:
    """Measure keyed (module factory, input shapes) pairs, `group` at a time; `on_group` after each group."""
    # Modules are built per group, so a table of thousands of blocks never holds them all in memory; `skip` is
    # asked again before every group, so keys that appeared meanwhile (another build) are not measured twice.
    # With the backend's config.max_other_load set (and not `realtime`), each group first waits for the
    # machine to be that quiet.
    from tqdm import tqdm

    cfg = backend.config
    limit = cfg.max_other_load if cfg.check_load and not realtime else None
    keys = list(items)
    out: dict[str, Measurement] = {}
    with tqdm(total=len(keys), desc=desc, file=sys.stderr, disable=not progress, unit="model",
              dynamic_ncols=True) as bar:
        for chunk in _chunks(keys, group):
            todo = [k for k in chunk if skip is None or not skip(k)]
            if todo:
                pairs = {k: (items[k][0](), items[k][1]) for k in todo}
                if limit is not None:
                    wait_for_quiet(limit, timeout_s=cfg.max_retries * max(cfg.retry_wait_s, 1.0))
                res = measure_group(pairs, backend, batch=batch, realtime=realtime)
                out.update(res)
                if on_group is not None:
                    on_group(res)
            bar.update(len(chunk))
    return out


def fastest_pass(ms: Sequence[Measurement]) -> Measurement:
    """The pass with the lowest median latency, listing every pass's median in repeat_medians_ms."""
    # Other work on a shared machine (other VMs on the host too, which no priority keeps out) only ever slows
    # a pass down, for seconds or minutes at a time; the fastest of passes minutes apart is the one that ran
    # clean. With real-time priority the passes of a clean model agree within about 1 %.
    best = min(ms, key=lambda m: m.median_ms)
    return replace(best, repeat_medians_ms=[m.median_ms for m in ms], repeats=sum(m.repeats for m in ms))


def measure_architectures(archs: Sequence[Architecture], backend: Backend, imgsz: int, *, batch: int = 1,
                          group: int = MODEL_GROUP, fuse: bool = True, progress: bool = False,
                          desc: str = "whole models", realtime: bool = False,
                          passes: int = MODEL_PASSES) -> list[Measurement]:
    """End-to-end latency of each architecture (decoded output, folded): the fastest of `passes` passes."""
    # Each pass measures every model once, so a model's passes lie minutes apart and rarely share an episode
    # of slow seconds on a shared machine (see fastest_pass).
    items = {str(i): ((lambda a=a: whole_model(a, fuse)), [(a.in_channels, imgsz, imgsz)])
             for i, a in enumerate(archs)}
    runs = [measure_modules(items, backend, batch=batch, group=group, progress=progress, realtime=realtime,
                            desc=desc if passes == 1 else f"{desc} (pass {p + 1}/{passes})")
            for p in range(passes)]
    return [fastest_pass([r[str(i)] for r in runs]) for i in range(len(archs))]


def measure_call_overhead(backend: Backend, batch: int = 1, realtime: bool = False) -> Measurement:
    """The latency of the empty model on `backend`: the per-call cost inside every block entry."""
    pair = {"empty": (empty_model(), [EMPTY_SHAPE])}
    return measure_group(pair, backend, batch=batch, realtime=realtime)["empty"]


# ---- the table
# -------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A predicted end-to-end latency and how it was put together."""

    predicted_ms: float
    sum_ms: float  # sum of block entries, net of the per-call overhead
    a_ms: float
    b: float
    c_ms: float
    blocks: list[tuple[str, float]] = field(default_factory=list)  # (signature key, net ms) per layer

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["blocks"] = [{"key": k, "ms": v} for k, v in self.blocks]
        return d


# a head level's key before version 2: `head.yolo(anchors=[w,h,...],implicit=...,nc=...,stride=...)|...`
_OLD_HEAD_KEY = re.compile(r"^head\.yolo\(anchors=(\[[^\]]*\]),(implicit=(?:true|false)),(.*)$")


def canonical_key(key: str) -> str:
    """A signature key as this version writes it: tables before version 2 keyed a YOLO head level by its anchor
    sizes, which do not change its time (an AutoAnchor refit would have missed every entry)."""
    m = _OLD_HEAD_KEY.match(key)
    if m is None:
        return key
    return f"head.yolo({m.group(2)},na={len(json.loads(m.group(1))) // 2},{m.group(3)}"


def _canonical_signature(d: Any) -> Any:
    if not isinstance(d, dict) or d.get("block") != "head.yolo" or not isinstance(d.get("args"), dict) \
            or "anchors" not in d["args"]:
        return d
    args = d["args"]
    rest = {k: v for k, v in args.items() if k != "anchors"}
    return {**d, "args": {**rest, "na": len(args["anchors"] or []) // 2}}


@dataclass
class LatencyTable:
    """Block latencies keyed by signature, measured on one device, plus the overhead model fitted on it."""

    fingerprint: DeviceFingerprint
    backend: str
    imgsz: int
    batch: int = 1
    precision: str = "fp32"
    threads: int | None = None
    fused: bool = True  # blocks and whole models were measured folded (Conv+BN, RepConv, implicit)
    space: str | None = None
    entries: dict[str, Measurement] = field(default_factory=dict)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> BlockSignature.to_dict()
    overhead: OverheadModel = field(default_factory=OverheadModel)
    protocol: dict[str, Any] = field(default_factory=dict)  # the MeasurementConfig of the entries
    info: dict[str, Any] = field(default_factory=dict)  # created, updated, build_s, source
    path: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if any(_OLD_HEAD_KEY.match(k) for k in self.entries) or any(_OLD_HEAD_KEY.match(k) for k in self.signatures):
            entries: dict[str, Measurement] = {}
            for k, m in self.entries.items():  # heads that differed only in anchors: their least disturbed timing
                new = canonical_key(k)
                if new not in entries or m.median_ms < entries[new].median_ms:
                    entries[new] = m
            self.entries = entries
            self.signatures = {canonical_key(k): _canonical_signature(v) for k, v in self.signatures.items()}

    # ---- container
    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of entries."""
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        """Whether a signature (or its key) has an entry."""
        k = key if isinstance(key, str) else getattr(key, "key", lambda: None)()
        return k in self.entries

    def add(self, sig: Any, m: Measurement) -> None:
        """Store the measurement of one block signature."""
        k = sig.key()
        self.entries[k] = m
        self.signatures[k] = sig.to_dict()

    def backend_instance(self, **kw: Any) -> Backend:
        """A backend with this table's settings (backend name, threads, precision), to measure more."""
        return make_backend(self.backend, threads=self.threads, precision=self.precision, **kw)

    def measurement_config(self) -> MeasurementConfig:
        """The protocol the entries were measured with (defaults for what an older table did not record)."""
        known = {f.name for f in fields(MeasurementConfig)}
        return MeasurementConfig(**{k: v for k, v in self.protocol.items() if k in known})

    # ---- prediction
    # -----------------------------------------------------------------------------------------
    def missing(self, arch: Architecture | str | Path, imgsz: int | None = None) -> list[Any]:
        """Signatures of `arch` that have no entry."""
        return [s for s in self._signatures(arch, imgsz) if s.key() not in self.entries]

    def _signatures(self, arch: Architecture | str | Path, imgsz: int | None) -> list[Any]:
        """Per-layer signatures of `arch` at this table's batch."""
        return eval_signatures(resolve_architecture(arch), imgsz or self.imgsz, self.batch)

    def breakdown(self, arch: Architecture | str | Path, imgsz: int | None = None, *,
                  measure_missing: bool = False, backend: Backend | None = None) -> Prediction:
        """The prediction for `arch` with its per-block terms; missing entries raise or get measured."""
        sigs = self._signatures(arch, imgsz)
        keys = [s.key() for s in sigs]
        absent = list({k: s for k, s in zip(keys, sigs) if k not in self.entries}.values())
        if absent and not measure_missing:
            other = imgsz not in (None, self.imgsz)
            where = f" (the table was measured at imgsz {self.imgsz})" if other else ""
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise ConfigError(f"no entry for block signature {absent[0].key()}{more}{where}; rebuild the "
                              "table for this search space (detforge latency build) or time the missing blocks "
                              "(`latency predict --measure-missing`; measure_missing=True from Python)",
                              path=self.path, field="entries")
        if absent:
            if backend is None:  # timed as the other entries were, or they would not add up alike
                backend = self.backend_instance(config=self.measurement_config())
                if not self.fingerprint.same_device(backend.fingerprint(self.batch)):
                    # entries timed here would be mixed into another device's table, silently wrong there
                    raise ConfigError(f"no entry for block signature {absent[0].key()}, and this table is of "
                                      f"another device ({self.fingerprint.slug()}): measure the missing blocks "
                                      "there (detforge latency pack + import) or pass a backend", path=self.path,
                                      field="entries")
            self.measure_signatures(absent, backend)
        blocks = [(k, self.overhead.net(self.entries[k].median_ms)) for k in keys]
        total = math.fsum(ms for _, ms in blocks)
        om = self.overhead
        return Prediction(om.apply(total, len(blocks)), total, om.a_ms, om.b, om.c_ms, blocks)

    def predict(self, arch: Architecture | str | Path, imgsz: int | None = None, *,
                measure_missing: bool = False, backend: Backend | None = None) -> float:
        """Predicted end-to-end latency of `arch` in ms: a + b * sum(entries - call overhead) + c * blocks."""
        return self.breakdown(arch, imgsz, measure_missing=measure_missing, backend=backend).predicted_ms

    def block_sum(self, arch: Architecture | str | Path, imgsz: int | None = None) -> float:
        """Sum of the net block entries of `arch` (before the overhead model)."""
        return self.breakdown(arch, imgsz).sum_ms

    # ---- measuring
    # ------------------------------------------------------------------------------------------
    def measure_signatures(self, sigs: Sequence[Any], backend: Backend, *, group: int = BLOCK_GROUP,
                           progress: bool = False, after_group: Callable[[], None] | None = None,
                           callback: EntryCallback | None = None, only_missing: bool = True,
                           realtime: bool = False) -> None:
        """Measure block signatures on `backend` into this table, by group (skipping present keys)."""
        # `after_group` runs once a group is stored (build saves there), then `callback` sees each new entry.
        by_key = {s.key(): s for s in sigs}
        items = {k: ((lambda s=s: block_model(s, self.fused)), sample_shapes(s)) for k, s in by_key.items()}

        def store(res: dict[str, Measurement]) -> None:
            for k, m in res.items():
                self.add(by_key[k], m)
            if after_group is not None:
                after_group()
            if callback is not None:
                for k, m in res.items():
                    callback(k, m)

        measure_modules(items, backend, batch=self.batch, group=group, progress=progress,
                        desc="latency blocks", on_group=store,
                        skip=self.entries.__contains__ if only_missing else None, realtime=realtime)

    def fit(self, archs: Sequence[Architecture], measured: Sequence[Measurement | float]) -> OverheadModel:
        """Fit the overhead model on whole architectures and their measured end-to-end latencies."""
        parts = [self.breakdown(a) for a in archs]
        ms = [m.median_ms if isinstance(m, Measurement) else float(m) for m in measured]
        self.overhead = fit_overhead([p.sum_ms for p in parts], ms, blocks=[len(p.blocks) for p in parts],
                                     call_overhead_ms=self.overhead.call_overhead_ms,
                                     archs=[a.to_dict() for a in archs])
        return self.overhead

    def fit_space(self, space: Any, backend: Backend, n: int = FIT_MODELS, seed: int = FIT_SEED, *,
                  progress: bool = False, realtime: bool = False, remeasure: bool = False,
                  after_pass: Callable[[], None] | None = None,
                  archs: Sequence[Architecture] | None = None) -> OverheadModel:
        """Fit the overhead on `n` architectures of `space` (or on `archs`, drawn so already), measuring those the
        stored fit lacks (or all).

        Each model is measured in MODEL_PASSES passes and its fastest counts (see fastest_pass). The finished
        passes are kept in `info["fit_passes"]` and `after_pass` runs after each (build saves there), so a
        killed fit continues at the pass it was in.
        """
        # The space's smallest and largest first (they pin the line's ends), then seeded random ones; a
        # model's end-to-end latency does not depend on the entries, so earlier fit measurements are reused.
        archs = list(archs) if archs is not None else sample_architectures(space, n, seed, extremes=True)
        points = [] if remeasure else self.overhead.points
        known = {_arch_key(p["arch"]): p["measured_ms"] for p in points if p.get("arch")}
        todo = {_arch_key(a.to_dict()): a for a in archs if _arch_key(a.to_dict()) not in known}
        passes = {} if remeasure else {k: list(v) for k, v in self.info.get(FIT_PASSES, {}).items() if k in todo}
        for p in range(MODEL_PASSES):
            due = [k for k in todo if len(passes.get(k, [])) <= p]
            if not due:
                continue
            measured = measure_architectures([todo[k] for k in due], backend, self.imgsz, batch=self.batch,
                                             fuse=self.fused, progress=progress, realtime=realtime, passes=1,
                                             desc=f"overhead fit (pass {p + 1}/{MODEL_PASSES})")
            for k, m in zip(due, measured):
                passes.setdefault(k, []).append(m.median_ms)
            self.info[FIT_PASSES] = passes
            if after_pass is not None:
                after_pass()
        known.update({k: min(v) for k, v in passes.items()})  # each model's fastest pass
        self.info.pop(FIT_PASSES, None)
        return self.fit(archs, [known[_arch_key(a.to_dict())] for a in archs])

    def refit(self) -> OverheadModel:
        """Re-fit the overhead from the stored fit points against the current entries."""
        from search_spaces import Architecture

        pts = self.overhead.points
        archs = [Architecture.from_dict(p["arch"]) for p in pts if p.get("arch")]
        if len(archs) != len(pts):
            raise ConfigError("the overhead fit points do not record their architectures", path=self.path,
                              field="overhead.points")
        return self.fit(archs, [p["measured_ms"] for p in pts])

    @classmethod
    def build(cls, space: Any, backend: Backend | str, imgsz: int, out_path: str | Path, batch: int = 1,
              progress: bool = True, resume: bool = True, *, fit_models: int = FIT_MODELS,
              seed: int = FIT_SEED, group: int = BLOCK_GROUP, fuse: bool = True,
              save_every_s: float = SAVE_EVERY_S, retry_loaded: int = 1, realtime: bool = False,
              callback: EntryCallback | None = None) -> LatencyTable:
        """Measure every block signature of `space` on `backend`, then fit the overhead on whole models."""
        # Saved (locked, merged, atomic) every `save_every_s` seconds, after the last group and when the build
        # is interrupted, so a killed build keeps what it finished and `resume` measures only the rest;
        # entries another build saved meanwhile are merged in and skipped. With the backend's
        # config.max_other_load set, entries that were still measured under more load than that are measured
        # again (`retry_loaded` passes). `realtime` times every group at real-time priority (see
        # realtime_priority) instead of waiting for quiet.
        if imgsz < 1 or batch < 1:  # before anything is saved: a table of 0 px would not load again
            bad = ("imgsz", imgsz) if imgsz < 1 else ("batch", batch)
            raise ConfigError(f"must be >= 1, got {bad[1]}", field=bad[0])
        be = make_backend(backend, config=BUILD_PROTOCOL) if isinstance(backend, str) else backend
        out = Path(out_path)
        if out.is_dir():
            raise ConfigError("is a directory: give the table's file path", path=out, field="out")
        sigs = {s.key(): s for s in space.block_signatures(imgsz, batch)}  # an impossible size fails here
        table = None
        # a table --no-resume starts over is removed at the first save (save() would otherwise merge its
        # entries back in), so a build that fails before it measured anything leaves the file as it was
        # anything but a table there is refused, never replaced (an empty file holds nothing to lose)
        existing = cls.read_existing(out) if out.is_file() and out.stat().st_size else None
        discard = out if existing is not None and not resume else None
        if existing is not None and resume:
            table = existing
            table.check_compatible(be.name, imgsz, batch, be.precision, be.threads, fuse)
            here = be.fingerprint(batch)
            if not table.fingerprint.same_device(here):  # its timings would be saved under the other's name
                theirs, mine = (f.gpu_name or f.cpu_model for f in (table.fingerprint, here))
                raise ConfigError(f"was measured on {theirs!r}, this machine is {mine!r}: resuming would mix two "
                                  "devices' timings in one table (use another --out, or --no-resume)",
                                  path=out, field="device")
            check_fingerprint(table.fingerprint, here, what=f"the table being resumed ({out})")
            mine = asdict(be.config)  # a --quick table resumed by a full build would mix rough entries in
            differ = [k for k in STATISTIC_SETTINGS if k in table.protocol and table.protocol[k] != mine[k]]
            if differ:
                was = ", ".join(f"{k}={table.protocol[k]!r}" for k in differ)
                now = ", ".join(f"{k}={mine[k]!r}" for k in differ)
                raise ConfigError(f"was measured with another protocol ({was}; this build: {now}): use the same "
                                  "settings, another --out, or --no-resume", path=out, field="protocol")
        if table is None:
            table = cls(fingerprint=be.fingerprint(batch), backend=be.name, imgsz=imgsz, batch=batch,
                        precision=be.precision, threads=be.threads, fused=fuse,
                        space=getattr(space, "name", None), protocol=asdict(be.config),
                        info={"created": _now(), "source": "build", "build_s": 0.0})
        table.path = out
        clock = {"start": time.perf_counter(), "saved": 0.0}

        def save(force: bool = False) -> None:
            nonlocal discard
            now = time.perf_counter()
            if force or now - clock["saved"] >= save_every_s:
                table.info["build_s"] = round(float(table.info.get("build_s", 0.0)) + now - clock["start"], 3)
                clock["start"] = clock["saved"] = now
                if discard is not None:
                    discard.unlink(missing_ok=True)
                    discard = None
                table.save()

        work = False  # a finished table is left byte for byte as it is: a study checks its digest
        try:
            if table.overhead.call_overhead_ms == 0.0:
                table.overhead.call_overhead_ms = measure_call_overhead(be, batch, realtime).median_ms
                work = True
            todo = [s for k, s in sigs.items() if k not in table.entries]
            work = work or bool(todo)
            if work:
                save(force=True)  # settings and fingerprint first, so a concurrent build can check them
            table.measure_signatures(todo, be, group=group, progress=progress, after_group=save,
                                     callback=callback, realtime=realtime)
            limit = be.config.max_other_load
            # a build that measured anything retries every loaded entry (a resumed one: its first session's
            # too); a rerun on a finished table measures nothing and retries nothing, so its file stays as it was
            fresh = set(sigs) if todo else set()
            for _ in range(retry_loaded if limit is not None else 0):
                loaded = [sigs[k] for k, m in table.entries.items()
                          if k in fresh and m.other_load is not None and m.other_load > limit]
                if not loaded:
                    break
                work = True
                table.measure_signatures(loaded, be, group=group, progress=progress, after_group=save,
                                         callback=callback, only_missing=False, realtime=realtime)
                todo += loaded
            om = table.overhead
            # a space with fewer architectures than fit_models has all of them in a finished fit
            fit_archs = sample_architectures(space, fit_models, seed, extremes=True) if fit_models > 0 else []
            # an unfinished fit's passes (FIT_PASSES) mean a kill came during it, also in a refit of a table
            # that already had a fit of as many models (a space built into the table of another)
            if fit_archs and (todo or om.method == "identity" or len(om.points) < len(fit_archs)
                              or FIT_PASSES in table.info):
                work = True
                table.fit_space(space, be, fit_models, seed, progress=progress, realtime=realtime,
                                after_pass=lambda: save(force=True), archs=fit_archs)
            if work:
                table.info["updated"] = _now()
                if realtime:
                    table.info["realtime"] = True
        finally:
            if work:
                save(force=True)  # also on Ctrl-C or an error: keep every finished entry
        return table

    # ---- compatibility
    # ----------------------------------------------------------------------------------------
    def check_compatible(self, backend: str, imgsz: int, batch: int, precision: str, threads: int | None,
                         fused: bool) -> None:
        """Refuse to mix entries measured under other settings into this table (ConfigError on the field)."""
        mine = {"backend": self.backend, "imgsz": self.imgsz, "batch": self.batch,
                "precision": self.precision, "threads": self.threads, "fused": self.fused}
        theirs = {"backend": backend, "imgsz": imgsz, "batch": batch, "precision": precision,
                  "threads": threads, "fused": fused}
        for k, v in mine.items():
            if v != theirs[k]:
                raise ConfigError(f"the table holds {k}={v!r}, this build measures {k}={theirs[k]!r}; use "
                                  "another --out or delete the table", path=self.path, field=k)

    # ---- files
    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema in docs/latency.md)."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "backend": self.backend,
            "threads": self.threads,
            "precision": self.precision,
            "batch": self.batch,
            "imgsz": self.imgsz,
            "fused": self.fused,
            "space": self.space,
            "device": self.fingerprint.to_dict(),
            "protocol": self.protocol,
            "info": self.info,
            "overhead": self.overhead.to_dict(),
            "entries": {k: m.to_dict() for k, m in sorted(self.entries.items())},
            "signatures": {k: self.signatures[k] for k in sorted(self.signatures)},
        }

    @classmethod
    def from_dict(cls, d: Any, path: str | Path | None = None) -> LatencyTable:
        """Validate a parsed table document (ConfigError naming the file and field on any problem)."""
        p = None if path is None else str(path)
        if not isinstance(d, dict):
            raise ConfigError(f"a latency table must be a JSON object, got {type(d).__name__}", path=p)
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"not a detforge latency table (schema {d.get('schema')!r}, expected "
                              f"{SCHEMA!r})", path=p, field="schema")
        version = d.get("version")
        if not isinstance(version, int) or version < 1:
            raise ConfigError(f"expected a positive int, got {version!r}", path=p, field="version")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"written by a newer detforge (table version {version}, this one reads up to "
                              f"{SCHEMA_VERSION})", path=p, field="version")
        for key, typ in (("backend", str), ("imgsz", int), ("batch", int), ("precision", str),
                         ("entries", dict), ("device", dict)):
            if key not in d:
                raise ConfigError("missing required key", path=p, field=key)
            if not isinstance(d[key], typ) or isinstance(d[key], bool):
                raise ConfigError(f"expected {typ.__name__}, got {type(d[key]).__name__}", path=p, field=key)
        for key in ("imgsz", "batch"):
            if d[key] < 1:
                raise ConfigError(f"must be >= 1, got {d[key]}", path=p, field=key)
        if not isinstance(d.get("fused", True), bool):
            raise ConfigError(f"expected true or false, got {d['fused']!r}", path=p, field="fused")
        try:
            fp = DeviceFingerprint.from_dict(d["device"])
        except DetforgeError as e:
            raise ConfigError(e.message, path=p, field=e.field or "device") from None
        entries = {}
        for k, v in d["entries"].items():
            try:
                entries[k] = Measurement.from_dict(v)
            except DetforgeError as e:
                raise ConfigError(e.message, path=p, field=f"entries.{k}") from None
            ms = entries[k].median_ms
            if not (isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0):
                raise ConfigError(f"median_ms must be a non-negative number, got {entries[k].median_ms!r}",
                                  path=p, field=f"entries.{k}.median_ms")
        for key in ("signatures", "protocol", "info"):
            if not isinstance(d.get(key) or {}, dict):
                raise ConfigError(f"expected an object, got {type(d[key]).__name__}", path=p, field=key)
        for key, typ in (("threads", int), ("space", str)):
            v = d.get(key)
            if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
                raise ConfigError(f"expected {typ.__name__} or null, got {type(v).__name__}", path=p, field=key)
        sigs = d.get("signatures") or {}
        return cls(fingerprint=fp, backend=d["backend"], imgsz=d["imgsz"], batch=d["batch"],
                   precision=d["precision"], threads=d.get("threads"), fused=d.get("fused", True),
                   space=d.get("space"), entries=entries, signatures=dict(sigs),
                   overhead=OverheadModel.from_dict(d.get("overhead") or {}, p),
                   protocol=dict(d.get("protocol") or {}), info=dict(d.get("info") or {}),
                   path=None if path is None else Path(path))

    @classmethod
    def load(cls, path: str | Path, *, check_device: bool = True) -> LatencyTable:
        """Read a table; a truncated or malformed file is a ConfigError, another device a UserWarning."""
        table = cls.from_dict(read_json(path), path)
        if check_device:
            table.check_device()
        return table

    def check_device(self) -> list[str]:
        """Warn (UserWarning) if this machine differs from the table's; returns the differences."""
        here = DeviceFingerprint.collect(backend=self.backend, threads=self.threads, precision=self.precision,
                                         batch=self.batch)
        where = f"latency table {self.path}" if self.path else "latency table"
        return check_fingerprint(self.fingerprint, here, what=where)

    @classmethod
    def read_existing(cls, path: Path) -> LatencyTable:
        """The table at a path about to be written; anything else there is a ConfigError, not overwritten."""
        try:
            return cls.from_dict(read_json(path), path)
        except ConfigError as e:  # saving would overwrite it: another file, or a table damaged by hand
            raise ConfigError(f"holds something that is not a latency table ({e.message}): use another --out "
                              "or move it away", path=path, field=e.field) from None

    def merge_from(self, path: str | Path) -> int:
        """Add the entries of the table at `path` that this one lacks (same settings only); how many."""
        p = Path(path)
        if not p.is_file() or p.stat().st_size == 0:
            return 0
        other = self.read_existing(p)
        other.check_compatible(self.backend, self.imgsz, self.batch, self.precision, self.threads, self.fused)
        if not self.fingerprint.same_device(other.fingerprint):
            raise ConfigError(f"holds a table of another device ({other.fingerprint.slug()}; this one is "
                              f"{self.fingerprint.slug()}): use another --out or delete it", path=p, field="device")
        added = 0
        for k, m in other.entries.items():
            if k not in self.entries:
                self.entries[k] = m
                if k in other.signatures:
                    self.signatures[k] = other.signatures[k]
                added += 1
        if self.overhead.method == "identity" and other.overhead.method != "identity":
            self.overhead = other.overhead
        elif self.overhead.call_overhead_ms == 0.0:
            self.overhead.call_overhead_ms = other.overhead.call_overhead_ms
        return added

    def save(self, path: str | Path | None = None) -> Path:
        """Write the table atomically under a lock, first merging entries another writer saved there."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("no path to save the latency table to", field="path")
        with file_lock(target):
            self.merge_from(target)
            atomic_write_json(target, self.to_dict())
        self.path = target
        return target

    def summary(self) -> dict[str, Any]:
        """A short description for people and the CLI."""
        return {"path": str(self.path) if self.path else None, "backend": self.backend,
                "threads": self.threads, "precision": self.precision, "batch": self.batch,
                "imgsz": self.imgsz, "space": self.space,
                "entries": len(self.entries), "device": self.fingerprint.slug(),
                "overhead_a_ms": round(self.overhead.a_ms, 4), "overhead_b": round(self.overhead.b, 4),
                "overhead_c_ms": round(self.overhead.c_ms, 5),
                "call_overhead_ms": round(self.overhead.call_overhead_ms, 4), "fit": self.overhead.method,
                "fit_mape": self.overhead.residual_mape, "build_s": self.info.get("build_s")}


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive fcntl.flock on `path`.lock for the duration of the block (read-merge-write of a table)."""
    lock = Path(path)
    lock = lock.with_name(lock.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def table_predictor(path: str | Path, imgsz: int | None = None, *, measure_missing: bool = False,
                    check_device: bool = False) -> tuple[Callable[[Architecture], float], int]:
    """The latency table at `path` as a predictor (ms of an architecture) and its input size; another `imgsz` is
    refused, since a budget would then hold at the table's size, not the model's. The table describes the target
    device, usually not this machine: no fingerprint warning unless `check_device`. `measure_missing`: blocks the
    table lacks (a pruned model's widths) are measured here once and kept in it."""
    table = LatencyTable.load(path, check_device=check_device)
    if imgsz is not None and imgsz != table.imgsz:
        raise ConfigError(f"the latency table was measured at imgsz {table.imgsz}, this run asks for {imgsz} (give "
                          "--imgsz or a table of that size)", path=path, field="imgsz")
    return (lambda arch: table.predict(arch, table.imgsz, measure_missing=measure_missing)), table.imgsz


def sample_architectures(space: Any, n: int, seed: int, *, extremes: bool = False) -> list[Architecture]:
    """`n` distinct random architectures of `space` (seeded); `extremes`: its smallest and largest first."""
    import random

    archs: list[Architecture] = []
    if extremes:  # the ends of the range pin down the overhead fit's slope
        for name in ("smallest", "largest"):
            fn = getattr(space, name, None)
            if callable(fn) and len(archs) < n:
                archs.append(fn())
    seen = {repr(a.to_dict()) for a in archs}
    rng = random.Random(seed)
    tries = 0
    while len(archs) < n and tries < 50 * n:
        a = space.random(rng)
        tries += 1
        if repr(a.to_dict()) not in seen:  # a small space repeats itself; duplicates add no information
            seen.add(repr(a.to_dict()))
            archs.append(a)
    return archs


def _arch_key(d: Mapping[str, Any]) -> str:
    """An architecture dict as a comparable string (whether its weights are stored folded does not matter)."""
    return json.dumps({k: v for k, v in d.items() if k != "fused"}, sort_keys=True)


def shipped_tables() -> list[Path]:
    """Tables that come with the package (latency_tables/tables/*.json)."""
    return sorted(TABLES_DIR.glob("*.json"))


def table_name(fp: DeviceFingerprint, imgsz: int) -> str:
    """The file name of a table: the fingerprint slug and the input size."""
    return f"{fp.slug()}_{imgsz}.json"


def _now() -> str:
    """UTC time stamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

