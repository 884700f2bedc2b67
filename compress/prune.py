"""Structured channel pruning of any Detector, with its Architecture rewritten so it reloads from arch.yaml.

How it works (docs/compress.md has the long form):

1. A torch-pruning `DependencyGraph` is traced in training mode (so an auxiliary head is pruned too) and
   split into groups: every set of channels that must go together (a conv's outputs, the BN after it,
   the consumers' inputs, concat offsets, ImplicitA entries, RepConv branches, residual adds).
2. Every architecture argument that sets a width (`conv.out`, `elan.width/mid/out`, `mp.c`,
   `sppcspc.out`, `downc.out`, `head.hidden`, ...) is a *width variable*; the groups of the convs it
   sizes are tied together in a *cluster*. A cluster loses the same number of channels in each of its
   groups (each group picks its own least important channels), so tied widths -- ELAN's cv1/cv2 and
   chain, SPPCSPC's seven convs, E-ELAN's branches -- stay equal and the architecture stays a plain
   YAML of the same blocks. Convs no variable describes (detection output convs, grouped/ghost convs,
   unknown blocks) are never pruned on their outputs.
3. One global ratio (times an optional per-stage weight from a measured sensitivity scan) sets how
   many channels each cluster keeps (rounded up to `round_to`); bisection finds the smallest ratio whose
   architecture meets the MACs target or the latency budget (`predict_ms(arch)`). No module is touched
   while searching: candidate architectures are built on the meta device.
4. The chosen channels are removed with `DependencyGraph.get_pruning_group(...).prune()` (importance:
   L2 magnitude, BN scale or Taylor from torch-pruning; or masks from an NNI pruner), a fresh Detector
   is built from the rewritten architecture, the pruned weights load into it strictly, and its outputs
   are checked against the pruned modules.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from search_spaces.architecture import Architecture
from search_spaces.blocks import (
    SPPCSPC,
    Add,
    Conv,
    DownC,
    EElanBlock,
    ElanBlock,
    GhostConv,
    ImplicitA,
    ImplicitM,
    MaxPool,
    MPConv,
    RepConv,
    SPPCSPTiny,
    Upsample,
)
from search_spaces.blocks.heads import DecoupledHead
from search_spaces.errors import ConfigError, DetforgeError
from search_spaces.model import Detector, count_params

from .report import OutputError, StepReport, measure_latency_ms

IMPORTANCES = ("l2", "bn", "taylor")
BACKENDS = ("torch-pruning", "nni")
NNI_PRUNERS = ("l1", "l2", "fpgm")

VarKey = tuple[Any, str]  # (layer index, argument) or ("head", "hidden")
Finetune = Callable[[Detector, int], "Detector | None"]


# ------------------------------------------------------------------------------------------- width space


@dataclass
class _Var:
    """One architecture argument that sets the output width of some convs (value = mult x their channels)."""

    key: VarKey
    value: int
    convs: list[nn.Conv2d] = field(default_factory=list)
    mult: int = 1
    frozen: bool = False


@dataclass
class _Cluster:
    """Width variables whose channel groups must lose the same number of channels."""

    keys: list[VarKey]
    groups: list[Any]  # torch-pruning Groups (full index range) rooted at the convs of these variables
    size: int  # channels of each group
    stage: str
    frozen: bool


def _block_convs(m: nn.Module) -> list[nn.Conv2d]:
    """The nn.Conv2d(s) producing a Conv / RepConv / GhostConv block's output channels (fused or not)."""
    if isinstance(m, Conv):
        return [m.conv]
    if isinstance(m, RepConv):
        return [m.rbr_reparam] if m.rbr_reparam is not None else [m.rbr_dense[0], m.rbr_1x1[0]]
    if isinstance(m, GhostConv):
        return [*_block_convs(m.cv1), *_block_convs(m.cv2)]
    return []


