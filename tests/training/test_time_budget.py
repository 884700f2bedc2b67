"""A wall-clock budget shortens the LR schedule to the epochs that fit, and a resumed run keeps that length."""
from __future__ import annotations

import pytest
import torch

from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.trainer import CHECKPOINT, Trainer, lr_factor


class StopAfterOneEpoch(Callback):
    """Ends training after the epoch it sees."""

    def on_epoch_end(self, trainer, epoch, row):
        """Ask the trainer to stop."""
        trainer.stop_requested = True


def _trainer(small_data, tmp_path, **kw) -> Trainer:
    cfg = TrainConfig(**{"model": "yolov7-tiny", "data": str(small_data), "out": str(tmp_path), "imgsz": 96,
                         "batch": 4, "workers": 0, "device": "cpu", "progress": False, **kw})
    return Trainer(cfg)


def test_epochs_for_budget_follows_the_first_epochs_pace(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, epochs=50, max_time_s=100.0, fit_epochs_to_time=True)
    assert t._epochs_for_budget(0, 10.0) == 10  # 1 done + 90 s left at 10 s per epoch
    assert t._epochs_for_budget(0, 1.0) == 50  # never longer than --epochs
    assert t._epochs_for_budget(0, 150.0) == 1  # over budget already: this epoch was the last
    assert t._epochs_for_budget(4, 10.0) == 14  # resumed at epoch 5: counts from there


def test_fitted_schedule_is_checkpointed_and_resumed(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, epochs=50, max_time_s=1e6, fit_epochs_to_time=True)
    t.epochs, t.epochs_fitted = 7, True  # as if the first epoch had planned 7
    t.save_checkpoint(0)
    again = _trainer(small_data, tmp_path, epochs=50, max_time_s=1e6, fit_epochs_to_time=True, resume=True)
    assert again.start_epoch == 1 and again.epochs == 7
    # the resumed run's first epoch does not plan again with its own fresh (and here unlimited) budget
    again.callbacks.append(StopAfterOneEpoch())
    again.train()
    assert again.epochs == 7 and not any("epochs_planned" in r for r in again.rows)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epochs"] == 7


def test_warmup_is_at_most_half_of_the_fitted_schedule(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, epochs=300, min_warmup_iters=1000)
    nb = 10
    assert t._warmup_iters(nb) == 1000  # YOLOv7's floor of 1000 iterations, within 300 epochs
    t.epochs = 5  # a time budget fitted the schedule to 5 epochs: warmup takes at most half of it
    assert t._warmup_iters(nb) == 5 * nb // 2


def test_resume_with_more_epochs_extends_a_finished_run(small_data, tmp_path):
    first = _trainer(small_data, tmp_path, epochs=1, seed=2).train()
    assert first.epochs_done == 1
    more = _trainer(small_data, tmp_path, epochs=3, seed=2, resume=True)
    assert more.start_epoch == 1 and more.epochs == 3  # the cosine now runs over the new length
    result = more.train()
    assert result.epochs_done == 3
    assert [int(r["epoch"]) for r in result.rows] == [1, 2, 3]
    # the rows of the first run are kept, and the extension's learning rate follows the new schedule
    assert result.rows[0] == first.rows[0]
    assert result.rows[-1]["lr"] < result.rows[1]["lr"]
    # resumed once more with nothing left to train: no validation this run, the finished run's metrics stand
    done = _trainer(small_data, tmp_path, epochs=3, seed=2, resume=True).train()
    assert done.last is None and done.final("map") == result.final("map") == result.last.metrics.map
    assert done.final("map50") == result.last.metrics.map50


class StopAtEpoch(Callback):
    """Records which epoch last.pt holds at each epoch's end; asks to stop after epoch `stop` (1-based)."""

    def __init__(self, stop: int):
        self.stop, self.seen = stop, []

    def on_epoch_end(self, trainer, epoch, row):
        path = trainer.out / CHECKPOINT
        self.seen.append(torch.load(path, weights_only=True)["epoch"] if path.is_file() else None)
        trainer.stop_requested = epoch + 1 >= self.stop


