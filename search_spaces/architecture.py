"""`Architecture`: the dataclass form of an architecture YAML (named layers, explicit arguments), validated once."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .blocks import ACTIVATIONS, HEAD_TYPES
from .blocks.registry import validate_block_args
from .errors import ConfigError
from .io import atomic_write_text, read_yaml

INPUT = "input"  # the name of the image input in `from` lists
_TOP_KEYS = {"name", "nc", "act", "imgsz", "in_channels", "backbone", "neck", "head", "description", "fused"}
_LAYER_KEYS = {"block", "name", "from", "act"}
_HEAD_KEYS = {"type", "from", "aux_from", "anchors", "hidden", "depth"}


@dataclass
class LayerSpec:
    """One layer: a registered block, its arguments, an optional name and its inputs (names; default: previous)."""

    block: str
    args: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    inputs: list[str] = field(default_factory=list)
    act: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.name:
            d["name"] = self.name
        d["block"] = self.block
        if self.inputs:
            d["from"] = self.inputs[0] if len(self.inputs) == 1 else list(self.inputs)
        if self.act:
            d["act"] = self.act
        d.update(self.args)
        return d


@dataclass
class HeadSpec:
    """The detection head: its type, the layers it reads, anchors (anchor-based) or branch sizes (decoupled)."""

    type: str
    inputs: list[str]
    aux_inputs: list[str] = field(default_factory=list)
    anchors: list[list[float]] | None = None
    hidden: int = 128
    depth: int = 2

    @property
    def anchor_free(self) -> bool:
        return self.type == "decoupled"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "from": list(self.inputs)}
        if self.aux_inputs:
            d["aux_from"] = list(self.aux_inputs)
        if self.anchors is not None:
            d["anchors"] = [list(a) for a in self.anchors]
        if self.anchor_free:
            d["hidden"], d["depth"] = self.hidden, self.depth
        return d


@dataclass
class Architecture:
    """A whole detector: global settings, the backbone and neck layer lists, and the head."""

    name: str
    nc: int
    backbone: list[LayerSpec]
    neck: list[LayerSpec]
    head: HeadSpec
    act: str = "silu"
    imgsz: int = 640
    in_channels: int = 3
    description: str = ""
    fused: bool = False  # weights are stored re-parameterised (Conv+BN folded, RepConv merged)
    source: str | None = field(default=None, compare=False, repr=False)  # the file it was read from

    @property
    def layers(self) -> list[LayerSpec]:
        return self.backbone + self.neck

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> Architecture:
        """Read and validate an architecture YAML file."""
        return cls.from_dict(read_yaml(path), path=str(path))

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None) -> Architecture:
        """Validate a parsed YAML mapping into an Architecture (ConfigError naming the field on any problem)."""
        if not isinstance(d, dict):
            raise ConfigError("an architecture must be a mapping", path=path)
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})", path=path,
                              field=min(unknown))
        for key in ("name", "nc", "backbone", "head"):
            if key not in d:
                raise ConfigError("missing required key", path=path, field=key)
        name = _typed(d, "name", str, path)
        nc = _typed(d, "nc", int, path)
        if nc < 1:
            raise ConfigError("must be >= 1", path=path, field="nc")
        act = _typed(d, "act", str, path, "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"unknown activation '{act}' (known: {', '.join(ACTIVATIONS)})", path=path, field="act")
        imgsz = _typed(d, "imgsz", int, path, 640)
        in_ch = _typed(d, "in_channels", int, path, 3)
        backbone = _layers(d.get("backbone"), "backbone", path)
        neck = _layers(d.get("neck") or [], "neck", path)
        head = _head(d.get("head"), path)
        fused = _typed(d, "fused", bool, path, False)
        arch = cls(name=name, nc=nc, backbone=backbone, neck=neck, head=head, act=act, imgsz=imgsz,
                   in_channels=in_ch, description=str(d.get("description", "")), fused=fused)
        arch.validate(path)
        arch.source = path
        return arch

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping of this architecture."""
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        d.update(nc=self.nc, act=self.act, imgsz=self.imgsz)
        if self.in_channels != 3:
            d["in_channels"] = self.in_channels
        if self.fused:
            d["fused"] = True
        d["backbone"] = [layer.to_dict() for layer in self.backbone]
        d["neck"] = [layer.to_dict() for layer in self.neck]
        d["head"] = self.head.to_dict()
        return d

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Render as YAML (one flow-style mapping per layer); write atomically when `path` is given."""
        text = dump_arch_yaml(self.to_dict())
        if path is not None:
            atomic_write_text(path, text)
        return text

    def copy(self) -> Architecture:
        return copy.deepcopy(self)

    def with_nc(self, nc: int) -> Architecture:
        """The same architecture for another number of classes."""
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
            raise ConfigError(f"must be an integer >= 1, got {nc!r}", field="nc")
        arch = self.copy()
        arch.nc = nc
        return arch

    @property
    def p6(self) -> bool:
        """True for four-level (stride 64) models, whose native input size is 1280."""
        return len(self.head.inputs) >= 4

    # ---- graph -------------------------------------------------------------------------------------------
    def resolve(self, path: str | None = None) -> list[list[int]]:
        """Input layer indices of every layer (-1 = the image), checking that references exist and come first."""
        index: dict[str, int] = {}
        plan: list[list[int]] = []
        for i, layer in enumerate(self.layers):
            refs = layer.inputs or ([] if i else [INPUT])
            ins = [i - 1] if not refs else [self._ref(r, index, self._where(i) + ".from", path) for r in refs]
            plan.append(ins)
            if layer.name:
                if layer.name in index or layer.name == INPUT:
                    raise ConfigError(f"duplicate layer name '{layer.name}'", path=path,
                                      field=self._where(i) + ".name")
                index[layer.name] = i
        return plan

    def head_indices(self, path: str | None = None) -> tuple[list[int], list[int]]:
        """Layer indices read by the lead head and by the auxiliary head."""
        index = {layer.name: i for i, layer in enumerate(self.layers) if layer.name}
        lead = [self._ref(r, index, "head.from", path, layer_only=True) for r in self.head.inputs]
        aux = [self._ref(r, index, "head.aux_from", path, layer_only=True) for r in self.head.aux_inputs]
        return lead, aux

    def strides(self, path: str | None = None) -> list[float]:
        """Output stride of every layer, derived from the specs (no module is built)."""
        plan = self.resolve(path)
        out: list[float] = []
        for i, (layer, ins) in enumerate(zip(self.layers, plan)):
            s_in = [1.0 if j == -1 else out[j] for j in ins]
            s_out = s_in[0] * _block_stride(layer)
            # an `mp` transition concatenates its laterals after downsampling the first input
            same = s_in[1:] + [s_out] if layer.block == "mp" else s_in
            if len(set(same)) > 1:
                raise ConfigError(f"inputs have different resolutions (strides {s_in})", path=path,
                                  field=self._where(i) + ".from")
            out.append(s_out)
        return out

    def head_strides(self, path: str | None = None) -> list[int]:
        """Strides of the lead head's levels."""
        s = self.strides(path)
        lead, _ = self.head_indices(path)
        return [round(s[i]) for i in lead]

    def max_stride(self, path: str | None = None) -> int:
        """What the input size must be a multiple of: every stride the heads depend on (a layer deeper than the
        coarsest level, upsampled back into it, counts too), so that every concat lines up."""
        lead, aux = self.head_indices(path)
        return _needed_stride(self.strides(path), self.resolve(path), lead + aux)

    def validate(self, path: str | None = None) -> None:
        """Check block arguments, references, resolutions and the head (raises ConfigError)."""
        for name, v in (("imgsz", self.imgsz), ("in_channels", self.in_channels)):
            if v < 1:
                raise ConfigError(f"must be >= 1, got {v}", path=path, field=name)
        for i, layer in enumerate(self.layers):
            validate_block_args(layer.block, layer.args, where=self._where(i), path=path)
            if layer.act is not None and layer.act not in ACTIVATIONS:
                raise ConfigError(f"unknown activation '{layer.act}'", path=path, field=self._where(i) + ".act")
            _check_geometry(layer.block, layer.args, self._where(i), path)
        strides = self.strides(path)
        lead, aux = self.head_indices(path)
        hs = [strides[i] for i in lead]
        if any(s != int(s) or s < 1 for s in hs) or hs != sorted(set(hs)):
            raise ConfigError(f"head levels must have increasing integer strides, got {hs}", path=path,
                              field="head.from")
        if self.head.type == "iauxdetect":
            if len(aux) != len(lead):
                raise ConfigError("iauxdetect needs one aux input per lead input", path=path, field="head.aux_from")
            if [strides[i] for i in aux] != hs:
                raise ConfigError("aux inputs must match the lead strides", path=path, field="head.aux_from")
        elif aux:
            raise ConfigError(f"only iauxdetect takes aux_from (head type '{self.head.type}')", path=path,
                              field="head.aux_from")
        if not self.head.anchor_free:
            anchors = self.head.anchors
            if anchors is None:
                raise ConfigError("anchor-based heads need anchors", path=path, field="head.anchors")
            if len(anchors) != len(lead):
                raise ConfigError(f"{len(anchors)} anchor levels for {len(lead)} head inputs", path=path,
                                  field="head.anchors")
            if any(len(a) != len(anchors[0]) or len(a) % 2 or not a for a in anchors):
                raise ConfigError("each level needs the same even number of values (w,h pairs)", path=path,
                                  field="head.anchors")
            if not all(math.isfinite(v) and v > 0 for a in anchors for v in a):  # .nan would pass `v <= 0`
                raise ConfigError("anchor sizes must be finite and > 0 (pixels)", path=path, field="head.anchors")
            check_anchor_order(anchors, path, "head.anchors")
        stride = _needed_stride(strides, self.resolve(path), lead + aux)
        if self.imgsz % stride:  # the feature maps of the levels would not line up at concat
            raise ConfigError(f"must be a multiple of the largest stride {stride}, got {self.imgsz}", path=path,
                              field="imgsz")

    # ---- forms -------------------------------------------------------------------------------------------
    def deploy_layers(self) -> list[int]:
        """Indices of the layers the deploy form keeps: those the lead head reads, directly or not."""
        return self._deploy_layers(self.resolve())

    def _deploy_layers(self, plan: list[list[int]]) -> list[int]:
        lead, _ = self.head_indices()
        needed = _ancestors(plan, lead)
        return [i for i in range(len(self.layers)) if i in needed]

    def deploy_form(self) -> tuple[Architecture, list[int]]:
        """The deploy form (plain Detect, no aux branch, unused layers dropped) and, per kept layer, its old index."""
        plan = self.resolve()
        keep = self._deploy_layers(plan)
        arch = self.copy()
        nb = len(self.backbone)
        arch.backbone = [copy.deepcopy(self.layers[i]) for i in keep if i < nb]
        arch.neck = [copy.deepcopy(self.layers[i]) for i in keep if i >= nb]
        _name_implicit_refs(self, arch, keep, plan)
        if arch.head.type in ("idetect", "iauxdetect"):
            arch.head.type = "detect"
        arch.head.aux_inputs = []
        return arch, keep

    def _where(self, i: int) -> str:
        """The YAML location of layer i, e.g. `neck[3]`."""
        nb = len(self.backbone)
        return f"backbone[{i}]" if i < nb else f"neck[{i - nb}]"

    @staticmethod
    def _ref(ref: str, index: dict[str, int], where: str, path: str | None, layer_only: bool = False) -> int:
        if ref == INPUT:
            if layer_only:  # -1 would index the last layer's channels, stride and output
                raise ConfigError(f"a head reads layers, not '{INPUT}'", path=path, field=where)
            return -1
        if ref not in index:
            raise ConfigError(f"unknown layer '{ref}' (layers can only read named layers defined before them)",
                              path=path, field=where)
        return index[ref]


