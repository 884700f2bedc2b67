"""Probe bundles: build a latency table on a device that has only Python, numpy and onnxruntime.

`pack(space, out, imgsz)` writes a tar.gz with one ONNX micro-model per block signature of the space, a few
whole models for the overhead fit, a manifest, `runner.py`, and detforge's `measurement.py` and `host.py`; on the
device `python runner.py --threads 2 --out results.json` times them; `import_results(results.json, out)` turns the
results into a LatencyTable here. Large float weights are left out of the ONNX files (the runner writes random
ones before loading), so a bundle stays small: weight values do not change how long a dense model runs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from search_spaces.errors import ConfigError, DetforgeError
from search_spaces.io import atomic_path, read_json

from .fingerprint import DeviceFingerprint, _dist_version
from .measurement import Measurement, MeasurementConfig
from .onnx_utils import DEFAULT_OPSET, load_onnx_model
from .predictor import OverheadModel
from .table import (
    BUILD_PROTOCOL,
    EMPTY_SHAPE,
    FIT_MODELS,
    FIT_SEED,
    LatencyTable,
    block_model,
    empty_model,
    sample_architectures,
    sample_shapes,
    whole_model,
)

MANIFEST_SCHEMA = "detforge.probe"
MANIFEST_VERSION = 2  # 2: a YOLO head level is keyed by its anchor count (table version 2), 1: by its anchors
RESULTS_SCHEMA = "detforge.probe_results"
BUNDLE_DIR = "detforge-probe"  # the top-level folder inside the tar.gz
PACKAGE_DIR = Path(__file__).resolve().parent
RUNNER = PACKAGE_DIR / "probe" / "runner.py"
MEASUREMENT = PACKAGE_DIR / "measurement.py"
HOST = PACKAGE_DIR / "host.py"
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shape constants, biases) stay inside the graph
_EXTERNAL_DTYPES = {1: "float32", 10: "float16"}  # onnx TensorProto.FLOAT, FLOAT16


def strip_weights(data: bytes, bin_name: str, precision: str) -> tuple[bytes, dict[str, Any] | None]:
    """Point large float initializers at external file `bin_name` (not written); (graph, weights info)."""
    # The runner writes random values of the recorded size there before loading; only one float dtype per
    # model is moved out (the runner fills the file with a single dtype), the rest stays in the graph.
    from onnx import external_data_helper, numpy_helper

    model = load_onnx_model(data)
    dtype_code = 10 if precision == "fp16" else 1
    offset = 0
    for t in model.graph.initializer:
        if t.data_type != dtype_code:
            continue
        raw = t.raw_data or numpy_helper.to_array(t).tobytes()
        if len(raw) < EXTERNAL_MIN_BYTES:
            continue
        external_data_helper.set_external_data(t, bin_name, offset=offset, length=len(raw))
        t.data_location = t.EXTERNAL
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int32_data")
        offset += len(raw)
        offset += (-offset) % 64  # keep every tensor 64-byte aligned inside the file
    if offset == 0:
        return data, None
    info = {"file": bin_name, "bytes": offset, "dtype": _EXTERNAL_DTYPES[dtype_code]}
    return model.SerializeToString(), info


def _export(module: Any, shapes: list, batch: int, opset: int, precision: str) -> bytes:
    """ONNX bytes of a module exactly as the ORT backend runs it (same export, same fp16 conversion)."""
    import warnings

    from .backends import OrtBackend

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning, module=r"torch\..*")
        return OrtBackend("cpu", precision=precision, opset=opset).onnx_bytes(module, shapes, batch)


def pack(space: Any, out: str | Path = "bundle.tar.gz", imgsz: int = 640, batch: int = 1, *,
         precision: str = "fp32",
         fit_models: int = FIT_MODELS, seed: int = FIT_SEED, fuse: bool = True, opset: int = DEFAULT_OPSET,
         config: MeasurementConfig | None = None, progress: bool = True) -> Path:
    """Write a probe bundle for every block signature of `space` at `imgsz` (see the module docstring)."""
    from tqdm import tqdm

    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"probe bundles hold fp32 or fp16 graphs, not {precision!r}", field="precision")
    sigs = list({s.key(): s for s in space.block_signatures(imgsz, batch)}.values())
    archs = sample_architectures(space, fit_models, seed, extremes=True) if fit_models > 0 else []
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="detforge-pack-") as tmp:
        root = Path(tmp) / BUNDLE_DIR
        (root / "models").mkdir(parents=True)

        def write(name: str, module: Any, shapes: list) -> dict[str, Any]:
            data = _export(module, shapes, batch, opset, precision)
            graph, weights = strip_weights(data, f"{name}.bin", precision)
            (root / "models" / f"{name}.onnx").write_bytes(graph)
            return {"file": f"models/{name}.onnx", "input_shapes": [list(s) for s in shapes],
                    "weights": weights}

        blocks = []
        for i, s in enumerate(tqdm(sigs, desc="packing blocks", file=sys.stderr, disable=not progress)):
            item = write(f"b{i:05d}", block_model(s, fuse), sample_shapes(s))
            blocks.append({"key": s.key(), "signature": s.to_dict(), **item})
        models = []
        for i, a in enumerate(tqdm(archs, desc="packing models", file=sys.stderr, disable=not progress)):
            item = write(f"m{i:03d}", whole_model(a, fuse), [(a.in_channels, imgsz, imgsz)])
            models.append({"name": f"m{i:03d}:{a.name}", "arch": a.to_dict(), **item})
        manifest = {
            "schema": MANIFEST_SCHEMA, "version": MANIFEST_VERSION, "imgsz": imgsz, "batch": batch,
            "precision": precision, "fused": fuse, "space": getattr(space, "name", None), "opset": opset,
            "torch": _dist_version("torch"),  # the exporter: part of the fingerprint of an ORT table
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "protocol": asdict(config or BUILD_PROTOCOL),  # as `latency build` measures here: comparable tables
            "empty": {**write("empty", empty_model(), [EMPTY_SHAPE]), "key": "empty"},
            "blocks": blocks, "models": models,
        }
        manifest["bundle_id"] = hashlib.sha256(json.dumps(
            [[b["key"] for b in blocks], [m["name"] for m in models], imgsz, batch, precision, fuse]).encode()
        ).hexdigest()[:16]
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.copyfile(RUNNER, root / "runner.py")
        shutil.copyfile(MEASUREMENT, root / "measurement.py")
        shutil.copyfile(HOST, root / "host.py")
        with atomic_path(out) as t, tarfile.open(t, "w:gz") as tar:
            # the manifest first, so bundle_manifest() finds it without decompressing the models
            for name in ("manifest.json", "runner.py", "measurement.py", "host.py", "models"):
                tar.add(root / name, arcname=f"{BUNDLE_DIR}/{name}")
    return out


def bundle_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a probe bundle (tar.gz), read without unpacking the models."""
    p = Path(path)
    try:
        with tarfile.open(p, "r:gz") as tar:
            f = tar.extractfile(f"{BUNDLE_DIR}/manifest.json")
            if f is None:
                raise KeyError("manifest.json")
            return json.loads(f.read())
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        raise ConfigError(f"not a readable probe bundle ({e})", path=p) from None


