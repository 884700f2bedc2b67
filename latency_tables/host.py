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
    # the -libs wheels are what onnxruntime-gpu's TensorRT provider installs (tensorrt-libs: the 8.6 name)
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13-libs",
                 "tensorrt-cu12-libs", "tensorrt-cu11-libs", "tensorrt-libs"),
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


def first_visible_gpu() -> str | None:
    """nvidia-smi's id of the GPU CUDA numbers 0: the first of CUDA_VISIBLE_DEVICES (an index or a UUID), else
    "0"; None where that variable hides every GPU (empty, or a negative index).

    An index is nvidia-smi's (PCI bus order), which is CUDA's only with CUDA_DEVICE_ORDER=PCI_BUS_ID: on a host
    of mixed GPUs without it, CUDA numbers the fastest first. A MIG UUID fails in nvidia-smi, and the caller
    falls back to torch's name for the device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"  # nvidia-smi ignores CUDA_VISIBLE_DEVICES and numbers GPUs in its own order: it must be told
    first = visible.split(",")[0].strip()
    return None if not first or first.startswith("-") else first


def nvidia_smi_gpu() -> tuple[str | None, str | None]:
    """(GPU name, driver version) of the GPU CUDA numbers 0 as nvidia-smi reports it, else (None, None)."""
    gpu = first_visible_gpu()
    if gpu is not None and shutil.which("nvidia-smi"):
        try:
            cmd = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", f"--id={gpu}"]
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
