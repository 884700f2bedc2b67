"""The official YOLOv7 family as architecture YAML files (training form; the deploy form is derived)."""
from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).parent


def list_models() -> list[str]:
    """Names of the zoo models."""
    order = ["yolov7-tiny", "yolov7", "yolov7x", "yolov7-w6", "yolov7-e6", "yolov7-d6", "yolov7-e6e"]
    names = [p.stem for p in ZOO_DIR.glob("*.yaml")]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def zoo_path(name: str) -> Path | None:
    """The YAML file of a zoo model, or None."""
    p = ZOO_DIR / f"{name}.yaml"
    return p if p.is_file() else None
