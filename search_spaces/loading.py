"""Resolve a model reference (zoo name, architecture YAML, model directory) and save/load `arch.yaml + weights.pt`."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .architecture import Architecture
from .errors import CheckpointError, ConfigError
from .io import atomic_torch_save, load_weights
from .model import Detector
from .zoo import list_models, zoo_path

FORMS = ("training", "deploy")


def resolve_arch(ref: str | Path, form: str | None = None, nc: int | None = None) -> tuple[Architecture, Path | None]:
    """The Architecture named by `ref` (zoo name, YAML file or model directory) and its weights file, if any."""
    if form is not None and form not in FORMS:
        raise ConfigError(f"unknown form '{form}' (known: {', '.join(FORMS)})", field="form")
    ref_s = str(ref)
    weights: Path | None = None
    zp = zoo_path(ref_s)
    p = Path(ref_s)
    if zp is not None and not p.exists():
        arch = Architecture.from_yaml(zp)
    elif p.is_dir():
        if not (p / "arch.yaml").is_file():
            raise ConfigError("model directory has no arch.yaml", path=p)
        arch = Architecture.from_yaml(p / "arch.yaml")
        weights = p / "weights.pt" if (p / "weights.pt").is_file() else None
    elif p.suffix in (".yaml", ".yml"):
        arch = Architecture.from_yaml(p)
    elif p.suffix == ".pt" and (p.parent / "arch.yaml").is_file():
        arch = Architecture.from_yaml(p.parent / "arch.yaml")
        weights = p
    elif p.exists():
        raise ConfigError("expected a zoo name, an architecture .yaml or a model directory with arch.yaml", path=p)
    else:
        raise ConfigError(f"no such zoo model or file (zoo: {', '.join(list_models())})", path=ref_s)
    if form == "deploy" and arch.head.type in ("idetect", "iauxdetect"):
        if weights is not None:
            raise ConfigError("saved training-form weights: load with form='training' and call .deploy()", path=p)
        arch = arch.deploy_form()[0]
    elif form == "training" and arch.head.type == "detect" and zp is None:
        raise ConfigError("its head is a plain 'detect' (a fused deploy form, or an architecture written without "
                          "implicit layers): it has no other training form, load it without form='training'",
                          path=ref_s, field="form")
    if nc is not None and nc != arch.nc:
        if weights is not None:
            raise ConfigError(f"weights are for nc={arch.nc}, asked for nc={nc} (to finetune them on a dataset of "
                              f"{nc} classes, `detforge train` transfers them: load_for_classes)", path=ref_s)
        arch = arch.with_nc(nc)
    return arch, weights


def load_model(ref: str | Path, form: str | None = None, nc: int | None = None) -> Detector:
    """Build the model named by `ref` and load its weights when `ref` is a model directory or weights file."""
    arch, weights = resolve_arch(ref, form, nc)
    det = Detector(arch)
    if weights is not None:
        load_state(det, weights)
    return det


@dataclass(frozen=True)
class Transfer:
    """What `transfer_state` did: how many of the model's `total` tensors it took from `source`, and those it left
    as initialised (`fresh`; the anchor buffers, which the architecture states, are neither)."""

    source: str
    loaded: int
    total: int
    fresh: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "loaded": self.loaded, "total": self.total, "fresh": list(self.fresh)}

    def summary(self) -> str:
        """One line, as YOLOv7 prints it ("Transferred 552/566 items from yolov7.pt")."""
        mods = sorted({k.rsplit(".", 2)[0] for k in self.fresh})
        new = f"; new: {', '.join(mods[:4])}{', ...' if len(mods) > 4 else ''}" if mods else ""
        return f"transferred {self.loaded}/{self.total} tensors from {self.source}{new}"


def transfer_state(det: Detector, weights: str | Path | Mapping[str, Tensor]) -> Transfer:
    """Load the tensors of `weights` (a file or a state dict) whose name and shape match `det`'s (YOLOv7's
    `intersect_dicts`); the others, such as a head's class-dependent outputs for another nc, keep their
    initialisation, and the anchors the arch's."""
    sd = weights if isinstance(weights, Mapping) else _model_state(load_weights(weights))
    own = det.state_dict()
    take = {k: v.to(own[k].dtype) for k, v in sd.items()
            if k in own and tuple(v.shape) == tuple(own[k].shape) and k.rsplit(".", 1)[-1] not in _ANCHOR_BUFFERS}
    det.load_state_dict(take, strict=False)
    fresh = tuple(k for k in own if k not in take and k.rsplit(".", 1)[-1] not in _ANCHOR_BUFFERS)
    return Transfer(str(weights), len(take), len(own), fresh)


def load_for_classes(ref: str | Path, nc: int) -> tuple[Detector, Transfer | None]:
    """The model `ref` for a dataset of `nc` classes: its weights in full where they are for `nc` classes, else
    the same architecture built for `nc` with the weights transferred (`transfer_state`; finetuning a model
    trained on another dataset, as YOLOv7's --weights does)."""
    arch, weights = resolve_arch(ref)
    if weights is None or arch.nc == nc:
        return load_model(ref, nc=nc), None
    source = load_model(ref)  # the weights must fit their own architecture: a mismatched file fails here, clearly
    det = Detector(arch.with_nc(nc))
    t = transfer_state(det, source.state_dict())
    return det, dataclasses.replace(t, source=str(weights))


_ANCHOR_BUFFERS = ("anchors", "anchor_grid")  # YOLOv7 leaves them out of a transfer: the architecture states them


def _model_state(sd: dict) -> dict:
    if "model" in sd and isinstance(sd["model"], dict):  # a training checkpoint: take the EMA or model weights
        sd = sd.get("ema") or sd["model"]
    return sd


def load_state(det: Detector, weights: str | Path) -> Detector:
    """Load a plain state dict into `det`, failing clearly on a checkpoint from another model."""
    sd = _model_state(load_weights(weights))
    own = det.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise CheckpointError(f"weights do not fit architecture '{det.arch.name}' ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrong shape; first: {first})",
                              path=weights)
    det.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return det


def save_model(det: Detector, out_dir: str | Path) -> Path:
    """Write `out_dir/arch.yaml` and `out_dir/weights.pt` (plain tensors, loadable with weights_only=True)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone() for k, v in det.state_dict().items()}
    atomic_torch_save(sd, out / "weights.pt")
    det.arch.to_yaml(out / "arch.yaml")
    return out


__all__ = ["FORMS", "Transfer", "load_for_classes", "load_model", "load_state", "resolve_arch", "save_model",
           "transfer_state"]
