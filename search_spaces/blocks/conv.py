"""Convolution blocks: Conv (conv+BN+act), RepConv, GhostConv."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..fusion import fold_bn, fuse_conv_bn, identity_kernel, pad_kernel
from .registry import register_block

BN_EPS = 1e-3  # YOLOv7 sets eps=1e-3, momentum=0.03 on every BatchNorm after building
BN_MOMENTUM = 0.03

ACTIVATIONS = ("silu", "leaky_relu", "relu", "identity")


def make_act(name: str) -> nn.Module:
    """Activation module by name: silu, leaky_relu (slope 0.1, as YOLOv7), relu, identity."""
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name == "relu":
        return nn.ReLU()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation '{name}' (known: {', '.join(ACTIVATIONS)})")


def make_bn(c: int) -> nn.BatchNorm2d:
    """A BatchNorm2d with YOLOv7's eps and momentum."""
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def single_input(c_in: list[int] | int) -> int:
    """The channel count of a single-input block."""
    if isinstance(c_in, int):
        return c_in
    if len(c_in) != 1:
        raise ValueError(f"block takes one input, got {len(c_in)}")
    return c_in[0]


@register_block("conv")
class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; after `fuse()` a biased conv -> activation."""

    def __init__(self, c_in: list[int] | int, out: int, k: int = 1, s: int = 1, g: int = 1,
                 act: str = "silu", p: int | None = None):
        super().__init__()
        c1 = single_input(c_in)
        self.conv = nn.Conv2d(c1, out, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = make_bn(out)
        self.act = make_act(act)
        self.out_channels = out

    official_layout: ClassVar[list[str]] = [""]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold BN into the conv (in place)."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


@register_block("repconv")
class RepConv(nn.Module):
    """RepVGG-style conv: 3x3+BN, 1x1+BN and (if shapes allow) identity-BN branches, summed; fuses exactly."""

    def __init__(self, c_in: list[int] | int, out: int, k: int = 3, s: int = 1, g: int = 1, act: str = "silu"):
        super().__init__()
        c1 = single_input(c_in)
        if k != 3:
            raise ValueError("RepConv supports k=3 only")
        self.c1, self.out_channels, self.k, self.s, self.g = c1, out, k, s, g
        self.act = make_act(act)
        self.rbr_identity = make_bn(c1) if (c1 == out and s == 1) else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, out, k, s, k // 2, groups=g, bias=False), make_bn(out))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, out, 1, s, 0, groups=g, bias=False), make_bn(out))
        self.rbr_reparam: nn.Conv2d | None = None

    official_layout: ClassVar[list[str]] = [""]

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge all branches into one biased 3x3 conv `rbr_reparam` (in place)."""
        if self.rbr_reparam is not None:
            return
        w3, b3 = fold_bn(self.rbr_dense[0].weight, None, self.rbr_dense[1])
        w1, b1 = fold_bn(self.rbr_1x1[0].weight, None, self.rbr_1x1[1])
        w, b = w3 + pad_kernel(w1, self.k), b3 + b1
        if self.rbr_identity is not None:
            wid, bid = fold_bn(identity_kernel(self.c1, self.g, self.k, w3), None, self.rbr_identity)
            w, b = w + wid, b + bid
        conv = nn.Conv2d(self.c1, self.out_channels, self.k, self.s, self.k // 2, groups=self.g, bias=True)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        self.rbr_reparam = conv.to(device=w.device, dtype=self.rbr_dense[0].weight.dtype)  # a half model stays half
        self.rbr_dense = None
        self.rbr_1x1 = None
        self.rbr_identity = None


@register_block("ghostconv")
class GhostConv(nn.Module):
    """Ghost module (GhostNet): a primary conv makes half the channels, a cheap depthwise conv the rest."""

    def __init__(self, c_in: list[int] | int, out: int, k: int = 1, s: int = 1, dw_k: int = 5,
                 act: str = "silu"):
        super().__init__()
        c1 = single_input(c_in)
        self.primary_channels = math.ceil(out / 2)
        self.cv1 = Conv(c1, self.primary_channels, k, s, act=act)
        self.cv2 = Conv(self.primary_channels, self.primary_channels, dw_k, 1, g=self.primary_channels, act=act)
        self.out_channels = out

    official_layout: ClassVar[list[str]] = [""]

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        return torch.cat([y, self.cv2(y)], 1)[:, : self.out_channels]
