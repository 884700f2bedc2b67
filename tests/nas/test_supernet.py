"""Supernet: extracted subnets equal the active path; shapes, shared gradients, sharing layout, BN, state."""
from __future__ import annotations

import random

import pytest
import torch

from nas.supernet import Supernet
from search_spaces import ConfigError, Detector, load_model
from search_spaces.space import load_space

from ..helpers import randomize

NC = 3


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def supernet(space):
    torch.manual_seed(0)
    net = Supernet(space, nc=NC)
    randomize(net)
    return net


def test_extract_equals_active_path(supernet, space):
    supernet.eval()
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        d = space.random_decisions(rng)
        arch = supernet.set_active(d)
        seen.add((d["head.layout"], d["head.type"]))
        x = torch.rand(2, 3, arch.imgsz, arch.imgsz)
        with torch.no_grad():
            y_sup, raw_sup = supernet(x)
            det = supernet.extract().eval()
            y_det, raw_det = det(x)
        assert isinstance(det, Detector) and det.arch == arch
        assert y_sup.shape == y_det.shape
        assert (y_sup - y_det).abs().max() <= 1e-5
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(raw_sup, raw_det))
    assert len(seen) >= 6  # layouts and head types were exercised


def test_train_mode_shapes_match_detector(supernet, space):
    supernet.train()
    for d in (space.largest_decisions(), space.smallest_decisions(),
              space.random_decisions(random.Random(4))):
        arch = supernet.set_active(d)
        det = Detector(arch).train()
        x = torch.rand(2, 3, 64, 64)
        out, ref = supernet(x), det(x)
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert all(o.shape[-1] == 5 + NC for o in out)
    supernet.eval()
    for d in (space.largest_decisions(), space.smallest_decisions()):
        supernet.set_active(d)
        with torch.no_grad():
            decoded, _ = supernet(torch.rand(1, 3, 128, 128))
        assert decoded.shape[0] == 1 and decoded.shape[-1] == 5 + NC


def test_gradients_reach_the_shared_slice(space):
    net = Supernet(space, nc=NC).train()
    weight = net.blocks["p2"]["elan"].cv1.conv.weight  # [max width, max c_in, 1, 1]
    big = space.largest_decisions() | {"backbone.p2.block": "elan"}
    small = space.smallest_decisions() | {"backbone.p2.block": "elan"}
    for d in (big, small):
        net.zero_grad()
        arch = net.set_active(d)
        sum(o.float().square().mean() for o in net(torch.rand(2, 3, 64, 64))).backward()
        width = next(la for la in arch.layers if la.name == "p2").args["width"]
        assert weight.grad[:width].abs().sum() > 0
        assert weight.grad[width:].abs().sum() == 0  # inactive filters get nothing
    assert width < weight.shape[0]


def test_weights_are_shared_by_tap_position(space):
    """Two depths of the same ELAN use the same cv3 weights for the chain outputs both concatenate."""
    net = Supernet(space, nc=NC)
    base = space.largest_decisions() | {"backbone.p3.block": "elan", "backbone.p3.tap": 1}
    dets = {depth: net.extract(base | {"backbone.p3.depth": depth}) for depth in (1, 2)}
    idx = {depth: next(i for i, la in enumerate(det.arch.layers) if la.name == "p3")
           for depth, det in dets.items()}
    w = {depth: det.layers[idx[depth]].cv3.conv.weight for depth, det in dets.items()}
    width = dets[1].arch.layers[idx[1]].args["width"]
    # concat order [chain[d], ..., chain[0], a]: depth 1 -> [c1, c0, a]; depth 2 -> [c2, c1, c0, a]
    assert torch.equal(w[1], w[2][:, width:])
    # the largest subnet is the largest module, unsliced
    full = net.blocks["p3"]["elan"].cv3.conv.weight
    assert torch.equal(w[2], full)


def test_block_types_keep_their_own_weights(space):
    net = Supernet(space, nc=NC)
    assert set(net.blocks["p3"]) == {"elan", "elan_ghost", "eelan"}
    assert set(net.blocks["ds3"]) == {"maxpool", "mp", "conv"}
    assert {"idetect_p3_p5", "detect_p3_p4", "decoupled_p3_p6"} <= set(net.heads)
    a = net.extract(space.largest_decisions() | {"backbone.p3.block": "elan"})
    b = net.extract(space.largest_decisions() | {"backbone.p3.block": "ghost_elan"})
    pa = next(m for m, la in zip(a.layers, a.arch.layers) if la.name == "p3")
    pb = next(m for m, la in zip(b.layers, b.arch.layers) if la.name == "p3")
    assert not torch.equal(pa.cv1.conv.weight, pb.cv1.conv.weight)


