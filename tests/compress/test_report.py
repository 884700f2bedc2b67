"""measure_latency_ms: each ORT session timed alone (no round-robin contention), passes in rotating order."""
from __future__ import annotations

from compress.export import export_detector
from compress.report import measure_latency_ms
from latency_tables import measurement
from search_spaces import load_model


def test_each_model_is_timed_alone_in_rotating_passes(tmp_path, monkeypatch):
    files = []
    for i, name in enumerate(("yolov7-tiny", "yolov7-tiny")):
        files.append(export_detector(load_model(name, form="deploy", nc=2 + i), tmp_path / f"m{i}.onnx", 64).path)
    groups: list[int] = []
    real = measurement._run_repeat

    def spy(runners, cfg):
        groups.append(len(runners))
        order.append(id(runners[0]))
        return real(runners, cfg)

    order: list[int] = []
    monkeypatch.setattr(measurement, "_run_repeat", spy)
    ms = measure_latency_ms(files, 64, threads=1, repeats=3, warmup=1, warmup_s=0.0, min_runs=3, max_runs=5,
                            max_time_s=0.5, check_load=False)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert groups == [1] * 6  # one session per repeat: never two sessions round-robin
    first, second = order[0], order[1]
    assert order == [first, second, second, first, first, second]  # each pass starts with the next model


def test_timing_a_detector_leaves_it_in_eval_mode():
    det = load_model("yolov7-tiny", form="deploy", nc=2).eval()
    ms = measure_latency_ms([det], 64, threads=1, repeats=1, warmup=1, warmup_s=0.0, min_runs=3, max_runs=3,
                            max_time_s=0.5, check_load=False)
    assert ms[0] > 0
    assert not any(m.training for m in det.modules()), "the caller's model was switched to training mode"
