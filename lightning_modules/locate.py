"""Where each label is, as numbers a program can use: a point and a box in the pixels of the image the user gave.

A label's map (``attention_maps``: a distribution over the tower's patch grid, in the model's input view) becomes a
``Location``:

1. ``point``: the centre of mass of the map's peak cell and its neighbours (``radius`` cells around it), weighted
   by the map above its minimum. It falls between cell centres where an object straddles cells, which is why it
   points better than the peak cell's centre on a coarse grid (4x4 patches of 16 pixels on the default model).
2. ``box``: that centre of mass plus and minus ``spread`` standard deviations of the same weights along each axis
   (at least half a cell): the extent of where the label looks.
3. ``boxes``: one such box per region of the map (connected cells at least ``fraction`` of the way from the map's
   minimum to its peak), the peak's first, the others by their peak: a label that names several objects of one
   kind, "three stars", gets one box per object where its map separates them. ``box`` is ``boxes[0]``.
4. Both go back from the view to the original image (``ViewGeometry``: the preprocessing's resize and centre crop,
   or padding, or squash, undone), and a box is clipped to the part of the image the model saw: with the default
   ``shortest`` resize mode a wide photo's left and right margins are cropped away and no box reaches into them.

Coordinates are ``[x, y]`` and ``[x0, y0, x1, y1]`` (x1, y1 exclusive) in pixels of the upright image (after its
EXIF orientation), as ``datamodules.images.decode_image`` reads it. The rules and their defaults were chosen by
``experiments/eval_attention_maps.py --boxes`` on the validation scenes against their object boxes (the README's
"What and where" has the table, beside the rules they were measured against).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RADIUS = 1  # cells around the peak that the point and box are computed from (3x3)
SPREAD = 1.5  # a box is the centre of mass plus and minus this many standard deviations
FRACTION = 0.5  # a region of boxes: cells at least halfway from the map's minimum to its peak
VIEWS = (1, 4, 5)  # views of the image a map is the mean of (attention_maps.finer_maps): 4 and 5 give a finer grid


@dataclass(frozen=True)
class ViewGeometry:
    """How the model's input view relates to the original upright image: ``view = original * scale - offset``
    (per axis, in pixels); ``original`` and ``view`` are ``(width, height)``."""

    original: tuple[int, int]
    view: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    @classmethod
    def of(cls, original: tuple[int, int], view: tuple[int, int], resize_mode: str = "shortest") -> ViewGeometry:
        """The geometry of open_clip's eval transform for an image of ``original`` (width, height) and a tower
        input of ``view`` (width, height): ``shortest`` (short side resized, centre crop), ``longest`` (long side
        resized, centre pad) or ``squash``."""
        w, h = original
        out_w, out_h = view
        if resize_mode == "squash":
            return cls(original, view, (out_w / w, out_h / h), (0.0, 0.0))
        if resize_mode == "shortest" and out_w == out_h:
            # torchvision Resize(int): the short side to the size, the long side truncated with int()
            new_w, new_h = (out_w, int(out_w * h / w)) if w <= h else (int(out_h * w / h), out_h)
        elif resize_mode in ("shortest", "longest"):
            # open_clip ResizeKeepRatio: one ratio for both sides, rounded
            ratios = (h / out_h, w / out_w)
            ratio = max(ratios) if resize_mode == "longest" else min(ratios)
            new_w, new_h = round(w / ratio), round(h / ratio)
        else:
            raise ValueError(f"resize_mode {resize_mode!r}: shortest, longest or squash")
        # CenterCrop / CenterCropOrPad: pad (left = floor of half the shortfall), then crop at round(half the excess)
        dx, dy = (
            float(-((out - new) // 2) if out > new else round((new - out) / 2))
            for new, out in ((new_w, out_w), (new_h, out_h))
        )
        return cls(original, view, (new_w / w, new_h / h), (dx, dy))

    def to_view(self, box: Sequence[float]) -> list[float]:
        """A box ``[x0, y0, x1, y1]`` (or point ``[x, y]``) in original pixels, in the view's pixels, unclipped."""
        return [v * self.scale[i % 2] - self.offset[i % 2] for i, v in enumerate(box)]

    def to_original(self, box: Sequence[float]) -> list[float]:
        """A box or point in the view's pixels, in original pixels, clipped to the part of the image the view shows
        (a point too)."""
        lo = [max(0.0, self.offset[i] / self.scale[i]) for i in (0, 1)]
        hi = [min(float(self.original[i]), (self.view[i] + self.offset[i]) / self.scale[i]) for i in (0, 1)]
        return [
            float(min(max((v + self.offset[i % 2]) / self.scale[i % 2], lo[i % 2]), hi[i % 2]))
            for i, v in enumerate(box)
        ]

    def seen(self) -> list[float]:
        """The part of the original image that the view shows, as a box in original pixels."""
        return self.to_original([0, 0, *self.view])


@dataclass
class Location:
    """Where one label is: ``point`` ``[x, y]``, ``box`` ``[x0, y0, x1, y1]``, ``boxes`` (one per region of the
    map, ``box`` first), in original pixels."""

    point: list[float]
    box: list[float]
    boxes: list[list[float]]

    def to_json(self, digits: int = 1) -> dict[str, list]:
        """``{"point", "box", "boxes"}`` with coordinates rounded to ``digits``."""
        return {
            "point": [round(v, digits) for v in self.point],
            "box": [round(v, digits) for v in self.box],
            "boxes": [[round(v, digits) for v in b] for b in self.boxes],
        }


