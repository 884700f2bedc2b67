"""The measurement protocol: stopping, outliers, interleaving, load rejection, serialisation."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from latency_tables.measurement import (
    LoadMonitor,
    Measurement,
    MeasurementConfig,
    measure_callable,
    measure_each_alone,
    measure_interleaved,
    median_ci,
)
from search_spaces.errors import DetforgeError

QUIET = {"warmup": 0, "warmup_s": 0.0, "check_load": False}  # scripted timers need neither warm-up nor /proc/stat


class Scripted:
    """A runner whose i-th timing is f(i): tests the protocol's logic without depending on the machine."""

    def __init__(self, f, meta=None, log=None, name=None):
        self.f, self.calls, self.meta, self.log, self.name = f, 0, meta or {}, log, name

    def time_once_ms(self) -> float:
        """Return the scripted time of this call."""
        if self.log is not None:
            self.log.append(self.name)
        v = self.f(self.calls)
        self.calls += 1
        return float(v)


class FakeMonitor:
    """Reports a scripted other-load figure per repeat."""

    def __init__(self, loads):
        self.loads = list(loads)

    def start(self) -> None:
        """Nothing to do."""

    def stop(self) -> float:
        """The next scripted load (the last one repeats)."""
        return self.loads.pop(0) if len(self.loads) > 1 else self.loads[0]


def test_sleep_callable_gives_sensible_median():
    m = measure_callable(lambda: time.sleep(0.002), warmup=2, warmup_s=0, min_runs=10, max_runs=60,
                         target_rel_ci=0.05, check_load=False)
    assert m.median_ms >= 2.0  # time.sleep never returns early
    assert m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.min_ms <= m.p10_ms
    assert 10 <= m.runs <= 60
    assert m.warmup == 2 and m.repeats == 1 and m.backend == "callable"
    assert m.noise == pytest.approx(m.iqr_ms / m.median_ms)


def test_stops_early_when_stable():
    r = Scripted(lambda i: 5.0 + 0.001 * (i % 3))
    m = measure_callable(r, min_runs=20, max_runs=500, target_rel_ci=0.01, **QUIET)
    assert m.stop_reason == "stable"
    assert m.runs == 20 and r.calls == 20  # stopped at the first check
    assert m.median_ms == pytest.approx(5.001)
    assert m.ci_rel <= 0.01


def test_noisy_timings_run_to_max_runs():
    rng = np.random.default_rng(0)
    r = Scripted(lambda i: rng.lognormal(0.0, 0.5))
    m = measure_callable(r, min_runs=10, max_runs=80, target_rel_ci=0.001, **QUIET)
    assert m.stop_reason == "max_runs"
    assert r.calls == 80 and m.runs + m.rejected_outliers == 80
    assert m.ci_rel > 0.001


def test_the_collector_is_off_while_timing_and_no_full_collection_runs(monkeypatch):
    import gc

    seen, asked = [], []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: asked.append(generation) or collect(min(generation, 1)))
    r = Scripted(lambda i: seen.append(gc.isenabled()) or 1.0)
    measure_callable(r, min_runs=5, max_runs=5, **QUIET)
    assert seen and not any(seen)  # no collection can land inside a timed run
    assert gc.isenabled()  # and it is back on afterwards
    # a full collection walks every object (about 70 ms per block with torch loaded) for no timing benefit
    assert asked and max(asked) < 2


def test_max_time_stops_a_slow_candidate():
    m = measure_callable(lambda: time.sleep(0.005), min_runs=50, max_runs=1000, max_time_s=0.05,
                         target_rel_ci=1e-6, **QUIET)
    assert m.stop_reason == "max_time"
    assert 3 <= m.runs < 1000


def test_spikes_are_counted_and_remeasured():
    r = Scripted(lambda i: 100.0 if i % 10 == 9 else 1.0 + 0.001 * (i % 5))
    m = measure_callable(r, min_runs=30, max_runs=500, target_rel_ci=0.01, **QUIET)
    assert m.rejected_outliers == r.calls // 10  # every injected spike, and nothing else
    assert m.runs >= 30  # spikes were replaced by extra runs, not counted as clean ones
    assert m.median_ms == pytest.approx(1.002)
    assert m.p90_ms < 2.0  # the spikes do not leak into the statistics


def test_real_spikes_in_a_busy_loop_are_rejected():
    calls = {"n": 0, "spikes": 0}

    def work() -> None:
        calls["n"] += 1
        if calls["n"] % 7 == 0:
            calls["spikes"] += 1
            time.sleep(0.03)
            return
        t_end = time.perf_counter() + 0.0005
        while time.perf_counter() < t_end:
            pass

    m = measure_callable(work, min_runs=20, max_runs=80, target_rel_ci=0.02, **QUIET)
    assert calls["spikes"] >= 1
    assert m.rejected_outliers >= calls["spikes"]
    assert m.median_ms < 30.0  # the median is the busy loop's, not the spikes'


