"""One scene: a background, the objects laid out on it, and its caption; each from its own seeded random
number generator (``sample_seed``)."""

from __future__ import annotations

import hashlib
import math
import random
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .captions import _caption
from .drawing import _SUPERSAMPLE, KINDS, _background
from .layout import _layout, _plan_groups


def draw_scene(
    rng: random.Random, image_size: int = 64, kinds: tuple[str, ...] = KINDS, featured: tuple[str, ...] = ()
) -> tuple[Image.Image, str, list[dict[str, Any]]]:
    """Draw one random scene of objects of ``kinds`` (a selection of ``KINDS``, in its order: see ``select_kinds``),
    at least one of them of a ``featured`` kind where some are given.

    Returns the RGB image, its caption and the objects as dicts with ``kind``,
    ``color`` and ``bbox`` (``[x0, y0, x1, y1]`` in image pixels), in drawing order.
    """
    canvas_size = image_size * _SUPERSAMPLE
    canvas, bg_luma = _background(rng, canvas_size)
    groups = _plan_groups(rng, bg_luma, kinds, featured)
    _layout(canvas, groups, rng)
    caption = _caption(groups, canvas_size, rng)
    image = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS) if _SUPERSAMPLE > 1 else canvas
    out = []
    for o in (o for g in groups for o in g.members):
        x0, y0, x1, y1 = o.bbox
        box = [x0 // _SUPERSAMPLE, y0 // _SUPERSAMPLE, -(-x1 // _SUPERSAMPLE), -(-y1 // _SUPERSAMPLE)]
        out.append({"kind": o.kind, "color": o.color, "bbox": box})
    return image, caption, out


def render_preview(
    path: str | Path,
    seed: int = 0,
    image_size: int = 64,
    n: int = 16,
    zoom: int = 3,
    kinds: tuple[str, ...] = KINDS,
) -> Path:
    """Write a grid of ``n`` scenes (objects of ``kinds``) with their captions to a PNG file for a quick look."""
    cols = 4
    rows = math.ceil(n / cols)
    cell = image_size * zoom
    text_h = 64
    grid = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()  # bundled with Pillow, nothing to download
    for i in range(n):
        image, caption, _ = draw_scene(random.Random(sample_seed(seed, "preview", i)), image_size, kinds)
        x = 8 + (i % cols) * (cell + 8)
        y = 8 + (i // cols) * (cell + text_h + 8)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=max(10, cell // 6))[:4]
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def sample_seed(seed: int, split: str, index: int) -> int:
    """Seed of one sample, derived from (seed, split, index) with a stable hash."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
