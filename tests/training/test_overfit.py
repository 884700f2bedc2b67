"""End to end: a tiny model overfits 8 synthetic images to mAP50 >= 0.9 (data, loss, assignment, NMS, mAP)."""
from __future__ import annotations

import yaml

from trainer.callbacks import Callback
from trainer.config import TrainConfig
from trainer.hyp import load_hyp
from trainer.synthetic import generate
from trainer.trainer import Trainer

TARGET_MAP50 = 0.9


class StopAtTarget(Callback):
    """Ends training at the first validation that reaches the target."""

    def on_epoch_end(self, trainer, epoch, row):
        if row.get("map50", 0.0) >= TARGET_MAP50:
            trainer.stop_requested = True


def test_yolov7_tiny_overfits_eight_images(tmp_path):
    data = generate(tmp_path / "d", train=8, val=1, imgsz=64, seed=3)
    d = yaml.safe_load(data.read_text())
    d["val"] = d["train"]  # evaluate on the very images it trains on
    over = tmp_path / "d" / "over.yaml"
    over.write_text(yaml.safe_dump(d))
    # augmentation off and a constant, high learning rate: the point is to memorise (sweep in docs/benchmarks.md).
    # The epoch at which it gets there depends on the CPU's kernels (at 128 px Intel: 175-205, AMD EPYC: 200; at
    # 64 px, which takes 0.6x the time, Intel: 150), so the run has a budget of 300 epochs and stops at the target.
    hyp = load_hyp("tiny").replace(lr0=0.04, lrf=1.0, warmup_epochs=0, weight_decay=0.0, mosaic=0.0, mixup=0.0,
                                   paste_in=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, translate=0.0,
                                   scale=0.0)
    cfg = TrainConfig(model="yolov7-tiny", data=str(over), out=str(tmp_path / "run"), epochs=300, imgsz=64,
                      batch=8, nbs=8, workers=0, ema=False, val_interval=10, min_warmup_iters=10, device="cpu",
                      progress=False, save_every_s=60.0)  # its 0.2 s epochs: per-epoch checkpoints were half the time
    result = Trainer(cfg, hyp=hyp, callbacks=[StopAtTarget()]).train()
    assert result.last is not None
    assert result.last.metrics.map50 >= TARGET_MAP50, result.rows[-1]
    assert result.epochs_done < 300  # stopped at the target, after the validation that reached it
    assert result.rows[-1]["epoch"] == result.epochs_done and "map50" in result.rows[-1]