def check_anchor_order(anchors: list[list[float]], path: str | None, field: str) -> None:
    """Refuse anchors listed coarsest level first: YOLOv7's `check_anchor_order` compares the first and the last
    anchor's areas and silently reverses such a list; a detforge file states what runs, so it is an error."""
    areas = [a[k] * a[k + 1] for a in anchors for k in range(0, len(a) - 1, 2)]
    if len(anchors) > 1 and areas[-1] < areas[0]:
        raise ConfigError("anchors are listed coarsest level first: list them from the finest level (the "
                          "smallest stride) up, as YOLOv7's files do", path=path, field=field)


def _needed_stride(strides: list[float], plan: list[list[int]], roots: list[int]) -> int:
    """The lcm of the strides of the layers `roots` depend on: what the input size must be a multiple of."""
    return math.lcm(*(round(strides[i]) for i in _ancestors(plan, roots) if strides[i] >= 1))


def _ancestors(plan: list[list[int]], roots: list[int]) -> set[int]:
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i >= 0 and i not in seen:
            seen.add(i)
            stack.extend(plan[i])
    return seen


def _name_implicit_refs(src: Architecture, dst: Architecture, keep: list[int], plan: list[list[int]]) -> None:
    """After dropping layers, make an implicit 'previous layer' input explicit where the previous one moved."""
    new_pos = {old: new for new, old in enumerate(keep)}
    for new, old in enumerate(keep):
        layer = dst.layers[new]
        prev = plan[old][0]
        if layer.inputs or prev < 0 or new_pos[prev] == new - 1:
            continue
        target = dst.layers[new_pos[prev]]
        target.name = target.name or f"layer{prev}"
        layer.inputs = [target.name]


