"""AutoAnchor (YOLOv7's `check_anchors`): refit an anchor-based head's anchors to a dataset's boxes.

The loss matches a box to an anchor when neither side is more than `anchor_t` (4) times the other's. At a
training size far from the one a model's anchors were made for (YOLOv7's are for 640 px) many boxes match
none. Before training from scratch the best possible recall (BPR: the share of boxes some anchor can match)
is measured; below 0.98 the anchors are refit by k-means on the boxes' sizes, refined by a seeded
genetic search, and kept only if their BPR is higher.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from search_spaces.blocks.heads import yaml_anchors
from search_spaces.model import Detector

logger = logging.getLogger(__name__)

MIN_BPR = 0.98  # YOLOv7 refits below this
MIN_BOX_PX = 2.0  # boxes smaller than this on both sides are left out of the fit (as YOLOv7 does)
MAX_FIT_BOXES = 30_000  # a seeded sample of a larger set is fitted (each generation scores every box)
KMEANS_RESTARTS = 30  # as YOLOv7's kmeans(iter=30)
MAX_BPR_BOXES = 200_000  # and measured (COCO has 860k boxes; the BPR of a sample this size is within 0.002)


@dataclass
class AnchorFit:
    """What `check_anchors` found: the BPR before and after, and whether the head's anchors were replaced."""

    bpr: float
    anchors_per_target: float  # mean number of anchors within anchor_t of a box (YOLOv7's "aat")
    new_bpr: float | None = None
    replaced: bool = False
    anchors: list[list[float]] | None = None  # the head's anchors afterwards, pixels, one list per level

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


def anchor_match(anchors: np.ndarray, wh: np.ndarray, thr: float = 4.0) -> tuple[float, float]:
    """(BPR, anchors per target) of anchors [K, 2] on box sizes [N, 2] (pixels) under the anchor_t rule."""
    x = _ratio(anchors, wh)
    return float((x.max(1) > 1 / thr).mean()), float((x > 1 / thr).sum(1).mean())


def label_sizes(shapes_hw: np.ndarray, labels: Sequence[np.ndarray], imgsz: int,
                rng: np.random.Generator | None = None, jitter: float = 0.1) -> np.ndarray:
    """Box sizes [N, 2] (w, h pixels) at the training size (long side = imgsz), each image scaled by a random
    factor in 1 +- jitter when `rng` is given (the scale augmentation's spread)."""
    shapes_wh = shapes_hw[:, ::-1].astype(np.float64)
    scale = imgsz / shapes_wh.max(1, keepdims=True)
    if rng is not None:
        scale = scale * rng.uniform(1 - jitter, 1 + jitter, size=scale.shape)
    sizes = [lb[:, 3:5] * (s * wh) for s, wh, lb in zip(scale, shapes_wh, labels) if len(lb)]
    return np.concatenate(sizes) if sizes else np.zeros((0, 2))


