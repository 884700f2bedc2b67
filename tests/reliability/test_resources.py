"""Resources: datasets stream from disk (no decoded image is held between reads), so size is not bounded by RAM.

(GPU out-of-memory during a search trial is tested in tests/nas_search/test_search.py: the trial is FAILED
with its reason and the study goes on; a full disk while saving in tests/reliability/test_files.py.)
"""
from __future__ import annotations

import pickle

from trainer import datasets
from trainer.synthetic import generate
from trainer.trainer import resolve_data_config


def test_images_are_read_per_item_and_never_cached(tmp_path, monkeypatch):
    data = generate(tmp_path / "d", train=4, val=12, imgsz=96, classes=2, seed=0)
    ds = datasets.YoloDataset.from_config(resolve_data_config(str(data), 96), "val", imgsz=96, cache=True)
    opened: list[str] = []
    real_open = datasets.Image.open

    def counting_open(fp, *a, **kw):
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(datasets.Image, "open", counting_open)
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(ds) == 12 and len(opened) == 2 * 12  # every read goes to disk: nothing decoded is kept
    # what DataLoader workers receive: labels and paths, not pixels (12 images of 96x96x3 = 330 kB decoded)
    assert len(pickle.dumps(ds)) < 12 * 96 * 96 * 3 / 4
