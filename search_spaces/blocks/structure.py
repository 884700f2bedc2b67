"""Parameter-light structural blocks: pooling transitions, SPP, re-organisation, upsample, concat, sum."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import Conv, single_input
from .registry import register_block


@register_block("maxpool")
class MaxPool(nn.Module):
    """Plain k x k max-pool with stride s (yolov7-tiny's `MP` between stages)."""

    def __init__(self, c_in: list[int] | int, k: int = 2, s: int = 2, act: str = "silu"):
        super().__init__()
        self.out_channels = single_input(c_in)
        self.k, self.s = k, s

    official_layout: ClassVar[list[str]] = [None]

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.k, self.s, self.k // 2 if self.s == 1 else 0)


@register_block("mp")
class MPConv(nn.Module):
    """YOLOv7 transition: [3x3/s2 conv(1x1 conv(x)), 1x1 conv(maxpool(x)), *laterals] concatenated.

    Extra inputs (PAN laterals) are appended after the two branches, as in the official neck.
    """

    def __init__(self, c_in: list[int] | int, c: int, act: str = "silu"):
        super().__init__()
        cs = [c_in] if isinstance(c_in, int) else list(c_in)
        self.cv1 = Conv(cs[0], c, 1, act=act)
        self.cv2 = Conv(cs[0], c, 1, act=act)
        self.cv3 = Conv(c, c, 3, 2, act=act)
        self.out_channels = 2 * c + sum(cs[1:])

    official_layout: ClassVar[list[str]] = [None, "cv1", "cv2", "cv3", None]

    def forward(self, *xs: Tensor) -> Tensor:
        x = xs[0]
        a = self.cv1(F.max_pool2d(x, 2, 2))
        b = self.cv3(self.cv2(x))
        return torch.cat([b, a, *xs[1:]], 1)


@register_block("downc")
class DownC(nn.Module):
    """YOLOv7-E6 downsampling: [3x3/s2 conv(1x1 conv(x)), 1x1 conv(maxpool(x))] concatenated to `out`."""

    def __init__(self, c_in: list[int] | int, out: int, act: str = "silu"):
        super().__init__()
        c1 = single_input(c_in)
        if out % 2:
            raise ValueError("downc out must be even")
        self.cv1 = Conv(c1, c1, 1, act=act)
        self.cv2 = Conv(c1, out // 2, 3, 2, act=act)
        self.cv3 = Conv(c1, out // 2, 1, act=act)
        self.out_channels = out

    official_layout: ClassVar[list[str]] = [""]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.cv2(self.cv1(x)), self.cv3(F.max_pool2d(x, 2, 2))], 1)


@register_block("sppcspc")
class SPPCSPC(nn.Module):
    """Spatial pyramid pooling with a CSP shortcut (YOLOv7), hidden width = out."""

    def __init__(self, c_in: list[int] | int, out: int, k: list[int] | None = None, act: str = "silu"):
        super().__init__()
        c1, c_ = single_input(c_in), out
        self.k = list(k or [5, 9, 13])
        self.cv1 = Conv(c1, c_, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, act=act)
        self.cv3 = Conv(c_, c_, 3, act=act)
        self.cv4 = Conv(c_, c_, 1, act=act)
        self.cv5 = Conv((len(self.k) + 1) * c_, c_, 1, act=act)
        self.cv6 = Conv(c_, c_, 3, act=act)
        self.cv7 = Conv(2 * c_, out, 1, act=act)
        self.out_channels = out

    official_layout: ClassVar[list[str]] = [""]

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [F.max_pool2d(x1, k, 1, k // 2) for k in self.k], 1)))
        return self.cv7(torch.cat([y1, self.cv2(x)], 1))


@register_block("sppcsp_tiny")
class SPPCSPTiny(nn.Module):
    """yolov7-tiny's SPP: 1x1 shortcut, 1x1 -> pools [13, 9, 5] + itself -> 1x1, concat shortcut -> 1x1."""

    def __init__(self, c_in: list[int] | int, out: int, act: str = "silu"):
        super().__init__()
        c1 = single_input(c_in)
        self.cv1 = Conv(c1, out, 1, act=act)
        self.cv2 = Conv(c1, out, 1, act=act)
        self.cv3 = Conv(4 * out, out, 1, act=act)
        self.cv4 = Conv(2 * out, out, 1, act=act)
        self.out_channels = out

    official_layout: ClassVar[list[str]] = ["cv1", "cv2", None, None, None, None, "cv3", None, "cv4"]

    def forward(self, x: Tensor) -> Tensor:
        s = self.cv1(x)
        y = self.cv2(x)
        pools = [F.max_pool2d(y, k, 1, k // 2) for k in (13, 9, 5)]
        y = self.cv3(torch.cat(pools + [y], 1))
        return self.cv4(torch.cat([y, s], 1))


@register_block("reorg")
class ReOrg(nn.Module):
    """Space-to-depth (YOLOv5 Focus slicing order): C, H, W -> 4C, H/2, W/2."""

    def __init__(self, c_in: list[int] | int, act: str = "silu"):
        super().__init__()
        self.out_channels = 4 * single_input(c_in)

    official_layout: ClassVar[list[str]] = [None]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


@register_block("upsample")
class Upsample(nn.Module):
    """Nearest-neighbour upsampling by an integer factor."""

    def __init__(self, c_in: list[int] | int, scale: int = 2, act: str = "silu"):
        super().__init__()
        self.out_channels = single_input(c_in)
        self.scale = scale

    official_layout: ClassVar[list[str]] = [None]

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


@register_block("concat")
class Concat(nn.Module):
    """Channel concatenation of all inputs, in the order listed."""

    def __init__(self, c_in: list[int] | int, act: str = "silu"):
        super().__init__()
        self.out_channels = sum([c_in] if isinstance(c_in, int) else c_in)

    official_layout: ClassVar[list[str]] = [None]

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, 1)


@register_block("add")
class Add(nn.Module):
    """Element-wise sum of inputs of equal shape (the official `Shortcut`)."""

    def __init__(self, c_in: list[int] | int, act: str = "silu"):
        super().__init__()
        cs = [c_in] if isinstance(c_in, int) else list(c_in)
        if len(set(cs)) != 1:
            raise ValueError(f"add needs inputs with equal channels, got {cs}")
        self.out_channels = cs[0]

    official_layout: ClassVar[list[str]] = [None]

    def forward(self, *xs: Tensor) -> Tensor:
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y
