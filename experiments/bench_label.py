"""Labelling speed on large photos, end to end as ``nxtp label`` does it (``inference.label_files``): files ->
``ImageFiles`` (decode, orient, convert, resize) in DataLoader workers -> ``Recognizer.label``, with plain and
draft JPEG decoding.

    python experiments/bench_label.py [--images 32] [--size 3000x2200] [--workers 0 1 2] [--folder DIR]

It writes ``--images`` photo-like JPEGs (smooth gradients, sensor-like noise, sharp-edged shapes; every other one
progressive) to ``--folder`` (kept there and reused) or a temporary folder, and labels them with a random model
of the default configuration (``configs/model/nxtp_tiny.yaml``, a 64-pixel tower, with a tokenizer fitted to the
synthetic scenes' object names, as ``make data`` makes it) whose labels end after a few tokens, as a trained
model's do. For each worker count it
prints images/s and the decode share (the part of the wall time the labelling loop waits for images: decoding
and preprocessing, as far as the workers do not hide it), for plain decoding and for draft decoding, and the
draft/plain ratio. The runs alternate within each worker count, so other work on the CPU affects both alike.

    python experiments/bench_label.py --locate [--checkpoint CKPT --scenes SHARD] [--images 200] [--views 4]

measures instead what ``--locate`` (a point and a box per label) costs: images/s of ``label_files`` with and
without it, alternating, in one run, at top-10 with min-prob 0 and 0.1, for the default model (``--checkpoint``,
labelling ``--images`` scenes of ``--scenes``; without them a random model of the default configuration on
photos) and for ``experiments/bench_train.py``'s medium random model (256 image tokens, a 6-block decoder of width
1024) on 640x480 photos, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from datamodules.synthetic import KINDS
from datamodules.tokenizer import train_caption_tokenizer
from lightning_modules import Recognizer
from lightning_modules.decoder import DecoderConfig
from lightning_modules.inference import InferenceOptions, image_paths, label_files
from lightning_modules.nxtp import NXTP, NXTPConfig
from lightning_modules.vision import VisionConfig

ROOT = Path(__file__).parents[1]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: JPEG spends its time on detail, so flat test images would decode unrealistically fast."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    a = np.stack(
        [
            120 + 100 * np.sin(3 * x + rng.uniform(0, 6)),
            120 + 100 * np.cos(2 * y + rng.uniform(0, 6)),
            128 + 80 * np.sin(4 * (x + y)),
        ],
        -1,
    )
    a += rng.normal(0, 8, a.shape).astype(np.float32)
    image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0, side = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 30, width // 5)
        box = [x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.5)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"photo_{size[0]}x{size[1]}_{i:04d}.jpg"
        if not path.exists():
            photo(*size, seed=i).save(path, quality=90, progressive=i % 2 == 1)
    return image_paths([str(folder / f"photo_{size[0]}x{size[1]}_*.jpg")])[:n]


def default_model(tokenizer: str | None, folder: Path) -> NXTP:
    """A random model of the default configuration; its labels end after a few tokens, as a trained model's do."""
    if tokenizer is None:
        tokenizer = str(folder / "tokenizer")
        train_caption_tokenizer([f"a {kind} next to a {kind}" for kind in KINDS], tokenizer, required_words=KINDS)
    config = yaml.safe_load((ROOT / "configs/model/nxtp_tiny.yaml").read_text())["nxtp"]
    torch.manual_seed(0)
    vision, decoder = VisionConfig(**config["vision"]), DecoderConfig(**config["decoder"])
    model = NXTP(NXTPConfig(vision, decoder, tokenizer)).eval()
    with torch.no_grad():  # a random model rarely ends a label: every branch would run to the length limit
        model.decoder.get_output_embeddings().weight[model.sequences.delimiter_id] *= 8
    return model


def label_folder(recognizer: Recognizer, paths: list[Path], workers: int, batch_size: int) -> tuple[float, float]:
    """Label every image with ``label_files``, as ``nxtp label`` does; return (seconds, seconds outside the model:
    waiting for decoded images)."""
    in_model = 0.0
    label = recognizer.label

    def timed(*args, **kwargs):
        nonlocal in_model
        start = time.perf_counter()
        try:
            return label(*args, **kwargs)
        finally:
            in_model += time.perf_counter() - start

    recognizer.label = timed  # shadows the method on this instance only
    try:
        start = time.perf_counter()
        for result in label_files(recognizer, paths, InferenceOptions(batch_size=batch_size), workers=workers):
            assert result.error is None, result.error
        seconds = time.perf_counter() - start
    finally:
        del recognizer.label
    return seconds, seconds - in_model


