"""Detector output -> final detections: confidence filtering and NMS (torchvision). Boxes go back to the image
with `augment.unletterbox_boxes`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert


def non_max_suppression(decoded: Tensor, conf_thres: float = 0.001, iou_thres: float = 0.65, max_det: int = 300,
                        multi_label: bool = True, classes: Sequence[int] | None = None, agnostic: bool = False,
                        max_nms: int = 30000) -> list[Tensor]:
    """Per image `[k, 6]` detections (x1, y1, x2, y2, score = obj * cls, class) from decoded `[B, N, 5 + nc]`."""
    nc = decoded.shape[2] - 5
    multi_label = multi_label and nc > 1  # one class: one label per box anyway
    out: list[Tensor] = []
    for x in decoded:
        x = x[x[:, 4] > conf_thres].float()  # objectness pre-filter, as in the official NMS
        # One class: its score is never trained (class BCE is skipped), so the score is objectness alone.
        scores = x[:, 4:5] if nc == 1 else x[:, 5:] * x[:, 4:5]
        boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            conf = scores[i, j]
        else:
            conf, j = scores.max(dim=1)
            i = (conf > conf_thres).nonzero(as_tuple=True)[0]
            conf, j = conf[i], j[i]
        det = torch.cat((boxes[i], conf[:, None], j[:, None].float()), dim=1)
        if classes is not None:
            det = det[torch.isin(det[:, 5].long(), torch.as_tensor(list(classes), device=det.device))]
        if det.shape[0] > max_nms:  # bound NMS cost on degenerate (untrained) outputs
            det = det[det[:, 4].topk(max_nms).indices]
        groups = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = batched_nms(det[:, :4], det[:, 4], groups, iou_thres)[:max_det]
        out.append(det[keep])
    return out
