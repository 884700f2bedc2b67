"""detforge probe runner: time the bundle's micro-models with ONNX Runtime on this device, write results JSON.

Needs only Python 3.8+, numpy and onnxruntime (no detforge). Run it from the unpacked bundle:

    python runner.py --threads 2 --out results.json

then bring results.json back and turn it into a table: `detforge latency import results.json --out T.json`.
Results are saved after every group of models, so a killed run continues where it stopped when started again
with the same --out. The timing loop and the device reading are detforge's own (measurement.py and host.py, shipped beside
this file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_SCHEMA = "detforge.probe_results"
RESULTS_VERSION = 1
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "trt": "TensorrtExecutionProvider"}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def fingerprint(provider: str, threads: int | None, precision: str, batch: int,
                exporter_torch: str | None) -> dict:
    """This device as a DeviceFingerprint dict (backend ort-<provider>)."""
    import onnxruntime as ort
    from host import cpu_model, dist_version, nvidia_smi_gpu, system, usable_cores

    gpu_name, driver = nvidia_smi_gpu() if provider != "cpu" else (None, None)
    # torch is listed because it exported the graphs (on the packing machine): it shapes what ORT runs.
    versions = {"onnxruntime": dist_version("onnxruntime") or ort.__version__, "torch": exporter_torch}
    if provider == "trt":
        versions["tensorrt"] = dist_version("tensorrt")
    return {"cpu_model": cpu_model(), "logical_cores": os.cpu_count() or 1, "usable_cores": usable_cores(),
            "threads": threads, "gpu_name": gpu_name, "gpu_driver": driver, "backend": f"ort-{provider}",
            "precision": precision, "batch": batch, "versions": versions, **system()}


# ---- sessions
# ------------------------------------------------------------------------------------------------
def session_options(threads: int | None):
    """detforge's reference session: ORT_ENABLE_ALL, sequential, intra-op `threads`, inter-op 1."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def provider_list(provider: str, device_id: int, fp16: bool) -> list:
    """Execution providers, most preferred first."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return [("TensorrtExecutionProvider", {"device_id": device_id, "trt_fp16_enable": fp16}), cuda,
            "CPUExecutionProvider"]


def write_weights(path: Path, nbytes: int, dtype: str, seed: int) -> None:
    """Random stand-in weights for a model whose large float initializers were left out of the bundle."""
    import numpy as np

    n = nbytes // np.dtype(dtype).itemsize
    # N(0, 0.05): finite, no denormals; the values do not change how long a dense model takes.
    data = (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.05).astype(dtype)
    path.write_bytes(data.tobytes())


class Model:
    """One ONNX model ready to run: a session with fixed random inputs (on the GPU for GPU providers)."""

    def __init__(self, item: dict, args: argparse.Namespace, manifest: dict, scratch: Path):
        import numpy as np
        import onnxruntime as ort

        src = HERE / item["file"]
        path = src
        weights = item.get("weights")
        if weights:
            # The graph points at <name>.bin beside it: write random weights there, load, delete again.
            path = scratch / src.name
            shutil.copyfile(src, path)
            write_weights(scratch / weights["file"], int(weights["bytes"]), weights["dtype"],
                          seed=len(item["file"]))
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(args.threads),
                                                providers=provider_list(args.provider, args.device_id,
                                                                        manifest["precision"] == "fp16"))
        finally:
            if weights:
                for p in (path, scratch / weights["file"]):
                    p.unlink(missing_ok=True)
        ep = PROVIDERS[args.provider]
        if ep not in self.session.get_providers():
            raise SystemExit(f"runner: onnxruntime fell back to {self.session.get_providers()} "
                             f"instead of {ep}")
        batch = manifest["batch"]
        rng = np.random.default_rng(0)
        self.feeds = {}
        for inp, shape in zip(self.session.get_inputs(), item["input_shapes"]):
            dt = np.dtype(ORT_DTYPES.get(inp.type, "float32"))
            self.feeds[inp.name] = rng.standard_normal((batch, *shape), dtype=np.float32).astype(dt)
        shapes = [list(s) for s in item["input_shapes"]]
        self.meta = {"backend": f"ort-{args.provider}", "threads": args.threads,
                     "precision": manifest["precision"], "batch": batch,
                     "input_shape": shapes[0] if len(shapes) == 1 else shapes}
        self.binding = None
        self.device_values = []
        if args.provider != "cpu":  # inputs copied to the GPU once: time the model, not PCIe transfers
            self.binding = self.session.io_binding()
            for name, arr in self.feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", args.device_id)
                self.device_values.append(value)
                self.binding.bind_ortvalue_input(name, value)
            for out in self.session.get_outputs():
                self.binding.bind_output(out.name, "cuda", args.device_id)

    def __call__(self) -> None:
        """One run, waited for."""
        if self.binding is None:
            self.session.run(None, self.feeds)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()


# ---- results
# -------------------------------------------------------------------------------------------------
def save(path: Path, doc: dict) -> None:
    """Write the results atomically (temp file + rename), so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_previous(path: Path, bundle_id: str, setup: dict, protocol: dict, device: dict) -> dict | None:
    """Results of an earlier run of this bundle with the same settings, protocol and device, to continue;
    None without a file.

    A file that holds anything else is refused (ValueError), never overwritten: it may be another run's
    hours of measurements, and a table of one device's timings, measured one way, is what importing it gives.
    """
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: exists but is not readable results ({e}); use another --out") from None
    if not isinstance(doc, dict) or doc.get("bundle_id") != bundle_id:
        raise ValueError(f"{path}: holds the results of another bundle; use another --out")
    if doc.get("setup") != setup:
        raise ValueError(f"{path}: was measured with {doc.get('setup')}, this run uses {setup}; use another "
                         "--out, or the same settings to continue it")
    if doc.get("protocol") != protocol:
        theirs = doc.get("protocol") or {}
        differ = sorted(k for k in set(theirs) | set(protocol) if theirs.get(k) != protocol.get(k))
        raise ValueError(f"{path}: was measured with another protocol ({', '.join(differ)} differ); use another "
                         "--out, or the same --set settings to continue it")
    mine, was = (tuple((d or {}).get(k) for k in ("cpu_model", "gpu_name")) for d in (device, doc.get("device")))
    if was != mine:
        raise ValueError(f"{path}: was measured on {' / '.join(str(v) for v in was if v)}, this device is "
                         f"{' / '.join(str(v) for v in mine if v)}; use another --out")
    return doc


