"""Export a Detector to ONNX (decoded output, dynamic batch, opset >= 17) and verify it against PyTorch."""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latency_tables.onnx_utils import DEFAULT_OPSET, check_onnx, export_onnx
from search_spaces.errors import DetforgeError
from search_spaces.model import Detector

from .graph_nms import OUTPUT_COLUMNS, DetectionsOutput, NmsSpec


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
    outputs: list[int | str]  # [N, 5 + nc] decoded, or ["K", 7] detections with in-graph NMS
    nms: dict | None = None  # the NmsSpec of an end-to-end export
    nms_agreement: float | None = None  # share of detections ONNX Runtime and PyTorch agree on (verify_detections)

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


def _torch_and_onnx(module: nn.Module, onnx_path: str | Path, shape: tuple[int, ...],
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first output of `module` (eval) and of the ONNX file on one seeded random batch of `shape`."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = module.eval()(x)
    ref = (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()
    sess = ort_session(Path(onnx_path))
    return ref, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def verify_onnx(det: Detector, onnx_path: str | Path, imgsz: int, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """Max abs difference between ONNX Runtime and PyTorch decoded outputs on a random batch, and the output scale."""
    ref, out = _torch_and_onnx(det, onnx_path, (batch, det.arch.in_channels, imgsz, imgsz), seed)
    return float(np.abs(out - ref).max()), float(np.abs(ref).max())


def export_detector(det: Detector, out: str | Path, imgsz: int | None = None, fuse: bool = False,
                    opset: int = DEFAULT_OPSET, verify: bool = True, nms: NmsSpec | None = None) -> ExportReport:
    """Export the decoded output of `det` (or, with `nms`, its detections) to checked ONNX, verified with ORT."""
    if opset < 17:
        raise DetforgeError("opset must be >= 17", field="opset")
    imgsz = imgsz or det.arch.imgsz
    if imgsz % max(det.strides):
        raise DetforgeError(f"imgsz {imgsz} is not a multiple of the largest stride {max(det.strides)}", field="imgsz")
    model = copy.deepcopy(det).eval().float()
    if fuse:
        model.fuse()
    shape = (det.arch.in_channels, imgsz, imgsz)
    if nms is not None:
        wrapped = DetectionsOutput(model, nms)
        with warnings.catch_warnings():  # the NMS bounds become graph constants: exactly what is meant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            export_onnx(wrapped, shape, path=out, opset=opset, input_names=["images"],
                        output_names=["detections"], output_axes={"detections": {0: "detections"}}, check=False)
        check_onnx(Path(out))
        diff, scale, agree = (verify_detections(wrapped, out, imgsz) if verify
                              else (float("nan"), float("nan"), float("nan")))
        return ExportReport(path=str(out), imgsz=imgsz, opset=opset, fused=fuse, max_abs_diff=diff,
                            max_abs_output=scale, outputs=["K", len(OUTPUT_COLUMNS)], nms=nms.to_dict(),
                            nms_agreement=agree)
    export_onnx(DecodedOutput(model), shape, path=out, opset=opset, input_names=["images"],
                output_names=["output"], check=False)
    check_onnx(Path(out))
    diff, scale = verify_onnx(model, out, imgsz) if verify else (float("nan"), float("nan"))
    n = sum(det.head.na * (imgsz // s) ** 2 for s in det.strides)
    return ExportReport(path=str(out), imgsz=imgsz, opset=opset, fused=fuse, max_abs_diff=diff,
                        max_abs_output=scale, outputs=[n, det.nc + 5])


def _sorted_rows(d: np.ndarray) -> np.ndarray:
    """Detections in a canonical order (image, class, falling score): the kernel's order, tie-proof."""
    return d[np.lexsort((-d[:, 5], d[:, 6], d[:, 0]))] if len(d) else d


def verify_detections(wrapped: DetectionsOutput, onnx_path: str | Path, imgsz: int, batch: int = 2,
                      seed: int = 0) -> tuple[float, float, float]:
    """ONNX Runtime's vs PyTorch's detections on a random batch: max abs diff of matched rows, scale, agreement.

    Agreement is the share of rows (of the larger set) that the other side has too, within 1e-3 of the
    output scale. Below 1 only where scores nearly tie (an untrained model): fused and reference outputs
    differ by ~1e-5 and NMS may then keep a different one of two equal boxes.
    """
    ref, out = _torch_and_onnx(wrapped, onnx_path, (batch, wrapped.det.arch.in_channels, imgsz, imgsz), seed)
    ref, out = _sorted_rows(ref), _sorted_rows(out)
    if len(ref) == 0 and len(out) == 0:
        return 0.0, 0.0, 1.0
    scale = float(max(np.abs(ref).max(initial=0.0), np.abs(out).max(initial=0.0)))
    if len(ref) == 0 or len(out) == 0:
        return float("inf"), scale, 0.0
    dist = np.abs(out[:, None, :] - ref[None, :, :]).max(-1)  # [K_onnx, K_torch]
    nearest = dist.min(1)
    matched = nearest <= 1e-3 * max(scale, 1.0)
    diff = float(nearest[matched].max()) if matched.any() else float("inf")
    return diff, scale, float(matched.sum()) / max(len(out), len(ref))
