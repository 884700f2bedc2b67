"""`make bench`: every benchmark script with its documented settings; each also runs alone (see its --help).

The full settings take hours on a 2-core CPU (training for 30 minutes, a search of 40 trials on the default
space); `--quick` runs each at small sizes to check that they work.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

FULL = [
    ["zoo_stats.py"],
    ["cli_startup.py"],
    ["predict_speed.py"],
    ["table_build_speed.py"],
    ["latency_validate.py"],
    ["train_synthetic.py", "--model", "yolov7-tiny", "--imgsz", "320", "--minutes", "30"],
    ["autoanchor_synthetic.py", "--train-epochs", "12", "--seeds", "0", "1"],
    ["compress_synthetic.py", "--model", "runs/bench/train_synthetic/model", "--finetune-epochs", "1"],
    ["prune_round_to.py", "--model", "runs/bench/train_synthetic/model"],
    ["int8_targets.py", "--models", "runs/bench/train_synthetic/model", "--data", "runs/data/synthetic/data.yaml"],
    ["train_synthetic.py", "--imgsz", "128", "--data-imgsz", "128", "--train", "1000", "--val", "200", "--classes", "4",
     "--epochs", "80", "--minutes", "60", "--nbs", "16", "--data-dir", "runs/data/synth128",
     "--out", "runs/bench/teacher128"],
    ["distill_synthetic.py", "--teacher", "runs/bench/teacher128/model", "--data", "runs/data/synth128/data.yaml"],
    ["search_synthetic.py"],
    ["seed_repeats.py", "runs/bench/search_synthetic", "--seeds", "1", "2", "3", "--latency"],
    ["seed_repeats.py", "runs/bench/search_synthetic", "--fidelity", "--seeds", "1"],
    ["finetune_fidelity.py", "runs/bench/search_synthetic", "--epochs", "2"],
    ["inherited_fidelity.py", "runs/bench/search_synthetic", "--per-head", "--report", "inherited_fidelity_per_head.json"],
    ["inherited_neighbourhood.py", "runs/bench/search_synthetic"],
    ["supernet_diagnose.py", "runs/bench/search_synthetic", "--data", "runs/bench/search_synthetic/data/data.yaml",
     "--imgsz", "320", "--head-steps", "60"],
]
QUICK = [
    ["zoo_stats.py"],
    ["cli_startup.py", "--repeats", "1", "--commands", "train"],
    ["predict_speed.py", "--n", "20", "--repeats", "1"],
    ["table_build_speed.py", "--imgsz", "64", "--fit-models", "2"],
    ["train_synthetic.py", "--train", "64", "--val", "16", "--imgsz", "128", "--minutes", "1", "--epochs", "2",
     "--data-dir", "runs/bench/quick-data", "--out", "runs/bench/quick-train"],
    ["autoanchor_synthetic.py", "--data-dir", "runs/bench/quick-aa-data", "--train", "64", "--val", "16",
     "--models", "yolov7-tiny", "--sizes", "128", "--train-epochs", "1", "--out", "runs/bench/quick-autoanchor"],
    ["compress_synthetic.py", "--model", "runs/bench/quick-train/model", "--data", "runs/bench/quick-data/data.yaml",
     "--imgsz", "128", "--finetune-epochs", "1", "--calib", "16", "--repeats", "2", "--measurements", "1",
     "--qat-epochs", "1", "--out", "runs/bench/quick-compress"],
    ["int8_targets.py", "--models", "runs/bench/quick-train/model", "--data", "runs/bench/quick-data/data.yaml",
     "--imgsz", "128", "--calib", "8", "--out", "runs/bench/quick-int8.json"],
    ["distill_synthetic.py", "--teacher", "runs/bench/quick-train/model", "--data", "runs/bench/quick-data/data.yaml",
     "--epochs", "1", "--test-images", "16", "--out", "runs/bench/quick-distill"],
    ["search_synthetic.py", "--space", "tiny", "--imgsz", "64", "--train-images", "32", "--val-images", "16",
     "--latency-protocol", "quick", "--supernet-epochs", "1", "--trials", "4", "--fidelity-archs", "2",
     "--standalone-epochs", "1", "--finetune-epochs", "1", "--out", "runs/bench/quick-search"],
    ["seed_repeats.py", "runs/bench/quick-search", "--seeds", "1", "--latency"],
    ["finetune_fidelity.py", "runs/bench/quick-search", "--epochs", "1"],
    ["inherited_fidelity.py", "runs/bench/quick-search", "--per-head"],
    ["inherited_neighbourhood.py", "runs/bench/quick-search"],
    ["supernet_diagnose.py", "runs/bench/quick-search", "--data", "runs/bench/quick-search/data/data.yaml",
     "--imgsz", "64", "--batch", "8", "--steps", "2", "--head-steps", "2"],
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small settings: checks the scripts, not the figures")
    args = ap.parse_args()
    failed = []
    for cmd in QUICK if args.quick else FULL:
        print(f"$ python benchmarks/{' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"  -> exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(cmd[0])
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
