"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.errors import DetforgeError

from ..measurement import MeasurementConfig
from ..onnx_utils import (
    DEFAULT_OPSET,
    input_specs,
    normalize_shapes,
    resolve_shapes,
    to_fp16,
)
from .base import (
    Backend,
    InputShape,
    ModelSource,
    Runner,
    check_choice,
    check_threads,
    onnx_graph,
    random_inputs,
)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
PRECISIONS = ("fp32", "fp16", "int8")
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _ort():
    """Import onnxruntime, turning its absence into a clear error."""
    try:
        import onnxruntime
    except ImportError:
        raise DetforgeError("onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)",
                            field="backend") from None
    return onnxruntime


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises (its pybind classes derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (RuntimeError, ValueError, *(getattr(state, n) for n in names if hasattr(state, n)))


def coerce_inputs(inputs: Sequence[np.ndarray], names: Sequence[str], dtypes: Sequence[np.dtype],
                  shapes: Sequence[tuple[int, ...]], batch: int) -> list[np.ndarray]:
    """Caller-supplied inputs, checked against the expected count and shapes and cast to the model's dtypes."""
    if len(inputs) != len(names):
        raise DetforgeError(f"{len(inputs)} input array(s) for a model with {len(names)} input(s)",
                            field="inputs")
    out = []
    for arr, name, dt, s in zip(inputs, names, dtypes, shapes):
        a = np.ascontiguousarray(np.asarray(arr), dtype=dt)
        if a.shape != (batch, *s):
            raise DetforgeError(f"input {name!r} has shape {list(a.shape)}, expected {[batch, *s]}",
                                field="inputs")
        out.append(a)
    return out


class OrtRunner(Runner):
    """An ONNX Runtime session with fixed inputs; on GPU providers inputs stay on the device (IO binding)."""

    def __init__(self, session: Any, feeds: dict[str, np.ndarray], meta: dict[str, Any],
                 device: str = "cpu", device_id: int = 0):
        self.session = session
        self.feeds = feeds
        self.meta = meta
        self._binding = None
        self._device_values: list[Any] = []
        if device == "cuda":
            ort = _ort()
            # Copy inputs to the GPU once, so the timed run measures the model and not PCIe transfers.
            binding = session.io_binding()
            for name, arr in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", device_id)
                self._device_values.append(value)  # the binding does not keep the OrtValue alive
                binding.bind_ortvalue_input(name, value)
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", device_id)
            self._binding = binding

    def __call__(self) -> None:
        """One session run (synchronised on GPU, so wall-clock timing is the real latency)."""
        if self._binding is None:
            self.session.run(None, self.feeds)
        else:
            self.session.run_with_iobinding(self._binding)
            self._binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """Run once and return host copies of the outputs."""
        if self._binding is None:
            return list(self.session.run(None, self.feeds))
        self()
        return list(self._binding.copy_outputs_to_cpu())

    def close(self) -> None:
        """Drop the session and device buffers."""
        self._binding = None
        self._device_values.clear()
        self.session = None


class OrtBackend(Backend):
    """ONNX Runtime with the reference session settings on the 'cpu', 'cuda' or 'trt' provider."""

    # precision: 'fp32'; 'fp16' (a converted graph on cpu/cuda, trt_fp16_enable on trt); 'int8' needs an
    # ONNX that is already quantized (QDQ, from compress.quantize). 'trt' falls back to CUDA per node.
    # A session's intra-op workers spin after every run: timed round-robin, the sessions fight over the cores
    # (on 2 vCPUs every model measured ~1.8x slower than alone, docs/latency.md), so one session at a time.
    interleaves = False

    def __init__(self, providers: str = "cpu", threads: int | None = 2, precision: str = "fp32", *,
                 device_id: int = 0, trt_cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                 config: MeasurementConfig | None = None):
        super().__init__(config)
        self.providers = check_choice(providers, tuple(PROVIDERS), "providers")
        self.threads = check_threads(threads)
        self.precision = check_choice(precision, PRECISIONS, "precision")
        self.device_id = device_id
        self.trt_cache_dir = None if trt_cache_dir is None else Path(trt_cache_dir)
        self.opset = opset
        self.name = f"ort-{providers}"
        ort = _ort()
        ep = PROVIDERS[providers]
        if ep not in ort.get_available_providers():
            raise DetforgeError(
                f"onnxruntime {ort.__version__} here has no {ep} (available: {ort.get_available_providers()}); "
                "GPU providers need onnxruntime-gpu and an NVIDIA GPU (TensorRT libraries too for 'trt')",
                field="backend")

    def session_options(self) -> Any:
        """The session options of the reference protocol (docs/latency.md)."""
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads is not None:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: per-session warnings would drown a table build's output
        return so

    def _provider_list(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]], batch: int) -> list:
        """Execution providers with options, most preferred first."""
        if self.providers == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.providers == "cuda":
            return [cuda, "CPUExecutionProvider"]
        # Pin the TensorRT profile to exactly the measured shape, so the EP builds one engine for it.
        profile = ",".join(f"{n}:{'x'.join(str(d) for d in (batch, *s))}" for n, s in zip(names, shapes))
        opts: dict[str, Any] = {
            "device_id": self.device_id,
            "trt_fp16_enable": self.precision in ("fp16", "int8"),
            "trt_int8_enable": self.precision == "int8",
            "trt_profile_min_shapes": profile,
            "trt_profile_opt_shapes": profile,
            "trt_profile_max_shapes": profile,
        }
        if self.trt_cache_dir is not None:
            self.trt_cache_dir.mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.trt_cache_dir))
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]

    def onnx_bytes(self, model: ModelSource, input_shape: InputShape | None, batch: int) -> bytes:
        """The ONNX graph this backend runs for `model`, in this backend's precision."""
        data = onnx_graph(model, input_shape, batch, opset=self.opset, precision=self.precision)
        # TensorRT lowers fp32 graphs itself (trt_fp16_enable); the other providers need an fp16 graph.
        if self.precision == "fp16" and self.providers != "trt":
            data = to_fp16(data)
        return data

    def prepare(self, model: ModelSource, input_shape: InputShape | None = None, batch: int = 1, *,
                inputs: Sequence[np.ndarray] | None = None) -> OrtRunner:
        """Create the session (exporting an nn.Module first) and fixed inputs for `batch`."""
        ort = _ort()
        if batch < 1:
            raise DetforgeError(f"batch must be >= 1, got {batch}", field="batch")
        data = self.onnx_bytes(model, input_shape, batch)
        specs = input_specs(data)
        names = [n for n, _, _ in specs]
        shapes = resolve_shapes([d for _, d, _ in specs],
                                None if input_shape is None else normalize_shapes(input_shape), batch)
        ep = PROVIDERS[self.providers]
        try:
            session = ort.InferenceSession(data, sess_options=self.session_options(),
                                           providers=self._provider_list(names, shapes, batch))
        except _ort_errors() as e:
            raise DetforgeError(f"onnxruntime cannot run this model with {ep} at {self.precision}: "
                                f"{str(e).strip().splitlines()[0]}", field="model") from None
        if ep not in session.get_providers():  # ORT silently falls back to CPU when a GPU EP fails to load
            raise DetforgeError(f"onnxruntime fell back to {session.get_providers()} instead of {ep}; "
                                "check the CUDA/TensorRT libraries", field="backend")
        dtypes = [np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in session.get_inputs()]
        names = [i.name for i in session.get_inputs()]
        arrays = (random_inputs(shapes, dtypes, batch) if inputs is None
                  else coerce_inputs(inputs, names, dtypes, shapes, batch))
        device = "cpu" if self.providers == "cpu" else "cuda"
        return OrtRunner(session, dict(zip(names, arrays)), self._meta(shapes, batch), device, self.device_id)
