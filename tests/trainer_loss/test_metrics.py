"""NMS, letterbox rescaling and COCO mAP through pycocotools."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from search_spaces.errors import ConfigError, DataError
from trainer.metrics import build_coco_dicts, coco_map
from trainer.postprocess import non_max_suppression


def row(cx, cy, w, h, obj, *cls) -> list[float]:
    """One decoded prediction (xywh pixels, obj prob, class probs)."""
    return [cx, cy, w, h, obj, *cls]


# ------------------------------------------------------------------------------------------------ NMS
def test_nms_removes_duplicates_per_class():
    dec = torch.tensor([[row(50, 50, 20, 20, 0.9, 0.9, 0.05),
                         row(51, 50, 20, 20, 0.8, 0.9, 0.05),  # duplicate of the first
                         row(150, 50, 20, 20, 0.7, 0.1, 0.8),
                         row(50, 50, 20, 20, 0.0005, 0.9, 0.9)]])  # below conf_thres (objectness)
    (det,) = non_max_suppression(dec, conf_thres=0.01, multi_label=False)
    assert det.shape == (2, 6)
    assert torch.allclose(det[0], torch.tensor([40, 40, 60, 60, 0.81, 0.0]))
    assert det[1, 5] == 1 and det[1, 4] == pytest.approx(0.56)


def test_nms_multi_label_classes_and_max_det():
    dec = torch.tensor([[row(50, 50, 20, 20, 0.9, 0.9, 0.5)], [row(10, 10, 4, 4, 0.9, 0.9, 0.0)]])
    a, b = non_max_suppression(dec, conf_thres=0.1, multi_label=True)
    assert sorted(a[:, 5].tolist()) == [0.0, 1.0] and len(b) == 1  # same box, two labels survive
    (a,) = non_max_suppression(dec[:1], conf_thres=0.1, classes=[1])
    assert a[:, 5].tolist() == [1.0]
    (a,) = non_max_suppression(dec[:1], conf_thres=0.1, agnostic=True)
    assert len(a) == 1
    many = torch.tensor([[row(20 * i + 10, 10, 8, 8, 0.9, 0.9) for i in range(20)]])
    (a,) = non_max_suppression(many, max_det=5)
    assert len(a) == 5


def test_nms_single_class_scores_objectness():
    dec = torch.tensor([[row(50, 50, 20, 20, 0.9, 0.3)]])
    (a,) = non_max_suppression(dec)
    assert a[0, 4] == pytest.approx(0.9)


def test_nms_empty():
    (a,) = non_max_suppression(torch.zeros(1, 10, 8))
    assert a.shape == (0, 6)


# ------------------------------------------------------------------------------------------------ mAP
def _gts() -> list[dict]:
    return [
        {"boxes": torch.tensor([[10.0, 10, 60, 80], [100, 100, 180, 150]]), "labels": torch.tensor([0, 2]),
         "size": (200, 240)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "size": (200, 240)},
        {"boxes": np.array([[30.0, 40, 90, 120]]), "labels": np.array([0]), "size": (160, 160)},
    ]


def _perfect(gts: list[dict]) -> list[dict]:
    return [{"boxes": g["boxes"], "scores": torch.ones(len(g["labels"])), "labels": g["labels"]} for g in gts]


def test_perfect_predictions_give_map_one():
    m = coco_map(_perfect(_gts()), _gts(), nc=3, names=["a", "b", "c"])
    assert m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    assert m.per_class[0] == pytest.approx(1.0) and m.per_class[2] == pytest.approx(1.0)
    assert math.isnan(m.per_class[1])  # class "b" has no ground truth
    assert (m.n_images, m.n_instances, m.names) == (3, 3, ["a", "b", "c"])
    assert m.to_dict()["per_class"][1] is None


def test_wrong_classes_give_map_zero():
    preds = _perfect(_gts())
    for p in preds:
        p["labels"] = (torch.as_tensor(p["labels"]) + 1) % 3
    m = coco_map(preds, _gts(), nc=3)
    assert m.map == pytest.approx(0.0, abs=1e-6)


def test_no_predictions_and_no_ground_truth():
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 3
    m = coco_map(empty, _gts(), nc=3)
    assert m.map == 0.0 and m.per_class[0] == 0.0 and math.isnan(m.per_class[1])
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "size": (10, 10)}]
    m = coco_map([{"boxes": [[1, 1, 5, 5]], "scores": [0.5], "labels": [0]}], no_gt, nc=1)
    assert m.map == 0.0 and math.isnan(m.per_class[0])


def test_false_positive_on_image_without_gt_ranks_below():
    preds = _perfect(_gts())
    preds[1] = {"boxes": [[0, 0, 50, 50]], "scores": [0.3], "labels": [0]}  # lower score than every TP
    assert coco_map(preds, _gts(), nc=3).map == pytest.approx(1.0)
    preds[1]["scores"] = [1.5]  # now it outranks the TPs of class 0: precision drops
    assert coco_map(preds, _gts(), nc=3).per_class[0] < 1.0


def test_agrees_with_direct_pycocotools():
    rng = np.random.default_rng(0)
    gts, preds, images, anns, res = [], [], [], [], []
    for i in range(6):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 80, (n, 2))], axis=1)
        labels = rng.integers(0, 4, n)
        gts.append({"boxes": boxes, "labels": labels, "size": (300, 320)})
        k = int(rng.integers(0, 8))
        pxy = rng.uniform(0, 200, (k, 2))
        pb = np.concatenate([boxes[:, :2] + rng.normal(0, 4, (n, 2)), boxes[:, 2:] + rng.normal(0, 4, (n, 2))], 1)
        pb = np.concatenate([pb, np.concatenate([pxy, pxy + 30], 1)])
        pl = np.concatenate([labels, rng.integers(0, 4, k)])
        ps = rng.uniform(0.05, 1, n + k)
        preds.append({"boxes": pb, "scores": ps, "labels": pl})
        images.append({"id": 100 + i, "height": 300, "width": 320})
        for b, lab in zip(boxes, labels, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(lab) * 10 + 5, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, lab, s in zip(pb, pl, ps, strict=True):
            res.append({"image_id": 100 + i, "category_id": int(lab) * 10 + 5, "score": float(s),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c * 10 + 5, "name": str(c)} for c in range(4)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    m = coco_map(preds, gts, nc=4, category_ids=[5, 15, 25, 35])
    assert 0.05 < m.map < 0.95
    assert m.map == pytest.approx(ev.stats[0]) and m.map50 == pytest.approx(ev.stats[1])
    assert m.stats == pytest.approx(list(ev.stats))
    # the per-class numbers average to the overall mAP
    assert float(np.nanmean(m.per_class)) == pytest.approx(m.map)


def test_quiet_unless_verbose(capsys):
    coco_map(_perfect(_gts()), _gts(), nc=3)
    assert capsys.readouterr().out == ""
    coco_map(_perfect(_gts()), _gts(), nc=3, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_bad_inputs():
    with pytest.raises(DataError):
        coco_map(_perfect(_gts())[:2], _gts(), nc=3)
    bad = _gts()
    bad[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(DataError):
        coco_map(_perfect(_gts()), bad, nc=3)
    with pytest.raises(DataError):
        coco_map(_perfect(_gts()), [{**g, "size": None} for g in _gts()], nc=3)
    with pytest.raises(ConfigError):
        coco_map(_perfect(_gts()), _gts(), nc=3, names=["a"])


def test_coco_dicts_map_categories():
    ds, res = build_coco_dicts(_perfect(_gts()), _gts(), nc=3, category_ids=[1, 7, 9])
    assert [c["id"] for c in ds["categories"]] == [1, 7, 9]
    assert {a["category_id"] for a in ds["annotations"]} == {1, 9}
    assert ds["annotations"][0]["bbox"] == [10.0, 10.0, 50.0, 70.0]
    assert len(res) == 3 and [im["id"] for im in ds["images"]] == [1, 2, 3]
