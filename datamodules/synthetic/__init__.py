"""Procedurally drawn scenes with captions: the project's built-in dataset.

Every image shows 1-5 simple objects (shapes and pictograms drawn with Pillow)
on a varied background, with a natural caption that names each object kind and
no other noun, so that :func:`datamodules.labels.extract_labels` recovers exactly
the kinds in the picture. Samples are written as WebDataset shards::

    OUT/{train,val,test}/shard-%06d.tar   KEY.jpg, KEY.txt, KEY.json
    OUT/manifest.json, OUT/done                 (and OUT/tokenizer/, the second step)

Each sample comes from its own ``random.Random`` seeded by (seed, split, index),
so the output is byte-identical for a given seed whatever the number of workers.

One module per concern: ``drawing`` (the pen, the object kinds, colours, backgrounds), ``layout`` (where the
objects go), ``captions``, ``scenes`` (one scene from its seed) and ``shards`` (writing the dataset). The caption
tokenizer is trained from the built shards in a step of its own (``datamodules.tokenizer``).

Usage::

    python -m datamodules.synthetic --out data/shapes --train 40000 --val 1000 --test 1000
    python -m datamodules.tokenizer --data data/shapes
    python -m datamodules.synthetic --preview preview.png
    python -m datamodules.synthetic --out data/shapes-base --exclude-kinds kite ladder   # kinds to teach later
    python -m datamodules.synthetic --out data/kites --feature-kinds kite ladder  # a kite or a ladder in each scene
"""

from .drawing import COLORS, KINDS, plural, select_featured, select_kinds
from .scenes import draw_scene, render_preview, sample_seed
from .shards import SPLITS, build_dataset, iter_split_metadata, main

__all__ = [
    "COLORS",
    "KINDS",
    "SPLITS",
    "build_dataset",
    "draw_scene",
    "iter_split_metadata",
    "main",
    "plural",
    "render_preview",
    "sample_seed",
    "select_featured",
    "select_kinds",
]
