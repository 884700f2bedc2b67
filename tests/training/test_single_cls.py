"""Single-class training (YOLOv7's --single-cls): every class of the data trained and scored as one."""
from __future__ import annotations

import json

import numpy as np

from nas.cli import main
from search_spaces import load_model
from trainer.config import TrainConfig
from trainer.data_config import load_data_config
from trainer.datasets import YoloDataset
from trainer.trainer import Trainer


def test_the_data_merges_its_classes_and_still_checks_them_as_written(small_data):
    cfg = load_data_config(small_data)
    one = cfg.single_class()
    assert (one.nc, one.names, one.label_nc) == (1, ["item"], cfg.nc) and one.single_class() is one
    full = YoloDataset.from_config(cfg, "train", imgsz=64)
    merged = YoloDataset.from_config(one, "train", imgsz=64)
    assert len({int(c) for lb in full.labels for c in lb[:, 0]}) > 1  # the set has several classes ...
    assert merged.names == ["item"] and all((lb[:, 0] == 0).all() for lb in merged.labels)  # ... merged into one
    assert [lb[:, 1:].tolist() for lb in merged.labels] == [lb[:, 1:].tolist() for lb in full.labels]
    assert merged.problems == full.problems  # a class id beyond the file's nc is still a problem


def test_training_and_validation_with_single_cls(small_data, tmp_path, capsys):
    tr = Trainer(TrainConfig(data=str(small_data), out=str(tmp_path / "r"), epochs=1, imgsz=64, batch=4, workers=0,
                             device="cpu", progress=False, autoanchor=False, single_cls=True))
    assert tr.model.nc == 1 and tr.val_set.names == ["item"]
    _, targets, *_ = next(iter(tr.train_loader))
    assert len(targets) and np.all(targets[:, 1].numpy() == 0)
    result = tr.train()
    assert np.isfinite(result.rows[-1]["map"])
    model = tmp_path / "r" / "model"
    assert load_model(model).nc == 1
    base = ["val", "--weights", str(model), "--data", str(small_data), "--imgsz", "64", "--device", "cpu", "--json"]
    assert main(base) == 2  # a 1-class model on the 3-class data: named as such
    assert "pass --single-cls" in capsys.readouterr().err
    assert main([*base, "--single-cls"]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["item"]


def test_train_cli_flag(small_data, tmp_path, capsys):
    assert main(["train", "--data", str(small_data), "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers",
                 "0", "--device", "cpu", "--noautoanchor", "--single-cls", "--out", str(tmp_path / "r"), "--json"]) == 0
    assert load_model(tmp_path / "r" / "model").nc == 1
    assert json.loads((tmp_path / "r" / "config.json").read_text())["single_cls"] is True


def test_a_resume_needs_the_same_single_cls_and_a_supernet_refuses_it(small_data, tmp_path):
    import pytest

    from nas.supernet_train import SupernetTrainer
    from search_spaces import ConfigError
    from search_spaces.errors import CheckpointError

    kw = {"data": str(small_data), "out": str(tmp_path / "r"), "imgsz": 64, "batch": 4, "workers": 0,
          "device": "cpu", "progress": False, "autoanchor": False}
    Trainer(TrainConfig(epochs=1, single_cls=True, **kw)).train()
    with pytest.raises(CheckpointError) as e:
        Trainer(TrainConfig(epochs=2, resume=True, **kw))
    assert e.value.field == "single_cls"
    with pytest.raises(ConfigError) as e:
        SupernetTrainer(TrainConfig(epochs=1, single_cls=True, **{**kw, "out": str(tmp_path / "s")}), space="tiny")
    assert e.value.field == "single_cls"
