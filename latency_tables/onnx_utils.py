"""ONNX helpers for the backends: export an nn.Module (opset 17, dynamic batch), load, check, inspect, convert."""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_write_bytes

if TYPE_CHECKING:  # onnx is imported where it is used: it costs every CLI command a second to load (ml_dtypes)
    import onnx
    import torch

OnnxSource: TypeAlias = "bytes | str | Path | onnx.ModelProto"
Shape = tuple[int, ...]

DEFAULT_OPSET = 17
# Operators that only appear in an already-quantized graph (QDQ or QOperator form).
QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
})


def is_torch_module(obj: object) -> bool:
    """True for an nn.Module, without importing torch when nobody else has (ONNX-only probes lack it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_model_proto(obj: object) -> bool:
    """True for an onnx.ModelProto, without importing onnx when nobody else has (none can exist before)."""
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(obj, onnx.ModelProto)


def normalize_shapes(input_shape: Sequence[int] | Sequence[Sequence[int]]) -> tuple[Shape, ...]:
    """One per-sample shape (C, H, W) or a list of them -> a tuple of shapes; sizes must be positive ints."""
    if input_shape is None or len(input_shape) == 0:
        raise DetforgeError("input_shape is empty: give the per-sample shape, e.g. (3, 640, 640)",
                            field="input_shape")
    shapes = [input_shape] if all(isinstance(d, int) for d in input_shape) else list(input_shape)
    out = []
    for s in shapes:
        if isinstance(s, int) or not all(isinstance(d, int) and d > 0 for d in s):
            raise DetforgeError(f"shape {s!r} must be a sequence of positive ints (without the batch)",
                                field="input_shape")
        out.append(tuple(int(d) for d in s))
    return tuple(out)


def shapes_meta(shapes: Sequence[Shape]) -> list:
    """The JSON form stored in Measurement.input_shape: one list, or a list of lists for several inputs."""
    return list(shapes[0]) if len(shapes) == 1 else [list(s) for s in shapes]


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors of a nested output (tuple/list/dict), in the order torch.onnx.export flattens them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flatten_tensors(o)]
    if isinstance(obj, dict):
        return [t for k in obj for t in flatten_tensors(obj[k])]
    return []


def _io_names(prefix: str, n: int) -> list[str]:
    """`input`/`output` for one tensor, `input0`, `input1`, ... for several."""
    return [prefix] if n == 1 else [f"{prefix}{i}" for i in range(n)]


def export_onnx(
    model: torch.nn.Module,
    input_shape: Sequence[int] | Sequence[Sequence[int]],
    *,
    batch: int = 1,
    path: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    check: bool = True,
    output_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> bytes:
    """Export `model` (eval mode, its own device and dtype) to checked ONNX bytes; optionally write `path`."""
    # The TorchScript exporter (dynamo=False) at `opset`; dim 0 of every input and of every output that
    # carries the batch is named `batch` and left dynamic. Every module's train/eval mode is restored after.
    import torch

    from search_spaces.modes import temporary_mode

    if not is_torch_module(model):
        raise DetforgeError(f"export_onnx needs an nn.Module, got {type(model).__name__}", field="model")
    if batch < 1:
        raise DetforgeError(f"batch must be >= 1, got {batch}", field="batch")
    shapes = normalize_shapes(input_shape)
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    dummy = tuple(torch.randn((batch, *s), generator=gen).to(device=device, dtype=dtype) for s in shapes)
    in_names = list(input_names) if input_names else _io_names("input", len(shapes))
    if len(in_names) != len(shapes):
        raise DetforgeError(f"{len(in_names)} input names for {len(shapes)} inputs", field="input_names")

    with temporary_mode(model), torch.no_grad():
        outs = flatten_tensors(model(*dummy))
        out_names = list(output_names) if output_names else _io_names("output", len(outs))
        if len(out_names) != len(outs):
            raise DetforgeError(f"{len(out_names)} output names for {len(outs)} outputs",
                                field="output_names")
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {n: {0: "batch"} for n in in_names}
            dynamic_axes.update({n: {0: "batch"} for n, t in zip(out_names, outs)
                                 if t.dim() >= 1 and t.shape[0] == batch and n not in (output_axes or {})})
        if output_axes:  # outputs whose dynamic dims are not the batch (a detection count)
            dynamic_axes = {**(dynamic_axes or {}), **{k: dict(v) for k, v in output_axes.items()}}
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # dynamo=False is the documented choice for this project; its deprecation notice is noise here.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            torch.onnx.export(model, dummy, buf, opset_version=opset, dynamo=False,
                              do_constant_folding=True, input_names=in_names, output_names=out_names,
                              dynamic_axes=dynamic_axes)
    data = buf.getvalue()
    if check:
        check_onnx(data)
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def load_onnx_bytes(src: OnnxSource) -> bytes:
    """Serialized ONNX from bytes, a file path or a ModelProto."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    if is_model_proto(src):
        return src.SerializeToString()
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise DetforgeError("ONNX file not found", path=p)
        return p.read_bytes()
    raise DetforgeError(f"expected ONNX bytes, a path or a ModelProto, got {type(src).__name__}", field="model")


