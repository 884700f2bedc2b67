"""`StepReport`: what one compression step changed (size, compute, measured latency, mAP), shared by all steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.model import Detector, count_params
from search_spaces.stats import count_macs


@dataclass
class StepReport:
    """Before/after numbers of one step (prune, distill, fuse, quantize); None where the step cannot know them."""

    step: str
    params_before: int | None = None
    params_after: int | None = None
    gflops_before: float | None = None  # 2 x fvcore MACs / 1e9 at `imgsz`
    gflops_after: float | None = None
    imgsz: int | None = None
    latency_ms_before: float | None = None  # measured medians (see `measure_latency_ms`)
    latency_ms_after: float | None = None
    map_before: float | None = None
    map_after: float | None = None
    changes: list[str] = field(default_factory=list)  # what changed, one sentence each, for people
    details: dict[str, Any] = field(default_factory=dict)  # step-specific, JSON-ready

    @property
    def params_ratio(self) -> float | None:
        """params_after / params_before."""
        return _ratio(self.params_after, self.params_before)

    @property
    def gflops_ratio(self) -> float | None:
        """gflops_after / gflops_before."""
        return _ratio(self.gflops_after, self.gflops_before)

    @property
    def speedup(self) -> float | None:
        """latency_ms_before / latency_ms_after."""
        return _ratio(self.latency_ms_before, self.latency_ms_after)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, ratios included."""
        d = asdict(self)
        d.update(params_ratio=self.params_ratio, gflops_ratio=self.gflops_ratio, speedup=self.speedup)
        return d

    def summary(self) -> str:
        """One line for people."""
        parts = [self.step]
        if self.params_before is not None and self.params_after is not None:
            parts.append(f"params {self.params_before:,} -> {self.params_after:,}")
        if self.gflops_before is not None and self.gflops_after is not None:
            parts.append(f"GFLOPs {self.gflops_before:.3f} -> {self.gflops_after:.3f} @{self.imgsz}")
        if self.latency_ms_before is not None and self.latency_ms_after is not None:
            parts.append(f"latency {self.latency_ms_before:.2f} -> {self.latency_ms_after:.2f} ms")
        if self.map_before is not None and self.map_after is not None:
            parts.append(f"mAP {self.map_before:.4f} -> {self.map_after:.4f}")
        return ", ".join(parts)

    def set_model_stats(self, before: Detector | None, after: Detector | None, imgsz: int) -> StepReport:
        """Fill params and GFLOPs (fvcore, eval mode, as the models stand) of the models before and after."""
        self.imgsz = imgsz
        if before is not None:
            self.params_before, self.gflops_before = detector_size(before, imgsz)
        if after is not None:
            self.params_after, self.gflops_after = detector_size(after, imgsz)
        return self


class OutputError:
    """How far decoded outputs `[B, N, 5 + nc]` are from reference ones, accumulated image by image.

    score_mae: mean |error| of objectness and class scores; box_mae_px: mean |error| of x, y, w, h in
    pixels weighted by the reference objectness (boxes nobody would keep do not count); metric:
    score_mae + box_mae_px / imgsz, the one number scans rank by. Other outputs: plain mean |error|.
    """

    def __init__(self, imgsz: int):
        self.imgsz = imgsz
        self.images = 0
        self._score = self._score_n = self._box = self._box_w = 0.0
        self.max_abs = 0.0

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        """Add one batch (reference first)."""
        ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        diff = np.abs(out - ref)
        self.images += ref.shape[0] if ref.ndim == 3 else 1
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        if ref.ndim == 3 and ref.shape[-1] >= 6:
            self._score += float(diff[..., 4:].sum())
            self._score_n += diff[..., 4:].size
            w = ref[..., 4:5]
            self._box += float((diff[..., :4] * w).sum())
            self._box_w += float(w.sum()) * 4
        else:
            self._score += float(diff.sum())
            self._score_n += diff.size

    @property
    def score_mae(self) -> float:
        return self._score / max(self._score_n, 1)

    @property
    def box_mae_px(self) -> float:
        return self._box / self._box_w if self._box_w > 0 else 0.0

    @property
    def metric(self) -> float:
        return self.score_mae + self.box_mae_px / self.imgsz

    def to_dict(self) -> dict[str, float]:
        """Rounded numbers for reports."""
        return {"score_mae": round(self.score_mae, 6), "box_mae_px": round(self.box_mae_px, 4),
                "max_abs": round(self.max_abs, 4), "metric": round(self.metric, 6), "images": self.images}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


def detector_size(det: Detector, imgsz: int) -> tuple[int, float]:
    """(parameters, GFLOPs = 2 x fvcore MACs / 1e9) of `det` for one imgsz x imgsz image."""
    macs = count_macs(det, imgsz, det.arch.in_channels)
    return count_params(det), round(2 * macs / 1e9, 4)


def ort_runner(model: Detector | str | Path, imgsz: int | None = None, threads: int = 2):
    """An ONNX Runtime CPU runner (batch 1) for a Detector (exported, decoded output only) or an ONNX file."""
    from latency_tables.backends.ort import OrtBackend
    from latency_tables.onnx_utils import is_quantized

    from .export import DecodedOutput

    if isinstance(model, Detector):
        size = imgsz or model.arch.imgsz
        return OrtBackend("cpu", threads=threads).prepare(DecodedOutput(model).eval(),
                                                          (model.arch.in_channels, size, size))
    precision = "int8" if is_quantized(model) else "fp32"
    shape = None if imgsz is None else (3, imgsz, imgsz)
    return OrtBackend("cpu", threads=threads, precision=precision).prepare(model, shape)


def measure_latency_ms(models: list[Detector | str | Path], imgsz: int | None = None, threads: int = 2,
                       **overrides: Any) -> list[float]:
    """Median latencies (ms) of several models, ORT CPU, batch 1: each timed alone, in rotating passes."""
    # ORT sessions are never timed round-robin (OrtBackend.interleaves is False): each pass times one session
    # at a time. `repeats` (default 3) is the number of passes; a latency is the median of the passes' medians.
    from latency_tables.backends.ort import OrtBackend

    overrides.setdefault("repeats", 3)
    runners = [ort_runner(m, imgsz, threads) for m in models]
    try:
        return [m.median_ms for m in OrtBackend("cpu", threads=threads).measure_prepared(runners, **overrides)]
    finally:
        for r in runners:
            r.close()


__all__ = ["OutputError", "StepReport", "detector_size", "measure_latency_ms", "ort_runner"]
