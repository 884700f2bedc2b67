"""Exponential moving average of model weights (YOLOv5/v7 ModelEMA)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel."""
    return model.module if hasattr(model, "module") else model


class ModelEMA:
    """Keeps `ema = d * ema + (1 - d) * model` with d ramping up as 0.9999 * (1 - exp(-updates / tau))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def d(self) -> float:
        """The current decay."""
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (buffers are averaged too, as in YOLOv7)."""
        self.updates += 1
        d = self.d()
        msd = unwrap(model).state_dict()
        # keep_vars keeps tensor identity: a module shared by several parents (QAT's shared fake-quants)
        # appears under each name, and must take one step, not one per name
        seen: set[int] = set()
        for k, v in self.ema.state_dict(keep_vars=True).items():
            if id(v) in seen:
                continue
            seen.add(id(v))
            v = v.data
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach().to(v.dtype), alpha=1 - d)
            else:
                v.copy_(msd[k])
