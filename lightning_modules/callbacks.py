"""Callbacks that NXTP recipes need beyond Lightning's own."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class GlobalBatchSize(L.Callback):
    """Keep the global batch fixed whatever the number of devices: sets ``trainer.accumulate_grad_batches`` to
    ``global_batch_size / (data.batch_size * world_size)`` before the optimizer and schedule are built.

    The paper trains with 512 images per step: 16 per GPU on 32 GPUs, or 16 per GPU with 4 accumulation steps
    on 8 GPUs.
    """

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = global_batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        per_device = trainer.datamodule.hparams.batch_size
        per_step = per_device * trainer.world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"GlobalBatchSize: global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.batch_size={per_device} x {trainer.world_size} devices"
            )
        trainer.accumulate_grad_batches = self.global_batch_size // per_step
        rank_zero_info(f"global batch {self.global_batch_size} = {per_device} per device x {trainer.world_size} "
                       f"devices x {trainer.accumulate_grad_batches} accumulation steps")
