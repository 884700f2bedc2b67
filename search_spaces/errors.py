"""The one error type every detforge package raises for bad user input."""
from __future__ import annotations

from pathlib import Path


class DetforgeError(Exception):
    """A user-facing error: one line naming the file and the field; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.field = field
        super().__init__(self.line())

    def line(self) -> str:
        """Render as one line: `file: field: message`."""
        parts = [p for p in (self.path, self.field) if p]
        return ": ".join(parts + [self.message]).replace("\n", " ")


class ConfigError(DetforgeError):
    """Malformed YAML/JSON configuration (architecture, search space, pipeline, hyper-parameters)."""


class DataError(DetforgeError):
    """Bad dataset content: images, labels, data.yaml, COCO JSON."""


class CheckpointError(DetforgeError):
    """A weights file that is missing, truncated, unsafe or from another model."""


class DivergedError(DetforgeError):
    """Training whose gradients stayed non-finite (NaN/inf) for many optimizer steps in a row."""
