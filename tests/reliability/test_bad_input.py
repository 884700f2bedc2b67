"""Bad input through the CLI: each case is one clear line naming the file (and field), exit code 2, no traceback.

`CASES` is the catalogue counted in docs/benchmarks.md ("Reliability"); each entry writes its bad file(s)
into a fresh folder and returns the command line, plus the text the error line must contain.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from search_spaces import load_model, save_model
from search_spaces.space import SPACES_DIR
from search_spaces.zoo import zoo_path
from trainer.synthetic import generate

TINY = zoo_path("yolov7-tiny").read_text()
DEMO = (Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small, valid synthetic dataset (data.yaml)."""
    root = tmp_path_factory.mktemp("data")
    return generate(root, train=4, val=4, imgsz=64, classes=2, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A valid 2-class model directory."""
    return save_model(load_model("yolov7-tiny", form="deploy", nc=2), tmp_path_factory.mktemp("m") / "model")


def _write(d: Path, name: str, text: str | bytes) -> str:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return str(p)


def _yaml_edit(text: str, edit: Callable[[dict], object]) -> str:
    doc = yaml.safe_load(text)
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _data_copy(d: Path, data: Path, edit: Callable[[dict], object]) -> str:
    doc = yaml.safe_load(data.read_text())
    doc["path"] = str(data.parent)
    edit(doc)
    return _write(d, "data.yaml", yaml.safe_dump(doc))


def _space(edit: Callable[[dict], object]) -> str:
    return _yaml_edit((SPACES_DIR / "tiny.yaml").read_text(), edit)


# name -> (builder(tmp, data, model_dir) -> argv, text the error line must contain)
CASES: dict[str, tuple[Callable[[Path, Path, Path], list[str]], str]] = {
    # architecture YAML
    "arch: missing file": (lambda d, *_: ["info", str(d / "nope.yaml")], "nope.yaml"),
    "arch: YAML syntax": (lambda d, *_: ["info", _write(d, "a.yaml", "backbone: [\n  - {block: conv")], "a.yaml"),
    "arch: not a mapping": (lambda d, *_: ["info", _write(d, "a.yaml", "- 1\n- 2\n")], "a.yaml"),
    "arch: unknown key": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a.update(colour="red")))], "colour"),
    "arch: unknown block": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["backbone"][0].update(block="resnet")))], "backbone[0]"),
    "arch: wrong type": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["backbone"][0].update(out="wide")))], "backbone[0]"),
    "arch: impossible value": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["backbone"][0].update(out=-8)))], "backbone[0]"),
    "arch: dangling from": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["neck"][0].update({"from": "nowhere"})))], "nowhere"),
    "arch: head reads the input": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["head"].update({"type": "detect", "from": ["input"], "anchors": [[10, 13, 16, 30, 33, 23]]})))],
        "head.from: a head reads layers"),
    "arch: even ELAN kernel": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["backbone"][2].update(k=2)))], "backbone[2].k"),
    "arch: even E-ELAN kernel": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["backbone"][2].update(block="eelan", k=4)))], "backbone[2].k"),
    "arch: even SPP kernels": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["neck"].__setitem__(0, {"name": "spp", "block": "sppcspc", "out": 256, "k": [5, 8]})))],
        "neck[0].k"),
    "arch: infinite anchor": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: a["head"]["anchors"][2].__setitem__(5, float("inf"))))], "head.anchors"),
    "arch: imgsz fits the head but not a deeper layer": (lambda d, *_: ["info", _write(d, "a.yaml", _yaml_edit(
        TINY, lambda a: (a.update(imgsz=96), a["backbone"].extend([{"block": "maxpool"}, {"block": "upsample"}]))))],
        "imgsz: must be a multiple of the largest stride 64"),
    "info: imgsz not a multiple of the stride": (lambda d, *_: ["info", str(zoo_path("yolov7-tiny")), "--imgsz",
                                                                "80"], "imgsz"),
    "arch: empty file": (lambda d, *_: ["info", _write(d, "a.yaml", "")], "a.yaml"),
    # model directories and weights
    "weights: truncated": (lambda d, _data, m: ["info", _copy_model(d, m, lambda w: w.write_bytes(
        w.read_bytes()[:1000]))], "weights.pt"),
    "weights: not a checkpoint": (lambda d, _data, m: ["info", _copy_model(d, m, lambda w: w.write_text(
        "hello"))], "weights.pt"),
    "weights: another model": (lambda d, _data, m: ["info", str(_foreign_model(d))], "weights.pt"),
    # datasets
    "data: missing data.yaml": (lambda d, *_: ["data", "check", str(d / "none" / "data.yaml")], "data.yaml"),
    "data: val path nowhere": (lambda d, data, _m: ["data", "check", _data_copy(
        d, data, lambda y: y.update(val="images/elsewhere"))], "val"),
    "data: names and nc missing": (lambda d, data, _m: ["data", "check", _data_copy(
        d, data, lambda y: (y.pop("names"), y.pop("nc", None)))], "names"),
    "data: names wrong type": (lambda d, data, _m: ["data", "check", _data_copy(
        d, data, lambda y: y.update(names=7))], "names"),
    "data: bad label with --strict": (lambda d, data, _m: ["data", "check", "--strict", _bad_label(d, data)],
                                      ".txt"),
    "data: corrupt image with --strict": (lambda d, data, _m: ["data", "check", "--strict",
                                                              _corrupt_image(d, data)], ".jpg"),
    "data: COCO JSON missing keys": (lambda d, *_: ["data", "check", _write(
        d, "instances_val.json", json.dumps({"images": []}))], "instances_val.json"),
    # hyper-parameters and training settings
    "hyp: unknown key": (lambda d, data, _m: ["train", "--data", str(data), "--imgsz", "64", "--epochs", "1",
                                              "--hyp", _write(d, "h.yaml", "lr0: 0.01\nlearning_rate: 3\n"),
                                              "--out", str(d / "run"), "--device", "cpu"], "learning_rate"),
    "hyp: value out of range": (lambda d, data, _m: ["train", "--data", str(data), "--imgsz", "64", "--epochs", "1",
                                                    "--hyp", _write(d, "h.yaml", "lr0: 0.01\nmomentum: 0.0\n"),
                                                    "--out", str(d / "run"), "--device", "cpu"], "h.yaml: momentum"),
    "train: imgsz not a multiple of a P6 model's stride": (lambda d, data, _m: [
        "train", "--model", "yolov7-w6", "--data", str(data), "--imgsz", "96", "--epochs", "1", "--batch", "2",
        "--workers", "0", "--out", str(d / "run"), "--device", "cpu"], "imgsz: 96 is not a positive multiple of the largest stride 64"),
    "val: imgsz not a multiple of the model's stride": (lambda d, data, m: [
        "val", "--data", str(data), "--weights", str(m), "--imgsz", "100", "--device", "cpu"],
        "imgsz: 100 is not a positive multiple of the largest stride 32"),
    "predict: imgsz not a multiple of the model's stride": (lambda d, data, m: [
        "predict", "--source", str(data.parent / "images" / "val"), "--weights", str(m), "--imgsz", "100",
        "--out", str(d / "pred")], "imgsz: 100 is not a positive multiple of the largest stride 32"),
    "train: imgsz not a multiple of 32": (lambda d, data, _m: ["train", "--data", str(data), "--imgsz", "100",
                                                               "--out", str(d / "run")], "imgsz"),
    # (training such a model on the data is a finetune: its weights transfer, docs/training.md)
    "val: classes differ from the data": (lambda d, data, _m: ["val", "--data", str(data), "--weights",
                                                               str(_foreign_model(d, nc=5)), "--imgsz", "64",
                                                               "--device", "cpu"], "nc"),
    # search spaces
    "space: unknown key": (lambda d, *_: ["latency", "pack", "--space", _write(d, "s.yaml", _space(
        lambda s: s.update(flavour=1))), "--out", str(d / "b.tar.gz")], "flavour"),
    "space: unknown block type": (lambda d, *_: ["latency", "pack", "--space", _write(d, "s.yaml", _space(
        lambda s: s["backbone"].update(block=["elan", "transformer"]))), "--out", str(d / "b.tar.gz")],
                                  "transformer"),
    "space: infinite width": (lambda d, *_: ["latency", "pack", "--space", _write(d, "s.yaml", _space(
        lambda s: s["neck"].update(width=[0.5, float("inf")]))), "--out", str(d / "b.tar.gz")], "neck.width"),
    "space: YAML syntax": (lambda d, *_: ["latency", "pack", "--space", _write(d, "s.yaml", "backbone: {"),
                                          "--out", str(d / "b.tar.gz")], "s.yaml"),
    "space: unknown name": (lambda d, *_: ["latency", "pack", "--space", "galaxy", "--out", str(d / "b.tar.gz")],
                            "galaxy"),
    # pipeline configs (fail before any work starts)
    "pipeline: unknown key": (lambda d, *_: ["run", _write(d, "c.yaml", _yaml_edit(
        DEMO, lambda c: c.update(turbo=True))), "--out", str(d / "run"), "--dry-run"], "turbo"),
    "pipeline: wrong type": (lambda d, *_: ["run", _write(d, "c.yaml", _yaml_edit(
        DEMO, lambda c: c["search"].update(trials="many"))), "--out", str(d / "run"), "--dry-run"], "trials"),
    "pipeline: no time to measure a block": (lambda d, *_: ["run", _write(d, "c.yaml", _yaml_edit(
        DEMO, lambda c: c.setdefault("latency", {}).update(max_time_s=-1))), "--out", str(d / "run"), "--dry-run"],
        "latency.max_time_s"),
    "pipeline: impossible budget": (lambda d, *_: ["run", _write(d, "c.yaml", _yaml_edit(
        DEMO, lambda c: c["search"].update(budget_ms=-1.0))), "--out", str(d / "run"), "--dry-run"], "budget"),
    # latency tables
    "table: truncated JSON": (lambda d, *_: ["latency", "predict", "--table", _write(
        d, "t.json", '{"version": 1, "entries": {'), "yolov7-tiny"], "t.json"),
    "table: not a table": (lambda d, *_: ["latency", "predict", "--table", _write(d, "t.json", "[1, 2]"),
                                          "yolov7-tiny"], "t.json"),
    "table: missing file": (lambda d, *_: ["latency", "predict", "--table", str(d / "none.json"), "yolov7-tiny"],
                            "none.json"),
    # exported / user ONNX files
    "onnx: garbage file to val": (lambda d, data, _m: ["val", "--weights", _write(d, "m.onnx", b"\x08\x07junk"),
                                                       "--data", str(data), "--imgsz", "64"], "m.onnx"),
    "onnx: truncated file to quantize": (lambda d, data, _m: ["quantize", _truncated_onnx(d, _m), "--data",
                                                              str(data), "--out", str(d / "q.onnx")], "cut.onnx"),
    "onnx: missing file to latency measure": (lambda d, *_: ["latency", "measure", str(d / "none.onnx")],
                                              "none.onnx"),
    # official checkpoints
    "convert: unknown zoo name": (lambda d, *_: ["convert", _write(d, "c.pt", b"x"), "--model", "yolov9",
                                                 "--out", str(d / "o")], "yolov9"),
    "convert: not a checkpoint": (lambda d, *_: ["convert", _write(d, "c.pt", b"not a zip"), "--model",
                                                 "yolov7-tiny", "--out", str(d / "o")], "c.pt"),
}


def _copy_model(d: Path, model: Path, damage: Callable[[Path], object]) -> str:
    import shutil

    dst = d / "model"
    shutil.copytree(model, dst)
    damage(dst / "weights.pt")
    return str(dst)


def _foreign_model(d: Path, nc: int = 2) -> Path:
    """A model directory whose weights belong to another architecture (or whose classes differ)."""
    dst = save_model(load_model("yolov7-tiny", form="deploy", nc=nc), d / f"foreign{nc}")
    if nc == 2:
        other = save_model(load_model("yolov7-tiny", form="training", nc=2), d / "other")
        (dst / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    return dst


def _dataset_copy(d: Path, data: Path) -> Path:
    import shutil

    root = d / "ds"
    shutil.copytree(data.parent, root)
    y = yaml.safe_load((root / "data.yaml").read_text())
    y["path"] = str(root)
    (root / "data.yaml").write_text(yaml.safe_dump(y))
    for cache in root.rglob("*.cache"):
        cache.unlink()
    return root


def _bad_label(d: Path, data: Path) -> str:
    root = _dataset_copy(d, data)
    label = min((root / "labels" / "train").glob("*.txt"))
    label.write_text("0 0.5 0.5 0.2\n")  # four columns
    return str(root / "data.yaml")


def _corrupt_image(d: Path, data: Path) -> str:
    root = _dataset_copy(d, data)
    image = min((root / "images" / "train").iterdir())
    image.write_bytes(image.read_bytes()[:50])
    return str(root / "data.yaml")


def _truncated_onnx(d: Path, model: Path) -> str:
    from compress.export import export_detector

    full = export_detector(load_model(model), d / "full.onnx", 64).path
    cut = d / "cut.onnx"
    cut.write_bytes(Path(full).read_bytes()[:4000])
    return str(cut)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_exit_2(case, data, model_dir, tmp_path, capsys):
    build, needle = CASES[case]
    argv = build(tmp_path, data, model_dir)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{case}: exit {rc}, stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("detforge: error: "), f"{case}:\n{err}"
    assert "Traceback" not in err
    assert needle in lines[0], f"{case}: {needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("group", ["data", "latency", "supernet"])
def test_command_group_without_action_prints_its_help_and_exits_2(group, capsys):
    assert main([group]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"usage: detforge {group} ") and "Traceback" not in out


def test_debug_shows_the_traceback_above_the_error_line(tmp_path, capsys):
    assert main(["--debug", "info", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and any("ConfigError" in ln for ln in err)
    assert err[-1].startswith("detforge: error: ") and "nope.yaml" in err[-1]
