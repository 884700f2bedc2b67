"""`detforge latency ...`: every sub-command with --json, and one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest

from latency_tables import LatencyTable
from nas.cli import main
from search_spaces.space import load_space

from . import MICRO_IMGSZ, micro_space_file


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    """The micro search space's YAML, given to the CLI as --space."""
    return str(micro_space_file(tmp_path_factory.mktemp("space")))


@pytest.fixture(scope="module")
def space(space_file):
    """The micro search space."""
    return load_space(space_file)


def run_json(capsys, *argv: str) -> dict:
    """Run detforge with --json; the one JSON object it printed."""
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def table_path(space_file, tmp_path_factory):
    """A table built through the CLI."""
    path = tmp_path_factory.mktemp("cli") / "table.json"
    assert main(["latency", "build", "--space", space_file, "--backend", "ort-cpu", "--imgsz",
                 str(MICRO_IMGSZ), "--out", str(path), "--threads", "2", "--quick", "--fit-models", "3",
                 "--no-progress"]) == 0
    return path


@pytest.fixture
def arch_yaml(space, tmp_path):
    """The largest stand-in architecture as a YAML file."""
    path = tmp_path / "arch.yaml"
    space.largest().to_yaml(path)
    return path


def test_build_resumes_and_reports(space, space_file, table_path, capsys):
    build = ["latency", "build", "--space", space_file, "--imgsz", str(MICRO_IMGSZ), "--out", str(table_path),
             "--quick", "--no-progress"]
    before = table_path.read_bytes()
    d = run_json(capsys, *build, "--fit-models", "3")
    assert d["entries"] == len(space.block_signatures(MICRO_IMGSZ, 1)) and d["backend"] == "ort-cpu"
    assert d["imgsz"] == MICRO_IMGSZ and d["threads"] == 2
    assert table_path.read_bytes() == before  # a finished table is left as it is (studies check its digest)
    # more fit models than the table holds: the entries are kept, and only the overhead is fitted again
    d = run_json(capsys, *build, "--fit-models", "4")
    assert d["entries"] == len(space.block_signatures(MICRO_IMGSZ, 1))
    assert len(LatencyTable.load(table_path, check_device=False).overhead.points) == 4


def test_predict(table_path, arch_yaml, capsys):
    d = run_json(capsys, "latency", "predict", "--table", str(table_path), str(arch_yaml), "--blocks")
    assert d["predicted_ms"] > 0 and d["blocks"] == len(d["block_ms"])
    capsys.readouterr()
    assert main(["latency", "predict", "--table", str(table_path), str(arch_yaml)]) == 0
    assert "predicted_ms" in capsys.readouterr().out


def test_measure(arch_yaml, capsys):
    d = run_json(capsys, "latency", "measure", str(arch_yaml), "--backend", "ort-cpu", "--imgsz",
                 str(MICRO_IMGSZ), "--quick")
    assert d["median_ms"] > 0 and d["input_shape"] == [3, MICRO_IMGSZ, MICRO_IMGSZ]
    assert d["backend"] == "ort-cpu"


def test_validate(space_file, table_path, tmp_path, capsys):
    d = run_json(capsys, "latency", "validate", "--table", str(table_path), "--space", space_file, "--n", "3",
                 "--quick", "--no-progress", "--plot", str(tmp_path / "v.png"))
    assert {"mape", "kendall_tau", "spearman", "within_5", "within_10"} <= set(d) and d["n"] == 3
    assert (tmp_path / "v.png").is_file()
    assert main(["latency", "validate", "--table", str(table_path), "--space", space_file, "--n", "0",
                 "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "n must be >= 1" in err


def test_pack(space, space_file, tmp_path, capsys):
    d = run_json(capsys, "latency", "pack", "--space", space_file, "--out", str(tmp_path / "b.tar.gz"),
                 "--imgsz", str(MICRO_IMGSZ), "--fit-models", "2", "--no-progress")
    assert d["blocks"] == len(space.block_signatures(MICRO_IMGSZ, 1)) and d["models"] == 2 and d["bytes"] > 0


@pytest.mark.parametrize("content", ['{"schema": "detforge.latency_table", "version": 1, "entr', "[]"])
def test_corrupt_table_is_one_line_and_exit_2(table_path, arch_yaml, tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    capsys.readouterr()
    assert main(["latency", "predict", "--table", str(bad), str(arch_yaml), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detforge: error: ") and str(bad) in err and "\n" not in err


def test_import_errors_are_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert main(["latency", "import", str(tmp_path / "nope.json"), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detforge: error: ") and "nope.json" in err and "\n" not in err
