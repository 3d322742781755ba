"""A test-only callback that sends SIGTERM to the launching process at a chosen moment of a run (used through
``--trainer.callbacks+=tests.signal_at.SignalAt``), to interrupt a run exactly there."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send SIGTERM to the process that launched the run (rank 0), once, ``moment`` at step ``step``.

    Args:
        moment: ``training`` (inside the training step), ``validation`` (inside a validation of the fit),
            ``checkpoint`` (while a checkpoint is being written) or ``test`` (inside a test step).
        step: the global step at (or after) which to send it.
        group: send it to the whole process group instead (its DataLoader workers too), as Ctrl-C in a terminal
            or ``kill -- -PGID`` does.
    """

    def __init__(self, moment: str, step: int, group: bool = False) -> None:
        self.moment, self.step, self.group, self.sent = moment, step, group, False

    def _send(self, trainer: L.Trainer, moment: str) -> None:
        if not self.sent and moment == self.moment and trainer.global_step >= self.step and trainer.is_global_zero:
            self.sent = True
            if self.group:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer, "training")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, "validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._send(trainer, "checkpoint")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._send(trainer, "test")
