"""A built-in synthetic detection dataset: shapes on cluttered, textured backgrounds, in YOLO format.

It exists so every stage of detforge (supernet training, search, compression, evaluation) can run
and be tested without downloading anything, on a task that is not trivially solvable:

- up to 10 shape classes (circle, rectangle, triangle, star, ring, cross, ellipse, hexagon,
  crescent, arrow) that differ only by shape: colour and fill are drawn independently of class;
- sizes from ~8 px to half the image, varied aspect and rotation, anti-aliased edges;
- textured backgrounds (multi-octave noise, gradients, stripes, checkers, blurred blobs);
- unlabelled clutter (irregular blobs, lines, arcs, specks) that occludes and is occluded;
- blur, sensor noise and JPEG compression.

Labels are the tight box of each object's *visible* pixels (after occlusion and clipping to the
image); objects with less than 40% of their area visible are not labelled.

Every image is drawn by its own generator seeded from (seed, split, index), so generation is
byte-for-byte deterministic, runs in parallel, and resumes after a kill.
"""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from search_spaces.errors import DataError
from search_spaces.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SHAPES = ("circle", "rectangle", "triangle", "star", "ring", "cross", "ellipse", "hexagon", "crescent", "arrow")
MAX_CLASSES = len(SHAPES)
MIN_VISIBLE = 0.4  # objects occluded by more than 60% are left unlabelled
FORMAT_VERSION = 1  # bump when rendering changes, so old directories are regenerated, not mixed
SPLITS = {"train": 0, "val": 1}
_MANIFEST = ".synth.json"
_SS = 2  # mask supersampling factor: anti-aliased edges look natural and cost little

Polygon = tuple[np.ndarray, bool]  # (points [k, 2] in unit coordinates, True = fill / False = cut out)


def _circle(r: float = 1.0, cx: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


def _regular(k: int, radii: Iterable[float] = (1.0,)) -> np.ndarray:
    radii = list(radii)
    n = k * len(radii)
    t = np.arange(n) * 2 * np.pi / n - np.pi / 2
    r = np.array([radii[i % len(radii)] for i in range(n)])
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape(name: str, rng: np.random.Generator) -> tuple[list[Polygon], float]:
    """Unit-size outline(s) of one class instance, and its aspect ratio (x stretch over y)."""
    if name == "circle":
        return [(_circle(), True)], 1.0
    if name == "rectangle":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), True)], math.exp(rng.uniform(-1.1, 1.1))
    if name == "triangle":
        return [(_regular(3), True)], math.exp(rng.uniform(-0.5, 0.5))
    if name == "star":
        return [(_regular(5, (1.0, rng.uniform(0.38, 0.5))), True)], math.exp(rng.uniform(-0.15, 0.15))
    if name == "ring":
        return [(_circle(), True), (_circle(rng.uniform(0.45, 0.7)), False)], 1.0
    if name == "cross":
        t = rng.uniform(0.22, 0.35)
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
        return [(np.array(pts, float), True)], math.exp(rng.uniform(-0.3, 0.3))
    if name == "ellipse":
        return [(_circle(), True)], rng.uniform(1.7, 3.0)
    if name == "hexagon":
        return [(_regular(6), True)], math.exp(rng.uniform(-0.12, 0.12))
    if name == "crescent":
        return [(_circle(), True), (_circle(rng.uniform(0.8, 0.9), rng.uniform(0.35, 0.55)), False)], 1.0
    if name == "arrow":
        t, h, neck = rng.uniform(0.15, 0.25), rng.uniform(0.45, 0.6), rng.uniform(0.1, 0.35)
        pts = [(-1, -t), (neck, -t), (neck, -h), (1, 0), (neck, h), (neck, t), (-1, t)]
        return [(np.array(pts, float), True)], rng.uniform(1.0, 1.6)
    raise ValueError(name)


