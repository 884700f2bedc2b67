"""Quantization-aware finetuning: fake-quantized convolutions trained with the Trainer, exported as QDQ ONNX.

For when post-training quantization (`compress.quantize`) loses too much. The model is fused first
(BatchNorm folded, RepConv merged), then every `nn.Conv2d` becomes a `FakeQuantConv2d` (per-channel symmetric
int8 weights, uint8 outputs: ONNX Runtime CPU's U8S8 kernels) and every activation a `FakeQuantAct` (uint8
output); the box decode after the head's convs stays float, as `quantize_onnx` keeps it. Like ONNX Runtime's
own quantizer, each tensor is quantized once, where it is made: a conv reads its input through a fake-quant
only where no quantized producer made it (the image, a concat), convs that read the same such tensor share
it, and pools and upsamples keep their input's scale. So the export's QDQ form is a PTQ file's, and ONNX
Runtime fuses it the same way (QLinearConv, QLinearLeakyRelu, QLinearConcat, uint8 max-pool); with a
fake-quant per conv input instead, activations, concats and pools stayed float between duplicated Q/DQ pairs
and the file ran slower than the PTQ one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torch.overrides import TorchFunctionMode

from search_spaces.errors import CheckpointError, ConfigError
from search_spaces.io import atomic_torch_save, atomic_write_bytes
from search_spaces.model import Detector
from search_spaces.modes import temporary_mode
from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.hyp import load_hyp
from trainer.trainer import CHECKPOINT, Trainer, default_hyp_name

QAT_OPSET = 17  # per-channel QuantizeLinear needs >= 13


def _activation_fq() -> FakeQuantize:
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


def _weight_fq() -> FakeQuantize:
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)


class FakeQuantConv2d(nn.Conv2d):
    """A Conv2d whose input, weight (and optionally output) pass through fake quantization."""

    def __init__(self, conv: nn.Conv2d, quantize_output: bool = True):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.input_fq = _activation_fq()
        self.weight_fq = _weight_fq()
        self.output_fq = _activation_fq() if quantize_output else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(self.input_fq(x), self.weight_fq(self.weight), self.bias, self.stride, self.padding,
                     self.dilation, self.groups)
        return self.output_fq(y)


class FakeQuantAct(nn.Module):
    """An activation whose output passes through fake quantization (one uint8 tensor for all its readers)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act
        self.output_fq = _activation_fq()

    def forward(self, x: Tensor) -> Tensor:
        return self.output_fq(self.act(x))


class SharedQParams(nn.Module):
    """Fake quantization with another fake-quant's scale and zero point; it never observes.

    For a tensor that a max-pool or a nearest upsample made from a quantized one: with the producer's
    scale, the Q/DQ pair around the pool is an identity that ONNX Runtime drops (the pool runs in uint8).
    """

    def __init__(self, source: FakeQuantize):
        super().__init__()
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        fq = self.source
        if not fq.fake_quant_enabled[0]:
            return x
        obs = fq.activation_post_process
        return torch.fake_quantize_per_tensor_affine(x, fq.scale, fq.zero_point, obs.quant_min, obs.quant_max)


ACTIVATIONS = (nn.SiLU, nn.LeakyReLU, nn.ReLU)
# functions whose output holds values of their input only, so it can keep the input's quantization
_RANGE_KEEPING = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "interpolate", "upsample_nearest2d"}


class _RangeKeepingOps(TorchFunctionMode):
    """Records, for one forward, which tensor each range-keeping op (pool, nearest upsample) was given."""

    def __init__(self) -> None:
        super().__init__()
        self.source: dict[int, Tensor] = {}
        self.alive: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        nearest = name != "interpolate" or kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "nearest"
        if name in _RANGE_KEEPING and nearest and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            self.alive += [out, args[0]]
            self.source[id(out)] = args[0]
        return out


