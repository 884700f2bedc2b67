"""Without --data the built-in synthetic set is made once: under torchrun by rank 0 while the others wait."""
from __future__ import annotations

import shutil

from trainer import distributed, synthetic
from trainer import trainer as trainer_mod


def test_only_rank_0_writes_the_default_set_and_the_others_read_it_after_the_barrier(small_data, tmp_path,
                                                                                       monkeypatch):
    root = tmp_path / "synthetic"
    monkeypatch.setattr(trainer_mod, "SYNTHETIC_ROOT", root)
    made: list[int] = []
    monkeypatch.setattr(synthetic, "generate", lambda out, **kw: made.append(1) or shutil.copytree(
        small_data.parent, out))

    def rank_0_finishes_meanwhile() -> None:  # rank 1 waits here until rank 0 has written the set
        shutil.copytree(small_data.parent, root)

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "barrier", rank_0_finishes_meanwhile)
    cfg = trainer_mod.resolve_data_config(None, 96)
    assert not made and cfg.nc == 3  # rank 1 generated nothing and read rank 0's set

    monkeypatch.setattr(distributed, "is_main", lambda: True)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    shutil.rmtree(root)
    assert trainer_mod.resolve_data_config(None, 96).nc == 3 and made == [1]  # rank 0 (or no torchrun) makes it
    assert trainer_mod.resolve_data_config(None, 96).nc == 3 and made == [1]  # once
