"""fuse() and deploy() are exact; every zoo model exports to ONNX matching PyTorch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.export import export_detector
from search_spaces import load_model, save_model
from search_spaces.blocks import RepConv

from ..conftest import ZOO
from ..helpers import randomize


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    diff = (a - b).abs().max().item()
    return diff <= 1e-3 or diff <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("form", ["training", "deploy"])
@pytest.mark.parametrize("name", ZOO)
def test_fuse_is_exact(name, form):
    torch.manual_seed(0)
    det = load_model(name, form=form).eval()
    randomize(det)
    x = torch.rand(1, 3, 256 if det.arch.p6 else 128, 256 if det.arch.p6 else 128)
    with torch.no_grad():
        ref = det(x)[0]
        fused = copy.deepcopy(det).fuse()
        out = fused(x)[0]
    assert _close(out, ref)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(m.rbr_dense is None for m in fused.modules() if isinstance(m, RepConv))
    assert fused.head.ia is None


@pytest.mark.parametrize("name", ["yolov7-tiny", "yolov7", "yolov7-w6"])
def test_deploy_keeps_lead_outputs(name, model_stats_ref):
    torch.manual_seed(0)
    det = load_model(name, form="training").eval()
    randomize(det)
    for p in det.head.parameters():
        if p.shape[0] == 1:  # implicit tensors: make them matter
            p.data += torch.randn_like(p) * 0.3
    dep = det.deploy().eval()
    assert dep.form == "deploy" and not dep.head.has_aux
    assert sum(p.numel() for p in dep.parameters()) == model_stats_ref[f"deploy/{name}"]["params"]
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert _close(dep(x)[0], det(x)[0])


# the large P6 models export in 12-21 s each and add no block type yolov7-w6 and the search spaces' exports do not
# cover (E-ELAN with groups: tests/compress/test_fuse.py), nor does yolov7x (12 s) over yolov7, its narrower
# twin: `make bench` runs them
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("yolov7x", "yolov7-e6", "yolov7-d6",
                                                                                      "yolov7-e6e") else n
                                  for n in ZOO])
def test_every_zoo_model_exports_to_onnx(name, tmp_path):
    det = load_model(name, form="deploy")
    report = export_detector(det, tmp_path / "m.onnx", imgsz=256 if det.arch.p6 else 128, fuse=True)
    assert report.max_abs_diff <= 1e-3


def test_fused_model_saves_and_reloads(tmp_path):
    det = load_model("yolov7", form="deploy").eval()
    det.fuse()
    save_model(det, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(again(x)[0], det(x)[0])


def test_export_verification_fails_on_a_model_that_does_not_match(tmp_path):
    from compress.export import verify_onnx
    from search_spaces.errors import DetforgeError

    det = load_model("yolov7-tiny", form="deploy", nc=3).eval()
    report = export_detector(det, tmp_path / "m.onnx", 64)
    assert report.max_abs_diff < 1e-3  # the export's own check passed
    other = copy.deepcopy(det)
    randomize(other, seed=5)  # other BN statistics: the file no longer matches this model
    with pytest.raises(DetforgeError, match="does not match PyTorch"):
        verify_onnx(other, tmp_path / "m.onnx", 64)


def test_a_half_precision_model_fuses_to_half_precision():
    det = load_model("yolov7", form="training").eval()
    randomize(det, seed=1)
    half = copy.deepcopy(det).half()
    half.fuse()  # Conv+BN, RepConv and implicit layers folded into new convs: they keep the model's dtype
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    det.fuse()
    ref, got = det.state_dict(), half.state_dict()
    assert list(ref) == list(got)
    for name, a in ref.items():
        b = got[name]
        assert a.shape == b.shape and torch.allclose(a.half().float(), b.float(), rtol=1e-2, atol=1e-3), name
