"""Probe bundles: pack, run the extracted runner with plain Python, import the results as a table."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from dataclasses import asdict

import onnx
import pytest

from latency_tables import DeviceFingerprint, bundle_manifest, import_results, pack
from latency_tables.probe import strip_weights
from latency_tables.table import BUILD_PROTOCOL
from search_spaces.errors import ConfigError
from search_spaces.space import load_space

from . import FAST, MICRO_IMGSZ, micro_space_file

RUNNER_SETTINGS = [f"--set={k}={json.dumps(v)}" for k, v in FAST.items()]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The micro search space."""
    return load_space(micro_space_file(tmp_path_factory.mktemp("space")))


@pytest.fixture(scope="module")
def bundle(space, tmp_path_factory):
    """A packed and extracted bundle: (tar.gz path, extracted runner dir)."""
    root = tmp_path_factory.mktemp("probe")
    out = pack(space, root / "bundle.tar.gz", imgsz=MICRO_IMGSZ, fit_models=3, progress=False)
    with tarfile.open(out) as tar:
        tar.extractall(root / "device", filter="data")
    return out, root / "device" / "detforge-probe"


def run_runner(runner_dir, out, *extra: str) -> subprocess.CompletedProcess:
    """Run the bundle's runner in a fresh interpreter where detforge and torch cannot be imported."""
    argv = [str(runner_dir / "runner.py"), "--threads", "2", "--out", str(out), *RUNNER_SETTINGS, *extra]
    code = ("import runpy, sys\n"
            "for name in ('search_spaces', 'latency_tables', 'nas', 'compress', 'trainer', 'torch'):\n"
            "    sys.modules[name] = None  # importing them now fails, as on a device without them\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({argv[0]!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=runner_dir,
                          check=False, timeout=300)


@pytest.fixture(scope="module")
def results(bundle, tmp_path_factory):
    """results.json of one run of the extracted runner."""
    out = tmp_path_factory.mktemp("results") / "results.json"
    r = run_runner(bundle[1], out)
    assert r.returncode == 0, r.stderr
    return out


def test_bundle_holds_every_signature_and_a_standalone_runner(space, bundle):
    out, root = bundle
    man = bundle_manifest(out)
    assert {b["key"] for b in man["blocks"]} == {s.key() for s in space.block_signatures(MICRO_IMGSZ, 1)}
    assert len(man["models"]) == 3 and man["imgsz"] == MICRO_IMGSZ
    assert man["protocol"] == asdict(BUILD_PROTOCOL)  # the device measures as `latency build` does here
    shipped = ("runner.py", "measurement.py", "host.py")
    assert all((root / name).is_file() for name in shipped)
    source = "".join((root / name).read_text() for name in shipped)
    assert "import latency_tables" not in source and "from latency_tables" not in source
    # Weights are left out: every float tensor over 1 KiB points at a .bin the runner writes itself.
    for item in man["blocks"] + man["models"]:
        model = onnx.load(str(root / item["file"]), load_external_data=False)
        big = [t for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) >= 1024]
        assert not big, item["file"]


def test_round_trip_gives_a_table_for_this_device(space, results, tmp_path):
    table = import_results(results, tmp_path / "table.json")
    assert len(table) == len(space.block_signatures(MICRO_IMGSZ, 1))
    assert table.backend == "ort-cpu" and table.threads == 2 and table.imgsz == MICRO_IMGSZ
    here = DeviceFingerprint.collect(backend="ort-cpu", threads=2, precision="fp32", batch=1)
    assert table.fingerprint.compare(here) == []  # the runner's fingerprint matches detforge's own
    assert table.overhead.method in ("ratio", "soft_l1") and len(table.overhead.points) == 3
    assert table.overhead.call_overhead_ms > 0
    # predictions are made of the runner's own measurements (their order is timing, not a unit-test matter)
    measured = json.loads(results.read_text())["entries"]
    for arch in (space.smallest(), space.largest()):
        pred = table.breakdown(arch)
        assert pred.predicted_ms > 0 and len(pred.blocks) > 0
        for key, net_ms in pred.blocks:
            assert net_ms == table.overhead.net(measured[key]["median_ms"])
    assert (tmp_path / "table.json").is_file()


def test_runner_continues_a_finished_run_without_measuring_again(bundle, results, tmp_path):
    copy = tmp_path / "again.json"
    copy.write_text(results.read_text())
    before = json.loads(copy.read_text())
    r = run_runner(bundle[1], copy)
    assert r.returncode == 0, r.stderr
    after = json.loads(copy.read_text())
    assert after["entries"] == before["entries"] and after["models"] == before["models"]


def test_strip_weights_moves_large_floats_out():
    import numpy as np
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 8, 1, 1), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w, shape])
    data, info = strip_weights(helper.make_model(graph).SerializeToString(), "m.bin", "fp32")
    assert info == {"file": "m.bin", "bytes": 64 * 8 * 4, "dtype": "float32"}
    model = onnx.load_from_string(data)
    assert model.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    assert len(model.graph.initializer[1].raw_data) == 16  # small int64 constants stay inline


