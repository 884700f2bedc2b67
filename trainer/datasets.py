"""Detection datasets (YOLO directories and list files, COCO JSON), their label cache, and loaders.

Both datasets yield the same item, YOLOv7's format:
`(img uint8 [3, S, S] RGB, targets float32 [n, 6] = (0, cls, cx, cy, w, h) normalized to the
S x S output, path, (orig_hw, (ratio_w, ratio_h), (pad_w, pad_h)))`; `collate_fn` fills column 0
with the image's index in the batch. The shapes entry maps boxes back to the original image
(`augment.unletterbox_boxes`) and is only meaningful without augmentation.

Bad data never crashes a run: a bad image is skipped, a bad label line is dropped, each with one
warning line per file on the "detforge" logger and a summary count; `strict=True` turns the first
problem into a `DataError` instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from search_spaces.errors import ConfigError, DataError, DetforgeError
from search_spaces.io import atomic_path

from .augment import (
    PAD_VALUE,
    AugmentConfig,
    augment_hsv,
    fliplr,
    flipud,
    letterbox,
    mixup,
    mosaic4,
    random_affine,
    resize_long_side,
    xywhn_to_xyxy,
    xyxy_to_xywhn,
)
from .data_config import DataConfig, load_data_config

__all__ = [
    "IMG_FORMATS",
    "CocoDataset",
    "DataConfig",
    "DetectionDataset",
    "EpochDataLoader",
    "Problem",
    "YoloDataset",
    "build_dataloader",
    "collate_fn",
    "dataset_key",
    "img2label_path",
    "list_images",
    "load_data_config",
    "parse_yolo_labels",
    "to_rgb",
    "val_loader",
    "verify_image",
]

logger = logging.getLogger("detforge")

# augmentation settings: an AugmentConfig, or a full training hyp (a dict or `trainer.hyp.Hyp`) whose
# augmentation keys are taken
HypLike = AugmentConfig | Mapping[str, Any] | None

IMG_FORMATS = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".mpo"})
COORD_TOL = 1e-3  # label coordinates this far outside [0, 1] are rounding noise: clipped, not reported
CACHE_VERSION = 1
# what PIL raises on damaged files, beyond OSError: bad headers, short reads, absurd sizes
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class Problem:
    """One bad-data finding: `kind` is "image" (sample skipped), "line" (label dropped),
    "duplicate" (box dropped) or "note" (kept, but worth a warning)."""

    file: str
    where: str | None
    message: str
    kind: str

    def line(self) -> str:
        """`file: where: message` as it is logged."""
        return ": ".join(p for p in (self.file, self.where, self.message) if p)


@dataclass
class _Scan:
    """What scanning a dataset produced (and what the label cache stores)."""

    im_files: list[str]
    shapes: np.ndarray  # [N, 2] original (h, w) after EXIF rotation
    labels: list[np.ndarray]  # per image [n, 5] = cls cx cy w h, normalized to the original image
    ids: np.ndarray  # [N] int64: index into the source list (YOLO) or COCO image id
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerError:
    """A detforge error raised in a loader worker, carried back as data with its file and field."""

    # Torch re-raises a worker's exception as type(e)(traceback text), which loses `path` and `field` and
    # makes the one-line error a traceback; carried as a batch, the main process raises the original.
    kind: type[DetforgeError]
    message: str
    path: str | None
    field: str | None

    @classmethod
    def of(cls, e: DetforgeError) -> WorkerError:
        """The record of `e`."""
        return cls(type(e), e.message, e.path, e.field)

    def error(self) -> DetforgeError:
        """The error as it was raised in the worker."""
        return self.kind(self.message, path=self.path, field=self.field)


class _BadImage(Exception):
    pass


# ----------------------------------------------------------------------------------------------- files


def img2label_path(im_file: str | Path) -> Path:
    """The YOLO label file of an image: the last `images` path component becomes `labels`, suffix `.txt`."""
    p = Path(im_file)
    parts = list(p.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a directory (recursive), a list file (one path per line, relative to it), or several."""
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise DataError("no image source given")
    out: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            out += sorted(p for p in src.rglob("*") if p.suffix.lower() in IMG_FORMATS and p.is_file())
        elif src.is_file() and src.suffix.lower() in IMG_FORMATS:
            out.append(src)
        elif src.is_file():
            try:
                lines = src.read_text().splitlines()
            except (UnicodeDecodeError, OSError) as e:
                raise DataError(f"cannot read image list ({e})", path=src) from None
            for line in lines:
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    out.append(p if p.is_absolute() else (src.parent / p))
        else:
            raise DataError("image directory or list file not found", path=src)
    if not out:
        raise DataError(f"no images found (looked for {', '.join(sorted(IMG_FORMATS))})", path=sources[0])
    return out


