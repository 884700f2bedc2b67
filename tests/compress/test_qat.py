"""Quantization-aware finetuning: fake-quantized convs, QDQ export that ONNX Runtime runs like PyTorch, the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize

from compress.export import ort_session
from compress.qat import (
    FakeQuantAct,
    FakeQuantConv2d,
    SharedQParams,
    _quantize_output,
    calibrate,
    export_qat,
    merge_duplicate_qdq,
    prepare_qat,
    set_observers,
)
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


def test_every_conv_is_fake_quantized(det):
    qat = prepare_qat(det)
    convs = [m for m in qat.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, FakeQuantConv2d) for m in convs)
    # head maps too, as PTQ's QLinearConv: the decode after them stays float
    assert all(isinstance(m.output_fq, FakeQuantize) for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qat.modules())  # folded before quantizing
    kept = prepare_qat(det, exclude=["layers.1.conv"])
    assert type(kept.layers[1].conv) is nn.Conv2d  # excluded: stays float
    with pytest.raises(ConfigError, match="no convolution"):
        prepare_qat(det, exclude=[n for n, m in prepare_qat(det).named_modules() if isinstance(m, nn.Conv2d)])
    with pytest.raises(ConfigError, match="not a conv") as e:  # an ONNX node name, as PTQ's --exclude takes
        prepare_qat(det, exclude=["/layers.1/conv/Conv"])
    assert e.value.field == "exclude"


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
    capsys.readouterr()
    before = out.read_bytes()
    # the run at this --out resumes only itself: another learning rate is refused, not continued
    assert main(["quantize", str(model), "--data", str(data), "--qat-epochs", "1", "--imgsz", "64", "--batch", "4",
                 "--device", "cpu", "--qat-lr-scale", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qat_lr_scale" in err and "q_qat" in err
    # flags of post-training quantization are refused, not ignored
    assert main(["quantize", str(model), "--data", str(data), "--qat-epochs", "1", "--target", "trt",
                 "--out", str(out)]) == 2
    assert "--target" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_qat_finetunes_at_a_tenth_of_the_runs_lr0(det, tmp_path, monkeypatch):
    from compress import qat
    from trainer.config import TrainConfig

    seen = []

    def stop(trainer):
        seen.append((trainer.hyp.lr0, trainer.hyp.warmup_bias_lr, trainer.cfg.lr0))
        raise KeyboardInterrupt  # the rate it would train at is all this test needs

    monkeypatch.setattr(qat.QatTrainer, "train", stop)
    data = generate(tmp_path / "d", train=8, val=4, imgsz=64, classes=3, seed=0)
    for lr0, expected in ((0.002, 0.0002), (None, 0.001)):  # --lr0, else the hyp's (tiny: 0.01)
        cfg = TrainConfig(model="yolov7-tiny", data=str(data), out=str(tmp_path / f"q{lr0}"), epochs=1, imgsz=64,
                          batch=4, workers=0, device="cpu", progress=False, lr0=lr0)
        with pytest.raises(KeyboardInterrupt):
            qat.qat_finetune(det, cfg, lr_scale=0.1)
        assert seen[-1] == (pytest.approx(expected), pytest.approx(expected), None)  # not scaled, then replaced


def test_each_tensor_is_quantized_once_where_it_is_made(det):
    qat = prepare_qat(det)
    convs = [m for m in qat.modules() if isinstance(m, FakeQuantConv2d)]
    acts = [m for m in qat.modules() if isinstance(m, FakeQuantAct)]
    assert acts and not any(type(m) in (nn.SiLU, nn.LeakyReLU, nn.ReLU) for m in qat.modules()
                            if not isinstance(m, FakeQuantAct) and m not in {a.act for a in acts})
    layers = qat.layers
    assert isinstance(layers[1].conv.input_fq, FakeQuantize)  # reads the reorg's output: nobody quantized it
    assert isinstance(layers[2].cv1.conv.input_fq, nn.Identity)  # reads conv 1's quantized activation
    assert isinstance(layers[3].cv3.conv.input_fq, FakeQuantize)  # reads the ELAN's concat
    assert isinstance(layers[4].rbr_reparam.input_fq, nn.Identity)  # reads the ELAN's last activation
    assert layers[3].cv1.conv.input_fq is layers[3].cv2.conv.input_fq  # both read DownC's concat: one fake-quant
    # a pooled quantized tensor keeps its producer's scale (MP's pool branch reads the RepConv's activation)
    assert isinstance(layers[5].cv1.conv.input_fq, SharedQParams)
    assert layers[5].cv1.conv.input_fq.source is layers[4].act.output_fq
    i = next(i for i, m in enumerate(layers) if type(m).__name__ == "Upsample")
    up = layers[i]  # an upsampled quantized tensor, read by an add: it keeps the conv before it's scale
    assert isinstance(up.output_quant, SharedQParams) and up.output_quant.source is layers[i - 1].act.output_fq
    assert _quantize_output in up._forward_hooks.values()
    own = {id(m.input_fq) for m in convs if isinstance(m.input_fq, FakeQuantize)}
    assert len(own) < sum(isinstance(m.input_fq, FakeQuantize) for m in convs)  # readers of one tensor share
    with pytest.raises(ConfigError, match="already"):
        prepare_qat(qat)


def test_shared_quantizers_survive_ema_copy_and_resume(det):
    from trainer.ema import ModelEMA

    qat = _calibrated(det)
    copy = ModelEMA(qat).ema
    i = next(i for i, m in enumerate(copy.layers) if type(m).__name__ == "Upsample")
    assert copy.layers[i].output_quant.source is copy.layers[i - 1].act.output_fq  # sharing kept in the copy
    assert _quantize_output in copy.layers[i]._forward_hooks.values()
    resumed = prepare_qat(det)  # what a resumed QAT run builds before loading last.pt
    resumed.load_state_dict(qat.state_dict())  # strict: the same keys
    set_observers(resumed, False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(x)[0], qat(x)[0])


def test_qdq_export_fuses_like_ptq_in_onnx_runtime(tmp_path):
    import onnxruntime as ort

    from search_spaces import load_model

    qat = _calibrated(load_model("yolov7-tiny", form="deploy", nc=2).eval())
    path = export_qat(qat, tmp_path / "qat.onnx", 64)
    graph = onnx.load(str(path))
    q_inputs = [n.input[0] for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))  # one Q per tensor: duplicates were merged
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    # every conv, activation, concat and pool runs as an integer kernel; with a fake-quant per conv input,
    # 46 of 55 activations and 19 of 31 concats stayed float
    assert ops.count("QLinearLeakyRelu") == sum(isinstance(m, FakeQuantAct) for m in qat.modules())
    assert ops.count("QLinearConv") == sum(isinstance(m, FakeQuantConv2d) for m in qat.modules())
    assert not {"LeakyRelu", "Conv", "MaxPool"} & set(ops) and ops.count("QuantizeLinear") == 1  # the image
    float_concats = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node
                     if n.op_type == "Concat" and n.name.startswith("/det/layers")]
    assert ops.count("QLinearConcat") > 0 and not float_concats


def test_merge_duplicate_qdq_keeps_the_outputs():
    from onnx import TensorProto, helper

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    zp = helper.make_tensor("z", TensorProto.UINT8, [], [128])
    other = helper.make_tensor("s2", TensorProto.FLOAT, [], [0.1])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q2"]),
             helper.make_node("QuantizeLinear", ["x", "s2", "z"], ["q3"]),  # another scale: kept
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["d2"]),
             helper.make_node("DequantizeLinear", ["q3", "s2", "z"], ["d3"]),
             helper.make_node("Sum", ["d1", "d2", "d3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [scale, zp, other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([-1.0, 0.0, 0.33, 2.0], np.float32)
    before = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    assert merge_duplicate_qdq(model) == 2
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 2
    np.testing.assert_array_equal(ort_session(model.SerializeToString()).run(None, {"x": x})[0], before)
