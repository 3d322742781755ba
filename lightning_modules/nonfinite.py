"""Skipping a training step whose loss is not finite, on every rank, and leaving the model as it was."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def running_stats(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward changes: the running statistics of BatchNorm layers (the conv stem)."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase)
        for buffer in module.buffers(recurse=False)
    ]


def save_stats(model: nn.Module) -> list[torch.Tensor]:
    """A copy of ``model``'s ``running_stats``, for ``restore_stats``."""
    return [b.clone() for b in running_stats(model)]


def restore_stats(model: nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back the ``running_stats`` that ``save_stats`` copied."""
    with torch.no_grad():
        for buffer, value in zip(running_stats(model), saved):
            buffer.copy_(value)


class NonFiniteGuard:
    """A step whose loss is NaN or infinite on any rank is skipped by every rank (a rank that skipped alone would
    leave the others waiting in the gradient all-reduce; Lightning also refuses a ``training_step`` that returns
    None under DDP). Backward still runs; the running statistics the forward changed are put back after it (it
    still reads them), and the step's gradients are dropped before the optimizer step, so AdamW leaves every
    parameter as it was (a GradScaler skips such a step itself). After ``max_steps`` skipped steps in a run, the
    run stops with an error naming the batch's samples.

    The module calls ``before_forward``, ``skip``, ``after_backward`` and ``drop_gradients`` from its hooks."""

    def __init__(self, model: nn.Module, max_steps: int) -> None:
        self.model, self.max_steps = model, max_steps
        self.skipped = 0  # in the run so far (restored on resume)
        self._saved: list[torch.Tensor] = []
        self._restore = False  # set by a skipped step, until its backward
        self._drop = False  # ... and until its optimizer step

    def before_forward(self) -> None:
        self._saved = save_stats(self.model)

    def skip(self, step: int, here: bool, where: str) -> None:
        """Record a skipped step (``here``: this rank's loss is the non-finite one, its samples named by
        ``where``); raises once the run has skipped more than ``max_steps``."""
        self._restore = self._drop = True
        self.skipped += 1
        if self.skipped > self.max_steps:
            raise RuntimeError(
                f"the loss is not finite for the {self.skipped}th time (more than "
                f"model.optimization.max_nonfinite_steps={self.max_steps}); {where}"
            )
        if here:
            warnings.warn(f"skipping step {step}: loss is not finite ({where})", stacklevel=2)

    def after_backward(self) -> None:
        if self._restore:
            restore_stats(self.model, self._saved)
            self._restore = False

    def drop_gradients(self, parameters) -> bool:
        """Before an optimizer step: drop the gradients of a skipped step; True if it was one (with gradient
        accumulation: if one of its micro-batches was)."""
        if not self._drop:
            return False
        self._drop = False
        for param in parameters:
            param.grad = None  # AdamW leaves a parameter without a gradient as it is
        return True
