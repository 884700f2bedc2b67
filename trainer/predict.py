"""Inference on image files: letterbox, forward, NMS, boxes back to image pixels, drawn images + JSON."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from search_spaces.errors import DataError
from search_spaces.io import atomic_path, atomic_write_json
from search_spaces.model import Detector

from .augment import letterbox, unletterbox_boxes
from .datasets import IMAGE_ERRORS, list_images, to_rgb
from .postprocess import non_max_suppression

_COLORS = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (132, 56, 255),
           (255, 178, 29), (52, 69, 147), (255, 55, 199), (44, 153, 168)]


@dataclass
class Detection:
    """One box in original image pixels."""

    box: list[float]
    score: float
    cls: int
    name: str


def load_rgb(path: Path) -> np.ndarray:
    """An image file as an HWC uint8 RGB array, upright as its EXIF orientation says (as training reads it)."""
    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(ImageOps.exif_transpose(im)))
    except IMAGE_ERRORS as e:  # what a corrupt or truncated file raises, as the dataset reads it
        raise DataError(f"cannot read image ({e})", path=path) from None


@torch.no_grad()
def detect(model: Detector, img: np.ndarray, imgsz: int, conf_thres: float = 0.25, iou_thres: float = 0.45,
           names: list[str] | None = None) -> list[Detection]:
    """Detections for one RGB image (HWC uint8)."""
    model.eval()
    lb, ratio, pad = letterbox(img, imgsz)  # small images are enlarged, as in training and YOLOv7's detect.py
    x = torch.from_numpy(np.ascontiguousarray(lb.transpose(2, 0, 1))).float()[None] / 255.0
    x = x.to(next(model.parameters()).device)
    det = non_max_suppression(model(x)[0].float(), conf_thres, iou_thres)[0].cpu().numpy()
    boxes = unletterbox_boxes(det[:, :4], ratio, pad, img.shape[:2])
    names = names or [str(i) for i in range(model.nc)]
    return [Detection([round(float(v), 2) for v in b], round(float(d[4]), 4), int(d[5]), names[int(d[5])])
            for b, d in zip(boxes, det)]


def draw(img: np.ndarray, dets: list[Detection]) -> Image.Image:
    """The image with labelled boxes."""
    im = Image.fromarray(img)
    dr = ImageDraw.Draw(im)
    for d in dets:
        color = _COLORS[d.cls % len(_COLORS)]
        dr.rectangle(d.box, outline=color, width=2)
        dr.text((d.box[0] + 2, max(d.box[1] - 11, 0)), f"{d.name} {d.score:.2f}", fill=color)
    return im


def drawn_name(image: Path, root: Path | None) -> Path:
    """Where an image's drawn copy goes under the output directory: its path below `root` (the source directory),
    `.jpg` kept and appended to any other suffix, so `a.jpg`, `a.png` and `sub/a.jpg` do not overwrite each other."""
    rel = image.relative_to(root) if root is not None else Path(image.name)
    return rel if rel.suffix == ".jpg" else rel.with_name(rel.name + ".jpg")


def predict(model: Detector, source: str | Path, out: str | Path, imgsz: int = 640, conf_thres: float = 0.25,
            iou_thres: float = 0.45, names: list[str] | None = None) -> dict[str, list[dict]]:
    """Run on an image or a directory; write drawn images and `detections.json` into `out`."""
    model.check_imgsz(imgsz)
    out, root = Path(out), Path(source) if Path(source).is_dir() else None
    files = list_images(source) if root is not None else [Path(source)]
    if not files:
        raise DataError("no images found", path=source)
    results: dict[str, list[dict]] = {}
    for f in files:
        img = load_rgb(f)
        dets = detect(model, img, imgsz, conf_thres, iou_thres, names)
        results[str(f)] = [d.__dict__ for d in dets]
        with atomic_path(out / drawn_name(f, root)) as tmp:
            draw(img, dets).save(tmp, format="JPEG", quality=90)
    atomic_write_json(out / "detections.json", results)
    return results
