"""AutoAnchor: the best possible recall of a model's anchors on the training boxes, and their refit below 0.98."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from search_spaces import Architecture, Detector, load_model
from search_spaces.space import load_space
from trainer.autoanchor import MIN_BPR, anchor_match, check_anchors, kmean_anchors, label_sizes
from trainer.config import TrainConfig
from trainer.datasets import YoloDataset
from trainer.trainer import Trainer


def test_anchor_match_counts_boxes_within_anchor_t_of_some_anchor():
    anchors = np.array([[10.0, 10.0], [40.0, 20.0]])
    wh = np.array([[10.0, 10.0], [39.0, 41.0], [50.0, 2.0], [160.0, 80.0]])
    bpr, aat = anchor_match(anchors, wh, thr=4.0)
    # 10x10: both (40/10 = 4 is not within); 39x41: the 40x20 one (41/20 < 4) and 10x10 is 4.1x off;
    # 50x2: 2/10 = 0.2 and 2/20 = 0.1, none; 160x80: 4x the second's both sides, none
    assert bpr == pytest.approx(2 / 4) and aat == pytest.approx((1 + 1 + 0 + 0) / 4)


def test_kmean_anchors_cover_two_clusters_sorted_by_area_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    wh = np.concatenate([rng.normal(8, 1, (200, 2)), rng.normal(100, 10, (200, 2))]).clip(min=3)
    k = kmean_anchors(wh, 4, generations=200, seed=3)
    assert k.shape == (4, 2) and (np.diff(k.prod(1)) >= 0).all()
    assert anchor_match(k, wh)[0] == 1.0
    np.testing.assert_array_equal(k, kmean_anchors(wh, 4, generations=200, seed=3))
    with pytest.raises(ValueError, match="2 boxes for 4 anchors"):
        kmean_anchors(wh[:2], 4)


def _train_boxes(small_data, imgsz: int) -> YoloDataset:
    return YoloDataset.from_config(small_data, "train", imgsz=imgsz)


def test_anchors_made_for_640_px_are_refit_at_a_small_size_and_kept_at_their_own(small_data):
    ds = _train_boxes(small_data, 32)
    det = load_model("yolov7-tiny", nc=3)
    zoo = det.head.anchor_grid.clone()
    fit = check_anchors(det, ds.shapes, ds.labels, 32, seed=0)
    assert fit.bpr < MIN_BPR and fit.replaced and fit.new_bpr > fit.bpr  # boxes of a few pixels at 32 px
    grid = det.head.anchor_grid.view(det.head.nl, det.head.na, 2)
    strides = torch.tensor(det.strides, dtype=torch.float32).view(-1, 1, 1)
    torch.testing.assert_close(det.head.anchors, grid / strides)  # grid units and pixels agree
    assert torch.tensor(det.arch.head.anchors).view_as(grid).sub(grid).abs().max() < 0.01  # arch.yaml says so
    areas = grid.prod(-1)
    assert (areas[:-1].max(1).values <= areas[1:].min(1).values).all()  # the finest level holds the smallest
    # the same boxes at 640 px: the official anchors match them, so they stay
    big = load_model("yolov7-tiny", nc=3)
    fit = check_anchors(big, ds.shapes, ds.labels, 640, seed=0)
    assert fit.bpr >= MIN_BPR and not fit.replaced and fit.new_bpr is None
    assert torch.equal(big.head.anchor_grid, zoo)


def test_models_without_anchors_are_left_alone(small_data):
    ds = _train_boxes(small_data, 96)
    space = load_space("tiny")
    decoupled = next(a for a in (space.random(np.random.default_rng(s)) for s in range(50))
                     if a.head.anchor_free)
    assert check_anchors(Detector(decoupled.with_nc(3)), ds.shapes, ds.labels, 96) is None
    assert label_sizes(ds.shapes, ds.labels, 96).shape[1] == 2


def test_the_trainer_trains_saves_and_resumes_with_the_refit_anchors(small_data, tmp_path):
    kw = {"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 32, "batch": 4,
          "workers": 0, "device": "cpu", "progress": False}
    first = Trainer(TrainConfig(epochs=1, **kw))
    assert first.anchor_fit.replaced
    fitted = first.model.head.anchors.clone()
    torch.testing.assert_close(first.loss_fn.head.anchors.to(fitted), fitted)  # the loss assigns with them
    first.train()
    saved = Architecture.from_yaml(tmp_path / "model" / "arch.yaml")
    assert saved.head.anchors == first.model.arch.head.anchors != load_model("yolov7-tiny").arch.head.anchors
    import trainer.trainer

    real = trainer.trainer.check_anchors
    trainer.trainer.check_anchors = lambda *a, **k: pytest.fail("a resume refit the anchors")
    try:
        again = Trainer(TrainConfig(epochs=2, resume=True, **kw))
    finally:
        trainer.trainer.check_anchors = real
    assert again.anchor_fit == first.anchor_fit  # what the first run found, from last.pt (the report states it)
    torch.testing.assert_close(again.model.head.anchors, fitted)
    torch.testing.assert_close(again.loss_fn.head.anchors.to(fitted), fitted)
    assert again.model.arch.head.anchors == saved.head.anchors and again.ema.ema.arch.head.anchors == saved.head.anchors
    kept = Trainer(TrainConfig(epochs=1, autoanchor=False, **{**kw, "out": str(tmp_path / "off")}))
    assert kept.anchor_fit is None
    assert torch.equal(kept.model.head.anchor_grid, load_model("yolov7-tiny", nc=3).head.anchor_grid)


def test_resume_without_a_checkpoint_is_a_fresh_run_and_fits(small_data, tmp_path):
    kw = {"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 32, "batch": 4,
          "workers": 0, "device": "cpu", "progress": False}
    killed_early = Trainer(TrainConfig(epochs=1, resume=True, **kw))  # a kill before the first last.pt
    assert killed_early.anchor_fit.replaced


def test_other_ranks_take_rank_0s_anchors(small_data, tmp_path, monkeypatch):
    import trainer.trainer

    kw = {"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 32, "batch": 4,
          "workers": 0, "device": "cpu", "progress": False}
    rank0 = Trainer(TrainConfig(epochs=1, **kw))
    other = Trainer(TrainConfig(epochs=1, autoanchor=False, **{**kw, "out": str(tmp_path / "r1")}))
    other.main = False  # as rank 1 sees itself
    monkeypatch.setattr(trainer.trainer, "check_anchors", lambda *a, **k: pytest.fail("rank 1 fitted"))
    monkeypatch.setattr(trainer.trainer.ddp, "broadcast_object", lambda obj, src=0: rank0.anchor_fit)
    assert other._fit_anchors(4.0) == rank0.anchor_fit
    torch.testing.assert_close(other.model.head.anchor_grid, rank0.model.head.anchor_grid, atol=0.006, rtol=0)
    assert other.model.arch.head.anchors == rank0.model.arch.head.anchors