def test_state_dict_roundtrip(supernet, space, tmp_path):
    supernet.eval()
    d = space.random_decisions(random.Random(9))
    supernet.set_active(d)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = supernet(x)[0]
    torch.save(supernet.state_dict(), tmp_path / "sn.pt")
    other = Supernet(space, nc=NC)
    other.load_state_dict(torch.load(tmp_path / "sn.pt", weights_only=True))
    other.eval().set_active(d)
    with torch.no_grad():
        assert torch.equal(other(x)[0], ref)


def test_recalibrate_bn(space):
    net = Supernet(space, nc=NC).eval()
    randomize(net)
    arch = net.set_active(space.random_decisions(random.Random(2)))
    bn = net.active_modules()[0].bn
    before = bn.running_mean.clone()
    batches = [torch.rand(2, 3, arch.imgsz, arch.imgsz) for _ in range(3)]
    assert net.recalibrate_bn(iter(batches), num_batches=2) == 2
    assert not torch.equal(bn.running_mean, before) and bn.momentum == 0.03 and not net.training
    net.eval()
    x = torch.rand(1, 3, arch.imgsz, arch.imgsz)
    with torch.no_grad():
        assert (net(x)[0] - net.extract().eval()(x)[0]).abs().max() <= 1e-5
    net.reset_bn_stats()
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # extract(arch, bn_batches=...) is the same recalibration, then the same copy
    other = space.random_decisions(random.Random(3))
    one = net.extract(other, bn_batches=batches[:2]).eval()
    net.set_active(other)
    net.recalibrate_bn(batches[:2])
    two = net.extract().eval()
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))


def test_foreign_architectures_are_refused(supernet):
    with pytest.raises(ConfigError):
        supernet.set_active(load_model("yolov7-tiny").arch.with_nc(NC))
    with pytest.raises(ConfigError):
        supernet.set_active(load_model("yolov7-tiny").arch)  # nc differs too


def _narrow_conv(net: Supernet):
    """An active conv block running fewer filters than it holds (the one channel sorting changes)."""
    from nas.supernet import DynConv

    for module in net.active_modules():
        for m in module.modules():
            if isinstance(m, DynConv) and m.conv.active_out < m.conv.out_channels:
                return m
    raise AssertionError("the active architecture has no narrow conv")


def test_sorted_channels_put_the_strongest_filters_first(space, tmp_path):
    from nas.supernet import DynEElan, channel_importance, load_supernet, supernet_document

    torch.manual_seed(0)
    net = Supernet(space, nc=NC).eval()
    randomize(net, seed=3)
    x = torch.rand(2, 3, 64, 64)
    big, narrow = space.largest_decisions(), space.smallest_decisions()
    with torch.no_grad():
        net.set_active(big)
        y_big = net(x)[0]
        net.set_active(narrow)
        y_narrow = net(x)[0]
        assert net.sort_channels() > 0
        assert net.sort_channels() == 0  # the order is a function of the weights: sorting twice is sorting once
        conv = _narrow_conv(net)
        w = conv.conv.active_out
        top = torch.topk(channel_importance(conv), w).indices
        assert set(conv.order[:w].tolist()) == set(top.tolist())  # a narrow subnet runs the strongest filters
        assert (net(x)[0] - y_narrow).abs().max() > 1e-3
        net.set_active(big)
        assert torch.allclose(net(x)[0], y_big, rtol=1e-4, atol=1e-3)  # full width: the same function
    eelans = [m for m in net.modules() if isinstance(m, DynEElan)]
    assert eelans and all(torch.equal(b.cv3.order, m.branches[0].cv3.order) for m in eelans for b in m.branches)
    rng = random.Random(1)
    for _ in range(10):  # extraction copies the reordered slices
        arch = net.set_active(space.random_decisions(rng))
        xi = torch.rand(1, 3, arch.imgsz, arch.imgsz)
        with torch.no_grad():
            assert (net(xi)[0] - net.extract().eval()(xi)[0]).abs().max() <= 1e-5
    # the order travels with the weights, and files from before channel sorting still load
    net.set_active(narrow)
    torch.save(supernet_document(net), tmp_path / "sorted.pt")
    old = supernet_document(net)
    old["state_dict"] = {k: v for k, v in old["state_dict"].items() if not k.endswith(".order")}
    torch.save(old, tmp_path / "unsorted.pt")
    with torch.no_grad():
        again = load_supernet(tmp_path / "sorted.pt").eval()
        again.set_active(narrow)
        assert torch.equal(again(x)[0], net(x)[0])
        unsorted = load_supernet(tmp_path / "unsorted.pt").eval()
        unsorted.set_active(narrow)
        assert torch.allclose(unsorted(x)[0], y_narrow, rtol=1e-4, atol=1e-3)


