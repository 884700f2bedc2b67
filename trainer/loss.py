"""YOLOv7 detection losses: OTA (single head), AuxOTA (lead-guided aux head) and anchor-free SimOTA.

Reproduces `utils/loss.py` of the official repo as described in shared/reference/yolov7/NOTES.md §4;
see docs/loss.md for the deviations.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (
    box_convert,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from search_spaces.errors import ConfigError, DataError
from trainer.assign import (
    Positives,
    anchor_free_assign,
    decode_grid,
    find_positive_candidates,
    grid_shapes_of,
    lead_guided_assign,
    simota_assign,
)
from trainer.hyp import Hyp

# Per-level objectness weights (official `balance`): 3 levels P3-P5, otherwise P3-P7 truncated.
BALANCE_3 = (4.0, 1.0, 0.4)
BALANCE_N = (4.0, 1.0, 0.25, 0.06, 0.02)
OTA_TOPK = 10  # ComputeLossOTA: dynamic k from the top-10 IoUs
AUX_OTA_TOPK = 20  # ComputeLossAuxOTA uses the top-20 IoUs for both fine and coarse labels
BOX_LOSSES = {"ciou": complete_box_iou_loss, "diou": distance_box_iou_loss, "giou": generalized_box_iou_loss}


def iou_boxes(pred: Tensor, target: Tensor, min_wh: float = 1e-4) -> tuple[Tensor, Tensor]:
    """cxcywh box pairs -> xyxy pairs for the IoU losses: centred on the target, sides at least `min_wh`.

    IoU, GIoU, DIoU and CIoU are translation invariant, so centring changes nothing but rounding. It keeps a
    side that underflowed to 0 (a saturated wh logit) at `min_wh` after the conversion; at coordinates in
    the hundreds it would round back to 0, and CIoU's w/h would make the loss NaN (YOLOv7 adds eps to h).
    The floor passes gradients straight through, so a tiny anchor-free box (wh = exp(t)) still learns.
    """
    centre = target[..., :2].detach()

    def xyxy(b: Tensor) -> Tensor:
        wh = b[..., 2:4]
        wh = wh + (wh.clamp_min(min_wh) - wh).detach()
        return box_convert(torch.cat((b[..., :2] - centre, wh), -1), "cxcywh", "xyxy")

    return xyxy(pred), xyxy(target)


def objectness_balance(nl: int) -> tuple[float, ...]:
    """Per-level objectness loss weights of the official losses (autobalance off)."""
    if nl == 3:
        return BALANCE_3
    if not 1 <= nl <= len(BALANCE_N):
        raise ConfigError(f"the YOLOv7 loss supports 1..{len(BALANCE_N)} detection levels, got {nl}")
    return BALANCE_N[:nl]


@dataclass(frozen=True, eq=False)
class HeadInfo:
    """What the loss needs to know about a detection head."""

    nc: int
    nl: int
    na: int
    strides: tuple[float, ...]
    anchors: Tensor  # [nl, na, 2] grid units (zeros for anchor-free)
    anchor_free: bool = False
    has_aux: bool = False

    def __post_init__(self) -> None:
        """Validate shapes so that a mismatched head fails here, not deep inside the loss."""
        if len(self.strides) != self.nl:
            raise ConfigError(f"head has nl={self.nl} levels but {len(self.strides)} strides")
        if tuple(self.anchors.shape) != (self.nl, self.na, 2):
            raise ConfigError(f"anchors must be [nl={self.nl}, na={self.na}, 2], got {list(self.anchors.shape)}")
        if self.anchor_free and self.na != 1:
            raise ConfigError(f"an anchor-free head has na=1, got {self.na}")
        if self.nc < 1:
            raise ConfigError(f"nc must be >= 1, got {self.nc}")

    @classmethod
    def from_detector(cls, det: Any) -> HeadInfo:
        """Read det.nc, det.strides and det.head.{nl, na, anchors, anchor_free, has_aux} (CONTRACTS.md)."""
        head = det.head
        return cls(nc=int(det.nc), nl=int(head.nl), na=int(head.na),
                   strides=tuple(float(s) for s in det.strides),
                   anchors=head.anchors.detach().float().clone(),
                   anchor_free=bool(getattr(head, "anchor_free", False)),
                   has_aux=bool(getattr(head, "has_aux", False)))


def bce(logits: Tensor, target: Tensor, pos_weight: float = 1.0, gamma: float = 0.0,
        reduction: str = "mean") -> Tensor:
    """BCE-with-logits ('mean' or elementwise 'none'); gamma > 0 adds the YOLOv5 focal modulation (alpha 0.25)."""
    pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    if gamma > 0:
        # Focal loss around the (pos-weighted) BCE; torchvision's sigmoid_focal_loss has no pos_weight.
        p = logits.sigmoid()
        p_t = target * p + (1 - target) * (1 - p)
        alpha_t = target * 0.25 + (1 - target) * 0.75
        loss = loss * alpha_t * (1.0 - p_t) ** gamma
    return loss.mean() if reduction == "mean" else loss


def label_targets(label_smoothing: float) -> tuple[float, float]:
    """(positive, negative) class targets with label smoothing eps (official `smooth_BCE`)."""
    return 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing


def _image_hw(imgs_shape: Any, preds: Sequence[Tensor], strides: Sequence[float]) -> tuple[int, int]:
    """Input (H, W) from an image batch / its shape, or from the first level's grid when not given."""
    if imgs_shape is None:
        return int(preds[0].shape[2] * strides[0]), int(preds[0].shape[3] * strides[0])
    if isinstance(imgs_shape, Tensor):
        imgs_shape = imgs_shape.shape
    shape = tuple(int(s) for s in imgs_shape)
    if len(shape) < 2:
        raise DataError(f"imgs_shape must end with (H, W), got {shape}")
    return shape[-2], shape[-1]


