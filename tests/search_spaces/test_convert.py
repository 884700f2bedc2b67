"""The converter maps official state dicts key by key and reproduces the official outputs."""
from __future__ import annotations

import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from nas.cli import main
from search_spaces import load_model
from search_spaces.convert import load_official_into, map_official_state_dict, read_official_checkpoint
from search_spaces.errors import CheckpointError, ConfigError

from ..conftest import ZOO


@pytest.mark.parametrize("form", ["training", "deploy"])
@pytest.mark.parametrize("name", ZOO)
def test_every_official_key_maps(name, form, reference):
    layout = json.loads((reference / f"state_dict_{form}_{name}.json").read_text())
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=gen) if d == "float32" else torch.zeros(s, dtype=torch.int64))
          for k, s, d in layout}
    det = load_model(name, form=form)
    mapped, unexpected, missing = map_official_state_dict(sd, det)
    assert unexpected == [] and missing == []
    assert len(mapped) == len(layout) == len(det.state_dict())


@pytest.mark.parametrize("form", ["training", "deploy"])
def test_tiny_fixture_outputs_match_official(form, reference):
    sd = torch.load(reference / f"yolov7-tiny_{form}_random.pt", weights_only=True)
    io = torch.load(reference / f"yolov7-tiny_{form}_io.pt", weights_only=True)
    det = load_official_into(load_model("yolov7-tiny", form=form), sd).eval()
    with torch.no_grad():
        out, raw = det(io["input"])
        assert (out - io["output"]).abs().max() <= 1e-3
        for i, r in enumerate(raw):
            assert (r - io[f"raw_p{i + 3}"]).abs().max() <= 1e-3
        fused = det.fuse()(io["input"])[0]
    assert (fused - io["output_after_official_fuse"]).abs().max() <= 1e-3


def _fake_official_checkpoint(tmp_path, sd: dict) -> str:
    """Pickle a whole module tree from a module named `models.yolo`, like the official checkpoints."""
    mod_models, mod_yolo = types.ModuleType("models"), types.ModuleType("models.yolo")

    class Model(nn.Module):
        pass

    Model.__module__ = "models.yolo"
    Model.__qualname__ = "Model"
    mod_yolo.Model = Model
    sys.modules["models"], sys.modules["models.yolo"] = mod_models, mod_yolo
    try:
        model = Model()
        model.model = nn.Module()
        for key, value in sd.items():
            parts = key.split(".")
            parent = model
            for p in parts[:-1]:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            if value.is_floating_point() and not key.endswith(("running_mean", "running_var", "anchors", "anchor_grid")):
                parent.register_parameter(parts[-1], nn.Parameter(value.half(), requires_grad=False))
            else:
                parent.register_buffer(parts[-1], value.half() if value.is_floating_point() else value)
        path = tmp_path / "official.pt"
        # as official train.py + strip_optimizer leave it: best_fitness is the ndarray fitness() returns
        torch.save({"epoch": -1, "best_fitness": np.array([0.51]), "training_results": None, "model": model,
                    "ema": None, "optimizer": None, "wandb_id": None, "lr": np.float64(0.01)}, path)
    finally:
        del sys.modules["models"], sys.modules["models.yolo"]
    return str(path)


def test_convert_official_pickle_without_official_code(tmp_path, reference, capsys):
    sd = torch.load(reference / "yolov7-tiny_training_random.pt", weights_only=True)
    ckpt = _fake_official_checkpoint(tmp_path, sd)
    assert "models.yolo" not in sys.modules
    read = read_official_checkpoint(ckpt)
    assert set(read) == set(sd)
    out = tmp_path / "converted"
    assert main(["convert", ckpt, "--model", "yolov7-tiny", "--form", "training", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == len(sd)
    det = load_model(out).eval()
    io = torch.load(reference / "yolov7-tiny_training_io.pt", weights_only=True)
    with torch.no_grad():
        # the official checkpoint stores fp16 weights, so compare loosely
        assert (det(io["input"])[0] - io["output"]).abs().max() < 1.0
    assert "models.yolo" not in sys.modules


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_official_checkpoint(path)
    assert main(["convert", str(path), "--model", "yolov7-tiny", "--out", str(tmp_path / "o")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_of_another_model_fails_clearly(reference):
    sd = torch.load(reference / "yolov7-tiny_deploy_random.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="does not match yolov7"):
        load_official_into(load_model("yolov7", form="deploy"), sd)


def test_a_checkpoint_of_another_class_count_names_it(reference, tmp_path, capsys):
    sd = torch.load(reference / "yolov7-tiny_deploy_random.pt", weights_only=True)
    det = load_model("yolov7-tiny", form="deploy")
    with pytest.raises(CheckpointError, match=r"nc=80 classes.*pass --nc 80") as e:
        load_official_into(load_model("yolov7-tiny", form="deploy", nc=20), sd)
    assert e.value.field == "nc" and det.nc == 80
    with pytest.raises(ConfigError, match="nc"):  # refused before the head is built (an IndexError before)
        det.arch.with_nc(0)


def test_truncated_checkpoint_fails_clearly(tmp_path, reference):
    data = (reference / "yolov7-tiny_deploy_random.pt").read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        read_official_checkpoint(path)


def test_a_checkpoint_trained_with_its_own_anchors_converts_with_them(tmp_path, reference, capsys):
    sd = torch.load(reference / "yolov7-tiny_training_random.pt", weights_only=True)
    grid_key = next(k for k in sd if k.endswith(".anchor_grid"))
    zoo = load_model("yolov7-tiny").arch.head.anchors
    sd = {**sd, grid_key: sd[grid_key] * 0.5, grid_key.replace("anchor_grid", "anchors"):
          sd[grid_key.replace("anchor_grid", "anchors")] * 0.5}  # as AutoAnchor would have refit them
    det = load_official_into(load_model("yolov7-tiny", form="training"), sd)
    assert det.arch.head.anchors == [[v * 0.5 for v in level] for level in zoo]
    out = tmp_path / "converted"
    assert main(["convert", _fake_official_checkpoint(tmp_path, sd), "--model", "yolov7-tiny", "--form", "training",
                 "--out", str(out)]) == 0
    again = load_model(out)
    assert again.arch.head.anchors == det.arch.head.anchors  # arch.yaml states the checkpoint's anchors
    assert torch.equal(again.head.anchor_grid, det.head.anchor_grid)
    same = load_official_into(load_model("yolov7-tiny", form="training"),
                              torch.load(reference / "yolov7-tiny_training_random.pt", weights_only=True))
    assert same.arch.head.anchors == zoo  # the zoo's own anchors leave arch.yaml as it was
