"""Non-maximum suppression inside the exported graph: the ONNX operator or TensorRT's EfficientNMS plugin.

An end-to-end export returns detections, not raw predictions. Scores are objectness x class probability,
as in evaluation, and NMS runs per class. Two operators:

- `op="onnx"` (any runtime): ONNX `NonMaxSuppression`; one `[K, 7]` tensor of
  `(image index, x1, y1, x2, y2, score, class)` rows in input pixels, ordered by image, class and falling
  score (the order ONNX Runtime's kernel produces), at most `max_det` boxes per class and image.
- `op="trt"` (TensorRT engines): the `EfficientNMS_TRT` plugin; fixed-size outputs `num_dets [B, 1]`,
  `det_boxes [B, max_det, 4]` (x1, y1, x2, y2), `det_scores [B, max_det]`, `det_classes [B, max_det]`,
  at most `max_det` boxes per image, by falling score, zero-padded. ONNX Runtime cannot run the plugin.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert, nms

from search_spaces.errors import ConfigError
from search_spaces.model import Detector

OUTPUT_COLUMNS = ("image", "x1", "y1", "x2", "y2", "score", "class")
TRT_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
NMS_OPS = ("onnx", "trt")
# TensorRT's EfficientNMS runs its NMS kernel on the 4096 best-scoring (box, class) pairs of an image
EFFICIENT_NMS_CANDIDATES = 4096


@dataclass(frozen=True)
class NmsSpec:
    """Thresholds of the in-graph NMS (ONNX NonMaxSuppression semantics)."""

    iou: float = 0.45  # a box is suppressed by a higher-scoring box of its class overlapping it by more than this
    conf: float = 0.25  # boxes scoring at or below this are dropped first
    max_det: int = 100  # per class and image (onnx), per image (trt)
    op: str = "onnx"  # onnx: NonMaxSuppression; trt: TensorRT's EfficientNMS_TRT plugin

    def __post_init__(self) -> None:
        if self.op not in NMS_OPS:
            raise ConfigError(f"must be one of {list(NMS_OPS)}, got {self.op!r}", field="nms_op")
        if not 0.0 < self.iou <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.iou}", field="nms_iou")
        if not 0.0 <= self.conf < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.conf}", field="nms_conf")
        if self.max_det < 1:
            raise ConfigError(f"must be >= 1, got {self.max_det}", field="max_det")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def reference_nms(boxes: Tensor, scores: Tensor, max_det: int, iou: float, conf: float) -> Tensor:
    """ONNX NonMaxSuppression computed with torchvision: `[K, 3]` (image, class, box index), int64."""
    # boxes [B, N, 4] xyxy, scores [B, C, N]; the ONNX kernel's output order: image, class, falling score
    rows = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            idx = torch.nonzero(s > conf).flatten()
            if idx.numel() == 0:
                continue
            keep = idx[nms(boxes[b, idx], s[idx], iou)][:max_det]
            rows.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)


class _NonMaxSuppression(torch.autograd.Function):
    """torchvision's NMS when run, the ONNX operator when exported (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_det: Tensor, iou: Tensor, conf: Tensor) -> Tensor:
        return reference_nms(boxes, scores, int(max_det), float(iou), float(conf))

    @staticmethod
    def symbolic(g, boxes, scores, max_det, iou, conf):
        return g.op("NonMaxSuppression", boxes, scores, max_det, iou, conf, center_point_box_i=0)


