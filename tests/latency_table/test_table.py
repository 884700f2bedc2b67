"""LatencyTable: build, resume, concurrent saves, files, prediction, overhead fit and validation."""
from __future__ import annotations

import json
import random
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from latency_tables import LatencyTable, fit_overhead, validate
from latency_tables.backends import get_backend
from latency_tables.measurement import Measurement, MeasurementConfig
from latency_tables.predictor import OverheadModel
from latency_tables.table import eval_signatures
from search_spaces.errors import ConfigError
from search_spaces.space import arch_signatures, load_space

from . import FAST, MICRO_IMGSZ, MICRO_YAML, TINY_IMGSZ, SizeBackend, micro_space_file


@pytest.fixture(scope="module")
def tiny():
    """The tiny search space (607 block signatures at 64 px)."""
    return load_space("tiny")


@pytest.fixture(scope="module")
def sized(tiny, tmp_path_factory):
    """A table of the whole tiny space from the deterministic size backend."""
    path = tmp_path_factory.mktemp("sized") / "t.json"
    return LatencyTable.build(tiny, SizeBackend(), TINY_IMGSZ, path, progress=False, fit_models=8, group=64)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro search space (43 block signatures at 64 px)."""
    return load_space(micro_space_file(tmp_path_factory.mktemp("space")))


@pytest.fixture(scope="module")
def backend():
    """ORT on the CPU with a short protocol."""
    return get_backend("ort-cpu", threads=2, config=MeasurementConfig(**FAST))


@pytest.fixture(scope="module")
def built(micro, backend, tmp_path_factory):
    """A table of the micro space timed with ORT, built once for the module."""
    path = tmp_path_factory.mktemp("table") / "t.json"
    return LatencyTable.build(micro, backend, MICRO_IMGSZ, path, progress=False, fit_models=3)


def fake_measurement(ms: float) -> Measurement:
    """A Measurement with only the median set meaningfully."""
    return Measurement(median_ms=ms, p10_ms=ms, p90_ms=ms, iqr_ms=0.0, mean_ms=ms, runs=5, warmup=1,
                       threads=2, precision="fp32", batch=1, input_shape=[3, 8, 8], backend="ort-cpu",
                       noise=0.0, rejected_outliers=0, repeats=1)


def test_every_signature_of_random_archs_has_an_entry(tiny, sized):
    rng = random.Random(0)
    for _ in range(20):
        arch = tiny.random(rng)
        assert all(s.key() in sized for s in arch_signatures(arch, TINY_IMGSZ, 1))
    assert len(sized) == len(tiny.block_signatures(TINY_IMGSZ, 1))
    assert all(k in sized.signatures for k in sized.entries)


def test_prediction_adds_blocks_and_the_fitted_overhead(tiny, sized):
    # The size backend's whole model costs one call (0.01 ms) plus its blocks' parameters: the fit finds that.
    assert sized.overhead.call_overhead_ms == pytest.approx(0.01)
    om = sized.overhead
    assert om.method == "soft_l1" and len(om.points) == 8
    assert om.a_ms == pytest.approx(0.01, abs=1e-6) and om.b == pytest.approx(1.0)
    assert om.c_ms == pytest.approx(0.0, abs=1e-6)
    small, large = sized.predict(tiny.smallest()), sized.predict(tiny.largest())
    assert 0 < small < large
    p = sized.breakdown(tiny.largest())
    assert p.predicted_ms == pytest.approx(p.a_ms + p.b * p.sum_ms)
    assert len(p.blocks) == len(arch_signatures(tiny.largest(), TINY_IMGSZ, 1))


def test_validate_matches_exactly_on_a_deterministic_backend(tiny, sized, tmp_path):
    rep = validate(sized, tiny, n=6, seed=3, backend=SizeBackend(), plot=tmp_path / "v.png",
                   report=tmp_path / "v.json")
    assert rep.n == 6 and rep.within_5 == 1.0 and rep.mape < 1e-6 and rep.kendall_tau > 0.99
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "v.json").read_text())
    assert {"mape", "kendall_tau", "spearman", "within_5", "within_10", "points"} <= set(doc)


def test_a_real_table_predicts_positive_latencies(micro, built):
    assert len(built) == len(micro.block_signatures(MICRO_IMGSZ, 1))
    assert built.backend == "ort-cpu" and built.overhead.call_overhead_ms > 0
    assert built.overhead.method in ("soft_l1", "ratio") and len(built.overhead.points) == 3
    rng = random.Random(1)
    assert all(built.predict(micro.random(rng)) > 0 for _ in range(5))


def test_aux_branch_layers_are_not_part_of_the_prediction():
    from search_spaces import resolve_arch

    arch, _ = resolve_arch("yolov7-w6")  # IAuxDetect: its aux branch runs only in training
    sigs = eval_signatures(arch, 256)
    assert len(sigs) < len(arch_signatures(arch, 256))
    assert len(sigs) == len(arch.deploy_form()[0].layers) + len(arch.head.inputs)


def test_save_load_round_trip(built, tmp_path):
    path = built.save(tmp_path / "copy.json")
    again = LatencyTable.load(path)
    assert again.entries == built.entries and again.overhead == built.overhead
    assert again.fingerprint == built.fingerprint and again.imgsz == MICRO_IMGSZ
    doc = json.loads(path.read_text())
    assert doc["schema"] == "detforge.latency_table" and doc["version"] == 2
    assert set(doc) >= {"backend", "threads", "precision", "batch", "imgsz", "device", "overhead", "entries"}


def test_missing_entry_names_the_signature_or_is_measured(micro, built, backend, tmp_path):
    t = LatencyTable.load(built.save(tmp_path / "gap.json"))
    key = arch_signatures(micro.largest(), MICRO_IMGSZ, 1)[-1].key()
    del t.entries[key]
    t.save(tmp_path / "gap2.json")  # a fresh file: save merges what is on disk
    with pytest.raises(ConfigError, match="no entry for block signature") as e:
        t.predict(micro.largest())
    assert key in str(e.value)
    remote = LatencyTable.from_dict(t.to_dict())
    remote.fingerprint = replace(remote.fingerprint, cpu_model="Some Other CPU 9000")
    with pytest.raises(ConfigError, match="another device"):  # not timed here and mixed into its table
        remote.predict(micro.largest(), measure_missing=True)
    assert key not in remote
    assert t.predict(micro.largest(), measure_missing=True, backend=backend) > 0
    assert key in t
    del t.entries[key]  # measured without a backend given: with the table's own protocol, not the default one
    assert t.measurement_config() == MeasurementConfig(**FAST) != MeasurementConfig()
    made = []
    real = LatencyTable.backend_instance
    with pytest.MonkeyPatch.context() as m:
        m.setattr(LatencyTable, "backend_instance", lambda self, **kw: made.append(kw) or real(self, **kw))
        assert t.predict(micro.largest(), measure_missing=True) > 0
    assert key in t and made == [{"config": MeasurementConfig(**FAST)}]


def test_resume_keeps_finished_entries(micro, tmp_path):
    path = tmp_path / "killed.json"
    first: list[str] = []

    def die_after_three(key: str, m: Measurement) -> None:
        first.append(key)
        if len(first) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0, group=4,
                           callback=die_after_three)
    kept = LatencyTable.load(path)
    total = len(micro.block_signatures(MICRO_IMGSZ, 1))
    assert 3 <= len(kept) < total  # the group that was running when it died was saved, no more
    second: list[str] = []
    done = LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0, group=4,
                              callback=lambda k, m: second.append(k))
    assert not set(second) & set(kept.entries)  # nothing measured twice
    assert len(done) == total and len(second) == total - len(kept)
    assert all(done.entries[k] == kept.entries[k] for k in kept.entries)
    # a finished table is left byte for byte: a search's study refuses a table whose digest changed
    before = path.read_bytes()
    third: list[str] = []
    LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0, group=4,
                       callback=lambda k, m: third.append(k))
    assert not third and path.read_bytes() == before


def test_a_finished_table_is_not_measured_again_for_its_old_loaded_entries(micro, tmp_path):
    path = tmp_path / "t.json"
    LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0)
    doc = json.loads(path.read_text())
    for m in doc["entries"].values():
        m["other_load"] = 0.9  # measured under load by an earlier build, which retried them then
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    strict = SizeBackend()
    strict.config = replace(strict.config, max_other_load=0.1)
    again: list[str] = []
    LatencyTable.build(micro, strict, MICRO_IMGSZ, path, progress=False, fit_models=0,
                       callback=lambda k, m: again.append(k))
    assert again == [] and path.read_bytes() == before  # a study that recorded its digest still accepts it


def test_a_fit_killed_after_its_first_pass_continues_at_the_second(micro, tmp_path, monkeypatch):
    import latency_tables.table as table_mod

    real, calls, on_disk = table_mod.measure_architectures, [], []
    path = tmp_path / "t.json"

    def killed_in_the_second_pass(*args, **kw):
        calls.append(kw.get("desc"))
        if len(calls) == 2:  # what a kill -9 here would leave: the file as saved after the first pass
            on_disk.append(json.loads(path.read_text())["info"].get("fit_passes"))
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kw)

    monkeypatch.setattr(table_mod, "measure_architectures", killed_in_the_second_pass)
    with pytest.raises(KeyboardInterrupt):
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=3)
    monkeypatch.setattr(table_mod, "measure_architectures", real)
    assert on_disk[0] is not None and len(on_disk[0]) == 3  # one median per fit model, saved before pass 2
    saved = json.loads(path.read_text())
    assert len(saved["info"]["fit_passes"]) == 3 and saved["overhead"]["method"] == "identity"
    again = SizeBackend()
    table = LatencyTable.build(micro, again, MICRO_IMGSZ, path, progress=False, fit_models=3)
    assert again.prepared == 2 * 3  # the blocks are all there: only passes 2 and 3 of the 3 fit models
    assert len(table.overhead.points) == 3 and "fit_passes" not in table.info


def test_a_refit_killed_in_a_finished_table_continues_instead_of_keeping_the_old_fit(micro, tmp_path,
                                                                                      monkeypatch):
    import latency_tables.table as table_mod

    path = tmp_path / "t.json"
    LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=3)
    doc = json.loads(path.read_text())
    doc["entries"].pop(next(iter(doc["entries"])))  # a signature the table lacks: the build refits,
    path.write_text(json.dumps(doc))  # here on other models (another seed, as another space would give)
    real, calls = table_mod.measure_architectures, []

    def killed_in_the_second_pass(*args, **kw):
        calls.append(kw.get("desc"))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kw)

    monkeypatch.setattr(table_mod, "measure_architectures", killed_in_the_second_pass)
    with pytest.raises(KeyboardInterrupt):
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=3, seed=7)
    monkeypatch.setattr(table_mod, "measure_architectures", real)
    saved = json.loads(path.read_text())
    new_models = len(saved["info"]["fit_passes"])  # the fit models the first fit did not have
    assert new_models >= 1 and len(saved["overhead"]["points"]) == 3  # the old fit, beside the unfinished one
    again = SizeBackend()
    table = LatencyTable.build(micro, again, MICRO_IMGSZ, path, progress=False, fit_models=3, seed=7)
    assert again.prepared == 2 * new_models and "fit_passes" not in table.info  # passes 2 and 3, then the fit


def test_no_resume_refuses_a_file_that_is_not_a_table_and_leaves_it(micro, tmp_path):
    path = tmp_path / "results.json"  # e.g. a probe runner's raw results, given as --out by mistake
    path.write_text(json.dumps({"passes": [[1.0, 2.0]]}))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0, resume=False)
    assert str(path) in str(e.value) and "not a latency table" in str(e.value)
    assert path.read_bytes() == before


def test_no_resume_keeps_the_old_table_until_the_new_build_saves(micro, tmp_path, monkeypatch):
    import latency_tables.table as table_mod

    path = tmp_path / "t.json"
    LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0)
    before = path.read_bytes()

    def backend_fails(*args, **kw):
        raise RuntimeError("the device went away")

    with monkeypatch.context() as m:  # fails before its first save: the old table is all there is
        m.setattr(table_mod, "measure_call_overhead", backend_fails)
        with pytest.raises(RuntimeError):
            LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0,
                               resume=False)
    assert path.read_bytes() == before
    with pytest.raises(ConfigError) as e:  # an impossible size fails before anything is measured or removed
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ + 1, path, progress=False, fit_models=0,
                           resume=False)
    assert e.value.field is not None and path.read_bytes() == before
    missing = tmp_path / "none.json"
    with pytest.raises(ConfigError):
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ + 1, missing, progress=False, fit_models=0)
    assert not missing.exists()  # no table of no entries left to block the corrected rerun
    measured: list[str] = []
    fresh = LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=0,
                               resume=False, callback=lambda k, m: measured.append(k))
    assert len(measured) == len(fresh) == len(micro.block_signatures(MICRO_IMGSZ, 1))  # started over
    assert LatencyTable.load(path).info["created"] == fresh.info["created"]


def test_a_directory_as_the_table_path_is_a_config_error(micro, tmp_path):
    with pytest.raises(ConfigError) as e:
        LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, tmp_path, progress=False, fit_models=0)
    assert e.value.field == "out" and str(tmp_path) in str(e.value)
    with pytest.raises(ConfigError) as e:
        LatencyTable.from_dict(LatencyTable.build(micro, SizeBackend(), MICRO_IMGSZ, tmp_path / "t.json",
                                                  progress=False, fit_models=0).to_dict()).save(tmp_path)
    assert "directory" in str(e.value) and str(tmp_path) in str(e.value)


def test_a_space_smaller_than_the_fit_is_fitted_on_all_of_it_once(tmp_path):
    yaml_text = MICRO_YAML.replace("depth: [1, 2]", "depth: [1]").replace("{out: [16, 32]}", "{out: 16}")
    (tmp_path / "two.yaml").write_text(yaml_text)
    two = load_space(str(tmp_path / "two.yaml"))  # the head type alone is open
    path = tmp_path / "t.json"
    table = LatencyTable.build(two, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=16, group=64)
    assert len(table.overhead.points) == two.size() == 2
    before = path.read_bytes()
    LatencyTable.build(two, SizeBackend(), MICRO_IMGSZ, path, progress=False, fit_models=16, group=64)
    assert path.read_bytes() == before  # finished: not fitted and written again on every build


def test_resume_refuses_other_settings(micro, backend, built, tmp_path):
    # a file of its own: `built.path` follows the module table's last save, which may be a deleted tmp_path
    path = LatencyTable.from_dict(built.to_dict()).save(tmp_path / "t.json")
    other = get_backend("ort-cpu", threads=1, config=backend.config)
    with pytest.raises(ConfigError, match="threads"):
        LatencyTable.build(micro, other, MICRO_IMGSZ, path, progress=False, fit_models=0)
    quick = SizeBackend()
    sized = LatencyTable.build(micro, quick, MICRO_IMGSZ, tmp_path / "quick.json", progress=False, fit_models=0)
    sized.entries.pop(next(iter(sized.entries)))
    sized.save()  # unfinished, from a rough protocol (as `latency build --quick`)
    full = SizeBackend()
    full.config = replace(full.config, min_runs=full.config.min_runs + 1)
    with pytest.raises(ConfigError, match="min_runs") as e:  # its entries would mix with the rough ones
        LatencyTable.build(micro, full, MICRO_IMGSZ, tmp_path / "quick.json", progress=False, fit_models=0)
    assert e.value.field == "protocol"
    for size, batch, fld in ((0, 1, "imgsz"), (-32, 1, "imgsz"), (MICRO_IMGSZ, 0, "batch")):
        with pytest.raises(ConfigError) as e:  # refused before a file is written (it would not load again)
            LatencyTable.build(micro, SizeBackend(), size, tmp_path / "zero.json", batch=batch, progress=False)
        assert e.value.field == fld and not (tmp_path / "zero.json").exists()


def test_concurrent_saves_merge_entries(built, tmp_path):
    path = tmp_path / "shared.json"
    base = LatencyTable.from_dict(built.to_dict())
    base.entries, base.signatures = {}, {}
    base.save(path)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            t = LatencyTable.load(path, check_device=False)
            for i in range(5):
                t.entries[f"w{w}-{i}"] = fake_measurement(1.0 + i)
                t.save()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    final = LatencyTable.load(path)
    assert set(final.entries) == {f"w{w}-{i}" for w in range(4) for i in range(5)}


def test_saving_over_another_devices_table_is_refused_and_leaves_it(built, tmp_path):
    path = LatencyTable.from_dict(built.to_dict()).save(tmp_path / "theirs.json")
    before = path.read_bytes()
    mine = LatencyTable.from_dict(built.to_dict())
    mine.fingerprint = replace(mine.fingerprint, cpu_model="Some Other CPU 9000")
    with pytest.raises(ConfigError) as e:
        mine.save(path)
    assert e.value.field == "device" and str(path) in str(e.value)
    assert path.read_bytes() == before


def test_resuming_another_devices_table_is_refused_and_leaves_it(micro, backend, built, tmp_path):
    theirs = LatencyTable.from_dict(built.to_dict())
    theirs.fingerprint = replace(theirs.fingerprint, cpu_model="Some Other CPU 9000")
    theirs.entries.pop(next(iter(theirs.entries)))  # unfinished: a resume would measure the rest here
    path = theirs.save(tmp_path / "theirs.json")
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        LatencyTable.build(micro, backend, MICRO_IMGSZ, path, progress=False, fit_models=0)
    assert e.value.field == "device" and "Some Other CPU 9000" in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before


def test_saving_over_a_file_that_is_not_a_table_is_refused_and_leaves_it(built, tmp_path):
    path = tmp_path / "results.json"  # e.g. a probe runner's raw results, given as --out by mistake
    path.write_text(json.dumps({"passes": [[1.0, 2.0]]}))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        LatencyTable.from_dict(built.to_dict()).save(path)
    assert str(path) in str(e.value) and "not a latency table" in str(e.value)
    assert path.read_bytes() == before
    empty = tmp_path / "empty.json"
    empty.touch()  # nothing there to lose
    assert len(LatencyTable.load(LatencyTable.from_dict(built.to_dict()).save(empty))) == len(built)


def test_fingerprint_mismatch_warns(built, tmp_path):
    t = LatencyTable.from_dict(built.to_dict())
    t.fingerprint = replace(t.fingerprint, cpu_model="Some Other CPU 9000")
    path = t.save(tmp_path / "elsewhere.json")
    with pytest.warns(UserWarning, match="cpu_model"):
        LatencyTable.load(path)


def _edit(text: str, change) -> str:
    """The JSON text with `change` applied to its parsed document."""
    d = json.loads(text)
    change(d)
    return json.dumps(d)


@pytest.mark.parametrize("damage, field", [
    (lambda text: text[: len(text) // 2], None),
    (lambda text: text.replace('"detforge.latency_table"', '"something.else"'), "schema"),
    (lambda text: _edit(text, lambda d: d.update(version=99)), "version"),
    (lambda text: text.replace('"median_ms"', '"mediane"', 1), "entries."),
    (lambda text: _edit(text, lambda d: d["device"].update(versions="1.0")), "device.versions"),
    (lambda text: _edit(text, lambda d: d["device"].update(threads="two")), "device.threads"),
    (lambda text: _edit(text, lambda d: d["overhead"].update(points=[1, 2])), "overhead.points.0"),
    (lambda text: _edit(text, lambda d: d.update(imgsz=-32)), "imgsz"),
    (lambda text: _edit(text, lambda d: d.update(fused="false")), "fused"),
    (lambda text: _edit(text, lambda d: next(iter(d["entries"].values())).update(median_ms=True)), "entries."),
])
def test_corrupt_table_is_a_config_error_naming_the_file(built, tmp_path, damage, field):
    path = tmp_path / "bad.json"
    path.write_text(damage(json.dumps(built.to_dict(), indent=1)))
    with pytest.raises(ConfigError) as e:
        LatencyTable.load(path)
    assert str(path) in str(e.value)
    if field:
        assert e.value.field.startswith(field)


def test_overhead_fit_is_robust_to_one_outlier():
    sums = np.array([10.0, 14.0, 20.0, 25.0, 31.0, 40.0, 52.0, 60.0])
    measured = 0.8 + 1.15 * sums
    measured[3] *= 1.6  # one model measured under a burst of other load
    om = fit_overhead(sums, measured, call_overhead_ms=0.01)
    assert om.method == "soft_l1"
    assert om.b == pytest.approx(1.15, rel=0.02) and om.a_ms == pytest.approx(0.8, abs=0.3)
    assert om.apply(100.0) == pytest.approx(0.8 + 115.0, rel=0.02)
    assert om.net(0.005) == 0.0 and om.net(1.01) == pytest.approx(1.0)


def test_overhead_fit_finds_a_per_block_cost():
    rng = np.random.default_rng(0)
    sums = rng.uniform(5.0, 60.0, 12)
    blocks = rng.integers(28, 50, 12)
    measured = 0.4 + 0.95 * sums + 0.05 * blocks
    om = fit_overhead(sums, measured, blocks=blocks)
    assert (om.a_ms, om.b, om.c_ms) == pytest.approx((0.4, 0.95, 0.05), abs=1e-3)
    assert om.apply(10.0, 40) == pytest.approx(0.4 + 9.5 + 2.0)
    few = fit_overhead(sums[:5], measured[:5], blocks=blocks[:5])  # 5 models: no per-block term
    assert few.c_ms == 0.0 and few.method == "soft_l1"


def test_a_prediction_below_the_fit_range_is_never_under_an_empty_call():
    om = OverheadModel(a_ms=-2.97, b=1.1, call_overhead_ms=0.05)  # a negative intercept, as fits can give
    assert om.apply(0.4, 26) == 0.05 and om.apply(10.0) == pytest.approx(-2.97 + 11.0)


def test_overhead_fit_falls_back_to_a_ratio_on_a_narrow_range():
    om = fit_overhead([10.0, 10.5, 11.0], [12.0, 12.6, 13.2])
    assert om.method == "ratio" and om.a_ms == 0.0 and om.b == pytest.approx(1.2)


def test_realtime_priority_is_restored_and_measure_group_times_real_models(backend):
    import os

    from latency_tables.table import empty_model, measure_group, realtime_priority

    with realtime_priority() as elevated:
        if elevated:  # (root only) the measurement runs under SCHED_FIFO, and the policy comes back after
            assert os.sched_getscheduler(0) == os.SCHED_FIFO
        res = measure_group({"empty": (empty_model(), [(1, 1, 1)])}, backend, realtime=False)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert res["empty"].median_ms > 0 and res["empty"].backend == "ort-cpu"


def test_a_head_level_is_keyed_by_its_anchor_count_so_refit_anchors_keep_their_entries(tiny, sized):
    from search_spaces.space import BlockSignature

    rng = random.Random(1)
    arch = next(a for a in (tiny.random(rng) for _ in range(100)) if not a.head.anchor_free)
    refit = replace(arch, head=replace(arch.head, anchors=[[v * 0.37 for v in level] for level in arch.head.anchors]))
    assert not sized.missing(refit) and sized.predict(refit) == sized.predict(arch)  # AutoAnchor changes no time
    head = next(s for s in arch_signatures(arch, TINY_IMGSZ, 1) if s.block == "head.yolo")
    assert head.kwargs["na"] == len(arch.head.anchors[0]) // 2 and "anchors" not in head.kwargs
    decoded, _ = head.build_module()(*[torch.zeros(s) for s in head.input_shapes()])
    assert decoded.shape[-1] == 5 + tiny.nc  # the block builds and decodes from its signature alone
    assert BlockSignature.from_dict(head.to_dict()).key() == head.key()


def test_a_version_1_table_keyed_by_anchor_sizes_is_read_as_this_version(sized, tmp_path):
    from latency_tables.table import SCHEMA_VERSION, canonical_key

    doc = sized.to_dict()
    old_entries, old_sigs = {}, {}
    for k, m in doc["entries"].items():  # written back the way version 1 keyed a head level
        sig = doc["signatures"][k]
        if sig["block"] == "head.yolo":
            na = sig["args"]["na"]
            anchors = [float(sig["args"]["stride"])] * (2 * na)
            sig = {**sig, "args": {**{a: v for a, v in sig["args"].items() if a != "na"}, "anchors": anchors}}
            implicit = json.dumps(sig["args"]["implicit"])
            k = k.replace(f"head.yolo(implicit={implicit},na={na},",
                          f"head.yolo(anchors={json.dumps(anchors, separators=(',', ':'))},implicit={implicit},")
            assert k.startswith("head.yolo(anchors=[") and canonical_key(k) != k
        old_entries[k], old_sigs[k] = m, sig
    (tmp_path / "v1.json").write_text(json.dumps({**doc, "version": 1, "entries": old_entries,
                                                  "signatures": old_sigs}))
    old = LatencyTable.load(tmp_path / "v1.json", check_device=False)
    assert set(old.entries) == set(sized.entries) and old.signatures == sized.signatures
    assert old.save(tmp_path / "v2.json") and json.loads((tmp_path / "v2.json").read_text())["version"] == SCHEMA_VERSION


def test_version_1_heads_that_differed_only_in_anchors_keep_their_least_disturbed_timing(sized):
    old = "head.yolo(anchors=[{a}],implicit=true,nc=80,stride=16)|384x20x20|-|b1"
    entries = {old.format(a="12.0,16.0"): fake_measurement(0.72), old.format(a="19.0,27.0"): fake_measurement(0.54),
               old.format(a="30.0,61.0"): fake_measurement(0.55)}
    table = LatencyTable(fingerprint=sized.fingerprint, backend="ort-cpu", imgsz=64, entries=entries,
                         signatures={k: "not a signature" for k in entries})  # left as it is, no AttributeError
    key = "head.yolo(implicit=true,na=1,nc=80,stride=16)|384x20x20|-|b1"
    assert list(table.entries) == [key] and table.entries[key].median_ms == 0.54
