"""Building blocks of YOLO-family detectors; importing this module registers them for architecture YAML."""
from .conv import ACTIVATIONS, Conv, GhostConv, RepConv, make_act
from .elan import EElanBlock, ElanBlock
from .heads import HEAD_TYPES, DecoupledHead, ImplicitA, ImplicitM, YoloHead
from .registry import BLOCKS, register_block
from .structure import SPPCSPC, Add, Concat, DownC, MaxPool, MPConv, ReOrg, SPPCSPTiny, Upsample

__all__ = [
    "ACTIVATIONS",
    "BLOCKS",
    "HEAD_TYPES",
    "SPPCSPC",
    "Add",
    "Concat",
    "Conv",
    "DecoupledHead",
    "DownC",
    "EElanBlock",
    "ElanBlock",
    "GhostConv",
    "ImplicitA",
    "ImplicitM",
    "MPConv",
    "MaxPool",
    "ReOrg",
    "RepConv",
    "SPPCSPTiny",
    "Upsample",
    "YoloHead",
    "make_act",
    "register_block",
]
