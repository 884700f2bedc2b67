"""Untrusted and damaged files: malicious pickles never run, truncated checkpoints fail clearly, full disks lose nothing."""
from __future__ import annotations

import errno
import pickle

import pytest
import torch

from nas.cli import main
from search_spaces import load_model, save_model
from search_spaces.errors import CheckpointError
from search_spaces.io import atomic_torch_save, atomic_write_json, load_weights


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.fixture
def model_dir(tmp_path):
    return save_model(load_model("yolov7-tiny", form="deploy", nc=3), tmp_path / "m")


def test_malicious_weights_are_refused_and_never_run(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": _Evil()}, model_dir / "weights.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(model_dir / "weights.pt")
    assert main(["info", str(model_dir), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights.pt" in err
    assert not (tmp_path / "PWNED").exists()


def test_raw_pickle_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (model_dir / "weights.pt").write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(CheckpointError):
        load_weights(model_dir / "weights.pt")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_and_foreign_weights_fail_clearly(model_dir, tmp_path, capsys):
    data = (model_dir / "weights.pt").read_bytes()
    (model_dir / "weights.pt").write_bytes(data[: len(data) // 2])
    assert main(["info", str(model_dir)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    other = save_model(load_model("yolov7", form="deploy", nc=3), tmp_path / "other")
    (model_dir / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    assert main(["info", str(model_dir)]) == 2
    assert "do not fit architecture" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_weights(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_atomic_json_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert path.read_text().strip().startswith("{") and '"b": 2' in path.read_text()


def test_atomic_writes_keep_permissions_and_write_through_links(tmp_path):
    import os
    import stat

    from search_spaces.io import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    new = tmp_path / "new.yaml"
    atomic_write_text(new, "a: 1\n")  # not mkstemp's owner-only 0600: what the umask gives a new file
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    shared = tmp_path / "shared.yaml"
    shared.write_text("a: 1\n")
    shared.chmod(0o664)
    atomic_write_text(shared, "a: 2\n")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664 and shared.read_text() == "a: 2\n"
    link = tmp_path / "link.yaml"
    link.symlink_to(shared)
    atomic_write_text(link, "a: 3\n")
    assert link.is_symlink() and shared.read_text() == "a: 3\n"
