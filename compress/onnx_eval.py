"""mAP of an exported ONNX model (FP32 or INT8 QDQ) with the same evaluation code as PyTorch models."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latency_tables.onnx_utils import check_onnx
from search_spaces.errors import DetforgeError
from trainer.evaluate import EvalResult, evaluate

from .export import ort_session


class OnnxDetector(nn.Module):
    """An ONNX Runtime session behind the Detector eval interface: `model(x) -> (decoded, [])`."""

    def __init__(self, path: str | Path, threads: int = 2):
        super().__init__()
        check_onnx(Path(path))  # user files are checked before use
        self.path = str(path)
        self.session = ort_session(Path(path), threads)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if len(self.session.get_outputs()) != 1 or len(out.shape) != 3:  # an end-to-end (--nms) export
            shapes = [o.shape for o in self.session.get_outputs()]
            raise DetforgeError(f"evaluating needs the decoded output [batch, boxes, 5 + classes]; this model puts "
                                f"out {shapes} (an export with in-graph NMS): export it without --nms",
                                path=path, field="model")
        self.input_name = inp.name
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        self.imgsz = dims[-1] if len(dims) == 4 and dims[-1] == dims[-2] else None  # None: dynamic
        last = out.shape[-1] if out.shape else None
        if not isinstance(last, int) and self.imgsz is not None:  # symbolic in our exports: run once to see it
            x = np.zeros((1, dims[1] or 3, self.imgsz, self.imgsz), np.float32)
            last = self.session.run(None, {self.input_name: x})[0].shape[-1]
        self.nc = last - 5 if isinstance(last, int) and last > 5 else None  # decoded [B, N, 5 + nc]

    def forward(self, x: Tensor):
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out), []


def evaluate_onnx(path: str | Path, loader: Iterable, nc: int, names: list[str] | None = None,
                  threads: int = 2, max_batches: int | None = None) -> EvalResult:
    """COCO mAP of an ONNX detector on `loader` (same NMS and pycocotools code as `trainer.evaluate`)."""
    return evaluate(OnnxDetector(path, threads), loader, nc, names, device="cpu", max_batches=max_batches)