# the kernel arguments of each block that pads by k // 2: an even one grows the map by one (a conv's explicit
# `p` says what it does instead)
_PADDED_KERNELS = {"conv": ("k", "dw_k"), "repconv": ("k",), "ghostconv": ("k", "dw_k"), "elan": ("k",),
                   "eelan": ("k",), "sppcspc": ("k",)}


def _check_geometry(block: str, args: dict[str, Any], where: str, path: str | None) -> None:
    """Kernels and pools that keep the size `strides()` assumes: out = in / stride exactly (a concat needs it)."""
    for key in _PADDED_KERNELS.get(block, ()) if args.get("p") is None else ():
        for k in args[key] if isinstance(args.get(key), list) else [args.get(key) or 1]:
            if k % 2 == 0:
                raise ConfigError(f"an even kernel ({k}) changes the feature size (padding k // 2); use an odd one"
                                  + (", or give p" if block in ("conv", "repconv", "ghostconv") else ""),
                                  path=path, field=f"{where}.{key}")
    if block == "maxpool":
        k, s = args.get("k", 2), args.get("s", 2)
        if not (k == s or (s == 1 and k % 2)):  # padded only at stride 1 (by k // 2)
            raise ConfigError(f"maxpool k={k} s={s} does not divide the feature size by {s}: use k = s, or s = 1 "
                              "with an odd k", path=path, field=f"{where}.k")


