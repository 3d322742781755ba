"""Convert COCO captions (images + captions_*.json) into WebDataset shards for NXTP.

    python experiments/data/coco_to_shards.py --images coco/val2017 \
        --captions coco/annotations/captions_val2017.json --out data/coco/val --per-image

Each sample is ``KEY.jpg`` (the original file's bytes), ``KEY.txt`` and ``KEY.json`` (image id, file name and
all its captions). By default there is one sample per caption, as in the paper's training pairs; with
``--per-image`` one sample per image whose text joins all its captions, which is how evaluation references
are built (the labels are the nouns of all five captions).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import webdataset as wds


def convert(images: Path, captions: Path, out: Path, per_image: bool = False, samples_per_shard: int = 5000) -> dict:
    """Write the shards and return counts: ``samples``, ``shards`` and ``missing_images`` (skipped, named in a
    warning)."""
    data = json.loads(captions.read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(" ".join(ann["caption"].split()))
    out.mkdir(parents=True, exist_ok=True)
    samples, missing = 0, []
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for image_id in sorted(by_image):
            path = images / files[image_id]
            if not path.is_file():
                missing.append(str(path))
                continue
            jpg = path.read_bytes()
            texts = [". ".join(by_image[image_id])] if per_image else by_image[image_id]
            for i, text in enumerate(texts):
                meta = {"image_id": image_id, "file_name": files[image_id], "captions": by_image[image_id]}
                sink.write({"__key__": f"{image_id:012d}_{i}", "jpg": jpg, "txt": text, "json": meta})
                samples += 1
    if missing:
        print(f"warning: {len(missing)} images listed in {captions} are missing, e.g. {missing[0]}")
    shards = -(-samples // samples_per_shard)
    return {"samples": samples, "shards": shards, "missing_images": len(missing)}


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
