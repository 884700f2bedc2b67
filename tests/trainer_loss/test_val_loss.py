"""evaluate(loss_fn=...): YOLOv7's validation loss on the head's raw outputs, beside the mAP."""
from __future__ import annotations

import pytest
import torch

from search_spaces import load_model
from trainer.datasets import YoloDataset, build_dataloader, load_data_config
from trainer.evaluate import evaluate
from trainer.hyp import load_hyp
from trainer.loss import HeadInfo, YoloLoss
from trainer.synthetic import generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_loss")
    data = load_data_config(generate(root, train=8, val=8, imgsz=96, classes=3, seed=5))
    loader = build_dataloader(YoloDataset.from_config(data, "val", imgsz=96, seed=0), 4, 0, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = load_model("yolov7-tiny", nc=3).eval()
    return data, loader, model, YoloLoss(HeadInfo.from_detector(model), load_hyp("tiny"))


def test_loss_is_the_mean_over_batches_of_the_raw_outputs_loss(setup):
    data, loader, model, loss = setup
    plain = evaluate(model, loader, data.nc)
    res = evaluate(model, loader, data.nc, loss_fn=loss)
    assert plain.loss is None and plain.total_loss is None
    assert res.metrics.map == plain.metrics.map  # the loss leaves the detections alone
    with torch.no_grad():
        per_batch = [loss(model(imgs.float() / 255.0)[1], targets, imgs.shape)[1] for imgs, targets, *_ in loader]
    expected = torch.stack(per_batch).mean(0)
    assert res.loss == pytest.approx(expected.tolist(), rel=1e-5)
    assert res.total_loss == pytest.approx(float(expected.sum()), rel=1e-5)
    d = res.to_dict()
    assert [d["val_box"], d["val_obj"], d["val_cls"]] == list(res.loss)
    assert all(v > 0 for v in res.loss)

