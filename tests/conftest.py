"""Shared fixtures: the reference data from the official YOLOv7 code, and quiet warnings."""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

REFERENCE = Path(os.environ.get("DETFORGE_REFERENCE", Path(__file__).resolve().parents[2] / "shared/reference/yolov7"))
ZOO = ["yolov7-tiny", "yolov7", "yolov7x", "yolov7-w6", "yolov7-e6", "yolov7-d6", "yolov7-e6e"]

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per CPU), each worker gets its share of the cores: its torch
    and every process it starts use CPUs / workers threads, so the workers never oversubscribe the CPU."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        # set before torch is imported (test modules import it after this hook), so torch reads it too; hence
        # latency_tables.host.usable_cores' rule written out here: importing that package loads torch
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = os.environ["DETFORGE_TEST_THREADS"] = str(max(1, cpus // int(workers)))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's process-wide thread count (the PyTorch latency backend does) leaves it as it
    found it: the next test on that worker would run oversubscribed."""
    torch = sys.modules.get("torch")  # not imported here: a test that does not use torch need not load it
    n = torch.get_num_threads() if torch is not None else None
    yield
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "model_stats.json").is_file():
        pytest.skip(f"reference data not found at {REFERENCE} (set DETFORGE_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def model_stats_ref(reference: Path) -> dict:
    return json.loads((reference / "model_stats.json").read_text())["models"]
