"""Both sides of draft decoding in one table: how fast 3000x2200 photos are read (decoded, oriented, converted,
resized and normalised into the model's input) with every pixel decoded (``decode: full``, the reference's
preprocessing and every model's default) and with large JPEGs decoded at 1/2-1/8 scale (``decode: draft``), and
how often that changes a model's top-5 labels.

    python experiments/bench_decode.py --checkpoint logs/default/version_0/checkpoints/last.ckpt \\
        --shards data/shapes/test/shard-000000.tar [--limit 1000] [--photos 12]

Speed: ``--photos`` photo-like JPEGs (``bench_label.photo``; every other one progressive), read one after another
in one process and thread, the two ways alternating so that other work on the CPU slows both alike. Labels: the
test scenes, each upscaled (bicubic) to 2200x2200 and set in the middle of a 3000x2200 grey photo, saved as JPEG
(quality 90), labelled both ways by the checkpoint's model; and the parity fixtures' three images the same way by
the imported tiny release (``tests/fixtures/nxtp-official-tiny``, random weights: its labels are nonsense strings,
but they are the reference's). A row counts the images whose top-5 labels (one-shot, as a set) differ from those
of full decoding, and the largest change of a label's probability.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_label import photo  # noqa: E402

from datamodules.images import decode_image  # noqa: E402
from lightning_modules.checkpoint import load_model  # noqa: E402
from lightning_modules.official import import_official  # noqa: E402
from lightning_modules.sampling import recognize  # noqa: E402

ROOT = Path(__file__).parents[1]
OFFICIAL = ROOT / "tests/fixtures/nxtp-official-tiny"
PHOTO = (3000, 2200)


def jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def as_photo(image: Image.Image) -> bytes:
    """A small picture as a 3000x2200 JPEG: upscaled to the photo's height, in the middle of a grey margin (which
    the tower's centre crop cuts off)."""
    side = PHOTO[1]
    canvas = Image.new("RGB", PHOTO, (128, 128, 128))
    canvas.paste(image.convert("RGB").resize((side, side), Image.BICUBIC), ((PHOTO[0] - side) // 2, 0))
    return jpeg(canvas)


def model_input(model, data: bytes, decode: str) -> torch.Tensor:
    """What the model is given for an image file, read as ``decode`` says (as ``Recognizer.preprocess`` does)."""
    return model.eval_transform(decode_image(data, input_size=model.image_size if decode == "draft" else None))


def reading_speed(model, photos: list[bytes], rounds: int) -> dict[str, float]:
    """Images per second through ``model_input``, per decode mode."""
    seconds = {"full": 0.0, "draft": 0.0}
    for _ in range(rounds):
        for decode in seconds:
            start = time.perf_counter()
            for data in photos:
                model_input(model, data, decode)
            seconds[decode] += time.perf_counter() - start
    return {decode: rounds * len(photos) / s for decode, s in seconds.items()}


@torch.no_grad()
def label_changes(model, images: list[bytes], batch_size: int = 50) -> tuple[int, float]:
    """(images whose top-5 label set differs between draft and full decoding, largest probability change)."""
    changed, largest = 0, 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        full, draft = (
            recognize(model, torch.stack([model_input(model, x, decode) for x in chunk]), topk=5)
            for decode in ("full", "draft")
        )
        for a, b in zip(full, draft):
            a, b = dict(a), dict(b)
            changed += set(a) != set(b)
            largest = max([largest] + [abs(a[k] - b[k]) for k in a.keys() & b.keys()])
    return changed, largest


def scenes(shards: str, limit: int) -> list[Image.Image]:
    samples = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg")
    return [image for (image,), _ in zip(samples, range(limit))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the default model (.ckpt or model folder)")
    parser.add_argument("--shards", required=True, help="the test scenes")
    parser.add_argument("--limit", type=int, default=1000, help="test scenes to label")
    parser.add_argument("--photos", type=int, default=12, help="3000x2200 photos to time reading on")
    parser.add_argument("--rounds", type=int, default=3, help="times each photo is read each way")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        default = load_model(args.checkpoint)
        release = import_official(
            str(OFFICIAL / "official_ckpt.pth"),
            str(OFFICIAL / "clip_frozen.pt"),
            str(ROOT / "tests/fixtures/llama2-tokenizer"),
            str(Path(tmp) / "official"),
            decoder_heads=4,
        )
    photos = [jpeg(photo(*PHOTO, seed=i), progressive=i % 2 == 1) for i in range(args.photos)]
    fixtures = [as_photo(Image.open(p)) for p in sorted(OFFICIAL.glob("image_*.png"))]
    test_scenes = [as_photo(image) for image in scenes(args.shards, args.limit)]
    rows = [
        (f"default ({Path(args.checkpoint).name}), {len(test_scenes)} test scenes", default, test_scenes),
        (f"imported tiny release, {len(fixtures)} parity images", release, fixtures),
    ]
    print(f"reading {PHOTO[0]}x{PHOTO[1]} photos: {len(photos)} JPEGs x {args.rounds} rounds, 1 thread\n")
    print("| model, images | tower input | decode | photos read/s | top-5 labels changed | largest prob change |")
    print("|---|---|---|---:|---:|---:|")
    for name, model, images in rows:
        speed = reading_speed(model, photos, args.rounds)
        changed, largest = label_changes(model, images)
        size = "x".join(map(str, model.image_size))
        print(f"| {name} | {size} | full (default) | {speed['full']:.1f} | (reference) | |")
        print(
            f"| {name} | {size} | draft | {speed['draft']:.1f} ({speed['draft'] / speed['full']:.1f}x) | "
            f"{changed} of {len(images)} ({changed / len(images):.1%}) | {largest:.4f} |"
        )


if __name__ == "__main__":
    main()
