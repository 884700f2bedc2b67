"""A small synthetic dataset shared by the training tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.synthetic import generate


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, train=16, val=8, imgsz=96, classes=3, seed=1)
    return root / "data.yaml"
