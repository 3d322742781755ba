"""The interface between data and model: what the data pipeline needs from a model (``ModelInputs``) and what it
gives the model for one step (``Batch``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .sequence import SequenceBuilder, TextBatch

if TYPE_CHECKING:
    from .nxtp import Preprocessing


@dataclass(frozen=True)
class ModelInputs:
    """What the data pipeline needs from a model to make its batches: how text is laid out (the tokenizer, its
    delimiter and the reference's quirks, in ``sequences``), the prompt, and the image preprocessing: the
    transforms, and how image files are decoded (``preprocessing``, the model's ``Preprocessing``)."""

    sequences: SequenceBuilder
    prompt: str
    train_transform: Callable
    eval_transform: Callable
    image_size: tuple[int, int]
    preprocessing: Preprocessing

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The input size that large JPEGs are decoded at reduced scale for (``decode_image``'s ``input_size``);
        None: decoded in full, as the model's ``preprocessing`` says."""
        return self.image_size if self.preprocessing.decode == "draft" else None

    @property
    def reference_compat(self) -> bool:
        return self.sequences.reference_compat

    @property
    def pad_id(self) -> int:
        return self.sequences.pad_id


@dataclass
class Batch:
    """B images with their text sequences and references, and what the data pipeline rejected since the batch
    before (counted by reason in ``skipped``, one record each in ``rejects``; the records leave the batch in the
    main process, before it moves to the device: see ``NXTPDataModule.on_before_batch_transfer``).

    A batch of no samples (``Batch.empty()``) only carries a data worker's rejects.
    """

    pixels: Tensor  # [B, 3, H, W]
    text: TextBatch | None  # the training sequences: prompt, labels, delimiters
    labels: list[list[str]]  # per image: the labels in its sequence (training) or all of them (evaluation)
    keys: list[str]  # per image: its sample key
    skipped: dict[str, int] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> Batch:
        return cls(torch.empty(0), None, [], [])

    def token_count(self) -> int:
        """Text tokens in the batch, padding excluded (what ``ThroughputMonitor`` counts as items)."""
        return int(self.text.lengths.sum()) if self.text is not None else 0
