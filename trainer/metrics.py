"""COCO-style box mAP with pycocotools on in-memory detections and ground truths."""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from search_spaces.errors import ConfigError, DataError


@dataclass
class Metrics:
    """Box detection metrics; per-class lists hold NaN for classes without ground truth."""

    map: float  # AP@[.5:.95], COCO maxDets (default 100)
    map50: float
    map75: float
    per_class: list[float]  # AP@[.5:.95] per class index
    per_class_ap50: list[float]
    names: list[str]
    n_images: int
    n_instances: int  # ground-truth boxes
    # the 12 COCOeval.summarize() numbers (-1: undefined); empty when pycocotools was not run
    stats: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN -> None)."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}


def _json_safe(v: Any) -> Any:
    """Replace NaN floats (possibly inside lists) with None."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _array(x: Any, cols: int | None = None) -> np.ndarray:
    """Tensor / array / list -> float64 numpy (2-D with `cols` columns when given, empty allowed)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(-1, cols) if cols is not None else a.reshape(-1)


def _coco_boxes(boxes: np.ndarray) -> np.ndarray:
    """xyxy -> COCO xywh."""
    return np.concatenate((boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]), axis=1)


def _quiet(verbose: bool) -> contextlib.AbstractContextManager[Any]:
    """Swallow pycocotools' progress prints unless verbose."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def build_coco_dicts(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
                     nc: int, names: Sequence[str] | None = None,
                     category_ids: Sequence[int] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO ground-truth dataset dict and result list (image ids 1..N, class i -> category_ids[i] or i + 1)."""
    if len(predictions) != len(ground_truths):
        raise DataError(f"{len(predictions)} prediction entries for {len(ground_truths)} images")
    names = [str(i) for i in range(nc)] if names is None else [str(n) for n in names]
    cat_ids = list(range(1, nc + 1)) if category_ids is None else [int(c) for c in category_ids]
    if len(names) != nc or len(cat_ids) != nc or len(set(cat_ids)) != nc:
        raise ConfigError(f"need {nc} names and {nc} distinct category ids, got {len(names)} and {len(cat_ids)}")
    images, anns, results = [], [], []
    for idx, (pred, gt) in enumerate(zip(predictions, ground_truths, strict=True)):
        image_id = idx + 1
        try:
            h, w = (int(s) for s in gt["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"image {idx}: ground truth needs 'size' = (height, width)") from exc
        images.append({"id": image_id, "height": h, "width": w})
        g_boxes, g_labels = _array(gt["boxes"], 4), _array(gt["labels"]).astype(np.int64)
        crowd = _array(gt.get("iscrowd", np.zeros(len(g_labels)))).astype(np.int64)
        p_boxes, p_scores = _array(pred["boxes"], 4), _array(pred["scores"])
        p_labels = _array(pred["labels"]).astype(np.int64)
        if not (len(g_boxes) == len(g_labels) == len(crowd)) or not (len(p_boxes) == len(p_scores) == len(p_labels)):
            raise DataError(f"image {idx}: boxes, labels (and scores) lengths differ")
        for labels, what in ((g_labels, "ground-truth"), (p_labels, "predicted")):
            if labels.size and (labels.min() < 0 or labels.max() >= nc):
                raise DataError(f"image {idx}: {what} label outside 0..{nc - 1}")
        for box, label, c in zip(_coco_boxes(g_boxes), g_labels, crowd, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_ids[label],
                         "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(c)})
        for box, score, label in zip(_coco_boxes(p_boxes), p_scores, p_labels, strict=True):
            results.append({"image_id": image_id, "category_id": cat_ids[label], "bbox": box.tolist(),
                            "score": float(score)})
    dataset = {"info": {}, "images": images, "annotations": anns,
               "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, names, strict=True)]}
    return dataset, results


def coco_map(predictions: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]], nc: int,
             names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
             max_dets: int = 100, verbose: bool = False) -> Metrics:
    """COCO mAP of per-image predictions {boxes xyxy, scores, labels} vs ground truths {boxes, labels, size}.

    Boxes are pixels. mAP and mAP50 do not depend on the scale, but COCO's small/medium/large areas assume
    original image coordinates (`evaluate` passes letterboxed input pixels, so its size breakdown is at the
    input scale). Undefined values (no ground truth at all) give mAP 0.0 and NaN per class.
    """
    dataset, results = build_coco_dicts(predictions, ground_truths, nc, names, category_ids)
    cat_ids = [c["id"] for c in dataset["categories"]]
    n_inst = len(dataset["annotations"])
    nan_ap = [math.nan] * nc
    if not results or not n_inst:
        # pycocotools cannot load an empty result list; with nothing found every defined AP is 0.
        has_gt = {a["category_id"] for a in dataset["annotations"]}
        per = [0.0 if c in has_gt else math.nan for c in cat_ids]
        return Metrics(0.0, 0.0, 0.0, per, list(per), [c["name"] for c in dataset["categories"]],
                       len(dataset["images"]), n_inst, [])
    with _quiet(verbose):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = [im["id"] for im in dataset["images"]]
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [T iou thresholds, R recall points, K categories (sorted ids), A areas, M maxDets]
    precision = ev.eval["precision"]
    order = list(ev.params.catIds)
    per, per50 = list(nan_ap), list(nan_ap)
    for label, cid in enumerate(cat_ids):
        p = precision[:, :, order.index(cid), 0, -1]
        if (p > -1).any():
            per[label] = float(p[p > -1].mean())
            p50 = p[0]
            per50[label] = float(p50[p50 > -1].mean())
    stats = [float(s) for s in ev.stats]
    return Metrics(max(stats[0], 0.0), max(stats[1], 0.0), max(stats[2], 0.0), per, per50,
                   [c["name"] for c in dataset["categories"]], len(dataset["images"]), n_inst, stats)
