"""Inference backends behind one protocol: `Backend.measure(model_or_onnx, input_shape, batch) -> Measurement`."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from search_spaces.errors import DetforgeError

from .base import Backend, InputShape, ModelSource, Runner
from .ort import OrtBackend, OrtRunner
from .tensorrt import TensorRTBackend, TrtRunner, build_engine, import_tensorrt
from .torch_eager import TorchBackend, TorchRunner

_FACTORIES: dict[str, Callable[..., Backend]] = {
    "ort-cpu": partial(OrtBackend, providers="cpu"),
    "ort-cuda": partial(OrtBackend, providers="cuda"),
    "ort-trt": partial(OrtBackend, providers="trt"),
    "torch-cpu": partial(TorchBackend, device="cpu"),
    "torch-cuda": partial(TorchBackend, device="cuda"),
    "tensorrt": TensorRTBackend,
}
BACKEND_NAMES = tuple(_FACTORIES)


def get_backend(name: str, **kw: Any) -> Backend:
    """A backend by name (one of BACKEND_NAMES), built with `kw` (threads, precision, config, ...)."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise DetforgeError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}", field="backend")
    return factory(**kw)


__all__ = [
    "BACKEND_NAMES", "Backend", "InputShape", "ModelSource", "OrtBackend", "OrtRunner", "Runner",
    "TensorRTBackend", "TorchBackend", "TorchRunner", "TrtRunner", "build_engine", "get_backend",
    "import_tensorrt",
]
