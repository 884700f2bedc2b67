"""The latency measurement protocol: warm-up, adaptive timed runs, outlier rejection, round-robin or one-at-a-time order."""
# Everything here needs only the standard library and numpy, so a probe bundle can ship this file to a
# device that has nothing but onnxruntime and numpy installed.
from __future__ import annotations

import gc
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

try:
    from search_spaces.errors import DetforgeError
except ImportError:  # a probe bundle ships this file alone, without the detforge packages

    class DetforgeError(ValueError):  # type: ignore[no-redef]
        """Bad protocol settings (stand-in used where detforge itself is not installed)."""

        def __init__(self, message: str, *, path: Any = None, field: str | None = None):
            self.field = field
            super().__init__(f"{field}: {message}" if field else message)


# Severity order of the reasons a repeat stopped; a Measurement reports the worst one of its repeats.
STOP_REASONS = ("stable", "max_runs", "max_time")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """Stacklevel (for the caller's warnings.warn) of the first frame outside latency_tables."""
    # So a warning names the user's line rather than our internals, however deep the call came from.
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the function that will call warnings.warn
    level = 1
    while frame is not None and frame.f_back is not None \
            and os.path.abspath(frame.f_back.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level + 1


@runtime_checkable
class TimedRunner(Protocol):
    """Something that times one inference itself (e.g. with CUDA events) and describes what it runs."""

    meta: dict[str, Any]

    def time_once_ms(self) -> float:
        """Run once and return the elapsed time in milliseconds."""
        ...


class _WallClock:
    """Adapts a plain zero-argument callable to TimedRunner with time.perf_counter_ns."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.meta: dict[str, Any] = dict(getattr(fn, "meta", {}) or {})

    def time_once_ms(self) -> float:
        """Time one call of the wrapped callable."""
        t0 = time.perf_counter_ns()
        self.fn()
        return (time.perf_counter_ns() - t0) / 1e6


def as_timed(fn: Callable[[], object] | TimedRunner) -> TimedRunner:
    """Return `fn` itself if it times itself, else a wall-clock wrapper around it."""
    if isinstance(fn, TimedRunner):
        return fn
    if not callable(fn):
        raise DetforgeError(f"expected a callable or a runner with time_once_ms(), got {type(fn).__name__}")
    return _WallClock(fn)


@dataclass(frozen=True)
class MeasurementConfig:
    """Settings of the measurement protocol (see docs/latency.md)."""

    warmup: int = 10  # untimed runs before timing, at least this many...
    warmup_s: float = 0.2  # ...and for at least this long (thread pools, caches and clocks settle)
    min_runs: int = 20  # clean timed runs before the median may be declared stable
    max_runs: int = 1000  # timed rounds per repeat, outliers included
    max_time_s: float = 30.0  # timed seconds per repeat (stops even before min_runs, after at least 3 runs)
    target_rel_ci: float = 0.01  # stop when the median's CI half-width / median is below this
    confidence: float = 0.95  # confidence level of that CI
    outlier_k: float = 3.0  # runs above Q3 + k * IQR are rejected (and replaced by more runs)
    repeats: int = 1  # independent repeats; the reported median is the median of their medians
    max_other_load: float | None = None  # reject a repeat if other processes used more of the CPU than this
    max_retries: int = 5  # rejected repeats allowed before falling back to the least loaded ones
    retry_wait_s: float = 1.0  # pause before re-measuring a rejected repeat, to let the other load pass
    check_load: bool = True  # read /proc/stat around each repeat and report the other load

    def __post_init__(self) -> None:
        """Reject settings that make the protocol meaningless."""
        checks = [
            ("warmup", self.warmup >= 0, "must be >= 0"),
            ("warmup_s", self.warmup_s >= 0, "must be >= 0"),
            ("min_runs", self.min_runs >= 1, "must be >= 1"),
            ("max_runs", self.max_runs >= self.min_runs, f"must be >= min_runs ({self.min_runs})"),
            ("max_time_s", self.max_time_s > 0, "must be > 0"),
            ("target_rel_ci", self.target_rel_ci > 0, "must be > 0"),
            ("confidence", 0 < self.confidence < 1, "must be in (0, 1)"),
            ("outlier_k", self.outlier_k > 0, "must be > 0"),
            ("repeats", self.repeats >= 1, "must be >= 1"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("retry_wait_s", self.retry_wait_s >= 0, "must be >= 0"),
        ]
        if self.max_other_load is not None:
            checks.append(("max_other_load", 0 <= self.max_other_load <= 1, "must be in [0, 1]"))
        for name, ok, msg in checks:
            if not ok:
                raise DetforgeError(f"{msg}, got {getattr(self, name)!r}", field=name)

    def with_overrides(self, **overrides: Any) -> MeasurementConfig:
        """Return a copy with some settings changed; an unknown name is a DetforgeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DetforgeError(f"unknown measurement setting(s) {unknown}; known: {sorted(known)}",
                                field=unknown[0])
        return replace(self, **overrides) if overrides else self


@dataclass
class Measurement:
    """The latency of one model (or block) on one backend, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    runs: int  # clean timed runs the statistics use
    warmup: int  # warm-up runs done
    threads: int | None
    precision: str
    batch: int
    input_shape: list  # per-sample shape without the batch; a list of shapes for several inputs
    backend: str
    noise: float  # IQR / median: the relative spread of single runs
    rejected_outliers: int
    repeats: int
    min_ms: float | None = None
    ci_rel: float | None = None  # CI half-width of the median / median (at MeasurementConfig.confidence)
    stop_reason: str = "stable"
    other_load: float | None = None  # worst fraction of the CPU used by other processes during a repeat
    discarded_repeats: int = 0  # repeats thrown away because the other load was too high
    repeat_medians_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """Inverse of to_dict; unknown keys are ignored so newer files still load."""
        if not isinstance(d, Mapping):
            raise DetforgeError(f"a measurement must be a mapping, got {type(d).__name__}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise DetforgeError(f"measurement lacks {missing}", field=missing[0])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def summary(self) -> str:
        """One line for people: median, spread and how it was obtained."""
        load = "" if self.other_load is None else f", other load {self.other_load:.0%}"
        return (f"{self.median_ms:.3f} ms median (IQR {self.iqr_ms:.3f} ms, noise {self.noise:.1%}, "
                f"n={self.runs}, {self.rejected_outliers} outliers, {self.stop_reason}{load}) "
                f"[{self.backend} {self.precision} b{self.batch} {self.input_shape}]")


class LoadMonitor:
    """Fraction of the machine's CPU time taken by other processes (and the hypervisor) during a window."""

    # Reads /proc/stat twice and subtracts this process's own CPU time (all its threads, so intra-op pools
    # count as ours); steal time counts as other load, since on a shared VM it is exactly what slows us down.

    def __init__(self, stat_path: str = "/proc/stat"):
        self.stat_path = stat_path
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[int, int, float] | None = None

    def _read(self) -> tuple[int, int] | None:
        """(busy, total) jiffies over all CPUs, or None where /proc/stat does not exist."""
        try:
            with open(self.stat_path) as f:
                line = f.readline()
        except OSError:
            return None
        parts = line.split()
        if not parts or parts[0] != "cpu" or len(parts) < 5:
            return None
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        vals = [int(v) for v in parts[1:9]]
        vals += [0] * (8 - len(vals))
        user, nice, system, idle, iowait, irq, softirq, steal = vals
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    def start(self) -> None:
        """Open a window."""
        now = self._read()
        self._start = None if now is None else (*now, time.process_time())

    def stop(self) -> float | None:
        """Close the window; the other load in [0, 1], or None if it cannot be measured here."""
        now = self._read()
        if now is None or self._start is None:
            return None
        busy0, total0, own0 = self._start
        total_s = (now[1] - total0) / self._hz
        if total_s <= 0:
            return None
        other_s = (now[0] - busy0) / self._hz - (time.process_time() - own0)
        return float(min(1.0, max(0.0, other_s / total_s)))


class _NoLoadMonitor:
    """Stands in for LoadMonitor when load checking is off."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> float | None:
        """No measurement."""
        return None


def median_ci(sorted_x: np.ndarray, confidence: float) -> tuple[float, float]:
    """Distribution-free CI of the median from order statistics (ranks from Binomial(n, 1/2))."""
    n = len(sorted_x)
    if n == 0:
        return math.nan, math.nan
    half_alpha = (1.0 - confidence) / 2.0
    log_norm = n * math.log(2.0)
    cdf, j = 0.0, 0
    for k in range(n):  # grow the lower rank while P(B <= k) stays within alpha/2
        p = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - log_norm)
        if cdf + p > half_alpha:
            break
        cdf += p
        j = k + 1
    if j == 0:  # too few runs for this confidence: the whole range is the honest interval
        return float(sorted_x[0]), float(sorted_x[-1])
    return float(sorted_x[j - 1]), float(sorted_x[n - j])


def reject_outliers(samples: np.ndarray, k: float) -> tuple[np.ndarray, int]:
    """Drop runs above Q3 + k * IQR; returns (kept runs, number dropped)."""
    if len(samples) < 4:
        return samples, 0
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    # A floor on the spread, so a coarse timer that returns one value for most runs does not turn every
    # slightly slower run into an "outlier".
    spread = max(q3 - q1, 0.01 * med)
    keep = samples[samples <= q3 + k * spread]
    return keep, len(samples) - len(keep)


def _ci_rel(clean: np.ndarray, confidence: float) -> float:
    """Relative half-width of the median's CI."""
    if len(clean) == 0:
        return math.inf
    s = np.sort(clean)
    lo, hi = median_ci(s, confidence)
    med = float(np.median(s))
    return math.inf if med <= 0 else (hi - lo) / (2.0 * med)


@dataclass
class _Repeat:
    """Raw result of one repeat over all candidates."""

    samples: list[np.ndarray]
    warmup_runs: int
    stop_reason: str
    other_load: float | None


def rotated(start: int, n: int) -> tuple[int, ...]:
    """Indices 0..n-1 starting at `start % n`: successive rounds give each candidate every position."""
    start %= n
    return (*range(start, n), *range(start))


def _run_repeat(runners: Sequence[TimedRunner], cfg: MeasurementConfig) -> _Repeat:
    """Warm up, then time the candidates round-robin until all medians are stable or a limit is hit."""
    m = len(runners)
    warm_rounds = 0
    t_warm = time.perf_counter()
    while warm_rounds < cfg.warmup or (time.perf_counter() - t_warm) < cfg.warmup_s:
        for r in runners:
            r.time_once_ms()
        warm_rounds += 1

    samples: list[list[float]] = [[] for _ in range(m)]
    rounds = 0
    next_check = cfg.min_runs
    reason = "max_runs"
    t0 = time.perf_counter()
    while rounds < cfg.max_runs:
        # Rotate the starting candidate so each one follows every other equally often: a candidate that
        # leaves caches cold (or hot) for the next one then biases all of them alike.
        for i in rotated(rounds, m):
            samples[i].append(runners[i].time_once_ms())
        rounds += 1
        if time.perf_counter() - t0 >= cfg.max_time_s and rounds >= min(3, cfg.min_runs):
            reason = "max_time"
            break
        if rounds >= next_check:
            # Checking every ~10% more runs keeps the sorting cost O(n log n) overall.
            next_check = rounds + max(1, rounds // 10)
            stable = True
            for s in samples:
                clean, _ = reject_outliers(np.asarray(s), cfg.outlier_k)
                if len(clean) < cfg.min_runs or _ci_rel(clean, cfg.confidence) > cfg.target_rel_ci:
                    stable = False
                    break
            if stable:
                reason = "stable"
                break
    return _Repeat([np.asarray(s, dtype=np.float64) for s in samples], warm_rounds, reason, None)


def _summarise(reps: Sequence[_Repeat], i: int, cfg: MeasurementConfig, meta: Mapping[str, Any],
               discarded: int) -> Measurement:
    """Turn candidate i's samples from the accepted repeats into a Measurement."""
    cleaned = [reject_outliers(rep.samples[i], cfg.outlier_k) for rep in reps]
    pooled = np.concatenate([c for c, _ in cleaned])
    rejected = sum(n for _, n in cleaned)
    repeat_medians = [float(np.median(c)) for c, _ in cleaned]
    median = float(np.median(repeat_medians))
    p10, q1, q3, p90 = (float(v) for v in np.percentile(pooled, [10, 25, 75, 90]))
    loads = [rep.other_load for rep in reps if rep.other_load is not None]
    shape = meta.get("input_shape", [])
    return Measurement(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        iqr_ms=q3 - q1,
        mean_ms=float(pooled.mean()),
        runs=len(pooled),
        warmup=sum(rep.warmup_runs for rep in reps),
        threads=meta.get("threads"),
        precision=str(meta.get("precision", "")),
        batch=int(meta.get("batch", 1)),
        input_shape=[list(s) if isinstance(s, (list, tuple)) else s for s in shape],
        backend=str(meta.get("backend", "callable")),
        noise=(q3 - q1) / median if median > 0 else math.inf,
        rejected_outliers=int(rejected),
        repeats=len(reps),
        min_ms=float(pooled.min()),
        ci_rel=_ci_rel(pooled, cfg.confidence),
        stop_reason=max((rep.stop_reason for rep in reps), key=STOP_REASONS.index),
        other_load=max(loads) if loads else None,
        discarded_repeats=discarded,
        repeat_medians_ms=repeat_medians,
    )


if TYPE_CHECKING:  # annotations only: the probe bundle runs this file on Python 3.8
    Candidates = Sequence[Callable[[], object] | TimedRunner] | Mapping[str, Callable[[], object] | TimedRunner]
    Results = list[Measurement] | dict[str, Measurement]


def _collect(runners: Sequence[TimedRunner], cfg: MeasurementConfig, mon: LoadMonitor | _NoLoadMonitor
             ) -> tuple[list[_Repeat], int]:
    """`cfg.repeats` repeats of `runners` round-robin, retried under other load; returns (kept, discarded)."""
    accepted: list[_Repeat] = []
    rejected: list[_Repeat] = []
    # A garbage collection inside a timed run is a spike that belongs to Python, not to the model, so the
    # collector is off while timing. Only the young generations are emptied first: a full collection walks
    # every object (about 70 ms with torch loaded, a third of a small block's whole measurement) and
    # nothing collects during the timed runs anyway.
    gc_was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        while len(accepted) < cfg.repeats:
            mon.start()
            rep = _run_repeat(runners, cfg)
            rep.other_load = mon.stop()
            too_busy = (cfg.max_other_load is not None and rep.other_load is not None
                        and rep.other_load > cfg.max_other_load)
            if not too_busy:
                accepted.append(rep)
                continue
            rejected.append(rep)
            if len(rejected) > cfg.max_retries:
                break
            time.sleep(cfg.retry_wait_s)
    finally:
        if gc_was_enabled:
            gc.enable()

    if len(accepted) < cfg.repeats:
        # Rather than fail after retries, keep the least loaded repeats and say so loudly.
        rejected.sort(key=lambda r: r.other_load if r.other_load is not None else 0.0)
        need = cfg.repeats - len(accepted)
        accepted += rejected[:need]
        rejected = rejected[need:]
        worst = max(r.other_load or 0.0 for r in accepted)
        warnings.warn(
            f"latency measured under other CPU load: {worst:.0%} of the CPU was used by other processes "
            f"(limit max_other_load={cfg.max_other_load:.0%}) after {cfg.max_retries} retries; "
            "treat these numbers with care or re-measure on a quiet machine",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return accepted, len(rejected)


def _candidates(fns: Candidates) -> tuple[list[str] | None, list[TimedRunner]]:
    """(keys or None, timed runners) of a list or mapping of candidates; an empty one is an error."""
    keys = list(fns.keys()) if isinstance(fns, Mapping) else None
    items = list(fns.values()) if isinstance(fns, Mapping) else list(fns)
    if not items:
        raise DetforgeError("nothing to measure: no candidates given")
    return keys, [as_timed(f) for f in items]


def _monitor(cfg: MeasurementConfig, monitor: LoadMonitor | None) -> LoadMonitor | _NoLoadMonitor:
    """The given load monitor, a new one, or none where the config does not check load."""
    return monitor if monitor is not None else (LoadMonitor() if cfg.check_load else _NoLoadMonitor())


def measure_interleaved(fns: Candidates, config: MeasurementConfig | None = None, *,
                        monitor: LoadMonitor | None = None, meta: Mapping[str, Any] | None = None,
                        **overrides: Any) -> Results:
    """Measure candidates round-robin so drifting load affects all alike; results keep `fns`' order/keys."""
    # `fns` are zero-argument callables (timed with perf_counter_ns) or runners with `time_once_ms()` and a
    # `meta` dict (backend, threads, precision, batch, input_shape) such as `Backend.prepare()` returns.
    # Settings come from `config` with `overrides` (any MeasurementConfig field) applied; `meta` fills the
    # Measurement fields of plain callables.
    return _measure(fns, (config or MeasurementConfig()).with_overrides(**overrides), monitor, meta, alone=False)


def measure_each_alone(fns: Candidates, config: MeasurementConfig | None = None, *,
                       monitor: LoadMonitor | None = None, meta: Mapping[str, Any] | None = None,
                       **overrides: Any) -> Results:
    """Measure candidates one at a time, in `repeats` passes of rotating order (else as measure_interleaved)."""
    # For engines whose idle workers spin (ONNX Runtime's intra-op pool): timed round-robin, each session's
    # spinning threads take the cores from the next one, and every candidate measures slower than alone
    # (about 2x on 2 cores). Each repeat of a candidate warms it up alone (outlasting the previous one's
    # spinning), and each pass starts one candidate later, so drifting load still touches all alike.
    return _measure(fns, (config or MeasurementConfig()).with_overrides(**overrides), monitor, meta, alone=True)


def _measure(fns: Candidates, cfg: MeasurementConfig, monitor: LoadMonitor | None, meta: Mapping[str, Any] | None,
             alone: bool) -> Results:
    """The repeats of all candidates together (round-robin) or of each one alone, summarised per candidate."""
    keys, runners = _candidates(fns)
    mon = _monitor(cfg, monitor)
    if alone:
        single = cfg.with_overrides(repeats=1)
        kept: list[list[_Repeat]] = [[] for _ in runners]
        discarded = [0] * len(runners)
        for p in range(cfg.repeats):
            for i in rotated(p, len(runners)):
                reps, n_bad = _collect([runners[i]], single, mon)
                kept[i] += reps
                discarded[i] += n_bad
        results = [_summarise(kept[i], 0, cfg, {**(meta or {}), **r.meta}, discarded[i])
                   for i, r in enumerate(runners)]
    else:
        accepted, n_bad = _collect(runners, cfg, mon)
        results = [_summarise(accepted, i, cfg, {**(meta or {}), **r.meta}, n_bad) for i, r in enumerate(runners)]
    return dict(zip(keys, results)) if keys is not None else results


def measure_callable(
    fn: Callable[[], object] | TimedRunner,
    config: MeasurementConfig | None = None,
    *,
    monitor: LoadMonitor | None = None,
    meta: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Measurement:
    """Measure one callable or runner; `overrides` are MeasurementConfig fields (warmup, min_runs, ...)."""
    result = measure_interleaved([fn], config, monitor=monitor, meta=meta, **overrides)
    assert isinstance(result, list)
    return result[0]