def verify_image(path: str | Path) -> tuple[int, int]:
    """Check an image file decodes; return its (h, w) after EXIF rotation. Raises `_BadImage`."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise _BadImage("image file not found") from None
    except OSError as e:
        raise _BadImage(f"cannot read image ({e.strerror})") from None
    if size == 0:
        raise _BadImage("empty image file (0 bytes)")
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            im.verify()  # structure and checksums (PNG CRCs); cheap, no pixel decode; must come first
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                complete = f.read() == b"\xff\xd9"
        else:
            complete = fmt == "PNG"  # verify() already read every PNG chunk
        with Image.open(path) as im:  # verify() leaves the file unusable, so reopen
            orientation = im.getexif().get(0x0112, 1)
            if not complete:  # no end marker (or a format verify() cannot vouch for): decode to be sure
                im.load()
    except UnidentifiedImageError:
        raise _BadImage("not a readable image") from None
    except IMAGE_ERRORS as e:
        raise _BadImage(f"corrupt or truncated image ({e})") from None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if w < 2 or h < 2:
        raise _BadImage(f"image too small ({w}x{h})")
    return h, w


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto grey, 16-bit scaled down (not an error)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float32)
        if arr.max() > 255:  # 16-bit data; scaling keeps contrast instead of saturating at 255
            arr = arr / 257.0
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (PAD_VALUE,) * 3)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")


# ----------------------------------------------------------------------------------------------- labels


def _finalize_boxes(
    entries: list[tuple[str, int, float, float, float, float]],
) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Clip normalized xyxy boxes to the image, drop zero-area and duplicate ones.

    `entries` are (where, cls, x1, y1, x2, y2); returns labels [n, 5] (cls cx cy w h) and
    problems as (where, kind, message).
    """
    rows, problems, seen = [], [], {}
    for where, cls, x1, y1, x2, y2 in entries:
        x1, x2 = min(max(x1, 0.0), 1.0), min(max(x2, 0.0), 1.0)
        y1, y2 = min(max(y1, 0.0), 1.0), min(max(y2, 0.0), 1.0)
        if x2 - x1 <= 1e-6 or y2 - y1 <= 1e-6:
            problems.append((where, "line", "zero-area box (dropped)"))
            continue
        row = (cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        key = tuple(round(v, 6) for v in row)
        if key in seen:
            problems.append((where, "duplicate", f"duplicate of {seen[key]} (dropped)"))
            continue
        seen[key] = where
        rows.append(row)
    return np.array(rows, dtype=np.float32).reshape(-1, 5), problems


def _class_id(v: float, nc: int | None) -> str | None:
    """Why `v` is not a valid class id, or None."""
    if v != int(v):
        return f"class id {v:g} is not an integer"
    if v < 0 or (nc is not None and v >= nc):
        return f"unknown class id {int(v)}" + (f" (nc={nc})" if nc is not None else "")
    return None


def parse_yolo_labels(text: str, nc: int | None = None) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Parse a YOLO label file: `cls cx cy w h` per line (or `cls x1 y1 x2 y2 ...` polygons).

    Returns the valid labels [n, 5] (cls cx cy w h, normalized) and the problems as
    (where, kind, message) with `where` = "line N" (1-based); bad lines are dropped.
    """
    entries, problems = [], []
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        where = f"line {n}"
        if not parts:
            continue
        k = len(parts)
        if k != 5 and (k < 7 or k % 2 == 0):
            problems.append((where, "line", f"expected 5 columns (cls cx cy w h), got {k}"))
            continue
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            bad = next(p for p in parts if not _is_float(p))
            problems.append((where, "line", f"non-numeric value {bad!r}"))
            continue
        if not all(math.isfinite(v) for v in vals):
            problems.append((where, "line", "non-finite value"))
            continue
        why = _class_id(vals[0], nc)
        if why:
            problems.append((where, "line", why))
            continue
        coords = vals[1:]
        if any(v < -COORD_TOL or v > 1 + COORD_TOL for v in coords):
            problems.append((where, "line", f"coordinates outside [0, 1]: {' '.join(parts[1:])}"))
            continue
        if k == 5:
            cx, cy, w, h = coords
            if w < 0 or h < 0:
                problems.append((where, "line", "negative width or height"))
                continue
            entries.append((where, int(vals[0]), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        else:  # a segmentation polygon: its bounding box is the detection label
            xs, ys = coords[0::2], coords[1::2]
            entries.append((where, int(vals[0]), min(xs), min(ys), max(xs), max(ys)))
    labels, more = _finalize_boxes(entries)
    return labels, problems + more


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _stat_key(paths: Iterable[str | Path]) -> str:
    """A hash of file names, sizes and mtimes: any edit, addition or removal changes it."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|-\n".encode())
    return h.hexdigest()


