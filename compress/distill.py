"""Knowledge distillation from a (large) teacher Detector, plugged into the Trainer as extra loss terms.

Output level: per cell, the teacher's objectness and class scores (with temperature) and, where the
teacher is confident, its decoded box; feature level: channel-wise distillation (CWD) of matched neck
maps through 1x1 adapters. Levels are matched by grid size, so a P6 teacher or a teacher running at its
own input size pairs with the student level of the same resolution.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss

from search_spaces.convert import load_official_into, read_official_checkpoint
from search_spaces.errors import ConfigError
from search_spaces.loading import load_model, resolve_arch
from search_spaces.model import Detector
from search_spaces.zoo import list_models
from trainer.callbacks import Callback
from trainer.ema import unwrap
from trainer.loss import iou_boxes


@dataclass
class DistillConfig:
    """Weights and options of the distillation terms (each weight 0 disables its term)."""

    # output weights are relative to the detection loss's own gains (1: as strong as the ground-truth term)
    w_obj: float = 1.0
    w_cls: float = 1.0
    w_box: float = 1.0
    # CWD on the neck maps: off by default. Training a half-width yolov7-tiny from scratch with a trained
    # yolov7-tiny teacher (docs/benchmarks.md), validation mAP gained 1.8 points with output terms only,
    # 0.9 with w_feat 0.25 and 0.7 with w_feat 1: at 1 the feature term is 1.5-3.6x the detection loss.
    w_feat: float = 0.0
    temperature: float = 2.0  # output logits
    feat_temperature: float = 4.0  # CWD spatial softmax
    box_conf: float = 0.3  # teacher obj*cls above which its box is a regression target
    teacher_scale: float = 1.0  # teacher input size / student input size (2.0: a P6 teacher at 1280 vs 640)
    teacher_half: bool = True  # fp16 teacher on CUDA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_teacher(ref: str, official_model: str | None = None, random_ok: bool = False, *,
                  field: str = "teacher", path: str | None = None) -> None:
    """Raise a ConfigError (at `path`, `field`) unless `ref` names a trained teacher `load_teacher` can load.

    A teacher is a model directory (arch.yaml + weights.pt) or its weights.pt, or an official checkpoint with
    its zoo model name; a zoo name, an architecture YAML or a directory without weights.pt would be a random
    teacher, which teaches nothing (`random_ok` lets one through, for plumbing checks).
    """
    where = {"path": path or ref, "field": field}
    if official_model:
        if not Path(ref).is_file():
            raise ConfigError(f"no official checkpoint at {ref!r}", **where)
        return
    if Path(ref).suffix == ".pt" and not (Path(ref).parent / "arch.yaml").is_file():
        raise ConfigError("an official checkpoint needs its zoo model name (teacher_model, --teacher-model)",
                          **where)
    try:
        _, weights = resolve_arch(ref)
    except ConfigError as e:
        raise ConfigError(e.message, **where) from None
    if weights is None and not random_ok:
        if ref in list_models():  # the likely intent: this zoo model's official weights
            raise ConfigError(f"{ref!r} is a zoo architecture with no trained weights, so the teacher would be "
                              f"random: give its official checkpoint and name ({ref}.pt with teacher_model / "
                              f"--teacher-model {ref}), or a trained model directory (arch.yaml + weights.pt)",
                              **where)
        raise ConfigError(f"{ref!r} names no trained weights, so the teacher would be random: give a model "
                          "directory (arch.yaml + weights.pt), or an official checkpoint with its zoo model name "
                          "(teacher_model, --teacher-model)", **where)


def load_teacher(ref: str, official_model: str | None = None, random_ok: bool = False) -> Detector:
    """A trained teacher: our own model directory (or its weights.pt), or an official checkpoint via the
    converter (deploy form); raises ConfigError as `check_teacher` does."""
    check_teacher(ref, official_model, random_ok)
    if official_model:
        det = load_model(official_model, form="training")
        det = load_official_into(det, read_official_checkpoint(ref), source=ref)
        return det.deploy()
    return load_model(ref)


def cell_scores(raw: Tensor, nc: int) -> tuple[Tensor, Tensor]:
    """Anchor-agnostic per-cell logits: objectness (max over anchors) and classes of the most confident anchor."""
    obj = raw[..., 4]  # [B, na, H, W]
    best = obj.argmax(1, keepdim=True)
    obj_cell = obj.gather(1, best).squeeze(1)
    cls = raw[..., 5:5 + nc]
    cls_cell = cls.gather(1, best[..., None].expand(-1, -1, -1, -1, nc)).squeeze(1)
    return obj_cell, cls_cell


def soft_bce(student: Tensor, teacher: Tensor, temperature: float, weight: Tensor | None = None) -> Tensor:
    """BCE between sigmoid(student / T) and the soft targets sigmoid(teacher / T), times T^2.

    `weight` (broadcast over the last dimension) gives a weighted mean over cells.
    """
    t = torch.sigmoid(teacher / temperature)
    if weight is None:
        return F.binary_cross_entropy_with_logits(student / temperature, t) * temperature ** 2
    bce = F.binary_cross_entropy_with_logits(student / temperature, t, reduction="none").mean(-1)
    return (bce * weight).sum() / weight.sum().clamp_min(1e-6) * temperature ** 2


def cell_kd(student: Tensor, teacher: Tensor, nc_student: int, nc_teacher: int, temperature: float,
            classes: bool = True) -> tuple[Tensor, Tensor]:
    """Output distillation at one level: (objectness term, class term) between raw maps with equal grids.

    Both are soft BCEs towards the teacher's per-cell scores; class logits are trained at objects only, so
    elsewhere the teacher's are arbitrary and the class term counts each cell by the teacher's objectness.
    """
    s_obj, s_cls = cell_scores(student, nc_student)
    t_obj, t_cls = cell_scores(teacher, nc_teacher)
    obj = soft_bce(s_obj, t_obj, temperature)
    if not classes:
        return obj, obj.new_zeros(())
    return obj, soft_bce(s_cls, t_cls, temperature, weight=torch.sigmoid(t_obj))


def cwd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Channel-wise distillation: KL between per-channel spatial softmaxes (Shu et al., 2021)."""
    b, c, h, w = teacher.shape
    s = student.reshape(b * c, h * w) / temperature
    t = teacher.reshape(b * c, h * w) / temperature
    # "batchmean" over the b*c rows already is the paper's 1/(N*C)
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True) \
        * temperature ** 2


