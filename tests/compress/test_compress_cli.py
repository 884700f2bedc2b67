"""`detforge prune` and `detforge quantize` from the command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from nas.cli import main
from search_spaces import load_model, save_model

from . import AUX, build, write_images


def test_prune_cli_writes_a_reloadable_model(tmp_path, capsys):
    save_model(build(AUX), tmp_path / "m")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "m"), "--macs", "0.6", "--round-to", "4", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["details"]["macs_ratio"] <= 0.6 and result["out"] == str(out)
    assert load_model(out).arch.to_dict() != load_model(tmp_path / "m").arch.to_dict()
    assert (out / "prune_report.json").is_file()


def test_prune_cli_errors(tmp_path, capsys):
    save_model(build(AUX), tmp_path / "m")
    assert main(["prune", str(tmp_path / "m"), "--latency-ms", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--table" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "m"), "--macs", "0.5", "--finetune-epochs", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    stride = max(load_model(tmp_path / "m").strides)  # a size the levels cannot line up at: before any work
    assert main(["prune", str(tmp_path / "m"), "--macs", "0.5", "--imgsz", str(stride * 3 // 2),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "imgsz" in err and f"largest stride {stride}" in err
    assert main(["latency", "measure", str(tmp_path / "m"), "--imgsz", str(stride * 3 // 2)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "imgsz" in err and not (tmp_path / "o").exists()


def test_prune_to_a_latency_refuses_a_table_of_another_size(tmp_path, capsys):
    from latency_tables import LatencyTable
    from latency_tables.backends import get_backend

    det = build(AUX)
    save_model(det, tmp_path / "m")
    be = get_backend("ort-cpu", threads=2)
    table = LatencyTable(fingerprint=be.fingerprint(1), backend=be.name, imgsz=2 * det.arch.imgsz, batch=1,
                         precision="fp32", threads=2, fused=True).save(tmp_path / "t.json")
    out = tmp_path / "o"
    assert main(["prune", str(tmp_path / "m"), "--latency-ms", "3", "--table", str(table), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "imgsz" in err and str(table) in err
    assert not out.exists()


def test_quantize_cli_from_a_model_dir(tmp_path, capsys):
    save_model(build(AUX), tmp_path / "m")
    write_images(tmp_path / "images", 3)
    out = tmp_path / "m.int8.onnx"
    assert main(["quantize", str(tmp_path / "m"), "--data", str(tmp_path / "images"), "--calib", "3",
                 "--method", "minmax", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calib_images"] == 3 and result["tail_float"]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    assert (tmp_path / "m.fp32.onnx").is_file() and (tmp_path / "m.int8.json").is_file()
    assert main(["quantize", str(tmp_path / "m.fp32.onnx"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "calibration images" in capsys.readouterr().err
    # an engine needs TensorRT's symmetric form: refused before the calibration, and nothing written
    assert main(["quantize", str(tmp_path / "m.fp32.onnx"), "--data", str(tmp_path / "images"), "--calib", "3",
                 "--out", str(tmp_path / "y.onnx"), "--engine", str(tmp_path / "y.engine")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--target trt" in err and "engine" in err
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "y.json").exists()


def test_prune_cli_taylor_rounds_with_finetuning(tmp_path, capsys):
    from trainer.synthetic import generate

    data = generate(tmp_path / "d", train=8, val=4, imgsz=64, classes=2, seed=0)
    save_model(build(AUX), tmp_path / "m")
    out = tmp_path / "pruned"
    # round 2 prunes round 1's finetuned model (its EMA copy, parameters frozen): Taylor needs their gradients
    assert main(["prune", str(tmp_path / "m"), "--macs", "0.7", "--importance", "taylor", "--steps", "2",
                 "--finetune-epochs", "1", "--data", str(data), "--batch", "4", "--round-to", "4",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # after the finetunes' epoch lines
    assert result["details"]["macs_ratio"] <= 0.7 and len(result["details"]["steps"]) == 2
    assert main(["prune", str(tmp_path / "m"), "--macs", "0.5", "--importance", "taylor",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("engine_ok", [True, False])
def test_quantize_engine_is_moved_into_place_only_once_verified(engine_ok, tmp_path, capsys, monkeypatch):
    import compress.export
    import compress.quantize
    import latency_tables.backends.tensorrt
    from compress.export import ort_session

    save_model(build(AUX), tmp_path / "m")
    write_images(tmp_path / "images", 3)
    out, engine = tmp_path / "m.int8.onnx", tmp_path / "m.engine"
    engine.write_bytes(b"earlier")
    built: list[Path] = []

    def fake_build(qdq, path, **kw):  # what TensorRT would write (no GPU here)
        built.append(Path(path))
        Path(path).write_bytes(b"new")
        return Path(path)

    def fake_run(path, inputs, names=None):  # the engine's outputs: ORT's on the QDQ model, or 0.5 off in every score
        assert Path(path).read_bytes() == b"new"  # the engine just built, not the earlier one
        assert names == [ort_session(out).get_outputs()[0].name]  # asked for by name, not the engine's order
        ref = ort_session(out).run(None, inputs)[0]
        return [ref if engine_ok else np.concatenate([ref[..., :4], ref[..., 4:] + 0.5], -1)]

    monkeypatch.setattr(compress.quantize, "build_trt_int8_engine", fake_build)
    monkeypatch.setattr(compress.export, "run_engine", fake_run)
    monkeypatch.setattr(latency_tables.backends.tensorrt, "import_tensorrt", lambda: None)  # as if installed
    rc = main(["quantize", str(tmp_path / "m"), "--data", str(tmp_path / "images"), "--calib", "3", "--target", "trt",
               "--out", str(out), "--engine", str(engine), "--json"])
    assert built and built[0] != engine  # built beside it, not over it
    if engine_ok:
        assert rc == 0 and engine.read_bytes() == b"new"
        assert json.loads(capsys.readouterr().out)["engine_max_abs_diff"] < 1e-6
    else:
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "does not match ONNX Runtime" in err
        assert err.split(": ")[2] == str(engine)  # the file asked for, not the temporary one it was built as
        assert engine.read_bytes() == b"earlier"  # a refused engine keeps the earlier one
    assert sorted(p.name for p in tmp_path.glob(".m.engine*")) == []  # no temporary file left


def _fake_engine(tmp_path, monkeypatch, results: dict[str, np.ndarray]) -> Path:
    """An engine file whose TensorRT runner (faked: no GPU here) returns `results` in their order."""
    import latency_tables.backends.tensorrt as trt_backend

    class Runner:
        def __init__(self, *a, **kw):
            self.output_names = list(results)

        def outputs(self):
            return list(results.values())

        def close(self):
            pass

    monkeypatch.setattr(trt_backend, "TrtRunner", Runner)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "m.engine").write_bytes(b"x")
    return tmp_path / "m.engine"


def test_an_engine_with_non_finite_outputs_is_refused(tmp_path, monkeypatch):
    from compress.export import run_engine
    from search_spaces.errors import DetforgeError

    engine = _fake_engine(tmp_path, monkeypatch, {"output": np.array([[1.0, np.nan]], np.float32)})
    with pytest.raises(DetforgeError, match="not finite"):
        run_engine(engine, {"images": np.zeros((1, 3, 8, 8), np.float32)})


def test_an_engines_outputs_are_returned_in_the_order_asked_by_name(tmp_path, monkeypatch):
    from compress.export import run_engine
    from compress.graph_nms import TRT_OUTPUTS
    from search_spaces.errors import DetforgeError

    engine_order = ["det_scores", "num_dets", "det_classes", "det_boxes"]  # TensorRT keeps its own order
    # each output holds its own index in the engine
    engine = _fake_engine(tmp_path, monkeypatch, {n: np.full((1, 1), i, np.float32) for i, n in enumerate(engine_order)})
    feed = {"images": np.zeros((1, 3, 8, 8), np.float32)}
    outs = run_engine(engine, feed, names=TRT_OUTPUTS)
    assert [int(o[0, 0]) for o in outs] == [engine_order.index(n) for n in TRT_OUTPUTS]
    assert [int(o[0, 0]) for o in run_engine(engine, feed)] == [0, 1, 2, 3]  # engine order
    with pytest.raises(DetforgeError, match="no output"):
        run_engine(engine, feed, names=["detections"])
