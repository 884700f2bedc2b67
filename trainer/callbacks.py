"""Extension points of the Trainer: extra loss terms (distillation) and lifecycle hooks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Override any hook; every hook is optional."""

    def modules(self) -> list[nn.Module]:
        """Extra trainable modules (e.g. distillation adapters): optimised and checkpointed with the model."""
        return []

    def input_stride(self) -> int:
        """A number every input side must be a multiple of for this callback's own network (a teacher's); 1: none."""
        return 1

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once the model, data and optimizer exist (after a resume has been loaded)."""

    def extra_loss(self, trainer: Trainer, model: Any, imgs: Tensor, targets: Tensor,
                   preds: list[Tensor]) -> dict[str, Tensor]:
        """Named extra loss terms (already weighted, per image); they are added to the detection loss."""
        return {}

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Called on every rank before an epoch's first batch (also the first epoch of a resumed run)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, Any]) -> None:
        """Called on every rank after an epoch, with the logged row (losses, mAP, speeds); setting
        `trainer.stop_requested = True` (on rank 0) ends training after this epoch, its checkpoint written."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called after the last epoch."""
