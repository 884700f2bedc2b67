"""`make demo`: the main job on the built-in synthetic dataset (grows with the pipeline)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path("runs/demo")


def detforge(*args: str) -> None:
    """Run one detforge command, echoing it first."""
    print("$ detforge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "nas.cli", *args], check=True)


def main() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    detforge("info", "yolov7-tiny", "--form", "deploy", "--imgsz", "320")
    detforge("export", "yolov7-tiny", "--imgsz", "320", "--fuse", "--out", str(RUN / "yolov7-tiny.onnx"))


if __name__ == "__main__":
    main()
