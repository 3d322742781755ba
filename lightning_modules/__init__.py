"""NXTP model code: the recognizer, its attention mask, one-shot sampling, metrics and the LightningModule."""

from .lit_nxtp import LitNXTP
from .nxtp import NXTP, PROMPT
from .recognizer import Recognizer

__all__ = ["LitNXTP", "NXTP", "PROMPT", "Recognizer"]