def _layer_vars(spec_args: dict[str, Any], m: nn.Module) -> list[tuple[str, list[nn.Conv2d], int, bool]]:
    """(argument, convs it sizes, multiplier, frozen) for one layer's module; [] for blocks without widths."""
    if isinstance(m, (Conv, RepConv)):
        convs = _block_convs(m)
        return [("out", convs, 1, any(c.groups > 1 for c in convs))]
    if isinstance(m, GhostConv):  # its output is a sliced concat of two halves: kept whole
        return [("out", _block_convs(m), 1, True)]
    if isinstance(m, (ElanBlock, EElanBlock)):
        branches = list(m.branches) if isinstance(m, EElanBlock) else [m]
        ghost = bool(spec_args.get("ghost", False))
        width = [c for b in branches for c in (*_block_convs(b.cv1), *_block_convs(b.cv2))]
        chain = [c for b in branches for layer in b.m for c in _block_convs(layer)]
        out = [c for b in branches for c in _block_convs(b.cv3)]
        if "mid" in spec_args:
            return [("width", width, 1, False), ("mid", chain, 1, ghost), ("out", out, 1, False)]
        return [("width", width + chain, 1, ghost), ("out", out, 1, False)]
    if isinstance(m, MPConv):
        return [("c", [*_block_convs(m.cv1), *_block_convs(m.cv2), *_block_convs(m.cv3)], 1, False)]
    if isinstance(m, DownC):  # cv1 (c_in wide) is tied to the input's variable by the caller
        return [("out", [*_block_convs(m.cv2), *_block_convs(m.cv3)], 2, False)]
    if isinstance(m, SPPCSPC):
        return [("out", [c for i in range(1, 8) for c in _block_convs(getattr(m, f"cv{i}"))], 1, False)]
    if isinstance(m, SPPCSPTiny):
        return [("out", [c for i in range(1, 5) for c in _block_convs(getattr(m, f"cv{i}"))], 1, False)]
    return []


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)


@contextlib.contextmanager
def _trace_mode(det: Detector) -> Iterator[Detector]:
    """Training mode (aux branch runs, raw outputs) with BatchNorm statistics left untouched."""
    was = det.training
    det.train()
    for m in det.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield det
    finally:
        det.train(was)