def parse_settings(pairs: list) -> dict:
    """`--set NAME=VALUE` pairs as a dict; a value is read as JSON (10, 0.5, null), else kept as text."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def measure_groups(items: list, kind: str, doc: dict, args: argparse.Namespace, manifest: dict, cfg,
                   checkpoint, key: str) -> None:
    """Measure manifest `items` one at a time into doc[kind]; checkpoint after every `args.group` of them."""
    # One session at a time: ORT's intra-op workers spin after each run, and sessions timed round-robin fight
    # over the cores (on 2 vCPUs every model measured ~1.8x slower than alone).
    from measurement import measure_callable

    store = doc.setdefault(kind, {})
    # A model this onnxruntime cannot load or run (an operator it lacks) is recorded and skipped, also when
    # the run is continued: one such model must not stop the run, or every rerun, at the same place.
    failed = doc.setdefault("failed", {})
    todo = [it for it in items if it[key] not in store and f"{kind}:{it[key]}" not in failed]
    done = len(items) - len(todo)
    with tempfile.TemporaryDirectory(prefix="detforge-probe-") as scratch:
        for i in range(0, len(todo), args.group):
            chunk = todo[i:i + args.group]
            for it in chunk:
                model = None
                try:
                    model = Model(it, args, manifest, Path(scratch))
                    store[it[key]] = measure_callable(model, cfg).to_dict()
                except (MemoryError, OSError):  # this machine's trouble (memory, a full disk): a rerun retries
                    raise
                except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base but Exception
                    reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                    failed[f"{kind}:{it[key]}"] = reason
                    print(f"runner: {kind} {it[key]} skipped ({reason})", file=sys.stderr, flush=True)
                del model  # frees the session and its thread pool before the next one starts
            done += len(chunk)
            checkpoint()
            print(f"runner: {kind} {done}/{len(items)}", file=sys.stderr, flush=True)


def main(argv: list | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description="Time a detforge probe bundle's models with ONNX Runtime.")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="execution provider")
    ap.add_argument("--device-id", type=int, default=0)
    ap.add_argument("--out", default="results.json", help="results file (continued if it exists)")
    ap.add_argument("--group", type=int, default=8, help="models measured between two saves of the results")
    ap.add_argument("--passes", type=int, default=3, help="passes over the whole models for the overhead fit")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a measurement setting, e.g. --set min_runs=10 (repeatable)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))  # measurement.py and host.py ship beside this file
    # DetforgeError: detforge's own where it is installed, else the bundled ValueError
    from measurement import DetforgeError, MeasurementConfig, measure_callable

    manifest = json.loads((HERE / "manifest.json").read_text())
    try:
        overrides = parse_settings(args.set)
        cfg = MeasurementConfig(**manifest.get("protocol", {})).with_overrides(**overrides)
    except (TypeError, ValueError, DetforgeError) as e:  # a TypeError names no setting: name the ones given
        given = " ".join(args.set)
        print(f"runner: error: --set {given}: {e}", file=sys.stderr)
        return 2
    protocol = {**manifest.get("protocol", {}), **overrides}
    bundle_id = manifest["bundle_id"]
    setup = {"provider": args.provider, "threads": args.threads, "device_id": args.device_id}
    device = fingerprint(args.provider, args.threads, manifest["precision"], manifest["batch"], manifest.get("torch"))
    out = Path(args.out)
    try:
        previous = load_previous(out, bundle_id, setup, protocol, device)
    except ValueError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    doc = previous or {
        "schema": RESULTS_SCHEMA, "version": RESULTS_VERSION, "bundle_id": bundle_id, "setup": setup,
        "bundle": {**{k: manifest[k] for k in ("imgsz", "batch", "precision", "fused", "space", "opset", "torch")},
                   "version": manifest.get("version", 1)},  # how its keys are written: importers refuse newer ones
        "protocol": protocol, "signatures": {b["key"]: b["signature"] for b in manifest["blocks"]},
        "model_archs": {m["name"]: m["arch"] for m in manifest["models"]},
        "entries": {}, "models": {}, "empty": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    doc["device"] = device  # the same model of machine (load_previous); its software may have been updated
    t0, before = time.perf_counter(), float(doc.get("elapsed_s", 0.0))

    def checkpoint() -> None:
        doc["elapsed_s"] = round(before + time.perf_counter() - t0, 2)
        save(out, doc)

    if not doc.get("empty"):
        with tempfile.TemporaryDirectory(prefix="detforge-probe-") as scratch:
            empty = Model(manifest["empty"], args, manifest, Path(scratch))
            doc["empty"] = measure_callable(empty, cfg).to_dict()
        checkpoint()
    measure_groups(manifest["blocks"], "entries", doc, args, manifest, cfg, checkpoint, "key")
    # The fit models in passes over the whole list, minutes apart: slow seconds on a busy device spoil a pass,
    # and each model's fastest pass is kept (as detforge's measure_architectures does).
    for p in range(args.passes):
        measure_groups(manifest["models"], f"models_pass{p}", doc, args, manifest, cfg, checkpoint, "name")
    for m in manifest["models"]:
        passes = [doc[f"models_pass{p}"][m["name"]] for p in range(args.passes)
                  if m["name"] in doc[f"models_pass{p}"]]
        if passes:
            doc["models"][m["name"]] = {**min(passes, key=lambda d: d["median_ms"]),
                                        "repeat_medians_ms": [d["median_ms"] for d in passes]}
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    checkpoint()
    if doc.get("failed"):
        print(f"runner: {len(doc['failed'])} model(s) could not be measured here; they are listed under 'failed' "
              f"in {out}", file=sys.stderr)
    print(f"runner: wrote {out} ({len(doc['entries'])} blocks, {len(doc['models'])} whole models)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
