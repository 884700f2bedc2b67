"""Helpers shared by test packages (and benchmarks): non-trivial BatchNorm and implicit-layer values."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from search_spaces.blocks import ImplicitA, ImplicitM


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Re-draw BatchNorm statistics/affine and implicit tensors, so that fusion, slicing or pruning errors show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
        elif isinstance(m, (ImplicitA, ImplicitM)):
            m.implicit.add_(torch.randn(m.implicit.shape, generator=g) * 0.3)


def checkpoint_epoch(path: str | Path) -> int:
    """The last finished epoch recorded in a trainer's last.pt, or -1 while there is none (yet)."""
    from search_spaces.io import load_weights

    try:
        return int(load_weights(path)["epoch"])
    except Exception:  # noqa: BLE001 - absent, or being replaced by a running trainer
        return -1
