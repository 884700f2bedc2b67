"""Supernet training: the sandwich step, in-place distillation, BN statistics, checkpoints, resume, CLI."""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings

import pytest
import torch
from torch import Tensor

from nas.cli import main
from nas.search import calibration_batches
from nas.supernet import Supernet, load_supernet
from nas.supernet_train import VAL_BN_BATCHES, SupernetTrainer, family_decisions, frozen_bn_stats
from search_spaces import ConfigError, Detector
from search_spaces.errors import CheckpointError
from search_spaces.space import load_space
from trainer.config import TrainConfig

from . import IMGSZ, NC


def _cfg(shared, out, epochs: int = 2, **kw) -> TrainConfig:
    return TrainConfig(data=str(shared.data), out=str(out), epochs=epochs, imgsz=IMGSZ, batch=8, workers=0,
                       progress=False, **kw)


def test_sandwich_step_trains_every_head_configuration(shared, tmp_path):
    tr = SupernetTrainer(_cfg(shared, tmp_path), space="tiny", n_random=2)
    space = tr.space
    roles = tr.sandwich()
    assert [r for r, _ in roles] == ["largest", "random", "random", "smallest"]
    assert roles[0][1] == space.largest_decisions()
    smallest = space.smallest_decisions()
    assert {k: v for k, v in roles[-1][1].items() if k != "head.type"} == \
        {k: v for k, v in smallest.items() if k != "head.type"}
    # the smallest subnet's head type is drawn per step: over 30 steps it takes every type of the space
    types = {tr.sandwich()[-1][1]["head.type"] for _ in range(30)}
    assert types == set(space.decisions["head.type"].choices)
    imgs, targets, *_ = next(iter(tr.train_loader))

    def smallest_type(seed: int) -> str:
        torch.manual_seed(seed)
        return tr.sandwich()[-1][1]["head.type"]

    seed = next(s for s in range(100) if smallest_type(s) == "detect")  # a step whose ends differ in head
    torch.manual_seed(seed)
    roles = tr.sandwich()
    big, small = space.build_arch(roles[0][1]), space.build_arch(roles[-1][1])
    assert (big.head.type, len(big.head_strides())) != (small.head.type, len(small.head_strides()))
    torch.manual_seed(seed)  # train_step draws this same sandwich
    tr.model.train()
    items = tr.train_step(imgs.float() / 255.0, targets)
    assert {"box", "obj", "cls", "sub_loss", "kd"} <= set(items) and float(items["kd"]) > 0
    assert len(tr._losses) >= 2  # one YoloLoss per (head type, layout)
    net = tr.supernet
    for key in ("decoupled_p3_p6", "detect_p3_p4"):  # both ends' heads got gradients in one step
        grads = [p.grad for p in net.heads[key].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key


def test_bn_statistics_untouched_when_frozen():
    net = Supernet("tiny", nc=NC).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    with frozen_bn_stats(net):
        net(torch.rand(2, 3, IMGSZ, IMGSZ))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    net(torch.rand(2, 3, IMGSZ, IMGSZ))  # unfrozen: the statistics move
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(bn.momentum != 0.0 for bn in net.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_one_epoch_then_resume_equals_an_uninterrupted_run(shared, tmp_path):
    straight = SupernetTrainer(_cfg(shared, tmp_path / "a"), space="tiny")
    straight.train()
    first = SupernetTrainer(_cfg(shared, tmp_path / "b", max_time_s=1e-9), space="tiny").train()  # stops after 1
    assert first.epochs_done == 1 and (tmp_path / "b" / "last.pt").is_file()
    resumed = SupernetTrainer(_cfg(shared, tmp_path / "b", resume=True), space="tiny")
    assert resumed.start_epoch == 1
    result = resumed.train()
    assert result.epochs_done == 2 and len(result.rows) == 2 and "map" in result.rows[-1]
    a = torch.load(tmp_path / "a" / "supernet.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "supernet.pt", weights_only=True)
    assert a["space"] == "tiny" and a["nc"] == NC and a["format"] == "detforge.supernet"
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())  # bit-identical resume
    assert not (tmp_path / "b" / "model").exists()  # a supernet is not saved as a Detector directory
    # validation ran the largest path, on the EMA copy too
    assert resumed.eval_model.active_arch == resumed.space.with_nc(NC).largest()
    net = load_supernet(tmp_path / "b" / "supernet.pt")
    assert isinstance(net, Supernet) and net.nc == NC and net.space.name == "tiny"
    det = net.extract(net.space.smallest_decisions())
    assert isinstance(det, Detector)


def test_channel_sorting_reorders_every_epoch_after_the_first_and_resumes_exactly(shared, tmp_path):
    straight = SupernetTrainer(_cfg(shared, tmp_path / "a"), space="tiny", sort_channels=True)
    straight.train()
    assert straight.sorted_convs > 0  # epoch 2 started by reordering filters
    orders = {k: v for k, v in torch.load(tmp_path / "a" / "supernet.pt", weights_only=True)["state_dict"].items()
              if k.endswith(".order")}
    assert orders and any(not torch.equal(v, torch.arange(len(v))) for v in orders.values())
    first = SupernetTrainer(_cfg(shared, tmp_path / "b", max_time_s=1e-9), space="tiny", sort_channels=True).train()
    assert first.epochs_done == 1
    one = torch.load(tmp_path / "b" / "supernet.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(one[k], torch.arange(len(v))) for k, v in orders.items())  # no sort before epoch 2
    # the order is part of the run: resuming without --sort-channels is refused, with it the run is bit-identical
    with pytest.raises(CheckpointError, match="sort_channels"):
        SupernetTrainer(_cfg(shared, tmp_path / "b", resume=True), space="tiny")
    SupernetTrainer(_cfg(shared, tmp_path / "b", resume=True), space="tiny", sort_channels=True).train()
    a = torch.load(tmp_path / "a" / "supernet.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "supernet.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_autoanchor_refits_each_layout_and_the_searched_models_inherit_the_anchors(shared, tmp_path):
    from trainer.autoanchor import MIN_BPR
    from trainer.synthetic import generate

    # boxes drawn for 320 px and trained at 64: every layout's anchors are too large for most of them
    data = generate(tmp_path / "data", train=16, val=8, imgsz=320, classes=NC, seed=0)
    region = _region(shared)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "a"), epochs=2, imgsz=IMGSZ, batch=8, workers=0,
                      progress=False, max_time_s=1e-9)  # stops after one epoch: resumed below
    tr = SupernetTrainer(cfg, space="tiny", region=region)
    stated = load_space("tiny").anchors
    fits = tr.layout_anchor_fits
    assert set(fits) == set(stated) == set(tr.space.layouts)
    for layout, f in fits.items():
        assert f.bpr < MIN_BPR and f.new_bpr > f.bpr and f.replaced, layout
        assert tr.space.anchors[layout] == f.anchors != stated[layout]
        assert tr.supernet.anchor_sizes()[layout] == f.anchors  # every anchor-based head of the layout
    largest = tr.arch(tr._largest)
    assert largest.head.anchors == fits[region.space.complete(tr._largest)["head.layout"]].anchors
    tr.train()
    # a resume keeps the interrupted run's anchors and record (no new fit) and accepts its budget's largest
    again = SupernetTrainer(dataclasses.replace(cfg, resume=True, max_time_s=None), space="tiny",
                            region=_region(shared, budget_ms=region.budget_ms))
    assert again.start_epoch == 1 and again.space.anchors == tr.space.anchors == again.eval_model.space.anchors
    assert {k: f.to_dict() for k, f in again.layout_anchor_fits.items()} == {k: f.to_dict() for k, f in fits.items()}
    assert again.arch(again._largest) == largest
    # supernet.pt carries the anchors: its space states them, and an extracted model runs with them
    net = load_supernet(tmp_path / "a" / "supernet.pt").eval()
    assert net.space.anchors == tr.space.anchors
    assert torch.load(tmp_path / "a" / "supernet.pt", weights_only=True)["anchor_fit"]["p3-p6"]["replaced"]
    arch = net.space.build_arch({**net.space.smallest_decisions(), "head.layout": "p3-p6", "head.type": "idetect"},
                                nc=NC)
    det = net.extract(arch).eval()
    assert det.arch.head.anchors == det.head.anchor_sizes() == fits["p3-p6"].anchors
    stale = load_space("tiny").build_arch(arch_decisions := {**net.space.smallest_decisions(), "head.layout": "p3-p6",
                                                               "head.type": "idetect"}, nc=NC)
    assert stale.head.anchors == stated["p3-p6"]  # built from the space file: the anchors before the refit
    assert net.extract(stale).head.anchor_sizes() == fits["p3-p6"].anchors  # the model runs the trained ones
    assert net.space.arch_id(arch_decisions) != load_space("tiny").arch_id(arch_decisions)
    net.set_active(arch)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.allclose(net(x)[0], det(x)[0], atol=1e-5)  # decoded boxes: the anchors agree
    # --noautoanchor keeps the space's
    off = SupernetTrainer(dataclasses.replace(cfg, out=str(tmp_path / "b"), autoanchor=False), space="tiny")
    assert off.space.anchors == stated and off.layout_anchor_fits == {} and off.anchor_fit_record() is None


def test_anchors_within_yaml_precision_are_not_rewritten(shared):
    space = load_space("tiny")
    fine = [[v + 0.004 for v in lv] for lv in space.anchors["p3-p5"]]  # more decimals than 0.01 px
    net = Supernet(space.with_anchors({"p3-p5": fine}), nc=NC)
    before = net.space
    assert net.changed_anchors() == {}
    net.sync_space_anchors()
    assert net.space is before and net.space.anchors["p3-p5"] == fine
    net.eval()
    det = net.extract({**net.space.smallest_decisions(), "head.layout": "p3-p5", "head.type": "detect"}).eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():  # the extracted model runs the exact anchors, not YAML's rounding of them
        assert torch.allclose(net(x)[0], det(x)[0], atol=1e-5, rtol=0)


def test_multi_scale_with_a_p6_teacher_draws_sizes_it_accepts(shared, tmp_path):
    import yaml

    from search_spaces import Detector
    from search_spaces.space import SPACES_DIR, SearchSpace

    raw = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())
    raw["head"]["layout"] = ["p3-p5", "p3-p4"]
    p5 = SearchSpace.from_dict(raw)
    assert p5.max_stride == 32
    tiny = load_space("tiny")
    teacher = Detector(tiny.build_arch({**tiny.smallest_decisions(), "head.layout": "p3-p6"}, nc=NC))
    tr = SupernetTrainer(_cfg(shared, tmp_path, epochs=1, multi_scale=True, autoanchor=False), space=p5,
                         teacher=teacher)
    assert tr.grid_stride() == 64  # sizes the teacher's P6 level accepts


def test_multi_scale_sizes_fit_every_subnet_of_the_space(shared, tmp_path):
    seen = []

    class Sizes(SupernetTrainer):
        def train_step(self, imgs, targets):
            seen.append(tuple(imgs.shape[2:]))
            return super().train_step(imgs, targets)

    cfg = dataclasses.replace(_cfg(shared, tmp_path, epochs=2, multi_scale=True, autoanchor=False), imgsz=128,
                              batch=4, val_interval=2)  # 8 steps
    tr = Sizes(cfg, space="tiny")
    assert tr.grid_stride() == 64  # the tiny space's P3-P6 layout: its subnets' strides may be smaller
    tr.train()
    assert len(set(seen)) > 1 and all(h % 64 == 0 and w % 64 == 0 for h, w in seen)


def test_cli_trains_and_resumes(shared, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["supernet", "train", "--space", "tiny", "--data", str(shared.data), "--epochs", "1", "--batch", "8",
            "--out", str(out), "--workers", "0", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["epochs"] == 1 and doc["supernet"].endswith("supernet.pt")
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["supernet"]["space"] == "tiny" and ck["config"]["imgsz"] == 128  # the space's largest imgsz
    assert ck["config"]["autoanchor"] and ck["anchor_fit"] is not None
    assert main([*args[:-4], str(tmp_path / "off"), *args[-3:], "--noautoanchor"]) == 0
    off = torch.load(tmp_path / "off" / "last.pt", weights_only=True)
    assert not off["config"]["autoanchor"] and off["anchor_fit"] is None
    capsys.readouterr()
    assert main([*args[:7], "2", *args[8:], "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2
    shutil.rmtree(out)


def test_bad_inputs_are_config_errors(shared, tmp_path, capsys):
    with pytest.raises(ConfigError, match="Supernet"):
        SupernetTrainer(_cfg(shared, tmp_path), model=Detector(load_space("tiny").with_nc(NC).smallest()))
    with pytest.raises(ConfigError, match="SyncBN"):
        SupernetTrainer(_cfg(shared, tmp_path, sync_bn=True), space="tiny")
    with pytest.raises(ConfigError, match="n_random"):
        SupernetTrainer(_cfg(shared, tmp_path), space="tiny", n_random=-1)
    assert main(["supernet", "train", "--space", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_ddp_two_cpu_processes_train_one_supernet(shared, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    out = tmp_path / "ddp"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "nas.cli", "supernet", "train", "--space",
           "tiny", "--data", str(shared.data), "--epochs", "1", "--batch", "8", "--imgsz", str(IMGSZ), "--workers",
           "0", "--device", "cpu", "--out", str(out), "--json"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # every step leaves inactive choices without gradient: DDP must allow that, and the ranks stay equal
    assert summary["world_size"] == 2 and summary["ddp_weights_identical"]
    net = load_supernet(out / "supernet.pt")
    assert net.space.name == "tiny"
    # rank 0 refit P3-P6 on this set; rank 1 trained with the same anchors in its spaces and losses
    assert net.space.anchors["p3-p6"] != load_space("tiny").anchors["p3-p6"] and summary["ddp_anchors_identical"]


# ---- a supernet for one budget (nas.budget.FeasibleRegion) ------------------------------------------------------
def _region(shared, budget_ms: float | None = None, quantile: float = 0.5):
    from nas.budget import FeasibleRegion

    space = load_space("tiny")
    if budget_ms is None:  # between the space's ends: some draws fit, some do not
        probe = FeasibleRegion.from_table(shared.table, space, 1e9, nc=NC)
        ms = sorted(probe.latency_ms(probe.space.random_decisions(random.Random(i))) for i in range(40))
        budget_ms = ms[int(len(ms) * quantile)]
    return FeasibleRegion.from_table(shared.table, space, budget_ms, nc=NC)


def test_feasible_region_keeps_a_bounded_cache_of_predictions(shared, monkeypatch):
    import numpy as np

    import nas.budget

    monkeypatch.setattr(nas.budget, "CACHED_LATENCIES", 8)
    region = _region(shared, budget_ms=1e9)
    calls = []
    predict = region.predict_ms
    region.predict_ms = lambda arch: calls.append(1) or predict(arch)
    rng = np.random.default_rng(0)
    drawn = [region.space.random_decisions(rng) for _ in range(20)]
    first = [region.latency_ms(d) for d in drawn]
    assert len(region._ms) == 8 and len(calls) == 20
    assert [region.latency_ms(d) for d in drawn[-8:]] == first[-8:] and len(calls) == 20  # the recent: cached
    assert region.latency_ms(drawn[0]) == first[0] and len(calls) == 21  # the oldest was let go, and predicted again


def test_feasible_region_draws_only_architectures_within_the_budget(shared):
    import numpy as np

    region = _region(shared)
    space = region.space
    assert space.decisions["imgsz"].choices == (IMGSZ,) and space.nc == NC  # pinned to the table, at the data's nc
    rng = np.random.default_rng(0)
    drawn = [region.sample(rng) for _ in range(30)]
    ms = [region.latency_ms(d) for d in drawn]
    assert max(ms) <= region.budget_ms and len({space.arch_id(d) for d in drawn}) > 10
    assert not region.contains(space.largest_decisions())  # so the largest is the region's own
    top = region.largest(seed=0)
    assert region.contains(top) and region.latency_ms(top) >= sorted(ms)[len(ms) // 2]
    assert region.largest(seed=0) == top  # a function of the seed
    wide = _region(shared, budget_ms=1e9)
    assert wide.largest() == wide.space.largest_decisions()  # a budget above everything: the space's largest
    with pytest.raises(ConfigError, match="budget"):
        _region(shared, budget_ms=1e-6).sample(rng)
    # decisions held fixed: every draw and the largest keep them, and the largest is the heaviest such draw
    fixed = {"head.type": "decoupled", "head.layout": "p3-p4"}
    held = [region.sample(rng, fixed) for _ in range(10)]
    assert all(d["head.type"] == "decoupled" and d["head.layout"] == "p3-p4" and region.contains(d) for d in held)
    top = region.largest(seed=0, fixed=fixed)
    assert all(top[k] == v for k, v in fixed.items()) and region.contains(top)
    assert region.latency_ms(top) >= sorted(region.latency_ms(d) for d in held)[len(held) // 2]
    with pytest.raises(ConfigError, match="head.type=decoupled"):
        _region(shared, budget_ms=1e-6).sample(rng, fixed)


def test_sandwich_for_a_budget_trains_only_what_the_search_can_pick(shared, tmp_path):
    region = _region(shared)
    tr = SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=1), space=load_space("tiny"), region=region)
    assert tr.sandwich()[0][1] == region.largest(seed=0)
    for _ in range(10):
        roles = tr.sandwich()
        assert all(region.contains(d) for _, d in roles), [r for r, d in roles if not region.contains(d)]
    tr.train()
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    rec = ck["supernet"]["region"]
    assert rec["budget_ms"] == region.budget_ms and rec["largest"] == region.space.arch_id(region.largest(seed=0))
    assert torch.load(tmp_path / "a" / "supernet.pt", weights_only=True)["region"] == rec
    assert tr.eval_model.active_arch.name == region.space.build_arch(region.largest(seed=0)).name  # validated
    # a search with a higher budget than the supernet's is told that it scores untrained weights
    from nas.search import SearchConfig, prepare

    def search(budget: float) -> SearchConfig:
        return SearchConfig(supernet=str(tmp_path / "a" / "supernet.pt"), table=str(shared.table),
                            data=str(shared.data), budget_ms=budget, batch=8)

    with pytest.warns(RuntimeWarning, match="trained on the architectures within"):
        prepare(search(region.budget_ms * 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        prepare(search(region.budget_ms))
    # the study's first trial is the trained largest (enqueued by its creator only, not again on resume)
    from nas.search import run_search

    cfg = dataclasses.replace(search(region.budget_ms), trials=2, out=str(tmp_path / "s"), sampler="random",
                              bn_batches=1, val_batches=1)
    trials = run_search(cfg).trials
    assert trials[0].user_attrs["enqueued"] == "supernet" and trials[0].user_attrs["arch_id"] == rec["largest"]
    assert "enqueued" not in trials[1].user_attrs
    none = run_search(dataclasses.replace(cfg, out=str(tmp_path / "n"), enqueue=())).trials
    assert all("enqueued" not in t.user_attrs for t in none)
    # joining (or resuming) a study enqueues nothing, even where its creator enqueued nothing
    trials = run_search(dataclasses.replace(cfg, out=str(tmp_path / "n"), trials=3)).trials
    assert len(trials) == 3 and all("enqueued" not in t.user_attrs for t in trials)
    # resuming with another budget, or for the whole space, is refused; the same budget resumes
    for other in (_region(shared, budget_ms=region.budget_ms * 2), None):
        with pytest.raises(CheckpointError, match="budget"):
            SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=2, resume=True), space=load_space("tiny"),
                            region=other)
    again = SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=2, resume=True), space=load_space("tiny"),
                            region=_region(shared, budget_ms=region.budget_ms))
    assert again.start_epoch == 1


def test_per_head_sandwich_draws_each_step_inside_one_head_configuration(shared, tmp_path):
    region = _region(shared, quantile=0.8)  # most draws fit: rejection sampling per head stays quick
    space = region.space
    tr = SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=1), space=load_space("tiny"), region=region,
                         per_head=True)
    smallest = space.smallest_decisions()
    heads = {(t, lay) for t in space.decisions["head.type"].choices for lay in space.decisions["head.layout"].choices
             if region.contains({**smallest, "head.type": t, "head.layout": lay})}
    assert len(heads) >= 2
    overall = region.largest(seed=0)

    def step(seed: int) -> list:
        torch.manual_seed(seed)
        return tr.sandwich()

    teachers: dict[tuple[str, str], dict] = {}
    seen: dict[tuple[str, str], int] = {}
    for s in range(60):
        roles = step(s)
        configs = {(d["head.type"], d["head.layout"]) for _, d in roles}
        assert len(configs) == 1 and all(region.contains(d) for _, d in roles)  # one head, all within the budget
        (h,) = configs
        seen.setdefault(h, s)
        fixed = {"head.type": h[0], "head.layout": h[1]}
        # the teacher is the region's largest with that head (the overall largest for its own head)
        if h not in teachers:
            teachers[h] = overall if h == (overall["head.type"], overall["head.layout"]) else \
                region.largest(seed=0, fixed=fixed)
        assert roles[0] == ("largest", teachers[h]) and roles[-1] == ("smallest", {**smallest, **fixed})
    assert set(seen) == heads  # every feasible head configuration is drawn, no other
    # only the overall largest feeds the running BatchNorm statistics: a step of another head leaves them be
    imgs, targets, *_ = next(iter(tr.train_loader))
    tr.model.train()

    def running() -> list[torch.Tensor]:
        return [v.clone() for k, v in tr.supernet.state_dict().items() if k.endswith("running_mean")]

    for h, s in seen.items():
        before = running()
        torch.manual_seed(s)
        tr.train_step(imgs.float() / 255.0, targets)
        moved = any(not torch.equal(a, b) for a, b in zip(before, running()))
        assert moved == (h == (overall["head.type"], overall["head.layout"])), h
    # the sandwich is part of the run: resuming it without --per-head is refused
    tr.train()
    with pytest.raises(CheckpointError, match="per_head"):
        SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=2, resume=True), space=load_space("tiny"), region=region)
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["supernet"]["per_head"] is True


def test_attentive_random_subnets_are_the_most_budget_spending_of_k_draws(shared, tmp_path):
    import numpy as np

    region = _region(shared)
    # k=1 is the uniform draw; k > 1: the heaviest of the k draws `sample` makes from the same generator
    assert region.sample_top(np.random.default_rng(3), 1) == region.sample(np.random.default_rng(3))
    rng = np.random.default_rng(5)
    draws = [region.sample(rng) for _ in range(4)]
    top = region.sample_top(np.random.default_rng(5), 4)
    assert top in draws and region.latency_ms(top) == max(region.latency_ms(d) for d in draws)
    fixed = {"head.type": "decoupled"}
    assert region.sample_top(rng, 3, fixed)["head.type"] == "decoupled"

    space = load_space("tiny")
    uniform = SupernetTrainer(_cfg(shared, tmp_path / "u", epochs=1), space=space, region=region)
    attentive = SupernetTrainer(_cfg(shared, tmp_path / "a", epochs=1), space=space, region=region, attentive=4)

    def random_ms(tr: SupernetTrainer) -> list[float]:
        torch.manual_seed(0)
        return [region.latency_ms(d) for _ in range(15) for role, d in tr.sandwich() if role == "random"]

    ms_uniform, ms_attentive = random_ms(uniform), random_ms(attentive)
    assert len(ms_attentive) == 30 and max(ms_attentive) <= region.budget_ms
    assert np.mean(ms_attentive) > np.mean(ms_uniform), (ms_uniform, ms_attentive)
    assert attentive.sandwich()[0][1] == uniform.sandwich()[0][1] == region.largest(seed=0)  # the same teacher
    assert attentive.model_identity()["supernet"]["attentive"] == 4  # recorded in last.pt
    with pytest.raises(ConfigError, match="table") as e:
        SupernetTrainer(_cfg(shared, tmp_path / "n", epochs=1), space=space, attentive=2)
    assert e.value.field == "attentive"
    with pytest.raises(ConfigError, match=">= 1"):
        SupernetTrainer(_cfg(shared, tmp_path / "z", epochs=1), space=space, region=region, attentive=0)


def test_per_family_sandwich_is_one_family_taught_by_its_own_largest(shared, tmp_path):
    region = _region(shared)
    space = load_space("tiny")
    family = family_decisions(space)
    assert {"backbone.p3.block", "backbone.p3.down", "spp.block", "head.type", "head.layout"} <= set(family)
    assert "backbone.p3.depth" not in family and "neck.p3.width" not in family
    tr = SupernetTrainer(_cfg(shared, tmp_path / "f", epochs=1), space=space, region=region, per_family=True)
    torch.manual_seed(0)
    seen: dict[str, set] = {k: set() for k in family}
    for _ in range(12):
        roles = tr.sandwich()
        assert [r for r, _ in roles] == ["largest", "random", "random", "smallest"]
        fam = {k: roles[0][1][k] for k in family}
        for _, d in roles:  # every member is of the teacher's family, and within the budget
            assert {k: d[k] for k in family} == fam and region.contains(d)
        assert region.latency_ms(roles[0][1]) >= region.latency_ms(roles[-1][1])
        for k, v in fam.items():
            seen[k].add(v)
    # the family is drawn per step: the block types and head types vary over the steps
    assert len(seen["backbone.p3.block"]) > 1 and len(seen["head.type"]) > 1
    # a family none of whose draws fits is taught by the feasible draw it came from, not by its smallest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(region, "largest", lambda seed, draws, fixed: {**region.space.smallest_decisions(), **fixed})
        teachers = [tr.sandwich()[0][1] for _ in range(5)]
    assert any(t != {**region.space.smallest_decisions(), **{k: t[k] for k in family}} for t in teachers)
    # without a budget, a family's largest and smallest are the space's, with the family's choices
    whole = SupernetTrainer(_cfg(shared, tmp_path / "w", epochs=1), space=space, per_family=True)
    roles = whole.sandwich()
    fam = {k: roles[0][1][k] for k in family}
    assert roles[0][1] == {**space.largest_decisions(), **fam} and roles[-1][1] == {**space.smallest_decisions(), **fam}
    # no subnet keeps the largest's BatchNorm statistics: validation re-estimates them, and reads a real mAP
    result = tr.train()
    assert result.last is not None and result.rows[-1]["map50"] >= 0.0
    bns = [m for root in tr.eval_model.active_modules() for m in root.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    validated = [b.running_var.clone() for b in bns]
    tr.eval_model.recalibrate_bn(calibration_batches(tr.data_cfg, IMGSZ, 8, VAL_BN_BATCHES, seed=0))
    assert all(torch.allclose(v, b.running_var) for v, b in zip(validated, bns))
    assert torch.load(tmp_path / "f" / "last.pt", weights_only=True)["supernet"]["per_family"] is True
    with pytest.raises(ConfigError, match="per_head or per_family") as e:
        SupernetTrainer(_cfg(shared, tmp_path / "b", epochs=1), space=space, per_head=True, per_family=True)
    assert e.value.field == "per_family"


def _taught_step(tr: SupernetTrainer) -> tuple[dict[str, list], list, Tensor, dict[str, Tensor]]:
    """One sandwich step, recording each member's loss parts by role and the distillation target it had."""
    parts: dict[str, list] = {}
    targets_seen: list = []
    compute, outputs = tr.compute_loss, tr.teacher_outputs

    def spy(*a, **kw):
        loss, p = compute(*a, **kw)
        parts.setdefault(tr.role, []).append(p)
        targets_seen.append(tr.teacher_raw)  # what this member was taught from
        return loss, p

    tr.compute_loss = spy
    tr.teacher_outputs = lambda x: targets_seen.append(outputs(x)) or targets_seen[-1]
    imgs, targets, *_ = next(iter(tr.train_loader))
    imgs = imgs.float() / 255.0
    tr.model.train()
    items = tr.train_step(imgs, targets)
    return parts, targets_seen, imgs, items


def test_a_frozen_teacher_teaches_every_member_the_largest_included(shared, tmp_path):
    teacher = Detector(load_space("tiny").with_nc(NC).largest())
    tr = SupernetTrainer(_cfg(shared, tmp_path / "t", epochs=1), space="tiny", teacher=teacher)
    parts, targets_seen, imgs, items = _taught_step(tr)
    # the largest learns from the teacher too (without one it is the teacher and has no distillation term)
    assert float(parts["largest"][0]["kd_obj"]) > 0 and float(items["kd"]) > 0
    assert all(float(p["kd_obj"]) > 0 and float(p["kd_cls"]) > 0 for role in ("random", "smallest")
               for p in parts[role])
    # the teacher is frozen and outside the optimisation
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert tr.model_identity()["supernet"]["teacher"] == teacher.arch.name
    # every member, the largest first, was taught from the teacher's outputs of this batch, computed once
    raw = targets_seen[0]
    assert len(targets_seen) == 5 and all(t is raw for t in targets_seen[1:])
    with torch.no_grad():
        expected = teacher(imgs)[1]
    assert len(raw) == len(expected) and all(torch.allclose(a, b) for a, b in zip(raw, expected))
    # a teacher of other classes teaches objectness only
    other = Detector(load_space("tiny").with_nc(NC + 2).largest())
    parts, *_ = _taught_step(SupernetTrainer(_cfg(shared, tmp_path / "o", epochs=1), space="tiny", teacher=other))
    members = [p for ps in parts.values() for p in ps]
    assert all(float(p["kd_obj"]) > 0 and float(p["kd_cls"]) == 0 for p in members)


def test_a_teacher_that_cannot_teach_is_refused(shared, tmp_path, capsys):
    space = load_space("tiny").with_nc(NC)
    for strides, kw, says in (([128], {}, "meets"), ([8, 48], {}, "divide"), (None, {"kd_weight": 0.0}, "kd_weight")):
        teacher = Detector(space.largest())
        if strides:
            teacher.strides, teacher.max_stride = strides, max(strides)
        with pytest.raises(ConfigError, match=says) as e:
            SupernetTrainer(_cfg(shared, tmp_path / "s", epochs=1), space="tiny", teacher=teacher, **kw)
        assert e.value.field == "teacher" and teacher.training  # a refused teacher is left as given
    # the CLI needs trained weights: a zoo name, a YAML, a directory without weights.pt are one error line each
    (tmp_path / "bare").mkdir()
    space.largest().to_yaml(tmp_path / "bare" / "arch.yaml")
    base = ["supernet", "train", "--space", "tiny", "--data", str(shared.data), "--epochs", "1", "--batch", "8",
            "--out", str(tmp_path / "cli"), "--workers", "0"]
    for ref in ("yolov7-tiny", str(tmp_path / "bare" / "arch.yaml"), str(tmp_path / "bare")):
        assert main([*base, "--teacher", ref]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "teacher" in err[0] and "no trained weights" in err[0], ref
    assert main([*base, "--teacher-model", "yolov7-tiny"]) == 2
    assert "teacher_model" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_budget_pins_the_input_size_to_the_tables(shared, tmp_path):
    from nas.budget import FeasibleRegion
    from search_spaces.space import Decision

    space = load_space("tiny")  # a space whose input sizes do not include the table's (as the default at 128)
    space = dataclasses.replace(space, decisions={**space.decisions, "imgsz": Decision("imgsz", (128, 192), "imgsz")})
    region = FeasibleRegion.from_table(shared.table, space, 1e9, nc=NC)
    tr = SupernetTrainer(_cfg(shared, tmp_path, epochs=1), model=Supernet(space, nc=NC), region=region)
    roles = tr.sandwich()
    assert {d["imgsz"] for _, d in roles} == {IMGSZ} and tr.arch(roles[-1][1]).imgsz == IMGSZ
    with pytest.raises(ConfigError, match="imgsz"):
        SupernetTrainer(TrainConfig(data=str(shared.data), out=str(tmp_path), imgsz=128, batch=8, workers=0),
                        model=Supernet(space, nc=NC), region=region)


def test_cli_budget_needs_a_table_and_a_possible_budget(shared, tmp_path, capsys):
    base = ["supernet", "train", "--space", "tiny", "--data", str(shared.data), "--epochs", "1", "--batch", "8",
            "--out", str(tmp_path / "run"), "--workers", "0"]
    assert main([*base, "--budget-ms", "3"]) == 2
    assert "table" in capsys.readouterr().err
    assert main([*base, "--table", str(shared.table), "--budget-ms", "0.000001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget_ms" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run" / "last.pt").exists()
    assert main([*base, "--attentive", "2"]) == 2  # ranks draws by predicted latency: needs a table
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attentive" in err[0] and "--table" in err[0]
