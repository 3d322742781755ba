"""NXTP model code: the recognizer, its attention mask, one-shot sampling, metrics and the LightningModule.

The names below are imported on first use, so that light commands (``nxtp --help``, every ``nxtp COMMAND --help``) do
not pay for importing Lightning and transformers.
"""

import importlib

_EXPORTS = {"LitNXTP": ".lit_nxtp", "NXTP": ".nxtp", "PROMPT": ".sequence", "Recognizer": ".recognizer"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
