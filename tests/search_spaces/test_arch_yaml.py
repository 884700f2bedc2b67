"""Architecture YAML: round trip, and one clear error line (exit code 2) for every malformed file."""
from __future__ import annotations

import pytest
import yaml

from nas.cli import main
from search_spaces import Architecture, load_model
from search_spaces.errors import ConfigError
from search_spaces.zoo import zoo_path

from ..conftest import ZOO


@pytest.mark.parametrize("name", ZOO)
def test_yaml_round_trip(name, tmp_path):
    arch = Architecture.from_yaml(zoo_path(name))
    path = tmp_path / "arch.yaml"
    arch.to_yaml(path)
    assert Architecture.from_yaml(path) == arch


def _tiny() -> dict:
    return yaml.safe_load(zoo_path("yolov7-tiny").read_text())


def _edit_unknown_block(d):
    d["backbone"][2]["block"] = "elann"


def _edit_wrong_type(d):
    d["backbone"][0]["out"] = "32"


def _edit_groups(d):
    d["backbone"][1]["g"] = 5


def _edit_missing_field(d):
    del d["backbone"][2]["width"]


def _edit_unknown_ref(d):
    d["neck"][3]["from"] = "p7"


def _edit_bad_head(d):
    d["head"]["type"] = "yolo"


def _edit_anchor_levels(d):
    d["head"]["anchors"] = d["head"]["anchors"][:2]


def _edit_resolution(d):
    d["neck"][4]["from"] = ["lat4", "spp"]


def _edit_top_key(d):
    d["depth_multiple"] = 0.33


def _edit_pool_geometry(d):
    d["backbone"][3].update(k=3, s=2)  # unpadded at stride 2: 80 -> 39, not the 40 the strides assume


def _edit_even_kernel(d):
    d["backbone"][1]["k"] = 4  # padded by 2: the map grows by one and the concats no longer line up


def _edit_zero_scale(d):
    d["neck"][2]["scale"] = 0  # a ZeroDivisionError in the stride bookkeeping before


def _edit_imgsz(d):
    d["imgsz"] = 650  # a RuntimeError in the first concat before (80 vs 81)


def _edit_anchor_size(d):
    d["head"]["anchors"][0][0] = 0


def _edit_anchor_order(d):
    d["head"]["anchors"] = d["head"]["anchors"][::-1]  # coarsest level first: YOLOv7 would silently reverse it


@pytest.mark.parametrize("edit, field", [
    (_edit_anchor_order, "head.anchors"), (_edit_unknown_block, "backbone[2].block"), (_edit_wrong_type, "backbone[0].out"),
    (_edit_groups, "backbone[1]"), (_edit_missing_field, "backbone[2].width"), (_edit_unknown_ref, "neck[3].from"),
    (_edit_bad_head, "head.type"), (_edit_anchor_levels, "head.anchors"), (_edit_resolution, "neck[4].from"),
    (_edit_top_key, "depth_multiple"), (_edit_pool_geometry, "backbone[3].k"), (_edit_even_kernel, "backbone[1].k"),
    (_edit_zero_scale, "neck[2].scale"), (_edit_imgsz, "imgsz"), (_edit_anchor_size, "head.anchors"),
])
def test_malformed_yaml_fails_with_one_line(edit, field, tmp_path, capsys):
    d = _tiny()
    edit(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["info", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and field in err, err


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbackbone: [\n")
    with pytest.raises(ConfigError, match="line"):
        Architecture.from_yaml(path)


def test_missing_file_and_unknown_model(capsys):
    assert main(["info", "no/such/arch.yaml"]) == 2
    assert main(["info", "yolov9"]) == 2
    assert "no such zoo model" in capsys.readouterr().err


def test_anchor_free_and_ghost_variants_build():
    d = _tiny()
    d["backbone"][4].update(ghost=True)
    d["head"] = {"type": "decoupled", "from": ["h3", "h4", "h5"], "hidden": 32, "depth": 1}
    det = load_model_from_dict(d)
    import torch

    det.eval()
    out, raw = det(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 4 * 4 + 8 * 8 + 2 * 2, 85) and raw[0].shape == (2, 1, 8, 8, 85)
    det.train()
    assert [r.shape[1] for r in det(torch.rand(2, 3, 64, 64))] == [1, 1, 1]


def load_model_from_dict(d):
    from search_spaces import build

    return build(d)


def test_load_model_forms():
    assert load_model("yolov7-w6", form="deploy").form == "deploy"
    assert load_model("yolov7-w6").head.has_aux


def test_a_plain_detect_model_has_no_other_training_form(tmp_path):
    from search_spaces import save_model

    fused = load_model("yolov7-tiny", form="deploy", nc=2)  # IDetect folded into a plain Detect
    assert fused.arch.head.type == "detect"
    model_dir = save_model(fused, tmp_path / "fused")
    with pytest.raises(ConfigError, match="plain 'detect'") as e:
        load_model(model_dir, form="training")
    assert e.value.field == "form"
    assert load_model(model_dir).arch.head.type == "detect"  # as it is, it loads (and trains)
