"""prune_detector: MACs / latency targets, tied widths, arch.yaml rewrite, exact reload, ONNX export, NNI masks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.export import export_detector
from compress.prune import ConvMacs, WidthSpace, conv_macs, prune_detector
from search_spaces import load_model, save_model
from search_spaces.blocks import ElanBlock, GhostConv, RepConv
from search_spaces.errors import ConfigError
from search_spaces.stats import count_macs

from . import AUX, DECOUPLED, MIXED, build, randomize


def _same_outputs(a: nn.Module, b: nn.Module, imgsz: int) -> bool:
    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x)[0], b.eval()(x)[0])


def _reload(det: nn.Module, tmp_path) -> nn.Module:
    save_model(det, tmp_path / "pruned")
    return load_model(tmp_path / "pruned")


def test_yolov7_tiny_half_macs_reloads_and_exports(tmp_path):
    det = load_model("yolov7-tiny")
    randomize(det)
    pruned, report = prune_detector(det, 0.5, imgsz=128)
    ratio = report.details["macs_ratio"]
    assert 0.45 <= ratio <= 0.5  # fvcore MACs at or under the target, and not far under
    assert report.details["target_met"] and ratio == round(count_macs(pruned, 128) / count_macs(det, 128), 4)
    assert report.gflops_after <= 0.5 * report.gflops_before * 1.001
    assert report.params_after < report.params_before and report.changes
    assert pruned.arch.to_dict() != det.arch.to_dict()
    # the detection output convs keep their outputs (the same anchors x (5 + nc)), their inputs shrink
    for old, new in zip(det.head.m, pruned.head.m):
        assert new.out_channels == old.out_channels and new.in_channels < old.in_channels
    assert [ia.implicit.shape[1] for ia in pruned.head.ia] == [m.in_channels for m in pruned.head.m]
    again = _reload(pruned, tmp_path)
    assert (tmp_path / "pruned" / "arch.yaml").read_text() == pruned.arch.to_yaml()
    assert _same_outputs(again, pruned, 96)
    assert export_detector(again, tmp_path / "p.onnx", imgsz=96).max_abs_diff <= 1e-3


def test_mixed_blocks_keep_tied_widths_and_reload(tmp_path):
    det = build(MIXED)
    space = WidthSpace(copy.deepcopy(det))
    frozen = {k for c in space.clusters if c.frozen for k in c.keys}
    assert (9, "width") in frozen and (7, "out") in frozen  # ghost chain, grouped conv
    pruned, report = prune_detector(det, 0.5, round_to=8)
    assert report.details["macs_ratio"] <= 0.5
    layers, old = pruned.layers, det.layers
    assert isinstance(layers[9].m[0], GhostConv) and layers[9].m[0].out_channels == old[9].m[0].out_channels
    assert layers[7].conv.out_channels == old[7].conv.out_channels
    # identity RepConvs keep their identity branch (pruned in step with their input)
    assert isinstance(layers[4], RepConv) and layers[4].rbr_identity is not None
    n4 = layers[15]
    assert isinstance(n4, ElanBlock) and n4.cv1.conv.out_channels == n4.cv2.conv.out_channels
    assert len({m.conv.out_channels for m in n4.m}) == 1
    changed = [v for new, old in zip(pruned.arch.layers, det.arch.layers) for k, v in new.args.items()
               if v != old.args.get(k)]
    assert changed and all(v % 8 == 0 for v in changed)
    again = _reload(pruned, tmp_path)
    assert _same_outputs(again, pruned, 64)
    with torch.no_grad():  # training-form raw outputs too
        x = torch.rand(1, 3, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(again.train()(x), pruned.train()(x)))
    assert export_detector(again, tmp_path / "m.onnx", imgsz=64, fuse=True).max_abs_diff <= 1e-3


@pytest.mark.parametrize("spec", [AUX, DECOUPLED], ids=["iauxdetect", "decoupled"])
def test_aux_and_decoupled_heads(spec, tmp_path):
    det = build(spec)
    pruned, report = prune_detector(det, 0.6, round_to=4)
    assert report.details["macs_ratio"] <= 0.6
    again = _reload(pruned, tmp_path)
    assert _same_outputs(again, pruned, 64)
    if spec is AUX:  # the aux convs lose inputs with the layers they read, keep their outputs
        assert [m.out_channels for m in pruned.head.m2] == [m.out_channels for m in det.head.m2]
        assert sum(m.in_channels for m in pruned.head.m2) < sum(m.in_channels for m in det.head.m2)
        assert len(again.train()(torch.rand(1, 3, 64, 64))) == 4
    else:
        assert pruned.arch.head.hidden < det.arch.head.hidden
        for preds in (pruned.head.cls_preds, pruned.head.reg_preds, pruned.head.obj_preds):
            assert all(p.in_channels == pruned.arch.head.hidden for p in preds)
        assert [p.out_channels for p in pruned.head.cls_preds] == [4, 4]


def test_nni_backend_uses_its_masks(tmp_path):
    from nni.compression.pruning import L1NormPruner

    det = build(MIXED)
    pruned, report = prune_detector(det, 0.5, backend="nni", nni_pruner="l1")
    assert report.details["backend"] == "nni" and report.details["macs_ratio"] <= 0.5
    assert _same_outputs(_reload(pruned, tmp_path), pruned, 64)
    # the first conv kept exactly the channels NNI's L1 mask kept
    w0, w1 = det.layers[1].conv.weight, pruned.layers[1].conv.weight
    n = w0.shape[0] - w1.shape[0]
    work = copy.deepcopy(det)
    _, masks = L1NormPruner(work, [{"op_names": ["layers.1.conv"], "sparse_ratio": n / w0.shape[0]}]).compress()
    kept = (masks["layers.1.conv"]["weight"].reshape(w0.shape[0], -1) != 0).any(1)
    assert torch.equal(w1, w0[kept])


def test_channel_accounting_matches_a_rebuild():
    det = build(MIXED)
    space = WidthSpace(copy.deepcopy(det))
    hw = ConvMacs(det.arch, 64).hw
    for r in (0.2, 0.5, 0.8):
        plan = space.keep_for({i: r for i in space.prunable}, 8)
        assert space.conv_macs(plan, hw) == conv_macs(space.arch_for(plan), 64)


def test_latency_budget_with_a_predictor():
    det = build(AUX)

    def predict_ms(arch):  # any callable works; a latency table's predict in real use
        return conv_macs(arch, 64) / 1e6

    budget = 0.7 * predict_ms(det.arch)
    pruned, report = prune_detector(det, latency_ms=budget, predict_ms=predict_ms, round_to=4)
    assert predict_ms(pruned.arch) <= budget
    assert report.details["predicted_ms_after"] <= budget < report.details["predicted_ms_before"]
    assert report.details["target_met"]


def test_iterative_taylor_with_finetune_and_sensitivity():
    det = build(AUX)
    calls = []

    def finetune(model, epochs):
        calls.append((epochs, model.arch.copy()))
        return model

    def loss_fn(model):
        return sum((r ** 2).mean() for r in model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))))

    pruned, report = prune_detector(det, 0.5, steps=2, finetune=finetune, finetune_epochs=3, importance="taylor",
                                    loss_fn=loss_fn, round_to=4, stage_sensitivity=True)
    assert [c[0] for c in calls] == [3, 3] and len(report.details["steps"]) == 2
    assert calls[1][1].to_dict() == pruned.arch.to_dict()  # the last finetune saw the final architecture
    assert report.details["macs_ratio"] <= 0.5 and report.details["stage_weights"]
    first, second = (s["conv_macs"] for s in report.details["steps"])
    assert second < first


def test_bn_importance_and_bad_arguments():
    det = build(DECOUPLED)
    _, report = prune_detector(det, 0.7, importance="bn", round_to=4)
    assert report.details["macs_ratio"] <= 0.7
    with pytest.raises(ConfigError):
        prune_detector(det)  # no target
    with pytest.raises(ConfigError):
        prune_detector(det, 0.5, latency_ms=3.0, predict_ms=lambda a: 1.0)  # two targets
    with pytest.raises(ConfigError, match="loss_fn"):
        prune_detector(det, 0.5, importance="taylor")
    with pytest.raises(ConfigError, match="predictor"):
        prune_detector(det, latency_ms=3.0)


def test_bn_importance_keeps_the_channels_with_the_largest_bn_scales():
    det = build(MIXED)
    gamma = torch.randperm(32, generator=torch.Generator().manual_seed(0)).float() + 1  # 1..32, shuffled
    with torch.no_grad():
        det.layers[1].bn.weight.copy_(gamma)
    pruned, _ = prune_detector(det, 0.5, importance="bn", round_to=8)
    w0, w1 = det.layers[1].conv.weight, pruned.layers[1].conv.weight
    kept = [i for i in range(w0.shape[0]) if any(torch.equal(w0[i], row) for row in w1)]
    assert len(kept) == w1.shape[0] < w0.shape[0]
    assert sorted(gamma[kept].tolist()) == sorted(gamma.tolist())[-len(kept):]  # the largest |gamma| stay