def _block_stride(layer: LayerSpec) -> float:
    a = layer.args
    if layer.block in ("conv", "repconv", "ghostconv"):
        return float(a.get("s", 1))
    if layer.block == "maxpool":
        return float(a.get("s", 2))
    if layer.block in ("mp", "downc", "reorg"):
        return 2.0
    if layer.block == "upsample":
        return 1.0 / float(a.get("scale", 2))
    return 1.0


def _typed(d: dict, key: str, typ: type, path: str | None, default: Any = ...) -> Any:
    if key not in d:
        return default
    v = d[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise ConfigError(f"expected {typ.__name__}, got {type(v).__name__} {v!r}", path=path, field=key)
    return v


def _layers(raw: Any, section: str, path: str | None) -> list[LayerSpec]:
    if not isinstance(raw, list) or (section == "backbone" and not raw):
        raise ConfigError("expected a non-empty list of layers", path=path, field=section)
    out = []
    for i, item in enumerate(raw):
        where = f"{section}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"expected a mapping like {{block: conv, out: 64}}, got {type(item).__name__}",
                              path=path, field=where)
        if "block" not in item:
            raise ConfigError("missing required key", path=path, field=f"{where}.block")
        block = item["block"]
        if not isinstance(block, str):
            raise ConfigError(f"expected str, got {type(block).__name__}", path=path, field=f"{where}.block")
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"expected str, got {type(name).__name__}", path=path, field=f"{where}.name")
        src = item.get("from", [])
        src = [src] if isinstance(src, str) else src
        if not isinstance(src, list) or not all(isinstance(s, str) for s in src):
            raise ConfigError("expected a layer name or a list of layer names", path=path, field=f"{where}.from")
        act = item.get("act")
        if act is not None and not isinstance(act, str):
            raise ConfigError(f"expected str, got {type(act).__name__}", path=path, field=f"{where}.act")
        args = {k: v for k, v in item.items() if k not in _LAYER_KEYS}
        out.append(LayerSpec(block=block, args=args, name=name, inputs=list(src), act=act))
    return out


def _head(raw: Any, path: str | None) -> HeadSpec:
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with type and from", path=path, field="head")
    unknown = set(raw) - _HEAD_KEYS
    if unknown:
        raise ConfigError(f"unknown key (allowed: {', '.join(sorted(_HEAD_KEYS))})", path=path,
                          field=f"head.{min(unknown)}")
    typ = raw.get("type")
    if typ not in HEAD_TYPES:
        raise ConfigError(f"unknown head type {typ!r} (known: {', '.join(HEAD_TYPES)})", path=path, field="head.type")
    ins = raw.get("from")
    if not isinstance(ins, list) or not ins or not all(isinstance(s, str) for s in ins):
        raise ConfigError("expected a non-empty list of layer names", path=path, field="head.from")
    aux = raw.get("aux_from", [])
    if not isinstance(aux, list) or not all(isinstance(s, str) for s in aux):
        raise ConfigError("expected a list of layer names", path=path, field="head.aux_from")
    anchors = raw.get("anchors")
    if anchors is not None and (not isinstance(anchors, list) or not all(
            isinstance(a, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a)
            for a in anchors)):
        raise ConfigError("expected a list of [w, h, w, h, ...] lists (pixels)", path=path, field="head.anchors")
    hidden, depth = raw.get("hidden", 128), raw.get("depth", 2)
    for key, v in (("hidden", hidden), ("depth", depth)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"expected a positive int, got {v!r}", path=path, field=f"head.{key}")
    return HeadSpec(type=typ, inputs=list(ins), aux_inputs=list(aux), anchors=anchors, hidden=hidden, depth=depth)


class _ArchDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flow = "block" in data  # a layer: one line per layer keeps architecture files readable
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_ArchDumper.add_representer(list, _represent_list)
_ArchDumper.add_representer(dict, _represent_dict)


def dump_arch_yaml(d: dict[str, Any]) -> str:
    """YAML text with one flow mapping per layer."""
    return yaml.dump(d, Dumper=_ArchDumper, sort_keys=False, width=120)
