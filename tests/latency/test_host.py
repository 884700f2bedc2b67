"""What the host module reads: which GPU nvidia-smi is asked about, under CUDA_VISIBLE_DEVICES."""
from __future__ import annotations

import subprocess

import pytest

from latency_tables import host


@pytest.mark.parametrize("visible, asked", [(None, "0"), ("2", "2"), ("3,1", "3"), ("GPU-8f3a", "GPU-8f3a"),
                                            ("", None), ("-1", None)])
def test_nvidia_smi_is_asked_about_the_gpu_cuda_numbers_zero(visible, asked, monkeypatch):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H100 80GB HBM3, 550.54\n")

    monkeypatch.setattr(host.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(host.subprocess, "run", fake_run)
    name, driver = host.nvidia_smi_gpu()
    if asked is None:  # every GPU hidden: none is described
        assert (name, driver, calls) == (None, None, [])
    else:
        assert calls[0][-1] == f"--id={asked}" and (name, driver) == ("NVIDIA H100 80GB HBM3", "550.54")
