"""Post-training INT8: ONNX Runtime static QDQ quantization with a measured per-layer sensitivity scan; TensorRT.

`quantize_onnx` runs `quant_pre_process`, calibrates once (MinMax / Entropy / Percentile) on real
images, keeps the box decode after the last convs in float, optionally scans which convs hurt the
outputs most when quantized and leaves the worst `sensitivity_scan` of them in float, writes the QDQ
model and checks it in ONNX Runtime against the FP32 model on the calibration images.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from latency_tables.onnx_utils import check_onnx, input_specs, load_onnx_model
from search_spaces.errors import ConfigError, DataError, DetforgeError
from search_spaces.io import atomic_write_bytes

from .export import build_trt_engine, ort_session
from .report import OutputError, StepReport, measure_latency_ms

METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "trt")
# Ops that compute weights/features; everything after the last of them on the way to an output is the decode.
# They are also what the sensitivity scan tries leaving in float.
_FEATURE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


# ------------------------------------------------------------------------------------------- calibration data


class CalibrationImages(Sequence[np.ndarray]):
    """Letterboxed images (float32 [1, 3, imgsz, imgsz], 0..1, pad 114) loaded lazily from files."""

    def __init__(self, paths: Sequence[Path], imgsz: int, skipped: int = 0):
        self.paths = list(paths)
        self.imgsz = imgsz
        self.skipped = skipped  # unreadable files left out of the sample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        from PIL import Image, ImageOps

        from trainer.augment import letterbox
        from trainer.datasets import to_rgb

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(to_rgb(ImageOps.exif_transpose(im)))
        except OSError as e:
            raise DataError(f"cannot read calibration image ({e})", path=path) from None
        img = letterbox(arr, self.imgsz)[0]
        return np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def calibration_images(source: str | Path, imgsz: int, n: int = 256, seed: int = 0) -> CalibrationImages:
    """`n` images (a seeded random sample) from an image directory, an image list file or a data.yaml (train).

    Images are letterboxed to imgsz (pad 114) and scaled to 0..1 as the trainer does; unreadable files
    are skipped (counted in `.skipped`). No images at all is a DataError.
    """
    from trainer.data_config import load_data_config
    from trainer.datasets import list_images

    if n < 1:
        raise ConfigError(f"must be >= 1, got {n}", field="calib")
    src = Path(source)
    if src.suffix in (".yaml", ".yml") or (src.is_dir() and (src / "data.yaml").is_file()):
        src = load_data_config(src).train  # calibrate on training images; val stays for measuring mAP
    paths = list_images(src)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths)) if len(paths) > n else np.arange(len(paths))
    chosen, skipped = [], 0
    for k in order:
        if len(chosen) == n:
            break
        if _readable(paths[k]):
            chosen.append(paths[k])
        else:
            skipped += 1
    if not chosen:
        raise DataError(f"no readable calibration images ({skipped} unreadable)", path=source)
    return CalibrationImages(sorted(chosen), imgsz, skipped)


def _readable(path: Path) -> bool:
    """True if PIL decodes the whole file (verify() alone passes a truncated JPEG, which fails in calibration)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):  # PIL's ways of saying "not an image" / "corrupt"
        return False


class _Images(Sequence[np.ndarray]):
    """Any sequence (or iterable, materialised) of images as checked float32 NCHW arrays."""

    def __init__(self, items: Iterable[Any], shape: tuple[Any, ...]):
        is_seq = isinstance(items, Sequence) and not isinstance(items, (np.ndarray, str, bytes))
        self.items = items if is_seq else list(items)
        self.shape = shape  # the model input dims: (batch, C, H, W); ints or symbols
        if len(self.items) == 0:
            raise DataError("the calibration set is empty: give at least one image (a directory of real "
                            "images, a data.yaml, or arrays)", field="calib")
        self[0]  # fail early on a wrong shape or scale

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        x = self.items[i]
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        want = [d if isinstance(d, int) and d > 0 else None for d in self.shape]
        if x.ndim != 4 or any(w is not None and w != g for w, g in zip(want[1:], x.shape[1:])):
            raise DataError(f"calibration item {i} has shape {list(x.shape)}; the model takes "
                            f"{[w or '?' for w in want]}", field="calib")
        if float(x.max(initial=0.0)) > 1.5:
            raise DataError(f"calibration item {i} has values up to {float(x.max()):.0f}: images must be "
                            "float 0..1 (divide by 255), as the model sees them", field="calib")
        return np.ascontiguousarray(x)


