"""quantize_onnx: QDQ INT8 that loads in ONNX Runtime, float box decode, a measured sensitivity scan; calibration."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from compress.export import export_detector, ort_session
from compress.quantize import (
    _activation_zero_point_types,
    build_trt_int8_engine,
    calibration_images,
    int32_dequantized,
    quantize_onnx,
)
from search_spaces import load_model
from search_spaces.errors import DataError, DetforgeError

from . import randomize, write_images

IMGSZ = 64


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    det = load_model("yolov7-tiny", form="deploy")
    randomize(det)
    path = tmp_path_factory.mktemp("q") / "tiny.onnx"
    export_detector(det, path, imgsz=IMGSZ, fuse=True)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs") / "images"
    write_images(folder, 6)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def test_calibration_skips_a_truncated_jpeg(tmp_path):
    import io

    from PIL import Image

    folder = tmp_path / "imgs"
    write_images(folder, 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a copy cut short
    calib = calibration_images(folder, IMGSZ, n=10)
    assert len(calib) == 3 and calib.skipped == 1  # it passes PIL's verify(), but cannot be decoded
    assert all(calib[i].shape == (1, 3, IMGSZ, IMGSZ) for i in range(len(calib)))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def test_calibration_images_letterbox_and_skip_bad_files(images, tmp_path):
    calib = calibration_images(images, IMGSZ, n=10)
    assert len(calib) == 6 and calib.skipped == 1
    x = calib[0]
    assert x.shape == (1, 3, IMGSZ, IMGSZ) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.isclose(x, 114 / 255).any()  # letterbox padding
    assert len(calibration_images(images, IMGSZ, n=3)) == 3
    (tmp_path / "data.yaml").write_text(f"path: {images.parent}\ntrain: images\nval: images\nnames: [a, b]\n")
    assert len(calibration_images(tmp_path / "data.yaml", IMGSZ, n=4)) == 4


def test_bad_calibration_data_is_a_data_error(tiny_onnx, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(DataError, match="empty"):
        quantize_onnx(tiny_onnx, out, [])
    with pytest.raises(DataError, match="0..1"):
        quantize_onnx(tiny_onnx, out, [np.full((3, IMGSZ, IMGSZ), 200.0, np.float32)])
    with pytest.raises(DataError, match="shape"):
        quantize_onnx(tiny_onnx, out, [np.zeros((3, 32, 32), np.float32)])
    with pytest.raises(DataError):
        calibration_images(tmp_path / "missing", IMGSZ)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="readable"):
        calibration_images(tmp_path / "junk", IMGSZ)
    assert not out.exists()


def test_qdq_model_loads_keeps_decode_float_and_stays_close(tiny_onnx, images, tmp_path):
    out = tmp_path / "tiny.int8.onnx"
    report = quantize_onnx(tiny_onnx, out, calibration_images(images, IMGSZ), method="entropy")
    q = onnx.load(str(out))
    assert report.qdq_nodes["QuantizeLinear"] > 50 and report.qdq_nodes["DequantizeLinear"] > 50
    sess = ort_session(out)
    y = sess.run(None, {"images": calibration_images(images, IMGSZ)[0]})[0]
    assert y.shape == (1, 3 * sum((IMGSZ // s) ** 2 for s in (8, 16, 32)), 85)
    # the decode after the head convs is float: its nodes survive, none feeds a QuantizeLinear or reads a DQ
    assert report.tail_float and report.excluded_tail
    nodes = {n.name: n for n in q.graph.node}
    prod = _producers(q)
    sigmoids = [nodes[n] for n in report.excluded_tail if nodes[n].op_type in ("Sigmoid", "Pow")]
    assert len(sigmoids) == 6
    assert all(prod[i].op_type != "DequantizeLinear" for n in sigmoids for i in n.input if i in prod)
    err = report.error
    assert err["images"] == 6 and err["score_mae"] < 0.05 and err["box_mae_px"] < 0.05 * IMGSZ
    # and by ORT directly, not only by the report: the INT8 file's outputs track the FP32 file's
    ref_sess, batch = ort_session(tiny_onnx), calibration_images(images, IMGSZ)
    ref = np.concatenate([ref_sess.run(None, {"images": x})[0] for x in batch])
    q8 = np.concatenate([sess.run(None, {"images": x})[0] for x in batch])
    assert np.abs(q8[..., 4:] - ref[..., 4:]).mean() < 0.05 and np.abs(q8[..., :4] - ref[..., :4]).mean() < 0.05 * IMGSZ
    assert np.abs(q8 - ref).max() > 0  # it is quantized: not the FP32 graph under another name
    assert report.step.changes and report.step.params_before == report.step.params_after


def test_sensitivity_scan_measures_and_excludes(tiny_onnx, images, tmp_path):
    fp32 = onnx.load(str(tiny_onnx))
    convs = [n.name for n in fp32.graph.node if n.op_type == "Conv"]
    head, first = [c for c in convs if "/head/" in c][-1], convs[0]
    report = quantize_onnx(tiny_onnx, tmp_path / "s.onnx", calibration_images(images, IMGSZ, n=4),
                           method="minmax", sensitivity_scan=1, scan_images=2, scan_candidates=[first, head])
    assert [e.node for e in report.scan] in ([first, head], [head, first])
    assert report.scan[0].gain >= report.scan[1].gain and report.scan_base_error is not None
    assert report.excluded_sensitive == [e.node for e in report.scan if e.gain > 0][:1]
    if report.excluded_sensitive:  # the excluded conv reads its float weight, not a DequantizeLinear
        q = onnx.load(str(tmp_path / "s.onnx"))
        node = next(n for n in q.graph.node if n.name == report.excluded_sensitive[0])
        assert node.input[1] in {t.name for t in q.graph.initializer}


def test_trt_target_is_symmetric_int8_and_engine_build_needs_tensorrt(tiny_onnx, images, tmp_path):
    out = tmp_path / "trt.onnx"
    report = quantize_onnx(tiny_onnx, out, calibration_images(images, IMGSZ, n=2), method="minmax", target="trt")
    assert report.activation_type == "qint8"
    assert _activation_zero_point_types(onnx.load(str(out))) == {onnx.TensorProto.INT8}
    assert int32_dequantized(onnx.load(str(out))) == []  # biases stay float: TensorRT quantizes them itself
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(DetforgeError, match="TensorRT is not available"):
            build_trt_int8_engine(out, tmp_path / "m.engine")
    with pytest.raises(DetforgeError, match="uint8 activations"):  # ORT's CPU form is refused before building
        build_trt_int8_engine(quantize_onnx(tiny_onnx, tmp_path / "cpu.onnx", calibration_images(images, IMGSZ, n=2),
                                            method="minmax").path, tmp_path / "m.engine")
    # int8 activations but ORT's int32 biases (the CPU target's S8S8 form): TensorRT's parser would refuse it
    s8 = quantize_onnx(tiny_onnx, tmp_path / "s8.onnx", calibration_images(images, IMGSZ, n=2), method="minmax",
                       activation_type="qint8").path
    assert int32_dequantized(onnx.load(s8))
    with pytest.raises(DetforgeError, match="int32"):
        build_trt_int8_engine(s8, tmp_path / "m.engine")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs an NVIDIA GPU and tensorrt (pip install 'detforge[tensorrt]')")
def test_trt_int8_engine_builds_with_a_dynamic_batch_and_runs(tiny_onnx, images, tmp_path):
    import tensorrt as trt

    out = tmp_path / "trt.onnx"
    quantize_onnx(tiny_onnx, out, calibration_images(images, IMGSZ, n=2), method="minmax", target="trt")
    engine = build_trt_int8_engine(out, tmp_path / "m.engine", max_batch=4)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    eng = runtime.deserialize_cuda_engine(engine.read_bytes())
    name = next(eng.get_tensor_name(i) for i in range(eng.num_io_tensors)
                if eng.get_tensor_mode(eng.get_tensor_name(i)) == trt.TensorIOMode.INPUT)
    lo, opt, hi = eng.get_tensor_profile_shape(name, 0)
    assert tuple(lo) == (1, 3, IMGSZ, IMGSZ) and tuple(opt) == tuple(hi) == (4, 3, IMGSZ, IMGSZ)
    # the same QDQ file through the latency backend: an int8 engine that runs
    from latency_tables.backends import TensorRTBackend

    m = TensorRTBackend(precision="int8").measure(out, (3, IMGSZ, IMGSZ), batch=2)
    assert m.median_ms > 0
