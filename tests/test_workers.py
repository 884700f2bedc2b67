"""The test workers of `make test` (pytest-xdist) share the CPU instead of oversubscribing it."""
from __future__ import annotations

import os

import pytest
import torch

from latency_tables.host import usable_cores


def test_each_worker_runs_torch_on_its_share_of_the_cpus():
    if "PYTEST_XDIST_WORKER_COUNT" not in os.environ:
        pytest.skip("runs under pytest-xdist workers (make test)")
    if "OMP_NUM_THREADS" in os.environ and "DETFORGE_TEST_THREADS" not in os.environ:  # the hook keeps the caller's
        pytest.skip(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} was set by the caller")
    share = max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    assert os.environ["OMP_NUM_THREADS"] == str(share)  # inherited by every process a test starts
    assert torch.get_num_threads() == share  # torch read it: the hook ran before torch was imported
