"""`detforge prune` and `detforge quantize` from the command line."""
from __future__ import annotations

import json

import onnx

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
