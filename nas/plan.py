"""`detforge run --dry-run`: the stages a config will run and a rough cost estimate, without running them."""
from __future__ import annotations

import time
from typing import Any

import torch

from search_spaces import Detector, load_model, load_space

from .pipeline_config import PipelineConfig

SECONDS_PER_BLOCK = 0.4  # rough cost per signature with the default protocol (3-run builds took ~0.11 s)
FORWARD_SHARE = 1 / 3  # of a training step: what a validation or BatchNorm-recalibration image costs
DISTILL_FACTOR = 3.0  # a distillation step: the student's training step plus a larger teacher's forward


def train_seconds_per_image(det: Detector, imgsz: int, batch: int = 2, steps: int = 1) -> float:
    """Seconds a training image costs this machine with `det`: forward, YOLOv7's loss and backward, timed.

    Small detectors train far slower than their FLOPs say (the loss's label assignment, many small kernels), so
    the plan times a real step rather than dividing FLOPs by a throughput. Data loading is not included.
    """
    from trainer.loss import HeadInfo, YoloLoss

    det.train()
    loss = YoloLoss(HeadInfo.from_detector(det))
    imgs = torch.rand(batch, 3, imgsz, imgsz)
    targets = torch.tensor([[i, 0, 0.5, 0.5, 0.25, 0.25] for i in range(batch)])  # one box each: the assignment runs

    def step() -> None:
        det.zero_grad(set_to_none=True)
        total, _ = YoloLoss.combine(loss.components(list(det(imgs)), targets, imgs.shape), batch)
        total.backward()

    step()  # warm-up: allocations, first-call overhead
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / (steps * batch)


def plan(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per stage: what it does and its estimated seconds on this machine (training steps timed here)."""
    space = load_space(cfg.space)
    big = train_seconds_per_image(Detector(space.largest()), cfg.imgsz)
    mid = train_seconds_per_image(Detector(space.random()), cfg.imgsz)  # what a searched model costs
    n_train = cfg.synthetic.train if not cfg.data else 2000
    n_val = cfg.synthetic.val if not cfg.data else 300
    val = n_val * mid * FORWARD_SHARE
    epoch = n_train * mid + val  # a searched model's training epoch and its validation
    sandwich = 2 + cfg.supernet.n_random
    rows = [
        {"stage": "data", "what": cfg.data or f"synthetic {cfg.synthetic.train}/{cfg.synthetic.val}",
         "est_s": 0.02 * (n_train + n_val) if not cfg.data else 0},
        {"stage": "latency", "what": cfg.latency.table or f"build table ({cfg.latency.backend})",
         "est_s": 0 if cfg.latency.table else len(space.block_signatures(cfg.imgsz)) * SECONDS_PER_BLOCK},
    ]
    s = cfg.search
    if s.scratch:  # rough either way: pruned trials come on top of `trials`, but stop after their first epochs
        rows.append({"stage": "search", "what": f"{s.trials} trials ({s.resolved_sampler()}), each trained "
                     f"{s.scratch_epochs} epochs from scratch",
                     "est_s": s.trials * s.scratch_epochs * epoch})
    else:
        rows += [{"stage": "supernet", "what": f"{cfg.supernet.epochs} epochs, sandwich x{sandwich}",
                  "est_s": cfg.supernet.epochs * (n_train * (big + (sandwich - 1) * mid) + val)},
                 {"stage": "search", "what": f"{s.trials} trials ({s.resolved_sampler()})",
                  "est_s": s.trials * (s.bn_batches * 16 * mid * FORWARD_SHARE + val)}]
    rows.append({"stage": "pareto", "what": "front, export ONNX, measure", "est_s": 30.0})
    k = len(cfg.select.budgets_ms) or cfg.select.k
    per_model = cfg.finetune.epochs * epoch
    if cfg.prune.enabled:
        per_model += cfg.prune.finetune_epochs * epoch
    if cfg.distill.enabled:
        per_model += cfg.distill.epochs * (n_train * mid * DISTILL_FACTOR + val)
    rows.append({"stage": f"models x{k}", "what": "finetune, prune, distill, fuse, INT8, export, verify",
                 "est_s": k * (per_model + 30.0)})
    epochs = cfg.baseline_epochs()
    base = sum(train_seconds_per_image(load_model(m), cfg.imgsz) for m in cfg.baselines.models)
    rows.append({"stage": "baselines", "what": ", ".join(cfg.baselines.models) + f" ({epochs} epochs)",
                 "est_s": epochs * (n_train + n_val * FORWARD_SHARE) * base})
    rows.append({"stage": "report", "what": "report.md, plots", "est_s": 2.0})
    for r in rows:
        r["est_s"] = round(float(r["est_s"]), 1)
    rows.append({"stage": "total", "what": f"a training image ~{1000 * mid:.0f} ms here (a random architecture)",
                 "est_s": round(sum(r["est_s"] for r in rows), 1)})
    return rows
