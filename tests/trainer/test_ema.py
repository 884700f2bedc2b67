"""ModelEMA: one step per tensor, also for modules shared by several parents (QAT's shared fake-quants)."""
from __future__ import annotations

import torch
from torch import nn

from trainer.ema import ModelEMA


class Shared(nn.Module):
    """Two parents holding the same Linear, plus a buffer."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(3, 3)
        self.a = nn.Sequential(lin)
        self.b = nn.Sequential(lin)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_steps_each_tensor_once_even_when_shared():
    torch.manual_seed(0)
    model = Shared()
    ema = ModelEMA(model, tau=1.0)
    assert ema.ema.a[0] is ema.ema.b[0]  # the copy keeps the sharing
    before = ema.ema.a[0].weight.clone()
    with torch.no_grad():
        model.a[0].weight.add_(1.0)
        model.count.fill_(7)
    ema.update(model)
    d = ema.d()
    expected = d * before + (1 - d) * model.a[0].weight
    torch.testing.assert_close(ema.ema.a[0].weight, expected)  # stepped once, not once per name
    assert ema.ema.b[0].weight is ema.ema.a[0].weight and int(ema.ema.count) == 7


def test_a_trainer_trains_every_parameter_of_an_ema_copy(tmp_path):
    from search_spaces import load_model
    from trainer.config import TrainConfig
    from trainer.synthetic import generate
    from trainer.trainer import Trainer

    data = generate(tmp_path / "d", train=4, val=2, imgsz=64, classes=2, seed=0)
    ema = ModelEMA(load_model("yolov7-tiny", nc=2)).ema  # what `Trainer.eval_model` hands back: frozen
    assert not any(p.requires_grad for p in ema.parameters())
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, imgsz=64, batch=2,
                                  workers=0, progress=False), model=ema)
    assert all(p.requires_grad for p in trainer.model.parameters())
    n_opt = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert n_opt == len(list(trainer.model.parameters()))
