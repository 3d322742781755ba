"""``nxtp shards``: write your images and their captions or labels as training shards (see ``datamodules.shards``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datamodules.images import MAX_IMAGE_PIXELS

from . import imported


def shards_main(argv: list[str]) -> int:
    """``nxtp shards SOURCE --out DIR [--val-fraction 0.05] [--max-side N] [--shard-size N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="nxtp shards",
        description="Write images with captions or labels as WebDataset shards that `nxtp fit` trains on: OUT/train "
        "and OUT/val. SOURCE is a folder of images with .txt/.tags/.json sidecars, an ImageFolder tree (class "
        "folders), a CSV/TSV/JSONL file (an image path column and a caption and/or tags column), or a COCO captions "
        "or instances .json. An interrupted run resumes when run again.",
    )
    parser.add_argument("source", type=Path, help="folder, .csv/.tsv/.jsonl, or COCO .json")
    parser.add_argument("--out", type=Path, required=True, help="output folder (empty, or this same conversion)")
    parser.add_argument(
        "--format", default="auto", help="what SOURCE is: folder, imagefolder, table or coco (default: guessed)"
    )
    parser.add_argument("--txt", choices=["captions", "tags"], default="captions", help="what a folder's .txt holds")
    parser.add_argument("--image-column", help="table: the image path column (default: image, path, file, ...)")
    parser.add_argument("--caption-column", help="table: the caption column (default: caption, text)")
    parser.add_argument("--tags-column", help="table: the comma-separated tags column (default: tags, labels)")
    parser.add_argument("--images", type=Path, help="COCO: the image folder (default: the .json's folder)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of images for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (by a hash of each key)")
    parser.add_argument("--max-side", type=int, help="shrink images larger than this on their long side")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="reject larger images (header)")
    parser.add_argument("--top", type=int, default=20, help="labels shown in the summary")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT (its old shards are deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from datamodules.shards import ConversionError, convert, format_summary

    imported()
    options = {name: getattr(args, name) for name in ("txt", "image_column", "caption_column", "tags_column", "images")}
    try:
        summary = convert(
            args.source,
            args.out,
            args.format,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_side=args.max_side,
            shard_size=args.shard_size,
            max_pixels=args.max_image_pixels,
            force=args.force,
            progress=not args.no_progress,
            **options,
        )
    except (ConversionError, ValueError, FileNotFoundError) as e:
        summary = getattr(e, "summary", None)
        if summary is not None and summary["rejects"]:
            print(format_summary(args.out, summary, args.top), file=sys.stderr)
        print(f"nxtp shards: {e}", file=sys.stderr)
        return 1
    print(format_summary(args.out, summary, args.top))
    return 0