def dataset_key(cfg: DataConfig | str | Path) -> str:
    """A hash of a data.yaml and the names, sizes and mtimes of its train and val image and label files."""
    if not isinstance(cfg, DataConfig):
        cfg = load_data_config(cfg)
    files = [str(cfg.yaml_path)] if cfg.yaml_path else []
    for source in (cfg.train, cfg.val):  # what training and validation read (not the test split)
        if source is not None:
            images = [str(p) for p in list_images(source)]
            files += images + [str(img2label_path(p)) for p in images]
    return _stat_key(files)


# ----------------------------------------------------------------------------------------------- cache


def _save_cache(path: Path, key: str, scan: _Scan) -> None:
    labels = np.concatenate(scan.labels) if scan.labels else np.zeros((0, 5), np.float32)
    arrays = {
        "version": np.array(CACHE_VERSION),
        "key": np.array(key),
        "im_files": np.array(scan.im_files, dtype=str),
        "shapes": scan.shapes.astype(np.int64),
        "counts": np.array([len(x) for x in scan.labels], dtype=np.int64),
        "labels": labels.astype(np.float32),
        "ids": scan.ids.astype(np.int64),
        "p_file": np.array([p.file for p in scan.problems], dtype=str),
        "p_where": np.array([p.where or "" for p in scan.problems], dtype=str),
        "p_message": np.array([p.message for p in scan.problems], dtype=str),
        "p_kind": np.array([p.kind for p in scan.problems], dtype=str),
    }
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:  # a read-only dataset still trains; it is only rescanned next time
        logger.warning("%s: cannot write label cache (%s)", path, e.strerror or e)


def _load_cache(path: Path, key: str) -> _Scan | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["key"]) != key:
                return None
            counts = z["counts"]
            labels = np.split(z["labels"], np.cumsum(counts)[:-1]) if len(counts) else []
            problems = [
                Problem(str(f), str(w) or None, str(m), str(k))
                for f, w, m, k in zip(z["p_file"], z["p_where"], z["p_message"], z["p_kind"])
            ]
            return _Scan([str(f) for f in z["im_files"]], z["shapes"], [x.reshape(-1, 5) for x in labels],
                         z["ids"], problems)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a damaged cache is rebuilt
        logger.debug("%s: ignoring unreadable label cache (%s)", path, e)
        return None


def _cached_scan(cache_path: Path | None, key: str, scan: Callable[[], _Scan]) -> _Scan:
    if cache_path is not None:
        hit = _load_cache(cache_path, key)
        if hit is not None:
            return hit
    result = scan()
    if cache_path is not None:
        _save_cache(cache_path, key, result)
    return result


def _threads() -> int:
    return min(8, (os.cpu_count() or 1) + 2)  # scanning is mostly file I/O, so a few more threads than cores


# ----------------------------------------------------------------------------------------------- datasets


