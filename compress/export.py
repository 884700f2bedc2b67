"""Export a Detector to ONNX (decoded output, dynamic batch, opset >= 17) and verify it against PyTorch."""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latency_tables.onnx_utils import DEFAULT_OPSET, check_onnx, export_onnx, input_specs, resolve_shapes
from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_write_bytes
from search_spaces.model import Detector

from .graph_nms import (
    OUTPUT_COLUMNS,
    TRT_OUTPUTS,
    DetectionsOutput,
    EfficientNmsOutput,
    NmsSpec,
    boxes_and_scores,
)


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
    engine: str | None = None  # a TensorRT engine built from the ONNX file (build_trt_engine)
    engine_precision: str | None = None
    engine_max_abs_diff: float | None = None  # engine vs PyTorch (verify_engine)
    engine_agreement: float | None = None  # in-graph NMS: share of images with the same detections

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


def _random_images(det: Detector, imgsz: int, batch: int, seed: int) -> Tensor:
    """The seeded random batch in [0, 1) that every export check feeds to both sides."""
    return torch.rand(batch, det.arch.in_channels, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))


def _torch_and_onnx(module: nn.Module, onnx_path: str | Path, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The first output of `module` (eval) and of the ONNX file on the batch `x`."""
    with torch.no_grad():
        out = module.eval()(x)
    ref = (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()
    sess = ort_session(Path(onnx_path))
    return ref, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


# ONNX Runtime against PyTorch, both FP32: measured differences are up to ~3e-6 on scores and up to ~1.5e-5
# of the box scale (a supernet-extracted subnet of `make demo`: 0.0088 px on boxes up to 568 px); a wrong
# decode, fusion or weight differs by orders of magnitude more
SCORE_ATOL = 1e-4
# Near-tied scores flip a few kept boxes; a real mismatch flips most of them. Refused below this agreement
# when more rows differ than NMS_MAX_TIES (with 1-2 detections one flipped tie is already 0-50%).
NMS_MIN_AGREEMENT = 0.5
NMS_MAX_TIES = 2
BOX_RTOL = 1e-4


def check_decoded_close(ref: np.ndarray, out: np.ndarray, path: str | Path | None = None, *,
                        field: str = "export", what: str = "the export does not match PyTorch",
                        box_atol: float = 1e-3, box_rtol: float = BOX_RTOL, score_atol: float = SCORE_ATOL
                        ) -> tuple[float, float]:
    """(box, score) max diffs of decoded outputs [.., 4 box + scores]; raise beyond FP32 noise.

    Scores are compared absolutely and boxes relative to the largest box value: one tolerance scaled by the
    largest output (a box size in pixels) would let a score error hundreds of times FP32 noise through.
    """
    box = float(np.abs(out[..., :4] - ref[..., :4]).max())
    box_tol = box_atol + box_rtol * float(np.abs(ref[..., :4]).max())
    score = float(np.abs(out[..., 4:] - ref[..., 4:]).max())
    if not (box <= box_tol and score <= score_atol):  # written so that NaN fails too
        raise DetforgeError(f"{what}: max diff boxes {box:.3g} (allowed {box_tol:.3g}), scores {score:.3g} "
                            f"(allowed {score_atol:g})", path=path, field=field)
    return box, score


def verify_onnx(det: Detector, onnx_path: str | Path, imgsz: int, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """Max abs difference between ONNX Runtime and PyTorch decoded outputs on a random batch, and the output scale.

    Raises DetforgeError where they differ beyond FP32 noise (see `check_decoded_close`).
    """
    ref, out = _torch_and_onnx(det, onnx_path, _random_images(det, imgsz, batch, seed))
    return max(check_decoded_close(ref, out, onnx_path)), float(np.abs(ref).max())


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
    if nms is not None and nms.op == "trt":
        trt_wrapped = EfficientNmsOutput(model, nms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            export_onnx(trt_wrapped, shape, path=out, opset=opset, input_names=["images"],
                        output_names=list(TRT_OUTPUTS), check=False)
        check_onnx(Path(out), full_check=False)  # the plugin op has no ONNX schema to infer shapes with
        diff, scale = verify_nms_inputs(model, out, imgsz) if verify else (float("nan"), float("nan"))
        return ExportReport(path=str(out), imgsz=imgsz, opset=opset, fused=fuse, max_abs_diff=diff,
                            max_abs_output=scale, outputs=list(TRT_OUTPUTS), nms=nms.to_dict())
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


def verify_nms_inputs(det: Detector, onnx_path: str | Path, imgsz: int, batch: int = 2,
                      seed: int = 0) -> tuple[float, float]:
    """Max abs diff between ONNX Runtime and PyTorch at the inputs of a TensorRT NMS plugin node, and their scale.

    ONNX Runtime cannot run the plugin, so the graph is cut just before it: everything the export computes
    except the NMS itself (which TensorRT verifies when the engine is built; see verify_engine).
    """
    import onnx

    cut = onnx.load(str(onnx_path))
    node = next((n for n in cut.graph.node if n.op_type == "EfficientNMS_TRT"), None)
    if node is None:
        raise DetforgeError("no EfficientNMS_TRT node in the graph", path=onnx_path)
    cut.graph.node.remove(node)  # the plugin is the graph's last node: its inputs become the outputs
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.input)
    x = _random_images(det, imgsz, batch, seed)
    with torch.no_grad():
        ref = [t.float().numpy() for t in boxes_and_scores(det.eval(), x)]
    sess = ort_session(cut.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    # the plugin's inputs are boxes [B, N, 4] and scores [B, N, nc]: checked as the decoded output is
    diff = max(check_decoded_close(np.concatenate(ref, -1), np.concatenate(out, -1), onnx_path))
    return diff, max(float(np.abs(r).max()) for r in ref)


def _sorted_rows(d: np.ndarray) -> np.ndarray:
    """Detections in a canonical order (image, class, falling score): the kernel's order, tie-proof."""
    return d[np.lexsort((-d[:, 5], d[:, 6], d[:, 0]))] if len(d) else d


def verify_detections(wrapped: DetectionsOutput, onnx_path: str | Path, imgsz: int, batch: int = 2,
                      seed: int = 0) -> tuple[float, float, float]:
    """ONNX Runtime's vs PyTorch's detections on a random batch: max abs diff of matched rows, scale, agreement.

    Agreement is the share of rows (of the larger set) that the other side has too, within 1e-3 of the
    output scale. Below 1 only where scores nearly tie (an untrained model): fused and reference outputs
    differ by ~1e-5 and NMS may then keep a different one of two equal boxes. Below NMS_MIN_AGREEMENT, with
    more than NMS_MAX_TIES rows differing, no tie explains it and the export is refused.
    """
    ref, out = _torch_and_onnx(wrapped, onnx_path, _random_images(wrapped.det, imgsz, batch, seed))
    ref, out = _sorted_rows(ref), _sorted_rows(out)
    if len(ref) == 0 and len(out) == 0:
        return 0.0, 0.0, 1.0
    scale = float(max(np.abs(ref).max(initial=0.0), np.abs(out).max(initial=0.0)))
    if len(ref) and len(out):
        nearest = np.abs(out[:, None, :] - ref[None, :, :]).max(-1).min(1)  # each ONNX row's closest PyTorch row
        matched = nearest <= 1e-3 * max(scale, 1.0)
    else:
        nearest, matched = np.zeros(0), np.zeros(0, bool)
    diff = float(nearest[matched].max()) if matched.any() else float("inf")
    n = max(len(out), len(ref))
    agreement = float(matched.sum()) / n
    if agreement < NMS_MIN_AGREEMENT and n - int(matched.sum()) > NMS_MAX_TIES:
        raise DetforgeError(f"the export's detections do not match PyTorch's: {agreement:.0%} of {len(ref)} "
                            f"(PyTorch) and {len(out)} (ONNX Runtime) rows agree", path=onnx_path, field="export")
    return diff, scale, agreement


# ---- TensorRT engines ---------------------------------------------------------------------------------------
def build_trt_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp16",
                     max_batch: int = 1, workspace_gb: float = 4.0) -> Path:
    """A TensorRT engine (fp32, fp16, or int8 from a QDQ model) of a fixed-size export; batch 1..max_batch."""
    from latency_tables.backends.tensorrt import build_engine

    if max_batch < 1:
        raise DetforgeError(f"must be >= 1, got {max_batch}", field="max_batch")
    try:
        specs = input_specs(onnx_path)
        per_sample = resolve_shapes([dims for _, dims, _ in specs], None, max_batch)  # fixed H, W required
        shapes = {name: (max_batch, *s) for (name, _, _), s in zip(specs, per_sample)}
        engine = build_engine(onnx_path, shapes=shapes, precision=precision, workspace_gb=workspace_gb,
                              min_batch=1)
    except DetforgeError as e:
        raise DetforgeError(e.message, path=onnx_path, field=e.field) from None
    atomic_write_bytes(engine_path, engine)
    return Path(engine_path)