@torch.no_grad()
def place_input_quantizers(model: Detector) -> int:
    """Give each conv input one quantization: its producer's, or one fake-quant shared by all its readers."""
    # One forward with the fake-quants passing through records which tensor each conv reads, which tensors
    # a producer's fake-quant put out, and which came from a pool or upsample of which; tensors are kept
    # alive meanwhile, so their ids stay unique. The dataflow does not depend on the image size; a small one
    # that every level divides (with room for layers below the head's last stride) keeps the pass cheap.
    if getattr(model, "_qat_placed", False):
        raise ConfigError("the model's quantizers are already placed (prepare_qat was applied)", field="model")
    size = max(4 * model.max_stride, 128)
    producers = [m.output_fq for m in model.modules()
                 if isinstance(m, (FakeQuantConv2d, FakeQuantAct)) and isinstance(m.output_fq, FakeQuantize)]
    readers: dict[int, list[FakeQuantConv2d]] = {}
    made_by: dict[int, FakeQuantize] = {}
    alive: list[Tensor] = []

    def produced(m: nn.Module, _args: Any, out: Tensor) -> None:
        alive.append(out)
        made_by[id(out)] = m  # type: ignore[assignment]

    def read(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        alive.append(args[0])
        readers.setdefault(id(args[0]), []).append(m)  # type: ignore[arg-type]

    returned_by: dict[int, nn.Module] = {}  # the innermost module that made and returned each tensor
    returns: dict[nn.Module, list[int]] = {}  # every tensor each module returned (a module may run twice)

    def returned(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, Tensor) or any(out is a for a in args):
            return  # a pass-through (Identity) made nothing: the tensor belongs to whoever made it
        alive.append(out)
        returned_by.setdefault(id(out), m)
        returns.setdefault(m, []).append(id(out))

    hooks = [fq.register_forward_hook(produced) for fq in producers]
    hooks += [m.register_forward_pre_hook(read) for m in model.modules() if isinstance(m, FakeQuantConv2d)]
    hooks += [m.register_forward_hook(returned) for m in model.modules() if not isinstance(m, FakeQuantize)]
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    flags = [(bool(m.observer_enabled.item()), bool(m.fake_quant_enabled.item())) for m in fqs]
    for m in fqs:  # pass-through (no ranges are known yet, and none are learned from this zero image)
        m.disable_observer()
        m.disable_fake_quant()
    ops = _RangeKeepingOps()
    try:
        with ops, temporary_mode(model):
            model(torch.zeros(1, model.arch.in_channels, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        for m, (observe, quantize) in zip(fqs, flags):
            m.enable_observer(observe)
            m.enable_fake_quant(quantize)

    def origin(tensor_id: int) -> FakeQuantize | None:
        """The fake-quant whose range the tensor keeps (through pools and upsamples), if any."""
        while tensor_id not in made_by and tensor_id in ops.source:
            tensor_id = id(ops.source[tensor_id])
        return made_by.get(tensor_id)

    # A module that returns a pooled or upsampled quantized tensor (an Upsample layer, a MaxPool transition)
    # quantizes its output with the producer's scale, so that concats of it run in uint8 too.
    for tensor_id in ops.source:
        module, fq = returned_by.get(tensor_id), origin(tensor_id)
        # one scale per module: only where every call of it returned a pooled tensor of the same producer
        if (module is not None and fq is not None and not hasattr(module, "output_quant")
                and all(origin(t) is fq for t in returns[module])):
            module.output_quant = SharedQParams(fq)
            module.register_forward_hook(_quantize_output)
            made_by.update(dict.fromkeys(returns[module], fq))
    own = 0
    for tensor_id, convs in readers.items():
        fq = origin(tensor_id)
        if tensor_id in made_by:
            quantizer: nn.Module = nn.Identity()
        elif fq is not None:
            quantizer = SharedQParams(fq)
        else:
            quantizer, own = convs[0].input_fq, own + 1
        for conv in convs:
            conv.input_fq = quantizer
    model._qat_placed = True
    return own


def _quantize_output(module: nn.Module, _args: Any, out: Tensor) -> Tensor:
    """Forward hook: the module's output through its `output_quant` (set by place_input_quantizers)."""
    return module.output_quant(out)


def prepare_qat(det: Detector, exclude: Iterable[str] = ()) -> Detector:
    """A fused copy of `det` with fake-quantized convs and activations; those named in `exclude` stay float.

    An excluded conv keeps float weights and output; its readers still get quantized inputs, as ONNX
    Runtime's `nodes_to_exclude` keeps a node float but not the tensors around it. Names are the fused
    model's conv module names (`layers.1.conv`); another name is a ConfigError.
    """
    if any(isinstance(m, FakeQuantize) for m in det.modules()):
        raise ConfigError("the model is already fake-quantized (prepare_qat was applied)", field="model")
    model = copy.deepcopy(det).eval()
    if model.form == "training":
        model = model.deploy()
    model.fuse()
    skip = set(exclude)
    convs = {n for n, m in model.named_modules() if type(m) is nn.Conv2d}
    unknown = sorted(skip - convs)
    if unknown:  # e.g. ONNX node names (PTQ's --exclude): nothing would stay float, silently
        raise ConfigError(f"{unknown[0]!r} is not a conv of the fused model; QAT takes module names such as "
                          f"{min(convs)!r}", field="exclude")
    replaced = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in skip:
                continue
            if type(child) is nn.Conv2d:
                setattr(parent, child_name, FakeQuantConv2d(child))
                replaced += 1
            elif type(child) in ACTIVATIONS:
                setattr(parent, child_name, FakeQuantAct(child))
    if replaced == 0:
        raise ConfigError("the model has no convolution to quantize", field="model")
    place_input_quantizers(model)
    return model


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let the fake-quant observers keep adapting their ranges, or freeze them (scales become constants)."""
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.enable_observer(enabled)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Run float batches through the model (observers on) so the first QAT step starts from real ranges."""
    n = 0
    with temporary_mode(model):
        for x in batches:
            model(x)
            n += 1
    return n


@dataclass
class QatReport:
    """What a QAT finetune did."""

    epochs: int
    convs: int
    float_outputs: int  # convs left float (named in `exclude`)
    observer_freeze_epoch: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "convs": self.convs, "float_outputs": self.float_outputs,
                "observer_freeze_epoch": self.observer_freeze_epoch, "rows": self.rows}


class FreezeObservers(Callback):
    """Stops the fake-quant observers (model and EMA) after `epoch` epochs, also in a resumed run."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def _freeze(self, trainer: Trainer) -> None:
        set_observers(trainer.model, False)
        if trainer.ema is not None:
            set_observers(trainer.ema.ema, False)

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.start_epoch >= self.epoch:
            self._freeze(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        if epoch + 1 >= self.epoch:
            self._freeze(trainer)


QAT_RUN_KEYS = ("model", "data", "imgsz", "epochs", "batch")  # a QAT run resumes only the same run


class QatTrainer(Trainer):
    """The Trainer on a fake-quantized model, whose checkpoints are last.pt only."""

    def model_identity(self) -> dict[str, Any]:
        # its learning rate too: `--qat-lr-scale` is not a TrainConfig field
        return {**super().model_identity(), "qat_lr0": self.hyp.lr0}

    def check_resume(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Refuse a last.pt of a QAT run with another model, data, size, schedule or learning rate."""
        theirs, mine = checkpoint.get("config") or {}, self.cfg.to_dict()
        diff = [k for k in QAT_RUN_KEYS if theirs.get(k) != mine.get(k)]
        lr0 = checkpoint.get("qat_lr0")
        if lr0 is not None and not math.isclose(lr0, self.hyp.lr0, rel_tol=1e-9):
            diff.append("qat_lr_scale")
        if diff:
            raise CheckpointError(f"holds an interrupted QAT run with other settings ({', '.join(diff)}): remove it "
                                  "or choose another --out", path=path, field=diff[0])

    def save_checkpoint(self, epoch: int) -> None:
        # a fake-quantized model is not an architecture + weights pair; its deliverable is the QDQ ONNX
        if self.main:
            atomic_torch_save(self.checkpoint_state(epoch), self.out / CHECKPOINT)


def qat_finetune(det: Detector, cfg: TrainConfig, *, lr_scale: float = 0.1, freeze_epoch: int = 1,
                 calib_batches: int = 8, exclude: Iterable[str] = ()) -> tuple[Detector, QatReport]:
    """Fake-quantize `det` and finetune it with the Trainer; returns the QAT model (EMA) and a report."""
    model = prepare_qat(det, exclude)
    hyp = load_hyp(default_hyp_name(det) if cfg.hyp == "auto" else cfg.hyp)
    # small steps from trained weights: no warmup (its bias LR starts at 0.1), a tenth of the run's LR
    lr = (hyp.lr0 if cfg.lr0 is None else cfg.lr0) * lr_scale
    hyp = dataclasses.replace(hyp, lr0=lr, warmup_epochs=0.0, warmup_bias_lr=lr)
    # trained weights keep the anchors they were trained with; the scaled rate is the hyp's (not cfg.lr0 again)
    trainer = QatTrainer(dataclasses.replace(cfg, min_warmup_iters=0, autoanchor=False, lr0=None), model=model, hyp=hyp,
                         callbacks=[FreezeObservers(freeze_epoch)])
    if trainer.start_epoch == 0:
        batches = (imgs.to(trainer.device).float() / 255.0 for i, (imgs, *_rest) in
                   zip(range(calib_batches), trainer.train_loader))
        calibrate(trainer.model, batches)
        if trainer.ema is not None:
            trainer.ema.ema.load_state_dict(trainer.model.state_dict())
    result = trainer.train()
    qat = trainer.eval_model
    set_observers(qat, False)
    convs = [m for m in qat.modules() if isinstance(m, FakeQuantConv2d)]
    return qat, QatReport(epochs=result.epochs_done, convs=len(convs),
                          float_outputs=sum(type(m) is nn.Conv2d for m in qat.modules()),
                          observer_freeze_epoch=freeze_epoch, rows=result.rows)


def merge_duplicate_qdq(model: onnx.ModelProto) -> int:
    """Merge Quantize/DequantizeLinear nodes reading the same tensor with equal scale and zero point (in place)."""
    # A fake-quant shared by several convs is traced once per call: identical Q/DQ pairs on one tensor, which
    # keep ONNX Runtime from fusing the producer (one Q consumer per quantized tensor is its fusion pattern).
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return 0  # names used inside If/Loop bodies are not renamed here; leave such graphs alone
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    kept = []
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
        params = [values.get(name) for name in node.input[1:]]
        if (node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.output[0] not in graph_outputs
                and all(p is not None for p in params)):
            key = (node.domain, node.op_type, node.input[0], *((p.dtype.str, p.shape, p.tobytes()) for p in params),
                   *(a.SerializeToString() for a in node.attribute))
            if key in seen:
                rename[node.output[0]] = seen[key]
                continue
            seen[key] = node.output[0]
        kept.append(node)
    merged = len(model.graph.node) - len(kept)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    stale = [v for v in model.graph.value_info if v.name in rename]
    for v in stale:
        model.graph.value_info.remove(v)
    return merged


def export_qat(model: Detector, out: str | Path, imgsz: int | None = None) -> Path:
    """The fake-quantized model as QDQ ONNX (opset 17), checked and loadable by ONNX Runtime."""
    from latency_tables.onnx_utils import check_onnx, export_onnx

    from .export import DecodedOutput

    imgsz = imgsz or model.arch.imgsz
    set_observers(model, False)
    with warnings.catch_warnings():  # the fake-quant enable flags become graph constants: exactly what is meant
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        data = export_onnx(DecodedOutput(model).eval(), (model.arch.in_channels, imgsz, imgsz),
                           opset=QAT_OPSET, input_names=["images"], output_names=["output"], check=False)
    graph = onnx.load_from_string(data)
    if merge_duplicate_qdq(graph):
        data = graph.SerializeToString()
    check_onnx(data)
    atomic_write_bytes(out, data)  # written once, whole: a kill never leaves a half-rewritten model
    return Path(out)
