"""Which device and software a latency was measured on, and how two such descriptions differ."""
from __future__ import annotations

import os
import re
import sys
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from search_spaces.errors import DetforgeError
from search_spaces.typecheck import type_name, type_ok

from .host import cpu_model, dist_version, nvidia_smi_gpu, system, usable_cores
from .measurement import user_stacklevel

# Libraries whose version can change a backend's latency; others are left out so they cause no false alarms.
# ORT backends list torch too: an nn.Module reaches them through torch's exporter, which shapes the graph.
_BACKEND_LIBS = {
    "ort": ("onnxruntime", "torch"),
    "torch": ("torch",),
    "tensorrt": ("tensorrt", "torch"),
}
DEFAULT_IGNORE = ("python", "kernel")  # patch-level noise that does not move latencies


def _dist_version(lib: str) -> str | None:
    """Installed version of `lib` from package metadata (no import), or its __version__ if already imported."""
    version = dist_version(lib)
    if version is not None:
        return version
    mod = sys.modules.get(lib)
    return getattr(mod, "__version__", None) if mod is not None else None


def _libs_for(backend: str) -> tuple[str, ...]:
    """Libraries relevant to a backend name such as 'ort-cpu', 'torch-cuda', 'tensorrt'."""
    libs = _BACKEND_LIBS.get(backend.split("-")[0], ())
    return libs + ("tensorrt",) if backend == "ort-trt" else libs


def gpu_info() -> tuple[str | None, str | None]:
    """(GPU name, driver version) of the GPU CUDA numbers 0 from nvidia-smi (host.first_visible_gpu), else from
    torch.cuda; (None, None) without one."""
    name, driver = nvidia_smi_gpu()
    if name is not None:
        return name, driver
    try:
        import torch
    except ImportError:
        return None, None
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), None
    return None, None


@dataclass
class DeviceFingerprint:
    """The device and software a latency table was measured with."""

    cpu_model: str
    logical_cores: int
    usable_cores: int
    threads: int | None
    gpu_name: str | None
    gpu_driver: str | None
    backend: str
    precision: str
    batch: int
    versions: dict[str, str | None] = field(default_factory=dict)
    os: str = ""
    arch: str = ""
    kernel: str = ""
    python: str = ""

    @classmethod
    def collect(cls, *, backend: str, threads: int | None, precision: str, batch: int = 1,
                gpu: bool | None = None) -> DeviceFingerprint:
        """Describe this machine as `backend` sees it (GPU fields only for GPU backends unless `gpu`)."""
        # A CPU table built on a machine that happens to have a GPU must still match a GPU-less twin.
        use_gpu = not backend.endswith("cpu") if gpu is None else gpu
        gpu_name, driver = gpu_info() if use_gpu else (None, None)
        return cls(
            cpu_model=cpu_model(),
            logical_cores=os.cpu_count() or 1,
            usable_cores=usable_cores(),
            threads=threads,
            gpu_name=gpu_name,
            gpu_driver=driver,
            backend=backend,
            precision=precision,
            batch=batch,
            versions={lib: _dist_version(lib) for lib in _libs_for(backend)},
            **system(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceFingerprint:
        """Inverse of to_dict; unknown keys are ignored so newer files still load."""
        if not isinstance(d, Mapping):
            raise DetforgeError(f"a device fingerprint must be a mapping, got {type(d).__name__}",
                                field="device")
        hints = typing.get_type_hints(cls)
        known = {k: v for k, v in d.items() if k in hints}
        for k, v in known.items():
            if not type_ok(v, hints[k]):
                raise DetforgeError(f"expected {type_name(hints[k])}, got {type(v).__name__} {v!r}",
                                    field=f"device.{k}")
        versions = known.get("versions", {})
        if not isinstance(versions, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in versions.items()):
            raise DetforgeError("library versions must map names to version strings or null",
                                field="device.versions")
        try:
            return cls(**known)
        except TypeError as e:
            raise DetforgeError(f"incomplete device fingerprint ({e})", field="device") from None

    def compare(self, other: DeviceFingerprint, *, ignore: Sequence[str] = DEFAULT_IGNORE,
                labels: tuple[str, str] = ("table", "here")) -> list[str]:
        """Human-readable differences from `other` ('field: A (table) vs B (here)'), [] when they match."""
        diffs = []
        for f in fields(self):
            if f.name in ignore or f.name == "versions":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                diffs.append(f"{f.name}: {a!r} ({labels[0]}) vs {b!r} ({labels[1]})")
        if "versions" not in ignore:
            for lib in sorted(set(self.versions) | set(other.versions)):
                a, b = self.versions.get(lib), other.versions.get(lib)
                if a != b and f"versions.{lib}" not in ignore:
                    diffs.append(f"versions.{lib}: {a!r} ({labels[0]}) vs {b!r} ({labels[1]})")
        return diffs

    def same_device(self, other: DeviceFingerprint) -> bool:
        """Whether `other` is the same hardware (CPU and GPU model): its timings may go into this table."""
        return (self.cpu_model, self.gpu_name) == (other.cpu_model, other.gpu_name)

    def slug(self) -> str:
        """A short file-name-safe id, e.g. 'intel-xeon_2t_ort-cpu_fp32_b1'."""
        dev = self.gpu_name or self.cpu_model
        dev = re.sub(r"\(r\)|\(tm\)|cpu|@.*$|processor\b", "", dev, flags=re.IGNORECASE)
        dev = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")[:40] or "device"
        threads = f"_{self.threads}t" if self.threads else ""
        return f"{dev}{threads}_{self.backend}_{self.precision}_b{self.batch}"


def check_fingerprint(expected: DeviceFingerprint, actual: DeviceFingerprint, *, what: str = "latency table",
                      ignore: Sequence[str] = DEFAULT_IGNORE) -> list[str]:
    """Warn (UserWarning) when `actual` differs from `expected`; returns the differences."""
    diffs = expected.compare(actual, ignore=ignore)
    if diffs:
        warnings.warn(f"{what} was measured on a different device/software setup, so its latencies may not "
                      f"hold here: " + "; ".join(diffs), UserWarning, stacklevel=user_stacklevel())
    return diffs
