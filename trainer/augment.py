"""Detection augmentation (YOLOv5/YOLOv7 style) on numpy images, implemented with PIL and numpy.

Conventions shared by every function here:
- images are `uint8` numpy arrays `[H, W, 3]` in RGB order;
- `labels` are float32 arrays `[n, 5]` = (cls, x1, y1, x2, y2) in **pixels** of that image,
  using continuous coordinates (pixel `i` covers `[i, i + 1)`), so a box `[0, W]` spans the image;
- randomness comes only from the `rng: np.random.Generator` argument, so a caller that seeds the
  generator per sample gets the same augmentation regardless of worker count or order.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from search_spaces.errors import ConfigError

PAD_VALUE = 114  # YOLO's grey; models trained with it see the same padding at inference


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation hyper-parameters, with YOLOv7's names and defaults (hyp.scratch.*.yaml)."""

    hsv_h: float = 0.015  # hue gain (fraction of the hue circle)
    hsv_s: float = 0.7  # saturation gain (fraction)
    hsv_v: float = 0.4  # value gain (fraction)
    degrees: float = 0.0  # rotation (+/- deg)
    translate: float = 0.2  # translation (+/- fraction of the image)
    scale: float = 0.5  # scale gain (+/- fraction)
    shear: float = 0.0  # shear (+/- deg)
    perspective: float = 0.0  # perspective (+/- fraction), 0.0 .. 0.001 is sensible
    flipud: float = 0.0  # probability of a vertical flip
    fliplr: float = 0.5  # probability of a horizontal flip
    mosaic: float = 1.0  # probability of a 4-image mosaic
    mixup: float = 0.0  # probability of mixup (of two mosaics)

    @classmethod
    def from_mapping(cls, hyp: Mapping[str, Any] | Any, path: str | None = None) -> AugmentConfig:
        """Pick the augmentation keys out of a full hyp dict or object with `to_dict()` (other keys ignored)."""
        if not isinstance(hyp, Mapping) and hasattr(hyp, "to_dict"):
            hyp = hyp.to_dict()
        if not isinstance(hyp, Mapping):
            raise ConfigError(f"expected a mapping of hyper-parameters, got {type(hyp).__name__}", path=path)
        values: dict[str, float] = {}
        for f in fields(cls):
            if f.name not in hyp:
                continue
            v = hyp[f.name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"expected a non-negative number, got {v!r}", path=path, field=f.name)
            values[f.name] = float(v)
        return cls(**values)

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config that changes nothing (useful to test the training path without randomness)."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    def to_dict(self) -> dict[str, float]:
        """Plain dict, e.g. to record in a run config."""
        return asdict(self)


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """Resize a PIL image so its longer side is `size` pixels (aspect kept)."""
    w, h = img.size
    r = size / max(w, h)
    if r == 1:
        return img
    new = (max(1, round(w * r)), max(1, round(h * r)))
    return img.resize(new, Image.Resampling.BILINEAR)


