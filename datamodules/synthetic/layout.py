"""Where the objects of a scene go: groups of one kind, colour and size, placed without much overlap."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageChops, ImageFilter

from .drawing import _KINDS, _SUPERSAMPLE, COLORS, KINDS, RGB, _jitter, _luma, _Pen, _shade


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


def _plan_groups(
    rng: random.Random, bg_luma: float, kinds: tuple[str, ...] = KINDS, featured: tuple[str, ...] = ()
) -> list[_Group]:
    """The groups of one scene, of object kinds drawn from ``kinds``; with ``featured`` (some of ``kinds``), the
    first group is of one of those, so that every scene shows at least one of them among the others."""
    n_objects = rng.choices((1, 2, 3, 4, 5), weights=(22, 24, 22, 17, 15))[0]
    colours = [c for c, v in COLORS.items() if abs(_luma(v) - bg_luma) > 45] or list(COLORS)
    groups: list[_Group] = []
    left = n_objects
    while left:
        count = min(left, rng.choices((1, 2, 3, 4, 5), weights=(60, 25, 9, 4, 2))[0])
        reuse = bool(groups) and rng.random() < 0.12
        fresh = [k for k in kinds if k not in {g.kind for g in groups}]
        # With few kinds to draw from (``--kinds``), a scene may have used them all: another group of one of them.
        # Never the case with every kind, so the default scenes are drawn exactly as before kinds could be chosen.
        if featured and not groups:
            kind = rng.choice(featured)
            colour = rng.choice(colours)
        elif reuse or not fresh:
            kind = rng.choice([g.kind for g in groups])
            used = {g.color for g in groups if g.kind == kind}
            colour = rng.choice([c for c in colours if c not in used] or colours)
        else:
            kind = rng.choice(fresh)
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
