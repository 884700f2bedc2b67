"""Resolve a model reference (zoo name, architecture YAML, model directory) and save/load `arch.yaml + weights.pt`."""
from __future__ import annotations

from pathlib import Path

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
            raise ConfigError(f"weights are for nc={arch.nc}, asked for nc={nc}", path=ref_s)
        arch = arch.with_nc(nc)
    return arch, weights


def load_model(ref: str | Path, form: str | None = None, nc: int | None = None) -> Detector:
    """Build the model named by `ref` and load its weights when `ref` is a model directory or weights file."""
    arch, weights = resolve_arch(ref, form, nc)
    det = Detector(arch)
    if weights is not None:
        load_state(det, weights)
    return det


def load_state(det: Detector, weights: str | Path) -> Detector:
    """Load a plain state dict into `det`, failing clearly on a checkpoint from another model."""
    sd = load_weights(weights)
    if "model" in sd and isinstance(sd["model"], dict):  # a training checkpoint: take the EMA or model weights
        sd = sd.get("ema") or sd["model"]
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


__all__ = ["FORMS", "load_model", "load_state", "resolve_arch", "save_model"]