def test_interleaving_is_round_robin_and_rotates():
    log: list[str] = []
    runners = {k: Scripted(lambda i, v=v: v, log=log, name=k) for k, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    out = measure_interleaved(runners, min_runs=6, max_runs=6, **QUIET)
    assert isinstance(out, dict) and list(out) == ["a", "b", "c"]
    assert [out[k].median_ms for k in "abc"] == [1.0, 2.0, 3.0]
    assert all(r.calls == 6 for r in runners.values())
    assert log[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each starts a round in turn


def test_each_alone_times_one_candidate_at_a_time_in_rotating_passes():
    log: list[str] = []
    # b's pass medians are 2, 20, 2: the median of the passes' medians ignores the one bad pass
    runners = {"a": Scripted(lambda i: 1.0, log=log, name="a"),
               "b": Scripted(lambda i: 20.0 if 4 <= i < 8 else 2.0, log=log, name="b")}
    out = measure_each_alone(runners, min_runs=4, max_runs=4, repeats=3, **QUIET)
    assert isinstance(out, dict) and list(out) == ["a", "b"]
    # never round-robin: each repeat is one candidate's block of runs, and each pass starts one later
    assert log == ["a"] * 4 + ["b"] * 8 + ["a"] * 8 + ["b"] * 4
    assert out["a"].median_ms == 1.0 and out["b"].median_ms == 2.0
    assert out["b"].repeat_medians_ms == [2.0, 20.0, 2.0] and out["b"].repeats == 3 and out["b"].runs == 12


def test_each_alone_retries_a_loaded_repeat_of_that_candidate_only():
    runners = [Scripted(lambda i: 1.0), Scripted(lambda i: 2.0)]
    out = measure_each_alone(runners, monitor=FakeMonitor([0.9, 0.0]), min_runs=3, max_runs=3, max_other_load=0.5,
                             retry_wait_s=0.0, warmup=0, warmup_s=0.0)
    assert [m.discarded_repeats for m in out] == [1, 0]
    assert [r.calls for r in runners] == [6, 3]


def test_interleaving_cancels_drifting_load():
    clock = {"t": 0}

    def drifting(base: float) -> Scripted:
        """A candidate whose time grows with a machine-wide slowdown shared by all candidates."""
        def f(_i: int) -> float:
            clock["t"] += 1
            return base * (1.0 + 0.01 * clock["t"])
        return Scripted(f)

    fair = measure_interleaved([drifting(1.0), drifting(2.0)], min_runs=50, max_runs=50, **QUIET)
    ratio = fair[1].median_ms / fair[0].median_ms
    assert ratio == pytest.approx(2.0, rel=0.02)
    clock["t"] = 0
    a = measure_callable(drifting(1.0), min_runs=50, max_runs=50, **QUIET)
    b = measure_callable(drifting(2.0), min_runs=50, max_runs=50, **QUIET)
    assert abs(b.median_ms / a.median_ms - 2.0) > abs(ratio - 2.0)  # one after the other is biased


def test_busy_repeats_are_discarded_and_remeasured():
    m = measure_callable(Scripted(lambda i: 1.0 + 0.01 * (i % 4)), monitor=FakeMonitor([0.9, 0.01, 0.02]),
                         repeats=2, max_other_load=0.05, retry_wait_s=0, min_runs=10, max_runs=20,
                         warmup=0, warmup_s=0)
    assert m.repeats == 2 and m.discarded_repeats == 1
    assert m.other_load == pytest.approx(0.02)
    assert len(m.repeat_medians_ms) == 2


def test_always_busy_machine_falls_back_with_a_warning():
    with pytest.warns(RuntimeWarning, match="other CPU load") as rec:
        m = measure_callable(Scripted(lambda i: 1.0), monitor=FakeMonitor([0.9]), max_other_load=0.05,
                             max_retries=1, retry_wait_s=0, min_runs=5, max_runs=5, warmup=0, warmup_s=0)
    assert m.other_load == pytest.approx(0.9) and m.discarded_repeats == 1
    assert rec[0].filename == __file__  # the warning points at the caller, not at latency_tables internals


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat on this OS")
def test_load_monitor_reads_proc_stat():
    mon = LoadMonitor()
    mon.start()
    t_end = time.perf_counter() + 0.1
    while time.perf_counter() < t_end:
        pass
    load = mon.stop()
    assert load is not None and 0.0 <= load <= 1.0
    # The window includes warm-up; 0.1 s spans several /proc/stat ticks (a too-short window reports None).
    m = measure_callable(lambda: None, min_runs=5, max_runs=10, warmup=1, warmup_s=0.1)
    assert m.other_load is not None and 0.0 <= m.other_load <= 1.0


def test_measurement_roundtrip_and_meta():
    m = measure_callable(Scripted(lambda i: 2.0), meta={"backend": "fake", "threads": 2, "precision": "fp32",
                                                         "batch": 4, "input_shape": [3, 8, 8]},
                         min_runs=5, max_runs=5, **QUIET)
    assert (m.backend, m.threads, m.batch, m.input_shape) == ("fake", 2, 4, [3, 8, 8])
    d = json.loads(json.dumps(m.to_dict()))
    assert Measurement.from_dict(d) == m
    assert Measurement.from_dict({**d, "added_later": 1}) == m
    d.pop("median_ms")
    with pytest.raises(DetforgeError, match="median_ms"):
        Measurement.from_dict(d)
    assert "ms median" in m.summary()


def test_config_validation():
    with pytest.raises(DetforgeError) as e:
        MeasurementConfig(min_runs=50, max_runs=10)
    assert e.value.field == "max_runs"
    with pytest.raises(DetforgeError, match="unknown measurement setting"):
        measure_callable(lambda: None, min_run=3)
    with pytest.raises(DetforgeError, match="nothing to measure"):
        measure_interleaved([])


def test_median_ci_order_statistics():
    x = np.arange(20, dtype=float)
    assert median_ci(x, 0.95) == (5.0, 14.0)  # ranks 6 and 15 of 20: the textbook interval
    assert median_ci(np.array([1.0, 2.0, 3.0]), 0.95) == (1.0, 3.0)  # too few runs: whole range
