"""`--optimizer`, `--lr-schedule` and `--lr0` reach every training: train, distill, supernet train, prune's finetunes."""
from __future__ import annotations

import pytest
import torch

from nas.cli import main
from search_spaces.errors import ConfigError
from trainer.config import TrainConfig
from trainer.trainer import Trainer


def _trainer(small_data, tmp_path, **kw) -> Trainer:
    cfg = TrainConfig(**{"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 96,
                         "batch": 4, "workers": 0, "device": "cpu", "progress": False, "epochs": 2, **kw})
    return Trainer(cfg)


def test_lr0_overrides_the_hyps_rate(small_data, tmp_path):
    t = _trainer(small_data, tmp_path / "a", optimizer="adamw", lr0=0.002)
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.hyp.lr0 == 0.002
    t._warmup(10**6, 1, 0.0)  # past the warmup, at the schedule's start: every group runs at lr0
    assert {g["lr"] for g in t.optimizer.param_groups} == {0.002}
    assert _trainer(small_data, tmp_path / "b").hyp.lr0 == 0.01  # without it: the hyp's (YOLOv7's tiny: 0.01)
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr0=0.0)
    assert e.value.field == "lr0"


@pytest.mark.parametrize("command", [["train"], ["supernet", "train", "--space", "tiny"],
                                     ["distill", "--teacher", "yolov7-tiny", "--random-teacher"],
                                     ["prune", "yolov7-tiny", "--macs", "0.5", "--data", "d", "--finetune-epochs", "1"]])
def test_every_training_command_takes_the_optimizer_flags(command, tmp_path, capsys):
    # a bad --lr0 is refused by TrainConfig, before any work: the flags reach the training's config
    assert main([*command, "--optimizer", "adamw", "--lr0", "-1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detforge: error:") and "lr0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_resume_at_another_lr0_is_refused(small_data, tmp_path):
    from search_spaces.errors import CheckpointError
    from tests.training.test_time_budget import StopAfterOneEpoch

    t = _trainer(small_data, tmp_path, optimizer="adamw", lr0=0.002)
    t.callbacks.append(StopAfterOneEpoch())
    t.train()
    for other in (None, 0.001):  # the hyp's 0.01, or another rate: the schedule would go on at it mid-run
        with pytest.raises(CheckpointError, match="--lr0 0.002") as e:
            _trainer(small_data, tmp_path, optimizer="adamw", lr0=other, resume=True)
        assert e.value.field == "lr0"
    assert _trainer(small_data, tmp_path, optimizer="adamw", lr0=0.002, resume=True).start_epoch == 1
