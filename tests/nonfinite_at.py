"""A test-only callback that makes one rank's batch give a non-finite loss at a chosen step (used through
``--trainer.callbacks+=tests.nonfinite_at.NonFiniteAt``), as an overflow in one rank's batch would."""

from __future__ import annotations

import lightning as L


class NonFiniteAt(L.Callback):
    """Fill the pixels of rank ``rank``'s batch at global step ``step`` with NaN."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch.pixels.fill_(float("nan"))
