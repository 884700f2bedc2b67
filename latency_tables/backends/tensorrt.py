"""TensorRT backend: build an engine from ONNX with the tensorrt Python API, run it with execute_async_v3."""
# `tensorrt` is imported lazily, so this module imports anywhere; using it needs an NVIDIA GPU, torch with
# CUDA (device buffers, stream and events) and `pip install 'detforge[tensorrt]'`.
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_write_bytes

from ..measurement import MeasurementConfig
from ..onnx_utils import (
    DEFAULT_OPSET,
    OnnxSource,
    input_specs,
    is_quantized,
    load_onnx_bytes,
    normalize_shapes,
    resolve_shapes,
    to_fp16,
)
from .base import Backend, InputShape, ModelSource, Runner, check_choice, onnx_graph

PRECISIONS = ("fp32", "fp16", "int8")
_LOGGER: Any = None


def import_tensorrt() -> Any:
    """The tensorrt module, or a DetforgeError saying what is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise DetforgeError(f"TensorRT is not available here ({e}); it needs an NVIDIA GPU and "
                            "`pip install 'detforge[tensorrt]'` (tensorrt >= 10)", field="backend") from None
    return tensorrt


def _logger(trt: Any) -> Any:
    """One process-wide TensorRT logger (TensorRT expects a single one), warnings and errors only."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
        # the plugin registry (EfficientNMS_TRT of `--nms-op trt` exports) is filled only on request
        trt.init_libnvinfer_plugins(_LOGGER, "")
    return _LOGGER


def _torch_dtype(trt: Any, dt: Any) -> Any:
    """torch dtype of a TensorRT DataType (names looked up, as the enum grows between versions)."""
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, tdt in table.items():
        if getattr(trt.DataType, name, None) == dt:
            return tdt
    raise DetforgeError(f"TensorRT I/O tensor type {dt} has no torch equivalent here", field="model")


# Bumped whenever build_engine changes what it builds (2: fp32 without TF32), to key the engine cache.
ENGINE_RECIPE = 2


def build_engine(onnx_model: OnnxSource, *, shapes: Mapping[str, Sequence[int]], precision: str = "fp16",
                 workspace_gb: float = 4.0, min_batch: int | None = None) -> bytes:
    """Build a serialized TensorRT engine for the input `shapes` (full shapes, batch first, tuned for them).

    With `min_batch`, a dynamic-batch input also accepts batches from `min_batch` up to the shapes' batch.
    """
    # fp16: the FP16 builder flag on TensorRT 10 (weak typing); TensorRT 11+ has no precision flags, so the
    # graph is converted to fp16 first and built strongly typed. int8: explicit quantization only, i.e. the
    # ONNX must already hold Q/DQ nodes (compress.quantize); no calibrator is used.
    trt = import_tensorrt()
    check_choice(precision, PRECISIONS, "precision")
    data = load_onnx_bytes(onnx_model)
    weak_typing = hasattr(trt.BuilderFlag, "FP16")
    if precision == "int8" and not is_quantized(data):
        raise DetforgeError("TensorRT int8 needs an ONNX model with Q/DQ nodes (explicit quantization); "
                            "this one has none", field="precision")
    if precision == "fp16" and not weak_typing:
        data = to_fp16(data, keep_io_types=True)

    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch became the only mode in TensorRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise DetforgeError(f"TensorRT cannot parse the ONNX model: {errors}", field="model")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if weak_typing and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 too: layers outside Q/DQ pairs then run in fp16
    if weak_typing and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: an "fp32" engine would time TF32 tensor cores

    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    missing = [t.name for t in net_inputs if t.name not in shapes]
    if missing:
        raise DetforgeError(f"no shape given for TensorRT input(s) {missing}", field="input_shape")
    if any(d < 0 for t in net_inputs for d in t.shape):
        # opt = max: the engine is tuned for the shape it is timed (or deployed) at; min = max unless asked
        profile = builder.create_optimization_profile()
        for t in net_inputs:
            s = tuple(int(d) for d in shapes[t.name])
            lo = (min_batch, *s[1:]) if min_batch is not None and t.shape[0] < 0 else s
            profile.set_shape(t.name, lo, s, s)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DetforgeError("TensorRT failed to build an engine (see its log above)", field="model")
    return bytes(serialized)


