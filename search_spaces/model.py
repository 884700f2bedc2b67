"""`Detector`: the one model type (zoo model, searched subnet, pruned model), built from an `Architecture`."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .architecture import Architecture, _ancestors
from .blocks import BLOCKS, DecoupledHead, YoloHead
from .blocks.heads import anchors_differ
from .errors import ConfigError
from .fusion import fold_implicit
from .modes import temporary_mode


class Detector(nn.Module):
    """A YOLO-family detector: layers wired by name, then a detection head.

    Train mode returns raw per-level logits; eval mode returns `(decoded [B, N, 5+nc], raw)`.
    """

    def __init__(self, arch: Architecture, path: str | None = None):
        super().__init__()
        path = path or arch.source
        self.arch = arch
        self.plan = arch.resolve(path)
        lead, aux = arch.head_indices(path)
        self.lead_inputs, self.aux_inputs = lead, aux
        strides = arch.head_strides(path)
        channels: list[int] = []
        layers = []
        for i, (spec, ins) in enumerate(zip(arch.layers, self.plan)):
            c_in = [arch.in_channels if j == -1 else channels[j] for j in ins]
            entry = BLOCKS[spec.block]
            try:
                module = entry.cls(c_in if len(c_in) > 1 else c_in[0], act=spec.act or arch.act, **spec.args)
            except (ValueError, RuntimeError, TypeError) as e:
                raise ConfigError(f"impossible {spec.block} layer: {e}", path=path, field=arch._where(i)) from None
            channels.append(module.out_channels)
            layers.append(module)
        self.layers = nn.ModuleList(layers)
        self.channels = channels
        self.head = self._make_head(arch, [channels[i] for i in lead], [channels[i] for i in aux], strides, path)
        self.nc = arch.nc
        self.strides = strides
        self.max_stride = arch.max_stride(path)  # what every input side must be a multiple of
        consumers = [j for ins in self.plan for j in ins] + lead + aux
        self._save = set(consumers)
        self._eval_needed = _ancestors(self.plan, lead)
        if arch.fused:
            self.fuse()

    @staticmethod
    def _make_head(arch: Architecture, c_lead: list[int], c_aux: list[int], strides: list[int], path: str | None):
        h = arch.head
        try:
            if h.anchor_free:
                return DecoupledHead(c_lead, arch.nc, strides, hidden=h.hidden, depth=h.depth, act=arch.act)
            return YoloHead(c_lead, arch.nc, h.anchors, strides, implicit=h.type in ("idetect", "iauxdetect"),
                            aux_c_in=c_aux if h.type == "iauxdetect" else None)
        except ValueError as e:
            raise ConfigError(str(e), path=path, field="head") from None

    @property
    def form(self) -> str:
        """'training' if the head still has implicit layers or an aux branch, else 'deploy'."""
        return "training" if self.arch.head.type in ("idetect", "iauxdetect") else "deploy"

    def _run_layers(self, x: Tensor, needed: set[int] | None) -> list[Tensor | None]:
        outs: list[Tensor | None] = []
        for i, (layer, ins) in enumerate(zip(self.layers, self.plan)):
            if needed is not None and i not in needed:
                outs.append(None)
                continue
            y = layer(*[x if j == -1 else outs[j] for j in ins])
            outs.append(y if i in self._save else None)
        return outs

    def check_imgsz(self, imgsz: int) -> int:
        """`imgsz`, or a ConfigError when it is not a positive multiple of `max_stride`."""
        return check_imgsz(imgsz, self.max_stride)

    def forward(self, x: Tensor):
        use_aux = self.training and self.head.has_aux
        outs = self._run_layers(x, None if use_aux else self._eval_needed)
        feats = [outs[i] for i in self.lead_inputs]
        aux = [outs[i] for i in self.aux_inputs] if use_aux else None
        return self.head(feats, aux)

    def neck_features(self, x: Tensor) -> list[Tensor]:
        """The feature maps that feed the lead head (for feature distillation)."""
        outs = self._run_layers(x, self._eval_needed)
        return [outs[i] for i in self.lead_inputs]

    def sync_arch_anchors(self) -> None:
        """Write the head's anchor buffers into `self.arch` where they differ (weights loaded from a checkpoint
        trained with other anchors, an AutoAnchor refit), so a saved arch.yaml states the anchors it runs with."""
        if self.head.anchor_free:
            return
        anchors = self.head.anchor_sizes()
        if anchors_differ(self.arch.head.anchors, anchors):
            self.arch = dataclasses.replace(self.arch, head=dataclasses.replace(self.arch.head, anchors=anchors))

    @torch.no_grad()
    def fuse(self) -> Detector:
        """Fold Conv+BN, merge RepConv branches and fold implicit layers, in place (exact in eval mode)."""
        for m in self.modules():
            if m is not self and hasattr(m, "fuse"):
                m.fuse()
        self.arch.fused = True
        return self

    @torch.no_grad()
    def deploy(self) -> Detector:
        """A new deploy-form Detector: auxiliary branch dropped, implicit layers folded, same lead outputs."""
        arch, keep = self.arch.deploy_form()
        det = Detector(arch)
        src = self.state_dict()
        dst = det.state_dict()
        new_sd = {}
        for key in dst:
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                new_sd[key] = src[f"layers.{keep[int(i)]}.{rest}"]
            elif key in src:
                new_sd[key] = src[key]
        if isinstance(self.head, YoloHead) and self.head.ia is not None:
            for i in range(self.head.nl):
                w, b = fold_implicit(src[f"head.m.{i}.weight"], src[f"head.m.{i}.bias"],
                                     src[f"head.ia.{i}.implicit"], src[f"head.im.{i}.implicit"])
                new_sd[f"head.m.{i}.weight"], new_sd[f"head.m.{i}.bias"] = w, b
        det.load_state_dict(new_sd, strict=True)
        return det.train(self.training)


def check_imgsz(imgsz: int, stride: int) -> int:
    """`imgsz`, or a ConfigError when it is not a positive multiple of `stride` (levels would not line up: a
    stride-2 conv and a max-pool round an odd size differently)."""
    if imgsz < 1 or imgsz % stride:
        raise ConfigError(f"{imgsz} is not a positive multiple of the largest stride {stride}", field="imgsz")
    return imgsz


def build(arch: Architecture | dict, path: str | None = None) -> Detector:
    """Build a Detector from an Architecture (or its YAML mapping)."""
    if isinstance(arch, dict):
        arch = Architecture.from_dict(arch, path)
    return Detector(arch, path)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_live_params(model: Detector, imgsz: int | None = None) -> int:
    """Parameters that influence the eval-mode output (folded implicit tensors, aux branches excluded)."""
    imgsz = imgsz or 2 * model.max_stride  # small, and a size every level divides
    for p in model.parameters():
        p.grad = None
    with temporary_mode(model), torch.enable_grad():
        decoded, _ = model(torch.zeros(1, model.arch.in_channels, imgsz, imgsz))
        decoded.float().sum().backward()
    n = sum(p.numel() for p in model.parameters() if p.grad is not None)
    for p in model.parameters():
        p.grad = None
    return n
