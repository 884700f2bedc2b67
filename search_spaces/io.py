"""Crash-safe file writing and safe loading of YAML, JSON and weights."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError, ConfigError


def _read_umask() -> int:
    """This process's umask (reading it means setting it: done once, at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically (temp + fsync + rename).

    The file keeps an existing file's permissions, else gets those the umask gives a new file (mkstemp's
    temp file is owner-only); a symbolic link is written through, not replaced.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_UMASK
    if path.is_dir():  # os.replace would fail only after the work of filling the temp file
        raise ConfigError("is a directory: give a file path", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write an object as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically, so a kill or full disk never leaves a half-written checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", path=path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise ConfigError(f"invalid YAML ({getattr(e, 'problem', None) or e})", path=path, field=where) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text file", path=path) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, truncated or invalid file is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", path=path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid or truncated JSON ({e})", path=path) from None


def load_weights(path: str | Path) -> dict:
    """Load one of our own weight files (plain tensors only, `weights_only=True`)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused: not a plain-tensor checkpoint ({str(e).splitlines()[0]})", path=path) from None
    except Exception as e:  # noqa: BLE001 - garbage bytes make the legacy unpickler fail in any way
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"truncated or corrupt checkpoint ({type(e).__name__}: {first})", path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}", path=path)
    return obj
