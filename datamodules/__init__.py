"""Data for NXTP: WebDataset shards, labels from captions, and the project's own synthetic scenes.

``NXTPDataModule`` is imported on first use: reading images (``datamodules.images``) or captions
(``datamodules.labels``) does not pay for importing Lightning.
"""

import importlib

_EXPORTS = {"NXTPDataModule": ".webdataset"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
