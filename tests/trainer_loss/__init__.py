"""Tests of trainer.assign, trainer.loss, trainer.hyp, trainer.postprocess and trainer.metrics."""