class DetectionDataset(Dataset):
    """Shared item pipeline: load, letterbox or mosaic/affine/HSV/flip augment, emit YOLO targets.

    Subclasses fill `im_files`, `shapes`, `labels` by scanning their source; images are read from
    disk per item (nothing is held in memory but the labels). Augmentation randomness is drawn
    from a generator seeded by (seed, epoch, index), so it does not depend on worker count;
    `EpochDataLoader` advances the epoch.
    """

    def __init__(self, imgsz: int, augment: bool, hyp: HypLike, seed: int, strict: bool):
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 8:
            raise DataError(f"image size must be an integer >= 8, got {imgsz!r}", field="imgsz")
        self.imgsz = imgsz
        self.augment = augment
        if hyp is None:
            hyp = AugmentConfig()
        elif not isinstance(hyp, AugmentConfig):  # a full training hyp (dict, trainer.hyp.Hyp): take its aug keys
            hyp = AugmentConfig.from_mapping(hyp)
        self.hyp = hyp
        self.seed = seed
        self.strict = strict
        self.epoch = 0
        self.names: list[str] = []
        self.im_files: list[str] = []
        self.shapes = np.zeros((0, 2), np.int64)
        self.labels: list[np.ndarray] = []
        self.ids = np.zeros((0,), np.int64)
        self.problems: list[Problem] = []
        self.stats: dict[str, int] = {}
        self._broken: set[int] = set()  # images that failed to load after the scan (this process)
        self.item_shapes: list[tuple[int, int]] | None = None  # per item (h, w) letterbox shape: rect_batches
        self.rect_batch = 0  # the batch size those shapes were made for

    @property
    def nc(self) -> int:
        """Number of classes."""
        return len(self.names)

    def rect_batches(self, batch: int, stride: int, pad: float = 0.5) -> None:
        """YOLOv7's rectangular evaluation: order the items by aspect ratio and letterbox each batch of `batch`
        to its own shape, the smallest multiple of `stride` (plus `pad` of one) holding its images at `imgsz`,
        instead of a square. For a loader in this order (no shuffling, no augmentation)."""
        if self.augment:
            raise ConfigError("rectangular batches are for evaluation: this dataset augments", field="rect")
        if batch < 1:
            raise ConfigError(f"must be >= 1, got {batch}", field="batch")
        self.rect_batch = batch
        ar = self.shapes[:, 0] / self.shapes[:, 1]  # h / w
        order = np.argsort(ar, kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, self.ids, ar = self.shapes[order], self.ids[order], ar[order]
        self._broken = set()  # indices changed; images found broken are found again
        shapes = []
        for b in range(0, len(ar), batch):
            lo, hi = float(ar[b:b + batch].min()), float(ar[b:b + batch].max())
            shapes.append((hi, 1.0) if hi < 1 else (1.0, 1 / lo) if lo > 1 else (1.0, 1.0))
        sides = np.ceil(np.array(shapes) * self.imgsz / stride + pad).astype(int) * stride
        self.item_shapes = [(int(sides[i // batch][0]), int(sides[i // batch][1])) for i in range(len(ar))]

    def merge_classes(self, name: str = "item") -> None:
        """Make every box of class 0, named `name` (single-class training and evaluation)."""
        self.labels = [np.concatenate([np.zeros_like(lb[:, :1]), lb[:, 1:]], 1) for lb in self.labels]
        self.names = [name]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch (called by `EpochDataLoader`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.im_files)

    # -- scanning results ----------------------------------------------------------------------

    def _adopt(self, scan: _Scan, desc: str) -> None:
        """Take a scan's samples; report its problems (one line per file, then a summary) or raise if strict."""
        if self.strict and scan.problems:
            p = scan.problems[0]
            raise DataError(p.message, path=p.file, field=p.where)
        self.im_files, self.shapes, self.labels, self.ids = scan.im_files, scan.shapes, scan.labels, scan.ids
        self.problems = scan.problems
        by_file: dict[str, list[Problem]] = {}
        for p in scan.problems:
            by_file.setdefault(p.file, []).append(p)
        for probs in by_file.values():
            first = probs[0]
            suffix = "; image skipped" if first.kind == "image" else ""
            more = f" (and {len(probs) - 1} more problem{'s' * (len(probs) > 2)} in this file)" if len(probs) > 1 else ""
            logger.warning("%s%s%s", first.line(), suffix, more)
        kinds = [p.kind for p in scan.problems]
        self.stats = {
            "images": len(self.im_files),
            "boxes": int(sum(len(x) for x in self.labels)),
            "backgrounds": int(sum(len(x) == 0 for x in self.labels)),
            "skipped_images": kinds.count("image"),
            "dropped_labels": kinds.count("line"),
            "duplicates": kinds.count("duplicate"),
        }
        s = self.stats
        summary = (f"{desc}: {s['images']} images, {s['boxes']} boxes, {s['backgrounds']} backgrounds; "
                   f"skipped {s['skipped_images']} bad images, dropped {s['dropped_labels']} bad labels "
                   f"and {s['duplicates']} duplicate boxes")
        logger.log(logging.WARNING if scan.problems else logging.INFO, summary)
        if not self.im_files:
            raise DataError("no usable images (every image was bad; see the warnings above)", path=desc)

    # -- items ---------------------------------------------------------------------------------

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Read image `i` as RGB with its long side resized to `imgsz`; returns (img [h, w, 3], orig (h0, w0))."""
        with Image.open(self.im_files[i]) as im:
            w0, h0 = im.size
            r = self.imgsz / max(w0, h0)
            if im.format == "JPEG" and r < 0.5:
                # let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster for large photos
                im.draft("RGB", (math.ceil(w0 * r), math.ceil(h0 * r)))
            orientation = im.getexif().get(0x0112, 1)
            img = to_rgb(ImageOps.exif_transpose(im))
        if orientation in (5, 6, 7, 8):
            w0, h0 = h0, w0
        return np.asarray(resize_long_side(img, self.imgsz)), (h0, w0)

    def _pixel_labels(self, i: int, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
        lb = self.labels[i]
        out = np.zeros((len(lb), 5), np.float32)
        out[:, 0] = lb[:, 0]
        out[:, 1:] = xywhn_to_xyxy(lb[:, 1:], w, h, padw, padh)
        return out

    def _load(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """`load_image`, but a failure marks the image broken (so it is not drawn again) and raises _BadImage."""
        try:
            return self.load_image(i)
        except Exception as e:  # the file broke or vanished after the scan: never crash mid-epoch
            if self.strict:
                raise DataError(f"cannot read image ({e})", path=self.im_files[i]) from e
            self._broken.add(i)
            logger.warning("%s: cannot read image (%s); using other samples instead", self.im_files[i], e)
            raise _BadImage(str(e)) from e

    def _readable(self, i: int) -> int:
        """`i`, or the next index whose image has not failed to load."""
        n = len(self)
        for k in range(n):
            if (i + k) % n not in self._broken:
                return (i + k) % n
        raise DataError("no readable images left; is the dataset still there?", path=self.im_files[i])

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        items = []
        for j in [index, *rng.integers(0, len(self), 3).tolist()]:
            j = self._readable(j)
            img, _ = self._load(j)
            items.append((img, self._pixel_labels(j, img.shape[1], img.shape[0])))
        return mosaic4(items, self.imgsz, rng, self.hyp)

    def _item(self, index: int, shape: tuple[int, int] | None = None):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        hyp, s = self.hyp, shape or self.imgsz
        h0, w0 = (int(v) for v in self.shapes[index])
        if self.augment and hyp.mosaic > 0 and rng.random() < hyp.mosaic:
            img, labels = self._mosaic(index, rng)
            if hyp.mixup > 0 and rng.random() < hyp.mixup:
                img2, labels2 = self._mosaic(int(rng.integers(0, len(self))), rng)
                img, labels = mixup(img, labels, img2, labels2, rng)
            shapes = ((h0, w0), (1.0, 1.0), (0.0, 0.0))
        else:
            img, _ = self._load(index)
            h, w = img.shape[:2]
            img, (rw, rh), pad = letterbox(img, s, scaleup=self.augment)
            labels = self._pixel_labels(index, w * rw, h * rh, *pad)
            shapes = ((h0, w0), (w * rw / w0, h * rh / h0), pad)
            if self.augment:
                img, labels = random_affine(img, labels, rng, degrees=hyp.degrees, translate=hyp.translate,
                                            scale=hyp.scale, shear=hyp.shear, perspective=hyp.perspective)
        if self.augment:
            img = augment_hsv(img, rng, hyp.hsv_h, hyp.hsv_s, hyp.hsv_v)
            if rng.random() < hyp.flipud:
                img, labels = flipud(img, labels)
            if rng.random() < hyp.fliplr:
                img, labels = fliplr(img, labels)
        targets = torch.zeros((len(labels), 6), dtype=torch.float32)
        if len(labels):
            targets[:, 1] = torch.from_numpy(labels[:, 0])
            targets[:, 2:] = torch.from_numpy(xyxy_to_xywhn(labels[:, 1:], img.shape[1], img.shape[0]))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), targets, self.im_files[index], shapes

    def __getitem__(self, index: int):
        """One item (see the module docstring); an image that became unreadable is replaced by the next one."""
        while True:  # terminates: every failure adds an image to `_broken`, and `_readable` raises when none is left
            try:  # a replacement for a broken image takes the batch's shape (rect_batches), so the batch stacks
                return self._item(self._readable(index), None if self.item_shapes is None else self.item_shapes[index])
            except _BadImage:
                continue
            except DetforgeError as e:
                if torch.utils.data.get_worker_info() is None:
                    raise
                return WorkerError.of(e)  # collate_fn passes it on; EpochDataLoader raises it in the main process


class YoloDataset(DetectionDataset):
    """A YOLO-format dataset: images (directory, list file, or several), labels in the sibling `labels` tree."""

    def __init__(
        self,
        img_dir: str | Path | Sequence[str | Path],
        imgsz: int = 640,
        augment: bool = False,
        hyp: HypLike = None,
        cache: bool = True,
        strict: bool = False,
        nc: int | None = None,
        names: Sequence[str] | None = None,
        seed: int = 0,
    ):
        super().__init__(imgsz, augment, hyp, seed, strict)
        if names is not None and nc is not None and len(names) != nc:
            raise DataError(f"nc is {nc} but {len(names)} names are given", field="nc")
        if nc is None and names is not None:
            nc = len(names)
        sources = [img_dir] if isinstance(img_dir, (str, Path)) else list(img_dir)
        im_files = [str(p) for p in list_images(sources)]
        lb_files = [str(img2label_path(p)) for p in im_files]
        key = _stat_key([f"v{CACHE_VERSION} nc={nc}", *im_files, *lb_files])
        cache_path = self._cache_path(Path(sources[0])) if cache else None
        scan = _cached_scan(cache_path, key, lambda: _scan_yolo(im_files, lb_files, nc))
        label_nc = max((int(x[:, 0].max()) + 1 for x in scan.labels if len(x)), default=1)
        self.names = list(names) if names is not None else [str(i) for i in range(nc or label_nc)]
        self._adopt(scan, str(img_dir) if isinstance(img_dir, (str, Path)) else str(sources[0]))

    @staticmethod
    def _cache_path(source: Path) -> Path:
        if source.is_dir():  # images/train -> labels/train.cache
            return img2label_path(source / "x.jpg").parent.with_suffix(".cache")
        return source.with_suffix(".cache")

    @classmethod
    def from_config(
        cls, cfg: DataConfig | str | Path, split: str = "train", imgsz: int = 640, augment: bool | None = None,
        hyp: HypLike = None, **kw
    ) -> YoloDataset:
        """The `split` ("train", "val" or "test") of a data.yaml; augmentation defaults to on for train only."""
        if not isinstance(cfg, DataConfig):
            cfg = load_data_config(cfg)
        source = getattr(cfg, split, None)
        if source is None:
            raise DataError(f"no {split!r} split", path=cfg.yaml_path, field=split)
        augment = split == "train" if augment is None else augment
        if cfg.label_nc is None:
            return cls(source, imgsz=imgsz, augment=augment, hyp=hyp, nc=cfg.nc, names=cfg.names, **kw)
        ds = cls(source, imgsz=imgsz, augment=augment, hyp=hyp, nc=cfg.label_nc, **kw)  # checked as written
        ds.merge_classes(cfg.names[0])
        return ds


def _scan_one_yolo(im_file: str, lb_file: str, nc: int | None):
    try:
        shape = verify_image(im_file)
    except _BadImage as e:
        return None, None, [Problem(im_file, None, str(e), "image")]
    if not os.path.isfile(lb_file):  # no label file is the YOLO convention for a background image
        return shape, np.zeros((0, 5), np.float32), []
    try:
        text = Path(lb_file).read_text()
    except (UnicodeDecodeError, OSError) as e:
        # unknown labels are worse than no sample: training on it would teach false negatives
        why = "label file is not text" if isinstance(e, UnicodeDecodeError) else f"cannot read ({e.strerror})"
        return None, None, [Problem(lb_file, None, why, "image")]
    labels, probs = parse_yolo_labels(text, nc)
    return shape, labels, [Problem(lb_file, w, m, k) for w, k, m in probs]


def _scan_yolo(im_files: list[str], lb_files: list[str], nc: int | None) -> _Scan:
    with ThreadPoolExecutor(_threads()) as pool:
        results = list(pool.map(_scan_one_yolo, im_files, lb_files, [nc] * len(im_files)))
    return _collect(im_files, range(len(im_files)), results)


def _collect(im_files: Sequence[str], ids: Iterable[int], results) -> _Scan:
    files, shapes, labels, kept_ids, problems = [], [], [], [], []
    for f, i, (shape, lb, probs) in zip(im_files, ids, results):
        problems += probs
        if shape is None:
            continue
        files.append(f)
        shapes.append(shape)
        labels.append(lb)
        kept_ids.append(i)
    return _Scan(files, np.array(shapes, np.int64).reshape(-1, 2), labels, np.array(kept_ids, np.int64), problems)


class CocoDataset(DetectionDataset):
    """A COCO instances-JSON dataset; category ids are remapped to 0..nc-1 (`cat_ids[i]` is class i's id)."""

    def __init__(
        self,
        json_path: str | Path,
        img_dir: str | Path,
        imgsz: int = 640,
        augment: bool = False,
        hyp: HypLike = None,
        cache: bool = True,
        strict: bool = False,
        seed: int = 0,
    ):
        super().__init__(imgsz, augment, hyp, seed, strict)
        json_path, img_dir = Path(json_path), Path(img_dir)
        if not img_dir.is_dir():
            raise DataError("image directory not found", path=img_dir)
        images, anns_by_image, cats, problems = _parse_coco(json_path)
        self.cat_ids = [c for c, _ in cats]
        self.cat_map = {c: i for i, c in enumerate(self.cat_ids)}
        self.names = [n for _, n in cats]
        self.json_path = json_path

        im_files = [str(img_dir / im["file_name"]) for im in images]
        key = _stat_key([f"v{CACHE_VERSION} coco", str(json_path), *im_files])
        cache_path = json_path.with_suffix(".cache") if cache else None

        def scan() -> _Scan:
            jobs = [(f, im, anns_by_image.get(im["id"], []), self.cat_map, str(json_path))
                    for f, im in zip(im_files, images)]
            with ThreadPoolExecutor(_threads()) as pool:
                results = list(pool.map(lambda a: _scan_one_coco(*a), jobs))
            out = _collect(im_files, [im["id"] for im in images], results)
            out.problems = problems + out.problems
            return out

        self._adopt(_cached_scan(cache_path, key, scan), str(json_path))

    def merge_classes(self, name: str = "item") -> None:
        """Refused: its evaluation maps classes back to the JSON's categories, which stay apart."""
        raise ConfigError("single-class training reads YOLO-format labels; a COCO JSON keeps its categories",
                          path=self.json_path, field="single_cls")

    @property
    def image_ids(self) -> list[int]:
        """COCO image id of each item (for evaluation against the JSON)."""
        return self.ids.tolist()


def _parse_coco(json_path: Path):
    """Read and check the structure of a COCO JSON; structural errors raise, bad annotations are problems."""
    try:
        data = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise DataError("file not found", path=json_path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid or truncated JSON ({e})", path=json_path) from None
    if not isinstance(data, dict):
        raise DataError("expected a COCO object with images, annotations and categories", path=json_path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError("missing", path=json_path, field=key)
        if not isinstance(data[key], list):
            raise DataError(f"expected a list, got {type(data[key]).__name__}", path=json_path, field=key)

    def need(obj, i: int, section: str, keys: Mapping[str, type | tuple[type, ...]]) -> None:
        if not isinstance(obj, dict):
            raise DataError("expected an object", path=json_path, field=f"{section}[{i}]")
        for k, kind in keys.items():
            if k not in obj:
                raise DataError("missing", path=json_path, field=f"{section}[{i}].{k}")
            if not isinstance(obj[k], kind) or isinstance(obj[k], bool):  # ids index arrays; a path joins a dir
                names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
                raise DataError(f"expected {names}, got {type(obj[k]).__name__} {obj[k]!r:.40}", path=json_path,
                                field=f"{section}[{i}].{k}")

    cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        need(c, i, "categories", {"id": int, "name": (str, int)})
        if c["id"] in cats:
            raise DataError(f"duplicate category id {c['id']}", path=json_path, field=f"categories[{i}].id")
        cats[c["id"]] = str(c["name"])
    if not cats:
        raise DataError("no categories", path=json_path, field="categories")
    images, seen = [], set()
    for i, im in enumerate(data["images"]):
        need(im, i, "images", {"id": int, "file_name": str})
        if im["id"] in seen:
            raise DataError(f"duplicate image id {im['id']}", path=json_path, field=f"images[{i}].id")
        seen.add(im["id"])
        images.append(im)
    anns: dict[int, list[tuple[int, dict]]] = {}
    problems = []
    for j, a in enumerate(data["annotations"]):
        need(a, j, "annotations", {"image_id": object, "category_id": object, "bbox": object})  # bad: problems
        if not isinstance(a["image_id"], int) or a["image_id"] not in seen:  # a list id is not even hashable
            problems.append(Problem(str(json_path), f"annotations[{j}]", f"unknown image_id {a['image_id']!r}",
                                    "line"))
            continue
        anns.setdefault(a["image_id"], []).append((j, a))
    return images, anns, sorted(cats.items()), problems


def _scan_one_coco(im_file: str, im: dict, anns: list[tuple[int, dict]], cat_map: dict[int, int], json_file: str):
    try:
        h, w = verify_image(im_file)
    except _BadImage as e:
        return None, None, [Problem(im_file, None, str(e), "image")]
    problems = []
    jw, jh = im.get("width"), im.get("height")
    if isinstance(jw, (int, float)) and isinstance(jh, (int, float)) and jw > 0 and jh > 0:
        if (jh, jw) != (h, w):  # boxes are in the JSON's frame; normalizing by it survives a resize
            problems.append(Problem(im_file, None, f"size {w}x{h} differs from the JSON's {jw}x{jh}", "note"))
        fw, fh = float(jw), float(jh)
    else:
        fw, fh = float(w), float(h)
    entries = []
    for j, a in anns:
        where = f"annotations[{j}]"
        if a.get("iscrowd", 0):
            continue  # crowd regions are ignored by COCO evaluation and are not trainable boxes
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and
                                                                  not isinstance(v, bool) and math.isfinite(v)
                                                                  for v in box)):
            problems.append(Problem(json_file, where, f"bbox must be 4 numbers [x, y, w, h], got {box!r}", "line"))
            continue
        cat = a["category_id"]
        if cat not in cat_map:
            problems.append(Problem(json_file, where, f"unknown category_id {cat!r}", "line"))
            continue
        x, y, bw, bh = box
        x1, y1, x2, y2 = x / fw, y / fh, (x + bw) / fw, (y + bh) / fh
        if min(x1, y1, x2, y2) < -COORD_TOL or max(x1, y1, x2, y2) > 1 + COORD_TOL:
            problems.append(Problem(json_file, where, f"bbox {box} outside the {fw:g}x{fh:g} image", "line"))
            continue
        entries.append((where, cat_map[cat], x1, y1, x2, y2))
    labels, probs = _finalize_boxes(entries)
    return (h, w), labels, problems + [Problem(json_file, wh, m, k) for wh, k, m in probs]


# ----------------------------------------------------------------------------------------------- loading


def collate_fn(batch):
    """Stack images; concatenate targets with column 0 set to the image's index in the batch (YOLOv7)."""
    failed = next((b for b in batch if isinstance(b, WorkerError)), None)
    if failed is not None:
        return failed
    imgs, targets, paths, shapes = zip(*batch)
    for i, t in enumerate(targets):
        t[:, 0] = i
    return torch.stack(imgs, 0), torch.cat(targets, 0), paths, shapes


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a loader worker from torch's per-worker seed (for third-party randomness)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class EpochDataLoader(DataLoader):
    """A DataLoader whose shuffle order and augmentation depend only on (seed, epoch).

    Each iteration uses the next epoch unless `set_epoch(e)` was called (do that on resume): it
    reseeds the shuffle generator, the dataset's augmentation stream and a `DistributedSampler`.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, **kw):
        self._seed = int(seed)
        self._next_epoch = 0
        gen = torch.Generator()
        gen.manual_seed(self._seed)
        super().__init__(dataset, generator=gen, **kw)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch`."""
        self._next_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        self.generator.manual_seed((self._seed * 1_000_003 + epoch) % 2**63)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return _raising_worker_errors(super().__iter__())


def _raising_worker_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """The batches, raising a worker's detforge error where its batch would be."""
    for batch in batches:
        if isinstance(batch, WorkerError):
            raise batch.error()
        yield batch


def build_dataloader(
    dataset: Dataset,
    batch: int,
    workers: int = 0,
    shuffle: bool = True,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> EpochDataLoader:
    """A seeded loader with `collate_fn`; pass a `DistributedSampler` for DDP (then `shuffle` is its job)."""
    if getattr(dataset, "item_shapes", None) is not None and (shuffle or sampler is not None
                                                              or batch != dataset.rect_batch):
        raise ConfigError(f"rectangular batches were made for batches of {dataset.rect_batch} in order: load them "
                          "so (no shuffling, no sampler)", field="rect")
    return EpochDataLoader(
        dataset,
        seed=seed,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        worker_init_fn=seed_worker,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=False,  # workers must be re-forked each epoch to see the new epoch
    )


def val_loader(cfg: DataConfig | str | Path, imgsz: int, batch: int = 16, workers: int = 0,
               strict: bool = True, rect_stride: int | None = None) -> EpochDataLoader:
    """An evaluation loader over the val split of a data.yaml (no augmentation, fixed order); with `rect_stride`
    (the model's largest stride) each batch is letterboxed to its own rectangle (`rect_batches`)."""
    ds = YoloDataset.from_config(cfg, "val", imgsz=imgsz, strict=strict)
    if rect_stride is not None:
        ds.rect_batches(batch, rect_stride)
    return build_dataloader(ds, batch, workers, shuffle=False)
