"""Data for NXTP: WebDataset shards, labels from captions, and the project's own synthetic scenes."""

from .webdataset import NXTPDataModule

__all__ = ["NXTPDataModule"]
