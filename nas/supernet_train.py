"""Supernet training: the sandwich rule with in-place distillation, as a `Trainer` subclass.

Each batch trains the largest subnet, `n_random` random subnets and the smallest one (its head type drawn
per batch, since head types have no size order); gradients of all of them accumulate and the Trainer takes
one optimizer step (BigNAS/OFA). With `per_head`, each batch first draws a head configuration (type and
layout) and the whole sandwich is drawn inside it, with that configuration's own largest as the teacher:
every head and the neck levels it reads then get the same share of the training, where the shared sandwich
trains its largest's head configuration every step and the others only when drawn. Given a
`FeasibleRegion` (a latency table and a budget), every subnet is drawn from the architectures within the
budget and the largest is the region's (nas.budget): the search can pick nothing else, so nothing else is
trained. The smaller subnets also learn from the largest one's detached outputs (per-cell objectness and
class scores, levels matched by grid size), as BigNAS does to make inherited weights rank architectures
(how well they do here is measured in docs/benchmarks.md, "Search"). Only the largest subnet updates the
shared BatchNorm statistics, so they are the largest path's: validation evaluates that path, and the
search recalibrates them for every other subnet anyway. With `sort_channels`, every epoch after the first
starts by reordering each conv block's filters by importance (`Supernet.sort_channels`, OFA), so narrow
subnets train and inherit the channels the largest relies on most. With `attentive` k > 1 (and a region),
each random subnet is the one of k feasible draws predicted to spend the most of the budget (AttentiveNAS's
best-up sampling, predicted latency as the proxy): the near-budget architectures the search's front is made
of get more of the training than a uniform draw gives them. With `per_family`, each batch first draws a
family (every categorical decision: block types, transitions, SPP, head type, layout and conv, as a feasible
draw has them) and the whole sandwich is drawn inside it: its largest (the space's largest with the family,
else the heaviest feasible of a few draws) teaches its smaller members. Those are then true sub-networks of
their teacher, as in BigNAS, where the shared sandwich's students differ from its one largest in most block
types and transitions, whose weights that largest never runs. No subnet then keeps the largest's BatchNorm
statistics, so validation re-estimates them first. With a `teacher` (a trained Detector, frozen), its outputs
teach every member of the sandwich, the largest included, in place of the largest's: the students of every
family then learn from one strong network that no shared weight belongs to. See docs/nas.md.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress.distill import cell_kd
from search_spaces.architecture import Architecture
from search_spaces.errors import CheckpointError, ConfigError
from search_spaces.io import atomic_torch_save
from search_spaces.model import Detector
from search_spaces.space import LAYOUTS, SearchSpace
from trainer import distributed as ddp
from trainer.autoanchor import MIN_BPR, AnchorFit, fit_anchors
from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.evaluate import EvalResult
from trainer.hyp import Hyp, load_hyp
from trainer.loss import HeadInfo, YoloLoss
from trainer.trainer import CHECKPOINT, Trainer, resolve_data_config, seed_everything

from .budget import FeasibleRegion
from .search import calibration_batches
from .supernet import Supernet, frozen_bn_stats, supernet_document

SUPERNET_FILE = "supernet.pt"
HEAD_DECISIONS = ("head.type", "head.layout")  # one head configuration: each has its own head weights and loss
FAMILY_DRAWS = 32  # random draws among which a family's largest is chosen when the space's largest is over budget
VAL_BN_BATCHES = 8  # training batches that re-estimate the largest's BatchNorm statistics before a validation


def family_decisions(space: SearchSpace) -> tuple[str, ...]:
    """The decisions whose choices are names (block types, transitions, SPP, activation, head type/layout/conv):
    each choice runs its own weights or function, where a size choice runs a prefix of the same weights."""
    return tuple(n for n, d in space.decisions.items()
                 if len(d.choices) > 1 and all(isinstance(c, str) for c in d.choices))


@dataclass(frozen=True)
class SandwichGroup:
    """What one sandwich step draws from: its largest (the teacher), the smallest subnets it picks one of,
    and the decisions its random subnets hold fixed (empty: the whole space or region); `sampled` is False
    where the region's random draw does not reach these decisions, and the random subnets are its smallest."""

    largest: Mapping[str, Any]
    smallest: tuple[Mapping[str, Any], ...]
    fixed: Mapping[str, Any]
    sampled: bool = True


