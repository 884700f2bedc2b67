"""ELAN and E-ELAN aggregation blocks (YOLOv7), with an optional Ghost variant for the search spaces."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import Conv, GhostConv, single_input
from .registry import register_block


def elan_taps(depth: int, tap: int) -> list[int]:
    """Indices of the chain outputs that ELAN concatenates, newest first (0 = the second 1x1 conv)."""
    return list(range(depth, -1, -tap))


@register_block("elan")
class ElanBlock(nn.Module):
    """ELAN: two 1x1 convs, a chain of `depth` kxk convs on the second, concat of taps, 1x1 to `out`.

    Concat order is [chain[depth], chain[depth - tap], ..., a] as in the official cfgs, so official
    weights map channel for channel. `tap=2` is the backbone ELAN, `tap=1` the neck "ELAN-H" (with
    `mid = width // 2`). `ghost=True` makes the chain convs Ghost modules (Ghost-ELAN).
    """

    def __init__(self, c_in: list[int] | int, width: int, depth: int, out: int, mid: int | None = None,
                 tap: int = 1, k: int = 3, ghost: bool = False, act: str = "silu"):
        super().__init__()
        c1 = single_input(c_in)
        if depth < 1 or tap < 1:
            raise ValueError("depth and tap must be >= 1")
        mid = width if mid is None else mid
        self.depth, self.tap = depth, tap
        self.taps = elan_taps(depth, tap)
        self.cv1 = Conv(c1, width, 1, act=act)
        self.cv2 = Conv(c1, width, 1, act=act)
        chain = GhostConv if ghost else Conv
        self.m = nn.ModuleList(chain(width if i == 0 else mid, mid, k, act=act) for i in range(depth))
        widths = [width] + [mid] * depth
        cat = sum(widths[i] for i in self.taps) + width
        self.cv3 = Conv(cat, out, 1, act=act)
        self.out_channels = out

    @property
    def official_layout(self) -> list[str | None]:
        return ["cv1", "cv2", *(f"m.{i}" for i in range(self.depth)), None, "cv3"]

    def forward(self, x: Tensor) -> Tensor:
        a = self.cv1(x)
        chain = [self.cv2(x)]
        for conv in self.m:
            chain.append(conv(chain[-1]))
        return self.cv3(torch.cat([chain[i] for i in self.taps] + [a], 1))


@register_block("eelan")
class EElanBlock(nn.Module):
    """E-ELAN as the official YOLOv7-E6E realises it: `groups` parallel ELANs on the same input, summed."""

    def __init__(self, c_in: list[int] | int, width: int, depth: int, out: int, mid: int | None = None,
                 tap: int = 1, k: int = 3, groups: int = 2, ghost: bool = False, act: str = "silu"):
        super().__init__()
        if groups < 1:
            raise ValueError("groups must be >= 1")
        self.branches = nn.ModuleList(
            ElanBlock(c_in, width, depth, out, mid=mid, tap=tap, k=k, ghost=ghost, act=act) for _ in range(groups)
        )
        self.out_channels = out

    @property
    def official_layout(self) -> list[str | None]:
        return [f"branches.{i}.{p}" if p else None for i, b in enumerate(self.branches)
                for p in b.official_layout] + [None]

    def forward(self, x: Tensor) -> Tensor:
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        return y