def kmean_anchors(wh: np.ndarray, n: int, thr: float = 4.0, generations: int = 1000, seed: int = 0) -> np.ndarray:
    """`n` anchors [n, 2] (pixels, ascending area) for box sizes `wh`: k-means, then a seeded genetic search on
    the fitness mean(best ratio, counted where it is within thr)."""
    wh = wh[(wh >= MIN_BOX_PX).any(1)]
    if len(wh) < n:
        raise ValueError(f"{len(wh)} boxes for {n} anchors")
    rng = np.random.default_rng(seed)
    if len(wh) > MAX_FIT_BOXES:
        wh = wh[rng.choice(len(wh), MAX_FIT_BOXES, replace=False)]
    from scipy.cluster.vq import kmeans

    std = wh.std(0)
    std[std == 0] = 1.0
    best = None
    for _ in range(KMEANS_RESTARTS):  # seeded starts (scipy's own seed argument changed name), the best kept
        k, distortion = kmeans(wh / std, wh[rng.choice(len(wh), n, replace=False)] / std)
        if best is None or (len(k), -distortion) > (len(best[0]), -best[1]):
            best = (k, distortion)
    k = best[0] * std
    if len(k) < n:  # k-means merged clusters (many equal sizes): fill with jittered copies
        k = np.concatenate([k, k[rng.integers(len(k), size=n - len(k))] * rng.uniform(0.9, 1.1, (n - len(k), 2))])

    def fitness(anchors: np.ndarray) -> float:
        best = _ratio(anchors, wh).max(1)
        return float((best * (best > 1 / thr)).mean())

    best_f = fitness(k)
    for _ in range(generations):  # mutate ~90% of the values by a few percent; keep improvements
        v = np.ones_like(k)
        while (v == 1).all():
            v = ((rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1).clip(0.3, 3.0)
        cand = (k * v).clip(min=MIN_BOX_PX)
        f = fitness(cand)
        if f > best_f:
            best_f, k = f, cand
    return k[np.argsort(k.prod(1))]


def fit_anchors(anchors: np.ndarray, strides: Sequence[int], shapes_hw: np.ndarray, labels: Sequence[np.ndarray],
                imgsz: int, thr: float = 4.0, seed: int = 0) -> AnchorFit:
    """What AutoAnchor finds for anchors [nl * na, 2] (pixels, level by level) of a head with these strides: their
    BPR on these boxes and, below MIN_BPR, a refit, `replaced` only if its BPR is higher (a pure function)."""
    nl = len(strides)
    rng = np.random.default_rng(seed)
    wh = label_sizes(shapes_hw, labels, imgsz, rng)
    if len(wh) > MAX_BPR_BOXES:
        wh = wh[rng.choice(len(wh), MAX_BPR_BOXES, replace=False)]
    bpr, aat = anchor_match(anchors, wh, thr)
    fit = AnchorFit(bpr=bpr, anchors_per_target=aat, anchors=yaml_anchors(anchors.reshape(nl, -1).tolist()))
    if len(wh) == 0 or bpr >= MIN_BPR:
        return fit
    try:
        new = kmean_anchors(label_sizes(shapes_hw, labels, imgsz), len(anchors), thr, seed=seed)
    except ValueError as e:  # too few boxes to fit anchors to: keep the model's
        logger.warning("autoanchor: kept the anchors (%s)", e)
        return fit
    levels = yaml_anchors(by_stride(new, strides))  # as arch.yaml states them and the other ranks receive them
    fit.new_bpr = anchor_match(np.array(levels, dtype=np.float64).reshape(-1, 2), wh, thr)[0]
    if fit.new_bpr > bpr:
        fit.replaced, fit.anchors = True, levels
    return fit


def check_anchors(det: torch.nn.Module, shapes_hw: np.ndarray, labels: Sequence[np.ndarray], imgsz: int,
                  thr: float = 4.0, seed: int = 0) -> AnchorFit | None:
    """`fit_anchors` for a model's head, its anchors replaced when the refit is better (head buffers and
    `det.arch` change together); None for a model without anchors."""
    if not _anchor_based(det):  # a supernet's heads are the search space's: SupernetTrainer fits those
        return None
    current = np.array(det.head.anchor_sizes(), dtype=np.float64).reshape(-1, 2)
    fit = fit_anchors(current, det.strides, shapes_hw, labels, imgsz, thr, seed)
    if fit.replaced:
        set_anchors(det, np.array(fit.anchors, dtype=np.float64).reshape(-1, 2))
    return fit


def set_anchors(det: Detector, anchors: np.ndarray) -> None:
    """Give `det` these anchors [nl * na, 2] (pixels, ascending area: the smallest go to the finest level)."""
    det.head.set_anchor_sizes(by_stride(anchors, det.strides))
    det.sync_arch_anchors()


def by_stride(anchors: np.ndarray, strides: Sequence[int]) -> list[list[float]]:
    """Anchors [nl * na, 2] (pixels) as one list per level of a head with these strides: by area, the smallest
    to the finest level."""
    nl = len(strides)
    a = anchors[np.argsort(anchors.prod(1))].reshape(nl, -1)
    order = sorted(range(nl), key=lambda i: strides[i])  # levels from the finest stride up
    per_level = np.empty_like(a)
    per_level[order] = a
    return per_level.tolist()


def sync_arch_anchors(det: torch.nn.Module) -> None:
    """`Detector.sync_arch_anchors` for a model that may not be a Detector (a supernet, a QAT graph: nothing)."""
    if isinstance(det, Detector):
        det.sync_arch_anchors()


def _anchor_based(det: torch.nn.Module) -> bool:
    return isinstance(det, Detector) and not det.head.anchor_free


def _ratio(anchors: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """[N, K]: for each box and anchor, the worse of the w and h ratios (min(r, 1/r), 1 = equal)."""
    r = wh[:, None] / anchors[None]
    return np.minimum(r, 1 / r).min(2)


__all__ = ["MIN_BPR", "AnchorFit", "anchor_match", "by_stride", "check_anchors", "fit_anchors", "kmean_anchors",
           "label_sizes", "set_anchors", "sync_arch_anchors"]
