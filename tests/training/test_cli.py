"""train / val / predict through the CLI on a small synthetic set; bad data gives exit code 2 with --strict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from search_spaces import ConfigError, load_model
from trainer.config import TrainConfig
from trainer.trainer import Trainer


def test_train_val_predict(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_data), "--epochs", "1", "--imgsz", "96", "--batch", "4",
                 "--workers", "0", "--device", "cpu", "--out", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epochs"] == 1 and 0.0 <= out["map"] <= 1.0
    assert (run / "last.pt").is_file() and (run / "model" / "arch.yaml").is_file()
    assert (run / "results.csv").read_text().startswith("epoch,")

    assert main(["val", "--weights", str(run / "model"), "--data", str(small_data), "--imgsz", "96",
                 "--json"]) == 0
    val = json.loads(capsys.readouterr().out)
    assert {"map", "map50", "per_class"} <= set(val) and val["images"] == 8

    # the exported, fused ONNX evaluates to the PyTorch model's mAP through the same command
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(run / "model"), "--imgsz", "96", "--fuse", "--out", str(onnx), "--json"]) == 0
    capsys.readouterr()
    assert main(["val", "--weights", str(onnx), "--data", str(small_data), "--imgsz", "96", "--json"]) == 0
    val_onnx = json.loads(capsys.readouterr().out)
    assert val_onnx["images"] == 8 and abs(val_onnx["map"] - val["map"]) <= 0.01
    # after one epoch both mAPs are near 0, so the outputs themselves are what val scores alike
    import torch

    from compress.onnx_eval import OnnxDetector

    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(run / "model").eval()(x)[0]
    assert torch.allclose(OnnxDetector(onnx)(x)[0], ref, rtol=1e-3, atol=1e-3)
    assert main(["val", "--weights", str(onnx), "--data", str(small_data), "--imgsz", "128"]) == 2
    assert "pass --imgsz 96" in capsys.readouterr().err

    images = Path(small_data).parent / "images" / "val"
    assert main(["predict", "--weights", str(run / "model"), "--source", str(images), "--out",
                 str(tmp_path / "pred"), "--imgsz", "96", "--conf", "0.0001", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["images"] == 8
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(dets) == 8 and len(list((tmp_path / "pred").glob("*.jpg"))) == 8


def test_val_interval_validates_every_nth_epoch_and_the_last(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_data), "--epochs", "3", "--imgsz", "96", "--batch", "8",
                 "--workers", "0", "--device", "cpu", "--val-interval", "2", "--out", str(run), "--json"]) == 0
    rows = (run / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    maps = [r.split(",")[header.index("map")] for r in rows[1:]]
    assert [bool(m) for m in maps] == [False, True, True]  # epoch 2, and epoch 3 as the last


def test_strict_bad_label_is_exit_2(small_data, tmp_path, capsys):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(Path(small_data).parent, root)
    data = root / "data.yaml"
    data.write_text(data.read_text().replace(str(Path(small_data).parent), str(root)))
    label = min((root / "labels" / "train").glob("*.txt"))
    label.write_text("0 0.5 0.5 0.2\n")  # four columns
    assert main(["train", "--data", str(data), "--epochs", "1", "--imgsz", "96", "--batch", "4", "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "r"), "--strict", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("detforge: error:") and label.name in err[-1]



def test_a_model_for_other_classes_names_the_data_yaml(small_data, tmp_path):
    cfg = TrainConfig(data=str(small_data), out=str(tmp_path), imgsz=96, workers=0, device="cpu")
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, model=load_model("yolov7-tiny", nc=5))  # the dataset has 3 classes
    assert e.value.path == str(small_data) and e.value.field == "nc"


TRAINING_COMMANDS = (["train"], ["distill", "--teacher", "t", "--out", "o"], ["supernet", "train", "--space", "tiny", "--out", "o"],
                     ["search", "--space", "tiny"], ["prune", "m", "--macs", "0.5", "--out", "o"])


@pytest.mark.parametrize("command", TRAINING_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_training_command_takes_the_shared_optimizer_flags(command):
    from nas.cli import build_parser
    from nas.commands import optimizer_settings

    parser = build_parser()
    defaults = optimizer_settings(parser.parse_args(command))
    assert defaults == {k: getattr(TrainConfig, k) for k in ("nbs", "optimizer", "lr_schedule", "lr0")}
    given = optimizer_settings(parser.parse_args([*command, "--nbs", "16", "--optimizer", "adamw",
                                                 "--lr-schedule", "linear", "--lr0", "0.003"]))
    assert given == {"nbs": 16, "optimizer": "adamw", "lr_schedule": "linear", "lr0": 0.003}
    TrainConfig(**given)  # what every command passes on is a valid training configuration


def test_train_refuses_to_overwrite_an_earlier_run_without_resume_or_exist_ok(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(small_data), "--epochs", "1", "--imgsz", "96", "--batch", "4", "--workers", "0",
            "--device", "cpu", "--out", str(run)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (run / "last.pt", run / "results.csv", run / "config.json")}
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run}: out: holds an earlier run" in err[0] and "--resume" in err[0]
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing of the earlier run was touched
    assert main([*argv, "--epochs", "2", "--exist-ok", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["epochs"] == 2 and trained["map"] is not None
    # a resume that finds nothing left to train reports the run's final metrics, not nulls
    assert main([*argv, "--epochs", "2", "--resume", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["epochs"], again["map"], again["map50"]) == (2, trained["map"], trained["map50"])


def test_a_resume_with_another_schedule_or_hyp_is_refused(small_data, tmp_path):
    from search_spaces.errors import CheckpointError
    from tests.training.test_time_budget import StopAfterOneEpoch
    from trainer.hyp import load_hyp

    def trainer(**kw) -> Trainer:
        return Trainer(TrainConfig(**{"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path),
                                      "imgsz": 96, "batch": 4, "workers": 0, "device": "cpu", "progress": False,
                                      "epochs": 3, "resume": True, **kw}))

    t = trainer(resume=False)
    t.callbacks.append(StopAfterOneEpoch())
    t.train()
    for change, field in (({"lr_schedule": "linear"}, "lr_schedule"), ({"nbs": 8}, "nbs")):
        with pytest.raises(CheckpointError) as e:
            trainer(**change)
        assert e.value.field == field and "cannot resume" in str(e.value)
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump({**load_hyp("tiny").to_dict(), "lrf": 0.2}))
    with pytest.raises(CheckpointError, match=r"lrf 0.01 -> 0.2") as e:
        trainer(hyp=str(hyp))
    assert e.value.field == "hyp"
    assert trainer().start_epoch == 1  # the same settings resume
