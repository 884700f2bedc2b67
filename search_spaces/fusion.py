"""Exact re-parameterisation math (pure functions): Conv+BN, RepConv branches, implicit layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) so that bn(x) == x * scale + shift in eval mode."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


@torch.no_grad()
def fold_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's (weight, bias)."""
    scale, shift = bn_scale_shift(bn)
    w = weight * scale.reshape(-1, 1, 1, 1)
    b = shift if bias is None else bias * scale + shift
    return w, b


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv with bias equal to conv -> bn (eval)."""
    w, b = fold_bn(conv.weight, conv.bias, bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight.copy_(w)
    fused.bias.copy_(b)
    return fused.to(device=conv.weight.device, dtype=conv.weight.dtype)  # a half model stays half


@torch.no_grad()
def identity_kernel(channels: int, groups: int, k: int, like: Tensor) -> Tensor:
    """A k x k grouped kernel that copies each input channel to the same output channel."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    kernel[idx, idx % per_group, k // 2, k // 2] = 1.0
    return kernel


@torch.no_grad()
def pad_kernel(kernel: Tensor, k: int) -> Tensor:
    """Zero-pad a smaller square kernel to k x k, centred."""
    p = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p]) if p else kernel


@torch.no_grad()
def fold_implicit(weight: Tensor, bias: Tensor, ia: Tensor | None, im: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fold YOLOR ImplicitA (added to the input) and ImplicitM (multiplies the output) into a 1x1 conv."""
    w, b = weight.clone(), bias.clone()
    if ia is not None:
        b = b + (weight.flatten(1) @ ia.reshape(-1, 1)).reshape(-1)
    if im is not None:
        m = im.reshape(-1)
        w = w * m.reshape(-1, 1, 1, 1)
        b = b * m
    return w, b
