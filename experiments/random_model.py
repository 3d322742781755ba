"""A model folder with random weights (and, optionally, a folder of test photos) for speed checks without downloads.

    python experiments/random_model.py --config paper --out /tmp/paper [--dtype bfloat16] [--images DIR --count 64]

``--config`` is one of ``experiments/bench_train.py``'s (tiny, medium, paper: the 1.78B model's architecture);
the folder is what ``nxtp export --format safetensors`` writes, so ``nxtp label --checkpoint /tmp/paper`` reads it.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from bench_train import build
from PIL import Image, ImageDraw


def photos(out: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> None:
    """``count`` JPEGs of coloured shapes on a gradient, about the size of a web photo."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 5)):
            x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randint(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(out / f"{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", choices=["tiny", "medium", "paper"])
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved weights (a float32 model is 7 GB at paper scale)",
    )
    parser.add_argument("--images", help="also write test photos here")
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _, _ = build(args.config, torch.device("cpu"))
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    print(f"{args.config}: {sum(p.numel() for p in model.parameters()):,} parameters -> {args.out}")
    if args.images:
        photos(Path(args.images), args.count)
        print(f"{args.count} photos -> {args.images}")


if __name__ == "__main__":
    main()
