"""In-graph NMS: the ONNX NonMaxSuppression export agrees with torchvision, by hand and on a whole detector;
the TensorRT EfficientNMS variant's graph, its reference semantics, and (on a GPU with TensorRT) its engine."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from compress.export import ort_session
from compress.graph_nms import (
    EFFICIENT_NMS_CANDIDATES,
    TRT_OUTPUTS,
    NmsSpec,
    reference_efficient_nms,
    reference_nms,
)
from nas.cli import main
from search_spaces import ConfigError, DetforgeError, load_model, save_model

from ..helpers import randomize

# A and B overlap (IoU 81/119 = 0.68), C is apart; D scores exactly the threshold used below
BOXES = torch.tensor([[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]]], dtype=torch.float32)
SCORES = torch.tensor([[[0.9, 0.8, 0.7, 0.5], [0.1, 0.95, 0.2, 0.6]]])  # [B=1, C=2, N=4]


def _onnx_nms(boxes: torch.Tensor, scores: torch.Tensor, max_det: int, iou: float, conf: float) -> np.ndarray:
    """The ONNX Runtime kernel alone, in a one-node graph."""
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "m", "iou", "conf"], ["sel"],
                            center_point_box=0)
    graph = helper.make_graph(
        [node], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, list(boxes.shape)),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, list(scores.shape))],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])],
        [helper.make_tensor("m", TensorProto.INT64, [1], [max_det]),
         helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou]),
         helper.make_tensor("conf", TensorProto.FLOAT, [1], [conf])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(model.SerializeToString(), threads=1)
    return sess.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]


@pytest.mark.parametrize(("max_det", "iou", "conf"), [(10, 0.45, 0.0), (10, 0.7, 0.0), (1, 0.45, 0.0),
                                                      (10, 0.45, 0.5), (10, 0.45, 0.75)])
def test_reference_matches_the_onnx_kernel(max_det, iou, conf):
    ref = reference_nms(BOXES, SCORES, max_det, iou, conf).numpy()
    assert np.array_equal(ref, _onnx_nms(BOXES, SCORES, max_det, iou, conf))


def test_reference_by_hand():
    sel = reference_nms(BOXES, SCORES, 10, 0.45, 0.0).tolist()
    # class 0: A suppresses B; C and D kept; class 1: B first, then D, C (A suppressed by B)
    assert sel == [[0, 0, 0], [0, 0, 2], [0, 0, 3], [0, 1, 1], [0, 1, 3], [0, 1, 2]]
    assert reference_nms(BOXES, SCORES, 10, 0.45, 0.5).tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 1], [0, 1, 3]]


def test_end_to_end_export_matches_pytorch(tmp_path, capsys):
    torch.manual_seed(0)
    det = load_model("yolov7-tiny", form="deploy", nc=3)
    randomize(det)  # spread-out scores: no near-ties that fused and reference outputs could break differently
    model = save_model(det, tmp_path / "m")
    out = tmp_path / "e2e.onnx"
    assert main(["export", str(model), "--imgsz", "64", "--fuse", "--nms", "--nms-conf", "0.0", "--max-det", "5",
                 "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outputs"] == ["K", 7] and rep["nms"] == {"iou": 0.45, "conf": 0.0, "max_det": 5, "op": "onnx"}
    assert rep["nms_agreement"] == 1.0 and 0 < rep["max_abs_output"]
    assert rep["max_abs_diff"] <= 1e-3 * rep["max_abs_output"]
    onnx.checker.check_model(onnx.load(str(out)))
    assert any(n.op_type == "NonMaxSuppression" for n in onnx.load(str(out)).graph.node)
    sess = ort_session(out)
    dets = sess.run(None, {"images": np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)})[0]
    assert dets.shape[1] == 7 and len(dets) > 0
    assert set(np.unique(dets[:, 0])) <= {0.0, 1.0, 2.0} and (dets[:, 5] > 0.0).all()
    assert (dets[:, 3] >= dets[:, 1]).all() and (dets[:, 4] >= dets[:, 2]).all()
    _, counts = np.unique(dets[:, [0, 6]], axis=0, return_counts=True)
    assert counts.max() <= 5
    from compress.onnx_eval import OnnxDetector

    with pytest.raises(DetforgeError, match="without --nms"):  # its 7 columns are no decoded output of 2 classes
        OnnxDetector(out)
    decoded = tmp_path / "decoded.onnx"
    assert main(["export", str(model), "--imgsz", "64", "--out", str(decoded)]) == 0
    assert OnnxDetector(decoded).nc == 3
    capsys.readouterr()
    # an engine cannot bind the ONNX operator's data-dependent output: refused before anything is written
    engine = tmp_path / "e2e.engine"
    assert main(["export", str(model), "--imgsz", "64", "--nms", "--engine", str(engine),
                 "--out", str(tmp_path / "other.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--nms-op trt" in err
    assert not engine.exists() and not (tmp_path / "other.onnx").exists()


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="nms_iou"):
        NmsSpec(iou=0.0)
    with pytest.raises(ConfigError, match="max_det"):
        NmsSpec(max_det=0)

    with pytest.raises(ConfigError, match="nms_op"):
        NmsSpec(op="efficient")


def test_efficient_nms_reference_by_hand_and_against_onnx_semantics():
    num, boxes, scores, classes = reference_efficient_nms(BOXES, SCORES.transpose(1, 2), 4, 0.45, 0.0)
    # class-wise NMS as above, then the 4 best (box, class) pairs of the image: B/1, A/0, C/0, D/1
    assert num.tolist() == [[4]] and classes.tolist() == [[1, 0, 0, 1]]
    assert torch.allclose(scores, torch.tensor([[0.95, 0.9, 0.7, 0.6]]))
    assert torch.equal(boxes[0], BOXES[0, [1, 0, 2, 3]])
    # with room for every box, it keeps exactly the (box, class) pairs ONNX NonMaxSuppression keeps
    for conf in (0.0, 0.55):
        num, boxes, _, classes = reference_efficient_nms(BOXES, SCORES.transpose(1, 2), 100, 0.45, conf)
        k = int(num[0, 0])
        pairs = {(int(c), int(next(i for i in range(4) if torch.equal(BOXES[0, i], b))))
                 for b, c in zip(boxes[0, :k], classes[0, :k])}
        assert pairs == {(c, i) for _, c, i in reference_nms(BOXES, SCORES, 100, 0.45, conf).tolist()}
        assert (boxes[0, k:] == 0).all()  # zero-padded
    # but a score at the threshold stays, as in the plugin (ONNX keeps only scores above it): A's 0.5 for class 0
    num, _, scores, classes = reference_efficient_nms(BOXES, SCORES.transpose(1, 2), 100, 0.45, 0.5)
    k = int(num[0, 0])
    assert (0, 0.5) in {(int(c), round(float(s), 2)) for c, s in zip(classes[0, :k], scores[0, :k])}
    assert not any(float(SCORES[0, c, i]) == 0.5 for _, c, i in reference_nms(BOXES, SCORES, 100, 0.45, 0.5).tolist())


def test_efficient_nms_reference_runs_its_nms_on_the_4096_best_candidates_only():
    # 5000 disjoint boxes, scores falling with the index: NMS removes none, the candidate cap drops the last 904
    n = 5000
    xy = torch.arange(n, dtype=torch.float32)[:, None] * 20
    boxes = torch.cat([xy, xy, xy + 10, xy + 10], 1)[None]
    scores = torch.linspace(0.99, 0.5, n)[None, :, None]
    num, out, _, _ = reference_efficient_nms(boxes, scores, n, 0.45, 0.1)
    assert int(num[0, 0]) == EFFICIENT_NMS_CANDIDATES
    assert torch.equal(out[0, :EFFICIENT_NMS_CANDIDATES], boxes[0, :EFFICIENT_NMS_CANDIDATES])


def _trt_model(tmp_path):
    torch.manual_seed(0)
    det = load_model("yolov7-tiny", form="deploy", nc=3)
    randomize(det)
    return save_model(det, tmp_path / "m")


def test_tensorrt_nms_export_has_the_plugin_node_and_verified_inputs(tmp_path, capsys):
    out = tmp_path / "trt_nms.onnx"
    assert main(["export", str(_trt_model(tmp_path)), "--imgsz", "64", "--fuse", "--nms-op", "trt", "--max-det",
                 "7", "--nms-conf", "0.1", "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outputs"] == list(TRT_OUTPUTS) and rep["nms"]["op"] == "trt"
    assert rep["max_abs_diff"] <= 1e-4 * rep["max_abs_output"]  # ORT vs PyTorch just before the plugin
    model = onnx.load(str(out))
    node = next(n for n in model.graph.node if n.op_type == "EfficientNMS_TRT")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "TRT" and attrs["max_output_boxes"] == 7 and attrs["box_coding"] == 0
    assert attrs["score_activation"] == 0 and attrs["background_class"] == -1 and attrs["plugin_version"] == b"1"
    assert attrs["iou_threshold"] == pytest.approx(0.45) and attrs["score_threshold"] == pytest.approx(0.1)
    assert [o.name for o in model.graph.output] == list(TRT_OUTPUTS)
    dims = {o.name: (o.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in model.graph.output}
    assert dims == {"num_dets": (TensorProto.INT32, ["batch", 1]), "det_boxes": (TensorProto.FLOAT, ["batch", 7, 4]),
                    "det_scores": (TensorProto.FLOAT, ["batch", 7]), "det_classes": (TensorProto.INT32, ["batch", 7])}
    assert list(node.output) == list(TRT_OUTPUTS)  # the plugin's outputs are the graph's
    if importlib.util.find_spec("tensorrt") is None:  # an engine needs TensorRT: one clear line, exit 2
        assert main(["export", str(tmp_path / "m"), "--imgsz", "64", "--out", str(tmp_path / "x.onnx"),
                     "--engine", str(tmp_path / "x.engine")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "TensorRT is not available" in err[0]
        assert not (tmp_path / "x.onnx").exists()  # refused before the export, not after


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs an NVIDIA GPU and tensorrt (pip install 'detforge[tensorrt]')")
@pytest.mark.parametrize("nms_op", [None, "trt"])
def test_tensorrt_engine_matches_pytorch(nms_op, tmp_path, capsys):
    model = _trt_model(tmp_path)
    argv = ["export", str(model), "--imgsz", "64", "--fuse", "--out", str(tmp_path / "m.onnx"),
            "--engine", str(tmp_path / "m.engine"), "--engine-precision", "fp32", "--max-batch", "2", "--json"]
    assert main(argv + (["--nms-op", nms_op, "--nms-conf", "0.05"] if nms_op else [])) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (tmp_path / "m.engine").stat().st_size > 0 and rep["engine_precision"] == "fp32"
    scale = rep["max_abs_output"] if nms_op is None else 64.0  # boxes are in input pixels
    assert rep["engine_max_abs_diff"] <= 1e-3 * scale
    if nms_op:
        assert rep["engine_agreement"] == 1.0


def test_an_nms_export_of_other_weights_is_refused(tmp_path):
    from compress.export import (
        DetectionsOutput,
        export_detector,
        verify_detections,
        verify_nms_export,
        verify_nms_inputs,
    )

    exported, other = (load_model("yolov7-tiny", form="deploy", nc=3) for _ in range(2))
    randomize(exported, seed=0)
    randomize(other, seed=1)
    spec = NmsSpec(conf=0.0, max_det=5)
    onnx_path = export_detector(exported, tmp_path / "e2e.onnx", 64, nms=spec).path
    assert verify_detections(DetectionsOutput(exported.eval(), spec), onnx_path, 64)[2] >= 0.5
    with pytest.raises(DetforgeError, match="detections do not match"):
        verify_detections(DetectionsOutput(other.eval(), spec), onnx_path, 64)
    with pytest.raises(DetforgeError, match="does not match"):
        verify_nms_inputs(other, onnx_path, 64)  # the boxes and scores the ONNX operator takes
    with pytest.raises(DetforgeError, match="does not match"):
        verify_nms_export(DetectionsOutput(other.eval(), spec), onnx_path, 64)  # both checks in one run
    # the same weights with another NMS: the inputs agree, the detections do not
    with pytest.raises(DetforgeError, match="detections do not match"):
        verify_nms_export(DetectionsOutput(exported.eval(), NmsSpec(conf=0.0, max_det=5, iou=0.01)), onnx_path, 64)
    trt_path = export_detector(exported, tmp_path / "trt.onnx", 64, nms=NmsSpec(op="trt", max_det=5)).path
    with pytest.raises(DetforgeError, match="does not match"):
        verify_nms_inputs(other, trt_path, 64)


def test_an_nms_export_with_no_detections_on_the_check_batch_still_compares_its_inputs(tmp_path, monkeypatch):
    from compress import export

    det = load_model("yolov7-tiny", form="deploy", nc=3)
    randomize(det, seed=0)
    spec = NmsSpec(conf=0.999, max_det=5)  # nothing scores that high on random images
    rep = export.export_detector(det, tmp_path / "e2e.onnx", 64, nms=spec)
    assert rep.nms_agreement is None  # no detection on either side: nothing to agree on...
    assert 0 < rep.max_abs_output and rep.max_abs_diff <= 1e-3 * rep.max_abs_output  # ...the NMS inputs compared
    other = load_model("yolov7-tiny", form="deploy", nc=3)
    randomize(other, seed=1)
    with pytest.raises(DetforgeError, match="does not match"):  # other weights: no detection either, inputs differ
        export.verify_nms_export(export.DetectionsOutput(other.eval(), spec), tmp_path / "e2e.onnx", 64)
    # a failed check leaves the file that was there before: the export is written only once verified
    before = (tmp_path / "e2e.onnx").read_bytes()
    monkeypatch.setattr(export, "verify_nms_export", _refuse)
    with pytest.raises(DetforgeError, match="refused"):
        export.export_detector(det, tmp_path / "e2e.onnx", 64, nms=NmsSpec(conf=0.5, max_det=5))
    assert (tmp_path / "e2e.onnx").read_bytes() == before


def _refuse(*args, **kwargs):
    raise DetforgeError("refused by the test")
