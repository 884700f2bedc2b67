"""Export a Detector to ONNX (decoded output, dynamic batch, opset >= 17) and verify it against PyTorch."""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latency_tables.onnx_utils import (
    DEFAULT_OPSET,
    check_onnx,
    export_onnx,
    input_specs,
    load_onnx_model,
    resolve_shapes,
    source_name,
)
from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_path, atomic_write_bytes
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
    # share of detections ONNX Runtime and PyTorch agree on (verify_nms_export); None where neither side
    # detected anything on the check batch (the NMS inputs were compared all the same)
    nms_agreement: float | None = None
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


def _torch_and_onnx(module: nn.Module, onnx: str | Path | bytes, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The first output of `module` (eval) and of the ONNX model (a file or its bytes) on the batch `x`."""
    with torch.no_grad():
        out = module.eval()(x.to(_device(module)))
    ref = (out[0] if isinstance(out, (tuple, list)) else out).float().cpu().numpy()
    sess = ort_session(onnx if isinstance(onnx, bytes) else Path(onnx))
    return ref, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _device(module: nn.Module) -> torch.device:
    """Where the module's weights are (a model on a GPU is checked there; the ONNX side runs on the CPU)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


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


def verify_onnx(det: Detector, onnx_path: str | Path | bytes, imgsz: int, batch: int = 2, seed: int = 0, *,
                path: str | Path | None = None) -> tuple[float, float]:
    """Max abs difference between ONNX Runtime and PyTorch decoded outputs on a random batch, and the output scale.

    Raises DetforgeError where they differ beyond FP32 noise (see `check_decoded_close`); it names `path`, or
    the ONNX file checked.
    """
    ref, out = _torch_and_onnx(det, onnx_path, _random_images(det, imgsz, batch, seed))
    return max(check_decoded_close(ref, out, source_name(onnx_path, path))), float(np.abs(ref).max())


def export_detector(det: Detector, out: str | Path, imgsz: int | None = None, fuse: bool = False,
                    opset: int = DEFAULT_OPSET, verify: bool = True, nms: NmsSpec | None = None) -> ExportReport:
    """Export the decoded output of `det` (or, with `nms`, its detections) to checked ONNX, verified with ORT."""
    if opset < 17:
        raise DetforgeError("opset must be >= 17", field="opset")
    imgsz = det.check_imgsz(imgsz or det.arch.imgsz)
    # Exported and verified in memory, written last: a failed check leaves whatever `out` held before.
    model = copy.deepcopy(det).eval().float().cpu()
    if fuse:
        model.fuse()
    shape = (det.arch.in_channels, imgsz, imgsz)
    nan = float("nan")
    agree = None
    if nms is not None and nms.op == "trt":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            data = export_onnx(EfficientNmsOutput(model, nms), shape, opset=opset, input_names=["images"],
                               output_names=list(TRT_OUTPUTS), check=False)
        check_onnx(data, full_check=False, path=out)  # the plugin op has no ONNX schema to infer shapes with
        diff, scale = verify_nms_inputs(model, data, imgsz, path=out) if verify else (nan, nan)
        outputs: list[int | str] = list(TRT_OUTPUTS)
    elif nms is not None:
        wrapped = DetectionsOutput(model, nms)
        with warnings.catch_warnings():  # the NMS bounds become graph constants: exactly what is meant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            data = export_onnx(wrapped, shape, opset=opset, input_names=["images"], output_names=["detections"],
                               output_axes={"detections": {0: "detections"}}, check=False)
        check_onnx(data, path=out)
        diff, scale, agree = verify_nms_export(wrapped, data, imgsz, path=out) if verify else (nan, nan, None)
        outputs = ["K", len(OUTPUT_COLUMNS)]
    else:
        data = export_onnx(DecodedOutput(model), shape, opset=opset, input_names=["images"],
                           output_names=["output"], check=False)
        check_onnx(data, path=out)
        diff, scale = verify_onnx(model, data, imgsz, path=out) if verify else (nan, nan)
        outputs = [sum(det.head.na * (imgsz // s) ** 2 for s in det.strides), det.nc + 5]
    atomic_write_bytes(out, data)
    return ExportReport(path=str(out), imgsz=imgsz, opset=opset, fused=fuse, max_abs_diff=diff,
                        max_abs_output=scale, outputs=outputs, nms=None if nms is None else nms.to_dict(),
                        nms_agreement=agree)


NMS_NODES = ("EfficientNMS_TRT", "NonMaxSuppression")  # TensorRT's plugin; the ONNX operator
ENGINE_NEEDS_FIXED_OUTPUTS = ("an engine needs a decoded export or --nms-op trt: the ONNX NonMaxSuppression output "
                              "has a data-dependent shape TensorRT cannot bind")


def _expose_nms_inputs(onnx_path: str | Path | bytes, *, keep_nms: bool, where: str | Path) -> tuple[bytes, str]:
    """The graph with the boxes and scores its NMS node takes as extra outputs (after its own, or, with
    `keep_nms=False`, cut just before the NMS: TensorRT's plugin cannot run in ONNX Runtime); and the node's op."""
    import onnx

    model = copy.deepcopy(load_onnx_model(onnx_path))  # edited below: never the caller's ModelProto
    k = next((i for i, n in enumerate(model.graph.node) if n.op_type in NMS_NODES), None)
    if k is None:
        raise DetforgeError(f"no NMS node ({' or '.join(NMS_NODES)}) in the graph", path=where)
    node = model.graph.node[k]
    # extra outputs only add graph outputs: ONNX Runtime computes the same nodes (fusions may differ, within
    # FP32 noise, which is what the check allows)
    if not keep_nms:
        del model.graph.node[k:]  # topological order: the nodes before the NMS make its inputs, none depends on it
        del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in node.input[:2])
    return model.SerializeToString(), node.op_type


def _check_nms_inputs(ref: tuple[Tensor, Tensor], boxes: np.ndarray, scores: np.ndarray, op: str,
                      where: str | Path) -> tuple[float, float]:
    """Max diff and scale of ONNX Runtime's NMS inputs against PyTorch's (boxes, scores); raise beyond FP32 noise."""
    ref_np = [t.float().cpu().numpy() for t in ref]
    if op == "NonMaxSuppression":
        scores = scores.transpose(0, 2, 1)  # the operator takes scores class-major: [B, nc, N]
    # boxes [B, N, 4] and scores [B, N, nc]: checked as the decoded output is
    diff = max(check_decoded_close(np.concatenate(ref_np, -1), np.concatenate([boxes, scores], -1), where))
    return diff, max(float(np.abs(r).max()) for r in ref_np)


def verify_nms_inputs(det: Detector, onnx_path: str | Path | bytes, imgsz: int, batch: int = 2,
                      seed: int = 0, *, path: str | Path | None = None) -> tuple[float, float]:
    """Max abs diff between ONNX Runtime and PyTorch at the boxes and scores an in-graph NMS takes, and their scale.

    The graph is cut just before the NMS node: everything the export computes except the NMS itself.
    ONNX Runtime cannot run TensorRT's plugin (TensorRT verifies it when the engine is built; see
    verify_engine), and the ONNX operator's detections may be empty on a random batch (verify_detections).
    """
    where = source_name(onnx_path, path)
    cut, op = _expose_nms_inputs(onnx_path, keep_nms=False, where=where)
    x = _random_images(det, imgsz, batch, seed)
    with torch.no_grad():
        ref = boxes_and_scores(det.eval(), x.to(_device(det)))
    sess = ort_session(cut)
    boxes, scores = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return _check_nms_inputs(ref, boxes, scores, op, where)


def _sorted_rows(d: np.ndarray) -> np.ndarray:
    """Detections in a canonical order (image, class, falling score): the kernel's order, tie-proof."""
    return d[np.lexsort((-d[:, 5], d[:, 6], d[:, 0]))] if len(d) else d


def _compare_detections(ref: np.ndarray, out: np.ndarray, where: str | Path) -> tuple[float, float, float]:
    """Max abs diff of matched rows, scale and agreement of two detection sets `[K, 7]`; raise on a mismatch
    no near-tie explains (see verify_detections); NaNs where neither side detected anything."""
    ref, out = _sorted_rows(ref), _sorted_rows(out)
    if len(ref) == 0 and len(out) == 0:
        return float("nan"), float("nan"), float("nan")
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
                            f"(PyTorch) and {len(out)} (ONNX Runtime) rows agree", path=where, field="export")
    return diff, scale, agreement


def verify_detections(wrapped: DetectionsOutput, onnx_path: str | Path | bytes, imgsz: int, batch: int = 2,
                      seed: int = 0, *, path: str | Path | None = None) -> tuple[float, float, float]:
    """ONNX Runtime's vs PyTorch's detections on a random batch: max abs diff of matched rows, scale, agreement.

    Agreement is the share of rows (of the larger set) that the other side has too, within 1e-3 of the
    output scale. Below 1 only where scores nearly tie (an untrained model): fused and reference outputs
    differ by ~1e-5 and NMS may then keep a different one of two equal boxes. Below NMS_MIN_AGREEMENT, with
    more than NMS_MAX_TIES rows differing, no tie explains it and the export is refused. Where neither side
    detects anything, nothing was compared: all three are NaN.
    """
    ref, out = _torch_and_onnx(wrapped, onnx_path, _random_images(wrapped.det, imgsz, batch, seed))
    return _compare_detections(ref, out, source_name(onnx_path, path))


def verify_nms_export(wrapped: DetectionsOutput, onnx_path: str | Path | bytes, imgsz: int, batch: int = 2,
                      seed: int = 0, *, path: str | Path | None = None) -> tuple[float, float, float | None]:
    """Both checks of an ONNX-NMS export in one PyTorch forward and one ONNX Runtime run: (max diff, scale,
    agreement). The NMS inputs are always compared, since the detections may be empty on a random batch;
    the detections too where there are any (agreement None where there were none)."""
    where = source_name(onnx_path, path)
    graph, op = _expose_nms_inputs(onnx_path, keep_nms=True, where=where)
    x = _random_images(wrapped.det, imgsz, batch, seed)
    with torch.no_grad():
        ref_inputs = boxes_and_scores(wrapped.det.eval(), x.to(_device(wrapped.det)))
        ref = wrapped.eval().select(*ref_inputs).float().cpu().numpy()
    sess = ort_session(graph)
    out, boxes, scores = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    diff, scale = _check_nms_inputs(ref_inputs, boxes, scores, op, where)
    det_diff, det_scale, agreement = _compare_detections(ref, out, where)
    if np.isnan(agreement):  # no detection on either side: nothing to agree on
        return diff, scale, None
    return max(diff, det_diff), max(scale, det_scale), agreement


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


@contextlib.contextmanager
def verified_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, moved there only when the block succeeds (a refused file keeps an earlier
    one); an error about the temporary file names `path`."""
    with atomic_path(path) as tmp:
        try:
            yield tmp
        except DetforgeError as e:
            if e.path is not None and Path(e.path) == tmp:
                raise type(e)(e.message, path=path, field=e.field) from None
            raise


def run_engine(engine_path: str | Path, inputs: dict[str, np.ndarray],
               names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The outputs of a TensorRT engine on one batch of inputs (by name), as float32 host arrays (GPU), in the
    engine's order or, given `names`, in theirs (TensorRT does not promise the ONNX order); a non-finite output
    (NaN or inf) is refused."""
    from latency_tables.backends.tensorrt import TrtRunner

    if not torch.cuda.is_available():
        raise DetforgeError("running a TensorRT engine needs a CUDA GPU", path=engine_path)
    runner = TrtRunner(Path(engine_path).read_bytes(), {k: v.shape for k, v in inputs.items()}, meta={},
                       device=torch.device("cuda"), inputs=inputs)
    try:
        outs = runner.outputs()
        if names is not None:
            missing = [n for n in names if n not in runner.output_names]
            if missing:
                raise DetforgeError(f"the engine has no output(s) {missing} (it has {runner.output_names})",
                                    path=engine_path, field="engine")
            outs = [outs[runner.output_names.index(n)] for n in names]
    finally:
        runner.close()
    if not all(np.isfinite(o).all() for o in outs):
        raise DetforgeError("the engine's outputs are not finite (NaN or inf) on the check batch",
                            path=engine_path, field="engine")
    return outs


# An engine against PyTorch: fp16 rounds differently (fp32 engines are built without TF32), by amounts not yet
# measured on a GPU here, so only a gross mismatch (a wrong decode, a dropped layer) is refused; int8 is checked
# for finite outputs only.
ENGINE_TOLERANCE = {"box_atol": 1.0, "box_rtol": 0.02, "score_atol": 0.05}


def verify_engine(det: Detector, engine_path: str | Path, imgsz: int, nms: NmsSpec | None = None,
                  batch: int = 1, seed: int = 0, precision: str = "fp16") -> tuple[float, float | None]:
    """TensorRT engine vs PyTorch on a random batch: max abs diff, and with TensorRT NMS the agreement.

    Decoded exports compare the whole `[B, N, 5 + nc]` output and refuse a non-finite one, or (fp32, fp16)
    one beyond ENGINE_TOLERANCE. EfficientNMS exports compare the detections of the images whose count
    agrees (agreement: the share of such images; near-ties may flip in fp16).
    """
    if nms is not None and nms.op != "trt":
        raise DetforgeError(ENGINE_NEEDS_FIXED_OUTPUTS, path=engine_path, field="engine")
    x = _random_images(det, imgsz, batch, seed)
    outs = run_engine(engine_path, {"images": x.numpy()}, names=None if nms is None else TRT_OUTPUTS)
    model = copy.deepcopy(det).eval().float().cpu()
    with torch.no_grad():
        if nms is None:
            ref = model(x)[0].numpy()
            if precision == "int8":
                return float(np.abs(outs[0] - ref).max()), None
            box, score = check_decoded_close(ref, outs[0], engine_path, field="engine",
                                             what="the engine does not match PyTorch", **ENGINE_TOLERANCE)
            return max(box, score), None
        num, boxes, scores, classes = (t.float().numpy() for t in EfficientNmsOutput(model, nms)(x))
    same = [b for b in range(batch) if int(outs[0][b, 0]) == int(num[b, 0])]
    diffs = []  # nan when no image's count agrees: nothing was compared
    for b in same:
        k = int(num[b, 0])
        ref = np.concatenate([boxes[b, :k], scores[b, :k, None], classes[b, :k, None]], 1)
        got = np.concatenate([outs[1][b, :k], outs[2][b, :k, None], outs[3][b, :k, None]], 1)
        diffs.append(float(np.abs(got - ref).max(initial=0.0)))
    return max(diffs, default=float("nan")), len(same) / batch
