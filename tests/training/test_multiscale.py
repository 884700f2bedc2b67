"""Multi-scale training (YOLOv7's --multi-scale): batch sizes drawn per step, exact resume kept."""
from __future__ import annotations

import math
import random

import torch

from nas.cli import main
from trainer.config import TrainConfig
from trainer.multiscale import draw_size, rescale_batch
from trainer.trainer import Trainer


def test_sizes_are_stride_multiples_within_half_to_one_and_a_half_times():
    rng = random.Random(0)
    sizes = [draw_size(128, 32, rng) for _ in range(200)]
    assert set(sizes) == {64, 96, 128, 160, 192}  # every multiple of 32 in [64, 192], each drawn
    assert draw_size(64, 64, random.Random(1)) in (64,)  # never below one stride
    assert [draw_size(128, 32, random.Random(5)) for _ in range(3)] == [draw_size(128, 32, random.Random(5))] * 3


def test_rescale_batch_keeps_the_aspect_on_stride_multiples():
    x = torch.rand(2, 3, 64, 96)
    y = rescale_batch(x, 160, 32)
    assert y.shape == (2, 3, math.ceil(64 * 160 / 96 / 32) * 32, 160)
    assert rescale_batch(x, 96, 32) is x  # already that size
    flat = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(rescale_batch(flat, 128, 32), torch.full((1, 3, 128, 128), 0.25))


class _Sizes(Trainer):
    """Records the input size of every training step."""

    def train_step(self, imgs, targets):
        self.seen.append(tuple(imgs.shape[2:]))
        return super().train_step(imgs, targets)


def _cfg(small_data, out, **kw) -> TrainConfig:
    return TrainConfig(model="yolov7-tiny", data=str(small_data), out=str(out), imgsz=64, batch=4, workers=0,
                       device="cpu", progress=False, autoanchor=False, **kw)


def test_training_steps_at_drawn_sizes_and_resumes_exactly(small_data, tmp_path):
    a = _Sizes(_cfg(small_data, tmp_path / "a", epochs=2, multi_scale=True))
    a.seen = []
    result = a.train()
    assert len(set(a.seen)) > 1 and all(h % 32 == 0 and w % 32 == 0 and 32 <= h <= 96 for h, w in a.seen)
    assert all(math.isfinite(r["loss"]) for r in result.rows if "loss" in r) and result.epochs_done == 2
    # each epoch's sizes are a function of (seed, epoch): a killed run resumes to the same weights
    b = _Sizes(_cfg(small_data, tmp_path / "b", epochs=2, multi_scale=True, max_time_s=1e-9))
    b.seen = []
    b.train()
    c = _Sizes(_cfg(small_data, tmp_path / "b", epochs=2, multi_scale=True, resume=True))
    c.seen = []
    c.train()
    assert b.seen + c.seen == a.seen
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, wb[k]) for k, v in wa.items())
    off = _Sizes(_cfg(small_data, tmp_path / "off", epochs=1))
    off.seen = []
    off.train()
    assert set(off.seen) == {(64, 64)}


def test_cli_flag(small_data, tmp_path, capsys):
    assert main(["train", "--data", str(small_data), "--epochs", "1", "--imgsz", "64", "--batch", "4",
                 "--workers", "0", "--multi-scale", "--noautoanchor", "--out", str(tmp_path / "r")]) == 0
    import json

    assert json.loads((tmp_path / "r" / "config.json").read_text())["multi_scale"] is True


def test_sizes_also_fit_a_distillation_teachers_largest_stride(small_data, tmp_path):
    from compress.distill import DistillConfig, Distiller
    from search_spaces import Detector, load_model
    from search_spaces.space import load_space

    tiny = load_space("tiny")
    teacher = Detector(tiny.build_arch({**tiny.smallest_decisions(), "head.layout": "p3-p6"}, nc=3))  # stride 64
    student = load_model("yolov7-tiny", nc=3)  # stride 32
    assert Distiller(teacher, student).input_stride() == 64
    assert Distiller(teacher, student, DistillConfig(teacher_scale=2.0)).input_stride() == 32
    assert Distiller(teacher, student, DistillConfig(teacher_scale=0.5)).input_stride() == 128  # it sees 64
    tr = Trainer(_cfg(small_data, tmp_path, epochs=1, multi_scale=True), model=student,
                 callbacks=[Distiller(teacher, student)])
    assert tr.model_stride() == 32 and tr.grid_stride() == 64
