"""Procedurally drawn scenes with captions: the project's built-in dataset.

Every image shows 1-5 simple objects (shapes and pictograms drawn with Pillow)
on a varied background, with a natural caption that names each object kind and
no other noun, so that :func:`datamodules.labels.extract_labels` recovers exactly
the kinds in the picture. Samples are written as WebDataset shards::

    OUT/{train,val,test}/shard-%06d.tar   KEY.jpg, KEY.txt, KEY.json
    OUT/manifest.json, OUT/tokenizer/, OUT/done

Each sample comes from its own ``random.Random`` seeded by (seed, split, index),
so the output is byte-identical for a given seed whatever the number of workers.

Usage::

    python -m datamodules.synthetic --out data/shapes --train 40000 --val 1000 --test 1000
    python -m datamodules.synthetic --preview preview.png
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from datamodules.labels import extract_labels

__all__ = [
    "COLORS",
    "KINDS",
    "SPLITS",
    "build_dataset",
    "draw_scene",
    "iter_split_metadata",
    "plural",
    "render_preview",
    "sample_seed",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Drawing happens at this multiple of the output size, then LANCZOS downsampling
# gives clean anti-aliased edges at 64 px.
_SUPERSAMPLE = 2
_JPEG_QUALITY = 90
# Fixed tar member times keep shards byte-identical between builds.
_TAR_MTIME = 0

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------- shapes


class _Pen:
    """Draws in unit-square coordinates onto a shape mask and a detail mask."""

    def __init__(self, size: int) -> None:
        self.s = size
        self.shape = Image.new("L", (size, size), 0)
        self.detail = Image.new("L", (size, size), 0)
        self._draw = {"shape": ImageDraw.Draw(self.shape), "detail": ImageDraw.Draw(self.detail)}

    def _pt(self, x: float, y: float) -> tuple[float, float]:
        return (x * self.s, y * self.s)

    def poly(self, pts: Sequence[tuple[float, float]], layer: str = "shape", fill: int = 255) -> None:
        self._draw[layer].polygon([self._pt(x, y) for x, y in pts], fill=fill)

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float | None = None, layer: str = "shape", fill: int = 255
    ) -> None:
        ry = rx if ry is None else ry
        self._draw[layer].ellipse([self._pt(cx - rx, cy - ry), self._pt(cx + rx, cy + ry)], fill=fill)

    def rect(
        self, x0: float, y0: float, x1: float, y1: float, layer: str = "shape", fill: int = 255, radius: float = 0.0
    ) -> None:
        box = [self._pt(x0, y0), self._pt(x1, y1)]
        if radius > 0:
            self._draw[layer].rounded_rectangle(box, radius=radius * self.s, fill=fill)
        else:
            self._draw[layer].rectangle(box, fill=fill)

    def line(self, pts: Sequence[tuple[float, float]], width: float, layer: str = "shape", fill: int = 255) -> None:
        self._draw[layer].line([self._pt(x, y) for x, y in pts], fill=fill, width=max(1, round(width * self.s)))

    def arc(
        self, box: tuple[float, float, float, float], start: float, end: float, width: float, layer: str = "shape"
    ) -> None:
        x0, y0, x1, y1 = box
        self._draw[layer].arc(
            [self._pt(x0, y0), self._pt(x1, y1)], start, end, fill=255, width=max(1, round(width * self.s))
        )

    def pieslice(self, box: tuple[float, float, float, float], start: float, end: float, layer: str = "shape") -> None:
        x0, y0, x1, y1 = box
        self._draw[layer].pieslice([self._pt(x0, y0), self._pt(x1, y1)], start, end, fill=255)


def _star_points(cx: float, cy: float, r_out: float, r_in: float, n: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _circle(p: _Pen) -> None:
    p.ellipse(0.5, 0.5, 0.46)


def _square(p: _Pen) -> None:
    p.rect(0.08, 0.08, 0.92, 0.92)


def _triangle(p: _Pen) -> None:
    p.poly([(0.5, 0.06), (0.96, 0.9), (0.04, 0.9)])


def _star(p: _Pen) -> None:
    p.poly(_star_points(0.5, 0.54, 0.5, 0.2))


def _heart(p: _Pen) -> None:
    p.ellipse(0.29, 0.33, 0.23)
    p.ellipse(0.71, 0.33, 0.23)
    p.poly([(0.07, 0.4), (0.93, 0.4), (0.5, 0.94)])


def _house(p: _Pen) -> None:
    p.rect(0.17, 0.45, 0.83, 0.94)
    p.poly([(0.03, 0.5), (0.5, 0.06), (0.97, 0.5)])
    p.rect(0.42, 0.66, 0.58, 0.94, layer="detail")
    p.rect(0.24, 0.56, 0.36, 0.68, fill=0)


def _tree(p: _Pen) -> None:
    p.rect(0.42, 0.78, 0.58, 0.98, layer="detail")
    p.poly([(0.5, 0.02), (0.76, 0.32), (0.24, 0.32)])
    p.poly([(0.5, 0.18), (0.85, 0.56), (0.15, 0.56)])
    p.poly([(0.5, 0.36), (0.94, 0.82), (0.06, 0.82)])


def _sun(p: _Pen) -> None:
    p.ellipse(0.5, 0.5, 0.25)
    for i in range(8):
        a = i * math.pi / 4
        p.line([(0.5 + 0.32 * math.cos(a), 0.5 + 0.32 * math.sin(a)), (0.5 + 0.48 * math.cos(a), 0.5 + 0.48 * math.sin(a))], 0.11)


def _moon(p: _Pen) -> None:
    p.ellipse(0.5, 0.5, 0.44)
    p.ellipse(0.7, 0.38, 0.37, fill=0)


def _boat(p: _Pen) -> None:
    p.poly([(0.03, 0.64), (0.97, 0.64), (0.8, 0.9), (0.2, 0.9)])
    p.rect(0.47, 0.06, 0.53, 0.66)
    p.poly([(0.56, 0.08), (0.56, 0.6), (0.9, 0.6)])
    p.poly([(0.44, 0.2), (0.44, 0.6), (0.18, 0.6)])


def _fish(p: _Pen) -> None:
    p.ellipse(0.42, 0.5, 0.36, 0.24)
    p.poly([(0.68, 0.5), (0.98, 0.24), (0.98, 0.76)])
    p.ellipse(0.24, 0.44, 0.05, fill=0)


def _flower(p: _Pen) -> None:
    p.line([(0.5, 0.45), (0.5, 0.98)], 0.07)
    p.ellipse(0.68, 0.76, 0.14, 0.07)
    for i in range(6):
        a = i * math.pi / 3
        p.ellipse(0.5 + 0.2 * math.cos(a), 0.34 + 0.2 * math.sin(a), 0.14)
    p.ellipse(0.5, 0.34, 0.11, layer="detail")


def _umbrella(p: _Pen) -> None:
    p.pieslice((0.03, 0.08, 0.97, 0.92), 180, 360)
    for x in (0.2, 0.5, 0.8):
        p.ellipse(x, 0.52, 0.08, 0.06, fill=0)
    p.rect(0.47, 0.45, 0.53, 0.84)
    p.arc((0.3, 0.72, 0.53, 0.96), 0, 180, 0.06)


def _arrow(p: _Pen) -> None:
    p.rect(0.04, 0.4, 0.6, 0.6)
    p.poly([(0.52, 0.14), (0.98, 0.5), (0.52, 0.86)])


def _cloud(p: _Pen) -> None:
    p.ellipse(0.28, 0.56, 0.2)
    p.ellipse(0.5, 0.42, 0.26)
    p.ellipse(0.73, 0.54, 0.2)
    p.rect(0.06, 0.5, 0.94, 0.76, radius=0.12)


def _car(p: _Pen) -> None:
    p.rect(0.03, 0.44, 0.97, 0.76, radius=0.07)
    p.poly([(0.22, 0.46), (0.34, 0.18), (0.7, 0.18), (0.82, 0.46)])
    p.poly([(0.33, 0.42), (0.4, 0.25), (0.5, 0.25), (0.5, 0.42)], fill=0)
    p.poly([(0.55, 0.42), (0.55, 0.25), (0.66, 0.25), (0.73, 0.42)], fill=0)
    p.ellipse(0.26, 0.76, 0.13, layer="detail")
    p.ellipse(0.74, 0.76, 0.13, layer="detail")


def _cup(p: _Pen) -> None:
    p.poly([(0.1, 0.18), (0.72, 0.18), (0.64, 0.92), (0.18, 0.92)])
    p.arc((0.52, 0.3, 0.96, 0.74), 270, 90, 0.08)
    p.rect(0.1, 0.18, 0.72, 0.26, layer="detail")


def _hammer(p: _Pen) -> None:
    p.rect(0.44, 0.22, 0.56, 0.98, radius=0.03)
    p.rect(0.12, 0.06, 0.74, 0.3, radius=0.03)
    p.poly([(0.74, 0.06), (0.96, 0.0), (0.9, 0.14), (0.74, 0.2)])
    p.rect(0.44, 0.72, 0.56, 0.98, layer="detail")


def _bell(p: _Pen) -> None:
    p.ellipse(0.5, 0.32, 0.23)
    p.poly([(0.27, 0.32), (0.73, 0.32), (0.86, 0.78), (0.14, 0.78)])
    p.rect(0.06, 0.74, 0.94, 0.84, radius=0.04)
    p.ellipse(0.5, 0.08, 0.06)
    p.ellipse(0.5, 0.89, 0.09, layer="detail")


def _kite(p: _Pen) -> None:
    p.poly([(0.5, 0.02), (0.82, 0.33), (0.5, 0.72), (0.18, 0.33)])
    p.line([(0.5, 0.02), (0.5, 0.72)], 0.035, layer="detail")
    p.line([(0.18, 0.33), (0.82, 0.33)], 0.035, layer="detail")
    p.line([(0.5, 0.72), (0.42, 0.8), (0.56, 0.88), (0.46, 0.98)], 0.04)
    p.poly([(0.38, 0.76), (0.48, 0.8), (0.38, 0.84)])
    p.poly([(0.6, 0.84), (0.5, 0.88), (0.6, 0.92)])


def _ladder(p: _Pen) -> None:
    p.rect(0.18, 0.02, 0.3, 0.98)
    p.rect(0.7, 0.02, 0.82, 0.98)
    for y in (0.12, 0.33, 0.54, 0.75):
        p.rect(0.3, y, 0.7, y + 0.08)


def _mushroom(p: _Pen) -> None:
    p.pieslice((0.02, 0.08, 0.98, 0.9), 180, 360)
    p.rect(0.36, 0.46, 0.64, 0.94, radius=0.06)
    for cx, cy, r in ((0.3, 0.34, 0.07), (0.56, 0.22, 0.08), (0.74, 0.38, 0.06)):
        p.ellipse(cx, cy, r, layer="detail")


def _crown(p: _Pen) -> None:
    p.poly([(0.06, 0.86), (0.06, 0.24), (0.3, 0.54), (0.5, 0.12), (0.7, 0.54), (0.94, 0.24), (0.94, 0.86)])
    for cx, cy in ((0.06, 0.22), (0.5, 0.1), (0.94, 0.22)):
        p.ellipse(cx, cy, 0.06)
    p.rect(0.06, 0.7, 0.94, 0.78, layer="detail")


def _bottle(p: _Pen) -> None:
    p.rect(0.26, 0.4, 0.74, 0.97, radius=0.08)
    p.poly([(0.26, 0.46), (0.4, 0.24), (0.6, 0.24), (0.74, 0.46)])
    p.rect(0.4, 0.03, 0.6, 0.3)
    p.rect(0.26, 0.58, 0.74, 0.78, layer="detail")


def _lamp(p: _Pen) -> None:
    p.poly([(0.3, 0.04), (0.7, 0.04), (0.92, 0.44), (0.08, 0.44)])
    p.rect(0.45, 0.44, 0.55, 0.86)
    p.rect(0.22, 0.84, 0.78, 0.96, radius=0.04)


def _clock(p: _Pen) -> None:
    p.ellipse(0.5, 0.5, 0.47)
    p.ellipse(0.5, 0.5, 0.36, fill=0)
    p.line([(0.5, 0.5), (0.5, 0.2)], 0.07)
    p.line([(0.5, 0.5), (0.74, 0.58)], 0.07)
    p.ellipse(0.5, 0.5, 0.06)


def _flag(p: _Pen) -> None:
    p.rect(0.08, 0.03, 0.16, 0.98)
    p.poly([(0.16, 0.06), (0.94, 0.06), (0.78, 0.28), (0.94, 0.5), (0.16, 0.5)])


def _anchor(p: _Pen) -> None:
    p.ellipse(0.5, 0.12, 0.1)
    p.ellipse(0.5, 0.12, 0.045, fill=0)
    p.rect(0.45, 0.2, 0.55, 0.9)
    p.rect(0.24, 0.28, 0.76, 0.36)
    p.arc((0.1, 0.4, 0.9, 0.94), 15, 165, 0.09)
    p.poly([(0.02, 0.58), (0.22, 0.58), (0.12, 0.74)])
    p.poly([(0.78, 0.58), (0.98, 0.58), (0.88, 0.74)])


def _candle(p: _Pen) -> None:
    p.rect(0.34, 0.36, 0.66, 0.97)
    p.poly([(0.5, 0.02), (0.6, 0.2), (0.5, 0.3), (0.4, 0.2)], layer="detail")


def _apple(p: _Pen) -> None:
    p.ellipse(0.37, 0.58, 0.3, 0.34)
    p.ellipse(0.63, 0.58, 0.3, 0.34)
    p.ellipse(0.5, 0.24, 0.07, fill=0)
    p.line([(0.5, 0.3), (0.55, 0.06)], 0.06, layer="detail")
    p.ellipse(0.66, 0.12, 0.1, 0.05, layer="detail")


@dataclass(frozen=True)
class _Kind:
    draw: Callable[[_Pen], None]
    # Colour of the detail layer: None = a darker shade of the object colour.
    detail: RGB | None = None
    # How the pictogram may be varied without changing what it looks like.
    flip: bool = False
    max_turn: float = 12.0
    quarter_turns: bool = False


_FLAME: RGB = (255, 186, 40)
_LEAF: RGB = (60, 150, 50)

_KINDS: dict[str, _Kind] = {
    "circle": _Kind(_circle, max_turn=0.0),
    "square": _Kind(_square, max_turn=8.0),
    "triangle": _Kind(_triangle),
    "star": _Kind(_star),
    "heart": _Kind(_heart),
    "house": _Kind(_house, flip=True),
    "tree": _Kind(_tree, max_turn=6.0),
    "sun": _Kind(_sun),
    "moon": _Kind(_moon, flip=True, max_turn=25.0),
    "boat": _Kind(_boat, flip=True),
    "fish": _Kind(_fish, flip=True),
    "flower": _Kind(_flower, flip=True),
    "umbrella": _Kind(_umbrella, flip=True),
    "arrow": _Kind(_arrow, flip=True, quarter_turns=True),
    "cloud": _Kind(_cloud, flip=True, max_turn=6.0),
    "car": _Kind(_car, flip=True, max_turn=6.0),
    "cup": _Kind(_cup, flip=True),
    "hammer": _Kind(_hammer, flip=True, max_turn=20.0),
    "bell": _Kind(_bell),
    "kite": _Kind(_kite, flip=True),
    "ladder": _Kind(_ladder),
    "mushroom": _Kind(_mushroom, flip=True),
    "crown": _Kind(_crown),
    "bottle": _Kind(_bottle),
    "lamp": _Kind(_lamp),
    "clock": _Kind(_clock, flip=True, max_turn=0.0),
    "flag": _Kind(_flag, flip=True),
    "anchor": _Kind(_anchor),
    "candle": _Kind(_candle, detail=_FLAME),
    "apple": _Kind(_apple, detail=_LEAF, flip=True),
}

KINDS: tuple[str, ...] = tuple(_KINDS)

_IRREGULAR_PLURALS = {"fish": "fishes"}  # "two fish" is often tagged as an adjective


def plural(kind: str) -> str:
    """English plural of a kind name (the form used in captions)."""
    return _IRREGULAR_PLURALS.get(kind, kind + "s")


# --------------------------------------------------------------------------- colours

COLORS: dict[str, RGB] = {
    "red": (214, 39, 40),
    "orange": (245, 130, 20),
    "yellow": (240, 200, 30),
    "green": (44, 160, 44),
    "blue": (31, 100, 220),
    "purple": (140, 70, 190),
    "pink": (240, 120, 170),
    "brown": (140, 86, 45),
    "white": (245, 245, 240),
    "black": (25, 25, 30),
    "gray": (128, 128, 128),
}

# The POS tagger often reads colour words as nouns ("a pink star" -> pink/NN),
# which would leak them into the extracted labels. "<colour>-colored" is always
# tagged as an adjective, so it is used for the colours (and before the kinds)
# where the bare word is unreliable; elsewhere both forms appear.
_BARE_COLORS = frozenset({"red", "yellow", "green", "blue", "white", "black", "gray"})
_HYPHEN_KINDS = frozenset({"star", "apple", "mushroom"})


def _luma(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _shade(c: RGB, f: float) -> RGB:
    if _luma(c) < 50:  # darkening black would hide the edge, so lighten instead
        return (95, 95, 100)
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _jitter(c: RGB, rng: random.Random, amount: int = 14) -> RGB:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


# --------------------------------------------------------------------------- backgrounds


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


@lru_cache(maxsize=16)
def _ramp(size: int, quarter_turns: int) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size)).rotate(90 * quarter_turns)


def _background(rng: random.Random, size: int) -> tuple[Image.Image, float]:
    """A plain, gradient, noisy or striped background and its mean luma."""
    dark = rng.random() < 0.3
    hue = rng.random()

    def tone() -> RGB:
        h = (hue + rng.uniform(-0.08, 0.08)) % 1.0
        if dark:
            return _hsv(h, rng.uniform(0.1, 0.45), rng.uniform(0.12, 0.3))
        return _hsv(h, rng.uniform(0.04, 0.3), rng.uniform(0.8, 0.97))

    base = tone()
    style = rng.choice(("solid", "gradient", "noise", "stripes"))
    img = Image.new("RGB", (size, size), base)
    if style == "gradient":
        ramp = _ramp(size, rng.randrange(4))
        img = Image.composite(Image.new("RGB", (size, size), tone()), img, ramp)
    elif style == "noise":
        # Drawn from rng (not Image.effect_noise, whose C generator is unseeded).
        amp = rng.uniform(0.06, 0.12)
        half = max(1, size // 2)
        noise = Image.frombytes("L", (half, half), rng.randbytes(half * half)).resize((size, size))
        noise = noise.point([round(128 + (v - 128) * amp) for v in range(256)])
        img = ImageChops.add(img, Image.merge("RGB", (noise, noise, noise)), scale=1.0, offset=-128)
    elif style == "stripes":
        other = _jitter(base, rng, 18)
        width = rng.randint(size // 16, size // 6)
        draw = ImageDraw.Draw(img)
        vertical = rng.random() < 0.5
        for start in range(rng.randrange(width), size, 2 * width):
            box = (start, 0, start + width - 1, size) if vertical else (0, start, size, start + width - 1)
            draw.rectangle(box, fill=other)
    return img, _luma(img.reduce(size).getpixel((0, 0)))


# --------------------------------------------------------------------------- layout


@dataclass
class _Object:
    kind: str
    color: str
    rgb: RGB
    size: str
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # supersampled canvas pixels


@dataclass
class _Group:
    kind: str
    color: str
    size: str
    members: list[_Object] = field(default_factory=list)


_SIZE_RANGES = {"small": (0.22, 0.29), "medium": (0.3, 0.39), "large": (0.42, 0.54)}
# An object may be covered by another on at most this share of its bounding box.
_MAX_OVERLAP = 0.2


def _render(kind: str, px: int, rng: random.Random) -> tuple[Image.Image, Image.Image | None]:
    """Shape and (if any) detail mask of one object, transformed and cropped tight."""
    spec = _KINDS[kind]
    pen = _Pen(px)
    spec.draw(pen)
    layers = [pen.shape] + ([pen.detail] if pen.detail.getbbox() else [])
    if spec.flip and rng.random() < 0.5:
        layers = [m.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for m in layers]
    angle = rng.uniform(-spec.max_turn, spec.max_turn) if spec.max_turn else 0.0
    if spec.quarter_turns:
        angle += 90 * rng.randrange(4)
    if angle:
        layers = [m.rotate(angle, Image.Resampling.BILINEAR, expand=True) for m in layers]
    union = layers[0] if len(layers) == 1 else ImageChops.lighter(*layers)
    box = union.getbbox() or (0, 0, 1, 1)
    layers = [m.crop(box) for m in layers]
    return layers[0], (layers[1] if len(layers) > 1 else None)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(1, smaller)


def _plan_groups(rng: random.Random, bg_luma: float) -> list[_Group]:
    n_objects = rng.choices((1, 2, 3, 4, 5), weights=(22, 24, 22, 17, 15))[0]
    colours = [c for c, v in COLORS.items() if abs(_luma(v) - bg_luma) > 45] or list(COLORS)
    groups: list[_Group] = []
    left = n_objects
    while left:
        count = min(left, rng.choices((1, 2, 3, 4, 5), weights=(60, 25, 9, 4, 2))[0])
        reuse = [g.kind for g in groups] if groups and rng.random() < 0.12 else []
        if reuse:
            kind = rng.choice(reuse)
            used = {g.color for g in groups if g.kind == kind}
            colour = rng.choice([c for c in colours if c not in used] or colours)
        else:
            kind = rng.choice([k for k in KINDS if k not in {g.kind for g in groups}])
            colour = rng.choice(colours)
        size_weights = (35, 45, 20) if n_objects <= 2 else (45, 55, 0)
        size = rng.choices(("small", "medium", "large"), weights=size_weights)[0]
        groups.append(_Group(kind, colour, size))
        groups[-1].members = [_Object(kind, colour, _jitter(COLORS[colour], rng), size) for _ in range(count)]
        left -= count
    return groups


def _paste(
    canvas: Image.Image, obj: _Object, shape: Image.Image, detail: Image.Image | None, xy: tuple[int, int]
) -> None:
    spec = _KINDS[obj.kind]
    outline = _shade(obj.rgb, 0.45)
    # Outline first, then the eroded fill on top: a thin dark rim keeps the
    # silhouette readable on any background and where objects overlap.
    canvas.paste(outline, xy, shape if detail is None else ImageChops.lighter(shape, detail))
    canvas.paste(obj.rgb, xy, shape.filter(ImageFilter.MinFilter(2 * _SUPERSAMPLE + 1)))
    if detail is not None:
        canvas.paste(spec.detail or _shade(obj.rgb, 0.6), xy, detail)


def _layout(canvas: Image.Image, groups: list[_Group], rng: random.Random) -> None:
    """Place and draw every object; objects that find no room are dropped."""
    size = canvas.width
    margin = size // 32
    placed: list[tuple[int, int, int, int]] = []
    for group in groups:
        kept = []
        for obj in group.members:
            lo, hi = _SIZE_RANGES[obj.size]
            scale = rng.uniform(lo, hi)
            box = None
            for _ in range(4):  # a crowded scene gets smaller objects
                shape, detail = _render(obj.kind, max(8, round(scale * size)), rng)
                w, h = shape.size
                for _ in range(12):
                    x = rng.randint(margin, max(margin, size - margin - w))
                    y = rng.randint(margin, max(margin, size - margin - h))
                    cand = (x, y, x + w, y + h)
                    if all(_overlap(cand, other) <= _MAX_OVERLAP for other in placed):
                        box = cand
                        break
                if box is not None:
                    break
                scale *= 0.85
            if box is None:
                continue
            placed.append(box)
            obj.bbox = box
            _paste(canvas, obj, shape, detail, box[:2])
            kept.append(obj)
        group.members = kept
    groups[:] = [g for g in groups if g.members]


# --------------------------------------------------------------------------- captions

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
# No "little": "a little" is read as an adverb phrase.
_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("big", "large")}
_NEXT_TO = ("near",)
_ABOVE = ("above",)
_BELOW = ("below", "under")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(group: _Group, rng: random.Random, need_colour: bool) -> str:
    n = len(group.members)
    words = []
    if group.size in _SIZE_WORDS and rng.random() < 0.5:
        words.append(rng.choice(_SIZE_WORDS[group.size]))
    if need_colour or rng.random() < 0.75:
        bare = (
            group.color in _BARE_COLORS
            and group.kind not in _HYPHEN_KINDS
            and n < 3  # "three blue ..." reads as a number of blues
            and rng.random() < 0.8
        )
        words.append(group.color if bare else f"{group.color}-colored")
    words.append(group.kind if n == 1 else plural(group.kind))
    if n == 1:
        head = _article(words[0])
    else:
        head = _NUMBERS[n]
    return " ".join([head, *words])


def _relation(a: _Group, b: _Group, size: int, rng: random.Random) -> str:
    """A spatial word for group ``a`` relative to ``b`` that is true in the image."""

    def centre(g: _Group) -> tuple[float, float]:
        xs = [(o.bbox[0] + o.bbox[2]) / 2 for o in g.members]
        ys = [(o.bbox[1] + o.bbox[3]) / 2 for o in g.members]
        return sum(xs) / len(xs), sum(ys) / len(ys)

    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = bx - ax, by - ay
    if abs(dy) > 0.25 * size and abs(dy) > 1.5 * abs(dx):
        return rng.choice(_ABOVE if dy > 0 else _BELOW)
    return rng.choice(_NEXT_TO)


def _clause(groups: list[_Group], phrases: list[str], size: int, rng: random.Random) -> str:
    """One or two groups as a short clause, e.g. "a red star above two circles"."""
    if len(groups) == 1:
        return phrases[0]
    form = rng.random()
    if form < 0.5:
        return f"{phrases[0]} {_relation(groups[0], groups[1], size, rng)} {phrases[1]}"
    if form < 0.7:
        return f"{phrases[0]} with {phrases[1]}"
    return f"{phrases[0]} and {phrases[1]}"


def _sentence(text: str, verb: str | None, rng: random.Random) -> str:
    """Capitalize and close a clause; ``verb`` allows an opener like "there is"."""
    if verb is not None and rng.random() < 0.3:
        text = rng.choice((f"there {verb} ", "we can see ", "here we see ", "only ")) + text
    return text[0].upper() + text[1:] + "."


def _compose(groups: list[_Group], size: int, rng: random.Random) -> str:
    """A caption naming every group, built from clauses of at most two groups.

    Lists are never joined with commas: the label extractor replaces commas with
    spaces, and the run-together words then fool the POS tagger.
    """
    repeated = {g.kind for g in groups if sum(h.kind == g.kind for h in groups) > 1}
    phrases = [_phrase(g, rng, g.kind in repeated) for g in groups]
    clauses = []
    i = 0
    while i < len(groups):
        step = 2 if len(groups) - i >= 2 and rng.random() < 0.8 else 1
        clauses.append((_clause(groups[i : i + step], phrases[i : i + step], size, rng), groups[i]))
        i += step
    sentences = []
    while clauses:
        (text, first), clauses = clauses[0], clauses[1:]
        if clauses and " and " not in text and rng.random() < 0.5:
            text += f" and {clauses[0][0]}"
            clauses = clauses[1:]
        verb = None if sentences else ("is" if len(first.members) == 1 else "are")
        sentences.append(_sentence(text, verb, rng))
    caption = " ".join(sentences)
    # Lower-case starts are common in real captions; keep some of them.
    return caption if rng.random() < 0.7 else caption[0].lower() + caption[1:]


def _plain_caption(groups: list[_Group]) -> str:
    """Fallback wording with only counts and kind names, one sentence per kind."""
    parts = []
    for g in groups:
        n = len(g.members)
        parts.append(f"{_article(g.kind).capitalize()} {g.kind}." if n == 1 else f"{_NUMBERS[n].capitalize()} {plural(g.kind)}.")
    return " ".join(parts)


def _labels_match(caption: str, kinds: set[str]) -> bool:
    labels = extract_labels(caption)
    return len(labels) == len(kinds) and set(labels) == kinds


def _caption(groups: list[_Group], size: int, rng: random.Random) -> str:
    kinds = {g.kind for g in groups}
    # The vocabulary is chosen so that the first draw nearly always passes;
    # checking with the real tagger makes the guarantee unconditional.
    for _ in range(8):
        text = _compose(groups, size, rng)
        if _labels_match(text, kinds):
            return text
    text = _plain_caption(groups)
    if not _labels_match(text, kinds):
        raise RuntimeError(f"no caption whose labels match {sorted(kinds)}: {text!r}")
    return text


# --------------------------------------------------------------------------- scenes


def draw_scene(rng: random.Random, image_size: int = 64) -> tuple[Image.Image, str, list[dict[str, Any]]]:
    """Draw one random scene.

    Returns the RGB image, its caption and the objects as dicts with ``kind``,
    ``color`` and ``bbox`` (``[x0, y0, x1, y1]`` in image pixels), in drawing order.
    """
    canvas_size = image_size * _SUPERSAMPLE
    canvas, bg_luma = _background(rng, canvas_size)
    groups = _plan_groups(rng, bg_luma)
    _layout(canvas, groups, rng)
    caption = _caption(groups, canvas_size, rng)
    image = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS) if _SUPERSAMPLE > 1 else canvas
    out = []
    for o in (o for g in groups for o in g.members):
        x0, y0, x1, y1 = o.bbox
        box = [x0 // _SUPERSAMPLE, y0 // _SUPERSAMPLE, -(-x1 // _SUPERSAMPLE), -(-y1 // _SUPERSAMPLE)]
        out.append({"kind": o.kind, "color": o.color, "bbox": box})
    return image, caption, out


def render_preview(path: str | Path, seed: int = 0, image_size: int = 64, n: int = 16, zoom: int = 3) -> Path:
    """Write a grid of ``n`` scenes with their captions to a PNG file for a quick look."""
    cols = 4
    rows = math.ceil(n / cols)
    cell = image_size * zoom
    text_h = 64
    grid = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()  # bundled with Pillow, nothing to download
    for i in range(n):
        image, caption, _ = draw_scene(random.Random(sample_seed(seed, "preview", i)), image_size)
        x = 8 + (i % cols) * (cell + 8)
        y = 8 + (i // cols) * (cell + text_h + 8)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=max(10, cell // 6))[:4]
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --------------------------------------------------------------------------- shards


def sample_seed(seed: int, split: str, index: int) -> int:
    """Seed of one sample, derived from (seed, split, index) with a stable hash."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _encode_sample(seed: int, split: str, index: int, image_size: int) -> tuple[dict[str, Any], list[str], str]:
    image, caption, objects = draw_scene(random.Random(sample_seed(seed, split, index)), image_size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    labels = sorted({o["kind"] for o in objects})
    meta = {"labels": labels, "objects": objects, "caption": caption}
    sample = {
        "__key__": f"{split}-{index:08d}",
        "jpg": buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    return sample, labels, caption


@dataclass(frozen=True)
class _ShardJob:
    root: str
    split: str
    shard: int
    start: int
    stop: int
    seed: int
    image_size: int


def _write_shard(job: _ShardJob) -> tuple[str, list[tuple[str, list[str]]]]:
    """Write one shard; returns its relative path and (caption, labels) per sample."""
    from webdataset import TarWriter  # heavy import, only needed when writing

    rel = f"{job.split}/shard-{job.shard:06d}.tar"
    texts = []
    with open(Path(job.root) / rel, "wb") as f, TarWriter(f, encoder=False, mtime=_TAR_MTIME) as writer:
        for index in range(job.start, job.stop):
            sample, labels, caption = _encode_sample(job.seed, job.split, index, job.image_size)
            writer.write(sample)
            texts.append((caption, labels))
    return rel, texts


def _pool(workers: int) -> Any:
    # fork shares the already imported modules (and NLTK data) with the workers;
    # fall back to the platform default where fork does not exist.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else None).Pool(workers)


def _is_dataset_dir(path: Path) -> bool:
    """True for a folder this module may replace: an earlier build or an empty folder."""
    return path.is_dir() and ((path / "manifest.json").exists() or not any(path.iterdir()))


def build_dataset(
    out: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 2000,
    workers: int = 2,
    tokenizer_vocab_size: int | None = 512,
) -> Path:
    """Generate the train/val/test shards, manifest and (optionally) the tokenizer.

    Everything is written to a temporary sibling folder that is renamed to ``out``
    only when complete (``out/done`` is its last file), so an interrupted build is
    never mistaken for a finished one. If ``out`` already holds a finished build
    with the same settings it is kept as is. ``tokenizer_vocab_size=None`` skips
    training the caption tokenizer.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    settings = {
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "kinds": list(KINDS),
        "tokenizer_vocab_size": tokenizer_vocab_size,
    }
    if (out / "done").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if {k: manifest.get(k) for k in settings} == settings:
            return out
    if out.exists() and not _is_dataset_dir(out):
        raise FileExistsError(f"{out} exists and does not look like a generated dataset")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
        for shard, start in enumerate(range(0, counts[split], samples_per_shard)):
            stop = min(start + samples_per_shard, counts[split])
            jobs.append(_ShardJob(str(tmp), split, shard, start, stop, seed, image_size))

    try:
        if workers > 1 and len(jobs) > 1:
            extract_labels("a circle.")  # load the NLTK data once, before the workers fork
            with _pool(workers) as pool:
                results = pool.map(_write_shard, jobs, chunksize=1)
        else:
            results = [_write_shard(job) for job in jobs]

        shards: dict[str, list[str]] = {s: [rel for job, (rel, _) in zip(jobs, results) if job.split == s] for s in SPLITS}
        manifest = {**settings, "splits": {s: {"count": counts[s], "shards": shards[s]} for s in SPLITS}}
        if tokenizer_vocab_size is not None:
            from datamodules.tokenizer import PROMPT, train_caption_tokenizer

            # Captions plus the exact label sequences the model is trained on.
            train = [item for job, (_, items) in zip(jobs, results) if job.split == "train" for item in items]
            texts = [c for c, _ in train] + [f"{PROMPT} {', '.join(labels)}," for _, labels in train]
            train_caption_tokenizer(texts, tmp / "tokenizer", vocab_size=tokenizer_vocab_size, required_words=KINDS)
            manifest["tokenizer"] = "tokenizer"
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "done").write_text("")
        # Swap folders by renaming so that `out` is never a half-written build.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def iter_split_metadata(root: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Yield the decoded ``.json`` record of every sample in a built split, in order."""
    import tarfile

    manifest = json.loads((Path(root) / "manifest.json").read_text())
    for rel in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(root) / rel) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield json.load(tar.extractfile(member))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: build the dataset and/or write a preview grid."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (e.g. data/shapes)")
    parser.add_argument("--train", type=int, default=40000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--vocab-size", type=int, default=512, help="caption tokenizer size")
    parser.add_argument("--preview", type=Path, help="write a grid of 16 scenes to this PNG")
    args = parser.parse_args(argv)
    if args.out is None and args.preview is None:
        parser.error("give --out and/or --preview")

    if args.preview is not None:
        print(f"preview: {render_preview(args.preview, seed=args.seed, image_size=args.image_size)}")
    if args.out is not None:
        t0 = time.perf_counter()
        out = build_dataset(
            args.out,
            args.train,
            args.val,
            args.test,
            seed=args.seed,
            image_size=args.image_size,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            tokenizer_vocab_size=args.vocab_size,
        )
        n = args.train + args.val + args.test
        print(f"dataset: {out} ({n} samples, {len(KINDS)} kinds) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
