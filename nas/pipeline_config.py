"""`PipelineConfig`: the `detforge run` configuration, validated once at the boundary into dataclasses."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from latency_tables.table import FIT_MODELS
from search_spaces.errors import ConfigError
from search_spaces.io import read_yaml
from search_spaces.typecheck import type_name, type_ok
from trainer.config import OPTIMIZERS, TrainConfig

from .search import MODES, PRUNERS, SAMPLERS, SearchConfig, resolve_sampler


@dataclass
class SyntheticCfg:
    """The built-in dataset, used when `data` is not set."""

    train: int = 2000
    val: int = 300
    imgsz: int = 320
    classes: int = 6
    seed: int = 0


@dataclass
class LatencyCfg:
    """The latency table: loaded from `table`, or built on this device with `backend`."""

    backend: str = "ort-cpu"
    threads: int = 2
    table: str | None = None
    min_runs: int = 20  # measurement protocol (docs/latency.md): fewer runs build faster, noisier tables
    max_time_s: float = 30.0  # per block
    fit_models: int = FIT_MODELS  # whole models the overhead is fitted on (0: none; the blocks' sum alone)


@dataclass
class SupernetCfg:
    epochs: int = 10
    batch: int = 16
    n_random: int = 2
    per_head: bool = False  # draw each step's sandwich inside one head configuration (docs/nas.md)
    sort_channels: bool = False  # reorder filters by importance before every epoch but the first (docs/nas.md)
    attentive: int = 1  # random subnets: the most budget-spending of this many feasible draws (docs/nas.md)
    per_family: bool = False  # draw each step's sandwich inside one family of categorical choices (docs/nas.md)
    teacher: str | None = None  # a trained model dir whose outputs teach every sandwich member (docs/nas.md)
    teacher_model: str | None = None  # zoo name when `teacher` is an official checkpoint
    scope: str = "budget"  # budget: train only the architectures within search.budget_ms (if set); space: all
    autoanchor: bool = True  # refit each head layout's anchors below a BPR of 0.98 (docs/nas.md)


@dataclass
class SearchCfg:
    """How candidates are scored: `supernet` (inherited weights, after the supernet stage) or `scratch` (each trained
    from scratch for `scratch_epochs` with the run's training settings and `finetune.batch`; no supernet stage)."""

    trials: int = 40
    budget_ms: float | None = None
    sampler: str = "auto"  # auto: nsga2 in supernet mode, tpe in scratch mode (mAP alone, pruned by epoch)
    storage: str | None = None  # default: sqlite in the run directory
    bn_batches: int = 8
    val_batches: int | None = None
    mode: str = "supernet"
    scratch_epochs: int = SearchConfig.scratch_epochs
    pruner: str = SearchConfig.pruner  # scratch mode: stops candidates whose epoch mAP trails the others'

    # scratch mode's settings: a supernet-mode search stage does not digest them (recorded runs keep their digests)
    ADDED: typing.ClassVar[tuple[str, ...]] = ("mode", "scratch_epochs", "pruner")

    @property
    def scratch(self) -> bool:
        """Whether candidates train from scratch (no supernet stage)."""
        return self.mode == "scratch"

    def resolved_sampler(self) -> str:
        """The sampler the study uses ('auto' resolved for this mode)."""
        return resolve_sampler(self.sampler, self.mode)


@dataclass
class SelectCfg:
    """Which front models go on: the `k` best by mAP, or the best one meeting each budget in `budgets_ms`."""

    k: int = 1
    budgets_ms: list[float] = field(default_factory=list)


@dataclass
class FinetuneCfg:
    epochs: int = 5
    batch: int = 16


@dataclass
class PruneCfg:
    enabled: bool = False
    macs: float = 0.7
    backend: str = "torch-pruning"
    finetune_epochs: int = 1


@dataclass
class DistillCfg:
    enabled: bool = False
    teacher: str | None = None  # a trained model dir, or an official checkpoint (e.g. yolov7-e6.pt) with teacher_model
    teacher_model: str | None = None  # zoo name when `teacher` is an official checkpoint
    epochs: int = 3


@dataclass
class QuantizeCfg:
    enabled: bool = True
    calib: int = 64
    method: str = "minmax"


@dataclass
class BaselineCfg:
    """Zoo models trained with the same budget and drawn on the front."""

    models: list[str] = field(default_factory=lambda: ["yolov7-tiny"])
    epochs: int | None = None  # default: the front models' (PipelineConfig.front_epochs)


@dataclass
class PipelineConfig:
    """A whole `detforge run`."""

    name: str = "run"
    data: str | None = None
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)
    space: str = "default"
    imgsz: int = 320
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    nbs: int = TrainConfig.nbs  # nominal batch of every training (supernet or scratch trials, finetune, prune, distill, baselines); 16 for short CPU runs
    optimizer: str = TrainConfig.optimizer  # of every training, as nbs; adamw learns much faster in short CPU runs (docs/training.md)
    lr0: float | None = TrainConfig.lr0  # of every training: overrides the hyp's lr0 (0.01, SGD's); about 0.002 with adamw
    latency: LatencyCfg = field(default_factory=LatencyCfg)
    supernet: SupernetCfg = field(default_factory=SupernetCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    select: SelectCfg = field(default_factory=SelectCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    quantize: QuantizeCfg = field(default_factory=QuantizeCfg)
    baselines: BaselineCfg = field(default_factory=BaselineCfg)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Read and validate a pipeline YAML file."""
        return cls.from_dict(read_yaml(path) or {}, str(path))

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None) -> PipelineConfig:
        """Validate a mapping (unknown key, wrong type, impossible value: ConfigError naming the field)."""
        cfg = _build(cls, d, path, "")
        cfg.check(path)
        return cfg

    def check(self, path: str | None = None) -> None:
        """Value checks that types cannot express."""
        positive = {"imgsz": self.imgsz, "nbs": self.nbs, "supernet.epochs": self.supernet.epochs, "supernet.batch": self.supernet.batch,
                    "search.trials": self.search.trials, "finetune.batch": self.finetune.batch,
                    "synthetic.train": self.synthetic.train, "synthetic.val": self.synthetic.val,
                    "select.k": self.select.k, "quantize.calib": self.quantize.calib,
                    "latency.threads": self.latency.threads, "supernet.attentive": self.supernet.attentive,
                    "search.bn_batches": self.search.bn_batches, "latency.min_runs": self.latency.min_runs,
                    "search.scratch_epochs": self.search.scratch_epochs,
                    "synthetic.classes": self.synthetic.classes, "synthetic.imgsz": self.synthetic.imgsz,
                    "search.val_batches": 1 if self.search.val_batches is None else self.search.val_batches,
                    "baselines.epochs": 1 if self.baselines.epochs is None else self.baselines.epochs,
                    # every compression step trains (the Trainer needs an epoch); prune and distill are skipped by
                    # disabling them
                    "finetune.epochs": self.finetune.epochs,
                    "prune.finetune_epochs": self.prune.finetune_epochs if self.prune.enabled else 1,
                    "distill.epochs": self.distill.epochs if self.distill.enabled else 1}
        for key, v in positive.items():
            if v < 1:
                raise ConfigError(f"must be >= 1, got {v}", path=path, field=key)
        counts = {"workers": self.workers, "supernet.n_random": self.supernet.n_random,
                  "latency.fit_models": self.latency.fit_models}
        for key, v in counts.items():
            if v < 0:
                raise ConfigError(f"must be >= 0, got {v}", path=path, field=key)
        if self.imgsz % 32:
            raise ConfigError(f"must be a multiple of 32, got {self.imgsz}", path=path, field="imgsz")
        if self.lr0 is not None and not self.lr0 > 0:
            raise ConfigError(f"must be > 0, got {self.lr0}", path=path, field="lr0")
        if not self.latency.max_time_s > 0:  # before the run, not when the latency stage starts measuring
            raise ConfigError(f"must be > 0, got {self.latency.max_time_s}", path=path, field="latency.max_time_s")
        self._check_references(path)
        b = self.search.budget_ms
        if b is not None and b <= 0:
            raise ConfigError(f"impossible latency budget {b} ms", path=path, field="search.budget_ms")
        sup = not self.search.scratch  # a scratch-mode run has no supernet: its section's choices do not matter
        if sup and self.supernet.attentive > 1 and (b is None or self.supernet.scope == "space"):
            raise ConfigError("attentive sampling ranks draws by predicted latency within the budget: it needs "
                              "search.budget_ms and supernet.scope: budget", path=path, field="supernet.attentive")
        if sup and self.supernet.per_head and self.supernet.per_family:
            raise ConfigError("a family fixes the head configuration too: set per_head or per_family, not both",
                              path=path, field="supernet.per_family")
        if any(x <= 0 for x in self.select.budgets_ms):
            raise ConfigError("budgets must be > 0 ms", path=path, field="select.budgets_ms")
        if not 0 < self.prune.macs <= 1:
            raise ConfigError(f"the kept MACs fraction must be in (0, 1], got {self.prune.macs}", path=path,
                              field="prune.macs")
        from compress.distill import check_teacher

        if sup and self.supernet.teacher_model is not None and self.supernet.teacher is None:
            raise ConfigError("names the model of a supernet.teacher checkpoint: set supernet.teacher too", path=path,
                              field="supernet.teacher_model")
        if self.distill.enabled and self.distill.teacher is None:
            raise ConfigError("distillation needs a trained teacher: a model directory, or an official checkpoint "
                              "(e.g. yolov7-e6.pt) with distill.teacher_model", path=path, field="distill.teacher")
        teachers = {"distill": self.distill.teacher if self.distill.enabled else None,
                    "supernet": self.supernet.teacher if sup else None}
        for key, ref in teachers.items():
            if ref is not None:  # refused here, before any stage runs, rather than when its stage loads it
                check_teacher(ref, getattr(self, key).teacher_model, field=f"{key}.teacher", path=path)
        choices = {"optimizer": (self.optimizer, OPTIMIZERS),
                   "search.sampler": (self.search.sampler, SAMPLERS),
                   "search.mode": (self.search.mode, MODES), "search.pruner": (self.search.pruner, PRUNERS),
                   "supernet.scope": (self.supernet.scope, ("budget", "space")),
                   "quantize.method": (self.quantize.method, ("minmax", "entropy", "percentile")),
                   "prune.backend": (self.prune.backend, ("torch-pruning", "nni")),
                   "latency.backend": (self.latency.backend, ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu",
                                                              "torch-cuda", "tensorrt"))}
        for key, (v, allowed) in choices.items():
            if v not in allowed:
                raise ConfigError(f"must be one of {', '.join(allowed)}, got {v!r}", path=path, field=key)

    def _check_references(self, path: str | None) -> None:
        """The space, the baselines and the storage the config names exist, and imgsz suits the space."""
        from search_spaces.space import load_space
        from search_spaces.zoo import list_models

        try:
            space = load_space(self.space)
        except ConfigError as e:
            raise ConfigError(e.line(), path=path, field="space") from None
        if self.imgsz % space.max_stride:
            raise ConfigError(f"must be a multiple of {space.max_stride}, the largest stride of space "
                              f"{space.name!r}, got {self.imgsz}", path=path, field="imgsz")
        for name in self.baselines.models:
            if name not in list_models() and not Path(name).exists():
                raise ConfigError(f"{name!r} is neither a zoo model ({', '.join(list_models())}) nor a file",
                                  path=path, field="baselines.models")
        from trainer.distributed import resolve_device

        try:  # a device string torch cannot read fails here; one this machine lacks when the run starts (not --dry-run)
            resolve_device(self.device, available=False)
        except ConfigError as e:
            raise ConfigError(e.message, path=path, field="device") from None
        if self.latency.table:
            from .budget import table_predictor

            try:  # it loads, and it predicts at the run's input size
                table_predictor(self.latency.table, self.imgsz)
            except ConfigError as e:
                raise ConfigError(e.line(), path=path, field="latency.table") from None
        from .search import check_storage

        if self.search.storage is not None:
            try:
                check_storage(self.search.storage)
            except ConfigError as e:
                raise ConfigError(e.message, path=path, field="search.storage") from None

    def train_settings(self) -> dict[str, Any]:
        """The TrainConfig fields every training of the run shares (supernet or scratch search trials, finetune,
        prune, distill, baselines)."""
        return {"nbs": self.nbs, "optimizer": self.optimizer, "lr0": self.lr0, "device": self.device,
                "workers": self.workers, "seed": self.seed}

    TRAINING_KEYS: typing.ClassVar[tuple[str, ...]] = ("nbs", "optimizer", "lr0")  # digested where not the default

    def front_training(self) -> dict[str, int]:
        """The epochs a chosen front model trained before compression, by stage: the supernet's (in scratch mode,
        its search trial's), then the finetune."""
        first = ("search (from scratch)", self.search.scratch_epochs) if self.search.scratch else \
            ("supernet", self.supernet.epochs)
        return dict([first, ("finetune", self.finetune.epochs)])

    def front_epochs(self) -> int:
        """All of them: the baselines' default epoch budget."""
        return sum(self.front_training().values())

    def baseline_epochs(self) -> int:
        """The epochs each baseline trains: `baselines.epochs`, else as many as the front models had."""
        return self.baselines.epochs or self.front_epochs()

    def scratch_trials(self) -> dict[str, Any]:
        """The SearchConfig settings of a scratch-mode search: each candidate trains as the chosen models do (the
        run's training settings, finetune.batch) for search.scratch_epochs."""
        return {"mode": "scratch", "scratch_epochs": self.search.scratch_epochs, "pruner": self.search.pruner,
                "batch": self.finetune.batch, **self.train_settings()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _build(cls: type, d: Any, path: str | None, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping, got {type(d).__name__}", path=path, field=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key (known: {', '.join(names)})", path=path, field=where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, path, f"{where}.")
        elif not type_ok(value, hint):
            raise ConfigError(f"expected {type_name(hint)}, got {type(value).__name__} {value!r}", path=path,
                              field=where)
        else:
            kwargs[key] = value
    return cls(**kwargs)