def locate_cost(
    recognizer: Recognizer, paths: list[Path], batch_size: int, min_prob: float, views: int = 1, repeats: int = 5
):
    """Seconds per image of ``label_files`` without and with ``locate`` (best of ``repeats``, alternating);
    ``views``: ``--locate-views``."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for locate in (False, True):
            options = InferenceOptions(
                batch_size=batch_size, topk=10, min_prob=min_prob, locate=locate, locate_views=views
            )
            start = time.perf_counter()
            for result in label_files(recognizer, paths, options):
                assert result.error is None, result.error
            times[locate].append((time.perf_counter() - start) / len(paths))
    return min(times[False]), min(times[True])


def bench_locate(args: argparse.Namespace, folder: Path) -> None:
    import tarfile

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import build
    from random_model import photos

    models = []
    if args.checkpoint:
        scenes = folder / "scenes"
        scenes.mkdir()
        with tarfile.open(args.scenes) as tar:
            members = [m for m in tar if m.name.endswith(".jpg")][: args.images]
            for m in members:
                (scenes / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        models.append(("default (trained)", Recognizer.from_checkpoint(args.checkpoint), sorted(scenes.glob("*.jpg"))))
    photos(folder / "photos", min(args.images, 32))
    pictures = sorted((folder / "photos").glob("*.jpg"))
    if not args.checkpoint:
        models.append(("default (random)", Recognizer(default_model(args.tokenizer, folder)), pictures))
    medium, _, _ = build("medium", torch.device("cpu"))
    with torch.no_grad():  # labels that end after a few tokens, as a trained model's do
        medium.decoder.get_output_embeddings().weight[medium.sequences.delimiter_id] *= 8
    models.append(("medium (random)", Recognizer(medium.eval()), pictures[:8]))
    print(f"{'model':>18} {'min-prob':>8} {'images':>6} {'plain img/s':>11} {'--locate img/s':>14} {'time ratio':>10}")
    for name, recognizer, paths in models:
        for min_prob in (0.0, 0.1):
            plain, located = locate_cost(recognizer, paths, args.batch_size, min_prob, args.views)
            print(
                f"{name:>18} {min_prob:>8} {len(paths):>6} {1 / plain:>11.1f} {1 / located:>14.1f} "
                f"{located / plain:>9.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locate", action="store_true", help="measure what --locate costs instead (see above)")
    parser.add_argument("--checkpoint", help="--locate: the default model, trained")
    parser.add_argument("--views", type=int, default=1, choices=(1, 4, 5), help="--locate: with --locate-views")
    parser.add_argument("--scenes", default="data/shapes/test/shard-000000.tar", help="--locate: its scenes")
    parser.add_argument("--images", type=int, default=32, help="how many photos to label")
    parser.add_argument("--size", default="3000x2200", help="photo size WIDTHxHEIGHT")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--folder", help="where the photos are written (and reused); default: a temporary folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the labelling process (on a busy 2-core machine 2 threads made the "
        "model 20x slower than 1: its small matrix products wait on each other)",
    )
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: one fitted to the synthetic scenes)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.locate:
            return bench_locate(args, Path(tmp))
        start = time.perf_counter()
        paths = make_photos(Path(args.folder or tmp), args.images, size)
        took = time.perf_counter() - start
        print(f"{len(paths)} JPEGs of {size[0]}x{size[1]} (half progressive) ready in {took:.0f} s")
        model = default_model(args.tokenizer, Path(tmp))
        recognizers = {"plain": Recognizer(model, decode="full"), "draft": Recognizer(model, decode="draft")}
        label_folder(recognizers["draft"], paths[:2], 0, args.batch_size)  # warm-up, outside the timings
        pixels = [torch.randn(3, *model.visual.image_size) for _ in range(args.batch_size)]
        start = time.perf_counter()
        labels = recognizers["plain"].label(pixels, topk=10, batch_size=args.batch_size)
        model_ms = 1000 * (time.perf_counter() - start) / len(pixels)
        print(f"the model alone: {model_ms:.1f} ms/image ({np.mean([len(x) for x in labels]):.1f} labels per image)")
        for kind, subset in (("baseline", paths[0::2]), ("progressive", paths[1::2])):
            times = {}
            for name, recognizer in recognizers.items():
                start = time.perf_counter()
                for path in subset:
                    recognizer.preprocess(path)
                times[name] = 1000 * (time.perf_counter() - start) / max(1, len(subset))
            print(
                f"reading one {kind} JPEG (decode, orient, resize): plain {times['plain']:.0f} ms, "
                f"draft {times['draft']:.0f} ms ({times['plain'] / times['draft']:.1f}x)"
            )
        print(f"{'workers':>7} {'decoding':>8} {'images/s':>9} {'decode share':>12} {'ms/image':>9}")
        for workers in args.workers:
            rates = {}
            for name, recognizer in recognizers.items():
                seconds, waited = label_folder(recognizer, paths, workers, args.batch_size)
                rates[name] = len(paths) / seconds
                print(
                    f"{workers:>7} {name:>8} {rates[name]:>9.2f} {waited / seconds:>12.0%} "
                    f"{1000 * seconds / len(paths):>9.1f}"
                )
            print(f"{workers:>7} {'ratio':>8} {rates['draft'] / rates['plain']:>9.2f}x draft/plain")


if __name__ == "__main__":
    main()
