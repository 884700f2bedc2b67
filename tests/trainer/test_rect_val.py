"""Rectangular evaluation batches (YOLOv7's test.py default): ordered by aspect ratio, one letterbox shape a batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nas.cli import main
from search_spaces import ConfigError, load_model, save_model
from trainer.augment import unletterbox_boxes, xywhn_to_xyxy
from trainer.datasets import YoloDataset, val_loader

SIZES = [(96, 64), (64, 96), (128, 64), (64, 64), (80, 120), (120, 60), (64, 128)]  # (w, h)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A dataset of images of several aspect ratios, one box each."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        (tmp_path / "labels" / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 {0.2 + 0.05 * i:.2f} 0.4\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a, b, c]\n")
    return tmp_path / "data.yaml"


def test_batches_share_a_stride_multiple_shape_that_fits_their_images(mixed):
    ds = YoloDataset.from_config(mixed, "val", imgsz=64)
    boxes = {f: xywhn_to_xyxy(lb[:, 1:], w, h) for f, lb, (h, w) in zip(ds.im_files, ds.labels, ds.shapes)}
    ds.rect_batches(batch=2, stride=32)
    ar = ds.shapes[:, 0] / ds.shapes[:, 1]
    assert (np.diff(ar) >= 0).all()  # ordered by h / w
    for b in range(0, len(ds), 2):
        items = [ds[i] for i in range(b, min(b + 2, len(ds)))]
        shapes = {tuple(img.shape[1:]) for img, *_ in items}
        assert len(shapes) == 1  # the batch stacks
        (h, w), = shapes
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) <= 64 + 32  # at most half a stride of padding over 64
        assert ds.item_shapes[b] == (h, w)
        for img, targets, path, (hw0, ratio, pad) in items:
            # each box maps back to the label file's box in the original image
            got = xywhn_to_xyxy(targets[:, 2:].numpy(), w, h)
            back = unletterbox_boxes(got, ratio, pad, hw0)
            np.testing.assert_allclose(back, boxes[path], atol=1.0)
    tall, wide = ds.item_shapes[-1], ds.item_shapes[0]
    assert tall[0] > tall[1] and wide[0] < wide[1]  # the last batch (largest h / w) is tall, the first wide
    aug = YoloDataset.from_config(mixed, "train", imgsz=64)
    with pytest.raises(ConfigError):
        aug.rect_batches(2, 32)
    # the shapes hold for batches of 2 in this order only: a loader that would mix them is refused
    from trainer.datasets import build_dataloader

    for kw in ({"batch": 3, "shuffle": False}, {"batch": 2, "shuffle": True}):
        with pytest.raises(ConfigError) as e:
            build_dataloader(ds, **kw)
        assert e.value.field == "rect"
    assert len(list(build_dataloader(ds, 2, shuffle=False))) == 4


def test_val_cli_rect_scores_the_model_on_rectangles(mixed, tmp_path, capsys, monkeypatch):
    import trainer.evaluate

    model = save_model(load_model("yolov7-tiny", nc=3), tmp_path / "m")
    loader = val_loader(mixed, 64, batch=2, rect_stride=32)
    assert {tuple(imgs.shape[2:]) for imgs, *_ in loader} != {(64, 64)}  # not squares
    real, seen = trainer.evaluate.evaluate, []

    def spy(model, loader, *a, **kw):
        seen.append({tuple(imgs.shape[2:]) for imgs, *_ in loader})
        return real(model, loader, *a, **kw)

    monkeypatch.setattr(trainer.evaluate, "evaluate", spy)
    for flag in ([], ["--rect"]):
        assert main(["val", "--weights", str(model), "--data", str(mixed), "--imgsz", "64", "--batch", "2",
                     "--device", "cpu", "--json", *flag]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == len(SIZES)
    assert seen[0] == {(64, 64)} and len(seen[1]) > 1  # squares, then rectangles
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    assert main(["val", "--weights", str(onnx), "--data", str(mixed), "--imgsz", "64", "--rect"]) == 2
    err = capsys.readouterr().err
    assert ": rect: " in err and "square input size" in err
