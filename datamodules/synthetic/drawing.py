"""Drawing the scenes' parts with Pillow: a pen at a supersampled scale, one function per object kind (shapes
and pictograms, ``KINDS``), the colours and their names, and the backgrounds."""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageChops, ImageDraw

# Drawing happens at this multiple of the output size, then LANCZOS downsampling
# gives clean anti-aliased edges at 64 px.
_SUPERSAMPLE = 2
RGB = tuple[int, int, int]


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
        p.line(
            [
                (0.5 + 0.32 * math.cos(a), 0.5 + 0.32 * math.sin(a)),
                (0.5 + 0.48 * math.cos(a), 0.5 + 0.48 * math.sin(a)),
            ],
            0.11,
        )


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


def select_kinds(kinds: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> tuple[str, ...]:
    """The kinds a dataset draws: ``kinds`` (None: every one of ``KINDS``) without those in ``exclude``, in the order
    of ``KINDS`` (the order the scenes draw from, so that the same selection gives the same scenes however it is
    written).

    Raises:
        ValueError: a kind that is not one of ``KINDS`` (named, with the known ones), or nothing left to draw.
    """
    for option, given in (("kinds", kinds), ("exclude_kinds", exclude)):
        unknown = [k for k in dict.fromkeys(given or ()) if k not in _KINDS]
        if unknown:
            raise ValueError(f"{option}: unknown kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(KINDS)}")
    chosen = set(KINDS if kinds is None else kinds) - set(exclude or ())
    if not chosen:
        given = list(KINDS if kinds is None else kinds)
        raise ValueError(f"no kinds left to draw (kinds={given}, exclude_kinds={list(exclude or ())})")
    return tuple(k for k in KINDS if k in chosen)


def select_featured(kinds: Sequence[str], featured: Sequence[str] | None) -> tuple[str, ...]:
    """The ``featured`` kinds (every scene holds one of them), in the order of ``kinds``, the kinds drawn.

    Raises:
        ValueError: a featured kind that is not drawn (named, with the kinds drawn).
    """
    outside = [k for k in dict.fromkeys(featured or ()) if k not in kinds]
    if outside:
        raise ValueError(f"feature_kinds: {', '.join(map(repr, outside))} not drawn; drawn: {', '.join(kinds)}")
    return tuple(k for k in kinds if k in set(featured or ()))


_IRREGULAR_PLURALS = {"fish": "fishes"}  # "two fish" is often tagged as an adjective


def plural(kind: str) -> str:
    """English plural of a kind name (the form used in captions)."""
    return _IRREGULAR_PLURALS.get(kind, kind + "s")


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
