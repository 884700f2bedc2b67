"""`Trainer`: YOLOv7-style detection training (SGD/AdamW, warmup + cosine, EMA, AMP, DDP, resume)."""
from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from search_spaces import Detector, save_model
from search_spaces.errors import CheckpointError, ConfigError, DivergedError
from search_spaces.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_weights
from search_spaces.loading import Transfer, load_for_classes
from search_spaces.model import check_imgsz

from . import distributed as ddp
from .autoanchor import MIN_BPR, AnchorFit, check_anchors, set_anchors, sync_arch_anchors
from .callbacks import Callback
from .config import TrainConfig
from .datasets import DataConfig, YoloDataset, build_dataloader, load_data_config
from .ema import ModelEMA, unwrap
from .evaluate import EvalResult, evaluate
from .freeze import freeze_layers
from .hyp import Hyp, load_hyp
from .loss import HeadInfo, YoloLoss
from .multiscale import draw_size, rescale_batch

CHECKPOINT = "last.pt"


@dataclass
class TrainResult:
    """What a run produced: the final metrics, per-epoch rows and where the weights are."""

    out: Path
    epochs_done: int
    best_map: float
    last: EvalResult | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def final(self, key: str = "map") -> float | None:
        """The last validation's `key` (map, map50): this run's, or the resumed run's when nothing was left to train."""
        if self.last is not None:
            return float(getattr(self.last.metrics, key))
        return next((float(r[key]) for r in reversed(self.rows) if r.get(key) is not None), None)

    def summary(self) -> dict[str, Any]:
        """What the training commands print: where, how many epochs, the best and the final mAP."""
        return {"out": str(self.out), "epochs": self.epochs_done, "best_map": self.best_map,
                "map": self.final("map"), "map50": self.final("map50")}


# the settings a resumed run must share with the interrupted one: another optimizer's state would not load; another
# rate, schedule or nominal batch would move the learning rate mid-run; another class count or frozen set is
# another head or another set of optimized parameters
RESUME_FIXED = ("optimizer", "lr0", "lr_schedule", "nbs", "single_cls", "freeze")
_CONFIG_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _setting(key: str, value: Any) -> str:
    """A training setting as its command-line flag says it (`--lr0 0.002`, `--single-cls`, `no --freeze`)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or value in (None, 0):
        return flag if value else f"no {flag}" + (" (the hyp's rate)" if key == "lr0" else "")
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def default_hyp_name(det: Detector) -> str:
    """YOLOv7's hyp file for a model: tiny for small P5 models, p6 for four levels, else p5."""
    if det.head.nl >= 4:
        return "p6"
    return "tiny" if "tiny" in det.arch.name or det.arch.act == "leaky_relu" else "p5"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """YOLOv7's three groups: BN weights and implicit tensors (no decay), weights (decay), biases (no decay)."""
    no_decay, decay, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "implicit":
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0, "kind": "bn"},
            {"params": decay, "weight_decay": weight_decay, "kind": "weight"},
            {"params": biases, "weight_decay": 0.0, "kind": "bias"}]


def lr_factor(epoch_progress: float, epochs: int, lrf: float, schedule: str) -> float:
    """LR multiplier at fractional epoch `epoch_progress`: one-cycle cosine or linear from 1 to lrf."""
    x = min(max(epoch_progress / epochs, 0.0), 1.0)
    if schedule == "linear":
        return (1 - x) * (1.0 - lrf) + lrf
    return ((1 - math.cos(x * math.pi)) / 2) * (lrf - 1) + 1


SYNTHETIC_ROOT = Path("runs/data/synthetic")


def resolve_data_config(data: str | Path | None, imgsz: int = 320, progress: bool = False) -> DataConfig:
    """The dataset config for `data`, or the built-in synthetic set (generated once under runs/data)."""
    if data:
        return load_data_config(data)
    from .synthetic import generate

    # under torchrun rank 0 writes it and the others wait: ranks writing one folder at once would clash
    if ddp.is_main() and not (SYNTHETIC_ROOT / "data.yaml").is_file():
        generate(SYNTHETIC_ROOT, imgsz=max(imgsz, 320), seed=0, progress=progress)
    ddp.barrier()
    return load_data_config(SYNTHETIC_ROOT / "data.yaml")


