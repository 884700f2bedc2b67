"""The test workers of `make test` (pytest-xdist) share the CPU instead of oversubscribing it."""
from __future__ import annotations

import os

import pytest
import torch


def test_each_worker_runs_torch_on_its_share_of_the_cpus():
    if "PYTEST_XDIST_WORKER_COUNT" not in os.environ:
        pytest.skip("runs under pytest-xdist workers (make test)")
    if "DETFORGE_TEST_THREADS" not in os.environ:  # the hook keeps a caller's own setting
        pytest.skip(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} was set by the caller")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    assert os.environ["OMP_NUM_THREADS"] == str(share)  # inherited by every process a test starts
    assert torch.get_num_threads() == share  # torch read it: the hook ran before torch was imported
