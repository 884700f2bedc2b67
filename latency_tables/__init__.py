"""How fast a detector runs on a device: backends, the measurement protocol, latency tables, probe bundles."""
from .backends import BACKEND_NAMES, Backend, OrtBackend, Runner, TensorRTBackend, TorchBackend, get_backend
from .fingerprint import DeviceFingerprint, check_fingerprint
from .measurement import (
    LoadMonitor,
    Measurement,
    MeasurementConfig,
    measure_callable,
    measure_each_alone,
    measure_interleaved,
)
from .predictor import OverheadModel, fit_overhead
from .probe import bundle_manifest, import_results, pack
from .table import (
    BUILD_PROTOCOL,
    LatencyTable,
    Prediction,
    decoded_model,
    measure_architectures,
    realtime_priority,
    sample_architectures,
    shipped_tables,
    table_name,
    table_predictor,
    whole_model,
)
from .validate import ValidationReport, validate

__all__ = [
    "BACKEND_NAMES", "BUILD_PROTOCOL", "Backend", "DeviceFingerprint", "LatencyTable", "LoadMonitor",
    "Measurement", "MeasurementConfig", "OrtBackend", "OverheadModel", "Prediction", "Runner",
    "TensorRTBackend", "TorchBackend", "ValidationReport", "bundle_manifest", "check_fingerprint",
    "decoded_model", "fit_overhead", "get_backend", "import_results", "measure_architectures",
    "measure_callable", "measure_each_alone", "measure_interleaved", "pack", "realtime_priority", "sample_architectures",
    "shipped_tables", "table_name", "table_predictor", "validate", "whole_model",
]