def test_sorted_batchnorm_updates_the_active_channels_statistics(space):
    torch.manual_seed(0)
    net = Supernet(space, nc=NC)
    randomize(net, seed=4)
    net.set_active(space.smallest_decisions())
    net.sort_channels()
    bn = _narrow_conv(net).bn
    before = bn.running_mean.clone()
    net.train()
    net(torch.rand(2, 3, 64, 64))
    moved = (bn.running_mean != before).nonzero().flatten()
    assert set(moved.tolist()) == set(bn.idx.tolist())  # written back where the gathered copy was, nowhere else


def test_sorting_inside_a_kept_architecture_leaves_its_function_and_other_filters(space):
    from nas.supernet import DynConv, DynEElan, channel_importance

    torch.manual_seed(0)
    net = Supernet(space, nc=NC).eval()
    randomize(net, seed=5)
    tied = {id(b.cv3) for m in net.modules() if isinstance(m, DynEElan) for b in m.branches}
    keep = space.random_decisions(random.Random(7))
    net.set_active(keep)
    x = torch.rand(2, 3, 64, 64)
    ran: set[int] = set()
    hooks = [c.register_forward_hook(lambda m, a, o: ran.add(id(m))) for c in net.modules() if isinstance(c, DynConv)]
    with torch.no_grad():
        y_keep = net(x)[0]
    for h in hooks:
        h.remove()
    widths = {id(c): c.conv.active_out for c in net.modules() if isinstance(c, DynConv) and id(c) in ran}
    before = {id(c): c.order.clone() for c in net.modules() if isinstance(c, DynConv)}
    net.set_active(space.smallest_decisions())
    assert net.sort_channels(keep=keep) > 0
    assert net.active_arch == space.build_arch(space.smallest_decisions(), nc=NC)  # the active path is restored
    for c in net.modules():
        if not isinstance(c, DynConv):
            continue
        w, old = widths.get(id(c), 0), before[id(c)]
        if w == 0:
            assert torch.equal(c.order, old)  # not run by `keep`: untouched
            continue
        assert set(c.order[:w].tolist()) == set(old[:w].tolist()) and torch.equal(c.order[w:], old[w:])
        if id(c) in tied:
            continue  # ranked by the branches' summed importance (the E-ELAN case of the test above)
        gamma = channel_importance(c)[c.order[:w]]
        assert torch.all(gamma[:-1] >= gamma[1:])  # strongest first, inside the kept filters
    net.set_active(keep)
    with torch.no_grad():
        assert torch.allclose(net(x)[0], y_keep, rtol=1e-4, atol=1e-3)


def test_sorting_inside_a_shallow_keep_leaves_the_chain_past_its_depth(space):
    from nas.supernet import DynConv

    torch.manual_seed(0)
    net = Supernet(space, nc=NC).eval()
    randomize(net, seed=3)
    largest = space.largest_decisions()
    keep = {k: (min(space.decisions[k].choices) if k.endswith(".depth") else v) for k, v in largest.items()}
    net.set_active(keep)
    ran: set[int] = set()
    hooks = [c.register_forward_hook(lambda m, a, o: ran.add(id(m))) for c in net.modules() if isinstance(c, DynConv)]
    with torch.no_grad():
        net(torch.rand(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    net.set_active(largest)  # every chain conv configured at its full width, as after a largest's step
    before = {id(c): c.order.clone() for c in net.modules() if isinstance(c, DynConv)}
    assert net.sort_channels(keep=keep) > 0
    idle = [c for c in net.modules() if isinstance(c, DynConv) and id(c) not in ran]
    assert idle and all(torch.equal(c.order, before[id(c)]) for c in idle)  # `keep` never runs them


def test_an_ema_copy_follows_the_sorted_order(space):
    from trainer.ema import ModelEMA

    torch.manual_seed(0)
    net = Supernet(space, nc=NC).eval()
    randomize(net, seed=6)
    narrow = space.smallest_decisions()
    net.set_active(narrow)
    ema = ModelEMA(net)
    ema.ema.set_active(narrow)  # the copy has read its (initial) order once
    assert net.sort_channels() > 0
    ema.update(net)  # copies the order through `.data`, as every EMA step does
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ema.ema.eval().set_active(narrow)
        assert torch.allclose(ema.ema(x)[0], net(x)[0], rtol=1e-4, atol=1e-3)