class YoloLoss:
    """YOLOv7 loss: `loss(preds, targets, imgs_shape) -> (total * batch, items [box, obj, cls])`.

    The gains in `hyp` are used as given: pass `hyp.scaled(nl, nc, imgsz)` for train.py's rescaling.
    `components()` returns the named, gain-weighted terms so callers can add their own (e.g.
    distillation) before `combine()`.
    """

    def __init__(self, head: HeadInfo, hyp: Hyp | None = None, box_loss: str = "ciou"):
        """Pick the assignment from the head: anchor-free SimOTA, OTA, or AuxOTA when it has an aux head."""
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"unknown box loss {box_loss!r} (known: {', '.join(BOX_LOSSES)})", field="box_loss")
        if head.anchor_free and head.has_aux:
            raise ConfigError("lead-guided aux assignment is defined for anchor-based heads only")
        self.head = head
        self.hyp = hyp if hyp is not None else Hyp()
        self.box_loss = BOX_LOSSES[box_loss]
        self.balance = objectness_balance(head.nl)
        self.cp, self.cn = label_targets(self.hyp.label_smoothing)
        self._anchors: dict[torch.device, Tensor] = {}

    def anchors_on(self, device: torch.device) -> Tensor:
        """Anchors [nl, na, 2] on `device` (cached: the loss runs every step)."""
        if device not in self._anchors:
            self._anchors[device] = self.head.anchors.to(device)
        return self._anchors[device]

    def __call__(self, preds: Sequence[Tensor], targets: Tensor, imgs_shape: Any = None) -> tuple[Tensor, Tensor]:
        """Total loss (scalar, already multiplied by the batch size) and detached [box, obj, cls] items."""
        parts = self.components(preds, targets, imgs_shape)
        return self.combine(parts, int(preds[0].shape[0]))

    @staticmethod
    def combine(parts: dict[str, Tensor], batch_size: int) -> tuple[Tensor, Tensor]:
        """Sum every named term, times the batch size (official scaling); items = [box, obj, cls] detached."""
        total = torch.stack([v.reshape(()) for v in parts.values()]).sum() * batch_size
        items = torch.stack([parts["box"], parts["obj"], parts["cls"]]).detach().reshape(3)
        return total, items

    def components(self, preds: Sequence[Tensor], targets: Tensor, imgs_shape: Any = None) -> dict[str, Tensor]:
        """Gain-weighted loss terms {'box', 'obj', 'cls'} (each a scalar, not multiplied by the batch size)."""
        h = self.head
        preds = list(preds)
        self._check(preds, targets)
        targets = targets.to(device=preds[0].device, dtype=torch.float32)
        img_hw = _image_hw(imgs_shape, preds, h.strides)
        lead = preds[: h.nl]
        anchors = self.anchors_on(preds[0].device)
        aux: list[Tensor] = preds[h.nl:]
        if h.anchor_free:
            fine = anchor_free_assign(lead, targets, h.strides, img_hw, topk=OTA_TOPK)
        elif aux:
            fine, coarse = lead_guided_assign(lead, targets, anchors, h.strides, img_hw, self.hyp.anchor_t,
                                              AUX_OTA_TOPK)
        else:
            # A head with an aux branch given only its lead outputs (e.g. validation) gets AuxOTA's
            # fine labels (top-20), so its loss matches the lead part of the training loss.
            topk = AUX_OTA_TOPK if h.has_aux else OTA_TOPK
            cands = find_positive_candidates(targets, anchors, grid_shapes_of(lead), self.hyp.anchor_t, 0.5)
            fine = (simota_assign(lead, targets, cands, h.strides, img_hw, topk) if self.hyp.loss_ota
                    else cands)  # loss_ota=0: every candidate is a positive for the GT that made it (YOLOv5)
        w = self.hyp.aux_weight
        box, obj, cls = self.head_terms(lead, fine, targets)
        if aux:
            box_a, obj_a, cls_a = self.head_terms(aux, coarse, targets)
            box, obj, cls = box + w * box_a, obj + w * obj_a, cls + w * cls_a
        balance = torch.tensor(self.balance, device=obj.device)
        return {"box": self.hyp.box * box.sum(), "obj": self.hyp.obj * (balance * obj).sum(),
                "cls": self.hyp.cls * cls.sum()}

    def head_terms(self, preds: Sequence[Tensor], positives: Sequence[Positives],
                   targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unweighted per-level (box [nl], obj [nl], cls [nl]) losses of one head's raw predictions.

        Each level's term is its own mean (official per-level losses); the levels are computed
        together, in flat tensors, to keep the number of kernel launches independent of nl.
        """
        h, nl, device = self.head, len(preds), preds[0].device
        counts = [len(p) for p in positives]
        pos = Positives.cat(list(positives), device)
        level = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
        # Objectness of every cell of every level, flattened level by level.
        obj_logits = torch.cat([p[..., 4].reshape(-1) for p in preds]).float()
        tobj = torch.zeros_like(obj_logits)
        box = torch.zeros(nl, device=device)
        cls = torch.zeros(nl, device=device)
        n = len(pos)
        if n:
            # fp32 even under AMP: CIoU needs the precision
            ps = torch.cat([p[q.b, q.a, q.gj, q.gi] for p, q in zip(preds, positives, strict=True)]).float()
            pbox = decode_grid(ps[:, :4], pos.gi, pos.gj, pos.anchors, h.anchor_free)
            grid = torch.tensor([[p.shape[3], p.shape[2]] for p in preds], dtype=torch.float32, device=device)[level]
            tbox = targets[pos.t, 2:6] * grid.repeat(1, 2)  # grid units of the positive's level, like pbox
            loss = self.box_loss(*iou_boxes(pbox, tbox))
            n_level = torch.tensor(counts, dtype=torch.float32, device=device).clamp(min=1)
            box = box.index_add(0, level, loss) / n_level
            # Objectness target = the detached (C)IoU of the matched prediction (gr = 1); duplicates:
            # the last write wins, as with the official in-place assignment.
            starts = torch.tensor([0, *itertools.accumulate(p[..., 4].numel() for p in preds)][:-1],
                                  device=device)
            na, hh, ww = preds[0].shape[1], grid[:, 1].long(), grid[:, 0].long()
            flat = starts[level] + ((pos.b * na + pos.a) * hh + pos.gj) * ww + pos.gi
            tobj[flat] = (1.0 - loss).detach().clamp(min=0)
            if h.nc > 1:  # one class: the class score carries no information, skip (official)
                t = torch.full_like(ps[:, 5:], self.cn)
                t[torch.arange(n, device=device), targets[pos.t, 1].long()] = self.cp
                per_row = bce(ps[:, 5:], t, self.hyp.cls_pw, self.hyp.fl_gamma, reduction="none").sum(dim=1)
                cls = cls.index_add(0, level, per_row) / (n_level * h.nc)
        per_cell = bce(obj_logits, tobj, self.hyp.obj_pw, self.hyp.fl_gamma, reduction="none")
        obj = torch.stack([c.mean() for c in per_cell.split([p[..., 4].numel() for p in preds])])
        return box, obj, cls

    def _check(self, preds: list[Tensor], targets: Tensor) -> None:
        """Fail early on predictions / targets that do not fit the head."""
        h = self.head
        if len(preds) not in ((h.nl, 2 * h.nl) if h.has_aux else (h.nl,)):
            raise ConfigError(f"expected {h.nl}{' or ' + str(2 * h.nl) if h.has_aux else ''} prediction levels, "
                              f"got {len(preds)}")
        for i, p in enumerate(preds):
            if p.dim() != 5 or p.shape[1] != h.na or p.shape[4] != 5 + h.nc:
                raise ConfigError(f"prediction {i} must be [B, {h.na}, H, W, {5 + h.nc}], got {list(p.shape)}")
        if targets.dim() != 2 or targets.shape[1] != 6:
            raise DataError(f"targets must be [n, 6] (img, cls, cx, cy, w, h), got {list(targets.shape)}")
        if targets.numel():
            img, cls, batch = targets[:, 0], targets[:, 1], preds[0].shape[0]
            bad_cls = (cls < 0) | (cls >= h.nc) | (cls != cls.round())
            bad_img = (img < 0) | (img >= batch) | (img != img.round())
            if bool((bad_cls | bad_img).any()):  # one host sync per call
                what = f"class outside 0..{h.nc - 1}" if bool(bad_cls.any()) else f"image index outside 0..{batch - 1}"
                raise DataError(f"target {what}")
