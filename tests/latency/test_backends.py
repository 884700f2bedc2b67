"""Backends on a tiny conv net, the ONNX export, and the device fingerprint; GPU paths skip without a GPU."""
from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from latency_tables.backends import (
    BACKEND_NAMES,
    OrtBackend,
    TensorRTBackend,
    TorchBackend,
    get_backend,
)
from latency_tables.fingerprint import DeviceFingerprint, check_fingerprint
from latency_tables.measurement import Measurement
from latency_tables.onnx_utils import check_onnx, export_onnx, input_specs, is_quantized
from search_spaces.errors import DetforgeError

SHAPE = (3, 32, 32)
# A short protocol: these tests check plumbing and fields, never how fast anything is.
FAST = {"warmup": 2, "warmup_s": 0.0, "min_runs": 5, "max_runs": 30, "max_time_s": 2.0, "target_rel_ci": 0.05}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def tiny_net() -> nn.Module:
    """A few convs, like a detector's stem."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.LeakyReLU(0.1),
                         nn.Conv2d(16, 16, 1)).eval()


class TwoInTwoOut(nn.Module):
    """Two inputs and a nested output, like a neck block fed by two levels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, 1, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x, y):
        """A tuple holding a tensor and a list of two tensors."""
        s = self.a(x) + self.b(y)
        return s, [s.sigmoid(), s.mean(dim=(2, 3))]


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """The shared tiny conv net."""
    return tiny_net()


@pytest.fixture(scope="module")
def onnx_bytes(net) -> bytes:
    """The tiny net exported once."""
    return export_onnx(net, SHAPE)


def assert_filled(m: Measurement, backend: str, precision: str, threads: int | None = 2, batch: int = 1) -> None:
    """Every field of a backend Measurement is set and consistent."""
    assert m.median_ms > 0 and m.p10_ms > 0 and m.mean_ms > 0 and m.min_ms > 0
    assert m.p10_ms <= m.median_ms <= m.p90_ms and m.iqr_ms >= 0 and m.noise >= 0
    assert m.runs >= 5 and m.warmup >= 2 and m.repeats == 1 and m.rejected_outliers >= 0
    assert (m.backend, m.precision, m.threads, m.batch) == (backend, precision, threads, batch)
    assert m.input_shape == list(SHAPE)
    assert m.stop_reason in ("stable", "max_runs", "max_time") and m.ci_rel is not None


# --- ONNX export -------------------------------------------------------------------------------------------

def test_export_passes_checker_and_matches_torch(net, onnx_bytes, tmp_path):
    check_onnx(onnx_bytes)
    (name, dims, _), = input_specs(onnx_bytes)
    assert name == "input" and dims[0] == "batch" and dims[1:] == list(SHAPE)  # dynamic batch only
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, *SHAPE), dtype=np.float32)  # batch 2 through a b1 export
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() < 1e-4
    path = tmp_path / "sub" / "tiny.onnx"
    assert export_onnx(net, SHAPE, path=path) and path.is_file()
    check_onnx(path)


def test_export_names_several_inputs_and_nested_outputs():
    model = TwoInTwoOut().eval()
    data = export_onnx(model, [(4, 8, 8), (4, 8, 8)], batch=2)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input0", "input1"]
    assert [o.name for o in sess.get_outputs()] == ["output0", "output1", "output2"]
    x, y = (np.random.default_rng(i).standard_normal((3, 4, 8, 8), dtype=np.float32) for i in (2, 3))
    got = sess.run(None, {"input0": x, "input1": y})
    with torch.no_grad():
        s, (sig, mean) = model(torch.from_numpy(x), torch.from_numpy(y))
    for g, r in zip(got, (s, sig, mean)):
        assert np.abs(g - r.numpy()).max() < 1e-4


def test_export_restores_every_modules_own_mode_and_rejects_non_modules(net):
    model = tiny_net().train()
    model[2].eval()  # a frozen layer inside a training model keeps its eval mode
    export_onnx(model, SHAPE, check=False)
    assert [m.training for m in model] == [True, True, False, True, True] and model.training
    wrapper = nn.Sequential(tiny_net().eval())  # a training-mode wrapper around an eval-mode model
    export_onnx(wrapper, SHAPE, check=False)
    assert wrapper.training and not any(m.training for m in wrapper[0].modules())
    with pytest.raises(DetforgeError, match="nn.Module"):
        export_onnx(b"not a module", SHAPE)
    with pytest.raises(DetforgeError, match="input_shape"):
        export_onnx(net, (3, 0, 32))
    with pytest.raises(DetforgeError, match="not a valid ONNX"):
        check_onnx(b"garbage")


# --- ONNX Runtime -----------------------------------------------------------------------------------------

def test_ort_cpu_measures_a_module(net):
    b = OrtBackend("cpu", threads=2)
    m = b.measure(net, SHAPE, **FAST)
    assert_filled(m, "ort-cpu", "fp32")
    assert m.other_load is None or 0.0 <= m.other_load <= 1.0


