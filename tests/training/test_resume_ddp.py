"""Resume after kill -9 mid-epoch reproduces the uninterrupted run; 2-process gloo DDP ends with equal weights."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from search_spaces.io import load_weights

from ..helpers import checkpoint_epoch

TRAIN = ["train", "--model", "yolov7-tiny", "--imgsz", "96", "--batch", "4", "--workers", "0", "--device", "cpu",
         "--seed", "3", "--json"]


def _detforge(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nas.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _first_row(run: Path) -> dict[str, str]:
    """The first epoch's row of a run's results.csv (written just after its checkpoint), else {}."""
    try:
        with open(run / "results.csv", newline="") as f:
            return next(csv.DictReader(f), {})
    except FileNotFoundError:
        return {}


def test_resume_after_kill_matches_uninterrupted_run(small_data, tmp_path):
    # the uninterrupted run and the one to kill run side by side (one thread each on two cores)
    full = _detforge(*TRAIN, "--data", str(small_data), "--epochs", "2", "--out", str(tmp_path / "full"))
    killed_dir = tmp_path / "killed"
    proc = _detforge(*TRAIN, "--data", str(small_data), "--epochs", "2", "--out", str(killed_dir))
    try:
        deadline = time.time() + 600
        while not _first_row(killed_dir) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        row = _first_row(killed_dir)
        assert row, proc.stderr.read()[-3000:] if proc.poll() is not None else "no epoch finished in time"
        # now inside the last epoch's training: a quarter of the first epoch's (which also paid the start-up), so
        # a quiet machine whose epochs take under a second does not finish the run before the kill
        time.sleep(float(row["train_s"]) / 4)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert checkpoint_epoch(killed_dir / "last.pt") == 0
        _, err = full.communicate(timeout=600)
        assert full.returncode == 0, err
    finally:
        for p in (proc, full):  # nothing left running after a failed check
            if p.poll() is None:
                p.kill()
                p.wait()
    again = _detforge(*TRAIN, "--data", str(small_data), "--epochs", "2", "--out", str(killed_dir), "--resume")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((killed_dir / "summary.json").read_text())
    assert b["epochs"] == 2
    assert a["rank_weight_digests"] == b["rank_weight_digests"]
    assert a["last"]["map"] == b["last"]["map"]
    # the EMA weights (the saved model) too: a resume must restore the average's state, not only the weights
    ema_a, ema_b = (load_weights(d / "model" / "weights.pt") for d in (tmp_path / "full", killed_dir))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_ddp_two_cpu_processes_end_identical(small_data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "nas.cli", *TRAIN, "--data",
           str(small_data), "--epochs", "1", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["rank_weight_digests"]) == 2 and summary["ddp_weights_identical"]