def read_results(path: str | Path) -> dict[str, Any]:
    """Parse and check a runner's results file (ConfigError naming the file and field)."""
    doc = read_json(path)
    p = str(path)
    if not isinstance(doc, dict) or doc.get("schema") != RESULTS_SCHEMA:
        raise ConfigError(f"not a detforge probe results file (expected schema {RESULTS_SCHEMA!r})", path=p,
                          field="schema")
    for key in ("bundle", "device", "entries", "setup", "signatures"):
        if not isinstance(doc.get(key), dict):
            raise ConfigError("missing or not an object", path=p, field=key)
    for key, need in (("bundle", (("imgsz", int), ("batch", int), ("precision", str))),
                      ("setup", (("provider", str),))):
        for name, typ in need:
            v = doc[key].get(name)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ConfigError(f"missing or not a {typ.__name__}: {v!r}", path=p, field=f"{key}.{name}")
    made_by = doc["bundle"].get("version", 1)  # results written before the runner copied it: a version-1 bundle
    if not isinstance(made_by, int) or isinstance(made_by, bool) or made_by < 1:
        raise ConfigError(f"expected a bundle version >= 1, got {made_by!r}", path=p, field="bundle.version")
    if made_by > MANIFEST_VERSION:
        raise ConfigError(f"results of a bundle of version {made_by}; this detforge reads versions up to "
                          f"{MANIFEST_VERSION} (import them with the detforge that packed the bundle, or a newer one)",
                          path=p, field="bundle.version")
    if not doc["entries"]:
        raise ConfigError("no block was measured yet (did the runner stop early?)", path=p, field="entries")
    return doc


