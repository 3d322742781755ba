"""NXTP model code: the recognizer, its attention mask, one-shot sampling, metrics and the LightningModule."""

from .lit_nxtp import LitNXTP
from .nxtp import NXTP, PROMPT

__all__ = ["LitNXTP", "NXTP", "PROMPT"]
