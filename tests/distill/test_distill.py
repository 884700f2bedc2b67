"""Distillation terms: finite, differentiable, zero when student == teacher, and a yolov7-e6 teacher step on CPU."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from compress.distill import DistillConfig, Distiller, cwd_loss, soft_bce
from search_spaces import load_model
from search_spaces.model import Detector
from trainer.config import TrainConfig
from trainer.trainer import Trainer


def test_cwd_and_soft_bce_are_minimal_at_identity():
    t = torch.randn(2, 8, 5, 5)
    assert cwd_loss(t, t, 4.0).abs() < 1e-6
    assert cwd_loss(torch.randn(2, 8, 5, 5), t, 4.0) > 0
    logits = torch.randn(100)
    same = soft_bce(logits, logits, 2.0)
    assert same < soft_bce(-logits, logits, 2.0)


def test_cwd_is_the_papers_mean_over_channels():
    g = torch.Generator().manual_seed(0)
    s, t, temp = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g), 4.0
    ps = torch.softmax(s.flatten(2) / temp, -1)
    pt = torch.softmax(t.flatten(2) / temp, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)  # [N, C]: KL(teacher || student) per channel
    torch.testing.assert_close(cwd_loss(s, t, temp), kl.mean() * temp ** 2)  # sum / (N * C) x T^2


def test_soft_bce_weight_masks_cells():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    w = torch.zeros(2, 5)
    w[0, 1] = 1.0
    torch.testing.assert_close(soft_bce(s, t, 2.0, weight=w), soft_bce(s[0, 1], t[0, 1], 2.0))


def test_e6_teacher_one_step_on_cpu(tmp_path):
    student = load_model("yolov7-tiny", form="deploy", nc=80).train()
    teacher = load_model("yolov7-e6", form="deploy")  # random weights: enough to run the step
    kd = Distiller(teacher, student, DistillConfig(teacher_scale=2.0, w_feat=1.0))
    assert kd.pairs == [(0, 1), (1, 2), (2, 3)]  # student P3-P5 meet teacher P4-P6 at twice the input size
    imgs = torch.rand(1, 3, 64, 64)
    preds = student(imgs)
    terms = kd.extra_loss(None, student, imgs, torch.zeros(0, 6), preds)
    total = sum(terms.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert any(p.grad is not None for p in kd.adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def tiny_pair(nc: int = 3) -> tuple[Detector, Detector]:
    """A yolov7-tiny student in train mode and an independently initialised yolov7-tiny teacher in eval mode."""
    return (load_model("yolov7-tiny", form="deploy", nc=nc).train(),
            load_model("yolov7-tiny", form="deploy", nc=nc).eval())


def test_output_terms_take_the_gains_of_the_pass_in_progress():
    # the supernet switches losses per subnet (P3-P6 heads scale the gains differently): KD follows the switch
    torch.manual_seed(0)
    student, teacher = tiny_pair()
    kd = Distiller(teacher, student, DistillConfig(box_conf=0.0, w_feat=1.0))
    imgs = torch.rand(2, 3, 64, 64)
    preds = student(imgs)
    plain = kd.extra_loss(None, student, imgs, torch.zeros(0, 6), preds)
    gains = types.SimpleNamespace(obj=2.0, cls=3.0, box=5.0)
    trainer = types.SimpleNamespace(current_loss=types.SimpleNamespace(hyp=gains))
    scaled = kd.extra_loss(trainer, student, imgs, torch.zeros(0, 6), preds)
    for term, gain in (("kd_obj", 2.0), ("kd_cls", 3.0), ("kd_box", 5.0), ("kd_feat", 1.0)):
        assert plain[term] > 0
        torch.testing.assert_close(scaled[term], gain * plain[term])


def test_box_term_stays_finite_for_collapsed_student_boxes():
    # a student wh logit below about -50 decodes to a 0 x 0 box: CIoU's w/h was 0/0 (a real run went NaN)
    torch.manual_seed(0)
    student, teacher = tiny_pair()
    kd = Distiller(teacher, student, DistillConfig(box_conf=0.0, w_feat=0.0))
    imgs = torch.rand(2, 3, 64, 64)
    preds = [p.detach().clone() for p in student(imgs)]
    for p in preds:
        p[..., 2:4] = -120.0
        p.requires_grad_(True)
    box = kd.extra_loss(None, student, imgs, torch.zeros(0, 6), preds)["kd_box"]
    assert torch.isfinite(box) and box > 0
    box.backward()
    assert all(torch.isfinite(p.grad).all() for p in preds)


def test_feature_term_is_opt_in():
    student, teacher = tiny_pair()
    kd = Distiller(teacher, student)  # output terms only: no adapters to train
    assert kd.modules() == []
    imgs = torch.rand(1, 3, 64, 64)
    terms = kd.extra_loss(None, student, imgs, torch.zeros(0, 6), student(imgs))
    assert terms["kd_feat"] == 0 and terms["kd_obj"] > 0
    assert Distiller(teacher, student, DistillConfig(w_feat=0.5)).modules() != []


def test_distillation_plugs_into_trainer(tmp_path):
    from trainer.synthetic import generate

    data = generate(tmp_path / "d", train=8, val=4, imgsz=64, classes=2, seed=0)
    student = load_model("yolov7-tiny", form="deploy", nc=2)
    teacher = copy.deepcopy(student)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, imgsz=64, batch=4, workers=0,
                      progress=False, device="cpu")
    kd = Distiller(teacher, student, DistillConfig(w_feat=1.0))
    result = Trainer(cfg, model=student, callbacks=[kd]).train()
    row = result.rows[-1]
    assert {"kd_obj", "kd_cls", "kd_box", "kd_feat"} <= set(row)
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("kd_obj", "kd_feat"))


def test_a_teacher_without_trained_weights_is_refused(tmp_path, capsys):
    from nas.cli import main
    from nas.pipeline_config import PipelineConfig
    from search_spaces import ConfigError

    assert main(["distill", "--teacher", "yolov7-e6", "--out", str(tmp_path / "kd")]) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher" in err and "random" in err and len(err.splitlines()) == 1
    assert "yolov7-e6.pt" in err and "--teacher-model yolov7-e6" in err  # what to pass instead
    with pytest.raises(SystemExit) as e:  # no default teacher: a zoo name can only be a random one
        main(["distill", "--out", str(tmp_path / "kd")])
    assert e.value.code == 2 and "--teacher" in capsys.readouterr().err
    assert not (tmp_path / "kd").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="distill.teacher"):
        PipelineConfig.from_dict({"distill": {"enabled": True, "teacher": "yolov7-e6"}})
    # an architecture without weights is as random as a zoo name: refused when the config is read
    (tmp_path / "bare").mkdir()
    load_model("yolov7-tiny").arch.to_yaml(tmp_path / "bare" / "arch.yaml")
    for ref in (tmp_path / "bare", tmp_path / "bare" / "arch.yaml"):
        with pytest.raises(ConfigError, match="supernet.teacher: .*no trained weights"):
            PipelineConfig.from_dict({"supernet": {"teacher": str(ref)}})
    with pytest.raises(ConfigError, match="supernet.teacher_model"):
        PipelineConfig.from_dict({"supernet": {"teacher_model": "yolov7-e6"}})


def test_impossible_teacher_sizes_are_config_errors():
    from search_spaces import ConfigError

    student = load_model("yolov7-tiny", form="deploy", nc=80)
    teacher = load_model("yolov7-e6", form="deploy")  # largest stride 64
    with pytest.raises(ConfigError, match="teacher_scale"):
        Distiller(teacher, student, DistillConfig(teacher_scale=0.0))
    kd = Distiller(teacher, student, DistillConfig(teacher_scale=1.0))
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(imgsz=96), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a multiple of its largest stride 64"):
        kd.on_train_start(trainer)  # 96 px: the teacher's P6 concat would fail in the first step


def test_resume_with_other_adapters_is_one_clear_error(tmp_path):
    from search_spaces import CheckpointError
    from trainer.synthetic import generate

    data = generate(tmp_path / "d", train=4, val=2, imgsz=64, classes=2, seed=0)
    student = load_model("yolov7-tiny", form="deploy", nc=2)
    teacher = copy.deepcopy(student)

    def trainer(w_feat: float, resume: bool) -> Trainer:
        cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=2, imgsz=64, batch=2, workers=0,
                          progress=False, device="cpu", resume=resume)
        return Trainer(cfg, model=copy.deepcopy(student),
                       callbacks=[Distiller(teacher, student, DistillConfig(w_feat=w_feat))])

    trainer(1.0, resume=False).save_checkpoint(0)  # as if killed after epoch 1 of a run with CWD adapters
    with pytest.raises(CheckpointError, match="--w-feat"):
        trainer(0.0, resume=True)
    assert trainer(1.0, resume=True).start_epoch == 1