def letterbox(
    img: np.ndarray,
    new_shape: int | tuple[int, int],
    color: int = PAD_VALUE,
    scaleup: bool = True,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping aspect and pad to `new_shape` (h, w); returns (img, (ratio_w, ratio_h), (pad_w, pad_h)).

    A box maps into the result as `x * ratio_w + pad_w`, `y * ratio_h + pad_h`; `unletterbox_boxes`
    inverts that.
    """
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    h, w = img.shape[:2]
    r = min(nh / h, nw / w)
    if not scaleup:
        r = min(r, 1.0)
    rw, rh = max(1, round(w * r)), max(1, round(h * r))
    if (rw, rh) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((rw, rh), Image.Resampling.BILINEAR))
    # split the padding in two so the content stays centred, as YOLO's letterbox does
    left, top = (nw - rw) // 2, (nh - rh) // 2
    out = np.full((nh, nw, 3), color, dtype=np.uint8)
    out[top : top + rh, left : left + rw] = img
    return out, (rw / w, rh / h), (float(left), float(top))


def unletterbox_boxes(
    boxes: np.ndarray, ratio: tuple[float, float], pad: tuple[float, float], orig_hw: tuple[int, int]
) -> np.ndarray:
    """Map xyxy pixel boxes from the letterboxed image back to the original image (clipped to it)."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - pad[0]) / ratio[0]
    out[..., [1, 3]] = (out[..., [1, 3]] - pad[1]) / ratio[1]
    out[..., [0, 2]] = out[..., [0, 2]].clip(0, orig_hw[1])
    out[..., [1, 3]] = out[..., [1, 3]].clip(0, orig_hw[0])
    return out


def xywhn_to_xyxy(xywhn: np.ndarray, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
    """Normalized (cx, cy, w, h) -> pixel (x1, y1, x2, y2) in a `w` x `h` image placed at (padw, padh)."""
    x = np.asarray(xywhn, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(x)
    out[:, 0] = w * (x[:, 0] - x[:, 2] / 2) + padw
    out[:, 1] = h * (x[:, 1] - x[:, 3] / 2) + padh
    out[:, 2] = w * (x[:, 0] + x[:, 2] / 2) + padw
    out[:, 3] = h * (x[:, 1] + x[:, 3] / 2) + padh
    return out


def xyxy_to_xywhn(xyxy: np.ndarray, w: float, h: float) -> np.ndarray:
    """Pixel (x1, y1, x2, y2) -> normalized (cx, cy, w, h) of a `w` x `h` image."""
    x = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(x)
    out[:, 0] = (x[:, 0] + x[:, 2]) / 2 / w
    out[:, 1] = (x[:, 1] + x[:, 3]) / 2 / h
    out[:, 2] = (x[:, 2] - x[:, 0]) / w
    out[:, 3] = (x[:, 3] - x[:, 1]) / h
    return out


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2.0,
    ar_thr: float = 20.0,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Keep-mask for boxes after augmentation: `box1` before, `box2` after, both `[4, n]` xyxy.

    A box survives if it is still > `wh_thr` pixels wide and high, keeps > `area_thr` of its
    (scaled) area, and its aspect ratio stays < `ar_thr` (YOLOv5/YOLOv7's rule).
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_affine(
    img: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective; boxes follow and are filtered.

    The output is `(H + 2*border[0], W + 2*border[1])`; a negative border crops, which is how
    `mosaic4` turns its 2x canvas into one image.
    """
    height = img.shape[0] + border[0] * 2
    width = img.shape[1] + border[1] * 2

    C = np.eye(3)  # move the image centre to the origin so rotation/scale act about it
    C[0, 2] = -img.shape[1] / 2
    C[1, 2] = -img.shape[0] / 2
    P = np.eye(3)
    P[2, 0] = rng.uniform(-perspective, perspective)
    P[2, 1] = rng.uniform(-perspective, perspective)
    R = np.eye(3)
    a = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    R[:2, :2] = [[s * math.cos(a), s * math.sin(a)], [-s * math.sin(a), s * math.cos(a)]]
    S = np.eye(3)
    S[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    S[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    T = np.eye(3)
    T[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    T[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    M = T @ S @ R @ P @ C

    if border != (0, 0) or not np.allclose(M, np.eye(3)):
        img = warp(img, M, (width, height), perspective=perspective != 0)

    n = len(labels)
    if n:
        corners = np.ones((n * 4, 3))
        corners[:, :2] = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
        xy = corners @ M.T
        xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
        xy = xy.reshape(n, 8)
        x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
        keep = box_candidates(labels[:, 1:5].T * s, new.T)
        labels = np.concatenate([labels[keep, :1], new[keep]], 1).astype(np.float32)
    return img, labels


def warp(img: np.ndarray, M: np.ndarray, size: tuple[int, int], perspective: bool = False) -> np.ndarray:
    """Apply the forward 3x3 pixel transform `M` to `img`, giving a `size` (w, h) image padded with grey."""
    # PIL wants the inverse map (output pixel -> input pixel), normalised so its last entry is 1
    Minv = np.linalg.inv(M)
    Minv = Minv / Minv[2, 2]
    pil = Image.fromarray(img)
    if perspective:
        out = pil.transform(
            size, Image.Transform.PERSPECTIVE, tuple(Minv.ravel()[:8]), Image.Resampling.BILINEAR,
            fillcolor=(PAD_VALUE,) * 3,
        )
    else:
        out = pil.transform(
            size, Image.Transform.AFFINE, tuple(Minv[:2].ravel()), Image.Resampling.BILINEAR,
            fillcolor=(PAD_VALUE,) * 3,
        )
    return np.asarray(out)


def augment_hsv(
    img: np.ndarray, rng: np.random.Generator, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5
) -> np.ndarray:
    """Random hue/saturation/value gains through lookup tables (returns a new image)."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    x = np.arange(256, dtype=np.float32)
    # PIL's hue spans the full 0..255 byte (OpenCV's spans 0..179), so wrap at 256
    lut = np.stack([(x * r[0]) % 256, np.clip(x * r[1], 0, 255), np.clip(x * r[2], 0, 255)]).astype(np.uint8)
    hsv = np.asarray(Image.fromarray(img).convert("HSV"))
    hsv = np.stack([lut[c][hsv[..., c]] for c in range(3)], -1)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def fliplr(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; boxes follow."""
    w = img.shape[1]
    out = labels.copy()
    out[:, 1], out[:, 3] = w - labels[:, 3], w - labels[:, 1]
    return np.ascontiguousarray(img[:, ::-1]), out


def flipud(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom; boxes follow."""
    h = img.shape[0]
    out = labels.copy()
    out[:, 2], out[:, 4] = h - labels[:, 4], h - labels[:, 2]
    return np.ascontiguousarray(img[::-1]), out


def mosaic4(
    items: Sequence[tuple[np.ndarray, np.ndarray]],
    imgsz: int,
    rng: np.random.Generator,
    hyp: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile 4 (img, labels) around a random centre of a 2*imgsz canvas, then affine-crop to imgsz.

    Each input image should already have its long side resized to `imgsz`.
    """
    if len(items) != 4:
        raise ValueError(f"mosaic4 needs 4 images, got {len(items)}")
    s = imgsz
    b = s // 2  # the affine crop removes `b` pixels per side, so the canvas is s + 2b (2s for even s)
    cs = s + 2 * b
    yc, xc = (int(rng.uniform(s / 2, cs - s / 2)) for _ in range(2))
    canvas = np.full((cs, cs, 3), PAD_VALUE, dtype=np.uint8)
    all_labels = []
    for i, (img, labels) in enumerate(items):
        h, w = img.shape[:2]
        if i == 0:  # top left: its bottom-right corner sits on the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, cs), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(cs, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, cs), min(cs, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        shifted = labels.copy()
        shifted[:, [1, 3]] += x1a - x1b
        shifted[:, [2, 4]] += y1a - y1b
        all_labels.append(shifted)
    labels4 = np.concatenate(all_labels, 0) if all_labels else np.zeros((0, 5), np.float32)
    labels4[:, 1:] = labels4[:, 1:].clip(0, cs)
    labels4 = labels4[(labels4[:, 3] > labels4[:, 1]) & (labels4[:, 4] > labels4[:, 2])]
    return random_affine(
        canvas, labels4, rng, degrees=hyp.degrees, translate=hyp.translate, scale=hyp.scale,
        shear=hyp.shear, perspective=hyp.perspective, border=(-b, -b),
    )


def mixup(
    img1: np.ndarray, labels1: np.ndarray, img2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(8, 8) ratio and keep both label sets (YOLOv7's mixup)."""
    r = rng.beta(8.0, 8.0)
    img = (img1.astype(np.float32) * r + img2.astype(np.float32) * (1 - r)).round().astype(np.uint8)
    return img, np.concatenate([labels1, labels2], 0)
