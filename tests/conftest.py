"""Shared fixtures: the reference data from the official YOLOv7 code, and quiet warnings."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

REFERENCE = Path(os.environ.get("DETFORGE_REFERENCE", Path(__file__).resolve().parents[2] / "shared/reference/yolov7"))
ZOO = ["yolov7-tiny", "yolov7", "yolov7x", "yolov7-w6", "yolov7-e6", "yolov7-d6", "yolov7-e6e"]

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "model_stats.json").is_file():
        pytest.skip(f"reference data not found at {REFERENCE} (set DETFORGE_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def model_stats_ref(reference: Path) -> dict:
    return json.loads((reference / "model_stats.json").read_text())["models"]