def _raw_forward(det: Detector, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """Training-mode forward (raw per-level outputs, aux branch included) with frozen BatchNorm statistics."""
    with _trace_mode(det):
        return det(*inputs)


class WidthSpace:
    """The prunable widths of one Detector: its dependency graph, width variables and their clusters."""

    def __init__(self, det: Detector, trace_imgsz: int | None = None):
        import torch_pruning as tp

        self.det = det
        self.arch = det.arch
        self.tp = tp
        size = trace_imgsz or 2 * det.max_stride
        x = torch.zeros(1, det.arch.in_channels, size, size, device=_device(det))
        # ImplicitA/M are bare nn.Parameters [1, C, 1, 1]: prune dim 1 along with the channels they touch.
        unwrapped = [(m.implicit, 1) for m in det.modules() if isinstance(m, (ImplicitA, ImplicitM))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # torch-pruning puts the model in eval mode before tracing; the forward_fn switches back to
            # training mode so the raw outputs (not the box decode) and any auxiliary branch are traced
            self.dg = tp.DependencyGraph().build_dependency(det, (x,), forward_fn=_raw_forward,
                                                             unwrapped_parameters=unwrapped, verbose=False)
        self.vars: dict[VarKey, _Var] = {}
        self._pinned: set[nn.Conv2d] = set()  # convs whose input width must not change
        self._collect_vars()
        self.clusters = self._build_clusters()
        self._conv_deltas()

    # ---- variables ---------------------------------------------------------------------------------------
    def _add(self, key: VarKey, value: int, convs: list[nn.Conv2d], mult: int, frozen: bool) -> None:
        var = self.vars.setdefault(key, _Var(key, value, mult=mult))
        var.convs += convs
        var.frozen |= frozen

    def _collect_vars(self) -> None:
        arch, det = self.arch, self.det
        for i, (spec, m) in enumerate(zip(arch.layers, det.layers)):
            spec_args = spec.args
            found = _layer_vars(spec_args, m)
            for arg, convs, mult, frozen in found:
                self._add((i, arg), _arg_value(spec_args, arg), convs, mult, frozen)
            if isinstance(m, DownC):
                src = self._out_var(det.plan[i][0])
                if src is None:  # the input width is not one variable: keep cv1 and its input as they are
                    self._pinned.add(m.cv1.conv)
                    self._add((i, "cv1"), m.cv1.conv.out_channels, [m.cv1.conv], 1, True)
                else:
                    self.vars[src].convs.append(m.cv1.conv)
            elif not found and not isinstance(m, (MaxPool, Upsample)):
                self._pinned.update(c for c in m.modules() if isinstance(c, nn.Conv2d))
            for c in m.modules():  # grouped convs need their input width to stay a multiple of groups
                if isinstance(c, nn.Conv2d) and c.groups > 1:
                    self._pinned.add(c)
        head = det.head
        if isinstance(head, DecoupledHead):
            convs = [c for seq in (head.stems, head.cls_convs, head.reg_convs) for m in seq.modules()
                     if isinstance(m, Conv) for c in _block_convs(m)]
            self._add(("head", "hidden"), arch.head.hidden, convs, 1, False)

    def _out_var(self, j: int) -> VarKey | None:
        """The variable equal to layer j's output width (through pass-through layers and adds), if there is one."""
        while j >= 0:
            m = self.det.layers[j]
            if isinstance(m, (MaxPool, Upsample, Add)):  # same width as (every) input: an Add ties them
                j = self.det.plan[j][0]
                continue
            var = self.vars.get((j, "out"))
            return var.key if var is not None and var.mult == 1 else None
        return None

    # ---- clusters ----------------------------------------------------------------------------------------
    def _build_clusters(self) -> list[_Cluster]:
        conv2key = {c: v.key for v in self.vars.values() for c in v.convs}
        uf = _UnionFind()
        info = []
        for g in self.dg.get_all_groups(root_module_types=[nn.Conv2d]):
            outs, ins = [], []
            for dep, _ in g:
                mod = dep.target.module
                if isinstance(mod, nn.Conv2d):
                    (outs if self.dg.is_out_channel_pruning_fn(dep.handler) else ins).append(mod)
            keys = [conv2key.get(c) for c in outs]
            bad = None in keys or any(c in self._pinned for c in ins)
            keys = sorted({k for k in keys if k is not None}, key=str)
            for k in keys[1:]:
                uf.union(keys[0], k)
            info.append((g, keys, bad))
        by_root: dict[Any, _Cluster] = {}
        frozen_roots = set()
        for g, keys, bad in info:
            if not keys:
                continue
            root = uf.find(keys[0])
            c = by_root.setdefault(root, _Cluster([], [], len(g[0].idxs), "", False))
            c.groups.append(g)
            c.keys += [k for k in keys if k not in c.keys]
            if bad or len(g[0].idxs) != c.size:
                frozen_roots.add(root)
        clusters = []
        for root, c in by_root.items():
            vs = [self.vars[k] for k in c.keys]
            c.frozen = root in frozen_roots or any(v.frozen or v.value != v.mult * c.size for v in vs)
            c.stage = self._stage(c.keys)
            clusters.append(c)
        return clusters

    def _stage(self, keys: list[VarKey]) -> str:
        """`backbone@s8`, `neck@s16`, `head`: the part of the model a cluster belongs to (first layer)."""
        layers = [k[0] for k in keys if isinstance(k[0], int)]
        if not layers:
            return "head"
        i = min(layers)
        stride = int(self.arch.strides()[i])
        return f"{'backbone' if i < len(self.arch.backbone) else 'neck'}@s{stride}"

    @property
    def prunable(self) -> list[int]:
        """Indices of the clusters that may lose channels."""
        return [i for i, c in enumerate(self.clusters) if not c.frozen]

    # ---- plans -------------------------------------------------------------------------------------------
    def keep_for(self, ratios: dict[int, float], round_to: int) -> dict[int, int]:
        """Channels each prunable cluster keeps when pruned by `ratios[i]`, rounded up to `round_to`."""
        plan = {}
        for i in self.prunable:
            size = self.clusters[i].size
            if size <= round_to:
                continue
            keep = min(size, max(round_to, round_to * math.ceil(size * (1 - ratios.get(i, 0.0)) / round_to)))
            if keep < size:
                plan[i] = keep
        return plan

    def conv_macs(self, plan: dict[int, int], hw: dict[str, int]) -> float:
        """Conv MACs of the model pruned by `plan`, from the channel counts alone (`hw`: ConvMacs.hw)."""
        ins, outs = dict(self._in0), dict(self._out0)
        for i, keep in plan.items():
            n = self.clusters[i].size - keep
            for name, d_in, d_out in self._deltas[i]:
                ins[name] -= d_in * n
                outs[name] -= d_out * n
        return sum(hw[k] * self._k2g[k] * ins[k] * outs[k] for k in hw if k in self._k2g)

    def _conv_deltas(self) -> None:
        """Per prunable cluster: how many input/output channels of each conv one pruned channel removes."""
        names = {m: n for n, m in self.det.named_modules()}
        convs = {n: m for n, m in self.det.named_modules() if isinstance(m, nn.Conv2d)}
        self._in0 = {n: m.in_channels for n, m in convs.items()}
        self._out0 = {n: m.out_channels for n, m in convs.items()}
        self._k2g = {n: m.kernel_size[0] * m.kernel_size[1] / m.groups for n, m in convs.items()}
        self._deltas: dict[int, list[tuple[str, float, float]]] = {}
        for i in self.prunable:
            c = self.clusters[i]
            acc: dict[str, list[float]] = {}
            for g in c.groups:
                for dep, idxs in g:
                    mod = dep.target.module
                    if isinstance(mod, nn.Conv2d):
                        d = acc.setdefault(names[mod], [0.0, 0.0])
                        d[1 if self.dg.is_out_channel_pruning_fn(dep.handler) else 0] += len(idxs) / c.size
            self._deltas[i] = [(n, d[0], d[1]) for n, d in acc.items()]

    def arch_for(self, plan: dict[int, int]) -> Architecture:
        """The architecture with the widths of `plan` (cluster -> channels kept)."""
        arch = self.arch.copy()
        for i, keep in plan.items():
            for key in self.clusters[i].keys:
                var = self.vars[key]
                if key[1] == "cv1":
                    continue
                if key[0] == "head":
                    arch.head.hidden = var.mult * keep
                else:
                    arch.layers[key[0]].args[key[1]] = var.mult * keep
        return arch

    def group_scores(self, importance: str) -> list[list[Tensor]]:
        """Per cluster, per group: importance of each channel (higher = keep)."""
        tp = self.tp
        imp = {"l2": tp.importance.MagnitudeImportance(p=2), "bn": tp.importance.BNScaleImportance(),
               "taylor": tp.importance.TaylorImportance()}[importance]
        fallback = tp.importance.MagnitudeImportance(p=2)
        out = []
        for c in self.clusters:
            scores = []
            for g in c.groups:
                s = None
                if importance != "taylor" or _has_grads(g):
                    s = imp(g)
                scores.append((s if s is not None else fallback(g)).detach().float().cpu())
            out.append(scores)
        return out

    def prune(self, plan: dict[int, int], idxs: dict[tuple[int, int], list[int]]) -> None:
        """Remove channels `idxs[(cluster, group)]` from the model (in place, through the dependency graph)."""
        for i in plan:
            for j, g in enumerate(self.clusters[i].groups):
                root = g[0].dep.target.module
                group = self.dg.get_pruning_group(root, g[0].dep.handler, idxs[(i, j)])
                group.prune()

    @torch.no_grad()
    def mask(self, plan: dict[int, int], idxs: dict[tuple[int, int], list[int]]) -> None:
        """Zero the channels `prune` would remove (outputs become exactly 0), for a cheap sensitivity probe."""
        for i in plan:
            for j, g in enumerate(self.clusters[i].groups):
                root = g[0].dep.target.module
                group = self.dg.get_pruning_group(root, g[0].dep.handler, idxs[(i, j)])
                for dep, item_idxs in group:
                    if not self.dg.is_out_channel_pruning_fn(dep.handler):
                        continue
                    mod, ix = dep.target.module, torch.as_tensor(item_idxs, dtype=torch.long)
                    if isinstance(mod, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
                        if mod.weight is not None:
                            mod.weight.data[ix] = 0
                        if mod.bias is not None:
                            mod.bias.data[ix] = 0
                    elif isinstance(mod, nn.Parameter) and mod.dim() > 1:
                        mod.data[:, ix] = 0


def _arg_value(args: dict[str, Any], arg: str) -> int:
    return int(args["width"] if arg == "mid" and "mid" not in args else args[arg])


def _has_grads(group: Any) -> bool:
    return all(getattr(dep.target.module, "weight", None) is None or dep.target.module.weight.grad is not None
               for dep, _ in group if isinstance(dep.target.module, nn.Conv2d))


def _device(det: nn.Module) -> torch.device:
    p = next(det.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def lowest(scores: Tensor, n: int) -> list[int]:
    """Indices of the n smallest scores (ties broken by index, so runs are deterministic)."""
    order = sorted(range(len(scores)), key=lambda k: (float(scores[k]), k))
    return sorted(order[:n])


# ------------------------------------------------------------------------------------------- cost models


def conv_macs(arch: Architecture, imgsz: int) -> int:
    """Conv multiply-adds of `arch` on the eval path for one image (meta device, no weights): a quick proxy."""
    return ConvMacs(arch, imgsz)(meta_detector(arch))


def meta_detector(arch: Architecture) -> Detector:
    """The Detector of `arch` on the meta device: shapes without weights, built in milliseconds."""
    with torch.device("meta"):
        return Detector(arch)


class ConvMacs:
    """Multiply-adds of the convs on the eval path, for any re-width of one architecture, without running it.

    Spatial sizes are read once from a meta-device forward; pruning changes only channel counts.
    """

    @torch.no_grad()
    def __init__(self, arch: Architecture, imgsz: int):
        self.hw: dict[str, int] = {}
        det = meta_detector(arch).eval()
        names = {m: n for n, m in det.named_modules()}

        def hook(m: nn.Conv2d, _inp: Any, out: Tensor) -> None:
            self.hw[names[m]] = out.shape[-2] * out.shape[-1]

        hooks = [m.register_forward_hook(hook) for m in det.modules() if isinstance(m, nn.Conv2d)]
        det(torch.zeros(1, arch.in_channels, imgsz, imgsz, device="meta"))
        for h in hooks:
            h.remove()

    def __call__(self, det: Detector) -> int:
        """MACs of `det` (a meta Detector of a re-widthed architecture is enough)."""
        return sum(self.hw[n] * (m.in_channels // m.groups) * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                   for n, m in det.named_modules() if isinstance(m, nn.Conv2d) and n in self.hw)


def _structure_changes(old: Detector, new: Detector) -> list[int]:
    """Layers whose module structure (not just widths) would differ when rebuilt: RepConv identity branches."""
    return [i for i, (a, b) in enumerate(zip(old.layers, new.layers))
            if isinstance(a, RepConv) and a.rbr_reparam is None and (a.rbr_identity is None) != (b.rbr_identity is None)]


# ------------------------------------------------------------------------------------------- the search


@dataclass
class PruneStepInfo:
    """What one pruning step did."""

    step: int
    ratio: float  # global pruning ratio found by bisection
    target: float  # MACs or predicted ms this step had to reach
    conv_macs: int
    predicted_ms: float | None
    clusters_pruned: int
    channels_removed: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Plan = dict[int, int]  # prunable cluster -> channels it keeps (clusters not listed keep all)


def _plan_for(space: WidthSpace, ratio: float, weights: dict[str, float], max_ratio: float, round_to: int) -> Plan:
    """The plan for a global ratio, scaled per stage by `weights`."""
    ratios = {i: min(max_ratio, ratio * weights.get(space.clusters[i].stage, 1.0)) for i in space.prunable}
    return space.keep_for(ratios, round_to)


def _keep_structure(space: WidthSpace, plan: Plan, round_to: int) -> Plan:
    """`plan`, adjusted so that no RepConv gains or loses its identity branch when the model is rebuilt."""
    plan = dict(plan)
    for _ in range(8):
        changed = _structure_changes(space.det, meta_detector(space.arch_for(plan)))
        if not changed:
            return plan
        # pruning made a RepConv's in/out widths equal (or unequal): move its output width one rounding step
        for layer in changed:
            ci = next(k for k, c in enumerate(space.clusters) if (layer, "out") in c.keys)
            size = space.clusters[ci].size
            keep = plan.get(ci, size)
            keep = keep - round_to if keep - round_to >= round_to else min(size, keep + round_to)
            if keep >= size:
                plan.pop(ci, None)
            else:
                plan[ci] = keep
    raise DetforgeError("could not keep RepConv identity branches consistent while pruning", field="round_to")


def _bisect(meets: Callable[[float], bool], hi: float, tol: float = 2e-3) -> float:
    """Smallest ratio in [0, hi] for which `meets(ratio)` holds (monotone), or raise if even `hi` fails."""
    if meets(0.0):
        return 0.0
    if not meets(hi):
        raise DetforgeError(f"the target is out of reach even when pruning {hi:.0%} of every prunable layer "
                            "(raise max_ratio, lower round_to, or relax the target)", field="target")
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------------- public API


def prune_detector(
    det: Detector,
    macs_ratio: float | None = None,
    *,
    latency_ms: float | None = None,
    predict_ms: Callable[[Architecture], float] | None = None,
    steps: int = 1,
    finetune: Finetune | None = None,
    finetune_epochs: int = 1,
    importance: str = "l2",
    loss_fn: Callable[[Detector], Tensor] | None = None,
    backend: str = "torch-pruning",
    nni_pruner: str = "l2",
    round_to: int = 8,
    max_ratio: float = 0.9,
    stage_sensitivity: bool = False,
    sample: Tensor | None = None,
    imgsz: int | None = None,
    evaluate: Callable[[Detector], float] | None = None,
    measure_latency: bool = False,
) -> tuple[Detector, StepReport]:
    """Prune channels until fvcore MACs <= macs_ratio x original (or predict_ms(arch) <= latency_ms).

    Returns a new Detector built from the rewritten architecture (the input is not modified) and a
    StepReport. `finetune(det, epochs)` runs between the `steps` (and after the last); `evaluate(det)`
    returns mAP for the report; `loss_fn(det)` (a scalar loss on a batch) is needed for Taylor importance.
    """
    _check_args(macs_ratio, latency_ms, predict_ms, steps, importance, loss_fn, backend, nni_pruner, round_to,
                max_ratio)
    from search_spaces.stats import count_macs

    src = det
    det = copy.deepcopy(det).requires_grad_(True)  # the graph traces gradients: a frozen (EMA) copy looks unprunable
    stats_size = det.check_imgsz(imgsz or det.arch.imgsz)  # before the work: the stats at the end trace at it
    work_size = 2 * det.max_stride  # MACs ratios do not depend on the input size; small is fast
    macs0 = count_macs(det, work_size, det.arch.in_channels)
    macs_of = ConvMacs(det.arch, work_size)  # widths change, layers and spatial sizes do not
    hw = macs_of.hw
    conv0 = macs_of(det)
    pred0 = predict_ms(det.arch) if predict_ms is not None else None
    # fvcore MACs scale exactly with the image area when it is a multiple of the largest stride
    scale = (stats_size / work_size) ** 2
    report = StepReport("prune", params_before=count_params(src), imgsz=stats_size)
    if evaluate is not None:
        report.map_before = float(evaluate(src))
    infos: list[PruneStepInfo] = []
    weights: dict[str, float] = {}
    for step in range(1, steps + 1):
        frac = step / steps
        space = WidthSpace(det)
        if importance == "taylor":
            _taylor_grads(det, loss_fn)
        scores = space.group_scores(importance)
        weights = _stage_weights(space, scores, sample, work_size, round_to) if stage_sensitivity else {}
        if latency_ms is not None:
            target = pred0 * (latency_ms / pred0) ** frac

            def cost(plan: Plan, space: WidthSpace = space) -> float:
                return predict_ms(space.arch_for(plan))
        else:
            # conv MACs stand in for fvcore's count while searching; fvcore's few other ops (BN, upsample)
            # shrink linearly with the widths, not quadratically, so the conv target leaves room for them
            r = macs_ratio ** frac
            target = r * macs0 - (macs0 - conv0) * math.sqrt(r)

            def cost(plan: Plan, space: WidthSpace = space) -> float:
                return space.conv_macs(plan, hw)
        plan, ratio = _search(space, cost, target, weights, max_ratio, round_to)
        if latency_ms is None and step == steps:
            for _ in range(3):  # make sure fvcore agrees; tighten the conv target if it does not
                macs1 = count_macs(Detector(space.arch_for(plan)), work_size, det.arch.in_channels)
                if macs1 <= macs_ratio * macs0:
                    break
                target *= macs_ratio * macs0 / macs1 * 0.999
                plan, ratio = _search(space, cost, target, weights, max_ratio, round_to)
        arch = space.arch_for(plan)
        idxs = _choose(space, plan, scores, det, backend, nni_pruner)
        space.prune(plan, idxs)
        det = _rebuild(det, arch)
        _zero_grads(det)
        infos.append(PruneStepInfo(
            step, round(ratio, 4), round(float(target), 4), macs_of(det),
            predict_ms(arch) if predict_ms is not None else None, len(plan),
            sum((space.clusters[i].size - k) * len(space.clusters[i].groups) for i, k in plan.items())))
        if finetune is not None and finetune_epochs > 0:
            # a Trainer's result is often its EMA copy, whose parameters are frozen: the dependency graph
            # traces gradients, and a frozen model would look unprunable to the next step
            det = (finetune(det, finetune_epochs) or det).requires_grad_(True)
    # counted on the final model: the last tightening's plan, and widths kept for structure, are in it
    macs1 = count_macs(det, work_size, det.arch.in_channels)
    predicted1 = predict_ms(det.arch) if predict_ms is not None else None
    report.params_after = count_params(det)
    report.gflops_before, report.gflops_after = (round(2 * m * scale / 1e9, 4) for m in (macs0, macs1))
    if evaluate is not None:
        report.map_after = float(evaluate(det))
    if measure_latency:
        report.latency_ms_before, report.latency_ms_after = measure_latency_ms([src, det], stats_size)
    report.changes = describe_changes(src.arch, det.arch)
    report.details = {"backend": backend, "importance": nni_pruner if backend == "nni" else importance,
                      "round_to": round_to, "macs_ratio": round(macs1 / macs0, 4), "target_macs_ratio": macs_ratio,
                      "latency_budget_ms": latency_ms, "predicted_ms_before": pred0,
                      "predicted_ms_after": predicted1,
                      "target_met": bool(predicted1 <= latency_ms if latency_ms is not None
                                         else macs1 <= macs_ratio * macs0 * (1 + 1e-6)),
                      "stage_weights": weights, "steps": [i.to_dict() for i in infos]}
    return det, report


def _search(space: WidthSpace, cost: Callable[[Plan], float], target: float, weights: dict[str, float],
            max_ratio: float, round_to: int) -> tuple[Plan, float]:
    """Bisect the global ratio to meet `target`, then give channels back greedily while the target still holds."""
    ratio = _bisect(lambda r: cost(_plan_for(space, r, weights, max_ratio, round_to)) <= target, max_ratio)
    plan = _plan_for(space, ratio, weights, max_ratio, round_to)
    # One global ratio moves many layers across a rounding step at once, so the bisection lands below
    # the target; refill one rounding step per cluster, sensitive stages and most-pruned clusters first.
    order = sorted(plan, key=lambda i: (weights.get(space.clusters[i].stage, 1.0), plan[i] / space.clusters[i].size))
    for i in order:
        trial = dict(plan)
        trial[i] += round_to
        if trial[i] >= space.clusters[i].size:
            del trial[i]
        if cost(trial) <= target:
            plan = trial
    return _keep_structure(space, plan, round_to), ratio


def _check_args(macs_ratio, latency_ms, predict_ms, steps, importance, loss_fn, backend, nni_pruner, round_to,
                max_ratio) -> None:
    if (macs_ratio is None) == (latency_ms is None):
        raise ConfigError("give exactly one target: macs_ratio or latency_ms", field="macs")
    if macs_ratio is not None and not 0 < macs_ratio <= 1:
        raise ConfigError(f"must be in (0, 1], got {macs_ratio}", field="macs")
    if latency_ms is not None and (predict_ms is None or latency_ms <= 0):
        raise ConfigError("a latency budget (> 0 ms) needs a predictor predict_ms(arch) (e.g. a latency table)",
                          field="latency_ms")
    if steps < 1:
        raise ConfigError(f"must be >= 1, got {steps}", field="steps")
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown importance '{importance}' (known: {', '.join(IMPORTANCES)})", field="importance")
    if importance == "taylor" and loss_fn is None:
        raise ConfigError("Taylor importance needs loss_fn(det) -> scalar loss on a batch", field="importance")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})", field="backend")
    if nni_pruner not in NNI_PRUNERS:
        raise ConfigError(f"unknown NNI pruner '{nni_pruner}' (known: {', '.join(NNI_PRUNERS)})", field="nni_pruner")
    if round_to < 1:
        raise ConfigError(f"must be >= 1, got {round_to}", field="round_to")
    if not 0 < max_ratio < 1:
        raise ConfigError(f"must be in (0, 1), got {max_ratio}", field="max_ratio")


def batch_loss(data: str | None, imgsz: int, batch: int = 16, seed: int = 0) -> Callable[[Detector], Tensor]:
    """A `loss_fn` for Taylor importance: YOLOv7's detection loss on one fixed, unaugmented training batch."""
    from trainer.datasets import YoloDataset, build_dataloader
    from trainer.hyp import load_hyp
    from trainer.loss import HeadInfo, YoloLoss
    from trainer.trainer import default_hyp_name, resolve_data_config

    data_cfg = resolve_data_config(data, imgsz)
    ds = YoloDataset.from_config(data_cfg, "train", imgsz=imgsz, augment=False, seed=seed)
    imgs, targets, *_ = next(iter(build_dataloader(ds, batch, 0, shuffle=True, seed=seed)))
    x = imgs.float() / 255.0

    def loss_fn(det: Detector) -> Tensor:
        loss = YoloLoss(HeadInfo.from_detector(det),
                        load_hyp(default_hyp_name(det)).scaled(det.head.nl, det.nc, imgsz))
        dev = next(det.parameters()).device
        preds = [p.float() for p in det(x.to(dev))]
        total, _ = YoloLoss.combine(loss.components(preds, targets.to(dev), x.shape), x.shape[0])
        return total

    return loss_fn


def _taylor_grads(det: Detector, loss_fn: Callable[[Detector], Tensor]) -> None:
    """Populate .grad with one backward pass of the user's loss (BatchNorm statistics untouched)."""
    _zero_grads(det)
    with _trace_mode(det), torch.enable_grad():
        loss = loss_fn(det)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ConfigError("loss_fn must return a scalar tensor", field="loss_fn")
        loss.backward()


def _zero_grads(det: nn.Module) -> None:
    for p in det.parameters():
        p.grad = None


def _choose(space: WidthSpace, plan: dict[int, int], scores: list[list[Tensor]], det: Detector, backend: str,
            nni_pruner: str) -> dict[tuple[int, int], list[int]]:
    """Channel indices to remove per (cluster, group): the least important, or where NNI's masks say."""
    if backend == "nni":
        scores = _nni_scores(space, plan, det, nni_pruner, scores)
    return {(i, j): lowest(scores[i][j], space.clusters[i].size - keep)
            for i, keep in plan.items() for j in range(len(space.clusters[i].groups))}


def _nni_scores(space: WidthSpace, plan: dict[int, int], det: Detector, pruner: str,
                magnitude: list[list[Tensor]]) -> list[list[Tensor]]:
    """Scores from an NNI pruner's masks: masked channels rank lowest, ties (rounding) broken by magnitude."""
    from nni.compression.pruning import FPGMPruner, L1NormPruner, L2NormPruner

    cls = {"l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner}[pruner]
    names = {m: n for n, m in det.named_modules()}
    config, roots = [], {}
    for i, keep in plan.items():
        for j, g in enumerate(space.clusters[i].groups):
            root = g[0].dep.target.module
            name = names[root]
            roots[(i, j)] = name
            n = space.clusters[i].size - keep
            config.append({"op_names": [name], "sparse_ratio": n / space.clusters[i].size})
    if not config:
        return magnitude
    work = copy.deepcopy(det)  # NNI wraps modules in place
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        _, masks = cls(work, config).compress()
    out = [list(s) for s in magnitude]
    for (i, j), name in roots.items():
        w = (masks.get(name) or {}).get("weight")
        if w is None:
            raise DetforgeError(f"NNI {pruner} pruner returned no mask for {name}", field="backend")
        kept = (w.reshape(w.shape[0], -1) != 0).any(1).float().cpu()
        mag = magnitude[i][j]
        out[i][j] = kept + mag / (mag.abs().max() + 1e-12) * 1e-3  # masked first; magnitude only breaks ties
    return out


@torch.no_grad()
def _stage_weights(space: WidthSpace, scores: list[list[Tensor]], sample: Tensor | None, imgsz: int,
                   round_to: int, probe: float = 0.3) -> dict[str, float]:
    """Per-stage ratio weights from a measured scan: mask each stage alone at `probe` and see the outputs move.

    weight = sqrt(geometric mean error / stage error), clipped to [0.25, 2]: sensitive stages are pruned less.
    """
    det = space.det
    was = det.training
    det.eval()
    x = sample if sample is not None else torch.rand(2, det.arch.in_channels, imgsz, imgsz,
                                                     generator=torch.Generator().manual_seed(0))
    x = x.to(_device(det), torch.float32)
    ref = det(x)[0].float().cpu().numpy()
    saved = {k: v.clone() for k, v in det.state_dict().items()}
    errors: dict[str, float] = {}
    for stage in sorted({space.clusters[i].stage for i in space.prunable}):
        ratios = {i: probe for i in space.prunable if space.clusters[i].stage == stage}
        plan = space.keep_for(ratios, round_to)
        if not plan:
            continue
        idxs = {(i, j): lowest(scores[i][j], space.clusters[i].size - k)
                for i, k in plan.items() for j in range(len(space.clusters[i].groups))}
        space.mask(plan, idxs)
        err = OutputError(x.shape[-1])
        err.add(ref, det(x)[0].float().cpu().numpy())
        errors[stage] = max(err.metric, 1e-12)
        det.load_state_dict(saved)
    det.train(was)
    if not errors:
        return {}
    gmean = math.exp(sum(math.log(e) for e in errors.values()) / len(errors))
    return {s: round(min(2.0, max(0.25, math.sqrt(gmean / e))), 4) for s, e in errors.items()}


@torch.no_grad()
def _rebuild(pruned: Detector, arch: Architecture) -> Detector:
    """A fresh Detector of `arch` holding the pruned weights (strict), checked output for output."""
    arch.source = None
    new = Detector(arch).to(_device(pruned))
    sd = pruned.state_dict()
    own = new.state_dict()
    wrong = [k for k in own if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    if wrong or len(sd) != len(own):
        k = wrong[0] if wrong else next(k for k in sd if k not in own)
        got = tuple(sd[k].shape) if k in sd else None
        raise DetforgeError(f"rewritten architecture does not match the pruned weights at {k}: arch gives "
                            f"{tuple(own[k].shape) if k in own else None}, pruned model has {got}", field="arch")
    new.load_state_dict(sd, strict=True)
    new.train(pruned.training)
    was = pruned.training
    pruned.eval()
    new.eval()
    x = torch.rand(1, arch.in_channels, 2 * new.max_stride, 2 * new.max_stride,
                   generator=torch.Generator().manual_seed(0)).to(_device(new))
    a, b = pruned(x)[0], new(x)[0]
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise DetforgeError(f"rebuilt pruned model differs from the pruned modules (max diff "
                            f"{(a - b).abs().max().item():.3g})", field="arch")
    new.train(was)
    return new


def describe_changes(old: Architecture, new: Architecture) -> list[str]:
    """Human-readable width changes, e.g. `neck[5] elan width 64 -> 40`."""
    out = []
    for i, (a, b) in enumerate(zip(old.layers, new.layers)):
        diffs = [f"{k} {a.args[k]} -> {b.args[k]}" for k in a.args if a.args[k] != b.args.get(k)]
        if diffs:
            where = old._where(i) + (f" ({a.name})" if a.name else "")
            out.append(f"{where} {a.block}: " + ", ".join(diffs))
    if old.head.hidden != new.head.hidden and old.head.anchor_free:
        out.append(f"head hidden {old.head.hidden} -> {new.head.hidden}")
    return out


def prunable_summary(det: Detector) -> dict[str, Any]:
    """How many width clusters a Detector has, how many may be pruned, and which are frozen (for docs/debug)."""
    space = WidthSpace(copy.deepcopy(det))
    frozen = [",".join(f"{k[0]}.{k[1]}" for k in c.keys) for c in space.clusters if c.frozen]
    return {"clusters": len(space.clusters), "prunable": len(space.prunable), "frozen": frozen}


__all__ = [
    "BACKENDS",
    "IMPORTANCES",
    "NNI_PRUNERS",
    "ConvMacs",
    "PruneStepInfo",
    "WidthSpace",
    "batch_loss",
    "describe_changes",
    "meta_detector",
    "prunable_summary",
    "prune_detector",
]
