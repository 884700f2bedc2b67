"""Where a trained supernet's inherited weights lose accuracy, and what a sandwich step costs.

Reads a `benchmarks/search_synthetic.py` run directory (supernet.pt, table.json, budget.json) and prints:

1. the sandwich step's wall time on this machine, for the whole space and for the budget's region
   (median of --steps steps at batch --batch, after one warm-up step);
2. inherited-weight mAP of the supernet's largest architecture with its stored BatchNorm statistics and
   recalibrated on 4 and 16 batches, then of the same architecture with one elastic dimension at its
   smallest (depth, widths, all sizes), then of random feasible architectures with and without the
   largest's block variants; then of the largest with one group of elastic sizes at its smallest (the
   neck's outputs, which feed the detection head; the neck's hidden widths; the backbone's outputs; the
   backbone's hidden widths), which tells where width sharing loses accuracy.

With --head-steps N, the largest with the smallest neck outputs, with the smallest backbone outputs, and two
random feasible architectures are also extracted and their detection heads alone trained for N steps (SGD,
BatchNorm frozen at the recalibrated statistics): if a subnet's loss were in the head reading fewer input
channels, a few head steps would recover it.

--no-step-timing skips part 1 (it is the only part that needs an otherwise idle machine).

    python benchmarks/supernet_diagnose.py runs/bench/search128c --data runs/data/synth128/data.yaml
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.budget import FeasibleRegion
from nas.search import SearchConfig, calibration_batches, prepare
from nas.supernet import load_supernet
from nas.supernet_train import SupernetTrainer
from search_spaces.io import atomic_write_json
from trainer.config import TrainConfig
from trainer.evaluate import evaluate


def step_seconds(space: Any, data: str, imgsz: int, batch: int, steps: int, region: FeasibleRegion | None,
                 out: Path) -> float:
    """Median wall time of one sandwich step (largest + 2 random + smallest, backward included)."""
    cfg = TrainConfig(data=data, out=str(out), epochs=1, imgsz=imgsz, batch=batch, workers=0, progress=False)
    tr = SupernetTrainer(cfg, space=space, region=region)
    tr.model.train()
    it = iter(tr.train_loader)
    times = []
    for i in range(steps + 1):
        imgs, targets, *_ = next(it)
        t0 = time.perf_counter()
        tr.train_step(imgs.float() / 255.0, targets)
        tr.optimizer.zero_grad(set_to_none=True)
        if i:  # the first step builds losses and caches
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_head(det: Any, data: Any, imgsz: int, batch: int, steps: int) -> None:
    """Train only `det`'s detection head for `steps` steps (SGD; BatchNorm frozen at its statistics)."""
    from trainer.datasets import YoloDataset, build_dataloader
    from trainer.hyp import load_hyp
    from trainer.loss import HeadInfo, YoloLoss

    torch.manual_seed(0)
    for p in det.parameters():
        p.requires_grad_(False)
    params = list(det.head.parameters())
    for p in params:
        p.requires_grad_(True)
    loss_fn = YoloLoss(HeadInfo.from_detector(det), load_hyp("tiny").scaled(len(det.arch.head_strides()),
                                                                             det.arch.nc, imgsz))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    loader = build_dataloader(YoloDataset.from_config(data, "train", imgsz=imgsz, seed=0), batch, 0, seed=0)
    det.train()
    for m in det.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    it = iter(loader)
    for _ in range(steps):
        try:
            imgs, targets, *_ = next(it)
        except StopIteration:
            it = iter(loader)
            imgs, targets, *_ = next(it)
        loss, _ = loss_fn(det(imgs.float() / 255.0), targets, imgs.shape)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a search_synthetic.py output directory")
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-steps", type=int, default=0, help="also train extracted subnets' heads alone")
    ap.add_argument("--no-step-timing", action="store_true", help="skip the sandwich step timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    budget = float(json.loads((run / "budget.json").read_text())["budget_ms"])
    sup = load_supernet(run / "supernet" / "supernet.pt")
    s = prepare(SearchConfig(supernet=str(run / "supernet" / "supernet.pt"), table=str(run / "table.json"),
                             data=args.data, budget_ms=budget, bn_batches=4, batch=args.batch, imgsz=args.imgsz),
                supernet=sup)
    region = FeasibleRegion(s.space, s.predict_ms, budget)
    report: dict[str, Any] = {"budget_ms": budget, "threads": args.threads, "batch": args.batch}

    space = sup.space.with_nc(s.nc)
    if not args.no_step_timing:
        report["step_s"] = {
            "whole_space": step_seconds(space, args.data, args.imgsz, args.batch, args.steps, None, run / "diag_a"),
            "budget_region": step_seconds(space, args.data, args.imgsz, args.batch, args.steps, region,
                                          run / "diag_b")}
        print(f"sandwich step: whole space {report['step_s']['whole_space']:.2f} s, budget region "
              f"{report['step_s']['budget_region']:.2f} s", flush=True)

    rows = []

    @functools.cache
    def calibration(n: int) -> list[torch.Tensor]:
        return calibration_batches(s.data, args.imgsz, args.batch, n, seed=0)

    def ev(dec: dict[str, Any], bn: int | None, what: str) -> None:
        arch = s.space.build_arch(dec)
        sup.set_active(arch)
        if bn is not None:
            sup.recalibrate_bn(calibration(bn))
        m = evaluate(sup, s.val_loader(), s.nc, s.names, device=s.device).metrics
        rows.append({"what": what, "arch": arch.name, "head": arch.head.type, "bn_batches": bn,
                     "predicted_ms": region.latency_ms(dec), "map": m.map, "map50": m.map50})
        print(f"{what:44s} {arch.name[-10:]} {arch.head.type:9s} {region.latency_ms(dec):5.2f} ms  "
              f"mAP {m.map * 100:.3f}%  mAP50 {m.map50 * 100:.3f}%", flush=True)

    big, small = region.largest(seed=0), s.space.smallest_decisions()
    variants = [k for k in big if k.endswith((".block", ".down")) or k.startswith("head.")]
    ev(big, None, "largest, stored BN statistics")
    ev(big, 4, "largest, recalibrated on 4 batches")
    ev(big, 16, "largest, recalibrated on 16 batches")
    ev({**big, **{k: small[k] for k in big if k.endswith(".depth")}}, 4, "largest at depth 1")
    ev({**big, **{k: small[k] for k in big if k.endswith((".out", ".width"))}}, 4, "largest at its narrowest")
    ev({**small, **{k: big[k] for k in variants}}, 4, "largest's block variants, every size smallest")
    rng = np.random.default_rng(5)
    for i in range(3):
        d = region.sample(rng)
        ev(d, 4, f"random feasible {i}")
        ev({**d, **{k: big[k] for k in variants}}, 4, f"random feasible {i}, largest's block variants")
    groups = {"neck outputs (the head's inputs)": lambda k: k.startswith("neck.") and k.endswith(".out"),
              "neck hidden widths": lambda k: k.startswith("neck.") and k.endswith((".width", ".mid")),
              "backbone outputs": lambda k: k.startswith(("stem.", "backbone.")) and k.endswith(".out"),
              "backbone hidden widths": lambda k: k.startswith(("stem.", "backbone.")) and k.endswith(".width")}


    def shrunk(group: str) -> dict[str, Any]:
        """The largest with the sizes of one group at their smallest."""
        return {**big, **{k: small[k] for k in big if groups[group](k)}}

    for name in groups:
        ev(shrunk(name), 4, f"largest, smallest {name}")
    report["evaluations"] = rows
    if args.head_steps:
        report["head_only"] = []
        picks = {"largest": big, "largest, smallest neck outputs": shrunk("neck outputs (the head's inputs)"),
                 "largest, smallest backbone outputs": shrunk("backbone outputs")}
        rng = np.random.default_rng(5)
        picks.update({f"random feasible {i}": region.sample(rng) for i in range(2)})
        for what, dec in picks.items():
            arch = s.space.build_arch(dec)
            sup.set_active(arch)
            sup.recalibrate_bn(calibration(4))
            det = sup.extract().eval()
            before = evaluate(det, s.val_loader(), s.nc, s.names, device=s.device).metrics.map
            train_head(det, s.data, args.imgsz, args.batch, args.head_steps)
            after = evaluate(det, s.val_loader(), s.nc, s.names, device=s.device).metrics.map
            report["head_only"].append({"what": what, "arch": arch.name, "predicted_ms": region.latency_ms(dec),
                                        "map": before, "map_after_head_steps": after, "steps": args.head_steps})
            print(f"{what:44s} {region.latency_ms(dec):5.2f} ms  mAP {before * 100:.3f}%, after {args.head_steps} "
                  f"head-only steps {after * 100:.3f}%", flush=True)
    atomic_write_json(run / "diagnose.json", report)


if __name__ == "__main__":
    main()
