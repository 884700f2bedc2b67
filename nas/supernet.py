"""The weight-sharing supernet of a `SearchSpace`: every choice at once, any architecture as a slice.

Rules (docs/search_space.md): each template layer (by name: `p3`, `td4`, `h5`, ...) keeps one
largest module per block variant (`elan`, `elan_ghost`, `eelan`, `mp`, `conv`, ...), so different
block types never share weights; heads are kept per (type, layout). Elastic width takes the first
output channels of every conv and BatchNorm (for a conv block, the first of its `order`, which
`Supernet.sort_channels` can rewrite by importance); elastic depth runs the first `d` chain convs of an ELAN.
A conv's input channels are selected by a *layout*: the indices of the active channels inside the
largest tensor, where every concatenated part (an ELAN tap, an MP branch, a PAN lateral) owns a fixed
segment. So the same weights always meet the same feature, whatever the depth, tap or width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search_spaces.architecture import Architecture, LayerSpec
from search_spaces.blocks import (
    BLOCKS,
    SPPCSPC,
    Conv,
    DecoupledHead,
    GhostConv,
    ImplicitA,
    ImplicitM,
    MPConv,
    RepConv,
    SPPCSPTiny,
    YoloHead,
    make_act,
)
from search_spaces.blocks.conv import make_bn
from search_spaces.blocks.elan import elan_taps
from search_spaces.blocks.heads import _to_levels, anchors_differ
from search_spaces.errors import ConfigError
from search_spaces.model import Detector
from search_spaces.modes import temporary_mode
from search_spaces.space import LAYOUTS, SearchSpace, block_out_channels, load_space

_ELASTIC_ARGS = frozenset({"out", "width", "mid", "depth", "c", "tap"})  # merged by max; others must agree


def _arange(n: int) -> Tensor:
    return torch.arange(n, dtype=torch.long)


# ---- elastic leaves -------------------------------------------------------------------------------------
class DynConv2d(nn.Conv2d):
    """A Conv2d at its largest size that runs its first `out` filters on the input channels `in_idx`.

    A depthwise conv (groups == channels) slices both to the first `out` channels.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        if self.groups > 1 and not self.depthwise:
            raise ValueError("only dense and depthwise convs are elastic")
        self.configure(None, None)

    def configure(self, out: int | None, in_idx: Tensor | None, out_idx: Tensor | None = None) -> None:
        """Activate `out` filters (None: all; `out_idx`: these filters, else the first) reading the input
        channels `in_idx` (None: all)."""
        out = self.out_channels if out is None else int(out)
        if not 1 <= out <= self.out_channels:
            raise ValueError(f"{out} output channels asked of a conv with {self.out_channels}")
        if out_idx is not None and (self.depthwise or len(out_idx) != out):
            raise ValueError(f"{len(out_idx)} filter indices for {out} output channels of a "
                             f"{'depthwise' if self.depthwise else 'dense'} conv")
        self.active_out = out
        self._out_idx = out_idx
        self._in_idx: Tensor | None = None
        self._in_n = self.in_channels
        if in_idx is None or self.depthwise:
            return
        n = len(in_idx)
        if n and int(in_idx.max()) >= self.in_channels:
            raise ValueError(f"input channel {int(in_idx.max())} asked of a conv with {self.in_channels}")
        self._in_n = n
        if not torch.equal(in_idx.cpu(), _arange(n)):  # a prefix is a cheap view; anything else a gather
            self._in_idx = in_idx

    def _rows(self, t: Tensor) -> Tensor:
        """The active filters' rows of a weight or bias."""
        if self._out_idx is None:
            return t[: self.active_out]
        if self._out_idx.device != t.device:
            self._out_idx = self._out_idx.to(t.device)
        return t.index_select(0, self._out_idx)

    def active_weight(self) -> Tensor:
        w = self._rows(self.weight)
        if self.depthwise:
            return w
        if self._in_idx is None:
            return w[:, : self._in_n]
        if self._in_idx.device != w.device:
            self._in_idx = self._in_idx.to(w.device)
        return w.index_select(1, self._in_idx)

    def active_bias(self) -> Tensor | None:
        return None if self.bias is None else self._rows(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        groups = self.active_out if self.depthwise else 1
        return F.conv2d(x, self.active_weight(), self.active_bias(), self.stride, self.padding, self.dilation,
                        groups)


@contextlib.contextmanager
def frozen_bn_stats(net: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but leaves the running statistics alone."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m


class DynBN(nn.BatchNorm2d):
    """A BatchNorm2d at its largest size that normalises its C-channel input with its first C channels'
    parameters and statistics, or with those of the channels `idx` (set by the conv it follows)."""

    idx: Tensor | None = None

    def active(self, t: Tensor, n: int) -> Tensor:
        """The active channels of a parameter or buffer (a view for a prefix, else a gathered copy)."""
        if self.idx is None:
            return t[:n]
        if self.idx.device != t.device:
            self.idx = self.idx.to(t.device)
        return t.index_select(0, self.idx)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum None: cumulative average, as nn.BatchNorm2d (used to recalibrate statistics)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var = self.active(self.running_mean, n), self.active(self.running_var, n)
        # a prefix is a view, so the running statistics update in place; gathered copies are written back
        y = F.batch_norm(x, mean, var, self.active(self.weight, n), self.active(self.bias, n), self.training,
                         factor, self.eps)
        if self.idx is not None and self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.index_copy_(0, self.idx, mean)
                self.running_var.index_copy_(0, self.idx, var)
        return y


class DynImplicitA(ImplicitA):
    """ImplicitA over the active input channels (selected by the input layout)."""

    def configure(self, in_idx: Tensor) -> None:
        self._idx = in_idx

    def active(self) -> Tensor:
        idx = getattr(self, "_idx", None)
        if idx is None:
            return self.implicit
        return self.implicit.index_select(1, idx.to(self.implicit.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.active() + x


def _dynamize(module: nn.Module) -> None:
    """Replace every Conv2d, BatchNorm2d and ImplicitA below `module` by its elastic version (same state)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Conv2d:
            new: nn.Module = DynConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                       child.padding, child.dilation, child.groups, child.bias is not None)
        elif type(child) is nn.BatchNorm2d:
            new = DynBN(child.num_features, eps=child.eps, momentum=child.momentum)
        elif type(child) is ImplicitA:
            new = DynImplicitA(child.implicit.shape[1])
        else:
            _dynamize(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(module, name, new)


def _segments(parts: Iterable[tuple[Tensor, int]]) -> Tensor:
    """The layout of a concatenation: each part's active indices shifted to its fixed segment."""
    out, offset = [], 0
    for idx, size in parts:
        out.append(idx + offset)
        offset += size
    return torch.cat(out)


# ---- elastic blocks: built at their largest size; `set_active(args, input layouts) -> output layout` ----
class DynConv(Conv):
    """Conv + BN + act with elastic output width: width w runs the filters `order[:w]`.

    `order` starts as 0..C-1 (the first w filters) and is rewritten by `Supernet.sort_channels`, which
    puts the most important filters first (OFA): weights never move, so optimizer and EMA states stay valid.
    """

    def __init__(self, c_in: list[int], act: str = "silu", *, out: int, k: int = 1, s: int = 1, g: int = 1,
                 p: int | None = None):
        super().__init__(c_in[0], out, k, s, g, act, p)
        _dynamize(self)
        self.register_buffer("order", _arange(out))

    def _order(self) -> Tensor | None:
        """`order` on the CPU; None while it is still 0..C-1.

        Read afresh on every call: the EMA and DDP write buffers through `.data` or collectives, which leave
        a tensor's version counter alone, so a cache keyed on it served a stale order (seen in validation)."""
        order = self.order.detach().cpu()
        return None if torch.equal(order, _arange(len(order))) else order

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        out, order = args["out"], self._order()
        idx = None if order is None else order[:out]
        self.conv.configure(out, ins[0], idx)
        self.bn.idx = idx
        return _arange(out) if idx is None else idx


def channel_importance(conv: Conv) -> Tensor:
    """Each output channel's importance: its BatchNorm's |gamma|, the scale of the normalised channel
    (network slimming); a conv without BatchNorm ranks its filters by L1 norm."""
    if isinstance(conv.bn, nn.BatchNorm2d):
        return conv.bn.weight.detach().abs()
    return conv.conv.weight.detach().abs().flatten(1).sum(1)


class DynRepConv(RepConv):
    """RepConv with elastic output width; the identity branch is active when input and output widths match."""

    def __init__(self, c_in: list[int], act: str = "silu", *, out: int, k: int = 3, s: int = 1, g: int = 1):
        super().__init__(c_in[0], out, k, s, g, act)
        if self.rbr_identity is None and s == 1:  # some subnets have c_in == out even if the largest has not
            self.rbr_identity = make_bn(min(c_in[0], out))
        _dynamize(self)
        self._identity = self.rbr_identity is not None and self.c1 == out

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        out, x = args["out"], ins[0]
        self._identity = (self.rbr_identity is not None and self.s == 1 and len(x) == out
                          and int(x.max()) < min(self.rbr_identity.num_features, self.rbr_dense[0].out_channels))
        # with the identity, the filters follow the input's channel positions, so each channel is added to
        # its own filter whatever order the input's producer keeps (Supernet.sort_channels)
        idx = x if self._identity and not torch.equal(x, _arange(out)) else None
        for branch in (self.rbr_dense, self.rbr_1x1):
            branch[0].configure(out, x, idx)
            branch[1].idx = idx
        if self.rbr_identity is not None:
            self.rbr_identity.idx = idx
        return _arange(out) if idx is None else idx

    def forward(self, x: Tensor) -> Tensor:
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self._identity:
            y = y + self.rbr_identity(x)
        return self.act(y)


class DynGhostConv(GhostConv):
    """Ghost module with elastic width: ceil(out/2) primary channels and as many cheap ones."""

    def __init__(self, c_in: list[int], act: str = "silu", *, out: int, k: int = 1, s: int = 1,
                 dw_k: int = 5):
        super().__init__(c_in[0], out, k, s, dw_k, act)
        _dynamize(self)
        self.max_primary = self.primary_channels

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        out = args["out"]
        p = math.ceil(out / 2)
        self.cv1.conv.configure(p, ins[0])
        self.cv2.conv.configure(p, None)
        self.out_channels = out  # GhostConv.forward slices the concat to it
        return torch.cat([_arange(p), self.max_primary + _arange(p)])[:out]


class DynElan(nn.Module):
    """ELAN with elastic width, depth and tap: the concat keeps a segment per chain output (module doc)."""

    def __init__(self, c_in: list[int], act: str = "silu", *, width: int, depth: int, out: int,
                 mid: int | None = None, tap: int = 1, k: int = 3, ghost: bool = False):
        super().__init__()
        mid = width if mid is None else mid
        self.cv1 = DynConv(c_in, act, out=width)
        self.cv2 = DynConv(c_in, act, out=width)
        chain = DynGhostConv if ghost else DynConv
        self.m = nn.ModuleList(chain([width if i == 0 else mid], act, out=mid, k=k) for i in range(depth))
        # the largest concat in the official order: chain[depth], ..., chain[1], chain[0], a
        self.segment = {i: mid for i in range(depth, 0, -1)} | {0: width, "a": width}
        self.cv3 = DynConv([sum(self.segment.values())], act, out=out)
        self.depth, self.taps = depth, elan_taps(depth, 1)

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        width, depth = args["width"], args["depth"]
        mid = args.get("mid") or width
        if depth > len(self.m):
            raise ValueError(f"depth {depth} asked of an ELAN with {len(self.m)} chain convs")
        a = self.cv1.set_active({"out": width}, ins)
        chain = [self.cv2.set_active({"out": width}, ins)]
        for conv in self.m[:depth]:
            chain.append(conv.set_active({"out": mid}, chain[-1:]))
        self.depth, self.taps = depth, elan_taps(depth, args.get("tap", 1))
        layout = {t: chain[t] for t in self.taps} | {"a": a}
        idx = _segments((layout.get(key, _arange(0)), size) for key, size in self.segment.items())
        return self.cv3.set_active({"out": args["out"]}, [idx])

    def forward(self, x: Tensor) -> Tensor:
        a = self.cv1(x)
        chain = [self.cv2(x)]
        for conv in self.m[: self.depth]:
            chain.append(conv(chain[-1]))
        return self.cv3(torch.cat([chain[i] for i in self.taps] + [a], 1))


class DynEElan(nn.Module):
    """E-ELAN: `groups` elastic ELANs on the same input, summed (the official E6E form)."""

    def __init__(self, c_in: list[int], act: str = "silu", *, width: int, depth: int, out: int,
                 mid: int | None = None, tap: int = 1, k: int = 3, groups: int = 2, ghost: bool = False):
        super().__init__()
        args = {"width": width, "depth": depth, "out": out, "mid": mid, "k": k, "ghost": ghost}
        self.branches = nn.ModuleList(DynElan(c_in, act, **args) for _ in range(groups))

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        layouts = [b.set_active(args, ins) for b in self.branches]  # configure every branch
        return layouts[0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        return y


class DynMP(MPConv):
    """MP-Conv with elastic `c`; its output keeps a segment per branch and per lateral."""

    def __init__(self, c_in: list[int], act: str = "silu", *, c: int):
        super().__init__(list(c_in), c, act)
        _dynamize(self)
        self.sizes, self.max_c = list(c_in), c

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        c = args["c"]
        self.cv1.conv.configure(c, ins[0])
        self.cv2.conv.configure(c, ins[0])
        self.cv3.conv.configure(c, _arange(c))
        return _segments([(_arange(c), self.max_c), (_arange(c), self.max_c), *zip(ins[1:], self.sizes[1:])])


class DynSPPCSPC(SPPCSPC):
    """SPPCSPC with elastic width (hidden width = out)."""

    def __init__(self, c_in: list[int], act: str = "silu", *, out: int, k: list[int] | None = None):
        super().__init__(c_in[0], out, k, act)
        _dynamize(self)
        self.max_c = out

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        c, C = args["out"], self.max_c
        pools = _segments([(_arange(c), C)] * (len(self.k) + 1))
        pair = _segments([(_arange(c), C)] * 2)
        own = _arange(c)
        for cv, idx in ((self.cv1, ins[0]), (self.cv2, ins[0]), (self.cv3, own), (self.cv4, own),
                        (self.cv5, pools), (self.cv6, own), (self.cv7, pair)):
            cv.conv.configure(c, idx)
        return _arange(c)


class DynSPPCSPTiny(SPPCSPTiny):
    """yolov7-tiny's SPP with elastic width."""

    def __init__(self, c_in: list[int], act: str = "silu", *, out: int):
        super().__init__(c_in[0], out, act)
        _dynamize(self)
        self.max_c = out

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        c, C = args["out"], self.max_c
        for cv, idx in ((self.cv1, ins[0]), (self.cv2, ins[0]), (self.cv3, _segments([(_arange(c), C)] * 4)),
                        (self.cv4, _segments([(_arange(c), C)] * 2))):
            cv.conv.configure(c, idx)
        return _arange(c)


class DynShape(nn.Module):
    """A parameter-free block that keeps the channel layout (maxpool, upsample)."""

    def __init__(self, block: str, c_in: list[int], act: str = "silu", **args: Any):
        super().__init__()
        self.inner = BLOCKS[block].cls(c_in[0], **args)

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        return ins[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


class DynConcat(nn.Module):
    """Channel concatenation: each input owns a fixed segment of the largest output."""

    def __init__(self, c_in: list[int], act: str = "silu"):
        super().__init__()
        self.sizes = list(c_in)

    def set_active(self, args: Mapping[str, Any], ins: list[Tensor]) -> Tensor:
        return _segments(zip(ins, self.sizes))

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, 1)


DYNAMIC_BLOCKS: dict[str, type[nn.Module]] = {
    "conv": DynConv, "repconv": DynRepConv, "ghostconv": DynGhostConv, "elan": DynElan, "eelan": DynEElan,
    "mp": DynMP, "sppcspc": DynSPPCSPC, "sppcsp_tiny": DynSPPCSPTiny, "concat": DynConcat,
}
_SHAPE_BLOCKS = ("maxpool", "upsample")


def make_dynamic(block: str, c_in: list[int], act: str, args: Mapping[str, Any]) -> nn.Module:
    """The elastic version of a registered block at its largest size."""
    if block in _SHAPE_BLOCKS:
        return DynShape(block, c_in, act, **args)
    if block not in DYNAMIC_BLOCKS:
        raise ConfigError(f"block '{block}' has no elastic version (known: "
                          f"{', '.join(sorted([*DYNAMIC_BLOCKS, *_SHAPE_BLOCKS]))})", field="block")
    return DYNAMIC_BLOCKS[block](c_in, act, **args)


# ---- elastic heads ---------------------------------------------------------------------------------------
class DynYoloHead(YoloHead):
    """Detect/IDetect whose 1x1 convs (and ImplicitA) read the active input channels."""

    def __init__(self, c_in: list[int], nc: int, anchors: list[list[float]], strides: list[int],
                 implicit: bool):
        super().__init__(c_in, nc, anchors, strides, implicit=implicit)
        _dynamize(self)

    def set_active(self, ins: list[Tensor], hidden: int, depth: int) -> None:
        for i, idx in enumerate(ins):
            self.m[i].configure(None, idx)
            if self.ia is not None:
                self.ia[i].configure(idx)


class DynDecoupledHead(DecoupledHead):
    """The anchor-free decoupled head with elastic branch width (`hidden`) and depth."""

    def __init__(self, c_in: list[int], nc: int, strides: list[int], hidden: int, depth: int,
                 act: str = "silu"):
        super().__init__(c_in, nc, strides, hidden=hidden, depth=depth, act=act)
        _dynamize(self)
        self.active_depth = depth

    def set_active(self, ins: list[Tensor], hidden: int, depth: int) -> None:
        if depth > len(self.cls_convs[0]):
            raise ValueError(f"head depth {depth} asked of a head with {len(self.cls_convs[0])}")
        h = _arange(hidden)
        for i, idx in enumerate(ins):
            self.stems[i].conv.configure(hidden, idx)
            for branch in (self.cls_convs[i], self.reg_convs[i]):
                for conv in branch[:depth]:
                    conv.conv.configure(hidden, h)
            for pred in (self.cls_preds[i], self.reg_preds[i], self.obj_preds[i]):
                pred.configure(None, h)
        self.active_depth = depth

    def raw_level(self, x: Tensor, i: int) -> Tensor:
        x = self.stems[i](x)
        c = self.cls_convs[i][: self.active_depth](x)
        r = self.reg_convs[i][: self.active_depth](x)
        y = torch.cat([self.reg_preds[i](r), self.obj_preds[i](r), self.cls_preds[i](c)], 1)
        return _to_levels(y, 1, self.no)


# ---- the supernet ------------------------------------------------------------------------------------------
def layer_variant(layer: LayerSpec) -> str:
    """Which weights of a template layer a spec uses: its block, `_ghost` for Ghost chains."""
    return f"{layer.block}_ghost" if layer.args.get("ghost") else layer.block


def _head_key(htype: str, layout: str) -> str:
    return f"{htype}_{layout}".replace("-", "_")


def _layout_of(arch: Architecture) -> str:
    levels = tuple(round(math.log2(s)) for s in arch.head_strides())
    for name, lv in LAYOUTS.items():
        if lv == levels:
            return name
    raise ConfigError(f"head strides {arch.head_strides()} match no layout", field="head.from")


class Supernet(nn.Module):
    """All architectures of a space with shared weights; `set_active` picks one, `extract` copies it out.

    Forward runs the active architecture with a Detector's output format (train: raw levels; eval:
    `(decoded, raw)`). After `set_active`, `extract()` is a plain Detector with equal outputs.
    """

    def __init__(self, space: SearchSpace | str | Path, nc: int | None = None):
        super().__init__()
        self.space = space if isinstance(space, SearchSpace) else load_space(space)
        self.nc = nc or self.space.nc
        specs, inputs = self._collect()
        self.sizes = self._layout_sizes(specs, inputs)
        act = self.space.decisions["act"].choices[0]
        self.blocks = nn.ModuleDict()
        for (name, variant), (block, args) in specs.items():
            c_in = [max(self.sizes[s] for s in alts) for alts in inputs[name, variant]]
            if name not in self.blocks:
                self.blocks[name] = nn.ModuleDict()
            self.blocks[name][variant] = make_dynamic(block, c_in, act, args)
        self.heads = nn.ModuleDict()
        dec = self.space.decisions
        for layout in self.space.layouts:
            levels = LAYOUTS[layout]
            c_in, strides = [self.sizes[f"h{lvl}"] for lvl in levels], [2 ** lvl for lvl in levels]
            for htype in dec["head.type"].choices:
                if htype == "decoupled":
                    hidden, depth = max(dec["head.hidden"].choices), max(dec["head.depth"].choices)
                    head: nn.Module = DynDecoupledHead(c_in, self.nc, strides, hidden, depth, act)
                else:
                    head = DynYoloHead(c_in, self.nc, self.space.anchors[layout], strides, htype == "idetect")
                self.heads[_head_key(htype, layout)] = head
        self.set_active(self.space.largest_decisions())
        # {budget_ms, largest, largest_ms} when trained on the architectures within a budget only (load_supernet)
        self.trained_region: dict[str, Any] | None = None

    def _collect(self) -> tuple[dict, dict]:
        """Largest arguments and possible producers of every (layer name, variant) the space can contain."""
        specs: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        inputs: dict[tuple[str, str], list[set[str]]] = {}
        for _, layer in self.space.layer_specs():
            key = (layer.name, layer_variant(layer))
            args = dict(layer.args)
            if "width" in args:  # ELAN: mid defaults to width
                args.setdefault("mid", args["width"])
            if key not in specs:
                specs[key] = (layer.block, args)
                inputs[key] = [set() for _ in layer.inputs]
            else:
                merged = specs[key][1]
                for k, v in args.items():
                    if k in _ELASTIC_ARGS:
                        merged[k] = max(merged.get(k, v), v)
                    elif merged.get(k, v) != v:
                        raise ConfigError(f"layer '{layer.name}' ({key[1]}) takes {k}={merged[k]!r} and "
                                          f"{v!r}: cannot share weights", field=layer.name)
                    else:
                        merged[k] = v
            for alts, src in zip(inputs[key], layer.inputs):
                alts.add(src)
        return specs, inputs

    def _layout_sizes(self, specs: dict, inputs: dict) -> dict[str, int]:
        """Channels of every tensor at its largest (its segment in a concat), by fixed-point iteration."""
        sizes = {"input": self.space.in_channels}
        for _ in range(len(specs) + 1):
            changed = False
            for key, (block, args) in specs.items():
                if not all(s in sizes for alts in inputs[key] for s in alts):
                    continue
                c_in = [max(sizes[s] for s in alts) for alts in inputs[key]]
                c = block_out_channels(block, c_in, args)
                if c > sizes.get(key[0], 0):
                    sizes[key[0]], changed = c, True
            if not changed:
                return sizes
        raise RuntimeError("supernet layout sizes did not converge")  # pragma: no cover - a cyclic template

    # ---- the active architecture --------------------------------------------------------------------------
    def set_active(self, arch_or_decisions: Architecture | Mapping[str, Any]) -> Architecture:
        """Activate an architecture of the space (an Architecture it built or a decision dict); return it."""
        if isinstance(arch_or_decisions, Architecture):
            arch = arch_or_decisions
        else:
            arch = self.space.build_arch(arch_or_decisions, nc=self.nc)
        if arch.nc != self.nc or arch.fused:
            fused = ", fused" if arch.fused else ""
            raise ConfigError(f"architecture '{arch.name}' has nc={arch.nc}{fused}; the supernet has "
                              f"nc={self.nc}, unfused", field="nc")
        plan = arch.resolve()
        layouts: list[Tensor] = []
        modules: list[nn.Module] = []
        input_layout = _arange(arch.in_channels)
        for layer, ins in zip(arch.layers, plan):
            variant = layer_variant(layer)
            if layer.name not in self.blocks or variant not in self.blocks[layer.name]:
                raise ConfigError(f"layer '{layer.name}' ({variant}) is not in the supernet of space "
                                  f"'{self.space.name}'", field=layer.name or "layers")
            module = self.blocks[layer.name][variant]
            try:
                src = [input_layout if j == -1 else layouts[j] for j in ins]
                layouts.append(module.set_active(layer.args, src))
            except (ValueError, KeyError) as e:
                raise ConfigError(f"layer '{layer.name}' does not fit the supernet: {e}",
                                  field=layer.name) from None
            _set_act(module, layer.act or arch.act)
            modules.append(module)
        key = _head_key(arch.head.type, _layout_of(arch))
        if key not in self.heads:
            raise ConfigError(f"head {key} is not in the supernet", field="head.type")
        head = self.heads[key]
        lead, _ = arch.head_indices()
        head.set_active([layouts[i] for i in lead], arch.head.hidden, arch.head.depth)
        _set_act(head, arch.act)
        self._active = (arch, plan, modules, head, lead)
        return arch

    @property
    def active_arch(self) -> Architecture:
        return self._active[0]

    # ---- anchors --------------------------------------------------------------------------------------------
    def anchor_sizes(self) -> dict[str, list[list[float]]]:
        """The anchors each layout's anchor-based heads run with (pixels, one list per level)."""
        return {layout: heads[0].anchor_sizes() for layout in self.space.layouts if (heads := self._yolo_heads(layout))}

    def set_anchors(self, anchors: Mapping[str, Sequence[Sequence[float]]]) -> None:
        """Give layouts other anchors (an AutoAnchor refit): the space, every anchor-based head of the layout and
        the active architecture change together."""
        self.space = self.space.with_anchors(anchors)
        for layout, a in anchors.items():
            for head in self._yolo_heads(layout):
                head.set_anchor_sizes(a)
        arch = self._active[0]
        if not arch.head.anchor_free and _layout_of(arch) in anchors:
            self.set_active(dataclasses.replace(arch, head=dataclasses.replace(
                arch.head, anchors=[list(map(float, lv)) for lv in anchors[_layout_of(arch)]])))

    def changed_anchors(self) -> dict[str, list[list[float]]]:
        """The layouts whose heads run other anchors than the space states (by more than the 0.01 px of YAML)."""
        return {layout: running for layout, running in self.anchor_sizes().items()
                if anchors_differ(self.space.anchors[layout], running)}

    def sync_space_anchors(self) -> None:
        """Write the heads' anchors into `self.space` where they differ (weights of a supernet trained with refit
        anchors), as `Detector.sync_arch_anchors` does for an architecture."""
        changed = self.changed_anchors()
        if changed:
            self.set_anchors(changed)

    def _yolo_heads(self, layout: str) -> list[YoloHead]:
        heads = (self.heads[_head_key(t, layout)] for t in self.space.decisions["head.type"].choices)
        return [h for h in heads if isinstance(h, YoloHead)]

    @property
    def head(self) -> nn.Module:
        """The active architecture's head module (nl, na, anchors, anchor_free: what the loss reads)."""
        return self._active[3]

    @property
    def strides(self) -> list[int]:
        """The active architecture's head strides."""
        return list(self._active[0].head_strides())

    def active_modules(self) -> list[nn.Module]:
        """The modules the active architecture runs (layers, then the head)."""
        return [*self._active[2], self._active[3]]

    def forward(self, x: Tensor):
        _, plan, modules, head, lead = self._active
        outs: list[Tensor] = []
        for module, ins in zip(modules, plan):
            outs.append(module(*[x if j == -1 else outs[j] for j in ins]))
        return head([outs[i] for i in lead])

    # ---- channel order --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sort_channels(self, keep: Architecture | Mapping[str, Any] | None = None) -> int:
        """Reorder each elastic conv's filters by `channel_importance`, most important first, so that a
        narrow subnet runs the strongest channels (OFA); the summed branches of an E-ELAN share one order.

        With `keep` (an architecture or decisions; the sandwich's largest), the reordering stays inside the
        filters `keep` runs: it computes the same function afterwards, and convs it does not run keep their
        order. Filters no subnet has trained keep BatchNorm's initial gamma of 1, which outranks trained
        ones, so ranking beyond what the teacher runs would hand narrow subnets untrained filters. Without
        `keep` every filter is ranked (a supernet whose every filter is trained). Returns how many convs
        changed order."""
        active = self.active_arch
        widths: dict[int, int] | None = None
        if keep is not None:
            self.set_active(keep)
            ran = self._convs_run()
            widths = {id(c): c.conv.active_out for c in self.modules() if isinstance(c, DynConv) and id(c) in ran}
        groups: list[list[DynConv]] = []
        tied: set[int] = set()
        for m in self.modules():
            if isinstance(m, DynEElan):
                convs = [b.cv3 for b in m.branches]
                groups.append(convs)
                tied.update(id(c) for c in convs)
        groups += [[m] for m in self.modules() if isinstance(m, DynConv) and id(m) not in tied]
        changed = 0
        for convs in groups:
            current = convs[0].order
            w = len(current) if widths is None else widths.get(id(convs[0]), 0)
            if w == 0:
                continue
            importance = torch.stack([channel_importance(c) for c in convs]).sum(0).to(current.device)
            head = current[:w]
            order = torch.cat([head[torch.argsort(importance[head], descending=True, stable=True)], current[w:]])
            if not torch.equal(order, current):
                changed += len(convs)
                for c in convs:
                    c.order.copy_(order)
        self.set_active(active)  # the active convs' slices were configured with the old order
        return changed

    @torch.no_grad()
    def _convs_run(self) -> set[int]:
        """ids of the elastic convs the active architecture runs (a training-mode pass; statistics kept)."""
        # An active module holds convs it does not run too (an ELAN's chain past its depth): ask the forward.
        ran: set[int] = set()
        hooks = [c.register_forward_hook(lambda m, args, out: ran.add(id(m)))
                 for c in self.modules() if isinstance(c, DynConv)]
        size = self.space.max_stride
        x = torch.zeros(2, self.active_arch.in_channels, size, size, device=next(self.parameters()).device)
        try:
            with frozen_bn_stats(self), temporary_mode(self, training=True):
                self(x)
        finally:
            for h in hooks:
                h.remove()
        return ran

    # ---- extraction ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, arch_or_decisions: Architecture | Mapping[str, Any] | None = None, *,
                bn_batches: Iterable[Any] | None = None) -> Detector:
        """A plain Detector of the active architecture (activating `arch_or_decisions` first, if given, then
        re-estimating its BatchNorm statistics on `bn_batches`, if given) holding copies of the sliced
        weights; its outputs equal the supernet's."""
        if arch_or_decisions is not None:
            self.set_active(arch_or_decisions)
        if bn_batches is not None:
            self.recalibrate_bn(bn_batches)
        arch, _, modules, head, _ = self._active
        det = Detector(arch.copy())
        for src, dst in zip(modules, det.layers):
            _copy_weights(src, dst)
        _copy_weights(head, det.head)
        if isinstance(head, YoloHead):  # the anchors its weights were trained with, whatever the arch stated
            with torch.no_grad():
                det.head.anchor_grid.copy_(head.anchor_grid)
                det.head.anchors.copy_(head.anchors)
            det.sync_arch_anchors()
        device = next(self.parameters()).device
        return det.to(device).train(self.training)

    # ---- BatchNorm statistics -------------------------------------------------------------------------
    def reset_bn_stats(self, active_only: bool = True) -> None:
        """Reset BatchNorm running statistics (of the active modules, or of all)."""
        for bn in self._bns(active_only):
            bn.reset_running_stats()

    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable[Any], num_batches: int | None = None) -> int:
        """Re-estimate the active architecture's BatchNorm statistics from `batches` (cumulative average).

        Shared statistics fit no single subnet, so a subnet is recalibrated before it is evaluated. Each
        batch is an image tensor, or a tuple/list whose first item is one, or a dict with 'img'. Returns
        the number of batches used.
        """
        bns = self._bns(True)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        device = next(self.parameters()).device
        n = 0
        try:
            with temporary_mode(self, training=True):
                for batch in batches:
                    if num_batches is not None and n >= num_batches:
                        break
                    if isinstance(batch, Mapping):
                        batch = batch["img"]
                    elif isinstance(batch, (list, tuple)):
                        batch = batch[0]
                    self(batch.to(device).float())
                    n += 1
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
        return n

    def _bns(self, active_only: bool) -> list[nn.BatchNorm2d]:
        roots = self.active_modules() if active_only else [self]
        seen: dict[int, nn.BatchNorm2d] = {}
        for root in roots:
            for m in root.modules():
                if isinstance(m, nn.BatchNorm2d):
                    seen.setdefault(id(m), m)
        return list(seen.values())


SUPERNET_FORMAT = "detforge.supernet"


def supernet_document(net: Supernet, state_dict: Mapping[str, Tensor] | None = None,
                      **meta: Any) -> dict[str, Any]:
    """The `supernet.pt` document: plain tensors, the space (name, path, YAML text) and nc (weights_only)."""
    src = net.space.source
    # the YAML text travels with the weights, so the file loads on a machine without the space file
    text = Path(src).read_text() if src and Path(src).is_file() else None
    sd = net.state_dict() if state_dict is None else state_dict
    return {"format": SUPERNET_FORMAT, "version": 1, "space": net.space.name, "space_path": src,
            "space_yaml": text, "nc": int(net.nc), "state_dict": {k: v.detach().cpu().clone() for k, v in sd.items()},
            **meta}


def load_supernet(path: str | Path, space: SearchSpace | str | Path | None = None) -> Supernet:
    """A Supernet from a `supernet.pt` (its space from `space`, else the embedded YAML, else the recorded name)."""
    from search_spaces.errors import CheckpointError
    from search_spaces.io import load_weights

    doc = load_weights(path)
    if not isinstance(doc, dict) or doc.get("format") != SUPERNET_FORMAT:
        raise CheckpointError("not a detforge supernet file (write one with `detforge supernet train`)",
                              path=path, field="format")
    if space is None:
        if doc.get("space_yaml"):
            import yaml

            space = SearchSpace.from_dict(yaml.safe_load(doc["space_yaml"]), path=doc.get("space_path"))
        else:
            space = doc.get("space_path") if doc.get("space_path") and Path(doc["space_path"]).is_file() \
                else doc["space"]
    net = Supernet(space, nc=int(doc["nc"]))
    if doc.get("space") and net.space.name != doc["space"]:  # a space given by the caller, not the recorded one
        raise ConfigError(f"the supernet was trained on space {doc['space']!r}, not {net.space.name!r}", path=path,
                          field="space")
    # files written before channel sorting existed hold no `order` buffers: theirs is the initial one
    state = {**{k: v for k, v in net.state_dict().items() if k.endswith(".order")}, **doc["state_dict"]}
    try:
        net.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"weights do not match space '{net.space.name}' ({str(e)[:200]})", path=path,
                              field="state_dict") from None
    net.sync_space_anchors()  # a supernet trained with refit anchors (AutoAnchor) holds them in its heads
    net.trained_region = doc.get("region")
    return net


def _set_act(module: nn.Module, act: str) -> None:
    """Switch every activation below `module` to `act` (activations have no weights)."""
    for m in module.modules():
        if isinstance(m, (Conv, RepConv)) and getattr(m, "_act_name", None) != act:
            m.act = make_act(act)
            m._act_name = act


def _copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy the active slices of `src`'s leaves into the same-named leaves of the static block `dst`."""
    filled: set[int] = set()
    for name, d in dst.named_modules():
        if not isinstance(d, (nn.Conv2d, nn.BatchNorm2d, ImplicitA, ImplicitM)):
            continue
        s = src.get_submodule(name) if name else src
        if isinstance(d, nn.Conv2d):
            w = s.active_weight() if isinstance(s, DynConv2d) else s.weight
            b = s.active_bias() if isinstance(s, DynConv2d) else s.bias
            pairs = [(d.weight, w)] + ([(d.bias, b)] if d.bias is not None else [])
        elif isinstance(d, nn.BatchNorm2d):
            n = d.num_features
            sl = s.active if isinstance(s, DynBN) else lambda t, n: t[:n]
            pairs = [(d.weight, sl(s.weight, n)), (d.bias, sl(s.bias, n)), (d.running_mean, sl(s.running_mean, n)),
                     (d.running_var, sl(s.running_var, n)), (d.num_batches_tracked, s.num_batches_tracked)]
        else:
            pairs = [(d.implicit, s.active() if isinstance(s, DynImplicitA) else s.implicit)]
        for t, v in pairs:
            if v is None or t.shape != v.shape:
                got = None if v is None else tuple(v.shape)
                raise RuntimeError(f"cannot copy {name}: {got} into {tuple(t.shape)}")
            t.copy_(v)
            filled.add(id(t))
    missing = [k for k, p in dst.named_parameters() if id(p) not in filled]
    if missing:
        raise RuntimeError(f"supernet extraction left {missing[0]} unset")


__all__ = ["DYNAMIC_BLOCKS", "DynBN", "DynConv2d", "Supernet", "channel_importance", "layer_variant",
           "make_dynamic"]