def supernet_hyp_name(space: SearchSpace) -> str:
    """YOLOv7's hyp file for a space: p6 if every layout has P6, tiny for LeakyReLU-only spaces, else p5."""
    if set(space.layouts) == {"p3-p6"}:
        return "p6"
    return "tiny" if tuple(space.decisions["act"].choices) == ("leaky_relu",) else "p5"


class InplaceDistill(Callback):
    """Extra loss of the smaller subnets: soft per-cell objectness/class targets from the largest subnet (or,
    given a frozen teacher, of every subnet from the teacher's)."""

    def extra_loss(self, trainer: Any, model: Any, imgs: Tensor, targets: Tensor,
                   preds: list[Tensor]) -> dict[str, Tensor]:
        if trainer.role == "largest" and trainer.teacher is None:
            trainer.teacher_raw = [p.detach() for p in preds]
            return {}
        teacher = trainer.teacher_raw
        if not teacher or trainer.kd_weight <= 0:
            return {}
        by_grid = {tuple(t.shape[2:4]): t for t in teacher}
        nc = trainer.supernet.nc
        nc_t = nc if trainer.teacher is None else trainer.teacher.nc
        zero = torch.zeros((), device=imgs.device)
        obj_l, cls_l, n = zero, zero, 0
        for s in preds:
            t = by_grid.get(tuple(s.shape[2:4]))
            if t is None:
                continue  # a level the teacher lacks (a P6 level with a P5-topped teacher)
            obj, cls = cell_kd(s, t, nc, nc_t, trainer.kd_temperature, classes=nc > 1 and nc_t == nc)
            obj_l, cls_l, n = obj_l + obj, cls_l + cls, n + 1
        if n == 0:
            return {}
        # weighted like the detection terms they shadow, so KD and ground truth pull with comparable force
        h = trainer.current_loss.hyp
        return {"kd_obj": trainer.kd_weight * h.obj * obj_l / n, "kd_cls": trainer.kd_weight * h.cls * cls_l / n}