def reference_efficient_nms(boxes: Tensor, scores: Tensor, max_det: int, iou: float, conf: float
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TensorRT EfficientNMS (class-wise, corner boxes) with torchvision: num_dets, boxes, scores, classes."""
    # boxes [B, N, 4] xyxy, scores [B, N, C]; at most max_det per image by falling score, zero-padded. As the
    # plugin does, scores at the threshold stay and only the EFFICIENT_NMS_CANDIDATES best go into the NMS.
    bsz = scores.shape[0]
    num = torch.zeros((bsz, 1), dtype=torch.int32, device=boxes.device)
    out_boxes = boxes.new_zeros((bsz, max_det, 4))
    out_scores = scores.new_zeros((bsz, max_det))
    out_classes = torch.zeros((bsz, max_det), dtype=torch.int32, device=boxes.device)
    for b in range(bsz):
        box_idx, cls = torch.nonzero(scores[b] >= conf, as_tuple=True)
        s = scores[b, box_idx, cls]
        best = torch.argsort(s, descending=True, stable=True)[:EFFICIENT_NMS_CANDIDATES]
        box_idx, cls, s = box_idx[best], cls[best], s[best]
        keep = batched_nms(boxes[b, box_idx], s, cls, iou)[:max_det]  # sorted by falling score
        k = keep.numel()
        num[b, 0] = k
        out_boxes[b, :k] = boxes[b, box_idx[keep]]
        out_scores[b, :k] = s[keep]
        out_classes[b, :k] = cls[keep].to(torch.int32)
    return num, out_boxes, out_scores, out_classes


class _EfficientNms(torch.autograd.Function):
    """torchvision's class-wise NMS when run, TensorRT's EfficientNMS_TRT plugin node when exported."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_det: int, iou: float, conf: float
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return reference_efficient_nms(boxes, scores, max_det, iou, conf)

    @staticmethod
    def symbolic(g, boxes, scores, max_det, iou, conf):
        # box_coding 0: corners; score_activation 0: the scores are already probabilities; no background class
        outs = g.op("TRT::EfficientNMS_TRT", boxes, scores, background_class_i=-1, box_coding_i=0,
                    iou_threshold_f=iou, max_output_boxes_i=max_det, plugin_version_s="1",
                    score_activation_i=0, score_threshold_f=conf, outputs=4)
        # the exporter cannot infer a plugin's outputs: declare them (batch stays dynamic)
        f32, i32 = boxes.type().with_dtype(torch.float32), boxes.type().with_dtype(torch.int32)
        for out, t, sizes in zip(outs, (i32, f32, f32, i32), ([None, 1], [None, max_det, 4], [None, max_det],
                                                              [None, max_det])):
            out.setType(t.with_sizes(sizes))
        return outs


def boxes_and_scores(det: Detector, x: Tensor) -> tuple[Tensor, Tensor]:
    """Decoded corner boxes `[B, N, 4]` and class scores (objectness x class) `[B, N, nc]` of `det` on `x`."""
    pred = det(x)[0]  # [B, N, 5 + nc] decoded, xywh in input pixels
    return box_convert(pred[..., :4], "cxcywh", "xyxy"), pred[..., 5:] * pred[..., 4:5]


class EfficientNmsOutput(nn.Module):
    """Wraps a Detector so that its outputs are TensorRT EfficientNMS's four tensors (see TRT_OUTPUTS)."""

    def __init__(self, det: Detector, spec: NmsSpec | None = None):
        super().__init__()
        self.det = det
        self.spec = spec or NmsSpec(op="trt")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores = boxes_and_scores(self.det, x)
        return _EfficientNms.apply(boxes, scores, self.spec.max_det, self.spec.iou, self.spec.conf)


class DetectionsOutput(nn.Module):
    """Wraps a Detector so that its output is NMS-filtered detections `[K, 7]` (see OUTPUT_COLUMNS)."""

    def __init__(self, det: Detector, spec: NmsSpec | None = None):
        super().__init__()
        self.det = det
        self.spec = spec or NmsSpec()

    def forward(self, x: Tensor) -> Tensor:
        return self.select(*boxes_and_scores(self.det, x))

    def select(self, boxes: Tensor, scores: Tensor) -> Tensor:
        """The detections `[K, 7]` the NMS keeps of corner boxes `[B, N, 4]` and class scores `[B, N, nc]`."""
        sel = _NonMaxSuppression.apply(
            boxes, scores.transpose(1, 2).contiguous(), torch.tensor([self.spec.max_det], dtype=torch.int64),
            torch.tensor([self.spec.iou], dtype=torch.float32), torch.tensor([self.spec.conf], dtype=torch.float32))
        b, c, i = sel[:, 0], sel[:, 1], sel[:, 2]
        return torch.cat([b[:, None].to(boxes.dtype), boxes[b, i], scores[b, i, c][:, None],
                          c[:, None].to(boxes.dtype)], 1)
