"""Distillation terms: finite, differentiable, zero when student == teacher, and a yolov7-e6 teacher step on CPU."""
from __future__ import annotations

import copy

import torch

from compress.distill import DistillConfig, Distiller, cwd_loss, soft_bce
from search_spaces import load_model
from trainer.config import TrainConfig
from trainer.trainer import Trainer


def test_cwd_and_soft_bce_are_minimal_at_identity():
    t = torch.randn(2, 8, 5, 5)
    assert cwd_loss(t, t, 4.0).abs() < 1e-6
    assert cwd_loss(torch.randn(2, 8, 5, 5), t, 4.0) > 0
    logits = torch.randn(100)
    same = soft_bce(logits, logits, 2.0)
    assert same < soft_bce(-logits, logits, 2.0)


def test_e6_teacher_one_step_on_cpu(tmp_path):
    student = load_model("yolov7-tiny", form="deploy", nc=80).train()
    teacher = load_model("yolov7-e6", form="deploy")  # random weights: enough to run the step
    kd = Distiller(teacher, student, DistillConfig(teacher_scale=2.0))
    assert kd.pairs == [(0, 1), (1, 2), (2, 3)]  # student P3-P5 meet teacher P4-P6 at twice the input size
    imgs = torch.rand(1, 3, 64, 64)
    preds = student(imgs)
    terms = kd.extra_loss(None, student, imgs, torch.zeros(0, 6), preds)
    total = sum(terms.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert any(p.grad is not None for p in kd.adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_plugs_into_trainer(tmp_path):
    from trainer.synthetic import generate

    data = generate(tmp_path / "d", train=8, val=4, imgsz=64, classes=2, seed=0)
    student = load_model("yolov7-tiny", form="deploy", nc=2)
    teacher = copy.deepcopy(student)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, imgsz=64, batch=4, workers=0,
                      progress=False, device="cpu")
    kd = Distiller(teacher, student, DistillConfig())
    result = Trainer(cfg, model=student, callbacks=[kd]).train()
    row = result.rows[-1]
    assert {"kd_obj", "kd_cls", "kd_box", "kd_feat"} <= set(row)
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("kd_obj", "kd_feat"))