class ChannelSorting(Callback):
    """Reorder the supernet's filters by importance, inside those the sandwich's largest runs, before every
    epoch but the first (random weights have no importance yet); the order is a function of the weights, so
    a resumed epoch sorts as the killed one did."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch > 0:
            # inside the channels the largest runs: it keeps its function, and untrained filters stay last
            trainer.sorted_convs = trainer.supernet.sort_channels(keep=trainer.arch(trainer._largest))


# settings a resumed supernet training must share with the killed one: (option, what it says when on/off)
_SANDWICH_SETTINGS = {
    "per_head": ("--per-head", "drew its sandwich per head configuration", "drew one sandwich for all heads"),
    "sort_channels": ("--sort-channels", "sorted its channels by importance", "kept its channels in order"),
}


class SupernetTrainer(Trainer):
    """Trains a `Supernet` with the sandwich rule (largest + `n_random` random + smallest per batch) and
    in-place distillation; checkpoints `last.pt` (resume) and `supernet.pt` (EMA weights + space)."""

    find_unused_parameters = True  # inactive choices get no gradient in a step

    def __init__(self, cfg: TrainConfig, model: Supernet | None = None, callbacks: Sequence[Callback] = (),
                 hyp: Hyp | None = None, *, space: SearchSpace | str | None = None, n_random: int = 2,
                 kd_weight: float = 1.0, kd_temperature: float = 1.0, region: FeasibleRegion | None = None,
                 per_head: bool = False, sort_channels: bool = False, attentive: int = 1,
                 per_family: bool = False, teacher: Detector | None = None):
        if model is None:
            if space is None:
                raise ConfigError("give a Supernet or a search space", field="space")
            ddp.setup(cfg.device)  # before the data: under torchrun rank 0 makes the synthetic set, the rest wait
            nc = resolve_data_config(cfg.data, cfg.imgsz).nc
            seed_everything(cfg.seed)  # the initial weights are a function of the seed
            model = Supernet(space, nc=nc)
        if not isinstance(model, Supernet):
            raise ConfigError(f"SupernetTrainer trains a Supernet, got {type(model).__name__}", field="model")
        if cfg.sync_bn:
            raise ConfigError("SyncBN is not supported for a supernet (its BatchNorms are elastic)", field="sync_bn")
        if cfg.single_cls:  # the search and the Pareto export score at the data's classes
            raise ConfigError("a supernet trains at the data's classes (the search scores them so)", field="single_cls")
        if n_random < 0:
            raise ConfigError(f"must be >= 0, got {n_random}", field="n_random")
        if kd_temperature <= 0:
            raise ConfigError(f"must be > 0, got {kd_temperature}", field="kd_temperature")
        if attentive < 1:
            raise ConfigError(f"must be >= 1, got {attentive}", field="attentive")
        if per_head and per_family:
            raise ConfigError("a family fixes the head configuration too: give per_head or per_family, not both",
                              field="per_family")
        if attentive > 1 and region is None:
            raise ConfigError("attentive sampling ranks draws by predicted latency: it needs a latency table and "
                              "a budget (--table, --budget-ms)", field="attentive")
        self.supernet = model
        self.space = model.space
        self.n_random, self.kd_weight, self.kd_temperature = int(n_random), float(kd_weight), float(kd_temperature)
        self.per_head, self.sort_channels = bool(per_head), bool(sort_channels)
        # like n_random, it changes which subnets later steps draw, not what the weights mean: a resume may change it
        self.attentive = int(attentive)
        self.per_family = bool(per_family)  # also only changes which subnets later steps draw
        self._family = family_decisions(self.space)
        self.teacher = teacher
        self._val_bn: list[Tensor] | None = None
        self.sorted_convs = 0  # how many convs the last epoch-start sort reordered
        self.role = "largest"
        self.teacher_raw: list[Tensor] | None = None
        self._losses: dict[tuple, YoloLoss] = {}
        self.region = region
        # decisions are built into architectures by the region's space (pinned to the table's imgsz) if any
        self.arch_space = self.space if region is None else region.space
        self.layout_anchor_fits: dict[str, AnchorFit] = {}  # AutoAnchor's finding per head layout (_fit_anchors)
        self._largest, self._groups = self._ends(region, cfg)
        if teacher is not None:
            self._check_teacher(teacher, self.arch(self._largest).head_strides(), cfg.imgsz)
            teacher.eval().requires_grad_(False)  # only once every check passed: a refused teacher is left as given
        model.set_active(self.arch(self._largest))  # the Trainer builds its default loss from the active head
        if hyp is None:
            hyp = load_hyp(supernet_hyp_name(self.space) if cfg.hyp == "auto" else cfg.hyp)
        own: list[Callback] = [InplaceDistill(), *([ChannelSorting()] if self.sort_channels else [])]
        super().__init__(cfg, model=model, callbacks=[*own, *callbacks], hyp=hyp)
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.current_loss = self._losses.setdefault(self._loss_key(model.active_arch), self.loss_fn)

    def _check_teacher(self, teacher: Detector, strides: Sequence[int], imgsz: int) -> None:
        """Refuse a teacher that cannot teach this supernet: no level at its strides, an input size its largest
        stride does not divide, or distillation switched off."""
        if self.kd_weight <= 0:
            raise ConfigError("a teacher teaches through distillation: it needs a kd_weight > 0", field="teacher")
        if not set(teacher.strides) & set(strides):
            raise ConfigError(f"no level of the teacher (strides {list(teacher.strides)}) meets the supernet's "
                              f"(strides {list(strides)}): distillation would have nothing to match", field="teacher")
        if imgsz % teacher.max_stride:
            raise ConfigError(f"the teacher's largest stride {teacher.max_stride} does not divide the input size "
                              f"{imgsz}", field="teacher")

    def model_stride(self) -> int:
        """The space's largest stride (the active subnet's may be smaller), and a frozen teacher's: multi-scale
        sizes fit every subnet and the teacher."""
        return math.lcm(self.space.max_stride, *([self.teacher.max_stride] if self.teacher is not None else []))

    # ---- AutoAnchor: one fit per head layout ------------------------------------------------------------
    def _fit_anchors(self, anchor_t: float) -> None:
        """AutoAnchor for each head layout with anchors (the space's, shared by its anchor-based head types): a
        layout whose BPR on the training boxes is below MIN_BPR is refit, on rank 0; the other ranks take it."""
        fits = None
        if self.main:
            fits = {layout: fit_anchors(np.array(a, dtype=np.float64).reshape(-1, 2), [2 ** lvl for lvl in LAYOUTS[layout]],
                                        self.train_set.shapes, self.train_set.labels, self.cfg.imgsz, thr=anchor_t,
                                        seed=self.cfg.seed)
                    for layout, a in self.supernet.anchor_sizes().items()}
        self.layout_anchor_fits = ddp.broadcast_object(fits)
        # the base's single-head record (anchor_fit) stays None: anchor_fit_record() writes the per-layout one
        self._use_anchors({layout: f.anchors for layout, f in self.layout_anchor_fits.items() if f.replaced})

    def _use_anchors(self, anchors: Mapping[str, list[list[float]]]) -> None:
        """Train with these anchors per layout: the supernet's heads and active architecture (and its EMA copy's,
        `Supernet.set_anchors`) and the spaces that build its architectures change together."""
        if not anchors:
            return
        ema = getattr(self, "ema", None)  # made after the fit (a copy, anchors included); there on resume
        for net in (self.supernet, *([ema.ema] if ema is not None else [])):
            net.set_anchors(anchors)
        self.space = self.supernet.space
        self.arch_space = self.space if self.region is None else self.arch_space.with_anchors(anchors)

    def _log_anchor_fit(self) -> None:
        if not self.main or not self.cfg.progress:
            return
        for layout, f in self.layout_anchor_fits.items():
            if f.replaced:
                print(f"autoanchor {layout}: best possible recall {f.bpr:.3f} < {MIN_BPR} with the space's anchors; "
                      f"refit to {f.new_bpr:.3f}: {f.anchors}")
            elif f.new_bpr is not None:
                print(f"autoanchor {layout}: best possible recall {f.bpr:.3f}; a refit reached {f.new_bpr:.3f}, "
                      "anchors kept")

    def anchor_state(self) -> dict[str, Any]:
        """The anchors of every space this rank builds architectures from, and of every loss it made."""
        return {"space": self.space.anchors, "arch_space": self.arch_space.anchors,
                "losses": {str(k): [round(float(v), 4) for v in loss.head.anchors.flatten()]
                           for k, loss in sorted(self._losses.items(), key=lambda kv: str(kv[0]))}}

    def anchor_fit_record(self) -> dict[str, Any] | None:
        return {layout: f.to_dict() for layout, f in self.layout_anchor_fits.items()} or None

    def restore_anchor_fit(self, record: Mapping[str, Any]) -> None:
        self.layout_anchor_fits = {layout: AnchorFit(**f) for layout, f in record.items()}

    def load_checkpoint(self, path: Path) -> None:
        """Resume as the base does; the interrupted run's anchors come with its weights, and its spaces adopt them."""
        super().load_checkpoint(path)
        self._use_anchors(self.supernet.changed_anchors())

    # ---- subnets and their losses ----------------------------------------------------------------------
    def arch(self, decisions: Mapping[str, Any]) -> Architecture:
        """The architecture of sandwich decisions, at the supernet's nc."""
        return self.arch_space.build_arch(decisions, nc=self.supernet.nc)

    def _ends(self, region: FeasibleRegion | None, cfg: TrainConfig) -> tuple[dict[str, Any], list[SandwichGroup]]:
        """The largest architecture (the one validated and enqueued) and the groups sandwich steps draw from."""
        types = tuple(self.space.decisions["head.type"].choices)
        if region is None:
            largest, smallest = self.space.largest_decisions(), self.space.smallest_decisions()
            if not self.per_head:
                return largest, [SandwichGroup(largest, tuple({**smallest, "head.type": t} for t in types), {})]
            return largest, [SandwichGroup({**largest, **h}, ({**smallest, **h},), h) for h in self._heads()]
        if region.space.name != self.space.name:
            raise ConfigError(f"the feasible region is of space '{region.space.name}', the supernet of "
                              f"'{self.space.name}'", field="space")
        if region.space.decisions["imgsz"].choices != (cfg.imgsz,):
            raise ConfigError(f"the latency table predicts imgsz {region.space.decisions['imgsz'].choices[0]}, "
                              f"the supernet trains at {cfg.imgsz}", field="imgsz")
        if region.space.nc != self.supernet.nc:
            raise ConfigError(f"the feasible region has nc={region.space.nc}, the supernet {self.supernet.nc}",
                              field="nc")
        smallest = region.space.smallest_decisions()
        largest = region.largest(seed=cfg.seed)
        if not self.per_head:
            fits = tuple({**smallest, "head.type": t} for t in types if region.contains({**smallest, "head.type": t}))
            if not fits:
                region.check_fits(smallest, "the space's smallest architecture")
            return largest, [SandwichGroup(largest, fits, {})]
        groups = []
        for h in self._heads():
            if not region.contains({**smallest, **h}):
                continue  # no architecture with this head fits the budget: the search never evaluates one
            top = largest if all(largest[k] == v for k, v in h.items()) else region.largest(seed=cfg.seed, fixed=h)
            groups.append(SandwichGroup(top, ({**smallest, **h},), h, self._reaches(region, h, cfg.seed)))
        if not groups:
            region.check_fits(smallest, "the space's smallest architecture")
        return largest, groups

    @staticmethod
    def _reaches(region: FeasibleRegion, fixed: Mapping[str, Any], seed: int) -> bool:
        """Whether the region's rejection sampling finds an architecture with `fixed` (a probe draw)."""
        try:
            region.sample(np.random.default_rng(seed), fixed)
            return True
        except ConfigError:
            return False

    def _random(self, rng: np.random.Generator, g: SandwichGroup) -> Mapping[str, Any]:
        """A random subnet of group `g`: the region's (or space's) uniform draw with its decisions held (with
        `attentive` k, the most budget-spending of k region draws)."""
        if self.region is None:
            return {**self.space.random_decisions(rng), **g.fixed}
        if not g.sampled:
            return g.smallest[0]
        try:
            return self.region.sample_top(rng, self.attentive, g.fixed)
        except ConfigError:  # a head configuration the draw rarely reaches, missed this time
            if not g.fixed:
                raise
            return g.smallest[0]

    def _family_group(self, rng: np.random.Generator) -> SandwichGroup:
        """A sandwich group of one family, drawn as a uniform draw of the region (or space) has it: the family's
        largest, its smallest, and its categorical decisions held by the random subnets."""
        if self.region is None:
            d = self.space.random_decisions(rng)
            f = {k: d[k] for k in self._family}
            return SandwichGroup({**self.space.largest_decisions(), **f}, ({**self.space.smallest_decisions(), **f},), f)
        d = self.region.sample(rng)
        f = {k: d[k] for k in self._family}
        try:
            top = self.region.largest(seed=int(rng.integers(2**31)), draws=FAMILY_DRAWS, fixed=f)
        except ConfigError:  # none of the draws fits, nor the family's smallest: the draw is its only known member
            top = d
        # the draw itself is a member: a family whose draws rarely fit must not be taught by a lighter one
        top = max((top, d), key=self.region.latency_ms)
        low = {**self.region.space.smallest_decisions(), **f}
        # the draw itself is a feasible member where the family's smallest is not (latency is not monotonic)
        return SandwichGroup(top, (low if self.region.contains(low) else d,), f)

    def _heads(self) -> list[dict[str, Any]]:
        """Every head configuration of the space, as the decisions that fix it."""
        choices = [self.space.decisions[k].choices for k in HEAD_DECISIONS]
        return [dict(zip(HEAD_DECISIONS, (t, lay))) for t in choices[0] for lay in choices[1]]

    @staticmethod
    def _loss_key(arch: Architecture) -> tuple:
        return arch.head.type, tuple(arch.head_strides())

    def loss_for(self, arch: Architecture) -> YoloLoss:
        """The detection loss of the active subnet's head configuration (cached by head type and layout)."""
        key = self._loss_key(arch)
        if key not in self._losses:
            nl = len(key[1])
            self._losses[key] = YoloLoss(HeadInfo.from_detector(self.supernet),
                                         self.hyp.scaled(nl, self.supernet.nc, self.cfg.imgsz))
        return self._losses[key]

    def sandwich(self) -> list[tuple[str, Mapping[str, Any]]]:
        """This step's subnets: the largest (first; the students' teacher unless a frozen one is given),
        `n_random` random ones, the smallest
        (every decision at its cheapest, with a head type drawn uniformly); with `per_head`, all three of
        one head configuration drawn uniformly, with `per_family` of one family drawn as the region has it."""
        # drawn from torch's RNG, which the Trainer reseeds every epoch: a resumed epoch repeats its subnets
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if self.world > 1:  # every rank must run the same subnets, whatever else consumed its RNG
            seed = seed.to(self.device)
            torch.distributed.broadcast(seed, 0)
        rng = np.random.default_rng(int(seed.item()))
        groups = self._groups
        if self.per_family:
            g = self._family_group(rng)
        else:
            g = groups[int(rng.integers(len(groups)))] if len(groups) > 1 else groups[0]
        randoms = [("random", self._random(rng, g)) for _ in range(self.n_random)]
        # head types have no size order, and each (type, layout) has its own head: a smallest subnet with a
        # fixed type trains that type's small-layout head every step and the others only when a random
        # subnet draws them, which biased inherited-weight mAP by head type (docs/benchmarks.md, "Search")
        smallest = g.smallest[int(rng.integers(len(g.smallest)))]
        return [("largest", g.largest), *randoms, ("smallest", smallest)]

    def train_step(self, imgs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Forward + backward of every sandwich subnet on one batch (gradients accumulate)."""
        items: dict[str, Tensor] = {}
        students: list[dict[str, Tensor]] = []
        taught: list[dict[str, Tensor]] = []  # members with distillation terms (with a frozen teacher, the largest too)
        try:
            if self.teacher is not None:
                self.teacher_raw = self.teacher_outputs(imgs)
            for role, decisions in self.sandwich():
                arch = self.supernet.set_active(self.arch(decisions))
                self.role, self.current_loss = role, self.loss_for(arch)
                # only the largest path feeds the shared running statistics (see the module docstring); a head
                # group's own largest teaches but leaves them alone, so validation's statistics stay its
                feeds_bn = role == "largest" and decisions == self._largest
                with contextlib.nullcontext() if feeds_bn else frozen_bn_stats(self.supernet):
                    loss, parts = self.compute_loss(self.ddp_model, imgs, targets, loss_fn=self.current_loss)
                self.scaler.scale(loss * self.world).backward()
                if role == "largest":
                    items.update({k: parts[k] for k in ("box", "obj", "cls")})
                else:
                    students.append(parts)
                if "kd_obj" in parts:
                    taught.append(parts)
        finally:
            self.teacher_raw = None
        if students:
            items["sub_loss"] = sum(p["box"] + p["obj"] + p["cls"] for p in students) / len(students)
        if students or taught:  # the mean over the members that had a teacher's level to learn from
            zero = torch.zeros((), device=imgs.device)
            items["kd"] = sum((p["kd_obj"] + p["kd_cls"] for p in taught), zero) / max(len(taught), 1)
        return items

    @torch.no_grad()
    def teacher_outputs(self, imgs: Tensor) -> list[Tensor]:
        """The frozen teacher's raw head maps of a batch (fp32), at the precision the students train in."""
        if self.teacher.training:  # in train mode a Detector returns the raw maps alone, which would unpack wrong
            self.teacher.eval()
        x = imgs.to(next(self.teacher.parameters()).dtype)  # a teacher may have been halved (Distiller on CUDA)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            _, raw = self.teacher(x)
        return [r.float() for r in raw]

    # ---- validation and checkpoints ----------------------------------------------------------------------
    def validate(self, max_batches: int | None = None) -> EvalResult:
        """mAP of the largest subnet (EMA weights if enabled) on the validation set."""
        for net in (self.supernet, self.eval_model):
            net.set_active(self.arch(self._largest))  # the EMA copy keeps its own active path
        if self.per_family:  # each family's largest trains, but none keeps its statistics: re-estimate them
            if self._val_bn is None:
                self._val_bn = calibration_batches(self.data_cfg, self.cfg.imgsz, self.per_rank_batch,
                                                   VAL_BN_BATCHES, seed=self.cfg.seed, device=self.device)
            self.eval_model.recalibrate_bn(self._val_bn)
        return super().validate(max_batches)

    def model_identity(self) -> dict[str, Any]:
        """The space and settings instead of an arch: a supernet is all architectures at once."""
        return {"supernet": {"space": self.space.name, "space_path": self.space.source, "nc": int(self.supernet.nc),
                             "n_random": self.n_random, "kd_weight": self.kd_weight, "attentive": self.attentive,
                             "per_family": self.per_family,
                             "teacher": None if self.teacher is None else self.teacher.arch.name,
                             **{k: getattr(self, k) for k in _SANDWICH_SETTINGS}, "region": self.region_record()}}

    def region_record(self) -> dict[str, Any] | None:
        """What the supernet was trained on: the budget and the sandwich's largest architecture (its id,
        predicted latency and decisions, which the search enqueues as its first trial); None: the whole space."""
        if self.region is None:
            return None
        return {"budget_ms": self.region.budget_ms, "largest": self.arch_space.arch_id(self._largest),
                "largest_ms": self.region.latency_ms(self._largest), "largest_decisions": dict(self._largest)}

    def check_resume(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume a supernet trained for another budget (or for the whole space)."""
        theirs = (checkpoint.get("supernet") or {}).get("region")
        mine = self.region_record()
        # the largest by its decisions: its id also states its anchors, which the interrupted run may have refit
        by_decisions = bool(theirs and "largest_decisions" in theirs)

        def key(r: Mapping[str, Any] | None) -> tuple | None:
            if not r:
                return None
            return r["budget_ms"], sorted(r["largest_decisions"].items()) if by_decisions else r["largest"]

        def say(r: Mapping[str, Any] | None) -> str:
            return f"a budget of {r['budget_ms']:g} ms" if r else "the whole space"

        if key(theirs) != key(mine):
            raise CheckpointError(f"cannot resume: the interrupted run trained {say(theirs)}, this one "
                                  f"{say(mine)} (pass the same --table and --budget-ms)", path=path, field="budget_ms")
        for key, (flag, on, off) in _SANDWICH_SETTINGS.items():
            theirs_on = bool((checkpoint.get("supernet") or {}).get(key, False))
            if theirs_on != getattr(self, key):
                raise CheckpointError(f"cannot resume: the interrupted run {on if theirs_on else off}, this one "
                                      f"{on if not theirs_on else off} (pass the same {flag})", path=path, field=key)

    def save_checkpoint(self, epoch: int) -> None:
        """Atomically write last.pt and supernet.pt (EMA weights, space, nc); a supernet is no Detector dir."""
        if not self.main:
            return
        atomic_torch_save(self.checkpoint_state(epoch), self.out / CHECKPOINT)
        atomic_torch_save(supernet_document(self.supernet, self.eval_model.state_dict(), epochs=epoch + 1,
                                            region=self.region_record(), anchor_fit=self.anchor_fit_record()),
                          self.out / SUPERNET_FILE)
