"""Measured latency of one model pruned to the same MACs with different `round_to` (ORT CPU, interleaved).

    python benchmarks/prune_round_to.py --model runs/bench/train_synthetic/model --imgsz 320 --macs 0.5

Channel counts that are not multiples of a runtime's vector block are padded inside its kernels: this shows
what that costs on this machine. Writes OUT/round_to.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.export import export_detector
from compress.fuse import fuse_detector
from compress.prune import prune_detector
from compress.report import measure_latency_ms
from search_spaces import load_model
from search_spaces.io import atomic_write_json
from search_spaces.model import count_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolov7-tiny", help="zoo name or model directory")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--macs", type=float, default=0.5)
    ap.add_argument("--round-to", default="8,16,32")
    ap.add_argument("--measurements", type=int, default=3, help="interleaved measurements of all files")
    ap.add_argument("--out", default="runs/bench/round_to")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    det = load_model(args.model)
    files = {"unpruned": out / "unpruned.onnx"}
    export_detector(fuse_detector(det, args.imgsz)[0], files["unpruned"], args.imgsz)
    rows: dict[str, dict] = {"unpruned": {"params": count_params(det)}}
    for rt in (int(v) for v in args.round_to.split(",")):
        pruned, rep = prune_detector(det, args.macs, round_to=rt, imgsz=args.imgsz)
        files[f"round_to={rt}"] = out / f"round_to_{rt}.onnx"
        export_detector(fuse_detector(pruned, args.imgsz)[0], files[f"round_to={rt}"], args.imgsz)
        rows[f"round_to={rt}"] = {"params": count_params(pruned), "macs_ratio": rep.details["macs_ratio"]}
    for k in range(args.measurements):
        ms = measure_latency_ms(list(files.values()), args.imgsz, repeats=7, max_time_s=8.0)
        for name, v in zip(files, ms):
            rows[name].setdefault("latency_ms", []).append(round(v, 3))
            rows[name].setdefault("vs_unpruned", []).append(round(v / ms[0], 3))
        print(f"measurement {k + 1}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in zip(files, ms)), flush=True)
    result = {"model": args.model, "imgsz": args.imgsz, "macs": args.macs, "rows": rows}
    atomic_write_json(out / "round_to.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