def test_ort_accepts_bytes_and_paths_and_reads_the_shape(net, onnx_bytes, tmp_path):
    b = OrtBackend("cpu", threads=1)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(onnx_bytes)
    for src in (onnx_bytes, path, str(path)):
        m = b.measure(src, None, **FAST)  # the static C, H, W come from the graph
        assert m.input_shape == list(SHAPE) and m.threads == 1 and m.median_ms > 0
    m2 = b.measure(onnx_bytes, SHAPE, batch=2, **FAST)
    assert m2.batch == 2
    with pytest.raises(DetforgeError, match="does not fit"):
        b.prepare(onnx_bytes, (3, 64, 64))
    with pytest.raises(DetforgeError, match="not found"):
        b.prepare(tmp_path / "missing.onnx")
    fixed = export_onnx(net, SHAPE, dynamic_batch=False)  # batch 1 only
    with pytest.raises(DetforgeError, match="fixed batch of 1") as e:
        b.prepare(fixed, None, batch=2)  # ORT would fail at its first run, a traceback
    assert e.value.field == "batch"
    assert b.measure(fixed, None, batch=1, **FAST).batch == 1


def test_ort_runner_outputs_match_torch(net):
    x = np.random.default_rng(4).standard_normal((2, *SHAPE), dtype=np.float32)
    with OrtBackend("cpu").prepare(net, SHAPE, batch=2, inputs=[x]) as runner:
        got = runner.outputs()[0]
    with TorchBackend("cpu").prepare(net, SHAPE, batch=2, inputs=[x]) as runner:
        ref = runner.outputs()[0]
    assert np.abs(got - ref).max() < 1e-4


