"""Finetuning trained weights on a dataset of other classes (YOLOv7's weight transfer) and `--freeze`."""
from __future__ import annotations

import json

import pytest
import torch

from nas.cli import main
from search_spaces import ConfigError, load_model, save_model
from search_spaces.convert import official_layer_map
from search_spaces.errors import CheckpointError
from search_spaces.loading import load_for_classes, transfer_state
from trainer.config import TrainConfig
from trainer.freeze import freeze_layers
from trainer.trainer import Trainer


@pytest.fixture
def coco_model(tmp_path):
    """A yolov7-tiny "trained" for 80 classes: random weights, perturbed so nothing equals an initialisation."""
    torch.manual_seed(3)
    det = load_model("yolov7-tiny")  # nc=80
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return det, save_model(det, tmp_path / "coco")


def test_weights_for_other_classes_transfer_except_the_class_dependent_head_outputs(coco_model, tmp_path):
    det80, ref = coco_model
    with pytest.raises(ConfigError, match="transfers them"):  # a plain load is still exact or refused
        load_model(ref, nc=3)
    det, t = load_for_classes(ref, 3)
    assert det.nc == 3 and t is not None and t.total == len(det.state_dict())
    src = det80.state_dict()
    new = set(t.fresh)
    # the lead output convs and their ImplicitM change shape with nc: only they start fresh
    assert new == {k for k in det.state_dict() if k.startswith(("head.m.", "head.im."))}
    for k, v in det.state_dict().items():
        if k in new:
            assert v.shape != src[k].shape, k
        else:  # the anchors too: the arch states the ones the weights were trained with
            assert torch.equal(v, src[k]), k
    assert t.loaded == len(det.state_dict()) - len(new) - 2  # the two anchor buffers come from the arch
    assert t.summary().startswith(f"transferred {t.loaded}/{t.total} tensors from ") and "new: head.im, head.m" in \
        t.summary()
    # the same classes: the weights load in full, nothing transferred
    same, none = load_for_classes(ref, 80)
    assert none is None and all(torch.equal(v, src[k]) for k, v in same.state_dict().items())
    # a bare architecture has no weights to transfer
    assert load_for_classes("yolov7-tiny", 3)[1] is None


def test_transfer_state_leaves_mismatched_tensors_initialised(coco_model):
    _, ref = coco_model
    det = load_model("yolov7-tiny", nc=5)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    t = transfer_state(det, ref / "weights.pt")
    for k in t.fresh:
        assert torch.equal(det.state_dict()[k], before[k]), k  # untouched: the initial head priors stay


def test_freeze_stops_the_gradients_of_yolov7s_first_layers():
    det = load_model("yolov7-tiny", nc=3)
    frozen = freeze_layers(det, 29)  # yolov7-tiny's backbone: official layers 0-28
    layer_map = official_layer_map(det)
    back = tuple(p + "." for i, p in layer_map.items() if i < 29 and p)
    assert frozen and all(n.startswith(back) for n in frozen)
    assert {n for n, p in det.named_parameters() if not p.requires_grad} == set(frozen)
    assert any(n.startswith(layer_map[29] + ".") for n, p in det.named_parameters() if p.requires_grad)
    assert all(p.requires_grad for n, p in det.named_parameters() if n.startswith("head."))
    assert freeze_layers(load_model("yolov7-tiny", nc=3), 0) == []
    with pytest.raises(ConfigError) as e:
        freeze_layers(det, 78)  # 77 layers before the head
    assert e.value.field == "freeze"


def test_train_cli_finetunes_other_classes_with_a_frozen_backbone(coco_model, small_data, tmp_path, capsys):
    det80, ref = coco_model
    out = tmp_path / "ft"
    assert main(["train", "--model", str(ref), "--data", str(small_data), "--epochs", "1", "--imgsz", "64",
                 "--batch", "4", "--workers", "0", "--freeze", "29", "--noautoanchor", "--out", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["transfer"]["loaded"] > 0 and doc["frozen"] > 0
    tuned = load_model(out / "model")
    assert tuned.nc == 3
    src, now = det80.state_dict(), tuned.state_dict()
    frozen = [n for n, _ in load_model("yolov7-tiny", nc=3).named_parameters()
              if n.startswith(tuple(p + "." for i, p in official_layer_map(tuned).items() if i < 29 and p))]
    assert frozen and all(torch.equal(now[n], src[n]) for n in frozen)  # trained nothing (saved EMA included)
    moved = [n for n, _ in tuned.named_parameters() if n not in frozen and n in src and src[n].shape == now[n].shape]
    assert any(not torch.equal(now[n], src[n]) for n in moved)  # the rest trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transfer"]["loaded"] == doc["transfer"]["loaded"] and summary["frozen"] == doc["frozen"]
    with pytest.raises(ConfigError):
        TrainConfig(freeze=-1)


def test_an_official_checkpoint_converts_then_transfers_to_other_classes(reference, tmp_path):
    from search_spaces.convert import load_official_into, map_official_state_dict

    official = torch.load(reference / "yolov7-tiny_training_random.pt", weights_only=True)  # COCO's 80 classes
    det80 = load_official_into(load_model("yolov7-tiny"), official)
    ref = save_model(det80, tmp_path / "converted")  # what `detforge convert` writes
    det, t = load_for_classes(ref, 3)
    mapped, _, _ = map_official_state_dict(official, det80)
    assert set(t.fresh) == {k for k in mapped if k.startswith(("head.m.", "head.im."))}
    for k, v in det.state_dict().items():  # every other official tensor arrives unchanged
        if k not in t.fresh:
            assert torch.equal(v, mapped[k].to(v.dtype)), k


def test_weights_that_do_not_fit_their_own_arch_are_refused_not_transferred(coco_model, tmp_path):
    _, ref = coco_model
    bad = save_model(load_model("yolov7"), tmp_path / "bad")  # yolov7's weights ...
    (bad / "arch.yaml").write_text((ref / "arch.yaml").read_text())  # ... beside yolov7-tiny's arch
    with pytest.raises(CheckpointError, match="do not fit"):
        load_for_classes(bad, 3)


def test_a_resume_needs_the_same_freeze(small_data, tmp_path):
    kw = {"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 64, "batch": 4,
          "workers": 0, "device": "cpu", "progress": False, "autoanchor": False}
    Trainer(TrainConfig(epochs=1, freeze=29, **kw)).train()
    with pytest.raises(CheckpointError) as e:
        Trainer(TrainConfig(epochs=2, resume=True, **kw))
    assert e.value.field == "freeze"
    assert Trainer(TrainConfig(epochs=2, resume=True, freeze=29, **kw)).start_epoch == 1


def test_distill_transfers_a_student_trained_for_other_classes(coco_model, small_data, tmp_path, capsys):
    _, ref = coco_model
    teacher = save_model(load_model("yolov7-tiny", nc=3), tmp_path / "teacher")  # "trained" on the data's classes
    assert main(["distill", "--teacher", str(teacher), "--student", str(ref), "--data", str(small_data),
                 "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0", "--device", "cpu",
                 "--noautoanchor", "--out", str(tmp_path / "kd"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["transfer"]["loaded"] > 0 and set(doc["transfer"]["fresh"]) == {
        k for k in load_model("yolov7-tiny", nc=3).state_dict() if k.startswith(("head.m.", "head.im."))}
    assert load_model(tmp_path / "kd" / "model").nc == 3
    assert json.loads((tmp_path / "kd" / "summary.json").read_text())["transfer"] == doc["transfer"]
