"""kill -9 of real subprocesses mid-work: the rerun resumes and loses nothing that was finished.

Training, the search and the pipeline have their own kill tests (tests/training, tests/nas_search,
tests/pipeline); these cover table building and supernet training, each killed at several points.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import checkpoint_epoch
from ..latency_table import MICRO_IMGSZ, micro_space_file
from ..nas_search import ROOT, env


def _run_until(args: list[str], ready: Callable[[], bool], timeout: float = 600) -> bool:
    """Start `detforge ARGS`, SIGKILL it as soon as `ready()` holds; False if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return False


def _entries(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return {}


def test_table_build_killed_twice_keeps_every_saved_entry(tmp_path):
    space = micro_space_file(tmp_path)
    out = tmp_path / "table.json"
    args = ["latency", "build", "--space", str(space), "--backend", "ort-cpu", "--imgsz", str(MICRO_IMGSZ),
            "--out", str(out), "--threads", "1", "--quick", "--fit-models", "2", "--save-every", "0", "--no-progress"]
    kills, seen = 0, {}
    for at_least in (1, 2):  # the first save with entries, then a later one
        if _run_until(args, lambda n=at_least: len(_entries(out)) >= n * 8):
            kills += 1
            after = _entries(out)
            # what was saved before the kill is still there, measured once: same medians
            assert all(after[k]["median_ms"] == v["median_ms"] for k, v in seen.items())
            seen = after
    assert kills >= 1, "the build finished before it could be killed"
    assert subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, check=False).returncode == 0
    final = _entries(out)
    assert all(final[k]["median_ms"] == v["median_ms"] for k, v in seen.items())
    from search_spaces.space import load_space

    assert set(final) == {s.key() for s in load_space(str(space)).block_signatures(MICRO_IMGSZ, 1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trainer.synthetic import generate

    return generate(tmp_path_factory.mktemp("d"), train=16, val=8, imgsz=64, classes=2, seed=0)


def test_supernet_training_killed_mid_epoch_resumes_to_the_end(data, tmp_path):
    out = tmp_path / "sn"
    args = ["supernet", "train", "--space", "tiny", "--data", str(data), "--epochs", "3", "--imgsz", "64",
            "--batch", "8", "--out", str(out), "--workers", "0", "--json"]
    kills = 0
    for epoch in (0, 1):  # killed during epoch 2, then (resumed) during epoch 3
        resume = ["--resume"] if kills else []
        if _run_until(args + resume, lambda e=epoch: checkpoint_epoch(out / "last.pt") >= e):
            kills += 1
            assert checkpoint_epoch(out / "last.pt") >= epoch  # the finished epoch survived the kill
    assert kills >= 1, "training finished before it could be killed"
    res = subprocess.run([sys.executable, "-m", "nas.cli", *args, "--resume"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["epochs"] == 3
    assert checkpoint_epoch(out / "last.pt") == 2 and (out / "supernet.pt").is_file()
