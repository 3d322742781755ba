"""Convert COCO captions (images + captions_*.json) into WebDataset shards for NXTP.

    python experiments/data/coco_to_shards.py --images coco/val2017 \
        --captions coco/annotations/captions_val2017.json --out data/coco/val --per-image

Each sample is ``KEY.jpg`` (the original file's bytes), ``KEY.txt`` and ``KEY.json`` (image id, file name and
all its captions), read by ``datamodules.shards.sources.read_coco`` (which ``nxtp shards`` uses too: it also
converts COCO instances files, with a validation split and resumable shards).
By default there is one sample per caption, as in the paper's training pairs; with
``--per-image`` one sample per image whose text joins all its captions, which is how evaluation references
are built (the labels are the nouns of all five captions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import webdataset as wds

sys.path.insert(0, str(Path(__file__).parents[2]))  # run as a script from anywhere in the repository
from datamodules.shards.sources import Item, read_coco  # noqa: E402


def convert(images: Path, captions: Path, out: Path, per_image: bool = False, samples_per_shard: int = 5000) -> dict:
    """Write the shards and return counts: ``samples``, ``shards`` and ``missing_images`` (skipped, named in a
    warning; so is every other image that is skipped, e.g. one with no captions)."""
    out.mkdir(parents=True, exist_ok=True)
    samples, skipped = 0, []
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for item in read_coco(captions, images):
            if not isinstance(item, Item):
                skipped.append(item)
                continue
            jpg = item.image.read_bytes()
            texts = [item.caption] if per_image else item.meta["captions"]
            for i, text in enumerate(texts):
                sink.write({"__key__": f"{item.key}_{i}", "jpg": jpg, "txt": text, "json": item.meta})
                samples += 1
    for reject in skipped:
        print(f"warning: skipped {reject.file}: {reject.reason} ({reject.detail})", file=sys.stderr)
    shards = -(-samples // samples_per_shard)
    return {"samples": samples, "shards": shards, "missing_images": sum(r.reason == "no image" for r in skipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of COCO images (e.g. val2017/)")
    parser.add_argument("--captions", type=Path, required=True, help="captions_*.json")
    parser.add_argument("--out", type=Path, required=True, help="output folder for NNNNNN.tar shards")
    parser.add_argument("--per-image", action="store_true", help="one sample per image with all its captions")
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    args = parser.parse_args()
    print(json.dumps(convert(args.images, args.captions, args.out, args.per_image, args.samples_per_shard)))


if __name__ == "__main__":
    main()
