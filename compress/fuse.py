"""Fusion for deployment: aux head dropped, implicit layers folded, Conv+BN and RepConv merged -- checked exact."""
from __future__ import annotations

import copy

import torch
from torch import nn

from search_spaces.blocks import RepConv
from search_spaces.model import Detector, count_params

from .export import SCORE_ATOL, check_decoded_close
from .report import StepReport, measure_latency_ms


@torch.no_grad()
def fuse_detector(det: Detector, imgsz: int | None = None, *, check_imgsz: int | None = None, rtol: float = 1e-4,
                  atol: float = 1e-3, score_atol: float = SCORE_ATOL, stats: bool = True,
                  measure_latency: bool = False) -> tuple[Detector, StepReport]:
    """A new deploy-form, fused Detector with the same eval outputs as `det` (which is left untouched).

    The check runs both models on a seeded random batch at `check_imgsz` (default: twice the largest
    stride) and fails if a box differs by more than atol + rtol * max|box| or a score by more than
    `score_atol`; params and (with `stats`, fvcore) GFLOPs are reported at `imgsz` (default: the
    architecture's).
    """
    imgsz = imgsz or det.arch.imgsz
    size = check_imgsz or 2 * det.max_stride
    src = copy.deepcopy(det).eval()
    implicit = _implicit_layers(src)
    device = next(src.parameters()).device
    # deploy() builds the new model on the CPU: it goes where the source is, so a GPU model is checked there
    fused = (src.deploy() if src.form == "training" else copy.deepcopy(src)).to(device).eval()
    counts = _fusable(fused)
    fused.fuse()

    x = torch.rand(2, det.arch.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ref, out = src(x)[0].float(), fused(x)[0].float()
    diff = max(check_decoded_close(ref.cpu().numpy(), out.cpu().numpy(), field="fuse",
                                   what="the fused model differs from the original", box_atol=atol,
                                   box_rtol=rtol, score_atol=score_atol))
    scale = ref.abs().max().item()

    if stats:
        report = StepReport("fuse").set_model_stats(src, fused, imgsz)
    else:
        report = StepReport("fuse", params_before=count_params(src), params_after=count_params(fused), imgsz=imgsz)
    if measure_latency:
        report.latency_ms_before, report.latency_ms_after = measure_latency_ms([src, fused], imgsz)
    if det.head.has_aux:
        report.changes.append("dropped the auxiliary head and the layers only it used")
    if implicit:
        report.changes.append(f"folded {implicit} ImplicitA/ImplicitM layers into the output convs")
    if counts["bn"]:
        report.changes.append(f"folded {counts['bn']} BatchNorm layers into their convs")
    if counts["repconv"]:
        report.changes.append(f"merged {counts['repconv']} RepConv blocks into single 3x3 convs")
    report.details = {"max_abs_diff": diff, "max_abs_output": scale, "check_imgsz": size, "form": fused.form}
    return fused, report


def _fusable(det: Detector) -> dict[str, int]:
    """How many BatchNorms (outside RepConvs) and RepConvs a fuse will fold (for the report)."""
    reps = [m for m in det.modules() if isinstance(m, RepConv) and m.rbr_reparam is None]
    in_rep = {id(b) for r in reps for b in r.modules() if isinstance(b, nn.BatchNorm2d)}
    bns = [m for m in det.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in in_rep]
    return {"bn": len(bns), "repconv": len(reps)}


def _implicit_layers(det: Detector) -> int:
    """ImplicitA/ImplicitM layers of the head (deploy folds them)."""
    head = det.head
    return sum(len(x) for x in (getattr(head, "ia", None), getattr(head, "im", None)) if x is not None)


__all__ = ["fuse_detector"]