def test_ort_fp16_and_int8(net, onnx_bytes, tmp_path):
    m = OrtBackend("cpu", precision="fp16").measure(net, SHAPE, **FAST)
    assert m.precision == "fp16" and m.median_ms > 0
    with pytest.raises(DetforgeError, match="quantized"):
        OrtBackend("cpu", precision="int8").prepare(net, SHAPE)
    with pytest.raises(DetforgeError, match="QuantizeLinear"):
        OrtBackend("cpu", precision="int8").prepare(onnx_bytes, SHAPE)

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        """Four random calibration batches."""

        def __init__(self):
            rng = np.random.default_rng(5)
            self.batches = iter([{"input": rng.standard_normal((1, *SHAPE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            """Next batch or None."""
            return next(self.batches, None)

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    src.write_bytes(onnx_bytes)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ)
    assert is_quantized(dst) and not is_quantized(onnx_bytes)
    m8 = OrtBackend("cpu", precision="int8").measure(dst, SHAPE, **FAST)
    assert m8.precision == "int8" and m8.median_ms > 0


def test_measure_many_times_ort_sessions_alone_and_torch_round_robin(net, monkeypatch):
    from latency_tables import measurement

    groups: list[int] = []
    real = measurement._run_repeat

    def spy(runners, cfg):
        groups.append(len(runners))
        return real(runners, cfg)

    monkeypatch.setattr(measurement, "_run_repeat", spy)
    out = OrtBackend("cpu").measure_many({"small": (net, SHAPE), "large": (net, (3, 64, 64))}, **FAST)
    assert list(out) == ["small", "large"]
    assert out["large"].input_shape == [3, 64, 64] and out["small"].median_ms > 0
    assert groups == [1, 1]  # an idle ORT session's spinning pool would slow the next one down
    groups.clear()
    both = TorchBackend("cpu").measure_many([(net, SHAPE), (net, (3, 64, 64))], **FAST)
    assert groups == [2]  # one pool for all modules: round-robin, so drifting load hits both alike
    assert both[0].runs + both[0].rejected_outliers == both[1].runs + both[1].rejected_outliers


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA EP is installed")
def test_ort_gpu_providers_missing_is_a_clear_error():
    for providers in ("cuda", "trt"):
        with pytest.raises(DetforgeError, match="ExecutionProvider"):
            OrtBackend(providers)


@CUDA
@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime here has no CUDAExecutionProvider (needs onnxruntime-gpu)")
def test_ort_cuda_measures_and_matches(net):
    x = np.random.default_rng(6).standard_normal((1, *SHAPE), dtype=np.float32)
    b = OrtBackend("cuda")
    with b.prepare(net, SHAPE, inputs=[x]) as runner:
        got = runner.outputs()[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() < 1e-3
    assert_filled(b.measure(net, SHAPE, **FAST), "ort-cuda", "fp32")


# --- PyTorch eager ----------------------------------------------------------------------------------------

def test_torch_cpu_measures_without_touching_the_model(net):
    model = tiny_net().train()
    m = TorchBackend("cpu", threads=2).measure(model, SHAPE, **FAST)
    assert_filled(m, "torch-cpu", "fp32")
    assert model.training and next(model.parameters()).dtype == torch.float32
    mb = TorchBackend("cpu", precision="bf16").measure(net, SHAPE, **FAST)
    assert mb.precision == "bf16" and mb.median_ms > 0


def test_torch_rejects_onnx_and_bad_settings(onnx_bytes):
    with pytest.raises(DetforgeError, match="nn.Module"):
        TorchBackend("cpu").prepare(onnx_bytes, SHAPE)
    with pytest.raises(DetforgeError) as e:
        TorchBackend("cpu", precision="int4")
    assert e.value.field == "precision"
    with pytest.raises(DetforgeError) as e:
        TorchBackend("cpu", threads=0)
    assert e.value.field == "threads"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_torch_cuda_missing_is_a_clear_error():
    with pytest.raises(DetforgeError, match="CUDA"):
        TorchBackend("cuda")


@CUDA
@pytest.mark.gpu
def test_torch_cuda_measures_with_events(net):
    for precision in ("fp32", "fp16"):
        b = TorchBackend("cuda", precision=precision)
        assert_filled(b.measure(net, SHAPE, **FAST), "torch-cuda", precision)
    x = np.random.default_rng(7).standard_normal((1, *SHAPE), dtype=np.float32)
    with TorchBackend("cuda").prepare(net, SHAPE, inputs=[x]) as runner:
        got = runner.outputs()[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() < 1e-3  # TF32 convolutions may differ slightly from the CPU


# --- TensorRT ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_tensorrt_missing_is_a_clear_error():
    with pytest.raises(DetforgeError, match="TensorRT is not available"):
        TensorRTBackend()


@CUDA
@pytest.mark.gpu
def test_tensorrt_fp16_measures_and_matches(net, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install 'detforge[tensorrt]')")
    x = np.random.default_rng(8).standard_normal((2, *SHAPE), dtype=np.float32)
    b = TensorRTBackend("fp16", engine_cache_dir=tmp_path)
    with b.prepare(net, SHAPE, batch=2, inputs=[x]) as runner:
        got = runner.outputs()[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() < 5e-2  # fp16
    m = b.measure(net, SHAPE, batch=2, **FAST)
    assert_filled(m, "tensorrt", "fp16", threads=None, batch=2)
    assert list(tmp_path.glob("*.engine"))  # the engine was cached for the next build


# --- registry and fingerprint -----------------------------------------------------------------------------

def test_get_backend_names():
    assert set(BACKEND_NAMES) == {"ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda", "tensorrt"}
    b = get_backend("ort-cpu", threads=1)
    assert isinstance(b, OrtBackend) and b.name == "ort-cpu" and b.threads == 1
    assert get_backend("torch-cpu", precision="bf16").name == "torch-cpu"
    with pytest.raises(DetforgeError, match="unknown backend"):
        get_backend("tflite")


def test_fingerprint_is_filled_and_compares():
    fp = OrtBackend("cpu", threads=2).fingerprint(batch=1)
    assert fp.cpu_model and fp.cpu_model != "unknown"
    assert fp.logical_cores >= 1 and 1 <= fp.usable_cores <= fp.logical_cores
    assert (fp.backend, fp.threads, fp.precision, fp.batch) == ("ort-cpu", 2, "fp32", 1)
    assert fp.versions["onnxruntime"] == ort.__version__.split("+")[0] and fp.versions["torch"]
    assert fp.os and fp.arch and fp.gpu_name is None  # GPU fields are only read for GPU backends
    assert fp.compare(fp) == []
    assert DeviceFingerprint.from_dict(fp.to_dict()) == fp
    assert fp.slug().endswith("_2t_ort-cpu_fp32_b1")

    cpu = "Apple M2" if fp.cpu_model != "Apple M2" else "AMD EPYC"  # any model but this machine's
    other = dataclasses.replace(fp, cpu_model=cpu, threads=4, versions={**fp.versions, "onnxruntime": "0.0.1"})
    diffs = fp.compare(other)
    assert any(d.startswith("cpu_model:") and cpu in d for d in diffs)
    assert any(d.startswith("threads:") for d in diffs) and any(d.startswith("versions.onnxruntime") for d in diffs)
    assert fp.compare(dataclasses.replace(fp, python="0.0"), ignore=("python",)) == []
    with pytest.warns(UserWarning, match="cpu_model") as rec:
        check_fingerprint(fp, other)
    assert rec[0].filename == __file__
    with pytest.raises(DetforgeError, match="fingerprint"):
        DeviceFingerprint.from_dict({"cpu_model": "x"})


@CUDA
@pytest.mark.gpu
def test_gpu_fingerprint_names_the_gpu():
    fp = TorchBackend("cuda").fingerprint()
    assert fp.gpu_name and fp.backend == "torch-cuda"
