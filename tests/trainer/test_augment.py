"""Augmentation keeps images and boxes consistent."""
from __future__ import annotations

import numpy as np
import pytest

from search_spaces.errors import ConfigError
from trainer.augment import (
    AugmentConfig,
    augment_hsv,
    box_candidates,
    fliplr,
    flipud,
    letterbox,
    mixup,
    mosaic4,
    random_affine,
    unletterbox_boxes,
    xywhn_to_xyxy,
    xyxy_to_xywhn,
)


def _scene(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A black image with one white rectangle per box, and matching labels (class = box index)."""
    img = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = 255
    labels = np.array([[i, *b] for i, b in enumerate(boxes)], np.float32).reshape(-1, 5)
    return img, labels


def _white_bbox(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img[..., 0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_defaults_match_yolov7():
    hyp = AugmentConfig()
    assert (hyp.hsv_h, hyp.hsv_s, hyp.hsv_v, hyp.translate, hyp.scale, hyp.fliplr, hyp.mosaic, hyp.mixup) == (
        0.015, 0.7, 0.4, 0.2, 0.5, 0.5, 1.0, 0.0)


def test_from_mapping_takes_aug_keys_only():
    hyp = AugmentConfig.from_mapping({"lr0": 0.01, "scale": 0.9, "mixup": 0.15, "box": 0.05})
    assert hyp.scale == 0.9 and hyp.mixup == 0.15 and hyp.fliplr == 0.5
    with pytest.raises(ConfigError, match="scale"):
        AugmentConfig.from_mapping({"scale": "big"})


def test_box_format_round_trip():
    xywhn = np.array([[0.5, 0.25, 0.2, 0.1], [0.1, 0.9, 0.2, 0.2]], np.float32)
    xyxy = xywhn_to_xyxy(xywhn, 200, 100)
    np.testing.assert_allclose(xyxy[0], [80, 20, 120, 30], atol=1e-4)
    np.testing.assert_allclose(xyxy_to_xywhn(xyxy, 200, 100), xywhn, atol=1e-6)


def test_letterbox_maps_boxes_and_back():
    img, labels = _scene(50, 100, [(10, 5, 40, 45), (60, 20, 100, 50)])
    out, ratio, pad = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert ratio == pytest.approx((0.64, 0.64)) and pad == (0.0, 16.0)
    assert (out[:16] == 114).all() and (out[-16:] == 114).all()  # centred, grey padding
    mapped = labels[:, 1:].copy()
    mapped[:, [0, 2]] = mapped[:, [0, 2]] * ratio[0] + pad[0]
    mapped[:, [1, 3]] = mapped[:, [1, 3]] * ratio[1] + pad[1]
    np.testing.assert_allclose(_white_bbox(out[:, :32]), mapped[0], atol=1.0)  # the drawn box follows
    np.testing.assert_allclose(unletterbox_boxes(mapped, ratio, pad, (50, 100)), labels[:, 1:], atol=1e-4)


def test_letterbox_no_scaleup():
    img = np.full((20, 10, 3), 7, np.uint8)
    out, ratio, pad = letterbox(img, 64, scaleup=False)
    assert ratio == (1.0, 1.0) and pad == (27.0, 22.0) and (out[22:42, 27:37] == 7).all()


def test_flips_twice_are_identity():
    img, labels = _scene(40, 60, [(3, 4, 20, 30), (30, 10, 59, 39)])
    img[0, 0] = (1, 2, 3)  # make the image asymmetric
    f_img, f_lab = fliplr(img, labels)
    np.testing.assert_allclose(_white_bbox(f_img[:, 40:]) + [40, 0, 40, 0], f_lab[0, 1:], atol=0)
    assert f_lab[0, 1] == 60 - 20 and f_lab[0, 3] == 60 - 3
    back_img, back_lab = fliplr(f_img, f_lab)
    np.testing.assert_array_equal(back_img, img)
    np.testing.assert_allclose(back_lab, labels)
    u_img, u_lab = flipud(*flipud(img, labels))
    np.testing.assert_array_equal(u_img, img)
    np.testing.assert_allclose(u_lab, labels)


def test_random_affine_identity_is_a_no_op():
    img, labels = _scene(32, 48, [(4, 4, 20, 20)])
    out, out_lab = random_affine(img, labels, np.random.default_rng(0), degrees=0, translate=0, scale=0)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_allclose(out_lab, labels)


@pytest.mark.parametrize("seed", range(5))
def test_random_affine_boxes_follow_the_pixels(seed):
    img, labels = _scene(96, 96, [(20, 30, 60, 70)])
    out, out_lab = random_affine(img, labels, np.random.default_rng(seed), translate=0.1, scale=0.4, shear=0)
    assert out.shape == img.shape
    assert len(out_lab) == 1  # a big central box always survives this much scale/translate
    np.testing.assert_allclose(_white_bbox(out), out_lab[0, 1:], atol=1.5)


def test_random_affine_drops_boxes_pushed_out():
    img, labels = _scene(64, 64, [(0, 0, 4, 4), (20, 20, 44, 44)])
    # no random part: a border of -16 crops the centre 32 x 32 (as mosaic's does), which leaves the corner box out
    out, out_lab = random_affine(img, labels, np.random.default_rng(1), scale=0.0, translate=0.0, degrees=0,
                                 border=(-16, -16))
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out_lab, [[1, 4, 4, 28, 28]])  # only the central box, moved with the crop


def test_box_candidates():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32).T
    after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 10, 0.5]], np.float32).T
    assert box_candidates(before, after).tolist() == [True, False, False]


def test_hsv_changes_colour_not_shape():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert augment_hsv(img, rng, 0, 0, 0) is img
    out = augment_hsv(img, np.random.default_rng(1), 0.5, 0.5, 0.5)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    np.testing.assert_array_equal(out, augment_hsv(img, np.random.default_rng(1), 0.5, 0.5, 0.5))


def test_mosaic_shape_and_boxes_inside():
    rng = np.random.default_rng(0)
    items = [_scene(64, 48, [(5, 5, 30, 40)]), _scene(40, 64, [(10, 2, 60, 30)]), _scene(64, 64, [(20, 20, 44, 44)]),
             _scene(32, 64, [])]
    for k in range(10):
        img, labels = mosaic4(items, 64, np.random.default_rng(k), AugmentConfig())
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert labels.shape[1] == 5
        assert (labels[:, 1:] >= 0).all() and (labels[:, [1, 3]] <= 64).all() and (labels[:, [2, 4]] <= 64).all()
        assert (labels[:, 3] > labels[:, 1]).all() and (labels[:, 4] > labels[:, 2]).all()
        for _, x1, y1, x2, y2 in labels:  # every box still frames white (object) pixels
            assert img[int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1, 0].max() > 127
    with pytest.raises(ValueError):
        mosaic4(items[:3], 64, rng, AugmentConfig())


def test_mixup_blends_and_keeps_both_label_sets():
    a, la = _scene(32, 32, [(0, 0, 10, 10)])
    b, lb = _scene(32, 32, [(20, 20, 30, 30)])
    img, labels = mixup(a, la, b, lb, np.random.default_rng(0))
    assert img.shape == a.shape and len(labels) == 2
    assert 60 < img[5, 5, 0] < 200  # about half of each


def test_mixup_ratio_is_yolov7s_beta_8_8():
    rng = np.random.default_rng(0)
    white, black = np.full((2, 2, 3), 255, np.uint8), np.zeros((2, 2, 3), np.uint8)
    none = np.zeros((0, 5), np.float32)
    r = np.array([mixup(white, none, black, none, rng)[0][0, 0, 0] / 255.0 for _ in range(400)])
    # Beta(8, 8): mean 0.5, std 1/sqrt(68) = 0.121 (YOLOv5's Beta(32, 32) would give 0.062)
    assert abs(r.mean() - 0.5) < 0.02 and 0.105 < r.std() < 0.14
