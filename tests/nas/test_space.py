"""SearchSpace: YAML validation, decisions, Optuna sampling, zoo points and block-signature completeness."""
from __future__ import annotations

import itertools
import random

import numpy as np
import optuna
import pytest
import torch
import yaml

from search_spaces import Architecture, ConfigError, Detector, count_params, load_model
from search_spaces.space import (
    SPACES_DIR,
    BlockSignature,
    SearchSpace,
    arch_signatures,
    block_out_channels,
    load_space,
)
from search_spaces.zoo import list_models, zoo_path

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def default():
    return load_space("default")


@pytest.fixture(scope="module")
def tiny():
    return load_space("tiny")


def _raw(name: str) -> dict:
    return yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text())


def test_spaces_load(default, tiny):
    assert default.name == "default" and tiny.name == "tiny"
    assert default.size() > 1e10 and tiny.size() > 1e6
    assert "backbone.p3.depth" in default.decisions and "neck.td4.block" in default.decisions
    assert default.decisions["act"].choices == ("leaky_relu",)
    assert load_space(SPACES_DIR / "tiny.yaml").decisions == tiny.decisions


def test_unknown_space_name():
    with pytest.raises(ConfigError, match="spaces: default"):
        load_space("nope")


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()
INVALID = [  # (key to change, new value, field the error must name)
    ("colour", "red", "colour"),
    ("backbone.stages.p3.foo", 1, "backbone.stages.p3.foo"),
    ("backbone.depth", "two", "backbone.depth"),
    ("backbone.depth", [0, 1], "backbone.depth"),
    ("backbone.depth", [1, 1], "backbone.depth"),
    ("neck.stages.p4.out", [], "neck.stages.p4.out"),
    ("stem.out", [33], "stem.out"),
    ("backbone.stages.p2.out", [36], "backbone.width"),  # 36 x 0.25 = 9: odd, but ghost_elan halves it
    ("neck.width", [0.3], "neck.width"),  # 32 x 0.3 is not a channel count
    ("backbone.stages.p4", _DELETE, "backbone.stages.p4"),
    ("backbone.stages.p2.down", "mp", "backbone.stages.p2.down"),  # the stem feeds P2
    ("backbone.down", ["avgpool"], "backbone.down"),
    ("head.layout", ["p2-p5"], "head.layout"),
    ("head.anchors.p3-p5", [[10, 13, 16, 30]], "head.anchors.p3-p5"),
    ("head.anchors.p3-p4", [[142, 110, 192, 243, 459, 401], [10, 13, 16, 30, 33, 23]], "head.anchors.p3-p4"),
    ("head.anchors", _DELETE, "head.anchors"),
    ("imgsz", [320, 352], "imgsz"),  # P6 needs multiples of 64
    ("act", "gelu", "act"),
    ("head.type", ["iauxdetect"], "head.type"),
    ("nc", 0, "nc"),
    ("spp.block", "spp", "spp.block"),
    ("neck.mid", ["width", 0.5], "neck.mid"),  # 'width' is the whole value or nothing: a TypeError before
]


@pytest.mark.parametrize("key,value,fld", INVALID, ids=[f"{k}={'<deleted>' if v is _DELETE else v}" for k, v, _ in INVALID])
def test_invalid_yaml_names_the_field(tmp_path, key, value, fld):
    raw = _raw("default")
    _set(raw, key, value)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_yaml(path)
    assert e.value.field == fld and e.value.path == str(path), e.value.line()


@pytest.mark.parametrize("section,stage,value,fld", [
    ("backbone", "p6", {"out": [256], "depth": "two"}, "backbone.stages.p6.depth"),
    ("backbone", "p6", {"out": [256], "colour": 1}, "backbone.stages.p6.colour"),
    ("neck", "p6", {"out": [33]}, "neck.stages.p6.out"),
    ("neck", "td5", {"block": "resnet"}, "neck.stages.td5.block"),
])
def test_an_unused_p6_stage_is_still_checked(tmp_path, section, stage, value, fld):
    raw = _raw("default")
    raw["head"]["layout"] = ["p3-p5", "p3-p4"]  # no P6 layout: the P6 stages build nothing
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    space = SearchSpace.from_yaml(path)  # as shipped, they load and make no decision
    assert not any(".p6." in n or ".td5." in n for n in space.decisions)
    raw[section]["stages"][stage] = value
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_yaml(path)
    assert e.value.field == fld and e.value.path == str(path), e.value.line()


