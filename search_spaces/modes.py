"""Switching a module's train/eval mode for a while and putting every submodule's own flag back after."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def temporary_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """`model` in train (or eval) mode inside the block, each submodule's own mode restored after it."""
    # model.train(flag) afterwards would set every child to the parent's flag: a frozen BatchNorm inside a
    # training model, or an eval-mode model wrapped in a training-mode one, would come back changed.
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
