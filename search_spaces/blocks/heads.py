"""Detection heads: anchor-based Detect / IDetect / IAuxDetect (YOLOv7) and an anchor-free decoupled head."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..fusion import fold_implicit
from .conv import Conv

ANCHOR_DECIMALS = 2  # architecture YAML states anchors to 0.01 px
ANCHOR_PX = 10.0**-ANCHOR_DECIMALS


def yaml_anchors(levels: Sequence[Sequence[float]]) -> list[list[float]]:
    """Anchors (pixels, one list per level) as architecture YAML states them: rounded to ANCHOR_PX."""
    return [[round(float(v), ANCHOR_DECIMALS) for v in level] for level in levels]


def anchors_differ(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> bool:
    """Whether two anchor lists (pixels, per level) differ in shape or by more than YAML's ANCHOR_PX."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ta.shape != tb.shape or not torch.allclose(ta, tb, atol=ANCHOR_PX, rtol=0)

HEAD_TYPES = ("detect", "idetect", "iauxdetect", "decoupled")


class ImplicitA(nn.Module):
    """YOLOR implicit knowledge added to a feature map (init N(0, 0.02))."""

    def __init__(self, channels: int, mean: float = 0.0, std: float = 0.02):
        super().__init__()
        self.implicit = nn.Parameter(torch.empty(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """YOLOR implicit knowledge multiplying a feature map (init N(1, 0.02))."""

    def __init__(self, channels: int, mean: float = 1.0, std: float = 0.02):
        super().__init__()
        self.implicit = nn.Parameter(torch.empty(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit * x


def make_grid(nx: int, ny: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Cell coordinates [1, 1, ny, nx, 2] in (x, y) order."""
    yv, xv = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                            torch.arange(nx, device=device, dtype=dtype), indexing="ij")
    return torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2)


def _to_levels(t: Tensor, na: int, no: int) -> Tensor:
    b, _, h, w = t.shape
    return t.view(b, na, no, h, w).permute(0, 1, 3, 4, 2).contiguous()


class YoloHead(nn.Module):
    """YOLOv7's anchor-based head: plain (Detect), implicit (IDetect) or with auxiliary convs (IAuxDetect).

    Module and buffer names follow the official layout (`m`, `m2`, `ia`, `im`, `anchors`, `anchor_grid`).
    """

    anchor_free = False

    def __init__(self, c_in: list[int], nc: int, anchors: list[list[float]], strides: list[int],
                 implicit: bool = False, aux_c_in: list[int] | None = None):
        super().__init__()
        self.nc, self.nl, self.na, self.no = nc, len(c_in), len(anchors[0]) // 2, nc + 5
        if len(anchors) != self.nl:
            raise ValueError(f"{len(anchors)} anchor levels for {self.nl} inputs")
        self.strides = list(strides)
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("anchors", a / torch.tensor(self.strides, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, self.na, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in c_in)
        self.m2 = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in aux_c_in) if aux_c_in else None
        self.ia = nn.ModuleList(ImplicitA(c) for c in c_in) if implicit else None
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in c_in) if implicit else None
        self._init_biases(self.m)
        if self.m2 is not None:
            self._init_biases(self.m2)

    @property
    def has_aux(self) -> bool:
        return self.m2 is not None

    def anchor_sizes(self) -> list[list[float]]:
        """The anchors in pixels, one list per level, rounded to the 0.01 px that architecture YAML states."""
        return yaml_anchors(self.anchor_grid.detach().cpu().double().reshape(self.nl, -1).tolist())

    @torch.no_grad()
    def set_anchor_sizes(self, anchors: Sequence[Sequence[float]]) -> None:
        """Replace the anchors (pixels, one list per level in the head's order); both buffers change together."""
        a = torch.tensor(anchors, dtype=torch.float64)
        if a.shape != (self.nl, 2 * self.na):
            raise ValueError(f"anchors of shape {tuple(a.shape)} for a head of {self.nl} levels x {self.na} anchors")
        a = a.view(self.nl, self.na, 2)
        strides = torch.tensor(self.strides, dtype=torch.float64).view(-1, 1, 1)
        self.anchor_grid.copy_(a.view_as(self.anchor_grid).to(self.anchor_grid))
        self.anchors.copy_((a / strides).to(self.anchors))

    @torch.no_grad()
    def _init_biases(self, convs: nn.ModuleList) -> None:
        # objectness prior ~8 objects per 640 image, class prior 0.6/nc (YOLOv5/v7 initialisation)
        for conv, s in zip(convs, self.strides):
            b = conv.bias.view(self.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99)) if self.nc > 1 else 0.0

    def raw_level(self, x: Tensor, i: int) -> Tensor:
        """Raw logits of lead level i: [B, na, H, W, no]."""
        if self.ia is not None:
            x = self.ia[i](x)
        y = self.m[i](x)
        if self.im is not None:
            y = self.im[i](y)
        return _to_levels(y, self.na, self.no)

    def decode_level(self, raw: Tensor, i: int) -> Tensor:
        """Decode one level's raw logits to [B, na, H, W, no]: xywh pixels, sigmoid scores."""
        _, _, ny, nx, _ = raw.shape
        y = raw.sigmoid()
        grid = make_grid(nx, ny, raw.device, raw.dtype)
        xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.strides[i]
        wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i].to(raw.dtype)
        return torch.cat((xy, wh, y[..., 4:]), -1)

    def forward(self, feats: list[Tensor], aux_feats: list[Tensor] | None = None):
        raw = [self.raw_level(x, i) for i, x in enumerate(feats)]
        if self.training:
            if self.m2 is not None and aux_feats is not None:
                raw += [_to_levels(self.m2[i](x), self.na, self.no) for i, x in enumerate(aux_feats)]
            return raw
        b = feats[0].shape[0]
        decoded = torch.cat([self.decode_level(r, i).view(b, -1, self.no) for i, r in enumerate(raw)], 1)
        return decoded, raw

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ImplicitA/ImplicitM into the lead convs and remove them (exact)."""
        if self.ia is None and self.im is None:
            return
        for i, conv in enumerate(self.m):
            ia = self.ia[i].implicit if self.ia is not None else None
            im = self.im[i].implicit if self.im is not None else None
            w, b = fold_implicit(conv.weight, conv.bias, ia, im)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        self.ia = None
        self.im = None

    def drop_aux(self) -> None:
        """Remove the auxiliary convs (deploy form)."""
        self.m2 = None


class DecoupledHead(nn.Module):
    """Anchor-free decoupled head (YOLOX-style): per level a stem, a class branch and a box+objectness branch."""

    anchor_free = True
    has_aux = False

    def __init__(self, c_in: list[int], nc: int, strides: list[int], hidden: int = 128, depth: int = 2,
                 act: str = "silu", prior_prob: float = 0.01):
        super().__init__()
        self.nc, self.nl, self.na, self.no = nc, len(c_in), 1, nc + 5
        self.strides = list(strides)
        self.register_buffer("anchors", torch.zeros(self.nl, 1, 2))
        self.stems = nn.ModuleList(Conv(c, hidden, 1, act=act) for c in c_in)
        self.cls_convs = nn.ModuleList(
            nn.Sequential(*(Conv(hidden, hidden, 3, act=act) for _ in range(depth))) for _ in c_in)
        self.reg_convs = nn.ModuleList(
            nn.Sequential(*(Conv(hidden, hidden, 3, act=act) for _ in range(depth))) for _ in c_in)
        self.cls_preds = nn.ModuleList(nn.Conv2d(hidden, nc, 1) for _ in c_in)
        self.reg_preds = nn.ModuleList(nn.Conv2d(hidden, 4, 1) for _ in c_in)
        self.obj_preds = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in c_in)
        bias = -math.log((1 - prior_prob) / prior_prob)
        with torch.no_grad():
            for conv in [*self.cls_preds, *self.obj_preds]:
                conv.bias.fill_(bias)

    def raw_level(self, x: Tensor, i: int) -> Tensor:
        """Raw outputs of level i: [B, 1, H, W, 5 + nc] = (dx, dy, log w, log h, obj, classes)."""
        x = self.stems[i](x)
        c = self.cls_convs[i](x)
        r = self.reg_convs[i](x)
        y = torch.cat([self.reg_preds[i](r), self.obj_preds[i](r), self.cls_preds[i](c)], 1)
        return _to_levels(y, 1, self.no)

    def decode_level(self, raw: Tensor, i: int) -> Tensor:
        """Decode one level: xy = (t + cell) * stride, wh = exp(t) * stride, sigmoid scores."""
        _, _, ny, nx, _ = raw.shape
        grid = make_grid(nx, ny, raw.device, raw.dtype)
        s = self.strides[i]
        xy = (raw[..., 0:2] + grid) * s
        wh = torch.exp(raw[..., 2:4].clamp(max=10.0)) * s
        return torch.cat((xy, wh, raw[..., 4:].sigmoid()), -1)

    def forward(self, feats: list[Tensor], aux_feats: list[Tensor] | None = None):
        raw = [self.raw_level(x, i) for i, x in enumerate(feats)]
        if self.training:
            return raw
        b = feats[0].shape[0]
        return torch.cat([self.decode_level(r, i).view(b, -1, self.no) for i, r in enumerate(raw)], 1), raw

    def fuse(self) -> None:
        """Nothing to fold beyond the Conv+BN pairs, which Detector.fuse handles."""

    def drop_aux(self) -> None:
        """No auxiliary branch to drop."""