def test_mid_width_in_a_one_item_list_is_the_width(tmp_path):
    raw = _raw("default")
    _set(raw, "neck.mid", ["width"])  # as `mid: width`: the chain width is the hidden width, no decision
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert not [n for n in SearchSpace.from_yaml(path).decisions if n.startswith("neck.") and n.endswith(".mid")]


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("- 1\n")
    with pytest.raises(ConfigError):
        SearchSpace.from_yaml(p)
    with pytest.raises(ConfigError, match="not found"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")


def _forward(arch: Architecture, imgsz: int = 64) -> None:
    det = Detector(arch).eval()
    with torch.no_grad():
        decoded, raw = det(torch.rand(1, 3, imgsz, imgsz))
    assert decoded.shape[-1] == 5 + arch.nc and len(raw) == len(arch.head.inputs)


def test_sample_with_an_optuna_study(tiny):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    archs = {}

    def objective(trial):
        arch = tiny.sample(trial)
        archs[trial.number] = arch
        return count_params(Detector(arch))

    study.optimize(objective, n_trials=6)
    for t in study.trials:
        d = tiny.decisions_of(t)
        assert tiny.build_arch(d) == archs[t.number]  # the stored params rebuild the same architecture
        _forward(archs[t.number], d["imgsz"])
    dist = study.trials[0].distributions
    assert isinstance(dist["backbone.p3.depth"], optuna.distributions.IntDistribution)
    assert isinstance(dist["backbone.p3.block"], optuna.distributions.CategoricalDistribution)
    assert "backbone.p3.out" not in dist  # fixed decisions are not asked
    # a static decision set: every trial asks the same names
    assert len({tuple(sorted(t.params)) for t in study.trials}) == 1


def test_nsga2_multiobjective_runs(tiny):
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4))
    study.optimize(lambda t: (count_params(Detector(tiny.sample(t))), t.number), n_trials=8)
    # the second generation's parameters come from NSGA-II's crossover and mutation: each trial's stored
    # decisions still rebuild the architecture it was scored on
    for t in study.trials:
        assert count_params(Detector(tiny.build_arch(tiny.decisions_of(t)))) == t.values[0]


def test_random_largest_smallest(tiny, default):
    for rng in (random.Random(3), np.random.default_rng(3)):
        arch = tiny.random(rng)
        _forward(arch)
    assert tiny.random(random.Random(5)) == tiny.random(random.Random(5))
    for space in (tiny, default):
        big, small = count_params(Detector(space.largest())), count_params(Detector(space.smallest()))
        rng = random.Random(0)
        for _ in range(5):
            n = count_params(Detector(space.random(rng)))
            assert small <= n <= big


def test_size_counts_distinct_architectures(tmp_path):
    raw = _raw("tiny")
    # freeze everything but a few decisions, then count distinct architectures by brute force
    raw.update(imgsz=64, act="silu", stem={"width": 8, "out": 16})
    raw["backbone"].update(block="elan", depth=1, tap=1, down="maxpool")
    raw["backbone"]["stages"] = {"p2": {"out": 16}, "p3": {"out": 32, "depth": [1, 2], "tap": [1, 2, 3]},
                                 "p4": {"out": 32}, "p5": {"out": 64}}
    raw["neck"].update(block="elan", depth=1, width=0.5, down="conv")
    raw["neck"]["stages"] = {"p3": {"out": 16}, "p4": {"out": 32}, "p5": {"out": 32}}
    raw["spp"] = {"block": "sppcsp_tiny"}
    raw["head"].update(layout=["p3-p5", "p3-p4"], type=["idetect", "decoupled"], conv="conv", expand=2,
                       hidden=[16, 32], depth=1)
    raw["head"]["anchors"] = {k: v for k, v in raw["head"]["anchors"].items() if k != "p3-p6"}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    space = SearchSpace.from_yaml(path)
    open_ = [d for d in space.decisions.values() if not d.fixed]
    assert len(open_) == 5
    seen = set()
    for values in itertools.product(*(d.choices for d in open_)):
        seen.add(space.build_arch(dict(zip((d.name for d in open_), values))).name)  # named by structure
    # (depth, tap): depth 1 with tap 2 or 3 concatenates the same outputs; hidden only matters when decoupled
    assert len(seen) == space.size() == 2 * (1 + 2) * (2 + 3)