class TrtRunner(Runner):
    """A deserialized engine with torch CUDA buffers bound by address, run on its own CUDA stream."""

    def __init__(self, engine_bytes: bytes, shapes: Mapping[str, tuple[int, ...]], meta: dict[str, Any],
                 device: Any, inputs: Mapping[str, np.ndarray] | None = None):
        import torch

        trt = import_tensorrt()
        self.meta = meta
        self.device = torch.device(device)
        # TensorRT binds an engine and its context to the CUDA device current when they are made and run
        with torch.cuda.device(self.device):
            self._bind(trt, engine_bytes, shapes, inputs)

    def _bind(self, trt: Any, engine_bytes: bytes, shapes: Mapping[str, tuple[int, ...]],
              inputs: Mapping[str, np.ndarray] | None) -> None:
        """Deserialize the engine, set the input shapes and bind device buffers (the device made current)."""
        import torch

        device = self.device
        self._runtime = trt.Runtime(_logger(trt))  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise DetforgeError("TensorRT could not deserialize the engine (built by another version/GPU?)",
                                field="model")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: dict[str, Any] = {}
        self.output_names: list[str] = []
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        gen = torch.Generator().manual_seed(0)
        for n in (n for n in names if is_input[n]):
            shape = tuple(shapes[n])
            if not self.context.set_input_shape(n, shape):  # outside the engine's profile: it would run another
                raise DetforgeError(f"input {n!r} shape {list(shape)} is outside the engine's optimisation "
                                    "profile", field="input_shape")
            dt = _torch_dtype(trt, self.engine.get_tensor_dtype(n))
            if inputs is not None:
                t = torch.as_tensor(np.asarray(inputs[n])).to(dt)
            elif dt.is_floating_point:
                t = torch.randn(shape, generator=gen).to(dt)
            else:
                t = torch.zeros(shape, dtype=dt)
            self.buffers[n] = t.to(device).contiguous()
        for n in (n for n in names if not is_input[n]):  # output shapes are known once all inputs are set
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise DetforgeError(f"output {n!r} has a data-dependent shape {shape}; not supported",
                                    field="model")
            self.buffers[n] = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(n)),
                                          device=device)
            self.output_names.append(n)
        for n, t in self.buffers.items():
            self.context.set_tensor_address(n, t.data_ptr())
        torch.cuda.synchronize(device)  # inputs were written on the default stream; ours must see them
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def _enqueue(self) -> None:
        """Queue one inference on the runner's stream (its device current)."""
        import torch

        with torch.cuda.device(self.device):
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        if not ok:
            raise DetforgeError("TensorRT execute_async_v3 failed (see its log above)", field="model")

    def __call__(self) -> None:
        """One inference, waited for."""
        self._enqueue()
        self.stream.synchronize()

    def time_once_ms(self) -> float:
        """GPU time of one inference between CUDA events on the runner's stream."""
        self._start.record(self.stream)
        self._enqueue()
        self._end.record(self.stream)
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))

    def outputs(self) -> list[np.ndarray]:
        """Run once and return the outputs as float32 host arrays, in engine order."""
        self()
        return [self.buffers[n].float().cpu().numpy() for n in self.output_names]

    def close(self) -> None:
        """Free the context, engine and device buffers (context first: it refers to the engine)."""
        self.context = None
        self.engine = None
        self.buffers = {}


class TensorRTBackend(Backend):
    """TensorRT through its Python API: fp32/fp16 from any ONNX or nn.Module, int8 from a Q/DQ ONNX."""

    def __init__(self, precision: str = "fp16", *, device_id: int = 0, workspace_gb: float = 4.0,
                 engine_cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                 config: MeasurementConfig | None = None):
        super().__init__(config)
        self.precision = check_choice(precision, PRECISIONS, "precision")
        self.trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise DetforgeError("TensorRT needs a CUDA GPU; torch.cuda.is_available() is False here",
                                field="backend")
        self.device = torch.device("cuda", device_id)
        self.threads = None  # the GPU does the work; CPU threads do not change the timing
        self.workspace_gb = workspace_gb
        self.engine_cache_dir = None if engine_cache_dir is None else Path(engine_cache_dir)
        self.opset = opset
        self.name = "tensorrt"

    def engine(self, model: ModelSource, input_shape: InputShape | None, batch: int
               ) -> tuple[bytes, dict[str, tuple[int, ...]]]:
        """(serialized engine, full input shapes by name) for `model`, from the cache when possible."""
        import torch

        data = onnx_graph(model, input_shape, batch, opset=self.opset, precision=self.precision)
        specs = input_specs(data)
        per_sample = resolve_shapes([d for _, d, _ in specs],
                                    None if input_shape is None else normalize_shapes(input_shape), batch)
        shapes = {n: (batch, *s) for (n, _, _), s in zip(specs, per_sample)}

        cache = None
        if self.engine_cache_dir is not None:
            # An engine is only valid for the TensorRT version and GPU that built it: both are in the key, and
            # so is how build_engine builds (ENGINE_RECIPE), so an engine of an older recipe is not reused.
            key = hashlib.sha256(data)
            key.update(repr((self.precision, sorted(shapes.items()), self.trt.__version__, self.workspace_gb,
                             torch.cuda.get_device_name(self.device), ENGINE_RECIPE)).encode())
            cache = self.engine_cache_dir / f"{key.hexdigest()[:32]}.engine"
            if cache.is_file():
                return cache.read_bytes(), shapes
        with torch.cuda.device(self.device):  # the builder tunes for (and binds to) the current device
            engine = build_engine(data, shapes=shapes, precision=self.precision, workspace_gb=self.workspace_gb)
        if cache is not None:
            atomic_write_bytes(cache, engine)
        return engine, shapes

    def prepare(self, model: ModelSource, input_shape: InputShape | None = None, batch: int = 1, *,
                inputs: Sequence[np.ndarray] | None = None) -> TrtRunner:
        """Build (or load) the engine and bind device buffers for `batch`."""
        if batch < 1:
            raise DetforgeError(f"batch must be >= 1, got {batch}", field="batch")
        engine, shapes = self.engine(model, input_shape, batch)
        feeds = None
        if inputs is not None:
            if len(inputs) != len(shapes):
                raise DetforgeError(f"{len(inputs)} input array(s) for {len(shapes)} input(s)", field="inputs")
            feeds = dict(zip(shapes, inputs))
            for n, a in feeds.items():
                if tuple(np.shape(a)) != shapes[n]:
                    raise DetforgeError(f"input {n!r} has shape {list(np.shape(a))}, expected {list(shapes[n])}",
                                        field="inputs")
        meta = self._meta([s[1:] for s in shapes.values()], batch)
        return TrtRunner(engine, shapes, meta, self.device, feeds)
