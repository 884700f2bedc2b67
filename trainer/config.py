"""`TrainConfig`: every knob of a training run, validated once (from CLI flags or YAML)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from search_spaces.errors import ConfigError
from search_spaces.typecheck import type_name, type_ok

OPTIMIZERS = ("sgd", "adamw")  # sgd: YOLOv7's (Nesterov); adamw: much faster in short runs (docs/training.md)
LR_SCHEDULES = ("cosine", "linear")


@dataclass
class TrainConfig:
    """A training run. `data=None` trains on the built-in synthetic dataset."""

    model: str = "yolov7-tiny"  # zoo name, architecture YAML, or model directory (arch.yaml + weights.pt)
    data: str | None = None  # data.yaml or dataset directory; None: the built-in synthetic set
    out: str = "runs/train"
    epochs: int = 10
    imgsz: int = 320
    batch: int = 16  # total over all DDP processes
    nbs: int = 64  # nominal batch: gradients accumulate to it (YOLOv7)
    hyp: str = "auto"  # p5 | p6 | tiny | a YAML path | auto (from the model)
    optimizer: str = "sgd"  # sgd (nesterov) | adamw
    lr_schedule: str = "cosine"  # cosine | linear
    lr0: float | None = None  # overrides the hyp's lr0 (YOLOv7's 0.01 is SGD's; AdamW wants about 0.001-0.002)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp16 | off
    ema: bool = True
    ema_tau: float = 2000.0
    autoanchor: bool = True  # refit anchors whose best possible recall is < 0.98 (YOLOv7); off to keep trained ones
    single_cls: bool = False  # train (and validate) every class of the data as one (YOLOv7's --single-cls)
    multi_scale: bool = False  # each batch at a random size in 0.5-1.5x imgsz, a multiple of the stride (YOLOv7)
    freeze: int = 0  # freeze the first N layers, numbered as YOLOv7 does (its --freeze; 51: yolov7's backbone)
    workers: int = 2
    seed: int = 0
    resume: bool = False
    exist_ok: bool = False  # train over an earlier run in `out` (its last.pt) instead of refusing to
    grad_clip: float = 10.0  # 0: off
    val_interval: int = 1  # validate every N epochs (and after the last)
    save_every_s: float = 0.0  # checkpoint at most every N seconds (0: every epoch); the last epoch always saves
    max_val_batches: int | None = None
    sync_bn: bool = False
    max_time_s: float | None = None  # stop after the epoch that crosses this wall-clock budget
    fit_epochs_to_time: bool = False  # with max_time_s: shorten the LR schedule to the epochs that fit in it
    min_warmup_iters: int = 100  # YOLOv7 uses max(3 epochs, 1000 iters); capped at half of all iterations
    strict_data: bool = False
    cache: bool = True
    progress: bool = True
    conf_thres: float = 0.001
    iou_thres: float = 0.65

    _CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
                "amp": ("auto", "bf16", "fp16", "off")}

    def __post_init__(self) -> None:
        for key, allowed in self._CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}", field=key)
        for key in ("epochs", "imgsz", "batch", "nbs", "val_interval"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", field=key)
        if self.imgsz % 32:
            raise ConfigError("must be a multiple of 32", field="imgsz")
        if self.lr0 is not None and not self.lr0 > 0:
            raise ConfigError(f"must be > 0, got {self.lr0}", field="lr0")
        if not self.ema_tau > 0:
            raise ConfigError(f"must be > 0, got {self.ema_tau}", field="ema_tau")
        for key in ("workers", "min_warmup_iters", "grad_clip", "save_every_s", "freeze"):  # grad_clip 0: no clipping
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", field=key)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> TrainConfig:
        """Validate a mapping (unknown keys and wrong types raise ConfigError naming the key)."""
        if not isinstance(d, dict):
            raise ConfigError("expected a mapping", path=path)
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        for key, value in d.items():
            if key not in known:
                raise ConfigError(f"unknown key (known: {', '.join(known)})", path=path, field=key)
            if not type_ok(value, hints[key]):
                raise ConfigError(f"expected {type_name(hints[key])}, got {type(value).__name__} {value!r}",
                                  path=path, field=key)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
