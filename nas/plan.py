"""`detforge run --dry-run`: the stages a config will run and a rough cost estimate, without running them."""
from __future__ import annotations

import time
from typing import Any

import torch

from search_spaces import Detector, load_space
from search_spaces.stats import count_macs

from .pipeline_config import PipelineConfig

SECONDS_PER_BLOCK = 0.4  # rough cost per signature with the default protocol (3-run builds took ~0.11 s)
TRAIN_FLOP_FACTOR = 3.0  # forward + backward ~ 3 forwards


def device_gflops(seconds: float = 0.5) -> float:
    """Sustained conv throughput of this machine (GFLOP/s), from a short benchmark."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.rand(1, 64, 80, 80)
    flops = 2 * 64 * 64 * 9 * 80 * 80
    with torch.inference_mode():
        conv(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conv(x)
            n += 1
    return n * flops / (time.perf_counter() - t0) / 1e9


def plan(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per stage: what it does and its estimated seconds on this machine."""
    space = load_space(cfg.space)
    gfs = device_gflops()
    big = 2 * count_macs(Detector(space.largest()), cfg.imgsz) / 1e9
    mid = 2 * count_macs(Detector(space.random()), cfg.imgsz) / 1e9
    n_train = cfg.synthetic.train if not cfg.data else 2000
    n_val = cfg.synthetic.val if not cfg.data else 300
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
                     f"{s.scratch_epochs} epochs from scratch", "est_s": s.trials * s.scratch_epochs * (
                         n_train * TRAIN_FLOP_FACTOR + n_val) * mid / gfs})
    else:
        rows += [{"stage": "supernet", "what": f"{cfg.supernet.epochs} epochs, sandwich x{sandwich}",
                  "est_s": cfg.supernet.epochs * n_train * TRAIN_FLOP_FACTOR * (big + (sandwich - 1) * mid) / gfs},
                 {"stage": "search", "what": f"{s.trials} trials ({s.resolved_sampler()})",
                  "est_s": s.trials * (s.bn_batches * 16 + n_val) * mid / gfs}]
    rows.append({"stage": "pareto", "what": "front, export ONNX, measure", "est_s": 30.0})
    k = len(cfg.select.budgets_ms) or cfg.select.k
    per_model = cfg.finetune.epochs * n_train * TRAIN_FLOP_FACTOR * mid / gfs
    if cfg.prune.enabled:
        per_model += cfg.prune.finetune_epochs * n_train * TRAIN_FLOP_FACTOR * mid / gfs
    if cfg.distill.enabled:
        per_model += cfg.distill.epochs * n_train * TRAIN_FLOP_FACTOR * mid * 3 / gfs
    rows.append({"stage": f"models x{k}", "what": "finetune, prune, distill, fuse, INT8, export, verify",
                 "est_s": k * (per_model + 30.0)})
    epochs = cfg.baselines.epochs or cfg.front_epochs()
    rows.append({"stage": "baselines", "what": ", ".join(cfg.baselines.models) + f" ({epochs} epochs)",
                 "est_s": len(cfg.baselines.models) * epochs * n_train * TRAIN_FLOP_FACTOR * mid / gfs})
    rows.append({"stage": "report", "what": "report.md, plots", "est_s": 2.0})
    for r in rows:
        r["est_s"] = round(float(r["est_s"]), 1)
    rows.append({"stage": "total", "what": f"device ~{gfs:.0f} GFLOP/s", "est_s": round(sum(r["est_s"] for r in rows), 1)})
    return rows
