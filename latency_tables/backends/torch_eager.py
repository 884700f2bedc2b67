"""PyTorch eager backend: CPU (wall clock) or CUDA (CUDA events), fp32/fp16/bf16."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from search_spaces.errors import DetforgeError

from ..measurement import MeasurementConfig
from ..onnx_utils import is_torch_module, normalize_shapes
from .base import Backend, InputShape, ModelSource, Runner, check_choice, check_threads

PRECISIONS = ("fp32", "fp16", "bf16")


class TorchRunner(Runner):
    """A private copy of the model in eval mode on its device, with fixed inputs."""

    def __init__(self, model: Any, inputs: list[Any], meta: dict[str, Any], threads: int | None):
        import torch

        self.model = model
        self.inputs = inputs
        self.meta = meta
        self.threads = threads
        self.cuda = inputs[0].device.type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def _ensure_threads(self) -> None:
        """Re-apply the thread count: it is process-global and another runner may have changed it."""
        import torch

        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _forward(self) -> Any:
        """One forward pass without autograd bookkeeping."""
        import torch

        with torch.inference_mode():
            return self.model(*self.inputs)

    def __call__(self) -> None:
        """One forward pass, waiting for the GPU when there is one."""
        import torch

        self._ensure_threads()
        self._forward()
        if self.cuda:
            torch.cuda.synchronize(self.inputs[0].device)

    def time_once_ms(self) -> float:
        """CPU: wall clock; CUDA: events around the forward pass on the current stream."""
        self._ensure_threads()
        if not self.cuda:
            return super().time_once_ms()
        self._start.record()
        self._forward()
        self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))

    def outputs(self) -> list[np.ndarray]:
        """Run once and return the flattened outputs as float32 numpy arrays."""
        from ..onnx_utils import flatten_tensors

        self._ensure_threads()
        return [t.detach().float().cpu().numpy() for t in flatten_tensors(self._forward())]

    def close(self) -> None:
        """Drop the model copy and inputs (frees GPU memory once the caching allocator releases it)."""
        self.model = None
        self.inputs = []


class TorchBackend(Backend):
    """PyTorch eager inference of a model copy in fp32/fp16/bf16; CUDA runs are timed with CUDA events."""

    def __init__(self, device: str = "cpu", threads: int | None = 2, precision: str = "fp32", *,
                 channels_last: bool = False, config: MeasurementConfig | None = None):
        super().__init__(config)
        import torch

        dev = torch.device(device)
        check_choice(dev.type, ("cpu", "cuda"), "device")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DetforgeError("CUDA is not available here (torch.cuda.is_available() is False)",
                                field="backend")
        self.device = dev
        self.threads = check_threads(threads)
        self.precision = check_choice(precision, PRECISIONS, "precision")
        self.channels_last = channels_last
        self.name = f"torch-{dev.type}"

    @property
    def dtype(self) -> Any:
        """The torch dtype of `precision`."""
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def prepare(self, model: ModelSource, input_shape: InputShape | None = None, batch: int = 1, *,
                inputs: Sequence[Any] | None = None) -> TorchRunner:
        """Copy the model to the device and precision (the caller's module is left untouched)."""
        import torch

        if not is_torch_module(model):
            raise DetforgeError(f"TorchBackend measures an nn.Module, got {type(model).__name__}; "
                                "use OrtBackend or TensorRTBackend for ONNX", field="model")
        if input_shape is None:
            raise DetforgeError("input_shape is required for an nn.Module", field="input_shape")
        if batch < 1:
            raise DetforgeError(f"batch must be >= 1, got {batch}", field="batch")
        shapes = normalize_shapes(input_shape)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        m = copy.deepcopy(model).eval().to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        if inputs is None:
            gen = torch.Generator().manual_seed(0)
            tensors = [torch.randn((batch, *s), generator=gen) for s in shapes]
        else:
            if len(inputs) != len(shapes):
                raise DetforgeError(f"{len(inputs)} input array(s) for {len(shapes)} input shape(s)",
                                    field="inputs")
            tensors = [torch.as_tensor(np.asarray(a)) for a in inputs]
            for t, s in zip(tensors, shapes):
                if tuple(t.shape) != (batch, *s):
                    raise DetforgeError(f"input of shape {list(t.shape)}, expected {[batch, *s]}", field="inputs")
        tensors = [t.to(device=self.device, dtype=self.dtype).contiguous(
            memory_format=fmt if t.dim() == 4 else torch.contiguous_format) for t in tensors]
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return TorchRunner(m, tensors, self._meta(shapes, batch), self.threads)
