"""Batched inference, NMS and COCO mAP (pycocotools) on a detection dataset."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from search_spaces.modes import temporary_mode

from .metrics import Metrics, coco_map
from .postprocess import non_max_suppression

# loss(raw_preds, targets, imgs_shape) -> (total, [box, obj, cls]): a YoloLoss
LossFn = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Size], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EvalResult:
    """mAP figures plus the speed of the evaluation loop."""

    metrics: Metrics
    images: int
    seconds: float
    loss: tuple[float, float, float] | None = None  # mean validation [box, obj, cls] terms, when a loss was given

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = self.metrics.to_dict()
        d.update(images=self.images, seconds=round(self.seconds, 3), images_per_s=round(self.images_per_s, 2))
        if self.loss is not None:
            d.update(val_box=self.loss[0], val_obj=self.loss[1], val_cls=self.loss[2])
        return d

    @property
    def total_loss(self) -> float | None:
        """Sum of the mean validation loss terms (None without a loss)."""
        return None if self.loss is None else sum(self.loss)


def targets_to_gt(targets: torch.Tensor, batch: int, imgsz: tuple[int, int]) -> list[dict]:
    """Batch targets (img_idx, cls, cx, cy, w, h normalised) -> per-image ground truths in input pixels."""
    h, w = imgsz
    out = []
    for i in range(batch):
        t = targets[targets[:, 0] == i]
        xy, wh = t[:, 2:4] * torch.tensor([w, h]), t[:, 4:6] * torch.tensor([w, h])
        out.append({"boxes": torch.cat([xy - wh / 2, xy + wh / 2], 1).numpy(), "labels": t[:, 1].long().numpy(),
                    "size": (h, w)})
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, nc: int, names: list[str] | None = None,
             conf_thres: float = 0.001, iou_thres: float = 0.65, device: str | torch.device = "cpu",
             half: bool = False, progress: bool = False, max_batches: int | None = None,
             loss_fn: LossFn | None = None) -> EvalResult:
    """COCO mAP@[.5:.95] and mAP50 of `model` on `loader` (boxes compared in letterboxed input pixels), and
    with `loss_fn` the mean loss terms on the head's raw outputs (test.py's validation loss)."""
    preds, gts = [], []
    loss_sum, n_batches = torch.zeros(3), 0
    n_images, t0 = 0, time.perf_counter()
    with temporary_mode(model):
        it = tqdm(loader, desc="val", leave=False, disable=not progress)
        for bi, (imgs, targets, _paths, _shapes) in enumerate(it):
            if max_batches is not None and bi >= max_batches:
                break
            x = imgs.to(device, non_blocking=True).float() / 255.0
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=half and x.is_cuda):
                out = model(x)
            decoded = out[0]
            if loss_fn is not None:
                loss_sum += loss_fn([r.float() for r in out[1]], targets.to(x.device), x.shape)[1].cpu()
                n_batches += 1
            dets = non_max_suppression(decoded.float(), conf_thres, iou_thres)
            for d in dets:
                d = d.cpu()
                preds.append({"boxes": d[:, :4].numpy(), "scores": d[:, 4].numpy(),
                              "labels": d[:, 5].long().numpy()})
            gts.extend(targets_to_gt(targets.cpu(), imgs.shape[0], tuple(imgs.shape[2:])))
            n_images += imgs.shape[0]
    seconds = time.perf_counter() - t0
    mean = (loss_sum / max(n_batches, 1)).tolist()
    loss = (mean[0], mean[1], mean[2]) if n_batches else None
    return EvalResult(coco_map(preds, gts, nc, names), n_images, seconds, loss)