def test_save_every_skips_checkpoints_between_but_keeps_the_last_and_a_stop(small_data, tmp_path):
    t = _trainer(small_data, tmp_path / "a", epochs=3, save_every_s=1e9)
    cb = StopAtEpoch(stop=2)
    t.callbacks.append(cb)
    t.train()
    assert cb.seen == [None, None]  # not written after epochs 1 and 2
    assert torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["epoch"] == 1  # but at the stop
    t = _trainer(small_data, tmp_path / "b", epochs=2, save_every_s=1e9)
    t.callbacks.append(cb := StopAtEpoch(stop=99))
    t.train()
    assert cb.seen == [None, 1]  # the last epoch always saves
    t = _trainer(small_data, tmp_path / "c", epochs=2)
    t.callbacks.append(cb := StopAtEpoch(stop=99))
    t.train()
    assert cb.seen == [0, 1]  # the default: every epoch


def test_a_stop_on_an_unvalidated_epoch_validates_the_final_weights(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, epochs=5, val_interval=3)
    t.callbacks.append(StopAfterOneEpoch())
    result = t.train()
    assert result.epochs_done == 1 and "map" in result.rows[-1] and result.last is not None
    assert "map" in torch.load(tmp_path / CHECKPOINT, weights_only=True)["rows"][-1]


def test_resuming_with_another_optimizer_is_one_error(small_data, tmp_path):
    from search_spaces.errors import CheckpointError

    t = _trainer(small_data, tmp_path, epochs=2, optimizer="adamw")
    t.callbacks.append(StopAfterOneEpoch())
    t.train()
    with pytest.raises(CheckpointError, match="--optimizer adamw") as e:
        _trainer(small_data, tmp_path, epochs=2, optimizer="sgd", resume=True)
    assert e.value.field == "optimizer"


def test_a_resume_keeps_the_divergence_count_and_takes_this_runs_weight_decay(small_data, tmp_path):
    t = _trainer(small_data, tmp_path, epochs=3, batch=4, nbs=64)
    t.callbacks.append(StopAfterOneEpoch())
    t.train()
    t.nonfinite_run = 2  # as if the last steps before the kill had non-finite gradients
    t.save_checkpoint(0)
    again = _trainer(small_data, tmp_path, epochs=3, batch=3, nbs=64, resume=True)  # 3 x 21 steps: not 64
    assert again.nonfinite_run == 2
    (weight,) = [g for g in again.optimizer.param_groups if g["kind"] == "weight"]
    assert weight["weight_decay"] == again.weight_decay != t.weight_decay
    assert all(g["weight_decay"] == 0.0 for g in again.optimizer.param_groups if g["kind"] != "weight")


def test_the_time_budget_counts_the_interrupted_runs_seconds(small_data, tmp_path):
    first = _trainer(small_data, tmp_path, epochs=5, max_time_s=1e6)
    first.callbacks.append(StopAfterOneEpoch())
    first.train()
    spent = torch.load(tmp_path / CHECKPOINT, weights_only=True)["elapsed_s"]
    assert spent > 0
    # a resume whose budget the first epoch already spent trains nothing more (it used to start a new clock)
    again = _trainer(small_data, tmp_path, epochs=5, max_time_s=spent / 2, resume=True).train()
    assert again.epochs_done == 1 and len(again.rows) == 1
    # with budget left it goes on, and its clock continues from the interrupted run's
    more = _trainer(small_data, tmp_path, epochs=5, max_time_s=1e6, resume=True)
    more.callbacks.append(StopAfterOneEpoch())
    assert more.train().epochs_done == 2
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["elapsed_s"] > spent


def test_the_first_epoch_plans_the_schedule_and_the_run_ends_at_its_floor(small_data, tmp_path, monkeypatch):
    # the plan's arithmetic is tested above; here the trainer acts on it: the schedule is 2 epochs, not 50
    monkeypatch.setattr(Trainer, "_epochs_for_budget", lambda self, epoch, spent: 2)
    t = _trainer(small_data, tmp_path, epochs=50, max_time_s=1e6, fit_epochs_to_time=True, min_warmup_iters=0)
    result = t.train()
    assert result.epochs_done == 2 and result.rows[0]["epochs_planned"] == 2
    assert t.epochs == 2 and "map" in result.rows[-1]  # the planned last epoch is validated
    # the last batch ran at the 2-epoch cosine's rate near its floor (0.048 x lr0), not at 50 epochs' (0.999 x lr0)
    nb = len(t.train_loader)
    assert result.rows[-1]["lr"] == pytest.approx(t.hyp.lr0 * lr_factor(2 - 1 / nb, 2, t.hyp.lrf, "cosine"), rel=1e-6)
