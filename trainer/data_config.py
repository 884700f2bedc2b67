"""Reading a YOLO `data.yaml` (the Ultralytics / YOLOv7 dataset description)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from search_spaces.errors import ConfigError, DataError
from search_spaces.io import read_yaml

ImageSource = Path | list[Path]  # an image directory or list file, or several of them


@dataclass(frozen=True)
class DataConfig:
    """A resolved dataset description: absolute image sources and the class names."""

    root: Path  # the dataset root (`path:`), absolute
    train: ImageSource  # a Path when data.yaml names one source, a list when it names several
    val: ImageSource
    nc: int
    names: list[str]
    yaml_path: Path | None = None
    test: ImageSource | None = None
    label_nc: int | None = None  # the classes the label files hold, where training merges them (single_class)

    def single_class(self) -> DataConfig:
        """Every class trained and evaluated as one (YOLOv7's --single-cls): nc 1, named 'item' unless the
        dataset has one class already; the label files are still checked against their own classes."""
        if self.label_nc is not None:
            return self
        return replace(self, nc=1, names=self.names if self.nc == 1 else ["item"], label_nc=self.nc)


def load_data_config(path: str | Path) -> DataConfig:
    """Parse a `data.yaml` (or `DIR/data.yaml`); `path:` is relative to the YAML, splits relative to `path:`."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.yaml"
    if not path.is_file():
        raise DataError("dataset description not found (expected a data.yaml file or a directory holding one)",
                        path=path)
    try:
        data = read_yaml(path)
    except ConfigError as e:  # a broken data.yaml is a data problem for the user
        raise DataError(e.message, path=e.path, field=e.field) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a mapping, got {type(data).__name__}", path=path)

    base = path.parent.resolve()
    root_v = data.get("path")
    if root_v is None or root_v == "":
        root = base
    elif isinstance(root_v, str):
        root = (base / Path(root_v).expanduser()).resolve()  # an absolute `path` wins over `base`
    else:
        raise DataError(f"expected a directory path, got {root_v!r}", path=path, field="path")
    if not root.is_dir():
        raise DataError(f"directory not found: {root}", path=path, field="path")

    names = _names(data, path)
    train = _source(data, "train", root, path, required=True)
    val = _source(data, "val", root, path, required=True)
    test = _source(data, "test", root, path, required=False)
    return DataConfig(root=root, train=train, val=val, nc=len(names), names=names, yaml_path=path.resolve(),
                      test=test)


def _names(data: dict[str, Any], path: Path) -> list[str]:
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise DataError(f"expected a positive integer, got {nc!r}", path=path, field="nc")
    raw = data.get("names")
    if raw is None:
        if nc is None:
            raise DataError("missing: give `names` (a list or {id: name} mapping) or at least `nc`",
                            path=path, field="names")
        return [f"class{i}" for i in range(nc)]
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DataError("mapping keys must be class ids 0..nc-1", path=path, field="names") from None
        if keys != list(range(len(keys))):
            raise DataError(f"class ids must be 0..{len(keys) - 1} without gaps, got {keys}", path=path,
                            field="names")
        by_id = {int(k): v for k, v in raw.items()}
        names = [by_id[i] for i in keys]
    elif isinstance(raw, list):
        names = raw
    else:
        raise DataError(f"expected a list or a mapping, got {type(raw).__name__}", path=path, field="names")
    if not names:
        raise DataError("no class names", path=path, field="names")
    names = [str(n) for n in names]
    if nc is not None and nc != len(names):
        raise DataError(f"nc is {nc} but {len(names)} names are given", path=path, field="nc")
    return names


def _source(data: dict[str, Any], key: str, root: Path, path: Path, required: bool) -> ImageSource | None:
    v = data.get(key)
    if v is None or v == "":
        if required:
            raise DataError("missing (an image directory or a list file, relative to `path`)", path=path, field=key)
        return None
    items = v if isinstance(v, list) else [v]
    out = []
    for i, item in enumerate(items):
        field = key if not isinstance(v, list) else f"{key}[{i}]"
        if not isinstance(item, str) or not item:
            raise DataError(f"expected a path, got {item!r}", path=path, field=field)
        p = (root / Path(item).expanduser()).resolve()
        if not p.exists():
            raise DataError(f"not found: {p}", path=path, field=field)
        out.append(p)
    return out if isinstance(v, list) else out[0]
