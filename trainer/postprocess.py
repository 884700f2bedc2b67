"""Detector output -> final detections: NMS (torchvision) and letterbox -> original image coordinates."""
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


def scale_boxes(boxes: Tensor, img_hw: tuple[int, int], orig_hw: tuple[int, int],
                ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Tensor:
    """Map xyxy boxes from a letterboxed `img_hw` input back to the `orig_hw` image (clipped); returns a new tensor.

    `ratio_pad` = ((gain_h, gain_w), (pad_w, pad_h)) as recorded by the letterbox; by default it is
    recomputed for an aspect-preserving resize with centred padding.
    """
    if ratio_pad is None:
        gain = min(img_hw[0] / orig_hw[0], img_hw[1] / orig_hw[1])
        pad = ((img_hw[1] - orig_hw[1] * gain) / 2, (img_hw[0] - orig_hw[0] * gain) / 2)
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    shift = torch.tensor([pad[0], pad[1], pad[0], pad[1]], dtype=boxes.dtype, device=boxes.device)
    out = (boxes[..., :4] - shift) / gain
    return clip_boxes(out, orig_hw)


def clip_boxes(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes to an image of size (H, W); returns a new tensor."""
    h, w = hw
    return torch.stack((boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                        boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)), dim=-1)
