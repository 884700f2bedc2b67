"""What a detector can be: blocks, architecture YAML, the YOLOv7 zoo, the checkpoint converter, search spaces."""
from .architecture import Architecture, HeadSpec, LayerSpec
from .errors import CheckpointError, ConfigError, DataError, DetforgeError
from .loading import load_model, resolve_arch, save_model
from .model import Detector, build, count_params
from .space import BlockSignature, SearchSpace, arch_signatures, load_space
from .zoo import list_models

__all__ = [
    "Architecture",
    "BlockSignature",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Detector",
    "DetforgeError",
    "HeadSpec",
    "LayerSpec",
    "SearchSpace",
    "arch_signatures",
    "build",
    "count_params",
    "list_models",
    "load_model",
    "load_space",
    "resolve_arch",
    "save_model",
]