def test_corrupt_results_are_a_config_error(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"schema": "detforge.probe_results", "entries": {')
    with pytest.raises(ConfigError, match="invalid or truncated JSON"):
        import_results(bad, tmp_path / "t.json")
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ConfigError) as e:
        import_results(bad, tmp_path / "t.json")
    assert e.value.field == "schema" and str(bad) in str(e.value)


def test_results_without_the_runners_settings_name_the_missing_field(results, tmp_path):
    doc = json.loads(results.read_text())
    for section, key in (("setup", "provider"), ("bundle", "imgsz")):
        broken = json.loads(json.dumps(doc))
        del broken[section][key]
        bad = tmp_path / "results.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ConfigError) as e:
            import_results(bad, tmp_path / "t.json")
        assert e.value.field == f"{section}.{key}" and str(bad) in str(e.value)
    assert not (tmp_path / "t.json").exists()


def test_results_state_their_bundles_key_version_and_newer_ones_are_refused(results, tmp_path):
    from latency_tables.probe import MANIFEST_VERSION

    doc = json.loads(results.read_text())
    assert doc["bundle"]["version"] == MANIFEST_VERSION == 2  # head levels keyed by anchor count
    for version, ok in ((MANIFEST_VERSION + 1, False), ("2", False), (0, False), (None, True), (1, True)):
        other = json.loads(json.dumps(doc))
        if version is None:
            del other["bundle"]["version"]  # written by an earlier runner: a version-1 bundle
        else:
            other["bundle"]["version"] = version
        path = tmp_path / "results.json"
        path.write_text(json.dumps(other))
        if ok:
            assert len(import_results(path, tmp_path / "t.json").entries) == len(doc["entries"])
        else:
            with pytest.raises(ConfigError) as e:
                import_results(path, tmp_path / "t.json")
            assert e.value.field == "bundle.version" and str(path) in str(e.value)


def test_runner_refuses_to_overwrite_results_of_other_settings(bundle, results, tmp_path):
    copy = tmp_path / "mine.json"
    copy.write_text(results.read_text())
    before = copy.read_bytes()
    argv = [str(bundle[1] / "runner.py"), "--threads", "1", "--out", str(copy), *RUNNER_SETTINGS]
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 2 and "use another --out" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert copy.read_bytes() == before


def test_runner_continues_only_the_same_protocol_on_the_same_device(bundle, results, tmp_path):
    copy = tmp_path / "mine.json"
    copy.write_text(results.read_text())
    before = copy.read_bytes()
    r = run_runner(bundle[1], copy, "--set", "min_runs=7")  # one setting more than the run it would continue
    assert r.returncode == 2 and "another protocol (min_runs differ)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and copy.read_bytes() == before
    doc = json.loads(before)
    doc["device"]["cpu_model"] = "Some Other CPU 9000"  # a second board finishing the first one's results
    copy.write_text(json.dumps(doc))
    before = copy.read_bytes()
    r = run_runner(bundle[1], copy)
    assert r.returncode == 2 and "Some Other CPU 9000" in r.stderr and copy.read_bytes() == before
    for bad, says in (("foo=1", "unknown measurement setting"), ("min_runs=abc", "min_runs"), ("min_runs", "NAME=VALUE")):
        r = run_runner(bundle[1], tmp_path / "new.json", "--set", bad)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "new.json").exists()


def test_results_of_a_run_killed_in_the_model_passes_import_as_incomplete(results, tmp_path):
    doc = json.loads(results.read_text())
    doc["models"] = {}  # filled only after the last pass
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(doc))
    table = import_results(partial, tmp_path / "t.json")
    assert table.overhead.method == "identity" and "not fitted" in table.info["incomplete"]
    assert "run the runner again" in table.info["incomplete"]  # a rerun finishes the passes


def test_a_model_the_device_cannot_load_is_skipped_and_the_run_finishes(bundle, tmp_path):
    import shutil

    device = tmp_path / "detforge-probe"
    shutil.copytree(bundle[1], device)
    man = json.loads((device / "manifest.json").read_text())
    block, model = man["blocks"][1], man["models"][0]
    for item in (block, model):  # e.g. an operator this onnxruntime lacks: the session cannot be made
        (device / item["file"]).write_bytes(b"not an onnx graph")
    out = tmp_path / "results.json"
    r = run_runner(device, out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["failed"]) == {f"entries:{block['key']}", *(f"models_pass{p}:{model['name']}" for p in range(3))}
    assert block["key"] not in doc["entries"] and len(doc["entries"]) == len(man["blocks"]) - 1
    assert model["name"] not in doc["models"] and len(doc["models"]) == len(man["models"]) - 1
    before = out.read_text()
    again = run_runner(device, out)  # continuing does not stop at the same model again
    assert again.returncode == 0 and json.loads(out.read_text())["entries"] == json.loads(before)["entries"]
    table = import_results(out, tmp_path / "t.json")
    assert len(table) == len(man["blocks"]) - 1 and "2 model(s) failed on the device" in table.info["incomplete"]
    assert "run the runner again" not in table.info["incomplete"]  # it would skip them again
