"""Shared helpers of the latency-table tests: a small real search space, a short protocol, a size backend."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latency_tables.backends import Backend, Runner
from latency_tables.measurement import MeasurementConfig
from latency_tables.onnx_utils import normalize_shapes

# A short protocol: these tests check plumbing, files and fields, never how fast anything is.
FAST = {"warmup": 2, "warmup_s": 0.0, "min_runs": 5, "max_runs": 30, "max_time_s": 2.0, "target_rel_ci": 0.05,
        "check_load": False}
MICRO_IMGSZ = 64
TINY_IMGSZ = 64

# A few choices of the tiny space's template (43 block signatures at 64 px): small enough to time for real.
MICRO_YAML = """\
name: micro
description: a few choices of the tiny space's template, for latency-table tests with real timings
nc: 4
imgsz: 64
act: leaky_relu
stem: {width: 8, out: 16}
backbone:
  block: elan
  depth: [1, 2]
  tap: 1
  width: 0.5
  mid: width
  down: maxpool
  stages:
    p2: {out: 16}
    p3: {out: [16, 32]}
    p4: {out: 32}
    p5: {out: 64}
spp: {block: sppcsp_tiny}
neck:
  block: elan
  depth: 1
  tap: 1
  width: 0.5
  mid: 0.5
  down: conv
  stages:
    p3: {out: 16}
    p4: {out: 32}
    p5: {out: 32}
head:
  layout: p3-p5
  type: [detect, decoupled]
  conv: conv
  expand: 1
  hidden: 16
  depth: 1
  anchors:
    p3-p5:
      - [10, 13, 16, 30, 33, 23]
      - [30, 61, 62, 45, 59, 119]
      - [116, 90, 156, 198, 373, 326]
"""


def micro_space_file(folder: Path) -> Path:
    """Write the micro space YAML into `folder` and return its path."""
    path = Path(folder) / "micro.yaml"
    path.write_text(MICRO_YAML)
    return path


class SizeRunner(Runner):
    """Runs nothing; 'takes' 0.01 ms + 1 ms per 100k parameters, so results are exact and repeatable."""

    def __init__(self, ms: float, meta: dict[str, Any]):
        self.ms = ms
        self.meta = meta

    def __call__(self) -> None:
        """Nothing to run."""

    def time_once_ms(self) -> float:
        """The model's size-based 'latency'."""
        return self.ms

    def outputs(self) -> list[np.ndarray]:
        """No outputs."""
        return []


class SizeBackend(Backend):
    """A deterministic backend for plumbing tests: a model's latency is a function of its parameter count."""

    name = "size"
    threads = 2
    precision = "fp32"

    def __init__(self):
        super().__init__(MeasurementConfig(**FAST))
        self.prepared = 0

    def prepare(self, model: Any, input_shape: Any = None, batch: int = 1, *,
                inputs: Sequence[np.ndarray] | None = None) -> Runner:
        """Size the module."""
        shapes = normalize_shapes(input_shape)
        self.prepared += 1
        ms = 0.01 + sum(p.numel() for p in model.parameters()) / 1e5
        return SizeRunner(ms, self._meta(shapes, batch))
