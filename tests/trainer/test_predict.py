"""predict reads and sizes an image as training does: upright by EXIF, long side enlarged to imgsz."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from search_spaces import load_model
from trainer.augment import PAD_VALUE
from trainer.predict import detect, load_rgb


def test_load_rgb_applies_the_exif_orientation(tmp_path):
    im = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 32 wide and 64 high
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").shape == (64, 32, 3)


def test_a_small_image_is_enlarged_to_imgsz_not_padded():
    model = load_model("yolov7-tiny", nc=2).eval()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 100, (48, 48, 3), dtype=np.uint8)  # darker than the pad value everywhere
    detect(model, img, 96)
    x = seen[0][0]
    assert x.shape == (3, 96, 96)
    assert not torch.isclose(x, torch.tensor(PAD_VALUE / 255.0)).all(0).any(), "padding found: not enlarged"


def test_images_sharing_a_stem_keep_their_own_drawn_copies(tmp_path):
    from trainer.predict import predict

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "sub/a.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(src / name)
    res = predict(load_model("yolov7-tiny", nc=2), src, tmp_path / "out", imgsz=64)
    assert len(res) == 3
    drawn = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg"))
    assert drawn == ["a.jpg", "a.png.jpg", "sub/a.jpg"]
    # a single file goes to the top of the output directory
    predict(load_model("yolov7-tiny", nc=2), src / "sub" / "a.jpg", tmp_path / "one", imgsz=64)
    assert [p.name for p in (tmp_path / "one").glob("*.jpg")] == ["a.jpg"]