def training_data(cfg: TrainConfig, progress: bool = False) -> DataConfig:
    """The dataset a training run sees: `cfg.data` (or the synthetic set), its classes merged with `single_cls`."""
    data = resolve_data_config(cfg.data, cfg.imgsz, progress=progress)
    return data.single_class() if cfg.single_cls else data


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a Detector on a YOLO-format dataset; subclass `train_step` or add Callbacks to extend it."""

    # DDP: True where a step may leave parameters without gradient (a supernet's inactive choices)
    find_unused_parameters: bool = False
    # optimizer steps in a row with non-finite gradients (each skipped) before the run stops as diverged
    max_nonfinite_steps: int = 10

    def __init__(self, cfg: TrainConfig, model: Detector | None = None, callbacks: Sequence[Callback] = (),
                 hyp: Hyp | None = None, transfer: Transfer | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.device = ddp.setup(cfg.device)
        self.rank, self.world = ddp.rank(), ddp.world_size()
        self.main = self.rank == 0
        self.out = Path(cfg.out)
        if not cfg.resume and not cfg.exist_ok and (self.out / CHECKPOINT).is_file():  # its weights, results, config
            raise ConfigError(f"holds an earlier run ({CHECKPOINT}): pass --resume to continue it, or --exist-ok to "
                              "train over it", path=self.out, field="out")
        seed_everything(cfg.seed)
        self.data_cfg = training_data(cfg, progress=self.main)
        # weights trained for other classes are transferred where they fit (YOLOv7's finetuning on a new dataset);
        # a caller that built the model (distillation) passes the transfer it made
        self.model, self.transfer = (model, transfer) if model is not None else load_for_classes(cfg.model,
                                                                                                 self.data_cfg.nc)
        if self.model.nc != self.data_cfg.nc:
            raise ConfigError(f"model has nc={self.model.nc}, dataset has nc={self.data_cfg.nc}",
                              path=self.data_cfg.yaml_path, field="nc")
        check_imgsz(cfg.imgsz, self.grid_stride())  # before the data scan and AutoAnchor: a P6 model needs 64
        if self.transfer is not None and self.main and cfg.progress:
            print(self.transfer.summary())
        # every parameter trains: a model handed over from an earlier run may be its EMA copy, whose
        # parameters are frozen (and pruning re-creates only the ones it cuts), so it would train in part
        self.model.requires_grad_(True).to(self.device)
        self.frozen = self._freeze(cfg.freeze)
        if cfg.sync_bn and self.world > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        base_hyp = hyp or load_hyp(default_hyp_name(self.model) if cfg.hyp == "auto" else cfg.hyp)
        if cfg.lr0 is not None:
            base_hyp = replace(base_hyp, lr0=cfg.lr0)
        self.hyp = base_hyp
        self.last_terms: dict[str, Tensor] = {}
        self.skipped_steps = 0  # this epoch's optimizer steps skipped for non-finite gradients
        self.nonfinite_run = 0  # consecutive ones, across epochs
        self.per_rank_batch = max(cfg.batch // self.world, 1)
        self.train_set = YoloDataset.from_config(self.data_cfg, "train", imgsz=cfg.imgsz, hyp=base_hyp,
                                                 strict=cfg.strict_data, cache=cfg.cache, seed=cfg.seed)
        self.val_set = YoloDataset.from_config(self.data_cfg, "val", imgsz=cfg.imgsz, strict=cfg.strict_data,
                                               cache=cfg.cache, seed=cfg.seed)
        # a resumed run trains with the anchors its checkpoint holds (load_checkpoint), not a new fit
        resuming = cfg.resume and (self.out / CHECKPOINT).is_file()
        self.anchor_fit = self._fit_anchors(base_hyp.anchor_t) if cfg.autoanchor and not resuming else None
        self._log_anchor_fit()
        self.loss_fn = self.make_loss()
        self.current_loss = self.loss_fn  # the loss of the forward pass in progress (subclasses switch it)
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(self.train_set, shuffle=True, seed=cfg.seed,
                                                                      drop_last=True)
        self.train_loader = build_dataloader(self.train_set, self.per_rank_batch, cfg.workers, shuffle=True,
                                             sampler=sampler, seed=cfg.seed, drop_last=self.world > 1)
        self.val_loader = build_dataloader(self.val_set, self.per_rank_batch * 2, cfg.workers, shuffle=False,
                                           seed=cfg.seed)
        self.accumulate_nominal = max(round(cfg.nbs / cfg.batch), 1)
        wd = base_hyp.weight_decay * cfg.batch * self.accumulate_nominal / cfg.nbs
        self.weight_decay = wd  # this run's (a resumed optimizer state brings the interrupted run's)
        self.extra_modules = nn.ModuleList(m for cb in self.callbacks for m in cb.modules()).to(self.device)
        groups = param_groups(nn.ModuleList([self.model, self.extra_modules]), wd)
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=base_hyp.lr0, betas=(base_hyp.momentum, 0.999))
        else:
            self.optimizer = torch.optim.SGD(groups, lr=base_hyp.lr0, momentum=base_hyp.momentum, nesterov=True)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, tau=cfg.ema_tau) if cfg.ema else None
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters)
        self.start_epoch, self.best_map, self.rows = 0, -1.0, []
        self.epochs = cfg.epochs  # the schedule's length; `fit_epochs_to_time` may shorten it after epoch 1
        self.epochs_fitted = False  # whether that was done: a resumed run keeps the fitted length
        self.elapsed_before = 0.0  # training seconds of the interrupted run(s): --max-time is one budget for all
        self.t_start: float | None = None  # when this run's clock started (less `elapsed_before`)
        self.stop_requested = False  # a callback sets it in on_epoch_end to end training after that epoch
        if cfg.resume:
            self.load_checkpoint(self.out / CHECKPOINT)

    def grid_stride(self) -> int:
        """What every input side must be a multiple of (multi-scale sizes are): the model's largest stride and
        what a callback's own network needs (a distillation teacher's)."""
        return math.lcm(self.model_stride(), *(cb.input_stride() for cb in self.callbacks))

    def model_stride(self) -> int:
        """What the model's input sides must be a multiple of (`Detector.max_stride`)."""
        return unwrap(self.model).max_stride

    def _freeze(self, n: int) -> list[str]:
        """`--freeze`: the first n layers' parameters get no gradient (their names)."""
        if not n:
            return []
        if not isinstance(self.model, Detector):
            raise ConfigError(f"freezing layers needs a detector, not a {type(self.model).__name__}", field="freeze")
        frozen = freeze_layers(self.model, n)
        if self.main and self.cfg.progress:
            print(f"freeze: the first {n} layers ({len(frozen)} parameter tensors) get no gradient")
        return frozen

    def make_loss(self) -> YoloLoss:
        """The detection loss for the model's head as it is now (its anchors included)."""
        return YoloLoss(HeadInfo.from_detector(self.model), self.hyp.scaled(self.model.head.nl, self.model.nc,
                                                                            self.cfg.imgsz))

    def _fit_anchors(self, anchor_t: float) -> AnchorFit | None:
        """AutoAnchor on rank 0; the other ranks take its anchors (as YOLOv7 broadcasts them)."""
        det = unwrap(self.model)
        fit = check_anchors(det, self.train_set.shapes, self.train_set.labels, self.cfg.imgsz, thr=anchor_t,
                            seed=self.cfg.seed) if self.main else None
        fit = ddp.broadcast_object(fit)
        if not self.main and fit is not None and fit.replaced:
            set_anchors(det, np.array(fit.anchors, dtype=np.float64).reshape(-1, 2))
        return fit

    def _log_anchor_fit(self) -> None:
        f = self.anchor_fit
        if f is None or not self.main or not self.cfg.progress:
            return
        if f.replaced:
            print(f"autoanchor: best possible recall {f.bpr:.3f} < {MIN_BPR} with the model's anchors; refit to "
                  f"{f.new_bpr:.3f}: {f.anchors}")
        elif f.new_bpr is not None:
            print(f"autoanchor: best possible recall {f.bpr:.3f}; a refit reached {f.new_bpr:.3f}, anchors kept")

    # ---- set-up helpers -------------------------------------------------------------------------------
    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.cfg.amp
        if self.device.type != "cuda" or amp == "off":
            return None
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def eval_model(self) -> nn.Module:
        """The model used for validation and saving: the EMA if enabled."""
        return self.ema.ema if self.ema is not None else unwrap(self.model)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """Everything needed to resume after `epoch` (plain tensors and containers: weights_only-loadable)."""
        return {
            "epoch": epoch, "epochs": self.epochs, "epochs_fitted": self.epochs_fitted, "best_map": self.best_map,
            "rows": self.rows,
            "config": self.cfg.to_dict(), **self.model_identity(),
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.ema.state_dict() if self.ema else None, "ema_updates": self.ema.updates if self.ema else 0,
            "extra": self.extra_modules.state_dict(), "nonfinite_run": self.nonfinite_run,
            "anchor_fit": self.anchor_fit_record(), "hyp": self.hyp.to_dict(),
            "elapsed_s": self.elapsed_before if self.t_start is None else time.time() - self.t_start,
        }

    def anchor_fit_record(self) -> dict[str, Any] | None:
        """What AutoAnchor found, as the checkpoint keeps it (subclasses that fit several heads: their record)."""
        return None if self.anchor_fit is None else self.anchor_fit.to_dict()

    def restore_anchor_fit(self, record: Mapping[str, Any]) -> None:
        """Take back an interrupted run's `anchor_fit_record` (its anchors are in the weights)."""
        self.anchor_fit = AnchorFit(**record)

    def model_identity(self) -> dict[str, Any]:
        """What the checkpoint records to say which model its weights belong to (subclasses: not an arch)."""
        return {"arch": self.model.arch.to_yaml()}

    def save_checkpoint(self, epoch: int) -> None:
        """Atomically write last.pt and the EMA model directory (only rank 0 writes)."""
        if not self.main:
            return
        atomic_torch_save(self.checkpoint_state(epoch), self.out / CHECKPOINT)
        save_model(self.eval_model, self.out / "model")

    def check_resume(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Raise a CheckpointError when `checkpoint` belongs to another run (subclasses; the weights' shapes
        are checked anyway)."""

    def _check_same_schedule(self, ck: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume with settings that change the optimizer, its schedule or the trained parameters
        mid-run (its state would not load, or the learning rate would jump)."""
        ran = ck.get("config") or {}  # the interrupted run's TrainConfig
        for key in RESUME_FIXED:
            theirs, ours = ran.get(key, _CONFIG_DEFAULTS[key]), getattr(self.cfg, key)  # absent: from before the key
            if theirs != ours:
                raise CheckpointError(f"cannot resume: the interrupted run trained with {_setting(key, theirs)}, this "
                                      f"one with {_setting(key, ours)}", path=path, field=key)
        hyp = ck.get("hyp")  # the effective hyper-parameters (--hyp's file may have changed): from session 32
        changed = sorted(k for k, v in (hyp or {}).items() if getattr(self.hyp, k, v) != v)
        if changed:
            raise CheckpointError(f"cannot resume: the interrupted run trained with other hyper-parameters "
                                  f"({', '.join(f'{k} {hyp[k]} -> {getattr(self.hyp, k)}' for k in changed)})",
                                  path=path, field="hyp")

    def load_checkpoint(self, path: Path) -> None:
        """Resume from `path` if it exists (the interrupted epoch restarts from its beginning)."""
        if not path.is_file():
            return
        ck = load_weights(path)
        self.check_resume(ck, path)
        self._check_same_schedule(ck, path)
        extra = ck.get("extra") or {}
        if set(extra) != set(self.extra_modules.state_dict()):
            raise CheckpointError("cannot resume: the callbacks' trainable modules differ from the interrupted run's "
                                  "(e.g. distillation adapters: pass the same --w-feat as that run)", path=path)
        try:
            unwrap(self.model).load_state_dict(ck["model"])
            self.extra_modules.load_state_dict(extra)
            self.optimizer.load_state_dict(ck["optimizer"])
            for g in self.optimizer.param_groups:  # weight decay scales with --batch/--nbs, which may have changed
                if g.get("kind") == "weight":
                    g["weight_decay"] = self.weight_decay
            self.scaler.load_state_dict(ck["scaler"])
            if self.ema is not None and ck.get("ema") is not None:
                self.ema.ema.load_state_dict(ck["ema"])
                self.ema.updates = int(ck["ema_updates"])
            elif self.ema is not None:  # a run without EMA resumed with it: average from the resumed weights
                self.ema = ModelEMA(unwrap(self.model), tau=self.cfg.ema_tau)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume: checkpoint does not match this run ({str(e)[:200]})",
                                  path=path) from None
        for m in (unwrap(self.model), self.ema.ema if self.ema is not None else None):
            if m is not None:
                sync_arch_anchors(m)  # the anchors the interrupted run fitted (autoanchor) are in its buffers
        self.loss_fn = self.current_loss = self.make_loss()
        self.nonfinite_run = int(ck.get("nonfinite_run", 0))  # the divergence check counts across a resume
        if ck.get("anchor_fit"):  # what the interrupted run's AutoAnchor found
            self.restore_anchor_fit(ck["anchor_fit"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.best_map = float(ck["best_map"])
        self.rows = list(ck["rows"])
        self.elapsed_before = float(ck.get("elapsed_s", 0.0))
        # A schedule fitted to a time budget stays as planned; otherwise --epochs may extend a finished run.
        self.epochs_fitted = bool(ck.get("epochs_fitted", any("epochs_planned" in r for r in self.rows)))
        keep = self.cfg.fit_epochs_to_time and self.epochs_fitted and ck.get("epochs")
        self.epochs = min(int(ck["epochs"]), self.cfg.epochs) if keep else self.cfg.epochs

    # ---- the loop -------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, imgs: Tensor, targets: Tensor,
                     loss_fn: YoloLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Detection loss (`loss_fn` or self.loss_fn) plus the callbacks' extra terms, for one forward pass."""
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            preds = model(imgs)
        preds = [p.float() for p in preds]
        self.current_loss = loss_fn or self.loss_fn  # callbacks weigh their terms with this pass's gains
        parts = self.current_loss.components(preds, targets, imgs.shape)
        for cb in self.callbacks:
            parts.update(cb.extra_loss(self, model, imgs, targets, preds))
        loss, _ = YoloLoss.combine(parts, imgs.shape[0])
        return loss, {k: v.detach() for k, v in parts.items()}

    def train_step(self, imgs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Forward + backward of one batch (gradients accumulate; the optimizer steps elsewhere)."""
        loss, items = self.compute_loss(self.ddp_model, imgs, targets)
        # DDP averages gradients over ranks; YOLOv7 scales the loss by the world size to keep the sum
        self.scaler.scale(loss * self.world).backward()
        return items

    def optimizer_step(self) -> None:
        """Unscale, clip, step, zero, and update the EMA; a step with non-finite gradients is skipped."""
        ddp.average_gradients(self.extra_modules)  # callback modules live outside the DDP wrapper
        self.scaler.unscale_(self.optimizer)
        fp16 = self.scaler.is_enabled()
        norm = None
        if self.cfg.grad_clip > 0 or not fp16:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = nn.utils.get_total_norm([p.grad for p in params])
            if self.cfg.grad_clip > 0:
                nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        # One NaN step would poison every weight and the EMA for good. fp16's GradScaler skips such steps
        # itself (a few are routine while it calibrates its scale: hence the longer run allowed); in fp32 and
        # bf16 the step is skipped here. Gradients are all-reduced, so every DDP rank sees the same norm and
        # takes the same decision; the check costs one device sync per optimizer step, as the scaler's does.
        if fp16:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = self.scaler.get_scale() >= scale  # the scaler backs off only after a non-finite step
        else:
            finite = bool(torch.isfinite(norm))
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.nonfinite_run = 0
            if self.ema is not None:
                self.ema.update(self.model)
            return
        self.skipped_steps += 1
        self.nonfinite_run += 1
        bad_stats = [n for n, b in unwrap(self.model).named_buffers() if b.is_floating_point() and
                     not bool(torch.isfinite(b).all())]
        # each rank's running statistics are its own batch's: rank 0 decides, or one rank alone would stop
        bad_stats = ddp.broadcast_object(bad_stats)
        limit = self.max_nonfinite_steps * (4 if fp16 else 1)
        if bad_stats or self.nonfinite_run >= limit:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in self.last_terms.items())
            why = (f"the forward pass left non-finite running statistics in {bad_stats[0]}" if bad_stats else
                   f"{self.nonfinite_run} optimizer steps in a row had non-finite gradients")
            raise DivergedError(f"training diverged: {why} (last batch's loss terms: {terms}); lower the learning "
                                "rate or the extra loss weights, or resume from an earlier checkpoint", path=self.out)

    def _warmup_iters(self, nb: int) -> int:
        """Warmup iterations: warmup_epochs, at least min_warmup_iters, at most half of the schedule's."""
        return min(max(round(self.hyp.warmup_epochs * nb), self.cfg.min_warmup_iters), self.epochs * nb // 2)

    def _warmup(self, ni: int, nw: int, epoch_progress: float) -> int:
        """Set lr/momentum for global iteration ni (YOLOv7 warmup) and return the accumulation steps."""
        h, cfg = self.hyp, self.cfg
        factor = lr_factor(epoch_progress, self.epochs, h.lrf, cfg.lr_schedule)
        if ni <= nw:
            for g in self.optimizer.param_groups:
                start = h.warmup_bias_lr if g.get("kind") == "bias" else 0.0
                g["lr"] = float(np.interp(ni, [0, nw], [start, h.lr0 * factor]))
                if "momentum" in g:
                    g["momentum"] = float(np.interp(ni, [0, nw], [h.warmup_momentum, h.momentum]))
            return max(1, round(float(np.interp(ni, [0, nw], [1, self.accumulate_nominal]))))
        for g in self.optimizer.param_groups:
            g["lr"] = h.lr0 * factor
            if "momentum" in g:
                g["momentum"] = h.momentum
        return self.accumulate_nominal

    def validate(self, max_batches: int | None = None) -> EvalResult:
        """mAP of the EMA (or raw) model on the validation set."""
        return evaluate(self.eval_model, self.val_loader, self.model.nc, self.data_cfg.names,
                        self.cfg.conf_thres, self.cfg.iou_thres, self.device, progress=self.cfg.progress and self.main,
                        max_batches=max_batches or self.cfg.max_val_batches)

    def train(self) -> TrainResult:
        """Run the remaining epochs; checkpoint after each; return the final metrics."""
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
        for cb in self.callbacks:
            cb.on_train_start(self)
        nb = len(self.train_loader)
        if nb == 0:
            raise ConfigError("the training set has fewer images than one batch", path=self.data_cfg.yaml_path,
                              field="batch")
        nw = self._warmup_iters(nb)
        stride = self.grid_stride() if cfg.multi_scale else 0  # fixed for the run: the model's and its callbacks'
        t_start, last = time.time() - self.elapsed_before, None
        self.t_start, saved_at = t_start, time.time()
        spent = bool(cfg.max_time_s) and self.elapsed_before >= cfg.max_time_s  # a resume after the budget ran out
        epoch = self.start_epoch - 1
        while epoch + 1 < self.epochs and not spent:
            epoch += 1
            torch.manual_seed(cfg.seed + epoch)  # each epoch is a function of (seed, epoch): exact resume
            sizes = random.Random(f"multi-scale {cfg.seed} {epoch}")  # the same on every rank
            self.train_loader.set_epoch(epoch)
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            self.skipped_steps = 0
            t0, n_img, n_ok = time.time(), 0, 0
            bar = tqdm(enumerate(self.train_loader), total=nb, desc=f"epoch {epoch + 1}/{self.epochs}",
                       disable=not (cfg.progress and self.main), leave=False)
            for i, (imgs, targets, _paths, _shapes) in bar:
                ni = epoch * nb + i
                accumulate = self._warmup(ni, nw, epoch + i / nb)
                imgs = imgs.to(self.device, non_blocking=True).float() / 255.0
                if cfg.multi_scale:
                    imgs = rescale_batch(imgs, draw_size(cfg.imgsz, stride, sizes), stride)
                items = self.train_step(imgs, targets.to(self.device))
                self.last_terms = items
                if (i + 1) % accumulate == 0 or i == nb - 1:
                    self.optimizer_step()
                values = {k: float(v) for k, v in items.items()}
                if all(math.isfinite(v) for v in values.values()):  # a skipped NaN batch would blank the mean
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_ok += 1
                n_img += imgs.shape[0] * self.world
                bar.set_postfix({k: f"{v / max(n_ok, 1):.4f}" for k, v in sums.items()} |
                                {"img/s": f"{n_img / max(time.time() - t0, 1e-9):.1f}"})
            train_s = time.time() - t0
            ddp.broadcast_buffers(unwrap(self.model))
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[1]["lr"],
                                   **{k: v / max(n_ok, 1) for k, v in sums.items()},
                                   "train_img_s": n_img / max(train_s, 1e-9), "train_s": train_s}
            if self.skipped_steps:
                row["skipped_steps"] = self.skipped_steps  # optimizer steps dropped for non-finite gradients
            out_of_time = bool(cfg.max_time_s) and time.time() - t_start > cfg.max_time_s
            final = epoch + 1 == self.epochs or bool(ddp.broadcast_object(out_of_time))  # ranks' clocks differ
            if (epoch + 1) % cfg.val_interval == 0 or final:
                last = self._validate_into(row) or last
            if cfg.fit_epochs_to_time and cfg.max_time_s and not self.epochs_fitted and not final:
                self.epochs = self._epochs_for_budget(epoch, time.time() - t_start)
                self.epochs_fitted = True
                nw = self._warmup_iters(nb)
                row["epochs_planned"] = self.epochs
                final = epoch + 1 >= self.epochs
                if final and "map" not in row:
                    last = self._validate_into(row) or last
            if self.device.type == "cuda":
                row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.rows.append(row)
            # epochs of a second or two would spend most of their time writing checkpoints: --save-every
            # trades what a kill loses for that time (each epoch is a function of its seed: resume stays exact)
            saved = final or time.time() - saved_at >= cfg.save_every_s
            if saved:
                self.save_checkpoint(epoch)
                saved_at = time.time()
            self._log(row)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, row)
            if final or bool(ddp.broadcast_object(self.stop_requested)):  # rank 0's callbacks decide
                if "map" not in row:  # stopped on an epoch --val-interval skipped: the last is always validated
                    last = self._validate_into(row) or last
                    self._log(row)
                    saved = False  # the row changed
                if not saved:
                    self.save_checkpoint(epoch)
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        self._finish()
        return TrainResult(self.out, epoch + 1, self.best_map, last, self.rows)

    def _validate_into(self, row: dict[str, Any]) -> EvalResult | None:
        """Validate on rank 0 and add mAP and speed to the epoch's row."""
        if not self.main:
            return None
        res = self.validate()
        row.update(map=res.metrics.map, map50=res.metrics.map50, val_img_s=res.images_per_s)
        self.best_map = max(self.best_map, res.metrics.map)
        return res

    def _epochs_for_budget(self, epoch: int, epoch_s: float) -> int:
        """Schedule length that fits the rest of max_time_s at this epoch's pace (same on every rank)."""
        # Decided once, after the first epoch of this run (train + validation), so the cosine reaches its
        # floor when the budget ends instead of being cut at its start. Rank 0 decides: ranks must agree.
        left = max(self.cfg.max_time_s - epoch_s, 0.0)  # type: ignore[operator]
        planned = min(self.cfg.epochs, epoch + 1 + int(left / max(epoch_s, 1e-9)))
        return int(ddp.broadcast_object(planned))

    def _log(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.out / "results.csv", buf.getvalue())  # rewritten whole: never half a row
        msg = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        tqdm.write(msg)

    def anchor_state(self) -> dict[str, Any]:
        """The anchors this rank trains with, as its model states them and as its loss assigns with them (DDP
        buffers are broadcast, so equal weights on every rank do not show that these agree)."""
        det = unwrap(self.model)
        stated = det.arch.head.anchors if isinstance(det, Detector) and not det.head.anchor_free else None
        return {"stated": stated, "loss": [round(float(v), 4) for v in self.loss_fn.head.anchors.flatten()]}

    def _finish(self) -> None:
        digests = ddp.gather_strings(ddp.state_digest(unwrap(self.model)))
        anchors = ddp.gather_strings(json.dumps(self.anchor_state(), sort_keys=True))
        if self.main:
            atomic_write_json(self.out / "summary.json", {
                "epochs": len(self.rows), "best_map": self.best_map, "world_size": self.world,
                "rank_weight_digests": digests, "ddp_weights_identical": len(set(digests)) == 1,
                "ddp_anchors_identical": len(set(anchors)) == 1,
                "transfer": None if self.transfer is None else self.transfer.to_dict(), "frozen": len(self.frozen),
                "last": self.rows[-1] if self.rows else None,
            })
