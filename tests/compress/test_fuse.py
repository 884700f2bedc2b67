"""fuse_detector: deploy form + Conv/BN + RepConv + implicit folding, exact, with a report."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.fuse import fuse_detector
from search_spaces import load_model
from search_spaces.blocks import RepConv
from search_spaces.errors import DetforgeError

from . import AUX, MIXED, build, randomize

GROUPED = {
    "name": "grouped", "nc": 1, "act": "silu", "imgsz": 64,
    "backbone": [
        {"block": "conv", "out": 32, "k": 3, "s": 2},
        {"block": "repconv", "out": 32, "g": 4},  # identity branch with groups
        {"block": "conv", "out": 48, "k": 3, "s": 2, "g": 8},
        {"name": "g4", "block": "repconv", "out": 64, "g": 2, "s": 2},
    ],
    "head": {"type": "idetect", "from": ["g4"], "anchors": [[10, 13, 16, 30]]},
}


def _assert_fused(fused: nn.Module) -> None:
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.rbr_dense is None for m in fused.modules() if isinstance(m, RepConv))
    assert fused.form == "deploy" and not fused.head.has_aux


def test_fuse_yolov7_tiny_training_form_is_exact():
    det = load_model("yolov7-tiny")
    randomize(det)
    before = copy.deepcopy(det.state_dict())
    fused, report = fuse_detector(det, imgsz=128)
    _assert_fused(fused)
    assert fused.head.ia is None
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())  # input untouched
    assert report.details["max_abs_diff"] <= 1e-3
    assert report.params_after < report.params_before and report.gflops_after <= report.gflops_before
    assert any("Implicit" in c for c in report.changes) and any("BatchNorm" in c for c in report.changes)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(fused(x)[0], det.eval()(x)[0], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("spec,nc", [(GROUPED, 1), (GROUPED, 7), (MIXED, 3), (AUX, 2)])
def test_fuse_exact_for_groups_classes_and_aux(spec, nc):
    det = build({**spec, "nc": nc})
    fused, report = fuse_detector(det, stats=False)
    _assert_fused(fused)
    assert report.details["max_abs_diff"] <= 1e-3 + 1e-4 * report.details["max_abs_output"]
    if spec is AUX:
        assert any("auxiliary" in c for c in report.changes)
    if spec is GROUPED:
        assert any("RepConv" in c for c in report.changes)


def test_fuse_refuses_a_mismatch():
    with pytest.raises(DetforgeError, match="differs"):
        fuse_detector(build(GROUPED), atol=-1.0, stats=False)


def test_fuse_refuses_a_score_error_that_the_box_scale_would_hide(monkeypatch):
    det = load_model("yolov7-tiny", nc=2, form="deploy")
    randomize(det)
    real = type(det).fuse

    def fuse_with_a_slip(self):  # a fusion bug that shifts one class logit of one level
        out = real(self)
        with torch.no_grad():
            self.head.m[0].bias[5] += 1.5
        return out

    monkeypatch.setattr(type(det), "fuse", fuse_with_a_slip)
    with pytest.raises(DetforgeError, match="scores"):
        fuse_detector(det, stats=False)


def test_a_model_of_every_block_family_exports_to_onnx_and_matches(tmp_path):
    from compress.export import export_detector

    det = build(MIXED)  # E-ELAN with groups, Ghost ELAN, reorg, RepConv, sppcspc, sppcsp_tiny, add, grouped conv
    randomize(det)
    report = export_detector(det, tmp_path / "m.onnx", imgsz=128, fuse=True)
    assert report.max_abs_diff <= 1e-3
