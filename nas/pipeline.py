"""`Pipeline`: dataset + device + budget -> deployable Pareto-optimal detectors, stage by stage, resumable.

Each stage reads and writes plain artifacts in the run directory and is recorded in `stages.json` with
a digest of its inputs (config section + upstream digests); a rerun skips recorded stages whose inputs
are unchanged, and a stage interrupted by a kill resumes from its own checkpoint (trainer `last.pt`,
latency table entries, the Optuna study).
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces.errors import ConfigError
from search_spaces.io import atomic_write_json, atomic_write_text, read_json

from .pipeline_config import PipelineConfig

STATE = "stages.json"
RUNNING = "stages_running.json"  # stage -> [input digest, start time] of the attempt in progress (a kill leaves it)
RUN_ID = "run.id"  # names this run's study in a shared storage


@dataclass
class StageRecord:
    """A finished stage: its input digest, outputs (JSON) and duration."""

    name: str
    digest: str
    outputs: dict[str, Any]
    seconds: float


@dataclass
class Pipeline:
    """Runs the stages of one `detforge run` in `out`."""

    cfg: PipelineConfig
    out: Path
    log: Callable[[str], None] = print
    records: dict[str, StageRecord] = field(default_factory=dict)
    current: tuple[str, str] | None = None  # (stage, input digest) of the stage running now
    resuming: bool = False  # whether that stage continues an interrupted attempt with the same inputs
    started: float = 0.0  # when the first attempt with these inputs began (its checkpoints are newer)

    @classmethod
    def open(cls, cfg: PipelineConfig, out: str | Path, resume: bool = False,
             log: Callable[[str], None] = print) -> Pipeline:
        """Create the run directory, or reopen it with `resume` (refused without it, so nothing is overwritten)."""
        out = Path(out)
        state = out / STATE
        if state.is_file() and not resume:
            raise ConfigError("run directory already has a run; pass --resume to continue it or choose --out",
                              path=out)
        fresh = not state.is_file()
        out.mkdir(parents=True, exist_ok=True)
        if fresh and not (out / RUN_ID).is_file():
            atomic_write_text(out / RUN_ID, uuid.uuid4().hex[:8])
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
        p = cls(cfg, out, log)
        if state.is_file():
            for name, r in read_json(state).items():
                p.records[name] = StageRecord(name, r["digest"], r["outputs"], r["seconds"])
        return p

    # ---- stage bookkeeping ------------------------------------------------------------------------------
    def recorded(self, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The outputs of a finished stage recorded with these inputs whose files all exist, else None."""
        return self._recorded(name, _digest(inputs))

    def _recorded(self, name: str, digest: str) -> dict[str, Any] | None:
        rec = self.records.get(name)
        if rec is not None and rec.digest == digest and all(Path(f).exists() for f in rec.outputs.get("files", [])):
            self.log(f"[skip] {name} (inputs unchanged)")
            return rec.outputs
        return None

    def stage(self, name: str, inputs: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `fn` unless a record with the same input digest exists; record and return its outputs."""
        digest = _digest(inputs)
        done = self._recorded(name, digest)
        if done is not None:
            return done
        # A stage's checkpoints (a trainer's last.pt) belong to one set of inputs: they are resumed only after a
        # kill of an attempt with these inputs, never after a finished run or a change of config, and only those
        # that attempt wrote (a kill before its first checkpoint leaves the earlier run's last.pt there).
        running = read_json(self.out / RUNNING) if (self.out / RUNNING).is_file() else {}
        attempt = running.get(name)
        attempt = [attempt, 0.0] if isinstance(attempt, str) else attempt  # recorded before start times: any
        self.current, self.resuming = (name, digest), attempt is not None and attempt[0] == digest
        self.started = attempt[1] if self.resuming else time.time()
        self.log(f"[run ] {name}" + (" (resuming)" if self.resuming else ""))
        atomic_write_json(self.out / RUNNING, {**running, name: [digest, self.started]})
        if self.records.pop(name, None) is not None:  # this attempt rewrites the recorded run's files: a kill
            self._save_records()  # must not leave a record that would reuse them
        t0 = time.time()
        outputs = fn()
        self.records[name] = StageRecord(name, digest, outputs, round(time.time() - t0, 2))
        self._save_records()
        running.pop(name, None)
        atomic_write_json(self.out / RUNNING, running)
        self.current, self.resuming = None, False
        self.log(f"[done] {name} in {self.records[name].seconds:.1f} s")
        return outputs

    def _save_records(self) -> None:
        """Write the finished stages' records (stages.json)."""
        atomic_write_json(self.out / STATE, {k: vars(v) for k, v in self.records.items()})

    def resume_from(self, checkpoint: Path) -> bool:
        """Whether the running stage may continue from `checkpoint`: it exists and an attempt with its inputs wrote
        it (not the run before the inputs changed)."""
        return self.resuming and checkpoint.is_file() and checkpoint.stat().st_mtime >= self.started

    def run_id(self) -> str:
        """This run directory's random id, made with it (a new one at the same path gets another); "" for a run
        begun before run ids, whose stage digests and study names stay as they were."""
        path = self.out / RUN_ID
        return path.read_text().strip() if path.is_file() else ""

    def attempt_id(self) -> str:
        """A short id of the running stage's inputs (names a study, so a change of inputs starts a new one)."""
        if self.current is None:
            raise RuntimeError("attempt_id() outside a stage")
        return self.current[1][:8]

    def stage_names(self, models: Iterable[str]) -> list[str]:
        """This config's stages in order, for the chosen `models` (an earlier config's records are not among them)."""
        per_model = ["finetune", *(s for s in ("prune", "distill") if getattr(self.cfg, s).enabled)]
        return ["data", "latency", *([] if self.cfg.search.scratch else ["supernet"]), "search", "pareto",
                *(f"{s}:{m}" for m in models for s in [*per_model, "model"]), "baselines"]

    def digest(self, name: str) -> str:
        """The input digest a finished stage was recorded with (chains stages together)."""
        return self.records[name].digest

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """All stages in order; returns the summary written to `summary.json`."""
        from trainer.datasets import dataset_key
        from trainer.distributed import resolve_device

        from . import stages

        c = self.cfg
        resolve_device(c.device)  # this machine can run it: cuda without a GPU fails now, not after the table
        # files the config names are digested by content too (rebuilt in place: their stages run again); a run
        # begun before that keeps its digests, or resuming it would redo every stage
        run_id = self.run_id()
        contents = _contents if run_id else (lambda **paths: {})
        data_inputs = {"data": c.data, "synthetic": vars(c.synthetic)}
        files = {"data_content": dataset_key(c.data)} if c.data and run_id else {}  # labels fixed in place
        # a run recorded before the dataset's files were digested keeps its data digest (and every stage after it)
        data = (self.recorded("data", data_inputs) if files else None) or \
            self.stage("data", {**data_inputs, **files}, lambda: stages.data(self))
        table = self.stage("latency", {"latency": vars(c.latency), "space": c.space, "imgsz": c.imgsz,
                                       "nc": data["nc"], **contents(table=c.latency.table)},
                           lambda: stages.latency_table(self, data))
        budget = stages.check_budget(self, table)
        sup = None if c.search.scratch else self._supernet(data, table, budget, contents)
        search = self.stage("search", self._search_inputs(budget),
                            lambda: stages.search(self, data, sup, table, budget))
        # the front does not depend on `select`, so choosing other models trains only those not trained yet; a run
        # recorded when it did keeps its front (and its models) while `select` is unchanged
        front = self.recorded("pareto", {"search": self.digest("search"), "select": vars(c.select)}) or \
            self.stage("pareto", {"search": self.digest("search")},
                       lambda: stages.pareto(self, sup, search, table, budget))
        chosen = stages.choose(front["front"], c.select.k, c.select.budgets_ms)
        models = {mid: self._compress(mid, data, table, contents) for mid in chosen}
        baselines = self.stage("baselines", {"baselines": vars(c.baselines), "data": self.digest("data"),
                                             "epochs": c.front_epochs(), "imgsz": c.imgsz,
                                             "seed": c.seed, "batch": c.finetune.batch,
                                             "threads": c.latency.threads, **_added(c, *c.TRAINING_KEYS)},
                               lambda: stages.baselines(self, data, table))
        ran = [k for k in self.stage_names(models) if k in self.records]
        summary = self.stage("report", {k: self.digest(k) for k in ran},  # not an earlier config's stale records
                             lambda: stages.report(self, data, table, front, models, baselines, budget))
        return summary

    def _supernet(self, data: dict[str, Any], table: dict[str, Any], budget: float | None,
                  contents: Callable[..., dict[str, str]]) -> dict[str, Any]:
        """The supernet stage (supernet mode): trained within the budget, or over the whole space."""
        from . import stages

        c = self.cfg
        region = budget if c.supernet.scope == "budget" else None  # the architectures the supernet trains
        return self.stage("supernet", {"supernet": _recorded_keys(c.supernet, "autoanchor"),
                                       "data": self.digest("data"), "space": c.space, "imgsz": c.imgsz,
                                       "seed": c.seed, "budget": region,
                                       **_added(c, *c.TRAINING_KEYS), **_added(c.supernet, "autoanchor"),
                                       "latency": self.digest("latency") if region else None,
                                       **contents(teacher=c.supernet.teacher)},
                          lambda: stages.supernet(self, data, table, region))

    def _search_inputs(self, budget: float | None) -> dict[str, Any]:
        """The search stage's inputs. A supernet study depends on the supernet (which digests the data, space,
        size, seed and training settings); a scratch study trains on its own, so it digests those itself."""
        c = self.cfg
        s = c.search
        common = {"budget": budget, "latency": self.digest("latency")}
        if not s.scratch:  # the settings as they were before scratch mode (sampler resolved: 'auto' is nsga2 here)
            return {"search": {**_recorded_keys(s, *s.ADDED), "sampler": s.resolved_sampler()},
                    "supernet": self.digest("supernet"), **common}
        trials = {k: v for k, v in c.scratch_trials().items() if k not in ("device", "workers")}  # what they learn
        section = {k: v for k, v in vars(s).items() if k != "bn_batches"}  # no BatchNorm re-estimation
        return {"search": {**section, "sampler": s.resolved_sampler()}, "trials": trials, "data": self.digest("data"),
                "space": c.space, "imgsz": c.imgsz, **common}

    def _compress(self, mid: str, data: dict[str, Any], table: dict[str, Any],
                  contents: Callable[..., dict[str, str]]) -> dict[str, Any]:
        """A chosen front model's steps, each its own stage: a change of quantize settings reruns only the
        export, one of distill settings the distillation and export, and so on."""
        from . import stages

        c = self.cfg
        legacy = self.recorded(f"model:{mid}", {  # one stage for all steps, in runs begun before the split
            "pareto": self.digest("pareto"), "finetune": vars(c.finetune), "prune": vars(c.prune),
            "distill": {**vars(c.distill), "teacher": c.distill.teacher or "yolov7-e6"},  # the default then
            "quantize": vars(c.quantize), **contents(distill_teacher=c.distill.teacher if c.distill.enabled else None)})
        if legacy is not None:
            return legacy
        steps = [self.stage(f"finetune:{mid}", {"pareto": self.digest("pareto"), "finetune": vars(c.finetune),
                                                **_added(c, *c.TRAINING_KEYS)},
                            lambda: stages.finetune(self, data, mid))]
        if c.prune.enabled:
            steps.append(self.stage(f"prune:{mid}", {"up": self.digest(f"finetune:{mid}"), "prune": vars(c.prune)},
                                    lambda: stages.prune(self, data, mid, steps[-1])))
        if c.distill.enabled:
            up = f"prune:{mid}" if c.prune.enabled else f"finetune:{mid}"
            steps.append(self.stage(f"distill:{mid}", {"up": self.digest(up), "distill": vars(c.distill),
                                                       **contents(distill_teacher=c.distill.teacher)},
                                    lambda: stages.distill(self, data, mid, steps[-1])))
        ups = {s["step"]: self.digest(f"{s['step']}:{mid}") for s in steps}
        return self.stage(f"model:{mid}", {"up": ups, "quantize": vars(c.quantize), "threads": c.latency.threads},
                          lambda: stages.deploy(self, data, mid, steps, table))


def _added(cfg: Any, *keys: str) -> dict[str, Any]:
    """Settings added after runs were recorded (of the config or one of its sections), as stage inputs only where
    they differ from their default: a run recorded before them keeps its digests (resuming does not redo them)."""
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != getattr(type(cfg), k)}


def _recorded_keys(section: Any, *added: str) -> dict[str, Any]:
    """A config section's settings without the `added` ones (which `_added` digests)."""
    return {k: v for k, v in vars(section).items() if k not in added}


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _contents(**paths: str | None) -> dict[str, str]:
    """Content digests of the files a config names (a table, a teacher model dir), keyed `<name>_content`.

    The same path may hold new content (a table rebuilt in place, a teacher trained further): a stage that
    reads it must run again. Paths that are not set add nothing, so such runs keep their digests.
    """
    from .search import file_digest

    out = {}
    for name, path in paths.items():
        if not path or not Path(path).exists():
            continue
        p = Path(path)
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]  # a model dir: its files
        out[f"{name}_content"] = ",".join(f"{f.name}:{file_digest(str(f))}" for f in files)
    return out
