"""Every `detforge` command starts without loading the libraries only some commands need."""
from __future__ import annotations

import subprocess
import sys

# each costs a CLI start a second or more here (onnx through ml_dtypes, torchvision through torch._dynamo)
HEAVY = ("onnx", "torchvision", "optuna", "onnxruntime.quantization", "torch_pruning", "nni", "pycocotools")


def test_building_the_parser_loads_no_library_a_command_imports_when_it_runs():
    code = ("import sys; from nas.cli import build_parser; build_parser(); "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "", f"loaded at startup: {res.stdout.strip()}"
