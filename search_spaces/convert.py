"""Official YOLOv7 checkpoints -> detforge `arch.yaml + weights.pt`, key by key, without the official code."""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError
from .model import Detector

_OFFICIAL_KEY = re.compile(r"^model\.(\d+)\.(.+)$")


def official_layer_map(det: Detector) -> dict[int, str | None]:
    """Official layer index -> our module path prefix (None for parameter-free layers), in official order."""
    out: dict[int, str | None] = {}
    j = 0
    for i, layer in enumerate(det.layers):
        for sub in layer.official_layout:
            out[j] = None if sub is None else (f"layers.{i}.{sub}" if sub else f"layers.{i}")
            j += 1
    out[j] = "head"
    return out


def map_official_state_dict(sd: dict[str, Tensor], det: Detector) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename official keys to ours; returns (mapped state dict, unexpected official keys, missing our keys)."""
    layer_map = official_layer_map(det)
    ours = det.state_dict()
    mapped: dict[str, Tensor] = OrderedDict()
    unexpected: list[str] = []
    for key, value in sd.items():
        m = _OFFICIAL_KEY.match(key)
        prefix = layer_map.get(int(m.group(1))) if m else None
        new_key = f"{prefix}.{m.group(2)}" if prefix else None
        if new_key is None or new_key not in ours or ours[new_key].shape != value.shape:
            unexpected.append(key)
            continue
        mapped[new_key] = value.to(ours[new_key].dtype)
    missing = [k for k in ours if k not in mapped]
    return mapped, unexpected, missing


def checkpoint_nc(sd: dict[str, Tensor], det: Detector) -> int | None:
    """The class count of an official state dict, from its first lead output conv (na x (5 + nc) outputs)."""
    layer_map = official_layer_map(det)
    for key, value in sd.items():
        m = _OFFICIAL_KEY.match(key)
        prefix = layer_map.get(int(m.group(1))) if m else None
        if prefix and f"{prefix}.{m.group(2)}" == "head.m.0.weight":
            rows, na = int(value.shape[0]), det.head.na
            return rows // na - 5 if rows % na == 0 and rows // na > 5 else None
    return None


def load_official_into(det: Detector, sd: dict[str, Tensor], source: str = "checkpoint") -> Detector:
    """Load an official state dict into `det`, failing clearly on any unmapped or missing key."""
    mapped, unexpected, missing = map_official_state_dict(sd, det)
    if unexpected or missing:
        detail = []
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if missing:
            detail.append(f"{len(missing)} missing (first: {missing[0]})")
        theirs = checkpoint_nc(sd, det)
        if theirs is not None and theirs != det.nc:  # the usual cause: a model trained on another dataset
            raise CheckpointError(f"was trained for nc={theirs} classes, {det.arch.name} is built for {det.nc}: "
                                  f"pass --nc {theirs}", path=source, field="nc")
        raise CheckpointError(f"does not match {det.arch.name} ({det.form} form): " + ", ".join(detail),
                              path=source)
    det.load_state_dict(mapped, strict=True)
    det.sync_arch_anchors()  # a checkpoint trained with AutoAnchor holds its own anchors: arch.yaml says so
    return det


# ---- restricted unpickling of official checkpoints ----------------------------------------------------------
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch", "HalfStorage"), ("torch", "FloatStorage"),
    ("torch", "LongStorage"), ("torch", "IntStorage"), ("torch", "BFloat16Storage"), ("torch", "DoubleStorage"),
    ("torch", "BoolStorage"), ("torch", "ByteStorage"), ("torch", "Size"), ("torch", "float16"),
    ("torch", "float32"), ("builtins", "set"), ("builtins", "slice"), ("__builtin__", "set"),
    ("builtins", "frozenset"), ("__builtin__", "frozenset"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"), ("torch.nn.modules.container", "ModuleList"), ("torch.nn.modules.container", "Sequential"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("argparse", "Namespace"), ("torch", "device"),
    # numpy arrays and scalars (train.py saves best_fitness as an ndarray), numpy 1 and numpy 2 module paths
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
    ("_codecs", "encode"),  # a pure str -> bytes conversion: how pickle protocol 2 carries an array's buffer
}


class _Stub:
    """Stands in for any official class (models.yolo.Model, nn layers...): keeps only its pickled state."""

    _stub_name = "object"

    def __init__(self, *args: Any, **kwargs: Any):
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __call__(self, *a: Any, **k: Any) -> Any:  # some reducers call the class
        return self


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"_stub_name": f"{module}.{name}"})


# Modules whose classes may be replaced by inert stubs: the official code and torch.nn layers.
_STUB_MODULES = re.compile(r"^(models(\..*)?|utils(\..*)?|torch\.nn\.modules\..*|__main__)$")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if _STUB_MODULES.match(module) and name[:1].isupper():
            return _stub_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _restricted_pickle_module() -> Any:
    class _Module:
        Unpickler = _RestrictedUnpickler
        __name__ = "detforge_restricted_pickle"

        @staticmethod
        def load(f: Any, **kw: Any) -> Any:
            return _RestrictedUnpickler(f, **kw).load()

    return _Module


def _collect_state(obj: Any) -> dict[str, Tensor] | None:
    """The state dict of a stubbed nn.Module tree (from `_parameters`, `_buffers`, `_modules`)."""
    if isinstance(obj, _Stub) and "_modules" in obj.__dict__:
        out: dict[str, Tensor] = OrderedDict()

        def walk(mod: Any, prefix: str) -> None:
            d = mod.__dict__
            for k, v in (d.get("_parameters") or {}).items():
                if v is not None:
                    out[prefix + k] = v.detach() if isinstance(v, Tensor) else v
            non_persistent = d.get("_non_persistent_buffers_set") or set()
            for k, v in (d.get("_buffers") or {}).items():
                if v is not None and k not in non_persistent:
                    out[prefix + k] = v
            for k, v in (d.get("_modules") or {}).items():
                if v is not None:
                    walk(v, f"{prefix}{k}.")

        walk(obj, "")
        return out
    return None


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Official `.pt` (pickled model, fp16) or a plain state dict -> fp32 tensors, never importing official code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused unsafe or unknown pickle content ({e})", path=path) from None
    except Exception as e:  # noqa: BLE001 - garbage bytes make the unpickler fail in any way
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"truncated or corrupt checkpoint ({type(e).__name__}: {first})", path=path) from None
    sd: dict[str, Tensor] | None = None
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    elif isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            cand = obj.get(key)
            if cand is None:
                continue
            sd = _collect_state(cand) if not isinstance(cand, dict) else cand
            if sd:
                break
    else:
        sd = _collect_state(obj)
    if not sd:
        raise CheckpointError("no model weights found (expected 'ema' or 'model' or a state dict)", path=path)
    return OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in sd.items()
                       if isinstance(v, Tensor))
