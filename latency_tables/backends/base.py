"""The Backend protocol every inference engine implements, and the Runner a backend prepares."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from search_spaces.errors import DetforgeError

from ..fingerprint import DeviceFingerprint
from ..measurement import (
    Measurement,
    MeasurementConfig,
    measure_callable,
    measure_each_alone,
    measure_interleaved,
)

if TYPE_CHECKING:
    import onnx
    import torch
    from typing_extensions import Self

# String aliases: torch and onnx stay unimported until a backend needs them.
ModelSource: TypeAlias = "torch.nn.Module | bytes | str | Path | onnx.ModelProto"
InputShape: TypeAlias = "Sequence[int] | Sequence[Sequence[int]]"


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """`value` if it is one of `choices`, else a DetforgeError naming the field."""
    if value not in choices:
        raise DetforgeError(f"{value!r} is not one of {list(choices)}", field=name)
    return value


def check_threads(threads: int | None) -> int | None:
    """Thread counts are positive ints (None lets the library choose)."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise DetforgeError(f"threads must be a positive int, got {threads!r}", field="threads")
    return threads


def onnx_graph(model: ModelSource, input_shape: InputShape | None, batch: int, *, opset: int,
               precision: str) -> bytes:
    """ONNX bytes of `model`: an nn.Module exported at `input_shape`, or an ONNX source (QDQ when int8)."""
    from ..onnx_utils import export_onnx, is_quantized, is_torch_module, load_onnx_bytes

    if is_torch_module(model):
        if precision == "int8":
            raise DetforgeError("int8 needs a quantized ONNX model (QDQ, see compress.quantize), "
                                "not an nn.Module", field="precision")
        if input_shape is None:
            raise DetforgeError("input_shape is required to export an nn.Module", field="input_shape")
        return export_onnx(model, input_shape, batch=batch, opset=opset)
    data = load_onnx_bytes(model)
    if precision == "int8" and not is_quantized(data):
        raise DetforgeError("precision 'int8' needs an ONNX model with QuantizeLinear/DequantizeLinear "
                            "nodes (explicit quantization); this one has none", field="precision")
    return data


def random_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype], batch: int,
                  seed: int = 0) -> list[np.ndarray]:
    """Deterministic inputs: standard normal for floats, zeros for ints and bools (indices must stay valid)."""
    rng = np.random.default_rng(seed)
    out = []
    for s, dt in zip(shapes, dtypes):
        full = (batch, *s)
        if np.issubdtype(dt, np.floating):
            out.append(rng.standard_normal(full, dtype=np.float32).astype(dt))
        else:
            out.append(np.zeros(full, dtype=dt))
    return out


class Runner(ABC):
    """One model prepared on one backend with fixed inputs: call it to run once, `time_once_ms` to time once."""

    meta: dict[str, Any]

    @abstractmethod
    def __call__(self) -> None:
        """Run one inference and wait until it has finished."""

    def time_once_ms(self) -> float:
        """Wall-clock time of one run; GPU runners override this with device-side timing."""
        t0 = time.perf_counter_ns()
        self()
        return (time.perf_counter_ns() - t0) / 1e6

    @abstractmethod
    def outputs(self) -> list[np.ndarray]:
        """Run once and return the outputs as float32/original-dtype numpy arrays on the host."""

    def close(self) -> None:
        """Release sessions, engines and device memory early (the GC would do it eventually)."""

    def __enter__(self) -> Self:
        """Use as a context manager that closes the runner."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on leaving the block."""
        self.close()


class Backend(ABC):
    """An inference engine that can measure a model: `measure(model, input_shape, batch) -> Measurement`."""

    name: str
    threads: int | None
    precision: str
    # Whether several prepared models may be timed round-robin. False where an idle session keeps the cores
    # busy (ONNX Runtime's spinning intra-op pool): those are timed one at a time (`measure_each_alone`).
    interleaves: bool = True

    def __init__(self, config: MeasurementConfig | None = None):
        self.config = config or MeasurementConfig()

    @abstractmethod
    def prepare(self, model: ModelSource, input_shape: InputShape | None = None, batch: int = 1, *,
                inputs: Sequence[np.ndarray] | None = None) -> Runner:
        """Build a Runner for `model` with inputs of per-sample shape `input_shape` (random unless given)."""

    def _meta(self, shapes: Sequence[tuple[int, ...]], batch: int) -> dict[str, Any]:
        """The Measurement fields a Runner of this backend carries."""
        from ..onnx_utils import shapes_meta

        return {"backend": self.name, "threads": self.threads, "precision": self.precision,
                "batch": batch, "input_shape": shapes_meta(shapes)}

    def measure(self, model: ModelSource, input_shape: InputShape | None = None, batch: int = 1,
                **overrides: Any) -> Measurement:
        """Measure one model with this backend's protocol settings (`overrides`: MeasurementConfig fields)."""
        with self.prepare(model, input_shape, batch) as runner:
            return measure_callable(runner, self.config, **overrides)

    def measure_prepared(self, runners: Sequence[Runner] | Mapping[str, Runner], **overrides: Any
                         ) -> list[Measurement] | dict[str, Measurement]:
        """Time prepared runners so drifting load hits all alike: round-robin, or one at a time in rotating passes."""
        measure = measure_interleaved if self.interleaves else measure_each_alone
        return measure(runners, self.config, **overrides)

    def measure_many(self, items: Sequence[tuple[ModelSource, InputShape | None]]
                     | Mapping[str, tuple[ModelSource, InputShape | None]], batch: int = 1,
                     **overrides: Any) -> list[Measurement] | dict[str, Measurement]:
        """Measure several (model, input_shape) pairs under the same load (see `measure_prepared`)."""
        keyed = isinstance(items, Mapping)
        pairs = list(items.values()) if keyed else list(items)
        runners: list[Runner] = []
        try:
            for model, shape in pairs:
                runners.append(self.prepare(model, shape, batch))
            return self.measure_prepared(dict(zip(items.keys(), runners)) if keyed else runners, **overrides)
        finally:
            for r in runners:
                r.close()

    def fingerprint(self, batch: int = 1) -> DeviceFingerprint:
        """Describe the device and software this backend measures on."""
        return DeviceFingerprint.collect(backend=self.name, threads=self.threads, precision=self.precision,
                                         batch=batch)

    def __repr__(self) -> str:
        """Name, threads and precision."""
        return f"{type(self).__name__}(name={self.name!r}, threads={self.threads}, precision={self.precision!r})"
