"""Fixtures of the NAS search tests: one torch thread, and the shared dataset / table / supernet."""
from __future__ import annotations

import pytest
import torch

from . import artifacts, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads; one thread is immune to oversubscription on a shared CPU."""
    n = one_thread()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """data.yaml, the stand-in latency table and a 1-epoch supernet, built once per session."""
    return artifacts(tmp_path_factory.getbasetemp() / "nas_search_shared")