def _clutter(rng: np.random.Generator) -> tuple[list[Polygon], float]:
    """An unlabelled distractor: an irregular blob (jagged radii, so it matches no class)."""
    k = int(rng.integers(7, 13))
    t = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(0.25, 1.0, k)
    return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), True)], math.exp(rng.uniform(-0.7, 0.7))


def _place(polys: list[Polygon], size: float, aspect: float, angle: float, cx: float, cy: float):
    """Scale (long side = size), rotate and translate unit polygons; returns pixel polygons."""
    sx, sy = (size / 2, size / 2 / aspect) if aspect >= 1 else (size / 2 * aspect, size / 2)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [((p * [sx, sy]) @ rot.T + [cx, cy], fill) for p, fill in polys]


def _mask(polys: list[tuple[np.ndarray, bool]]) -> tuple[np.ndarray, int, int]:
    """Rasterise pixel polygons into an anti-aliased local mask; returns (mask uint8 [h, w], x0, y0)."""
    allp = np.concatenate([p for p, _ in polys])
    x0, y0 = np.floor(allp.min(0)).astype(int) - 1
    x1, y1 = np.ceil(allp.max(0)).astype(int) + 1
    w, h = int(x1 - x0), int(y1 - y0)
    m = Image.new("L", (w * _SS, h * _SS), 0)
    d = ImageDraw.Draw(m)
    for p, fill in polys:
        d.polygon([tuple(q) for q in ((p - [x0, y0]) * _SS).tolist()], fill=255 if fill else 0)
    m = m.reduce(_SS)
    return np.asarray(m), int(x0), int(y0)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.1, 1.0), rng.uniform(0.15, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255


def _rgb(color: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in color)
    return r, g, b


def _smooth_noise(rng: np.random.Generator, h: int, w: int, channels: int, octaves: Iterable[int]) -> np.ndarray:
    """Multi-octave value noise in ~[-1, 1], `[h, w, channels]` (small random grids upsampled bicubically)."""
    out = np.zeros((h, w, channels), np.float32)
    amp, total = 1.0, 0.0
    for cells in octaves:
        for c in range(channels):
            g = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
            out[..., c] += amp * (np.asarray(Image.fromarray(g).resize((w, h), Image.Resampling.BICUBIC),
                                             np.float32) / 127.5 - 1)
        total += amp
        amp *= 0.5
    return out / total


def _direction(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Coordinate along a random direction, scaled to [0, 1] over the image."""
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = xx * math.cos(a) + yy * math.sin(a)
    return (d - d.min()) / max(float(d.max() - d.min()), 1e-6)


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """A textured background, float32 `[s, s, 3]` in 0..255."""
    kind = rng.choice(["clouds", "gradient", "stripes", "checker", "blobs"], p=[0.3, 0.15, 0.2, 0.1, 0.25])
    c1, c2 = _random_color(rng), _random_color(rng)
    if kind == "clouds":
        n = _smooth_noise(rng, s, s, 3, (3, 6, 12, 24))
        bg = (c1 + c2) / 2 + n * rng.uniform(40, 110)
    elif kind == "gradient":
        t = _direction(rng, s, s)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == "stripes":
        t = _direction(rng, s, s)
        wave = np.sin(2 * np.pi * rng.uniform(2, 14) * t + rng.uniform(0, 6.3))
        wave = np.tanh(wave * rng.uniform(0.5, 6))[..., None] * 0.5 + 0.5  # from soft waves to hard stripes
        bg = c1 * (1 - wave) + c2 * wave
    elif kind == "checker":
        cell = int(rng.integers(max(4, s // 24), max(5, s // 4)))
        yy, xx = np.mgrid[0:s, 0:s]
        t = (((xx // cell) + (yy // cell)) % 2)[..., None].astype(np.float32)
        bg = c1 * (1 - t) + c2 * t
    else:  # blurred blobs: a soft, "out of focus scene" look
        im = Image.new("RGB", (s, s), _rgb(c1))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(4, 14))):
            x, y = rng.uniform(0, s, 2)
            r = rng.uniform(s / 20, s / 4)
            d.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=_rgb(_random_color(rng)))
        bg = np.asarray(im.filter(ImageFilter.GaussianBlur(rng.uniform(s / 40, s / 12))), np.float32)
    if rng.random() < 0.5:  # fine texture on top of any base
        bg = bg + _smooth_noise(rng, s, s, 1, (s // 8, s // 4)) * rng.uniform(5, 30)
    return bg


def _fill(rng: np.random.Generator, h: int, w: int, color: np.ndarray) -> np.ndarray | tuple[int, int, int]:
    """What an object is painted with: a flat colour, a gradient, or a textured colour."""
    kind = rng.random()
    if kind < 0.55:
        return _rgb(color)
    if kind < 0.8:
        t = _direction(rng, h, w)[..., None]
        other = np.clip(color + rng.uniform(-90, 90, 3), 0, 255)
        arr = color * (1 - t) + other * t
    else:
        arr = color + _smooth_noise(rng, h, w, 1, (2, 4, 8)) * rng.uniform(15, 50)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _paste(canvas: Image.Image, owner: np.ndarray, mask: np.ndarray, x0: int, y0: int, fill, oid: int):
    """Paint `fill` through `mask` at (x0, y0); mark covered pixels as owned by `oid`.

    Returns the mask's full area (in-image or not) and its in-image region (x0, y0, x1, y1).
    """
    h, w = mask.shape
    m = Image.fromarray(mask)
    src = fill if isinstance(fill, tuple) else Image.fromarray(fill)
    canvas.paste(src, (x0, y0, x0 + w, y0 + h), m)
    H, W = owner.shape
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    solid = mask > 127
    if ix1 > ix0 and iy1 > iy0:
        sub = solid[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        owner[iy0:iy1, ix0:ix1][sub] = oid
    return int(solid.sum()), (ix0, iy0, ix1, iy1)


def _contrasting_color(rng: np.random.Generator, canvas: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """A random colour, redrawn a few times if it nearly matches the background it lands on."""
    W, H = canvas.size
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
    color = _random_color(rng)
    if x1 <= x0 or y1 <= y0:
        return color
    crop = canvas.crop((x0, y0, x1, y1))
    if min(crop.size) >= 8:
        crop = crop.reduce(4)  # a mean colour needs few pixels
    mean = np.asarray(crop, np.float32).reshape(-1, 3).mean(0)
    for _ in range(4):
        if np.abs(color - mean).sum() > 60:
            break
        color = _random_color(rng)
    return color


def render(seed: int, split: str, index: int, imgsz: int = 320, classes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image; returns (uint8 RGB `[imgsz, imgsz, 3]`, labels float32 `[n, 5]` = cls cx cy w h normalized)."""
    rng = np.random.default_rng([seed, SPLITS[split], index, FORMAT_VERSION])
    s = imgsz
    canvas = Image.fromarray(np.clip(_background(rng, s), 0, 255).astype(np.uint8))
    owner = np.zeros((s, s), np.int16)

    smin, smax = min(8.0, s / 4), max(s / 2, 8.0)
    n_obj = int(rng.integers(0, 13))
    n_clutter = int(rng.integers(0, 9))
    # the drawing order interleaves objects and clutter so each can occlude the other
    order = rng.permutation(np.r_[np.ones(n_obj, int), np.zeros(n_clutter, int)])
    objects: list[tuple[int, int, tuple[int, int, int, int]]] = []  # (class, full area, in-image region)
    for is_obj in order:
        size = math.exp(rng.uniform(math.log(smin), math.log(smax)))
        cx, cy = rng.uniform(0, s, 2)
        angle = rng.uniform(0, 2 * np.pi)
        if is_obj:
            cls = int(rng.integers(0, classes))
            polys, aspect = _shape(SHAPES[cls], rng)
        else:
            kind = rng.random()
            if kind < 0.4:
                polys, aspect = _clutter(rng)
            else:  # lines, arcs and specks are drawn straight onto the canvas and only occlude
                _draw_stroke(canvas, owner, rng, s, kind)
                continue
        placed = _place(polys, size, aspect, angle, cx, cy)
        mask, x0, y0 = _mask(placed)
        color = _contrasting_color(rng, canvas, (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0]))
        fill = _fill(rng, mask.shape[0], mask.shape[1], color)
        oid = len(objects) + 1 if is_obj else 0
        area, region = _paste(canvas, owner, mask, x0, y0, fill, oid)
        if is_obj:
            if rng.random() < 0.2:  # an outline in another colour, kept inside the object's own mask
                edge = np.asarray(Image.fromarray(mask).filter(ImageFilter.MinFilter(3)))
                ring = np.where((mask > 127) & (edge <= 127), 255, 0).astype(np.uint8)
                box = (x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])
                canvas.paste(_rgb(_random_color(rng)), box, Image.fromarray(ring))
            objects.append((cls, area, region))

    labels = []
    for oid, (cls, area, (rx0, ry0, rx1, ry1)) in enumerate(objects, 1):
        visible = owner[ry0:ry1, rx0:rx1] == oid  # an object never owns pixels outside its own mask
        n_vis = int(visible.sum())
        if area == 0 or n_vis < MIN_VISIBLE * area:
            continue
        ys, xs = np.nonzero(visible)
        x0, x1, y0, y1 = rx0 + xs.min(), rx0 + xs.max() + 1, ry0 + ys.min(), ry0 + ys.max() + 1
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        labels.append([cls, (x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s])

    img = canvas
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(img)
    if rng.random() < 0.6:
        noise = rng.standard_normal((s, s, 3), dtype=np.float32) * rng.uniform(2, 12)
        arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
    return arr, np.array(labels, np.float32).reshape(-1, 5)


def _draw_stroke(canvas: Image.Image, owner: np.ndarray, rng: np.random.Generator, s: int, kind: float) -> None:
    """Unlabelled thin clutter (lines, arcs, specks), drawn on a full-size mask so it can occlude objects."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    if kind < 0.7:
        pts = [tuple(p) for p in rng.uniform(-0.1 * s, 1.1 * s, (int(rng.integers(2, 5)), 2)).tolist()]
        d.line(pts, fill=255, width=int(rng.integers(1, max(2, s // 50))))
    elif kind < 0.85:
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(s / 20, s / 3)
        a0 = rng.uniform(0, 360)
        d.arc([x - r, y - r, x + r, y + r], a0, a0 + rng.uniform(60, 250), fill=255,
              width=int(rng.integers(1, max(2, s // 60))))
    else:
        for x, y, r in zip(*rng.uniform(0, s, (2, 12)), rng.uniform(1, 2.5, 12)):
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    mask = np.asarray(m)
    canvas.paste(_rgb(_random_color(rng)), (0, 0), m)
    owner[mask > 127] = 0


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _label_text(labels: np.ndarray) -> str:
    return "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels.tolist())


def _write_chunk(job: tuple[str, str, list[int], int, int, int]) -> int:
    """Render and write the images of one chunk (runs in a worker process)."""
    root, split, indices, imgsz, classes, seed = job
    root_p = Path(root)
    for i in indices:
        arr, labels = render(seed, split, i, imgsz, classes)
        quality = int(np.random.default_rng([seed, SPLITS[split], i, 1 << 20]).integers(80, 96))
        # the label goes first: an image file is the marker that this sample is complete
        atomic_write_text(root_p / "labels" / split / f"{i:06d}.txt", _label_text(labels))
        atomic_write_bytes(root_p / "images" / split / f"{i:06d}.jpg", _jpeg(arr, quality))
    return len(indices)


_OURS = re.compile(r"^\d{6}\.(jpg|txt)$")


def generation_params(root: str | Path) -> dict | None:
    """The parameters (imgsz, classes, seed, counts) a synthetic set under `root` was drawn with, if it is one."""
    manifest = Path(root) / _MANIFEST
    if not manifest.is_file():
        return None
    try:
        params = yaml.safe_load(manifest.read_text())
    except yaml.YAMLError:
        return None
    return params if isinstance(params, dict) else None


def _prepare(out: Path, params: dict) -> None:
    """Check `out` is ours, and drop every file a previous run made with other content parameters."""
    if out.exists() and any(out.iterdir()) and not (out / _MANIFEST).is_file():
        raise DataError("directory is not empty and is not a detforge synthetic dataset; choose another --out",
                        path=out)
    old = generation_params(out)
    content = {k: params[k] for k in ("version", "imgsz", "classes", "seed")}
    if old != params:
        (out / "data.yaml").unlink(missing_ok=True)  # incomplete until the new run finishes
    if old is None or {k: old.get(k) for k in content} != content:
        for split in SPLITS:
            for sub in ("images", "labels"):
                d = out / sub / split
                if d.is_dir():
                    for f in d.iterdir():
                        if _OURS.match(f.name):
                            f.unlink()
    atomic_write_json(out / _MANIFEST, params)


def _remove_extra(out: Path, split: str, count: int) -> None:
    for sub in ("images", "labels"):
        d = out / sub / split
        if d.is_dir():
            for f in d.iterdir():
                if _OURS.match(f.name) and int(f.name[:6]) >= count:
                    f.unlink()


def generate(
    out: str | Path,
    train: int = 2000,
    val: int = 300,
    imgsz: int = 320,
    classes: int = 6,
    seed: int = 0,
    workers: int | None = None,
    progress: bool | Callable[[int], None] = False,
) -> Path:
    """Write (or resume) the synthetic dataset under `out`; returns the path of its `data.yaml`.

    Layout: `out/images/{train,val}/NNNNNN.jpg`, `out/labels/{train,val}/NNNNNN.txt`, `out/data.yaml`
    (written last, so its presence means the dataset is complete). `progress=True` shows a tqdm bar
    on stderr; a callable receives the number of images finished after each chunk.
    """
    out = Path(out).resolve()
    for name, v, lo in (("train", train, 1), ("val", val, 1), ("imgsz", imgsz, 32), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise DataError(f"must be an integer >= {lo}, got {v!r}", path=out, field=name)
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_CLASSES:
        raise DataError(f"must be an integer in 1..{MAX_CLASSES}, got {classes!r}", path=out, field="classes")
    params = {"version": FORMAT_VERSION, "train": train, "val": val, "imgsz": imgsz, "classes": classes, "seed": seed}
    _prepare(out, params)

    chunk = 16
    jobs = []
    for split, count in (("train", train), ("val", val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        _remove_extra(out, split, count)
        todo = [i for i in range(count) if not (out / "images" / split / f"{i:06d}.jpg").is_file()
                or not (out / "labels" / split / f"{i:06d}.txt").is_file()]
        jobs += [(str(out), split, todo[j : j + chunk], imgsz, classes, seed) for j in range(0, len(todo), chunk)]

    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(j[2]) for j in jobs), desc="synth", unit="img", leave=False)
    report = bar.update if bar is not None else (progress if callable(progress) else None)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                n = _write_chunk(job)
                if report:
                    report(n)
        else:
            # fork on Linux: no re-import of the caller's __main__ (forkserver/spawn need a main guard)
            ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
                for n in pool.map(_write_chunk, jobs):
                    if report:
                        report(n)
    finally:
        if bar is not None:
            bar.close()

    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "nc": classes,
        "names": list(SHAPES[:classes]),
    }
    header = f"# detforge synthetic shapes dataset: seed {seed}, {imgsz}px, {train} train / {val} val images\n"
    atomic_write_text(out / "data.yaml", header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return out / "data.yaml"
