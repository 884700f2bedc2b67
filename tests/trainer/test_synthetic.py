"""The built-in synthetic dataset: deterministic, sane labels, resumable, and readable by YoloDataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from nas.cli import main
from search_spaces.errors import DataError
from trainer.datasets import YoloDataset, load_data_config
from trainer.synthetic import MAX_CLASSES, SHAPES, generate, render

SMALL = {"train": 16, "val": 4, "imgsz": 96, "classes": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.parent.name in ("images", "labels")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, **SMALL, seed=0, workers=2)
    return out


def test_layout_and_data_yaml(synth):
    files = _files(synth)
    assert sum(k.startswith("images/train/") for k in files) == 16
    assert sum(k.startswith("labels/val/") for k in files) == 4
    data = yaml.safe_load((synth / "data.yaml").read_text())
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["nc"] == 6 and data["names"] == list(SHAPES[:6])
    cfg = load_data_config(synth)
    assert cfg.nc == 6 and cfg.train == synth / "images" / "train"


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = generate(tmp_path / "a", **SMALL, seed=0, workers=0).parent  # in-process: same bytes as the pool
    assert _files(again) == _files(synth)
    other = generate(tmp_path / "b", **SMALL, seed=1, workers=0).parent
    a, b = _files(synth), _files(other)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a if k.endswith(".jpg"))


def test_labels_are_sane_and_varied():
    labels = np.concatenate([render(3, "train", i, 160, 6)[1] for i in range(40)])
    assert len(labels) > 100
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()
    assert (labels[:, 3:] > 0).all()
    cx, cy, w, h = labels[:, 1:].T
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    classes = labels[:, 0].astype(int)
    assert set(classes) == set(range(6))  # every class appears
    side = np.sqrt(w * h) * 160
    assert side.min() < 12 and side.max() > 60  # small and large objects
    aspect = w / h
    assert aspect.min() < 0.6 and aspect.max() > 1.6
    counts = [len(render(3, "val", i, 96, 6)[1]) for i in range(30)]
    assert 0 <= min(counts) and max(counts) <= 12 and len(set(counts)) > 4


def test_image_format_and_class_range():
    img, _ = render(5, "train", 2, 128, 6)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    for c in range(1, MAX_CLASSES + 1):
        assert render(0, "val", 0, 64, c)[1][:, 0].max(initial=0) < c


def test_readable_by_yolo_dataset(synth, caplog):
    ds = YoloDataset(synth / "images" / "train", imgsz=96, augment=True, nc=6, cache=False)
    assert len(ds) == 16 and not ds.problems
    img, targets, _, _ = ds[0]
    assert img.shape == (3, 96, 96) and targets.shape[1] == 6
    assert "WARNING" not in caplog.text


def test_resume_and_shrink(synth, tmp_path):
    out = tmp_path / "r"
    generate(out, **SMALL, seed=0, workers=0)
    (out / "images" / "train" / "000003.jpg").unlink()
    (out / "labels" / "val" / "000001.txt").unlink()
    (out / "data.yaml").unlink()
    generate(out, **SMALL, seed=0, workers=0)
    assert _files(out) == _files(synth) and (out / "data.yaml").is_file()
    generate(out, **{**SMALL, "train": 5}, seed=0, workers=0)
    assert len(list((out / "images" / "train").iterdir())) == 5
    generate(out, **SMALL, seed=2, workers=0)  # different content: nothing stale survives
    assert _files(out) != _files(synth) and len(list((out / "labels" / "train").glob("*.txt"))) == 16


def test_refuses_foreign_directory_and_bad_args(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not a detforge synthetic dataset"):
        generate(tmp_path, **SMALL)
    with pytest.raises(DataError) as e:
        generate(tmp_path / "x", train=4, val=1, classes=MAX_CLASSES + 1)
    assert e.value.field == "classes"


def test_cli_synth_json(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["data", "synth", "--out", str(out), "--train", "4", "--val", "2", "--imgsz", "64", "--classes", "3",
               "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # exactly one JSON object on stdout
    assert result["data"] == str(out / "data.yaml") and result["nc"] == 3 and result["train"] == 4
    assert len(list((out / "images" / "val").iterdir())) == 2


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("x")
    assert main(["data", "synth", "--out", str(tmp_path), "--train", "2"]) == 2
    assert "detforge: error:" in capsys.readouterr().err
