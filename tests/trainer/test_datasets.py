"""data.yaml parsing, YOLO and COCO datasets, the bad-data policy, the label cache and the loader."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from search_spaces.errors import DataError
from trainer import datasets
from trainer.augment import AugmentConfig, unletterbox_boxes, xywhn_to_xyxy
from trainer.datasets import (
    CocoDataset,
    YoloDataset,
    build_dataloader,
    collate_fn,
    img2label_path,
    load_data_config,
    parse_yolo_labels,
)

GOOD = "0 0.5 0.5 0.4 0.3\n1 0.25 0.25 0.1 0.2\n"


def _img(path: Path, w: int = 64, h: int = 48, mode: str = "RGB", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "I;16":
        im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def _yolo(root: Path, items: dict[str, str | None], split: str = "train") -> Path:
    """images/<split>/<name> with random pixels, labels/<split>/<stem>.txt holding the given text."""
    for i, (name, text) in enumerate(items.items()):
        _img(root / "images" / split / name, seed=i)
        if text is not None:
            lb = root / "labels" / split / (Path(name).stem + ".txt")
            lb.parent.mkdir(parents=True, exist_ok=True)
            lb.write_text(text)
    return root / "images" / split


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "detforge" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------- data.yaml


def _data_yaml(root: Path, text: str) -> Path:
    _yolo(root / "ds", {"a.jpg": GOOD}, "train")
    _yolo(root / "ds", {"b.jpg": GOOD}, "val")
    (root / "cfg").mkdir(exist_ok=True)
    p = root / "cfg" / "data.yaml"
    p.write_text(text)
    return p


def test_data_yaml_relative_paths_and_names(tmp_path):
    p = _data_yaml(tmp_path, "path: ../ds\ntrain: images/train\nval: [images/val]\nnames: {0: cat, 1: dog}\n")
    cfg = load_data_config(p)
    assert cfg.root == (tmp_path / "ds").resolve()
    assert cfg.train == cfg.root / "images/train" and cfg.val == [cfg.root / "images/val"]
    assert cfg.nc == 2 and cfg.names == ["cat", "dog"] and cfg.test is None
    assert load_data_config(p.parent).names == ["cat", "dog"]  # a directory means DIR/data.yaml


def test_data_yaml_nc_only_and_absolute_path(tmp_path):
    p = _data_yaml(tmp_path, f"path: {tmp_path / 'ds'}\ntrain: images/train\nval: images/val\nnc: 3\n")
    cfg = load_data_config(p)
    assert cfg.nc == 3 and cfg.names == ["class0", "class1", "class2"]


@pytest.mark.parametrize("text,field", [
    ("path: ../ds\nval: images/val\nnames: [a]\n", "train"),
    ("path: ../ds\ntrain: images/train\nval: images/nope\nnames: [a]\n", "val"),
    ("path: ../ds\ntrain: [images/train, images/nope]\nval: images/val\nnames: [a]\n", "train[1]"),
    ("path: ../nowhere\ntrain: images/train\nval: images/val\nnames: [a]\n", "path"),
    ("path: ../ds\ntrain: images/train\nval: images/val\n", "names"),
    ("path: ../ds\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b]\n", "nc"),
    ("path: ../ds\ntrain: images/train\nval: images/val\nnames: {0: a, 2: b}\n", "names"),
    ("path: ../ds\ntrain: images/train\nval: images/val\nnames: [a\n", "line 5"),  # YAML notices at the end of the file
])
def test_data_yaml_errors_name_file_and_field(tmp_path, text, field):
    p = _data_yaml(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_data_config(p)
    assert e.value.path == str(p) and e.value.field == field


def test_data_yaml_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data_config(tmp_path)


# ------------------------------------------------------------------------------------------- YOLO items


def test_label_path_convention():
    assert img2label_path("/d/images/train/x.jpg") == Path("/d/labels/train/x.txt")
    assert img2label_path("/images/d/images/a/b.png") == Path("/images/d/labels/a/b.txt")


def test_parse_labels_tolerance_and_polygons():
    labels, problems = parse_yolo_labels("0 1.0005 0.5 0.2 0.2\n\n1 0.1 0.1 0.5 0.1 0.5 0.6\n", nc=2)
    assert problems == []
    np.testing.assert_allclose(labels[0], [0, 0.95, 0.5, 0.1, 0.2], atol=1e-3)  # clipped to the image
    np.testing.assert_allclose(labels[1], [1, 0.3, 0.35, 0.4, 0.5], atol=1e-6)  # polygon -> its box


def test_item_format_and_letterbox_round_trip(tmp_path):
    _yolo(tmp_path, {"wide.jpg": "1 0.25 0.5 0.3 0.6\n", "bg.jpg": None})
    (tmp_path / "images/train/wide.jpg").unlink()
    _img(tmp_path / "images/train/wide.jpg", w=80, h=40)
    ds = YoloDataset(tmp_path / "images/train", imgsz=64, augment=False, nc=2)
    assert len(ds) == 2 and ds.stats["backgrounds"] == 1
    img, targets, path, (orig_hw, ratio, pad) = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
    assert path.endswith("wide.jpg") and orig_hw == (40, 80) and ratio == (0.8, 0.8) and pad == (0.0, 16.0)
    assert targets.shape == (1, 6) and targets[0, 1] == 1
    boxes = xywhn_to_xyxy(targets[:, 2:].numpy(), 64, 64)
    np.testing.assert_allclose(unletterbox_boxes(boxes, ratio, pad, orig_hw), [[8, 8, 32, 32]], atol=1e-3)
    assert (img[:, :16] == 114).all()  # grey letterbox padding
    assert ds[0][1].shape == (0, 6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_other_image_modes_are_converted_not_errors(tmp_path, mode, caplog):
    name = "x.jpg" if mode == "CMYK" else "x.png"
    _img(tmp_path / "images/train" / name, mode=mode)
    (tmp_path / "labels/train").mkdir(parents=True)
    (tmp_path / "labels/train/x.txt").write_text(GOOD)
    ds = YoloDataset(tmp_path / "images/train", imgsz=32, nc=2)
    img = ds[0][0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert not _warnings(caplog)


# ------------------------------------------------------------------------------------------- bad data

LINE_CASES = {
    "columns": ("0 0.5 0.5 0.2\n", "expected 5 columns", 1),
    "six_columns": (GOOD + "0 0.5 0.5 0.2 0.2 0.9\n", "expected 5 columns", 3),
    "non_numeric": ("0 0.5 abc 0.2 0.2\n", "non-numeric value 'abc'", 1),
    "out_of_range": ("0 1.5 0.5 0.2 0.2\n", "outside [0, 1]", 1),
    "zero_area": ("0 0.5 0.5 0 0.2\n", "zero-area", 1),
    "unknown_class": ("7 0.5 0.5 0.2 0.2\n", "unknown class id 7", 1),
    "fractional_class": ("1.5 0.5 0.5 0.2 0.2\n", "not an integer", 1),
    "duplicate": (GOOD + "0 0.5 0.5 0.4 0.3\n", "duplicate of line 1", 3),
}


@pytest.mark.parametrize("case", LINE_CASES)
def test_bad_label_line_is_dropped_with_one_warning(tmp_path, caplog, case):
    text, message, line = LINE_CASES[case]
    images = _yolo(tmp_path, {"a.jpg": GOOD, "bad.jpg": text})
    ds = YoloDataset(images, imgsz=32, nc=3)
    assert len(ds) == 2  # the image stays; only the line goes
    kept = ds.labels[ds.im_files.index(str(images / "bad.jpg"))]
    assert len(kept) == len(text.splitlines()) - 1
    warns = _warnings(caplog)
    bad_file = str(tmp_path / "labels/train/bad.txt")
    per_file = [w for w in warns if w.startswith(bad_file)]
    assert len(per_file) == 1 and f"line {line}" in per_file[0] and message in per_file[0]
    assert any("dropped 1 bad labels" in w or "and 1 duplicate" in w for w in warns)  # the summary

    with pytest.raises(DataError, match=re.escape(message)) as e:
        YoloDataset(images, imgsz=32, nc=3, strict=True)
    assert e.value.path == bad_file and e.value.field == f"line {line}"


def _corrupt(p: Path) -> None:
    p.write_bytes(b"this is not an image" * 10)


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-200])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("damage,message", [
    (_corrupt, "not a readable image"), (_truncated, "truncated"), (_empty, "empty image file")])
def test_bad_image_is_skipped_with_one_warning(tmp_path, caplog, damage, message):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "b.jpg": GOOD, "bad.jpg": GOOD})
    damage(images / "bad.jpg")
    ds = YoloDataset(images, imgsz=32, nc=3)
    assert len(ds) == 2 and str(images / "bad.jpg") not in ds.im_files
    per_file = [w for w in _warnings(caplog) if w.startswith(str(images / "bad.jpg"))]
    assert len(per_file) == 1 and message in per_file[0] and "image skipped" in per_file[0]
    assert ds.stats["skipped_images"] == 1
    for i in range(len(ds)):
        ds[i]
    with pytest.raises(DataError, match=message) as e:
        YoloDataset(images, imgsz=32, nc=3, strict=True)
    assert e.value.path == str(images / "bad.jpg")


def test_missing_image_in_list_file(tmp_path, caplog):
    images = _yolo(tmp_path, {"a.jpg": GOOD})
    lst = tmp_path / "train.txt"
    lst.write_text("images/train/a.jpg\n# a comment\n./images/train/gone.jpg\n")
    ds = YoloDataset(lst, imgsz=32, nc=3)
    assert ds.im_files == [str(images / "a.jpg")]
    assert any("gone.jpg: image file not found" in w for w in _warnings(caplog))
    assert (tmp_path / "train.cache").is_file()  # a list file keeps its cache beside it
    with pytest.raises(DataError, match="not found"):
        YoloDataset(lst, imgsz=32, strict=True)


def test_binary_label_file_skips_the_image(tmp_path, caplog):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "bad.jpg": None})
    (tmp_path / "labels/train/bad.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    ds = YoloDataset(images, imgsz=32)
    assert len(ds) == 1
    assert any("bad.txt: label file is not text" in w for w in _warnings(caplog))


def test_several_problems_in_one_file_give_one_line(tmp_path, caplog):
    images = _yolo(tmp_path, {"bad.jpg": "0 0.5\nx 1 1 1 1\n9 0.5 0.5 0.1 0.1\n" + GOOD})
    ds = YoloDataset(images, imgsz=32, nc=3)
    assert len(ds.labels[0]) == 2
    warns = _warnings(caplog)
    assert len(warns) == 2  # the file's line and the summary
    assert "line 1" in warns[0] and "(and 2 more problems in this file)" in warns[0]
    assert ds.stats["dropped_labels"] == 3


def test_no_usable_images_is_an_error(tmp_path):
    images = _yolo(tmp_path, {"bad.jpg": GOOD})
    _corrupt(images / "bad.jpg")
    with pytest.raises(DataError, match="no usable images"):
        YoloDataset(images, imgsz=32)
    with pytest.raises(DataError, match="no images found"):
        YoloDataset(tmp_path / "labels", imgsz=32)
    with pytest.raises(DataError, match="not found"):
        YoloDataset(tmp_path / "nowhere", imgsz=32)


def test_image_broken_after_scan_never_crashes(tmp_path, caplog):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "b.jpg": GOOD, "c.jpg": GOOD})
    ds = YoloDataset(images, imgsz=32, nc=3, augment=True)
    (images / "b.jpg").write_bytes(b"")
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 3 and sum("cannot read image" in w for w in _warnings(caplog)) == 1
    strict = YoloDataset(images / "a.jpg", imgsz=32, nc=3, strict=True)
    (images / "a.jpg").unlink()
    with pytest.raises(DataError):
        strict[0]


def test_a_loader_workers_data_error_keeps_its_file_and_one_line(tmp_path):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "b.jpg": GOOD})
    ds = YoloDataset(images, imgsz=32, nc=3, strict=True, cache=False)
    (images / "b.jpg").write_bytes(b"")  # broken after the scan
    loader = build_dataloader(ds, batch=2, workers=1, shuffle=False)
    with pytest.raises(DataError) as e:
        list(loader)
    assert e.value.path == str(images / "b.jpg") and e.value.message.startswith("cannot read image")
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- cache


def test_label_cache_hit_and_invalidation(tmp_path, caplog, monkeypatch):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "b.jpg": GOOD + "5 0.5 0.5 0.1 0.1\n"})
    first = YoloDataset(images, imgsz=32, nc=3)
    assert (tmp_path / "labels/train.cache").is_file()
    calls = []
    real = datasets._scan_yolo
    monkeypatch.setattr(datasets, "_scan_yolo", lambda *a: calls.append(1) or real(*a))
    caplog.clear()
    second = YoloDataset(images, imgsz=32, nc=3)
    assert calls == [] and second.im_files == first.im_files and second.stats == first.stats
    assert all(np.array_equal(a, b) for a, b in zip(first.labels, second.labels))
    assert any("b.txt: line 3" in w for w in _warnings(caplog))  # problems are reported again
    (tmp_path / "labels/train/b.txt").write_text(GOOD)  # an edit changes size/mtime
    third = YoloDataset(images, imgsz=32, nc=3)
    assert calls == [1] and third.stats["dropped_labels"] == 0
    YoloDataset(images, imgsz=32, nc=2)  # another nc validates differently: rescan
    assert calls == [1, 1]
    (tmp_path / "labels/train.cache").write_bytes(b"garbage")  # a damaged cache is rebuilt, not fatal
    assert len(YoloDataset(images, imgsz=32, nc=3)) == 2 and calls == [1, 1, 1]
    YoloDataset(images, imgsz=32, nc=3, cache=False)
    assert calls == [1, 1, 1, 1]


# ------------------------------------------------------------------------------------------- loader


def test_collate_sets_batch_index(tmp_path):
    images = _yolo(tmp_path, {"a.jpg": GOOD, "b.jpg": "2 0.5 0.5 0.2 0.2\n", "c.jpg": None})
    ds = YoloDataset(images, imgsz=32, nc=3)
    imgs, targets, paths, shapes = collate_fn([ds[0], ds[1], ds[2]])
    assert imgs.shape == (3, 3, 32, 32) and len(paths) == 3 and len(shapes) == 3
    assert targets[:, 0].tolist() == [0, 0, 1]
    assert targets[:, 1].tolist() == [0, 1, 2]


def test_loader_is_seeded_and_worker_count_independent(tmp_path):
    images = _yolo(tmp_path, {f"{i}.jpg": GOOD for i in range(6)})
    ds = YoloDataset(images, imgsz=32, nc=3, augment=True, hyp=AugmentConfig(mixup=0.5))

    def first_batch(workers: int, epoch: int | None = None):
        loader = build_dataloader(ds, batch=3, workers=workers, shuffle=True, seed=7)
        if epoch is not None:
            loader.set_epoch(epoch)
        return next(iter(loader))

    a, b = first_batch(0), first_batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    c = first_batch(0, epoch=1)
    assert not torch.equal(a[0], c[0])
    loader = build_dataloader(ds, batch=3, workers=0, seed=7)
    epoch0 = [batch[2] for batch in loader]
    epoch1 = [batch[2] for batch in loader]  # each pass is the next epoch
    assert epoch0 != epoch1
    loader.set_epoch(0)
    assert [batch[2] for batch in loader] == epoch0


def test_loader_accepts_distributed_sampler(tmp_path):
    images = _yolo(tmp_path, {f"{i}.jpg": GOOD for i in range(6)})
    ds = YoloDataset(images, imgsz=32, nc=3)
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = build_dataloader(ds, batch=2, workers=0, sampler=sampler)
    assert len(loader) == 2 and sum(len(b[2]) for b in loader) == 3
    loader.set_epoch(5)
    list(loader)
    assert sampler.epoch == 5


# ------------------------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, **changes) -> tuple[Path, Path]:
    img_dir = tmp_path / "imgs"
    _img(img_dir / "a.jpg", w=80, h=60)
    _img(img_dir / "b.png", w=50, h=50)
    data = {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 80, "height": 60},
                   {"id": 20, "file_name": "b.png", "width": 50, "height": 50},
                   {"id": 30, "file_name": "gone.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 11, "name": "car"}, {"id": 3, "name": "person"}, {"id": 7, "name": "bike"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 11, "bbox": [0, 0, 80, 60]},
            {"id": 3, "image_id": 20, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 4, "image_id": 20, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 5, "image_id": 30, "category_id": 3, "bbox": [1, 1, 5, 5]},
        ],
    }
    data.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def test_coco_round_trip(tmp_path, caplog):
    path, img_dir = _coco(tmp_path)
    ds = CocoDataset(path, img_dir, imgsz=64)
    assert ds.names == ["person", "bike", "car"] and ds.cat_ids == [3, 7, 11] and ds.nc == 3
    assert ds.image_ids == [10, 20] and len(ds) == 2
    assert any("gone.jpg: image file not found" in w for w in _warnings(caplog))
    img, targets, _, (orig_hw, ratio, pad) = ds[0]
    assert img.shape == (3, 64, 64) and orig_hw == (60, 80)
    boxes = unletterbox_boxes(xywhn_to_xyxy(targets[:, 2:].numpy(), 64, 64), ratio, pad, orig_hw)
    np.testing.assert_allclose(boxes, [[10, 10, 30, 40], [0, 0, 80, 60]], atol=1e-3)
    assert targets[:, 1].tolist() == [1, 2]  # bike, car
    assert ds[1][1][:, 1].tolist() == [0]  # the crowd box is not a target
    assert len(CocoDataset(path, img_dir, imgsz=64)) == 2  # and again from the cache
    assert path.with_suffix(".cache").is_file()


def test_coco_bad_annotations_are_dropped(tmp_path, caplog):
    path, img_dir = _coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] += [
        {"id": 6, "image_id": 20, "category_id": 99, "bbox": [1, 1, 5, 5]},
        {"id": 7, "image_id": 20, "category_id": 3, "bbox": [1, 1, 0, 5]},
        {"id": 8, "image_id": 20, "category_id": 3, "bbox": [1, 1, "x", 5]},
        {"id": 9, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 10, "image_id": [20], "category_id": 3, "bbox": [1, 1, 5, 5]},  # not even hashable
    ]
    path.write_text(json.dumps(data))
    ds = CocoDataset(path, img_dir, imgsz=32, cache=False)
    assert len(ds.labels[1]) == 1 and ds.stats["dropped_labels"] == 5
    json_lines = [w for w in _warnings(caplog) if w.startswith(f"{path}: annotations[")]
    assert len(json_lines) == 1 and "(and 4 more problems" in json_lines[0]
    with pytest.raises(DataError) as e:
        CocoDataset(path, img_dir, imgsz=32, strict=True, cache=False)
    assert e.value.path == str(path) and e.value.field == "annotations[8]"


@pytest.mark.parametrize("changes,field", [
    ({"categories": None}, "categories"),
    ({"annotations": [{"id": 1, "image_id": 10, "category_id": 3}]}, "annotations[0].bbox"),
    ({"images": [{"id": 1}]}, "images[0].file_name"),
    ({"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "categories[1].id"),
    # wrong types: a number for a path, a list for an id (unhashable), a string id among integers
    ({"images": [{"id": 1, "file_name": 5}]}, "images[0].file_name"),
    ({"images": [{"id": [1], "file_name": "a.jpg"}]}, "images[0].id"),
    ({"categories": [{"id": 1, "name": "a"}, {"id": "2", "name": "b"}]}, "categories[1].id"),
])
def test_coco_structure_errors(tmp_path, changes, field):
    path, img_dir = _coco(tmp_path, **changes)
    if changes.get("categories", 0) is None:
        data = json.loads(path.read_text())
        del data["categories"]
        path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        CocoDataset(path, img_dir)
    assert e.value.path == str(path) and e.value.field == field


def test_coco_unreadable_json(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "x.json").write_text('{"images": [')
    with pytest.raises(DataError, match="invalid or truncated JSON"):
        CocoDataset(tmp_path / "x.json", tmp_path / "imgs")


def test_hyp_dict_is_accepted(tmp_path):
    images = _yolo(tmp_path, {"a.jpg": GOOD})
    ds = YoloDataset(images, imgsz=32, augment=True, hyp={"mosaic": 0.0, "fliplr": 0.0, "lr0": 0.01})
    assert ds.hyp.mosaic == 0.0 and ds.hyp.hsv_h == 0.015
    assert ds[0][0].shape == (3, 32, 32)


def test_cli_data_check(tmp_path, capsys):
    from nas.cli import main

    _yolo(tmp_path / "ds", {"a.jpg": GOOD}, "train")
    _yolo(tmp_path / "ds", {"b.jpg": GOOD + "x\n"}, "val")
    (tmp_path / "ds/data.yaml").write_text("train: images/train\nval: images/val\nnames: [a, b, c]\n")
    assert main(["data", "check", str(tmp_path / "ds"), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["splits"]["val"]["dropped_labels"] == 1 and result["problems"] == 1
    assert main(["data", "check", str(tmp_path / "ds"), "--strict"]) == 2
    assert "val/b.txt: line 3: expected 5 columns" in capsys.readouterr().err


def test_dataset_key_changes_with_any_image_or_label_and_only_then(tmp_path):
    from trainer.datasets import dataset_key
    from trainer.synthetic import generate

    yaml_path = generate(tmp_path / "d", train=3, val=2, imgsz=64, classes=2, seed=0)
    key = dataset_key(yaml_path)
    assert dataset_key(tmp_path / "d") == key  # the directory names the same data.yaml
    label = min((tmp_path / "d" / "labels" / "val").glob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")
    assert dataset_key(yaml_path) != key
    key = dataset_key(yaml_path)
    extra = tmp_path / "d" / "images" / "train" / "extra.jpg"
    Image.new("RGB", (64, 64)).save(extra)
    assert dataset_key(yaml_path) != key
    extra.unlink()
    assert dataset_key(yaml_path) == key  # back as it was