def import_results(results: str | Path, out: str | Path = "table.json") -> LatencyTable:
    """Turn a runner's results into a LatencyTable saved at `out` (overhead fitted on the bundle's models)."""
    from search_spaces import Architecture

    doc = read_results(results)
    p = str(results)
    bundle, setup = doc["bundle"], doc["setup"]
    try:
        fp = DeviceFingerprint.from_dict(doc["device"])
        entries = {k: Measurement.from_dict(v) for k, v in doc["entries"].items()}
        empty = Measurement.from_dict(doc["empty"]) if doc.get("empty") else None
        fits = {n: Measurement.from_dict(v) for n, v in (doc.get("models") or {}).items()}
    except DetforgeError as e:
        raise ConfigError(e.message, path=p, field=e.field) from None
    table = LatencyTable(
        fingerprint=fp, backend=f"ort-{setup['provider']}", imgsz=int(bundle["imgsz"]),
        batch=int(bundle["batch"]), precision=bundle["precision"], threads=setup.get("threads"),
        fused=bool(bundle.get("fused", True)),
        space=bundle.get("space"), entries=entries,
        signatures={k: v for k, v in doc["signatures"].items() if k in entries},
        overhead=OverheadModel(call_overhead_ms=empty.median_ms if empty else 0.0),
        protocol=dict(doc.get("protocol") or {}),
        info={"created": doc.get("started"), "source": f"probe {doc.get('bundle_id')}",
              "build_s": doc.get("elapsed_s"), "results": str(results)})
    archs = {n: Architecture.from_dict(a) for n, a in (doc.get("model_archs") or {}).items()}
    # a fit model made of a block the device could not measure has no block sum to fit against
    names = [n for n in fits if n in archs and not table.missing(archs[n])]
    if names:
        table.fit([archs[n] for n in names], [fits[n] for n in names])
    failed = {k.split(":", 1)[1] for k in doc.get("failed") or {}}  # a fit model fails once per pass
    failed_blocks = {k for k in failed if k in doc["signatures"]}
    unfinished = len(doc["signatures"]) - len(entries) - len(failed_blocks)
    rerun = " (run the runner again with the same --out to finish, then import again)"
    gaps = [f"{unfinished} block signature(s) of the bundle were not measured yet{rerun}"] if unfinished else []
    if not names and archs:
        passes_left = set(archs) - set(fits) - failed  # else the fit models are made of blocks that failed
        gaps.append(f"the whole-model passes did not finish{rerun if passes_left and not unfinished else ''}, "
                    "so the overhead is not fitted" if passes_left else
                    "every fit model failed or holds a block that failed, so the overhead is not fitted")
    if failed:  # a rerun does not help these: the device's onnxruntime could not load or run them
        gaps.append(f"{len(failed)} model(s) failed on the device, which a rerun does not change (the results' "
                    "'failed' lists why)")
    if gaps:
        table.info["incomplete"] = "; ".join(gaps)
    table.save(out)
    return table
