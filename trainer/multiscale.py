"""Multi-scale training (YOLOv7's `--multi-scale`): each batch is resized to a random multiple of the grid stride.

Targets are normalized to the image, so they need no change; the loss reads the batch's size from its images.
"""
from __future__ import annotations

import math
import random

import torch.nn.functional as F
from torch import Tensor

SCALE_RANGE = (0.5, 1.5)  # YOLOv7: sizes from half to 1.5x the training size


def draw_size(imgsz: int, stride: int, rng: random.Random) -> int:
    """A training size for the next batch: a multiple of `stride` in [0.5, 1.5] x imgsz (never below one stride)."""
    lo = max(math.ceil(imgsz * SCALE_RANGE[0] / stride), 1)
    hi = max(math.floor(imgsz * SCALE_RANGE[1] / stride), lo)
    return rng.randint(lo, hi) * stride


def rescale_batch(imgs: Tensor, size: int, stride: int) -> Tensor:
    """`imgs` [B, C, H, W] resized (bilinear) so that the long side is `size`, each side a multiple of `stride`."""
    scale = size / max(imgs.shape[2:])
    if scale == 1:
        return imgs
    shape = [math.ceil(x * scale / stride) * stride for x in imgs.shape[2:]]
    return F.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)


__all__ = ["SCALE_RANGE", "draw_size", "rescale_batch"]
