"""Export a Detector to ONNX (decoded output, dynamic batch, opset >= 17) and verify it against PyTorch."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latency_tables.onnx_utils import DEFAULT_OPSET, check_onnx, export_onnx
from search_spaces.errors import DetforgeError
from search_spaces.model import Detector


class DecodedOutput(nn.Module):
    """Wraps a Detector so that its only output is the decoded `[B, N, 5 + nc]` tensor (what deployments use)."""

    def __init__(self, det: Detector):
        super().__init__()
        self.det = det

    def forward(self, x: Tensor) -> Tensor:
        return self.det(x)[0]


@dataclass
class ExportReport:
    """What an export wrote and how closely ONNX Runtime reproduces PyTorch."""

    path: str
    imgsz: int
    opset: int
    fused: bool
    max_abs_diff: float
    max_abs_output: float
    outputs: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def ort_session(path_or_bytes: str | Path | bytes, threads: int = 2):
    """An ONNX Runtime CPU session with all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def verify_onnx(det: Detector, onnx_path: str | Path, imgsz: int, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """Max abs difference between ONNX Runtime and PyTorch decoded outputs on a random batch, and the output scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, det.arch.in_channels, imgsz, imgsz, generator=g)
    with torch.no_grad():
        ref = det.eval()(x)[0].float().numpy()
    sess = ort_session(Path(onnx_path))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(out - ref).max()), float(np.abs(ref).max())


def export_detector(det: Detector, out: str | Path, imgsz: int | None = None, fuse: bool = False,
                    opset: int = DEFAULT_OPSET, verify: bool = True) -> ExportReport:
    """Export the decoded output of `det` to ONNX at `out` (checked with onnx.checker), verified with ORT."""
    if opset < 17:
        raise DetforgeError("opset must be >= 17", field="opset")
    imgsz = imgsz or det.arch.imgsz
    if imgsz % max(det.strides):
        raise DetforgeError(f"imgsz {imgsz} is not a multiple of the largest stride {max(det.strides)}", field="imgsz")
    model = copy.deepcopy(det).eval().float()
    if fuse:
        model.fuse()
    export_onnx(DecodedOutput(model), (det.arch.in_channels, imgsz, imgsz), path=out, opset=opset,
                input_names=["images"], output_names=["output"], check=False)
    check_onnx(Path(out))
    diff, scale = verify_onnx(model, out, imgsz) if verify else (float("nan"), float("nan"))
    n = sum(det.head.na * (imgsz // s) ** 2 for s in det.strides)
    return ExportReport(path=str(out), imgsz=imgsz, opset=opset, fused=fuse, max_abs_diff=diff,
                        max_abs_output=scale, outputs=[n, det.nc + 5])
