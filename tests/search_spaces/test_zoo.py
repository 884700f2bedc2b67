"""The zoo reproduces the official YOLOv7 family: parameters, fused parameters and GFLOPs."""
from __future__ import annotations

import json

import pytest

from nas.cli import main
from search_spaces import list_models, load_model
from search_spaces.stats import model_stats

from ..conftest import ZOO


def test_zoo_lists_the_seven_models():
    assert list_models() == ZOO


# FLOP counting of the large P6 models at 1280 px is most of this test's time: `make bench` runs them
# (test_training_params_match_official checks their parameters in every run, yolov7-w6 the P6 FLOPs)
LARGE_P6 = ("yolov7-e6", "yolov7-d6", "yolov7-e6e")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE_P6 else n for n in ZOO])
def test_deploy_stats_match_official(name, model_stats_ref):
    ref = model_stats_ref[f"deploy/{name}"]
    s = model_stats(load_model(name, form="deploy"))
    assert s.params == ref["params"]
    assert s.params_fused == ref["params_after_fuse_excluding_dead"]
    expected = ref["fused_flops_native"]["gflops_2x_fvcore_total"]
    assert abs(s.gflops - expected) / expected < 0.01
    assert s.strides == ref["strides"]


@pytest.mark.parametrize("name", ZOO)
def test_training_params_match_official(name, model_stats_ref):
    det = load_model(name, form="training")
    assert sum(p.numel() for p in det.parameters()) == model_stats_ref[f"training/{name}"]["params"]


def test_info_cli_json(capsys, model_stats_ref):
    assert main(["info", "yolov7-tiny", "--form", "deploy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = model_stats_ref["deploy/yolov7-tiny"]
    assert out["params"] == ref["params"] and out["params_fused"] == ref["params_after_fuse_excluding_dead"]
    assert out["imgsz"] == 640 and out["strides"] == [8, 16, 32]
    assert main(["info", "yolov7-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == model_stats_ref["training/yolov7-tiny"]["params"]


def test_models_cli(capsys):
    assert main(["models", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)["models"]] == ZOO
