"""Small architectures that exercise every block the compression steps must handle, and shared helpers."""
from __future__ import annotations

import copy

import torch

from search_spaces.architecture import Architecture
from search_spaces.model import Detector

from ..helpers import randomize

# RepConv with and without identity branch, E-ELAN, Ghost-ELAN (never pruned), a grouped conv (never pruned
# on its outputs, nor its input producer), DownC, MP with a lateral, SPPCSPC, SPP-tiny, an add, IDetect.
MIXED = {
    "name": "mixed", "nc": 3, "act": "silu", "imgsz": 128,
    "backbone": [
        {"block": "reorg"},
        {"block": "conv", "out": 32, "k": 3},
        {"block": "downc", "out": 64},
        {"block": "elan", "width": 32, "depth": 2, "tap": 2, "out": 64},
        {"name": "p3", "block": "repconv", "out": 64},
        {"block": "mp", "c": 32},
        {"name": "p4", "block": "eelan", "width": 32, "depth": 2, "out": 96, "groups": 2},
        {"block": "conv", "out": 96, "k": 3, "g": 4},
        {"block": "downc", "out": 128},
        {"name": "p5", "block": "elan", "width": 32, "depth": 2, "out": 128, "ghost": True},
    ],
    "neck": [
        {"name": "spp", "block": "sppcspc", "out": 64},
        {"block": "conv", "out": 48},
        {"name": "up", "block": "upsample"},
        {"name": "lat", "block": "conv", "out": 48, "from": "p4"},
        {"name": "sum", "block": "add", "from": ["lat", "up"]},
        {"name": "n4", "block": "elan", "width": 32, "mid": 16, "depth": 3, "out": 64},
        {"block": "mp", "c": 32, "from": ["n4", "spp"]},
        {"name": "n5", "block": "sppcsp_tiny", "out": 64},
        {"name": "h3", "block": "repconv", "out": 64, "from": "p3"},
        {"name": "h4", "block": "repconv", "out": 96, "from": "n4"},
        {"name": "h5", "block": "conv", "out": 64, "k": 3, "from": "n5"},
    ],
    "head": {"type": "idetect", "from": ["h3", "h4", "h5"],
             "anchors": [[10, 13, 16, 30], [30, 61, 62, 45], [116, 90, 156, 198]]},
}

# An auxiliary head (IAuxDetect): its branch only runs in training mode and must be pruned consistently.
AUX = {
    "name": "aux", "nc": 2, "act": "leaky_relu", "imgsz": 64,
    "backbone": [
        {"block": "conv", "out": 32, "k": 3, "s": 2},
        {"name": "a3", "block": "elan", "width": 16, "depth": 2, "out": 32},
        {"block": "maxpool"},
        {"name": "a4", "block": "elan", "width": 32, "depth": 2, "out": 64},
    ],
    "neck": [
        {"name": "l3", "block": "conv", "out": 32, "k": 3, "from": "a3"},
        {"name": "l4", "block": "conv", "out": 64, "k": 3, "from": "a4"},
        {"name": "x3", "block": "conv", "out": 24, "from": "a3"},
        {"name": "x4", "block": "conv", "out": 40, "from": "a4"},
    ],
    "head": {"type": "iauxdetect", "from": ["l3", "l4"], "aux_from": ["x3", "x4"],
             "anchors": [[10, 13, 16, 30], [30, 61, 62, 45]]},
}

# The anchor-free decoupled head: its `hidden` width is one variable across all levels.
DECOUPLED = {
    "name": "dec", "nc": 4, "act": "relu", "imgsz": 64,
    "backbone": [
        {"block": "conv", "out": 32, "k": 3, "s": 2},
        {"name": "d3", "block": "ghostconv", "out": 32, "k": 3, "s": 2},
        {"name": "d4", "block": "conv", "out": 64, "k": 3, "s": 2},
    ],
    "head": {"type": "decoupled", "from": ["d3", "d4"], "hidden": 32, "depth": 1},
}


def build(d: dict, seed: int = 0) -> Detector:
    """A Detector of architecture mapping `d` with seeded random weights and non-trivial BN/implicit values."""
    torch.manual_seed(seed)
    det = Detector(Architecture.from_dict(copy.deepcopy(d)))
    randomize(det, seed)
    return det


def write_images(folder, n: int = 6, seed: int = 0) -> list:
    """`n` small RGB images of random rectangles on noise, of assorted sizes, as PNG files in `folder`."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(48, 120)), int(rng.integers(48, 120))
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            draw.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        paths.append(folder / f"img{i}.png")
        im.save(paths[-1])
    return paths