class Located(tuple):
    """A ``(label, prob)`` pair with where the label is (``location``): unpacks and compares as the pair, so code
    written for plain labels reads located ones unchanged; ``score`` is the raw one-shot score of a calibrated
    model's pair (``calibration.Scored``), else None."""

    location: Location
    score: float | None

    def __new__(cls, pair: tuple[str, float], location: Location, score: float | None = None) -> Located:
        located = super().__new__(cls, (pair[0], pair[1]))
        located.location = location
        located.score = getattr(pair, "score", score)
        return located

    def __getnewargs__(self):  # copy and pickle keep the location and score
        return (tuple(self), self.location, self.score)

    @property
    def label(self) -> str:
        return self[0]

    @property
    def prob(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        box = ", ".join(f"{v:.0f}" for v in self.location.box)
        return f"Located({self[0]!r}, prob={self[1]:.4g}, box=[{box}])"


def model_geometry(model, size: tuple[int, int]) -> ViewGeometry:
    """The ``ViewGeometry`` of ``model``'s eval preprocessing (``NXTP``: ``image_size``, ``preprocessing``) for
    an upright image of ``size`` (width, height)."""
    height, width = model.image_size
    return ViewGeometry.of(size, (width, height), model.preprocessing.resize_mode or "shortest")


def _moments(grid: np.ndarray, peak: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass and standard deviation (x, y), in cells, of the map above its minimum around ``peak``."""
    ys, xs = np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]]
    near = (np.abs(ys - peak[0]) <= radius) & (np.abs(xs - peak[1]) <= radius)
    w = (grid - grid.min()) * near
    w = w / w.sum()
    centre = np.array([(w * xs).sum(), (w * ys).sum()])
    sd = np.sqrt(np.array([(w * (xs - centre[0]) ** 2).sum(), (w * (ys - centre[1]) ** 2).sum()]))
    return centre, sd


def region_peaks(grid: np.ndarray, fraction: float = FRACTION) -> list[tuple[int, int]]:
    """The peak cell (row, column) of every connected region (8-neighbours) of cells at least ``fraction`` of the
    way from the map's minimum to its peak: the global peak first, the others by their value."""
    from scipy import ndimage

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction}: a number in (0, 1]")
    lo, hi = float(grid.min()), float(grid.max())
    labelled, n = ndimage.label(grid >= lo + fraction * (hi - lo), structure=np.ones((3, 3)))
    peaks = ndimage.maximum_position(grid, labelled, range(1, n + 1))
    return sorted(((int(r), int(c)) for r, c in peaks), key=lambda rc: -grid[rc])


def locate(
    grid: np.ndarray,
    geometry: ViewGeometry,
    radius: int = RADIUS,
    spread: float = SPREAD,
    fraction: float = FRACTION,
) -> Location:
    """A label's ``Location`` from its map ``grid`` [grid_h, grid_w] (any non-negative map over the patch grid of
    the view that ``geometry`` describes)."""
    if radius < 0 or spread <= 0:
        raise ValueError(f"radius {radius}, spread {spread}: radius >= 0 cells and spread > 0")
    grid = np.asarray(grid, dtype=np.float64)
    if not grid.max() > grid.min():  # a flat map points nowhere: the whole seen part, its centre
        seen = geometry.seen()
        return Location([(seen[0] + seen[2]) / 2, (seen[1] + seen[3]) / 2], seen, [seen])
    cell = np.array([geometry.view[0] / grid.shape[1], geometry.view[1] / grid.shape[0]])  # pixels (x, y)
    boxes, point = [], None
    for peak in region_peaks(grid, fraction):
        centre, sd = _moments(grid, peak, radius)
        middle, half = (centre + 0.5) * cell, np.maximum(spread * sd, 0.5) * cell
        point = point or geometry.to_original(middle.tolist())
        boxes.append(geometry.to_original([*(middle - half), *(middle + half)]))
    # a box clipped away entirely (in a padded margin) is no answer
    boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]] or [geometry.seen()]
    return Location(point, boxes[0], boxes)


# measured against the objects ----------------------------------------------------------------------------------


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``[x0, y0, x1, y1]``."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(box: Sequence[float], truth: Sequence[Sequence[float]]) -> float:
    """The IoU of ``box`` with the object of ``truth`` it overlaps most (0 without objects)."""
    return max((iou(box, t) for t in truth), default=0.0)


def inside(point: Sequence[float], truth: Sequence[Sequence[float]]) -> bool:
    """Whether ``point`` lies in one of the boxes ``truth``."""
    x, y = point
    return any(t[0] <= x < t[2] and t[1] <= y < t[3] for t in truth)


def centre_box(geometry: ViewGeometry, share: float = 0.5) -> list[float]:
    """A baseline: the box of ``share`` of each side of the seen part, centred."""
    x0, y0, x1, y1 = geometry.seen()
    dx, dy = (x1 - x0) * (1 - share) / 2, (y1 - y0) * (1 - share) / 2
    return [x0 + dx, y0 + dy, x1 - dx, y1 - dy]
