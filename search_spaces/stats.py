"""Model statistics: parameters (as built, fused/live), MACs and GFLOPs with fvcore."""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import torch

from .model import Detector, count_live_params, count_params
from .modes import temporary_mode


@dataclass
class ModelStats:
    """What `detforge info` reports."""

    name: str
    form: str
    params: int
    params_fused: int
    macs: int
    gflops: float
    imgsz: int
    strides: list[int]
    layers: int
    nc: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_macs(model: torch.nn.Module, imgsz: int, in_channels: int = 3) -> int:
    """fvcore's total count (one multiply-add = 1) for one image of imgsz x imgsz, in eval mode."""
    from fvcore.nn import FlopCountAnalysis

    x = torch.zeros(1, in_channels, imgsz, imgsz, device=next(model.parameters()).device)
    fca = FlopCountAnalysis(model, x)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with temporary_mode(model), torch.no_grad():
        return int(fca.total())


def model_stats(det: Detector, imgsz: int | None = None) -> ModelStats:
    """Parameters of `det` as built, and params/MACs/GFLOPs of its fused copy (GFLOPs = 2 x MACs / 1e9)."""
    imgsz = det.check_imgsz(det.arch.imgsz if imgsz is None else imgsz)
    fused = copy.deepcopy(det).eval().fuse()
    macs = count_macs(fused, imgsz, det.arch.in_channels)
    return ModelStats(
        name=det.arch.name, form=det.form, params=count_params(det), params_fused=count_live_params(fused),
        macs=macs, gflops=round(2 * macs / 1e9, 3), imgsz=imgsz, strides=list(det.strides),
        layers=len(det.layers), nc=det.nc,
    )