def test_zoo_point_is_yolov7_tiny_exactly(default):
    arch = default.build_arch(default.zoo_point("yolov7-tiny"))
    zoo = load_model("yolov7-tiny", form="training")
    assert [(la.block, la.args) for la in arch.layers] == [(lz.block, lz.args) for lz in zoo.arch.layers]
    assert count_params(Detector(arch)) == count_params(zoo) == 6_228_762
    deploy = Detector(arch.deploy_form()[0])
    assert count_params(deploy) == count_params(load_model("yolov7-tiny", form="deploy")) == 6_227_101
    assert arch.act == "leaky_relu" and arch.head.type == "idetect"


def test_zoo_point_yolov7_nearest(default):
    with pytest.raises(ConfigError, match="nearest=True"):
        default.zoo_point("yolov7")
    d = default.zoo_point("yolov7", nearest=True)
    arch = default.build_arch(d)
    blocks = {la.name: la for la in arch.layers}
    assert [blocks[n].block for n in ("ds3", "spp", "h3")] == ["mp", "sppcspc", "repconv"]
    # yolov7's shapes at the space's widest choices
    assert blocks["p3"].args == {"width": 32, "depth": 4, "tap": 2, "out": 128}
    assert blocks["out3"].args == {"width": 96, "mid": 48, "depth": 4, "out": 96}  # ELAN-H: mid = out/2
    with pytest.raises(ConfigError):
        default.zoo_point("yolov9")


def test_build_arch_validates_decisions(tiny, tmp_path):
    d = tiny.random_decisions(random.Random(1))
    with pytest.raises(ConfigError) as e:
        tiny.build_arch({**d, "backbone.p9.depth": 2})
    assert e.value.field == "backbone.p9.depth"
    with pytest.raises(ConfigError) as e:
        tiny.build_arch({**d, "backbone.p3.depth": 7})
    assert e.value.field == "backbone.p3.depth"
    with pytest.raises(ConfigError, match="missing decision"):
        tiny.build_arch({k: v for k, v in d.items() if k != "backbone.p3.depth"})
    # decisions the layout does not use may be left out
    d3 = {k: v for k, v in d.items() if ".p6." not in k and ".td5." not in k} | {"head.layout": "p3-p5"}
    arch = tiny.build_arch(d3)
    path = tmp_path / "arch.yaml"
    arch.to_yaml(path)
    assert Architecture.from_yaml(path) == arch


def test_with_anchors_replaces_a_layouts_anchors_and_nothing_else(tiny):
    refit = [[4.5, 6.0, 8.25, 12.0, 16.0, 11.5], [15.0, 30.0, 31.0, 22.5, 29.5, 59.5],
             [58.0, 45.0, 78.0, 99.0, 186.5, 163.0]]
    new = tiny.with_anchors({"p3-p5": refit})
    assert new.anchors["p3-p5"] == refit and new.anchors["p3-p4"] == tiny.anchors["p3-p4"]
    assert tiny.anchors["p3-p5"] != refit  # the original space is unchanged
    d = {**tiny.smallest_decisions(), "head.layout": "p3-p5", "head.type": "detect"}
    det = Detector(new.build_arch(d))
    assert det.arch.head.anchors == det.head.anchor_sizes() == refit
    assert new.arch_id(d) != tiny.arch_id(d)  # another model: its id differs
    assert tiny.with_anchors({"p3-p5": tiny.anchors["p3-p5"]}) is tiny
    with pytest.raises(ConfigError) as e:  # two levels for a three-level layout
        tiny.with_anchors({"p3-p5": refit[:2]})
    assert e.value.field == "head.anchors.p3-p5"
    with pytest.raises(ConfigError):  # two anchors per level where the space has three
        tiny.with_anchors({"p3-p5": [lv[:4] for lv in refit]})


