"""Training hyper-parameters: YOLOv7's `data/hyp.scratch.*.yaml` keys as one typed dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from search_spaces.errors import ConfigError

HYP_DIR = Path(__file__).resolve().parent / "hyp"
BUILTIN = ("p5", "p6", "tiny")


@dataclass(frozen=True)
class Hyp:
    """Optimizer, loss and augmentation hyper-parameters (defaults = YOLOv7 `hyp.scratch.p5.yaml`)."""

    # optimizer / schedule
    lr0: float = 0.01
    lrf: float = 0.1
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    # loss gains (nominal: 3 levels, 80 classes, 640 px; see `scaled`)
    box: float = 0.05
    cls: float = 0.3
    obj: float = 0.7
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    iou_t: float = 0.2  # kept so official hyp files load; no YOLOv7 loss reads it
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0
    aux_weight: float = 0.25
    loss_ota: int = 1  # 1: SimOTA assignment (official default); 0: plain YOLOv5 candidate assignment
    # augmentation (consumed by the augmentation module)
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.2
    scale: float = 0.9
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.15
    copy_paste: float = 0.0
    paste_in: float = 0.15

    def __post_init__(self) -> None:
        for key, (inside, allowed) in _RANGES.items():
            value = getattr(self, key)
            if not inside(value):
                raise ConfigError(f"must be {allowed}, got {value!r}", field=key)

    @classmethod
    def from_dict(cls, data: Any, path: str | Path | None = None) -> Hyp:
        """Build from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of hyper-parameters, got {type(data).__name__}", path=path)
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in types:
                raise ConfigError(f"unknown hyper-parameter (known: {', '.join(types)})", path=path,
                                  field=str(key))
            values[key] = _coerce(value, types[key], path, key)
        try:
            return cls(**values)
        except ConfigError as e:  # a value out of its range: name the file it came from
            raise ConfigError(e.message, path=path, field=e.field) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML/JSON dumps and run configs)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Hyp:
        """Copy with some fields changed (type-checked like a file)."""
        return Hyp.from_dict({**self.to_dict(), **changes})

    def scaled(self, nl: int, nc: int, imgsz: int) -> Hyp:
        """Apply train.py's gain rescaling for `nl` levels, `nc` classes and `imgsz` pixels."""
        if nl < 1 or nc < 1 or imgsz < 1:
            raise ConfigError(f"scaled() needs positive nl, nc, imgsz, got {nl}, {nc}, {imgsz}")
        # The nominal gains were tuned for 3 levels / 80 classes / 640 px; keep each term's share
        # of the loss constant when those change (more levels -> more terms summed, etc.).
        level = 3.0 / nl
        return dataclasses.replace(
            self,
            box=self.box * level,
            cls=self.cls * nc / 80.0 * level,
            obj=self.obj * (imgsz / 640.0) ** 2 * level,
        )


def _ranges(spec: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """Expand `"a b c": (test, text)` into one entry per key."""
    return {key: rule for keys, rule in spec.items() for key in keys.split()}


# what each value may be: a value outside fails at its file, not as a traceback (or a silent nonsense run) deep in
# training (momentum 0 breaks Nesterov SGD; anchor_t <= 1 leaves no anchor a positive; scale >= 1 can zoom to 0)
_RANGES = _ranges({
    "lr0 cls_pw obj_pw": (lambda v: v > 0, "> 0"),
    "lrf weight_decay warmup_epochs warmup_bias_lr box cls obj fl_gamma aux_weight perspective":
        (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: 0 < v < 1, "in (0, 1)"),
    "warmup_momentum label_smoothing scale": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "anchor_t": (lambda v: v > 1, "> 1"),
    "loss_ota": (lambda v: v in (0, 1), "0 or 1"),
    "iou_t hsv_h hsv_s hsv_v translate flipud fliplr mosaic mixup copy_paste paste_in":
        (lambda v: 0 <= v <= 1, "in [0, 1]"),
})


def _coerce(value: Any, typ: Any, path: str | Path | None, key: str) -> Any:
    """Check one value against the dataclass field type (given as a string under postponed annotations)."""
    name = typ if isinstance(typ, str) else typ.__name__
    # bool is an int subclass: a YAML `true` for a number is almost certainly a typo.
    if name == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if name == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"expected {name}, got {type(value).__name__} {value!r}", path=path, field=key)


def load_hyp(name_or_path: str | Path | Hyp) -> Hyp:
    """Load built-in `p5`, `p6`, `tiny` or a YAML file of hyper-parameters (missing keys keep p5 defaults)."""
    if isinstance(name_or_path, Hyp):
        return name_or_path
    text = str(name_or_path)
    path = HYP_DIR / f"{text}.yaml" if text in BUILTIN else Path(text)
    if not path.is_file():
        raise ConfigError(f"no such hyper-parameter file (built-in: {', '.join(BUILTIN)})", path=path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from exc
    return Hyp.from_dict({} if data is None else data, path=path)
