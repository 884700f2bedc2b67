"""`SearchSpace`: a YAML template of YOLOv7-style detectors, its decisions, sampling and block signatures.

A space is a fixed template (stem, backbone stages P2..P5 (+P6), SPP, FPN/PAN neck, head) whose
per-stage choices come from YAML. An architecture is a dict of decisions (`{"backbone.p3.depth": 2,
...}`); `build_arch(decisions)` turns it into a normal `Architecture`. `block_signatures()` lists
every distinct block (type, arguments, input shapes, activation) any architecture of the space can
contain, so a latency table can time each one in isolation. See docs/search_space.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import random as _random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architecture import Architecture, HeadSpec, LayerSpec, _block_stride, check_anchor_order
from .blocks import ACTIVATIONS, BLOCKS, DecoupledHead, YoloHead
from .blocks.elan import elan_taps
from .errors import ConfigError
from .io import read_yaml

SPACES_DIR = Path(__file__).parent / "spaces"

LAYOUTS: dict[str, tuple[int, ...]] = {"p3-p4": (3, 4), "p3-p5": (3, 4, 5), "p3-p6": (3, 4, 5, 6)}
ELAN_BLOCKS = ("elan", "eelan", "ghost_elan")
BACKBONE_DOWN = ("maxpool", "mp", "conv")
NECK_DOWN = ("conv", "mp")
SPP_BLOCKS = ("sppcsp_tiny", "sppcspc")
SPACE_HEAD_TYPES = ("idetect", "detect", "decoupled")
HEAD_CONVS = ("conv", "repconv")

# How categorical choices rank by cost, for largest()/smallest(); numeric choices rank by value,
# except `tap`, where a larger step concatenates fewer chain outputs (a smaller block).
_COST_ORDER: dict[str, tuple[str, ...]] = {
    "block": ("ghost_elan", "elan", "eelan"),
    "down": ("maxpool", "mp", "conv"),
    "spp.block": SPP_BLOCKS,
    "head.layout": ("p3-p4", "p3-p5", "p3-p6"),
    "head.type": ("detect", "idetect", "decoupled"),
    "head.conv": HEAD_CONVS,
    "act": ("identity", "relu", "leaky_relu", "silu"),
}
_NO_ACT_BLOCKS = frozenset({"maxpool", "upsample", "concat", "add", "reorg"})  # the activation is unused
HEAD_BLOCKS = ("head.yolo", "head.decoupled")  # signature names of one head level


# ---- the space as validated dataclasses ------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """One architecture decision: its name (`backbone.p3.depth`), choices and the YAML field setting it."""

    name: str
    choices: tuple
    field: str

    @property
    def fixed(self) -> bool:
        return len(self.choices) == 1


@dataclass
class SearchSpace:
    """A YOLOv7-style template with per-stage choices; see the module docstring and docs/search_space.md."""

    name: str
    decisions: dict[str, Decision]
    anchors: dict[str, list[list[float]]]
    nc: int = 80
    in_channels: int = 3
    description: str = ""
    source: str | None = field(default=None, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search-space YAML file."""
        return cls.from_dict(read_yaml(path), path=str(path))

    @classmethod
    def from_dict(cls, raw: Any, path: str | None = None) -> SearchSpace:
        """Validate a parsed YAML mapping (ConfigError naming the file and field on any problem)."""
        return _parse_space(raw, path)

    def with_nc(self, nc: int | None) -> SearchSpace:
        """The same space for a dataset with `nc` classes (head signatures and built architectures change)."""
        if nc is None or nc == self.nc:
            return self
        return dataclasses.replace(self, nc=nc)  # init=False: the copy starts with an empty cache

    def with_anchors(self, anchors: Mapping[str, Sequence[Sequence[float]]]) -> SearchSpace:
        """The same space with other anchors for some layouts (pixels, one list per level; an AutoAnchor refit)."""
        merged = {**self.anchors, **{k: [[float(v) for v in lv] for lv in a] for k, a in anchors.items()}}
        for layout, a in anchors.items():
            old = self.anchors.get(layout)
            if old is None or [len(lv) for lv in a] != [len(lv) for lv in old]:
                raise ConfigError(f"anchors of {[len(lv) // 2 for lv in a]} per level do not fit layout {layout!r}",
                                  path=self.source, field=f"head.anchors.{layout}")
        return self if merged == self.anchors else dataclasses.replace(self, anchors=merged)

    # ---- decisions ---------------------------------------------------------------------------------------
    @property
    def layouts(self) -> tuple[str, ...]:
        return self.decisions["head.layout"].choices

    @property
    def max_stride(self) -> int:
        """The largest stride of any architecture of the space: an input size must be a multiple of it."""
        return max(2 ** _top(layout) for layout in self.layouts)

    def complete(self, decisions: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a (possibly partial) decision dict and fill fixed and irrelevant decisions.

        Unknown names and values outside the choices are ConfigErrors; a missing decision is one too,
        unless it is fixed or the chosen head layout/type does not use it (then its first choice is taken).
        """
        if not isinstance(decisions, Mapping):
            raise ConfigError(f"decisions must be a mapping, got {type(decisions).__name__}",
                              field="decisions")
        unknown = [k for k in decisions if k not in self.decisions]
        if unknown:
            raise ConfigError(f"unknown decision for space '{self.name}'", path=self.source, field=unknown[0])
        out: dict[str, Any] = {}
        for name, dec in self.decisions.items():
            if name in decisions:
                out[name] = _as_choice(dec, decisions[name], self.source)
        layout = out.get("head.layout", self.decisions["head.layout"].choices[0])
        htype = out.get("head.type", self.decisions["head.type"].choices[0])
        needed = self._relevant(layout, htype)
        for name, dec in self.decisions.items():
            if name not in out:
                if name in needed and not dec.fixed:
                    raise ConfigError("missing decision", path=self.source, field=name)
                out[name] = dec.choices[0]
        return out

    def decisions_of(self, trial_or_params: Any) -> dict[str, Any]:
        """The complete decision dict of an Optuna trial (`Trial`, `FrozenTrial`) or of a params mapping."""
        params = getattr(trial_or_params, "params", trial_or_params)
        return self.complete(params)

    def sample_decisions(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for every open decision (always the same static set: samplers can model it)."""
        d: dict[str, Any] = {}
        for name, dec in self.decisions.items():
            if dec.fixed:
                d[name] = dec.choices[0]
                continue
            step = _int_step(dec.choices)
            if step is not None:  # evenly spaced integers: an ordinal distribution samplers can model
                d[name] = trial.suggest_int(name, dec.choices[0], dec.choices[-1], step=step)
            else:
                d[name] = trial.suggest_categorical(name, list(dec.choices))
        return self.complete(d)

    def sample(self, trial: Any) -> Architecture:
        """The architecture an Optuna trial chooses (one `suggest_*` per open decision)."""
        return self.build_arch(self.sample_decisions(trial))

    def random_decisions(self, rng: _random.Random | Any = None) -> dict[str, Any]:
        """Uniformly random decisions from a `random.Random`, a `numpy.random.Generator` or None (fresh)."""
        rng = _random.Random() if rng is None else rng
        if isinstance(rng, _random.Random):
            pick = rng.randrange
        else:  # numpy Generator: index the choices, so mixed-type choices keep their Python types
            def pick(n: int) -> int:
                return int(rng.integers(n))
        return {name: dec.choices[pick(len(dec.choices))] for name, dec in self.decisions.items()}

    def random(self, rng: _random.Random | Any = None) -> Architecture:
        """A uniformly random architecture."""
        return self.build_arch(self.random_decisions(rng))

    def largest_decisions(self) -> dict[str, Any]:
        """Every decision at its most expensive choice."""
        return {n: max(d.choices, key=lambda v, n=n: _rank(n, v)) for n, d in self.decisions.items()}

    def smallest_decisions(self) -> dict[str, Any]:
        """Every decision at its cheapest choice."""
        return {n: min(d.choices, key=lambda v, n=n: _rank(n, v)) for n, d in self.decisions.items()}

    def largest(self) -> Architecture:
        """The most expensive architecture (the supernet's full width and depth)."""
        return self.build_arch(self.largest_decisions())

    def smallest(self) -> Architecture:
        """The cheapest architecture."""
        return self.build_arch(self.smallest_decisions())

    def size(self) -> int:
        """The exact number of distinct architectures.

        Decisions the chosen head layout/type does not use (P6 stages, decoupled-head sizes) do not
        multiply, and ELAN (depth, tap) pairs that concatenate the same chain outputs count once.
        """
        total = 0
        for layout in self.layouts:
            for htype in self.decisions["head.type"].choices:
                needed = self._relevant(layout, htype) - {"head.layout", "head.type"}
                n = 1
                for name in sorted(needed):
                    if name.endswith(".tap"):
                        continue  # counted with its depth
                    if name.endswith(".depth") and name[:-6] + ".tap" in needed:
                        taps = self.decisions[name[:-6] + ".tap"].choices
                        depths = self.decisions[name].choices
                        n *= len({(d, tuple(elan_taps(d, t))) for d in depths for t in taps})
                    else:
                        n *= len(self.decisions[name].choices)
                total += n
        return total

    # ---- building ------------------------------------------------------------------------------------------
    def build_arch(self, decisions: Mapping[str, Any], nc: int | None = None,
                   name: str | None = None) -> Architecture:
        """The Architecture of a decision dict (a normal Architecture: Detector, save/load and info work)."""
        d = self.complete(decisions)
        layout = d["head.layout"]
        backbone: list[LayerSpec] = []
        neck: list[LayerSpec] = []
        for slot in self._slots(layout):
            (backbone if slot.section == "backbone" else neck).extend(slot.build(d))
        _implicit_previous(backbone + neck)
        levels = LAYOUTS[layout]
        htype = d["head.type"]
        head = HeadSpec(type=htype, inputs=[f"h{lvl}" for lvl in levels],
                        anchors=None if htype == "decoupled" else [list(a) for a in self.anchors[layout]])
        if htype == "decoupled":
            head.hidden, head.depth = d["head.hidden"], d["head.depth"]
        arch = Architecture(name=name or self.name, nc=nc or self.nc, backbone=backbone, neck=neck, head=head,
                            act=d["act"], imgsz=d["imgsz"], in_channels=self.in_channels,
                            description=f"sampled from search space '{self.name}'")
        arch.validate()
        if name is None:
            arch.name = f"{self.name}-{_structure_id(arch)}"
        return arch

    def arch_id(self, decisions: Mapping[str, Any]) -> str:
        """A short stable id of the architecture of `decisions` (equal architectures, equal ids)."""
        return _structure_id(self.build_arch(decisions, name=self.name))

    def zoo_point(self, name: str, *, nearest: bool = False, imgsz: int | None = None) -> dict[str, Any]:
        """The decisions of a zoo model ('yolov7-tiny', 'yolov7') in this template.

        With `nearest=False` every value must be a choice of the space (ConfigError naming the first one
        that is not); with `nearest=True` each value snaps to the closest choice (numbers by ratio,
        categories fall back to the first choice). yolov7 is never exact: its 4-conv stem has no
        counterpart in the template (the nearest point uses the 2-conv stem). `imgsz` replaces the zoo
        model's input size (the same network at another resolution, as a search pinned to a table's).
        """
        if name not in _ZOO_POINTS:
            raise ConfigError(f"no template point for '{name}' (known: {', '.join(_ZOO_POINTS)})",
                              field="name")
        target = _ZOO_POINTS[name](self)
        if imgsz is not None:
            target["imgsz"] = imgsz
        out: dict[str, Any] = {}
        for key, dec in self.decisions.items():
            want = target.get(key, dec.choices[0])
            if want in dec.choices:
                out[key] = want
            elif not nearest:
                raise ConfigError(f"{name} is not in space '{self.name}': {key}={want!r} not in "
                                  f"{list(dec.choices)} (use nearest=True)", path=self.source, field=key)
            else:
                out[key] = _nearest(dec.choices, want)
        return out

    # ---- block signatures ---------------------------------------------------------------------------
    def block_signatures(self, imgsz: int | Iterable[int] | None = None, batch: int = 1,
                         nc: int | None = None) -> list[BlockSignature]:
        """Every distinct block signature reachable in the space, sorted by key.

        Enumerated per template slot over the decisions it depends on (never per architecture), so it is
        complete: every layer and head level of every architecture of the space (at these sizes) is in it.
        `imgsz` None means every imgsz choice.
        """
        sizes = self.decisions["imgsz"].choices if imgsz is None else (
            (imgsz,) if isinstance(imgsz, int) else tuple(imgsz))
        acts = self.decisions["act"].choices
        nc = nc or self.nc
        protos: set[tuple] = set()
        for layout in self.layouts:
            for slot in self._slots(layout):
                for d in self._assignments(slot.support):
                    known = {n: (_tensor_channels(self, n, d, layout), _tensor_stride(n, layout))
                             for n in slot.external}
                    for layer, ins in _walk_named(slot.build(d), known):
                        protos.add((layer.block, _canonical_args(layer.block, layer.args), tuple(ins)))
            for lvl in LAYOUTS[layout]:
                support = (f"neck.p{lvl}.out", "head.type", "head.expand", "head.hidden", "head.depth")
                for d in self._assignments(support):
                    c = _tensor_channels(self, f"h{lvl}", d, layout)
                    protos.add(_head_proto(d["head.type"], nc, c, 2 ** lvl, self._level_anchors(layout, lvl),
                                           d["head.hidden"], d["head.depth"]))
        out = {_finish(proto, act, s, batch) for proto in protos for act in acts for s in sizes}
        return sorted(out, key=BlockSignature.key)

    def _level_anchors(self, layout: str, lvl: int) -> tuple[float, ...] | None:
        a = self.anchors.get(layout)
        return None if a is None else tuple(float(v) for v in a[LAYOUTS[layout].index(lvl)])

    def _assignments(self, support: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Every combination of the choices of `support` (a dict holding only those decisions)."""
        names = list(dict.fromkeys(support))
        for values in itertools.product(*(self.decisions[n].choices for n in names)):
            yield dict(zip(names, values))

    # ---- the template -------------------------------------------------------------------------------
    def _slots(self, layout: str) -> list[_Slot]:
        """The template's layers for a head layout, in groups that each depend on a few decisions."""
        return _template_slots(self, layout)

    def _relevant(self, layout: str, htype: str) -> set[str]:
        """The decisions that shape architectures of this head layout and type."""
        return _relevant(self, layout, htype)

    def layer_specs(self) -> Iterator[tuple[str, LayerSpec]]:
        """(layout, layer) for every distinct layer architectures can hold (explicit `from`s)."""
        seen: set[str] = set()
        for layout in self.layouts:
            for slot in self._slots(layout):
                for d in self._assignments(slot.support):
                    for layer in slot.build(d):
                        key = json.dumps([layout, layer.to_dict()], sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            yield layout, layer


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A search space by name (`default`, `tiny`: search_spaces/spaces/*.yaml) or YAML path."""
    p = Path(name_or_path)
    named = SPACES_DIR / f"{name_or_path}.yaml"
    if not p.exists() and named.is_file():
        return SearchSpace.from_yaml(named)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return SearchSpace.from_yaml(p)
    names = sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))
    raise ConfigError(f"no such search space or file (spaces: {', '.join(names)})", path=str(name_or_path))


# ---- block signatures -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSignature:
    """One block as a latency table times it: type, all constructor args, input shapes, activation, batch.

    `block` is a registry name or `head.yolo` / `head.decoupled` (one head level with its box decoding).
    """

    block: str
    args: tuple[tuple[str, Any], ...]
    in_shapes: tuple[tuple[int, int, int], ...]
    act: str = ""
    batch: int = 1

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (tuples back to lists)."""
        return {k: _thaw(v) for k, v in self.args}

    def key(self) -> str:
        """A stable one-line id, e.g. `conv(g=1,k=3,out=32,p=null,s=2)|3x320x320|leaky_relu|b1`."""
        args = ",".join(f"{k}={json.dumps(_thaw(v), separators=(',', ':'))}" for k, v in self.args)
        shapes = "+".join("x".join(map(str, s)) for s in self.in_shapes)
        return f"{self.block}({args})|{shapes}|{self.act or '-'}|b{self.batch}"

    def input_shapes(self) -> list[tuple[int, int, int, int]]:
        """The input tensor shapes, batch included: [(B, C, H, W), ...]."""
        return [(self.batch, *s) for s in self.in_shapes]

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "args": self.kwargs, "in_shapes": [list(s) for s in self.in_shapes],
                "act": self.act, "batch": self.batch}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockSignature:
        return cls(block=d["block"], args=tuple(sorted((k, _freeze(v)) for k, v in d["args"].items())),
                   in_shapes=tuple(tuple(int(v) for v in s) for s in d["in_shapes"]), act=d.get("act", ""),
                   batch=int(d.get("batch", 1)))

    def build_module(self) -> nn.Module:
        """The block as an nn.Module in eval mode; call it with one tensor per input shape."""
        kw = self.kwargs
        c_in = [s[0] for s in self.in_shapes]
        if self.block in HEAD_BLOCKS:
            return HeadLevel(self.block, c_in[0], act=self.act or "silu", **kw).eval()
        act = {"act": self.act} if self.act else {}
        return BLOCKS[self.block].cls(c_in[0] if len(c_in) == 1 else c_in, **act, **kw).eval()


class HeadLevel(nn.Module):
    """One level of a detection head with its decoding (eval mode returns `(decoded, [raw])`), for timing."""

    def __init__(self, kind: str, c_in: int, *, nc: int, stride: int, act: str = "silu", na: int = 3,
                 implicit: bool = False, hidden: int = 128, depth: int = 2):
        super().__init__()
        if kind == "head.yolo":  # anchors of the stride's size: their values do not change the time
            self.head = YoloHead([c_in], nc, [[float(stride)] * 2 * na], [stride], implicit=implicit)
        else:
            self.head = DecoupledHead([c_in], nc, [stride], hidden=hidden, depth=depth, act=act)

    def forward(self, x: Tensor):
        return self.head([x])


def arch_signatures(arch: Architecture, imgsz: int | None = None, batch: int = 1) -> list[BlockSignature]:
    """Per-layer signatures of one Architecture (one per layer, then one per lead head level)."""
    imgsz = imgsz or arch.imgsz
    plan = arch.resolve(arch.source)
    strides = arch.strides(arch.source)
    channels: list[int] = []
    out: list[BlockSignature] = []
    for layer, ins in zip(arch.layers, plan):
        src = [(arch.in_channels, 1.0) if j == -1 else (channels[j], strides[j]) for j in ins]
        channels.append(block_out_channels(layer.block, [c for c, _ in src], layer.args))
        proto = (layer.block, _canonical_args(layer.block, layer.args), tuple(src))
        out.append(_finish(proto, layer.act or arch.act, imgsz, batch))
    lead, _ = arch.head_indices(arch.source)
    for k, (i, s) in enumerate(zip(lead, arch.head_strides(arch.source))):
        anchors = None if arch.head.anchor_free else tuple(float(v) for v in arch.head.anchors[k])
        # the aux branch is training-only
        htype = "idetect" if arch.head.type == "iauxdetect" else arch.head.type
        proto = _head_proto(htype, arch.nc, channels[i], s, anchors, arch.head.hidden, arch.head.depth)
        out.append(_finish(proto, arch.act, imgsz, batch))
    return out


def _head_proto(htype: str, nc: int, c: int, stride: int, anchors: tuple[float, ...] | None, hidden: int,
                depth: int) -> tuple:
    if htype == "decoupled":
        args = {"nc": nc, "stride": stride, "hidden": hidden, "depth": depth}
        kind = "head.decoupled"
    else:  # its time depends on how many anchors, not their sizes: a refit (AutoAnchor) keeps its table entries
        args = {"nc": nc, "stride": stride, "na": len(anchors or ()) // 2, "implicit": htype == "idetect"}
        kind = "head.yolo"
    return kind, tuple(sorted((k, _freeze(v)) for k, v in args.items())), ((c, float(stride)),)


def _finish(proto: tuple, act: str, imgsz: int, batch: int) -> BlockSignature:
    """A signature from (block, canonical args, [(channels, stride)]) at one input size."""
    block, args, ins = proto
    shapes = []
    for c, s in ins:
        hw = imgsz / s
        if hw != int(hw):
            raise ConfigError(f"imgsz {imgsz} is not divisible by stride {s:g}", field="imgsz")
        shapes.append((int(c), int(hw), int(hw)))
    uses_act = block not in _NO_ACT_BLOCKS and block != "head.yolo"
    return BlockSignature(block=block, args=args, in_shapes=tuple(shapes), act=act if uses_act else "",
                          batch=batch)


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


@cache
def _defaults(block: str) -> dict[str, Any]:
    entry = BLOCKS[block]
    return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in entry.params.items()}


def _canonical_args(block: str, args: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """All constructor arguments (defaults filled in), sorted, hashable: equal modules get equal args."""
    full = {**_defaults(block), **args}
    if "mid" in full and "width" in full and full["mid"] is None:  # ELAN: mid=None means mid=width
        full["mid"] = full["width"]
    return tuple(sorted((k, _freeze(v)) for k, v in full.items()))


def block_out_channels(block: str, c_in: list[int], args: Mapping[str, Any]) -> int:
    """Output channels of a block without building it (the meta device answers for unlisted blocks)."""
    if "out" in args:
        return int(args["out"])
    if block in ("maxpool", "upsample", "add"):
        return c_in[0]
    if block == "concat":
        return sum(c_in)
    if block == "mp":
        return 2 * int(args["c"]) + sum(c_in[1:])
    return _meta_out_channels(block, tuple(c_in), json.dumps(dict(args), sort_keys=True))


@lru_cache(maxsize=4096)
def _meta_out_channels(block: str, c_in: tuple[int, ...], args_json: str) -> int:
    with torch.device("meta"):
        m = BLOCKS[block].cls(c_in[0] if len(c_in) == 1 else list(c_in), **json.loads(args_json))
    return int(m.out_channels)


def _walk_named(layers: list[LayerSpec], known: dict[str, tuple[int, float]]
                ) -> Iterator[tuple[LayerSpec, list[tuple[int, float]]]]:
    """Each layer of a slot with its inputs' (channels, stride); every layer names its inputs explicitly."""
    for layer in layers:
        ins = [known[r] for r in layer.inputs]
        yield layer, ins
        c = block_out_channels(layer.block, [c for c, _ in ins], layer.args)
        known[layer.name] = (c, ins[0][1] * _block_stride(layer))


# ---- the template ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    """Template layers with the decisions they read (`support`) and the tensors they read from other slots."""

    section: str
    support: tuple[str, ...]
    external: tuple[str, ...]
    build: Callable[[Mapping[str, Any]], list[LayerSpec]]


def _top(layout: str) -> int:
    """The deepest backbone level: the SPP sits there (P5, or P6 for the P3-P6 layout)."""
    return max(LAYOUTS[layout][-1], 5)


def _stage_keys(space: SearchSpace, stage: str) -> list[str]:
    keys = (f"{stage}.{k}" for k in ("block", "depth", "tap", "width", "mid"))
    return [k for k in keys if k in space.decisions]


def _channels(x: float) -> int:
    return round(x)


def _elan(space: SearchSpace, d: Mapping[str, Any], stage: str, out: int, name: str, src: str) -> LayerSpec:
    """The ELAN-family layer of a stage: elan, eelan or ghost_elan (= elan with Ghost chain convs)."""
    block, depth, tap = d[f"{stage}.block"], d[f"{stage}.depth"], d[f"{stage}.tap"]
    taps = elan_taps(depth, tap)
    tap = next(t for t in range(1, tap + 1) if elan_taps(depth, t) == taps)  # equal blocks, equal args
    width = _channels(out * d[f"{stage}.width"])
    mid = _channels(out * d[f"{stage}.mid"]) if f"{stage}.mid" in space.decisions else width
    args: dict[str, Any] = {"width": width, "depth": depth}
    if mid != width:
        args["mid"] = mid
    if tap != 1:
        args["tap"] = tap
    args["out"] = out
    if block == "ghost_elan":
        args["ghost"] = True
    return LayerSpec("eelan" if block == "eelan" else "elan", args, name=name, inputs=[src])


def _template_slots(space: SearchSpace, layout: str) -> list[_Slot]:
    levels, top = LAYOUTS[layout], _top(layout)
    slots: list[_Slot] = []

    def add(section: str, support: list[str], external: list[str], fn: Callable) -> None:
        slots.append(_Slot(section, tuple(dict.fromkeys(support)), tuple(external), fn))

    add("backbone", ["stem.width", "stem.out"], ["input"], lambda d: [
        LayerSpec("conv", {"out": d["stem.width"], "k": 3, "s": 2}, name="stem1", inputs=["input"]),
        LayerSpec("conv", {"out": d["stem.out"], "k": 3, "s": 2}, name="stem2", inputs=["stem1"])])
    add("backbone", ["stem.out", *_stage_keys(space, "backbone.p2"), "backbone.p2.out"], ["stem2"],
        lambda d: [_elan(space, d, "backbone.p2", d["backbone.p2.out"], "p2", "stem2")])
    for lvl in range(3, top + 1):
        stage, prev = f"backbone.p{lvl}", f"backbone.p{lvl - 1}"
        add("backbone", [f"{prev}.out", f"{stage}.down"], [f"p{lvl - 1}"],
            lambda d, lvl=lvl, stage=stage, prev=prev: [_downsample(d[f"{stage}.down"], d[f"{prev}.out"],
                                                                     f"ds{lvl}", f"p{lvl - 1}")])
        add("backbone", [f"{prev}.out", *_stage_keys(space, stage), f"{stage}.out"], [f"ds{lvl}"],
            lambda d, lvl=lvl, stage=stage: [
                _elan(space, d, stage, d[f"{stage}.out"], f"p{lvl}", f"ds{lvl}")])
    # SPP on the deepest level; its width is that neck level's width
    add("neck", [f"backbone.p{top}.out", "spp.block", f"neck.p{top}.out"], [f"p{top}"],
        lambda d: [LayerSpec(d["spp.block"], {"out": d[f"neck.p{top}.out"]}, name="spp", inputs=[f"p{top}"])])
    # FPN, top-down: reduce the coarser map, upsample, concat with a lateral 1x1 of the backbone level
    for lvl in range(top - 1, 2, -1):
        c, coarse = f"neck.p{lvl}.out", "spp" if lvl + 1 == top else f"td{lvl + 1}"
        add("neck", [f"neck.p{lvl + 1}.out", c], [coarse], lambda d, lvl=lvl, c=c, coarse=coarse: [
            LayerSpec("conv", {"out": d[c]}, name=f"reduce{lvl}", inputs=[coarse]),
            LayerSpec("upsample", {}, name=f"up{lvl}", inputs=[f"reduce{lvl}"])])
        add("neck", [f"backbone.p{lvl}.out", c], [f"p{lvl}", f"up{lvl}"], lambda d, lvl=lvl, c=c: [
            LayerSpec("conv", {"out": d[c]}, name=f"lat{lvl}", inputs=[f"p{lvl}"]),
            LayerSpec("concat", {}, name=f"cat{lvl}", inputs=[f"lat{lvl}", f"up{lvl}"])])
        stage, name = (f"neck.td{lvl}", f"td{lvl}") if lvl > 3 else ("neck.p3", "out3")
        add("neck", [c, *_stage_keys(space, stage)], [f"cat{lvl}"],
            lambda d, lvl=lvl, c=c, stage=stage, name=name: [_elan(space, d, stage, d[c], name, f"cat{lvl}")])
    # PAN, bottom-up: downsample the finer output, concat with the top-down map (or the SPP) of this level
    for lvl in levels[1:]:
        c, stage = f"neck.p{lvl}.out", f"neck.p{lvl}"
        lateral = "spp" if lvl == top else f"td{lvl}"
        add("neck", [f"neck.p{lvl - 1}.out", c, f"{stage}.down"], [f"out{lvl - 1}", lateral],
            lambda d, lvl=lvl, c=c, stage=stage, lateral=lateral:
                _pan_down(d[f"{stage}.down"], d[c], lvl, lateral))
        add("neck", [c, *_stage_keys(space, stage)], [f"pan{lvl}"],
            lambda d, lvl=lvl, c=c, stage=stage: [_elan(space, d, stage, d[c], f"out{lvl}", f"pan{lvl}")])
    # the convs before the head
    for lvl in levels:
        c = f"neck.p{lvl}.out"
        add("neck", [c, "head.conv", "head.expand"], [f"out{lvl}"], lambda d, lvl=lvl, c=c: [
            LayerSpec(d["head.conv"], {"out": _channels(d[c] * d["head.expand"])} | (
                {"k": 3} if d["head.conv"] == "conv" else {}), name=f"h{lvl}", inputs=[f"out{lvl}"])])
    return slots


def _downsample(kind: str, c: int, name: str, src: str) -> LayerSpec:
    """A backbone stride-2 transition keeping the channel count: maxpool, mp (MP-Conv) or 3x3/s2 conv."""
    if kind == "maxpool":
        return LayerSpec("maxpool", {}, name=name, inputs=[src])
    if kind == "mp":
        return LayerSpec("mp", {"c": c // 2}, name=name, inputs=[src])
    return LayerSpec("conv", {"out": c, "k": 3, "s": 2}, name=name, inputs=[src])


def _pan_down(kind: str, c: int, lvl: int, lateral: str) -> list[LayerSpec]:
    """The PAN transition into level `lvl`; both kinds produce `pan{lvl}` with 2c channels."""
    if kind == "mp":  # MP-Conv with the lateral appended (yolov7)
        return [LayerSpec("mp", {"c": c // 2}, name=f"pan{lvl}", inputs=[f"out{lvl - 1}", lateral])]
    return [LayerSpec("conv", {"out": c, "k": 3, "s": 2}, name=f"down{lvl}", inputs=[f"out{lvl - 1}"]),
            LayerSpec("concat", {}, name=f"pan{lvl}", inputs=[f"down{lvl}", lateral])]


def _tensor_channels(space: SearchSpace, name: str, d: Mapping[str, Any], layout: str) -> int:
    """Channels of a named template tensor read by another slot (the template's channel contract)."""
    if name == "input":
        return space.in_channels
    if name == "stem2":
        return d["stem.out"]
    if name == "spp":
        return d[f"neck.p{_top(layout)}.out"]
    kind, lvl = name.rstrip("0123456789"), int(name[-1])
    if kind == "p":
        return d[f"backbone.p{lvl}.out"]
    if kind == "ds":  # backbone transitions keep the channel count
        return d[f"backbone.p{lvl - 1}.out"]
    c = d[f"neck.p{lvl}.out"]
    if kind in ("td", "out", "up"):
        return c
    if kind in ("cat", "pan"):
        return 2 * c
    if kind == "h":
        return _channels(c * d["head.expand"])
    raise KeyError(name)


def _tensor_stride(name: str, layout: str) -> float:
    if name == "input":
        return 1.0
    if name == "stem2":
        return 4.0
    if name == "spp":
        return float(2 ** _top(layout))
    return float(2 ** int(name[-1]))


def _relevant(space: SearchSpace, layout: str, htype: str) -> set[str]:
    key = (layout, htype)
    cache = space._cache
    if key not in cache:
        names = {"imgsz", "act", "head.layout", "head.type", "head.conv", "head.expand"}
        for slot in _template_slots(space, layout):
            names.update(slot.support)
        if htype == "decoupled":
            names.update({"head.hidden", "head.depth"})
        cache[key] = frozenset(names)
    return set(cache[key])


def _structure_id(arch: Architecture) -> str:
    d = arch.to_dict()
    d.pop("name")
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _implicit_previous(layers: list[LayerSpec]) -> None:
    """Drop `from` where it names the previous layer, so architecture YAML reads like the zoo's."""
    for prev, layer in itertools.pairwise(layers):
        if layer.inputs == [prev.name]:
            layer.inputs = []
    if layers and layers[0].inputs == ["input"]:
        layers[0].inputs = []


# ---- zoo points -------------------------------------------------------------------------------------------
def _stage(prefix: str, **values: Any) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _zoo_tiny(space: SearchSpace) -> dict[str, Any]:
    """yolov7-tiny: maxpool transitions, ELAN tap 1 depth 2 (width out/2), sppcsp_tiny, conv PAN, IDetect."""
    d: dict[str, Any] = {"imgsz": 640, "act": "leaky_relu", "stem.width": 32, "stem.out": 64,
                         "spp.block": "sppcsp_tiny", "head.layout": "p3-p5", "head.type": "idetect",
                         "head.conv": "conv", "head.expand": 2}
    elan = {"block": "elan", "depth": 2, "tap": 1, "width": 0.5, "mid": 0.5}
    for lvl, out in zip(range(2, 7), (64, 128, 256, 512, 512)):
        d |= _stage(f"backbone.p{lvl}", down="maxpool", out=out, **elan)
    for lvl, out in zip(range(3, 7), (64, 128, 256, 256)):
        d |= _stage(f"neck.p{lvl}", down="conv", out=out, **elan)
    for lvl in (4, 5):
        d |= _stage(f"neck.td{lvl}", **elan)
    return d


def _zoo_v7(space: SearchSpace) -> dict[str, Any]:
    """yolov7: MP transitions, ELAN tap 2 depth 4 (width out/4), SPPCSPC, ELAN-H neck (mid = out/2)."""
    d: dict[str, Any] = {"imgsz": 640, "act": "silu", "stem.width": 32, "stem.out": 128,
                         "spp.block": "sppcspc", "head.layout": "p3-p5", "head.type": "idetect",
                         "head.conv": "repconv", "head.expand": 2}
    elan_b = {"block": "elan", "depth": 4, "tap": 2, "width": 0.25, "mid": 0.25}
    elan_h = {"block": "elan", "depth": 4, "tap": 1, "width": 1.0, "mid": 0.5}
    for lvl, out in zip(range(2, 7), (256, 512, 1024, 1024, 1024)):
        d |= _stage(f"backbone.p{lvl}", down="mp", out=out, **elan_b)
    for lvl, out in zip(range(3, 7), (128, 256, 512, 512)):
        d |= _stage(f"neck.p{lvl}", down="mp", out=out, **elan_h)
    for lvl in (4, 5):
        d |= _stage(f"neck.td{lvl}", **elan_h)
    return d


_ZOO_POINTS: dict[str, Callable[[SearchSpace], dict[str, Any]]] = {
    "yolov7-tiny": _zoo_tiny, "yolov7": _zoo_v7}


def _nearest(choices: tuple, want: Any) -> Any:
    nums = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if isinstance(want, (int, float)) and not isinstance(want, bool) and nums and want > 0:
        return min(nums, key=lambda c: (abs(math.log(c / want)) if c > 0 else math.inf, -c))
    return choices[0]


def _rank(name: str, value: Any) -> Any:
    order = _COST_ORDER.get(name) or _COST_ORDER.get(name.rsplit(".", 1)[-1])
    if order is not None and value in order:
        return order.index(value)
    if name.endswith(".tap"):
        return -value
    return value


def _int_step(choices: tuple) -> int | None:
    """The step of evenly spaced, increasing integer choices (None otherwise)."""
    if len(choices) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
        return None
    step = choices[1] - choices[0]
    ok = step > 0 and all(b - a == step for a, b in itertools.pairwise(choices))
    return step if ok else None


def _as_choice(dec: Decision, value: Any, path: str | None) -> Any:
    for c in dec.choices:
        same_kind = all(isinstance(c, t) == isinstance(value, t) for t in (bool, str))
        if c == value and same_kind:
            return c
    raise ConfigError(f"{value!r} is not a choice (choices: {list(dec.choices)})", path=path, field=dec.name)


# ---- YAML parsing ----------------------------------------------------------------------------------------
_TOP_KEYS = ("name", "description", "nc", "in_channels", "imgsz", "act", "stem", "backbone", "spp", "neck",
             "head")
_GROUP_KEYS = ("block", "depth", "tap", "width", "mid", "down")
_HEAD_KEYS = ("layout", "type", "conv", "expand", "hidden", "depth", "anchors")


def _mapping(raw: Any, fld: str, allowed: Iterable[str], path: str | None) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping, got {type(raw).__name__}", path=path, field=fld)
    allowed = tuple(allowed)
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"unknown key (allowed: {', '.join(allowed)})", path=path,
                              field=f"{fld}.{k}" if fld else str(k))
    return raw


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "expected an int >= 1"


def _fraction(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0  # no .inf / .nan
    return None if ok else "expected a positive number (a fraction of the stage's out channels)"


def _even_channels(v: Any) -> str | None:
    return None if _is_int(v) and v >= 2 and v % 2 == 0 else "expected an even channel count >= 2"


def _one_of(options: Iterable[str]) -> Callable[[Any], str | None]:
    options = tuple(options)
    return lambda v: None if v in options else f"expected one of {', '.join(options)}"


def _choices(raw: Any, fld: str, check: Callable[[Any], str | None], path: str | None) -> tuple:
    """A choice list (a scalar fixes the decision); empty lists, duplicates and bad values are errors."""
    values = list(raw) if isinstance(raw, list) else [raw]
    if not values:
        raise ConfigError("empty choice list", path=path, field=fld)
    for v in values:
        problem = check(v)
        if problem:
            raise ConfigError(f"{problem}, got {v!r}", path=path, field=fld)
    if len(set(map(repr, values))) != len(values) or len(set(values)) != len(values):
        raise ConfigError("duplicate choice", path=path, field=fld)
    return tuple(values)


def _parse_space(raw: Any, path: str | None) -> SearchSpace:
    top = _mapping(raw, "", _TOP_KEYS, path)
    for key in ("name", "imgsz", "stem", "backbone", "neck", "head"):
        if key not in top:
            raise ConfigError("missing required key", path=path, field=key)
    if not isinstance(top["name"], str) or not top["name"]:
        raise ConfigError("expected a non-empty string", path=path, field="name")
    nc, in_ch = top.get("nc", 80), top.get("in_channels", 3)
    for key, v in (("nc", nc), ("in_channels", in_ch)):
        if _pos_int(v):
            raise ConfigError(f"expected an int >= 1, got {v!r}", path=path, field=key)
    decs: dict[str, Decision] = {}

    def add(name: str, raw_value: Any, fld: str, check: Callable[[Any], str | None]) -> None:
        decs[name] = Decision(name, _choices(raw_value, fld, check, path), fld)

    head = _mapping(top["head"], "head", _HEAD_KEYS, path)
    for key in ("layout", "type"):
        if key not in head:
            raise ConfigError("missing required key", path=path, field=f"head.{key}")
    layouts = _choices(head["layout"], "head.layout", _one_of(LAYOUTS), path)
    p6 = "p3-p6" in layouts
    stride = 64 if p6 else 32
    add("imgsz", top["imgsz"], "imgsz", lambda v: None if _is_int(v) and v >= stride and v % stride == 0
        else f"expected a multiple of {stride} (the largest stride)")
    add("act", top.get("act", "silu"), "act", _one_of(ACTIVATIONS))
    stem = _mapping(top["stem"], "stem", ("width", "out"), path)
    for key in ("width", "out"):
        if key not in stem:
            raise ConfigError("missing required key", path=path, field=f"stem.{key}")
        add(f"stem.{key}", stem[key], f"stem.{key}", _even_channels)

    levels = [2, 3, 4, 5] + ([6] if p6 else [])
    _parse_stages(top["backbone"], "backbone", [f"p{lvl}" for lvl in levels], BACKBONE_DOWN, add, path)
    spp = _mapping(top.get("spp", {"block": list(SPP_BLOCKS)}), "spp", ("block",), path)
    add("spp.block", spp.get("block", list(SPP_BLOCKS)), "spp.block", _one_of(SPP_BLOCKS))
    neck_stages = ([] if not p6 else ["td5"]) + ["td4", "p3", "p4", "p5"] + (["p6"] if p6 else [])
    _parse_stages(top["neck"], "neck", neck_stages, NECK_DOWN, add, path)

    add("head.layout", head["layout"], "head.layout", _one_of(LAYOUTS))
    add("head.type", head["type"], "head.type", _one_of(SPACE_HEAD_TYPES))
    add("head.conv", head.get("conv", "conv"), "head.conv", _one_of(HEAD_CONVS))
    add("head.expand", head.get("expand", 2), "head.expand", _fraction)
    add("head.hidden", head.get("hidden", 64), "head.hidden", _pos_int)
    add("head.depth", head.get("depth", 2), "head.depth", _pos_int)
    anchors = _parse_anchors(head.get("anchors"), layouts, decs["head.type"].choices, path)
    space = SearchSpace(name=top["name"], decisions=decs, anchors=anchors, nc=nc, in_channels=in_ch,
                        description=str(top.get("description", "")), source=path)
    _check_widths(space, path)
    return space


def _parse_stages(raw: Any, section: str, stages: list[str], downs: tuple[str, ...], add: Callable,
                  path: str | None) -> None:
    """Per-stage decisions: group defaults overridden by `stages.<name>` entries."""
    group = _mapping(raw, section, (*_GROUP_KEYS, "stages"), path)
    optional = [s for s in _OPTIONAL_STAGES[section] if s not in stages]
    per = _mapping(group.get("stages", {}), f"{section}.stages", (*stages, *optional), path)
    checks: dict[str, Callable[[Any], str | None]] = {
        "block": _one_of(ELAN_BLOCKS), "depth": _pos_int, "tap": _pos_int, "width": _fraction,
        "down": _one_of(downs), "out": _even_channels,
        # 'width' only as the whole value (handled below): as one choice among fractions it is no channel ratio
        "mid": lambda v: None if not _fraction(v) else "expected 'width' (alone) or fractions",
    }
    defaults = {"block": "elan", "depth": 2, "tap": 1, "width": 0.5, "mid": "width"}

    def check_only(name: str, raw_value: Any, fld: str, check: Callable[[Any], str | None]) -> None:
        _choices(raw_value, fld, check, path)

    # an optional stage this file's layouts do not use is no decision, but what it states is checked all the same
    for stage in [*stages, *(s for s in optional if s in per)]:
        used = stage in stages
        allowed = list(_GROUP_KEYS)
        has_out = stage.startswith("p")
        if has_out:
            allowed.append("out")
        if stage == ("p2" if section == "backbone" else "p3") or stage.startswith("td"):
            allowed.remove("down")  # the stem feeds P2; the top-down path feeds td<l> and the P3 output
        if stage not in per and has_out:
            raise ConfigError("missing required stage", path=path, field=f"{section}.stages.{stage}")
        own = _mapping(per.get(stage) or {}, f"{section}.stages.{stage}", allowed, path)
        if used and has_out and "out" not in own:
            raise ConfigError("missing required key", path=path, field=f"{section}.stages.{stage}.out")
        for key in allowed:
            if key in own:
                value, fld = own[key], f"{section}.stages.{stage}.{key}"
            elif not used:
                continue  # the group's values are checked where a used stage takes them
            elif key in group:
                value, fld = group[key], f"{section}.{key}"
            elif key in defaults:
                value, fld = defaults[key], f"{section}.{key}"
            else:
                raise ConfigError("missing required key", path=path, field=f"{section}.{key}")
            if key == "mid" and value in ("width", ["width"]):
                continue  # chain width = hidden width: not a decision
            (add if used else check_only)(f"{section}.{stage}.{key}", value, fld, checks[key])


# P6 stages may stay in a file whose head.layout has no p3-p6 (then they are unused)
_OPTIONAL_STAGES = {"backbone": ("p6",), "neck": ("p6", "td5")}


def _parse_anchors(raw: Any, layouts: tuple[str, ...], types: tuple[str, ...], path: str | None
                   ) -> dict[str, list[list[float]]]:
    if raw is None:
        if any(t != "decoupled" for t in types):
            raise ConfigError("anchor-based head types need anchors per layout", path=path,
                              field="head.anchors")
        return {}
    _mapping(raw, "head.anchors", LAYOUTS, path)
    out: dict[str, list[list[float]]] = {}
    for layout in layouts:
        fld = f"head.anchors.{layout}"
        a = raw.get(layout)
        if a is None:
            if any(t != "decoupled" for t in types):
                raise ConfigError("missing anchors for this layout", path=path, field=fld)
            continue
        ok = isinstance(a, list) and len(a) == len(LAYOUTS[layout]) and all(
            isinstance(lv, list) and lv and len(lv) % 2 == 0 and len(lv) == len(a[0])
            and all(not _fraction(v) for v in lv) for lv in a)
        if not ok:
            raise ConfigError(f"expected {len(LAYOUTS[layout])} lists of the same even number of positive "
                              "w, h values (pixels)", path=path, field=fld)
        out[layout] = [[float(v) for v in lv] for lv in a]
        check_anchor_order(out[layout], path, fld)
    return out


def _check_widths(space: SearchSpace, path: str | None) -> None:
    """ELAN hidden/chain widths and head conv widths must be whole channel counts (even for ghost_elan)."""
    decs = space.decisions
    stage_outs = {s: f"{s}.out" for s in (n[: -len(".out")] for n in decs if n.endswith(".out"))}
    for n in [k for k in decs if k.endswith(".block") and k.startswith(("backbone.", "neck."))]:
        stage = n[: -len(".block")]
        out_name = stage_outs.get(stage) or f"neck.p{stage[-1]}.out"  # td<l> uses its level's width
        outs = decs[out_name].choices
        ghost = "ghost_elan" in decs[n].choices
        has_mid = f"{stage}.mid" in decs
        for key in ("width", "mid"):
            if f"{stage}.{key}" not in decs:
                continue
            dec = decs[f"{stage}.{key}"]
            for o in outs:
                for r in dec.choices:
                    w = o * r
                    if abs(w - round(w)) > 1e-9 or round(w) < 1:
                        raise ConfigError(f"{o} x {r} is not a whole channel count", path=path,
                                          field=dec.field)
                    chain = key == "mid" or not has_mid
                    if ghost and chain and round(w) % 2:
                        raise ConfigError(f"ghost_elan needs even chain widths, {o} x {r} = {round(w)}",
                                          path=path, field=dec.field)
    for lvl in range(3, 7):
        if f"neck.p{lvl}.out" not in decs:
            continue
        for o in decs[f"neck.p{lvl}.out"].choices:
            for r in decs["head.expand"].choices:
                if abs(o * r - round(o * r)) > 1e-9:
                    raise ConfigError(f"{o} x {r} is not a whole channel count", path=path,
                                      field=decs["head.expand"].field)


__all__ = ["LAYOUTS", "BlockSignature", "Decision", "HeadLevel", "SearchSpace", "arch_signatures",
           "block_out_channels", "load_space"]