def run_engine(engine_path: str | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of a TensorRT engine on one batch of inputs (by name), as float32 host arrays (GPU)."""
    from latency_tables.backends.tensorrt import TrtRunner

    if not torch.cuda.is_available():
        raise DetforgeError("running a TensorRT engine needs a CUDA GPU", path=engine_path)
    runner = TrtRunner(Path(engine_path).read_bytes(), {k: v.shape for k, v in inputs.items()}, meta={},
                       device=torch.device("cuda"), inputs=inputs)
    try:
        return runner.outputs()
    finally:
        runner.close()


def verify_engine(det: Detector, engine_path: str | Path, imgsz: int, nms: NmsSpec | None = None,
                  batch: int = 1, seed: int = 0) -> tuple[float, float | None]:
    """TensorRT engine vs PyTorch on a random batch: max abs diff, and with TensorRT NMS the agreement.

    Decoded exports compare the whole `[B, N, 5 + nc]` output. EfficientNMS exports compare the detections
    of the images whose count agrees (agreement: the share of such images; near-ties may flip in fp16).
    """
    x = _random_images(det, imgsz, batch, seed)
    outs = run_engine(engine_path, {"images": x.numpy()})
    model = copy.deepcopy(det).eval().float()
    with torch.no_grad():
        if nms is None or nms.op != "trt":
            ref = model(x)[0].numpy()
            return float(np.abs(outs[0] - ref).max()), None
        num, boxes, scores, classes = (t.float().numpy() for t in EfficientNmsOutput(model, nms)(x))
    same = [b for b in range(batch) if int(outs[0][b, 0]) == int(num[b, 0])]
    diffs = []  # nan when no image's count agrees: nothing was compared
    for b in same:
        k = int(num[b, 0])
        ref = np.concatenate([boxes[b, :k], scores[b, :k, None], classes[b, :k, None]], 1)
        got = np.concatenate([outs[1][b, :k], outs[2][b, :k, None], outs[3][b, :k, None]], 1)
        diffs.append(float(np.abs(got - ref).max(initial=0.0)))
    return max(diffs, default=float("nan")), len(same) / batch
