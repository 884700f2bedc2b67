"""Freezing a model's first layers for finetuning, numbered as YOLOv7 numbers them (its `--freeze`)."""
from __future__ import annotations

from search_spaces.convert import official_layer_map
from search_spaces.errors import ConfigError
from search_spaces.model import Detector


def freeze_layers(det: Detector, n: int) -> list[str]:
    """Stop the gradients of the parameters in the first `n` layers of `det` in YOLOv7's numbering (the official
    YAML's layer index: `--freeze 51` is yolov7's backbone, layers 0-50, and 29 yolov7-tiny's); returns their
    names."""
    layer_map = official_layer_map(det)  # official index -> our module path; the head is the last index
    if not 0 <= n < len(layer_map):
        raise ConfigError(f"{det.arch.name} has {len(layer_map) - 1} layers before its head in YOLOv7's numbering, "
                          f"got {n}", field="freeze")
    prefixes = tuple(p for i, p in layer_map.items() if i < n and p)
    frozen = []
    for name, p in det.named_parameters():
        if any(name.startswith(q + ".") for q in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


__all__ = ["freeze_layers"]