def load_onnx_model(src: OnnxSource) -> onnx.ModelProto:
    """Parse an ONNX model; a file that is not ONNX is a DetforgeError naming it."""
    import onnx
    from google.protobuf.message import Error as ProtobufError

    if isinstance(src, onnx.ModelProto):
        return src
    data = load_onnx_bytes(src)
    try:
        return onnx.load_from_string(data)
    except (ProtobufError, ValueError) as e:
        where = src if isinstance(src, (str, Path)) else None
        raise DetforgeError(f"not a valid ONNX model ({e})", path=where) from None


def source_name(src: OnnxSource, path: str | Path | None = None) -> str | Path | None:
    """The file an error about `src` names: `path` (where bytes are meant to go), else `src` where it is a file."""
    return path if path is not None else (src if isinstance(src, (str, Path)) else None)


def check_onnx(src: OnnxSource, *, full_check: bool = True, path: str | Path | None = None) -> onnx.ModelProto:
    """Run onnx.checker (with shape inference when full_check) and return the parsed model.

    An error names `path` (the file bytes are meant for), else `src` where it is a file.
    """
    import onnx

    model = load_onnx_model(src)
    # the checker takes bytes (or a file) as they are; a ModelProto it serializes again (seconds for large models)
    raw = src if isinstance(src, bytes) else str(src) if isinstance(src, (str, Path)) else model
    try:
        onnx.checker.check_model(raw, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise DetforgeError(f"ONNX model fails onnx.checker: {str(e).splitlines()[0]}",
                            path=source_name(src, path)) from None
    return model


def is_quantized(src: OnnxSource) -> bool:
    """True if the graph (or a subgraph function) already holds quantization operators (QDQ/QOperator)."""
    model = load_onnx_model(src)
    ops = {n.op_type for n in model.graph.node}
    ops |= {n.op_type for f in model.functions for n in f.node}
    return bool(ops & QUANT_OPS)


def input_specs(src: OnnxSource) -> list[tuple[str, list[int | str | None], int]]:
    """(name, dims, onnx elem_type) of each real graph input; a dim is an int, a symbol or None."""
    model = load_onnx_model(src)
    initializers = {i.name for i in model.graph.initializer}  # old exporters list weights as inputs too
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        t = inp.type.tensor_type
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        specs.append((inp.name, dims, int(t.elem_type)))
    return specs


def resolve_shapes(dims: Sequence[Sequence[int | str | None]],
                   input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
                   batch: int) -> tuple[Shape, ...]:
    """Per-sample shapes for graph inputs `dims`: `input_shape` checked against them, or read from them."""
    if input_shape is None:
        shapes = []
        for d in dims:
            rest = d[1:]
            if not all(isinstance(x, int) and x > 0 for x in rest):
                raise DetforgeError(f"the model's input has dynamic dims {list(d)}: give input_shape",
                                    field="input_shape")
            if d and isinstance(d[0], int) and d[0] > 0 and d[0] != batch:
                raise DetforgeError(f"the model's input {list(d)} has a fixed batch of {d[0]}, not {batch}",
                                    field="batch")
            shapes.append(tuple(int(x) for x in rest))
        return tuple(shapes)
    shapes_t = normalize_shapes(input_shape)
    if len(shapes_t) != len(dims):
        raise DetforgeError(f"the model has {len(dims)} input(s), input_shape gives {len(shapes_t)}",
                            field="input_shape")
    for s, d in zip(shapes_t, dims):
        full = (batch, *s)
        if len(full) != len(d) or any(isinstance(x, int) and x > 0 and x != y for x, y in zip(d, full)):
            raise DetforgeError(f"input shape {list(full)} (batch first) does not fit the model's input "
                                f"{list(d)}", field="input_shape")
    return shapes_t


def to_fp16(src: OnnxSource, *, keep_io_types: bool = False) -> bytes:
    """Convert float32 weights and activations to float16 with onnxruntime's converter."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = copy.deepcopy(load_onnx_model(src))
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints per-node notes
        half = convert_float_to_float16(model, keep_io_types=keep_io_types)
    return half.SerializeToString()
