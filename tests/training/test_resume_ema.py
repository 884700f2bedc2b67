"""A run trained without EMA and resumed with it starts the average from the resumed weights."""
from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.trainer import Trainer


def test_ema_added_on_resume_starts_from_the_resumed_weights(small_data, tmp_path):
    kw = {"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 96, "batch": 4,
          "workers": 0, "device": "cpu", "progress": False}
    Trainer(TrainConfig(epochs=1, ema=False, **kw)).train()
    again = Trainer(TrainConfig(epochs=2, ema=True, resume=True, **kw))
    trained = again.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.ema.ema.state_dict().items())