def test_a_heads_anchor_sizes_set_both_buffers(tiny):
    d = {**tiny.smallest_decisions(), "head.layout": "p3-p4", "head.type": "idetect"}
    det = Detector(tiny.build_arch(d, nc=2))
    new = [[5.0, 7.0, 9.0, 11.0, 13.0, 15.0], [20.0, 22.0, 30.0, 40.0, 50.0, 60.0]]
    det.head.set_anchor_sizes(new)
    assert det.head.anchor_sizes() == new
    want = torch.tensor(new).view(2, 3, 2) / torch.tensor([8.0, 16.0]).view(-1, 1, 1)
    assert torch.allclose(det.head.anchors, want)  # in stride units, as the loss reads them
    det.sync_arch_anchors()
    assert det.arch.head.anchors == new
    with pytest.raises(ValueError, match="levels"):
        det.head.set_anchor_sizes(new[:1])


def test_block_out_channels_matches_detector(tiny):
    archs = [Architecture.from_yaml(zoo_path(m)) for m in list_models()]
    archs += [tiny.random(random.Random(i)) for i in range(10)]
    for arch in archs:
        with torch.device("meta"):
            det = Detector(arch)
        channels: list[int] = []
        for layer, ins in zip(arch.layers, arch.resolve()):
            c_in = [arch.in_channels if j == -1 else channels[j] for j in ins]
            channels.append(block_out_channels(layer.block, c_in, layer.args))
        assert channels == det.channels, arch.name


@pytest.mark.parametrize("name,n,imgsz", [("tiny", 30, 128), ("default", 10, 320)])
def test_block_signatures_are_complete(name, n, imgsz):
    space = load_space(name)
    table = set(space.block_signatures(imgsz))
    rng = random.Random(7)
    archs = [space.random(rng) for _ in range(n)] + [space.largest(), space.smallest()]
    for arch in archs:
        sigs = arch_signatures(arch, imgsz)
        assert len(sigs) == len(arch.layers) + len(arch.head.inputs)
        missing = [s.key() for s in sigs if s not in table]
        assert not missing, missing[:3]


def test_block_signatures_all_sizes(tiny):
    all_sizes = tiny.block_signatures()
    assert set(tiny.block_signatures(64)) | set(tiny.block_signatures(128)) == set(all_sizes)
    assert len({s.key() for s in all_sizes}) == len(all_sizes)  # keys are unique


def test_signature_roundtrip_and_modules_run(tiny):
    sigs = tiny.block_signatures(64)
    rng = random.Random(0)
    by_block: dict[str, list[BlockSignature]] = {}
    for s in sigs:
        by_block.setdefault(s.block, []).append(s)
    picked = [rng.choice(v) for v in by_block.values() for _ in range(3)]
    assert {"elan", "eelan", "mp", "maxpool", "sppcspc", "sppcsp_tiny", "repconv", "concat", "upsample",
            "head.yolo", "head.decoupled"} <= set(by_block)
    for s in picked:
        back = BlockSignature.from_dict(s.to_dict())
        assert back == s and hash(back) == hash(s) and back.key() == s.key()
        module = s.build_module()
        with torch.no_grad():
            out = module(*[torch.rand(shape) for shape in s.input_shapes()])
        assert isinstance(out, (torch.Tensor, tuple)), s.key()


def test_signature_matches_the_layer_it_describes(tiny):
    """A layer's signature builds a module with the layer's parameter count and output shape."""
    arch = tiny.random(random.Random(11))
    det = Detector(arch).eval()
    sigs = arch_signatures(arch, 64)
    for layer_module, sig in zip(det.layers, sigs):
        module = sig.build_module()
        assert count_params(module) == count_params(layer_module), sig.key()
