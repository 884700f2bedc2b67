"""A non-finite loss never reaches the weights: the step is skipped, counted, and a run that stays NaN stops."""
from __future__ import annotations

import math

import pytest
import torch

from search_spaces.errors import DivergedError
from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.trainer import Trainer


class NanLoss(Callback):
    """Adds a NaN loss term on the batches whose index (counted over the run) is in `bad`."""

    def __init__(self, bad):
        self.bad, self.calls = bad, 0

    def extra_loss(self, trainer, model, imgs, targets, preds):
        i, self.calls = self.calls, self.calls + 1
        return {"nan": preds[0].sum() * (math.nan if i in self.bad else 0.0)}  # NaN gradients too


def _trainer(small_data, tmp_path, callback, epochs=1) -> Trainer:
    cfg = TrainConfig(model="yolov7-tiny", data=str(small_data), out=str(tmp_path), imgsz=96, batch=4, workers=0,
                      device="cpu", progress=False, epochs=epochs, nbs=4)
    return Trainer(cfg, callbacks=[callback])  # nominal batch = batch: an optimizer step per batch


def test_a_nan_batch_is_skipped_and_counted(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, NanLoss({1, 2}))
    result = t.train()
    row = result.rows[-1]
    assert row["skipped_steps"] == 2  # 16 images / batch 4: 4 steps, 2 of them NaN
    assert row["nan"] == 0.0 and math.isfinite(row["box"])  # epoch means over the finite batches
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in t.ema.ema.state_dict().values() if v.is_floating_point())
    assert t.nonfinite_run == 0  # the finite steps after them reset the run


def test_a_run_that_stays_nan_stops_with_one_line(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, NanLoss(set(range(1000))), epochs=5)
    t.max_nonfinite_steps = 6
    with pytest.raises(DivergedError, match=r"6 optimizer steps in a row had non-finite gradients.*nan=nan"):
        t.train()
    # the epoch that finished before it is kept, with finite weights, for a resume
    assert (tmp_path / "last.pt").is_file()
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0


def test_nan_activations_stop_the_run_at_once(small_data, tmp_path):
    # NaN inside the forward pass reaches BatchNorm's running statistics before any step can be skipped
    t = _trainer(small_data, tmp_path, NanLoss(set()), epochs=2)
    calls = []

    def poison(_module, inputs):
        calls.append(1)
        return (inputs[0] * math.nan,) if len(calls) == 3 else None

    t.model.layers[0].register_forward_pre_hook(poison)
    with pytest.raises(DivergedError, match="non-finite running statistics"):
        t.train()
    assert t.skipped_steps == 1


def test_fp16_scaler_skips_are_counted_and_bounded(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, NanLoss(set(range(1000))), epochs=5)
    t.scaler = torch.amp.GradScaler("cpu")  # fp16's path: the scaler skips the step and backs off its scale
    t.max_nonfinite_steps = 2
    with pytest.raises(DivergedError, match="8 optimizer steps in a row"):
        t.train()
    assert t.scaler.get_scale() < 2.0 ** 16


@pytest.mark.parametrize("clip", [10.0, 0.0])
def test_gradients_reach_the_step_clipped_to_grad_clip(small_data, tmp_path, clip):
    cfg = TrainConfig(model="yolov7-tiny", data=str(small_data), out=str(tmp_path), imgsz=96, batch=4, workers=0,
                      device="cpu", progress=False, epochs=1, nbs=4, grad_clip=clip)
    t = Trainer(cfg)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)  # a total norm of sqrt(#params): far above 10
    raw = math.sqrt(sum(p.numel() for p in params))
    seen, step = [], t.optimizer.step

    def record_then_step(*a, **k):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return step(*a, **k)

    t.optimizer.step = record_then_step
    t.optimizer_step()
    assert seen == [pytest.approx(clip if clip else raw, rel=1e-4)]  # 0: no clipping
