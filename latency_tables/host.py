"""What this machine is, read with the standard library alone.

Probe bundles ship this file beside runner.py, so a remote device describes itself exactly as detforge's
DeviceFingerprint does here: one reading of the CPU, the GPU, the usable cores and the library versions.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata

# Distribution names under which each library may be installed (CPU and GPU builds, per-CUDA wheels).
DISTS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "torch": ("torch",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"),
    "onnx": ("onnx",),
}


def dist_version(lib: str) -> str | None:
    """Installed version of library `lib` from package metadata (no import), or None."""
    for dist in DISTS.get(lib, (lib,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 'model name', Arm 'Hardware'/'Model'), else platform."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m:
            return re.sub(r"\s+", " ", m.group(1)).strip()
    return platform.processor() or platform.machine() or "unknown"


def nvidia_smi_gpu() -> tuple[str | None, str | None]:
    """(GPU name, driver version) of GPU 0 as nvidia-smi reports it, else (None, None)."""
    if shutil.which("nvidia-smi"):
        try:
            cmd = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "--id=0"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            name, _, driver = out.partition(",")
            if name:
                return name.strip(), driver.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return None, None


def usable_cores() -> int:
    """CPUs this process may run on (cgroup/affinity limits), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def system() -> dict[str, str]:
    """The OS, architecture, kernel and Python fields of a fingerprint."""
    return {"os": platform.system(), "arch": platform.machine(), "kernel": platform.release(),
            "python": platform.python_version()}
