"""Quantization-aware finetuning: fake-quantized convolutions trained with the Trainer, exported as QDQ ONNX.

For when post-training quantization (`compress.quantize`) loses too much. The model is fused first
(BatchNorm folded, RepConv merged), then every `nn.Conv2d` becomes a `FakeQuantConv2d`: per-channel
symmetric int8 weights and per-tensor uint8 inputs (ONNX Runtime CPU's U8S8 kernels), and uint8 outputs
except for the convs of the detection head, whose maps feed the box decode and stay float (as
`quantize_onnx` keeps the decode tail float). The TorchScript exporter turns each fake-quant into a
QuantizeLinear/DequantizeLinear pair, so the exported file has the same QDQ form as a PTQ one and ONNX Runtime
fuses it into QLinearConv the same way.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

from search_spaces.errors import ConfigError
from search_spaces.io import atomic_torch_save
from search_spaces.model import Detector
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


def _head_convs(det: Detector) -> set[int]:
    """ids of the convs inside the head: their outputs (the raw maps the decode reads) stay float."""
    return {id(m) for m in det.head.modules() if isinstance(m, nn.Conv2d)}


def prepare_qat(det: Detector, exclude: Iterable[str] = ()) -> Detector:
    """A fused copy of `det` with fake-quantized convs (modules named in `exclude` stay float)."""
    model = copy.deepcopy(det).eval()
    if model.form == "training":
        model = model.deploy()
    model.fuse()
    skip = set(exclude)
    head_out = _head_convs(model)
    replaced = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Conv2d and full not in skip:
                setattr(parent, child_name, FakeQuantConv2d(child, quantize_output=id(child) not in head_out))
                replaced += 1
    if replaced == 0:
        raise ConfigError("the model has no convolution to quantize", field="model")
    return model


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Let the fake-quant observers keep adapting their ranges, or freeze them (scales become constants)."""
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.enable_observer(enabled)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Run float batches through the model (observers on) so the first QAT step starts from real ranges."""
    was = model.training
    model.eval()
    n = 0
    for x in batches:
        model(x)
        n += 1
    model.train(was)
    return n


@dataclass
class QatReport:
    """What a QAT finetune did."""

    epochs: int
    convs: int
    float_outputs: int  # convs whose outputs stay float (head outputs)
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


class QatTrainer(Trainer):
    """The Trainer on a fake-quantized model, whose checkpoints are last.pt only."""

    def save_checkpoint(self, epoch: int) -> None:
        # a fake-quantized model is not an architecture + weights pair; its deliverable is the QDQ ONNX
        if self.main:
            atomic_torch_save(self.checkpoint_state(epoch), self.out / CHECKPOINT)


def qat_finetune(det: Detector, cfg: TrainConfig, *, lr_scale: float = 0.1, freeze_epoch: int = 1,
                 calib_batches: int = 8, exclude: Iterable[str] = ()) -> tuple[Detector, QatReport]:
    """Fake-quantize `det` and finetune it with the Trainer; returns the QAT model (EMA) and a report."""
    model = prepare_qat(det, exclude)
    hyp = load_hyp(default_hyp_name(det) if cfg.hyp == "auto" else cfg.hyp)
    # small steps from trained weights: no warmup (its bias LR starts at 0.1), a tenth of the LR
    lr = hyp.lr0 * lr_scale
    hyp = dataclasses.replace(hyp, lr0=lr, warmup_epochs=0.0, warmup_bias_lr=lr)
    trainer = QatTrainer(dataclasses.replace(cfg, min_warmup_iters=0), model=model, hyp=hyp,
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
                          float_outputs=sum(isinstance(m.output_fq, nn.Identity) for m in convs),
                          observer_freeze_epoch=freeze_epoch, rows=result.rows)


def export_qat(model: Detector, out: str | Path, imgsz: int | None = None) -> Path:
    """The fake-quantized model as QDQ ONNX (opset 17), checked and loadable by ONNX Runtime."""
    from latency_tables.onnx_utils import check_onnx, export_onnx

    from .export import DecodedOutput

    imgsz = imgsz or model.arch.imgsz
    set_observers(model, False)
    with warnings.catch_warnings():  # the fake-quant enable flags become graph constants: exactly what is meant
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        export_onnx(DecodedOutput(model).eval(), (model.arch.in_channels, imgsz, imgsz), path=out,
                    opset=QAT_OPSET, input_names=["images"], output_names=["output"], check=False)
    check_onnx(Path(out))
    return Path(out)
