"""In-graph NMS: the ONNX NonMaxSuppression export agrees with torchvision, by hand and on a whole detector."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from compress.export import ort_session
from compress.graph_nms import NmsSpec, reference_nms
from nas.cli import main
from search_spaces import ConfigError, load_model, save_model

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
    assert rep["outputs"] == ["K", 7] and rep["nms"] == {"iou": 0.45, "conf": 0.0, "max_det": 5}
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


def test_bad_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="nms_iou"):
        NmsSpec(iou=0.0)
    with pytest.raises(ConfigError, match="max_det"):
        NmsSpec(max_det=0)
