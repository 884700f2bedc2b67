"""Non-maximum suppression inside the exported graph: the ONNX `NonMaxSuppression` operator.

An end-to-end export returns detections, not raw predictions: one `[K, 7]` tensor of
`(image index, x1, y1, x2, y2, score, class)` rows in input pixels, ordered by image, class and
falling score (the order ONNX Runtime's kernel produces). Scores are objectness x class probability, as
in evaluation; NMS runs per class, keeping at most `max_det` boxes per class and image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, nms

from search_spaces.errors import ConfigError
from search_spaces.model import Detector

OUTPUT_COLUMNS = ("image", "x1", "y1", "x2", "y2", "score", "class")


@dataclass(frozen=True)
class NmsSpec:
    """Thresholds of the in-graph NMS (ONNX NonMaxSuppression semantics)."""

    iou: float = 0.45  # a box is suppressed by a higher-scoring box of its class overlapping it by more than this
    conf: float = 0.25  # boxes scoring at or below this are dropped first
    max_det: int = 100  # per class and image

    def __post_init__(self) -> None:
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


class DetectionsOutput(nn.Module):
    """Wraps a Detector so that its output is NMS-filtered detections `[K, 7]` (see OUTPUT_COLUMNS)."""

    def __init__(self, det: Detector, spec: NmsSpec | None = None):
        super().__init__()
        self.det = det
        self.spec = spec or NmsSpec()

    def forward(self, x: Tensor) -> Tensor:
        pred = self.det(x)[0]  # [B, N, 5 + nc] decoded, xywh in input pixels
        boxes = box_convert(pred[..., :4], "cxcywh", "xyxy")
        scores = pred[..., 5:] * pred[..., 4:5]  # [B, N, nc]
        sel = _NonMaxSuppression.apply(
            boxes, scores.transpose(1, 2).contiguous(), torch.tensor([self.spec.max_det], dtype=torch.int64),
            torch.tensor([self.spec.iou], dtype=torch.float32), torch.tensor([self.spec.conf], dtype=torch.float32))
        b, c, i = sel[:, 0], sel[:, 1], sel[:, 2]
        return torch.cat([b[:, None].to(boxes.dtype), boxes[b, i], scores[b, i, c][:, None],
                          c[:, None].to(boxes.dtype)], 1)