def _reader(images: _Images, input_name: str, start: int = 0, stop: int | None = None):
    """An onnxruntime CalibrationDataReader over `images` (supports set_range for chunked calibration)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i, self.stop = start, len(images) if stop is None else stop

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= self.stop:
                return None
            self.i += 1
            return {input_name: images[self.i - 1]}

        def __len__(self) -> int:
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.i, self.stop = start_index, min(end_index, len(images))

    return Reader()


def _chunk(n: int, most: int = 16) -> int:
    """The largest divisor of n that is <= most: ORT calibrates in chunks of it, so memory stays bounded."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


# ------------------------------------------------------------------------------------------- graph helpers


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the last convs and the outputs (the box decode), walking back from outputs."""
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: dict[str, onnx.NodeProto] = {}
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.op_type in _FEATURE_OPS or node.name in tail:
            continue
        tail[node.name] = node
        if node.op_type not in ("Shape", "Size"):  # these read only the shape of their input, not its values
            stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name in tail]


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (nodes_to_exclude works by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def float_tail_ok(qdq: onnx.ModelProto, tail: Sequence[str]) -> bool:
    """True if no decode-tail node of the quantized graph feeds a QuantizeLinear (the decode stays float)."""
    names = set(tail)
    produced = {out for n in qdq.graph.node if n.name in names for out in n.output}
    return not any(n.op_type == "QuantizeLinear" and n.input[0] in produced for n in qdq.graph.node)


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a model has."""
    ops = [n.op_type for n in model.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


# ------------------------------------------------------------------------------------------- reports


@dataclass
class ScanEntry:
    """One candidate of the sensitivity scan: the output error with only this node left in float."""

    node: str
    op_type: str
    error: float
    gain: float  # error with everything quantized minus this error: how much keeping it float helps


@dataclass
class QuantReport:
    """What quantize_onnx wrote and measured."""

    path: str
    fp32_path: str
    method: str
    target: str
    per_channel: bool
    activation_type: str
    weight_type: str
    reduce_range: bool
    calib_images: int
    excluded_tail: list[str]
    excluded_user: list[str]
    excluded_sensitive: list[str]
    qdq_nodes: dict[str, int]
    tail_float: bool
    error: dict[str, float]  # OutputError vs FP32 on the calibration images
    scan_base_error: float | None = None
    scan: list[ScanEntry] = field(default_factory=list)
    latency_ms_fp32: float | None = None
    latency_ms_int8: float | None = None
    step: StepReport | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step"] = self.step.to_dict() if self.step is not None else None
        return d


# ------------------------------------------------------------------------------------------- quantization


def _settings(target: str, activation_type: str | None, reduce_range: bool | None) -> dict[str, Any]:
    """quantize_static arguments for a target: CPU = U8S8 (ORT's fast x86/ARM kernels); TRT = symmetric S8S8."""
    from onnxruntime.quantization import QuantType

    if target not in TARGETS:
        raise ConfigError(f"unknown target '{target}' (known: {', '.join(TARGETS)})", field="target")
    act = activation_type or ("quint8" if target == "cpu" else "qint8")
    types = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    if act not in types:
        raise ConfigError(f"unknown activation type '{act}' (known: quint8, qint8)", field="activation_type")
    if target == "trt" and act != "qint8":
        raise ConfigError("TensorRT needs symmetric int8 activations (activation_type='qint8')",
                          field="activation_type")
    extra: dict[str, Any] = {"WeightSymmetric": True}
    if target == "trt":
        # TensorRT only takes zero-point-0 int8 and keeps its own activation fusions; its parser refuses a
        # DequantizeLinear of int32 (ORT's quantized conv bias), and it quantizes biases itself
        extra.update(ActivationSymmetric=True, QDQKeepRemovableActivations=True, QuantizeBias=False)
    return {"activation_type": types[act], "weight_type": QuantType.QInt8, "reduce_range": bool(reduce_range),
            "extra_options": extra, "_act": act}


def _preprocess(src: Path, dst: Path) -> None:
    """quant_pre_process (ONNX shape inference + ORT basic optimisation), then name every node."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ORT's symbolic shape inference (meant for transformers) gives up on the decode's dynamic reshapes;
    # ONNX's own shape inference covers a CNN completely.
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    model = onnx.load(str(dst))
    _name_nodes(model)
    onnx.save(model, str(dst))


class _Quantizer:
    """quantize_static with one calibration shared by every call (ORT's calibration cache)."""

    def __init__(self, pre: Path, images: _Images, input_name: str, method: str, per_channel: bool,
                 settings: dict[str, Any], workdir: Path):
        from onnxruntime.quantization import CalibrationMethod

        self.pre, self.images, self.input_name = pre, images, input_name
        self.method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[method]
        self.per_channel = per_channel
        self.settings = {k: v for k, v in settings.items() if not k.startswith("_")}
        self.cache = workdir / "calibration.json"
        self.workdir = workdir

    def __call__(self, out: Path, exclude: Sequence[str]) -> None:
        from onnxruntime.quantization import QuantFormat, quantize_static

        extra = dict(self.settings["extra_options"], CalibStridedMinMax=_chunk(len(self.images)))
        kwargs = dict(self.settings, extra_options=extra)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # ORT logs a warning per skipped node; the report says what matters
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints progress
                quantize_static(str(self.pre), str(out), _reader(self.images, self.input_name),
                                quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
                                nodes_to_exclude=list(exclude), calibrate_method=self.method,
                                calibration_cache_path=str(self.cache), **kwargs)
        finally:
            quiet.setLevel(level)


def _output_error(ref_sess: Any, sess: Any, images: Sequence[np.ndarray], name: str, imgsz: int,
                  refs: list[np.ndarray] | None = None) -> OutputError:
    """OutputError of `sess` against the FP32 session (or cached FP32 outputs) over `images`."""
    err = OutputError(imgsz)
    for i in range(len(images)):
        x = images[i]
        ref = refs[i] if refs is not None else ref_sess.run(None, {name: x})[0]
        err.add(ref, sess.run(None, {name: x})[0])
    return err


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: Iterable[Any],
    *,
    method: str = "entropy",
    per_channel: bool = True,
    target: str = "cpu",
    activation_type: str | None = None,
    reduce_range: bool | None = None,
    exclude: Sequence[str] | None = None,
    sensitivity_scan: int = 0,
    scan_images: int = 8,
    scan_candidates: Sequence[str] | None = None,
    keep_tail_float: bool = True,
    measure_latency: bool = False,
    evaluate: Callable[[Path], float] | None = None,
) -> QuantReport:
    """Quantize an FP32 ONNX model to INT8 QDQ at `out_path`, calibrated on `calib` (float32 NCHW images, 0..1).

    `target='cpu'`: uint8 activations, int8 per-channel weights (ORT's x86/ARM kernels); `'trt'`:
    symmetric int8 everywhere (what TensorRT's explicit quantization takes). `sensitivity_scan=k` quantizes
    once per candidate conv with that conv left in float, measures the output error on `scan_images`
    calibration images and leaves the k that help most in float. `evaluate(onnx_path) -> mAP` is
    optional and fills the report's mAP before/after.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})", field="method")
    if sensitivity_scan < 0 or scan_images < 1:
        raise ConfigError("sensitivity_scan must be >= 0 and scan_images >= 1", field="sensitivity_scan")
    settings = _settings(target, activation_type, reduce_range)
    model = check_onnx(fp32_path)
    specs = input_specs(model)
    if len(specs) != 1:
        raise DetforgeError(f"expected a model with one image input, got {len(specs)}", path=fp32_path)
    input_name, dims, _ = specs[0]
    images = _Images(calib, tuple(dims))
    imgsz = int(images[0].shape[-1])

    with tempfile.TemporaryDirectory(prefix="detforge-quant-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        _preprocess(fp32_path, pre)
        pre_model = onnx.load(str(pre))
        tail = decode_tail(pre_model) if keep_tail_float else []
        known = {n.name for n in pre_model.graph.node}
        user = list(exclude or [])
        missing = [n for n in user if n not in known]
        if missing:
            raise ConfigError(f"no node named {missing[0]!r} in the (pre-processed) model", path=fp32_path,
                              field="exclude")
        quantize = _Quantizer(pre, images, input_name, method, per_channel, settings, work)
        base = list(dict.fromkeys(tail + user))
        ref_sess = ort_session(fp32_path)

        scan: list[ScanEntry] = []
        base_err = None
        sensitive: list[str] = []
        if sensitivity_scan:
            base_err, scan = _scan(quantize, pre_model, base, scan_candidates, ref_sess, images, input_name, imgsz,
                                   scan_images, work)
            sensitive = [e.node for e in scan if e.gain > 0][:sensitivity_scan]

        qpath = work / "model.int8.onnx"
        quantize(qpath, base + sensitive)
        qmodel = check_onnx(qpath)
        sess = ort_session(qpath)  # it must load and run in ONNX Runtime
        err = _output_error(ref_sess, sess, images, input_name, imgsz)
        atomic_write_bytes(out_path, qpath.read_bytes())

    report = QuantReport(
        path=str(out_path), fp32_path=str(fp32_path), method=method, target=target, per_channel=per_channel,
        activation_type=settings["_act"], weight_type="qint8", reduce_range=settings["reduce_range"],
        calib_images=len(images), excluded_tail=tail, excluded_user=user,
        excluded_sensitive=sensitive, qdq_nodes=qdq_counts(qmodel), tail_float=float_tail_ok(qmodel, tail),
        error=err.to_dict(), scan_base_error=base_err, scan=scan)
    step = StepReport("quantize", imgsz=imgsz)
    step.params_before = step.params_after = _weights(model)
    step.changes.append(f"INT8 QDQ ({method} calibration on {len(images)} images, {settings['_act']} activations, "
                        f"{'per-channel' if per_channel else 'per-tensor'} int8 weights)")
    if tail:
        step.changes.append(f"kept the {len(tail)}-node box decode in float")
    if sensitive:
        step.changes.append(f"kept {len(sensitive)} most sensitive nodes in float: {', '.join(sensitive)}")
    if measure_latency:
        report.latency_ms_fp32, report.latency_ms_int8 = measure_latency_ms([fp32_path, out_path], imgsz)
        step.latency_ms_before, step.latency_ms_after = report.latency_ms_fp32, report.latency_ms_int8
    if evaluate is not None:
        step.map_before, step.map_after = float(evaluate(fp32_path)), float(evaluate(out_path))
    step.details = {"output_error": report.error}
    report.step = step
    return report


def _scan(quantize: _Quantizer, pre_model: onnx.ModelProto, base: list[str], candidates: Sequence[str] | None,
          ref_sess: Any, images: _Images, input_name: str, imgsz: int, scan_images: int,
          work: Path) -> tuple[float, list[ScanEntry]]:
    """Leave-one-out: the output error with each candidate node kept in float, sorted by how much it helps."""
    ops = {n.name: n.op_type for n in pre_model.graph.node}
    if candidates is None:
        candidates = [n for n, op in ops.items() if op in _FEATURE_OPS and n not in base]
    else:
        unknown = [c for c in candidates if c not in ops]
        if unknown:
            raise ConfigError(f"no node named {unknown[0]!r} in the (pre-processed) model", field="scan_candidates")
    step = max(1, len(images) // scan_images)
    sample = [images[i] for i in range(0, len(images), step)][:scan_images]
    refs = [ref_sess.run(None, {input_name: x})[0] for x in sample]
    path = work / "scan.onnx"

    def error(exclude: list[str]) -> float:
        quantize(path, exclude)
        return _output_error(None, ort_session(path), sample, input_name, imgsz, refs).metric

    base_err = error(base)
    entries = []
    for name in candidates:
        e = error(base + [name])
        entries.append(ScanEntry(name, ops[name], round(e, 6), round(base_err - e, 6)))
    entries.sort(key=lambda e: -e.gain)
    return round(base_err, 6), entries


def _weights(model: onnx.ModelProto) -> int:
    """Number of weight values (initializer elements) of a model."""
    return int(sum(math.prod(t.dims) for t in model.graph.initializer))


# ------------------------------------------------------------------------------------------- TensorRT


def build_trt_int8_engine(qdq_onnx: str | Path, engine_path: str | Path, *, max_batch: int = 1,
                          workspace_gb: float = 4.0) -> Path:
    """Build a TensorRT engine from a QDQ model (explicit quantization: the Q/DQ scales are used, no calibrator).

    Needs an NVIDIA GPU and the `tensorrt` Python package; quantize with `target='trt'` (symmetric int8).
    Layers left in float run in FP16 on TensorRT 10 (weak typing); TensorRT 11 builds strongly typed, so they
    keep the graph's FP32 there. A dynamic batch accepts 1..`max_batch`, tuned for `max_batch`.
    """
    qdq_onnx = Path(qdq_onnx)
    model = load_onnx_model(qdq_onnx)
    zero_points = _activation_zero_point_types(model)
    if not zero_points:
        raise DetforgeError("no QuantizeLinear nodes: quantize the model first (quantize_onnx target='trt')",
                            path=qdq_onnx)
    if onnx.TensorProto.UINT8 in zero_points:
        raise DetforgeError("uint8 activations: TensorRT takes symmetric int8 only; quantize with target='trt'",
                            path=qdq_onnx)
    int32 = int32_dequantized(model)
    if int32:
        raise DetforgeError(f"{len(int32)} DequantizeLinear node(s) of int32 (quantized biases, e.g. {int32[0]!r}): "
                            "TensorRT's parser refuses them; quantize with target='trt'", path=qdq_onnx)
    return build_trt_engine(qdq_onnx, engine_path, precision="int8", max_batch=max_batch,
                            workspace_gb=workspace_gb)


def verify_trt_int8_engine(qdq_onnx: str | Path, engine_path: str | Path, images: Sequence[np.ndarray]) -> float:
    """An int8 engine against ONNX Runtime on the QDQ model it was built from, on real images: the worst max abs
    diff; non-finite outputs and a gross mismatch (ENGINE_TOLERANCE: a wrong scale, a dropped layer) are refused."""
    from .export import ENGINE_TOLERANCE, check_decoded_close, run_engine

    if not images:
        raise DetforgeError("no images to check the engine on", path=engine_path, field="engine")
    sess = ort_session(qdq_onnx)
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    worst = 0.0
    for x in images:
        got = run_engine(engine_path, {name: x}, names=[out])[0]  # by name: the engine's order is its own
        box, score = check_decoded_close(sess.run(None, {name: x})[0], got, engine_path, field="engine",
                                         what="the int8 engine does not match ONNX Runtime on its QDQ model",
                                         **ENGINE_TOLERANCE)
        worst = max(worst, box, score)
    return worst


def int32_dequantized(model: onnx.ModelProto) -> list[str]:
    """Names of the DequantizeLinear nodes whose input is an int32 initializer (quantized biases)."""
    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]


def _activation_zero_point_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the zero points of QuantizeLinear nodes (uint8 = asymmetric activations)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    types = set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            t = inits.get(n.input[2], consts.get(n.input[2]))
            if t is not None:
                types.add(t)
    return types


__all__ = [
    "METHODS",
    "TARGETS",
    "CalibrationImages",
    "QuantReport",
    "ScanEntry",
    "build_trt_int8_engine",
    "calibration_images",
    "decode_tail",
    "float_tail_ok",
    "qdq_counts",
    "quantize_onnx",
    "verify_trt_int8_engine",
]
