"""Quantization-aware finetuning: fake-quantized convs, QDQ export that ONNX Runtime runs like PyTorch, the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.export import ort_session
from compress.qat import FakeQuantConv2d, calibrate, export_qat, prepare_qat, set_observers
from compress.quantize import qdq_counts
from nas.cli import main
from search_spaces import ConfigError, save_model
from trainer.synthetic import generate

from . import MIXED, build


@pytest.fixture(scope="module")
def det():
    return build(MIXED, seed=0).eval()


def _calibrated(det, imgsz: int = 64):
    qat = prepare_qat(det)
    g = torch.Generator().manual_seed(0)
    calibrate(qat, [torch.rand(2, 3, imgsz, imgsz, generator=g) for _ in range(4)])
    set_observers(qat, False)
    return qat.eval()


def test_every_conv_is_fake_quantized_and_head_maps_stay_float(det):
    qat = prepare_qat(det)
    convs = [m for m in qat.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, FakeQuantConv2d) for m in convs)
    head = [m for m in qat.head.modules() if isinstance(m, FakeQuantConv2d)]
    assert head and all(isinstance(m.output_fq, nn.Identity) for m in head)
    assert all(not isinstance(m.output_fq, nn.Identity) for m in convs if m not in head)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qat.modules())  # folded before quantizing
    with pytest.raises(ConfigError, match="no convolution"):
        prepare_qat(det, exclude=[n for n, m in det.named_modules() if isinstance(m, nn.Conv2d)] +
                    [n for n, m in prepare_qat(det).named_modules() if isinstance(m, nn.Conv2d)])


def test_fake_quant_stays_close_to_float(det):
    qat = _calibrated(det)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = det(x)[0], qat(x)[0]
    assert (out[..., 4:] - ref[..., 4:]).abs().max() < 0.05  # scores, scale 1
    assert (out[..., :4] - ref[..., :4]).abs().median() < 1.0  # boxes, pixels


def test_qdq_export_runs_in_onnx_runtime_like_pytorch(det, tmp_path):
    qat = _calibrated(det)
    path = export_qat(qat, tmp_path / "qat.onnx", 64)
    model = onnx.load(str(path))
    counts = qdq_counts(model)
    n_conv = sum(isinstance(m, FakeQuantConv2d) for m in qat.modules())
    assert counts["QuantizeLinear"] >= 2 * n_conv and counts["DequantizeLinear"] >= 2 * n_conv
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = qat(x)[0].numpy()
    out = ort_session(path).run(None, {"images": x.numpy()})[0]
    # integer kernels vs float simulation: at most a quantization step apart in places
    assert np.abs(out[..., 4:] - ref[..., 4:]).max() < 0.05
    assert np.median(np.abs(out[..., :4] - ref[..., :4])) < 0.5


def test_cli_qat_finetunes_and_exports(det, tmp_path, capsys):
    data = generate(tmp_path / "d", train=8, val=4, imgsz=64, classes=3, seed=0)
    model = save_model(det, tmp_path / "m")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "--data", str(data), "--qat-epochs", "1", "--imgsz", "64", "--batch", "4",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "qat" and res["epochs"] == 1 and res["qdq"]["QuantizeLinear"] > 0
    assert (tmp_path / "q_qat" / "last.pt").is_file() and not (tmp_path / "q_qat" / "model").exists()
    sess = ort_session(out)
    y = sess.run(None, {"images": np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)})[0]
    assert y.shape[-1] == 5 + 3 and np.isfinite(y).all()
    assert main(["quantize", str(out), "--data", str(data), "--qat-epochs", "1", "--out",
                 str(tmp_path / "x.onnx")]) == 2