class _Taps:
    """Forward hooks keeping the outputs of the layers that feed a Detector's lead head."""

    def __init__(self, det: Detector):
        self.out: dict[int, Tensor] = {}
        self.order = list(det.lead_inputs)
        for i in self.order:
            det.layers[i].register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            self.out[i] = out
        return hook

    def features(self) -> list[Tensor]:
        return [self.out[i] for i in self.order]


class Distiller(Callback):
    """A Trainer callback adding output- and feature-level distillation terms from a frozen teacher."""

    def __init__(self, teacher: Detector, student: Detector, cfg: DistillConfig | None = None):
        self.cfg = cfg or DistillConfig()
        if not self.cfg.teacher_scale > 0:
            raise ConfigError(f"must be > 0, got {self.cfg.teacher_scale}", field="teacher_scale")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.same_classes = teacher.nc == student.nc
        self.student_taps = _Taps(student)
        self.teacher_taps = _Taps(teacher)
        # level pairs (student level, teacher level) whose grids coincide: equal effective strides
        t_eff = [s / self.cfg.teacher_scale for s in teacher.strides]
        self.pairs = [(i, t_eff.index(s)) for i, s in enumerate(student.strides) if s in t_eff]
        if not self.pairs:
            raise ConfigError(f"no teacher level matches the student's strides {student.strides} "
                              f"(teacher strides / scale: {t_eff})", field="teacher_scale")
        s_ch = [student.channels[i] for i in student.lead_inputs]
        t_ch = [teacher.channels[i] for i in teacher.lead_inputs]
        self.adapters = nn.ModuleList(nn.Conv2d(s_ch[i], t_ch[j], 1) for i, j in self.pairs)

    def modules(self) -> list[nn.Module]:
        return [self.adapters] if self.cfg.w_feat > 0 else []

    def input_stride(self) -> int:
        """Student input sides must be multiples of it for the teacher to see a multiple of its largest stride."""
        scale = Fraction(self.cfg.teacher_scale).limit_denominator(1000)
        need = self.teacher.max_stride * scale.denominator
        return need // math.gcd(scale.numerator, need)

    def on_train_start(self, trainer: Any) -> None:
        size = trainer.cfg.imgsz * self.cfg.teacher_scale
        stride = self.teacher.max_stride
        if size != int(size) or int(size) % stride:
            raise ConfigError(f"the teacher would see {size:g} px (imgsz {trainer.cfg.imgsz} x teacher_scale "
                              f"{self.cfg.teacher_scale:g}), not a multiple of its largest stride {stride}",
                              field="teacher_scale")
        self.teacher.to(trainer.device)
        if self.cfg.teacher_half and trainer.device.type == "cuda":
            self.teacher.half()

    @torch.no_grad()
    def _teacher(self, imgs: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        p = next(self.teacher.parameters())
        x = imgs.to(p.dtype)
        if self.cfg.teacher_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.cfg.teacher_scale, mode="bilinear", align_corners=False)
        _, raw = self.teacher(x)
        return [r.float() for r in raw], [f.float() for f in self.teacher_taps.features()]

    def extra_loss(self, trainer: Any, model: Any, imgs: Tensor, targets: Tensor,
                   preds: list[Tensor]) -> dict[str, Tensor]:
        student = unwrap(model)
        t_raw, t_feat = self._teacher(imgs)
        s_feat = self.student_taps.features()
        c, dev = self.cfg, imgs.device
        zero = torch.zeros((), device=dev)
        obj_l, cls_l, box_l, feat_l = zero, zero, zero, zero
        if all(preds[i].shape[2:4] != t_raw[j].shape[2:4] for i, j in self.pairs):
            raise ConfigError(f"no student level meets a teacher level at {tuple(imgs.shape[2:])} px "
                              f"(teacher_scale {c.teacher_scale:g}): every distillation term would be zero",
                              field="teacher_scale")
        for k, (i, j) in enumerate(self.pairs):
            s, t = preds[i], t_raw[j]
            if s.shape[2:4] != t.shape[2:4]:
                continue  # grids differ at this batch's size
            obj, cls = cell_kd(s, t, student.nc, self.teacher.nc, c.temperature,
                               classes=self.same_classes and student.nc > 1)
            obj_l, cls_l = obj_l + obj, cls_l + cls
            if c.w_box > 0:
                box_l = box_l + self._box_term(student, s, i, t, j)
            if c.w_feat > 0:
                sf = self.adapters[k](s_feat[i].float())
                tf = t_feat[j]
                if sf.shape[2:] != tf.shape[2:]:
                    sf = F.interpolate(sf, size=tf.shape[2:], mode="bilinear", align_corners=False)
                feat_l = feat_l + cwd_loss(sf, tf, c.feat_temperature)
        n = len(self.pairs)
        # output terms weighted like the detection terms they shadow (the run's scaled hyp gains), so a weight
        # of 1 pulls as hard as the ground truth; without a trainer (direct calls) the gains are 1
        g = getattr(getattr(trainer, "current_loss", None), "hyp", None)
        gain_obj, gain_cls, gain_box = (g.obj, g.cls, g.box) if g is not None else (1.0, 1.0, 1.0)
        return {"kd_obj": c.w_obj * gain_obj * obj_l / n, "kd_cls": c.w_cls * gain_cls * cls_l / n,
                "kd_box": c.w_box * gain_box * box_l / n, "kd_feat": c.w_feat * feat_l / n}

    def _box_term(self, student: Detector, s: Tensor, i: int, t: Tensor, j: int) -> Tensor:
        """CIoU between the student's and the teacher's decoded boxes where the teacher is confident."""
        with torch.no_grad():
            td = self.teacher.head.decode_level(t, j)
            scale = s.shape[3] * student.strides[i] / (t.shape[3] * self.teacher.strides[j])
            t_conf = td[..., 4] * td[..., 5:].max(-1).values
            best = t_conf.argmax(1, keepdim=True)  # [B, 1, H, W]
            conf = t_conf.gather(1, best).squeeze(1)
            tbox = td[..., :4].gather(1, best[..., None].expand(-1, -1, -1, -1, 4)).squeeze(1) * scale
            mask = conf > self.cfg.box_conf
        if not mask.any():
            return torch.zeros((), device=s.device)
        sd = student.head.decode_level(s, i)  # differentiable decode of the student's raw logits
        s_best = sd[..., 4].detach().argmax(1, keepdim=True)
        sbox = sd[..., :4].gather(1, s_best[..., None].expand(-1, -1, -1, -1, 4)).squeeze(1)
        return complete_box_iou_loss(*iou_boxes(sbox[mask], tbox[mask]), reduction="mean")
