"""Label probabilities you can threshold: a map from what one-shot sampling knows about a label to the probability
that the label is right, fitted on a labelled split, with per-label thresholds.

The labels of one image share the first token's distribution, so with N objects in an image each label's raw
score is at most about 1/N: a raw score of 0.3 may be a sure label of a 3-object scene. The map reads each label in
the context of its image's ranked labels (``FEATURES``: its score, its share of the image's score mass, its ratio
to the top label, its rank, the gaps to its neighbours, ...), combines them with a logistic regression and makes the
result calibrated with an isotonic regression fitted on the same split, or maps the raw score alone with an isotonic
regression; ``fit`` measures which ranks best on held-out halves of the split, and fits the calibrated default
threshold (``Calibration.threshold``) and the per-label thresholds that generalise. A label is right when it equals a
reference label after ``normalize_label``, as ``metrics.ExactLabelScore`` counts it.

A ``Calibration`` is plain JSON (``to_json``), stored with the weights it was fitted on (``checkpoint``:
``write_calibration``, ``read_calibration``) and refused for other weights (``model_id``). Applying it needs numpy
only; fitting needs scikit-learn. ``CalibrationMonitor`` logs the expected calibration error of validation
(``val/ece``) and its reliability diagram during training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics import Metric

from datamodules.labels import normalize_label

FORMAT = "nxtp-calibration"  # the ``format`` field of the JSON: a file that lacks it is not a calibration
VERSION = 1
ECE_BINS = 15  # equal-width bins of the expected calibration error and the reliability diagram
MIN_EXAMPLES = 100  # emitted labels a fit needs, ...
MIN_EACH = 10  # ... of which at least this many right and this many wrong
MIN_LABEL_EXAMPLES = 30  # emitted occurrences of a label for a threshold of its own
MAX_PROB = 1 - 1e-4  # a finite split never proves a label certain
_EPS = 1e-300  # scores of 0 (reference_compat rounds them) still have a logarithm
_MAX_GAP = 20.0  # log-ratio cap: the last label's gap to "nothing"
METHODS = ("logistic+isotonic", "logistic", "isotonic")
OBJECTIVES = ("f1", "precision")


class CalibrationError(ValueError):
    """A calibration that cannot be used: it does not parse, or was fitted on other weights, or a fit lacks data."""


class Scored(tuple):
    """A ``(label, prob)`` pair that also carries the raw one-shot ``score``: unpacks and compares as the pair
    (``label, prob = x``), so code written for uncalibrated models reads calibrated ones unchanged."""

    score: float

    def __new__(cls, label: str, prob: float, score: float) -> Scored:
        pair = super().__new__(cls, (label, prob))
        pair.score = score
        return pair

    def __getnewargs__(self):  # copy and pickle keep the score
        return (self[0], self[1], self.score)

    @property
    def label(self) -> str:
        return self[0]

    @property
    def prob(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"Scored({self[0]!r}, prob={self[1]:.4g}, score={self.score:.4g})"


# features -----------------------------------------------------------------------------------------------------

FEATURES = (
    "log_score",  # the raw one-shot score
    "log_share",  # its share of the image's score mass (with N objects, about 1/N each)
    "log_top_ratio",  # against the image's best label
    "rank",  # 0 for the best label
    "log_mass",  # the summed score of the image's labels
    "log_gap_next",  # how far above the next label it stands (the elbow between objects and noise)
    "log_gap_prev",  # how far below the previous one
    "before_elbow",  # 1 if it ranks above the image's largest gap
    "chars",  # the label's length
)


def image_features(labels: Sequence[tuple[str, float]]) -> np.ndarray:
    """Every ``FEATURES`` column [n, len(FEATURES)] for one image's ranked ``(label, score)`` pairs: the whole top-k
    list, before any ``min_prob`` cut (a label is read against the others)."""
    n = len(labels)
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    s = np.maximum(np.array([float(p) for _, p in labels]), _EPS)
    order = np.argsort(-s, kind="stable")
    rank = np.empty(n)
    rank[order] = np.arange(n)
    ordered = s[order]
    nxt = np.append(ordered[1:], _EPS)
    prev = np.insert(ordered[:-1], 0, ordered[0])
    gap_next = np.minimum(np.log(ordered / nxt), _MAX_GAP)
    elbow = int(np.argmax(gap_next[:-1])) if n > 1 else 0  # the last label's gap to nothing is no elbow
    by_rank = {
        "log_gap_next": gap_next,
        "log_gap_prev": np.log(prev / ordered),
        "before_elbow": (np.arange(n) <= elbow).astype(float),
    }
    mass = s.sum()
    columns = {
        "log_score": np.log(s),
        "log_share": np.log(s / mass),
        "log_top_ratio": np.log(s / ordered[0]),
        "rank": rank,
        "log_mass": np.full(n, math.log(mass)),
        "chars": np.array([len(label) for label, _ in labels], dtype=float),
        **{k: v[rank.astype(int)] for k, v in by_rank.items()},
    }
    return np.stack([columns[name] for name in FEATURES], axis=1)


# the calibration ----------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """A fitted map from raw one-shot scores to the probability that a label is right, and thresholds.

    ``prob = isotonic(features_std @ coef + intercept)`` (the isotonic step is a piecewise-linear map given by
    ``iso_x``/``iso_y``; without it, the logistic sigmoid). ``presence_x``/``presence_y`` map an entry's raw score
    alone (``log_score``) for closed vocabularies, whose entries have no ranked list around them.
    """

    model_id: str
    method: str
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    iso_x: list[float]
    iso_y: list[float]
    presence_x: list[float]
    presence_y: list[float]
    threshold: float  # the global rule: for labels without their own
    thresholds: dict[str, float]  # normalized label -> threshold
    objective: str = "f1"
    target_precision: float | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)  # what it was fitted on: images, labels, topk, source

    # applying --------------------------------------------------------------------------------------------------

    def probs(self, labels: Sequence[tuple[str, float]]) -> np.ndarray:
        """The calibrated probability of each ``(label, score)`` of one image's ranked top-k list."""
        return self.map_features(image_features(labels))

    def map_features(self, x: np.ndarray) -> np.ndarray:
        """The calibrated probability of rows of ``image_features`` (all ``FEATURES`` columns)."""
        if not len(x):
            return np.zeros(0)
        x = x[:, [FEATURES.index(f) for f in self.features]]
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef) + self.intercept
        p = np.interp(z, self.iso_x, self.iso_y) if self.iso_x else 1 / (1 + np.exp(-z))
        return np.clip(p, 0.0, MAX_PROB)

    def presence(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """The calibrated probability that an entry with this raw score (e.g. ``Recognizer.score``'s) is present."""
        log = np.log(np.maximum(np.asarray(scores, dtype=float), _EPS))
        return np.clip(np.interp(log, self.presence_x, self.presence_y), 0.0, MAX_PROB)

    def threshold_for(self, label: str) -> float:
        """The fitted threshold of ``label``: its own where the split had enough of it, else the global one."""
        return self.thresholds.get(normalize_label(label), self.threshold)

    def apply(
        self, labels: Sequence[tuple[str, float]], min_prob: float = 0.0, threshold: str | None = None
    ) -> list[Scored]:
        """One image's ranked ``(label, score)`` list as ``Scored(label, prob, score)``, sorted by calibrated
        probability; none below ``min_prob`` and, with ``threshold="auto"``, none below its label's threshold."""
        probs = self.probs(labels)
        out = [Scored(label, float(p), float(s)) for (label, s), p in zip(labels, probs)]
        out.sort(key=lambda x: x[1], reverse=True)  # stable: ties keep the raw order
        return [x for x in out if x[1] >= min_prob and (threshold != "auto" or x[1] >= self.threshold_for(x[0]))]

    # storage ---------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The calibration as JSON text (``from_json`` reads it back)."""
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "calibration") -> Calibration:
        """Parse ``to_json``'s text; ``CalibrationError`` naming ``source`` and the problem otherwise."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CalibrationError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f'{source}: not a label calibration (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise CalibrationError(f"{source}: calibration version {data.get('version')!r}, this reads {VERSION}")
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            calibration = cls(**data)
            calibration._check()
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"{source}: malformed calibration ({e})") from None
        return calibration

    def _check(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features {unknown}")
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ValueError(f"mean, scale and coef must have one value per feature ({n})")
        for name in ("iso", "presence"):
            x, y = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            if len(x) != len(y) or (name == "presence" and not x):
                raise ValueError(f"{name}_x and {name}_y must be non-empty lists of the same length")
            if any(b < a for a, b in zip(x, x[1:])) or any(not 0 <= v <= 1 for v in y):
                raise ValueError(f"{name}_x must be sorted and {name}_y probabilities")
        values = [self.threshold, *self.thresholds.values()]
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values):
            raise ValueError("thresholds must be numbers from 0 to 1")
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in [*self.mean, *self.coef]):
            raise ValueError("mean and coef must be finite numbers")
        if any(not isinstance(v, (int, float)) or not v > 0 for v in self.scale):
            raise ValueError("scale must be positive numbers")


# examples and fitting -----------------------------------------------------------------------------------------


@dataclass
class Examples:
    """Every emitted label of a split as one row (its image, normalized text, features, raw score, whether it is
    right) and every image's references. Duplicate labels of one image (equal after ``normalize_label``) keep their
    first, best-ranked occurrence."""

    image: np.ndarray  # [n] image index
    label: list[str]  # [n] normalized
    x: np.ndarray  # [n, len(FEATURES)]
    score: np.ndarray  # [n]
    right: np.ndarray  # [n] bool
    truth: list[set[str]]  # [images] normalized references

    @classmethod
    def build(cls, predictions: Sequence[Sequence[tuple[str, float]]], references: Sequence[Sequence[str]]) -> Examples:
        """From per-image ranked ``(label, score)`` lists (top-k, no ``min_prob`` cut) and reference labels."""
        image, label, xs, score, right, truths = [], [], [], [], [], []
        for i, (labels, ref) in enumerate(zip(predictions, references)):
            truth = {normalize_label(r) for r in ref} - {""}
            truths.append(truth)
            x = image_features(labels)
            seen = set()
            for j, (name, s) in enumerate(labels):
                key = normalize_label(name)
                if not key or key in seen:
                    continue
                seen.add(key)
                image.append(i)
                label.append(key)
                xs.append(x[j])
                score.append(float(s))
                right.append(key in truth)
        x = np.array(xs).reshape(-1, len(FEATURES))
        return cls(np.array(image, dtype=int), label, x, np.array(score), np.array(right, dtype=bool), truths)

    def __len__(self) -> int:
        return len(self.score)

    @property
    def refs(self) -> np.ndarray:
        """Distinct references per image."""
        return np.array([len(t) for t in self.truth], dtype=float)

    def ref_count(self, label: str) -> int:
        """Images whose references hold ``label`` (normalized)."""
        return sum(label in t for t in self.truth)

    def subset(self, images: np.ndarray) -> Examples:
        """The examples of the images selected by the boolean mask ``images``, renumbered."""
        keep = images[self.image]
        index = np.cumsum(images) - 1
        return Examples(
            index[self.image[keep]],
            [l for l, k in zip(self.label, keep) if k],
            self.x[keep],
            self.score[keep],
            self.right[keep],
            [t for t, k in zip(self.truth, images) if k],
        )


def mean_f1(ex: Examples, keep: np.ndarray) -> float:
    """Mean over images of ``ExactLabelScore``'s per-image F1 = 2 hits / (kept + references) for the kept labels
    (an image with no label kept scores 0; one without references is left out)."""
    n = len(ex.refs)
    hits = np.bincount(ex.image, weights=(keep & ex.right).astype(float), minlength=n)
    kept = np.bincount(ex.image, weights=keep.astype(float), minlength=n)
    scored = ex.refs > 0
    return float((2 * hits / np.maximum(kept + ex.refs, 1))[scored].mean()) if scored.any() else 0.0


def pr(ex: Examples, keep: np.ndarray) -> tuple[float, float]:
    """Micro precision and recall of the kept labels over every image."""
    hits = float((keep & ex.right).sum())
    return hits / max(float(keep.sum()), 1.0), hits / max(float(ex.refs.sum()), 1.0)


def _cut(candidates: np.ndarray, best: int, probs: np.ndarray) -> float:
    """A threshold between the chosen candidate and the next lower probability seen (so that a label a little
    below the lowest one kept in the fit is still kept); 1 keeps nothing."""
    if best >= len(candidates):
        return 1.0
    below = probs[probs < candidates[best]]
    return float((candidates[best] + below.max()) / 2) if below.size else float(candidates[best])


def _candidates(probs: np.ndarray, limit: int = 400) -> np.ndarray:
    values = np.unique(probs)
    if len(values) > limit:
        values = np.unique(np.quantile(values, np.linspace(0, 1, limit)))
    return values


def fit_threshold(
    ex: Examples, probs: np.ndarray, objective: str = "f1", target_precision: float | None = None
) -> float:
    """The global threshold on ``probs`` (one per example): best mean per-image F1, or with ``objective="precision"``
    the lowest whose micro precision reaches ``target_precision`` (the most precise one if none does)."""
    candidates = _candidates(probs)
    if objective == "f1":
        scores = [mean_f1(ex, probs >= t) for t in candidates] + [0.0]
    else:
        precision = [pr(ex, probs >= t)[0] if (probs >= t).any() else 0.0 for t in candidates]
        reached = [i for i, p in enumerate(precision) if p >= target_precision]
        return _cut(candidates, reached[0] if reached else int(np.argmax(precision)), probs)
    best = max(range(len(scores)), key=lambda i: (scores[i], i))  # ties: the one that keeps fewest
    return _cut(candidates, best, probs)


def fit_label_thresholds(
    ex: Examples,
    probs: np.ndarray,
    objective: str = "f1",
    target_precision: float | None = None,
    min_examples: int = MIN_LABEL_EXAMPLES,
) -> dict[str, float]:
    """A threshold for every label emitted at least ``min_examples`` times: best F1 of that label over the split
    (its references that were never emitted count as misses), or the lowest reaching ``target_precision``."""
    labels = np.array(ex.label, dtype=object)
    out = {}
    for name in sorted(set(ex.label)):
        rows = labels == name
        if rows.sum() < min_examples:
            continue
        p, y = probs[rows], ex.right[rows]
        refs = ex.ref_count(name)
        candidates = np.unique(p)
        kept = np.array([(p >= t).sum() for t in candidates], dtype=float)
        hits = np.array([(y & (p >= t)).sum() for t in candidates], dtype=float)
        if objective == "f1":
            f1 = np.append(2 * hits / np.maximum(kept + refs, 1), 0.0)
            best = max(range(len(f1)), key=lambda i: (f1[i], i))
        else:
            precision = hits / np.maximum(kept, 1)
            reached = np.nonzero(precision >= target_precision)[0]
            best = int(reached[0]) if reached.size else len(candidates)  # never reaches it: keep none
        out[name] = round(_cut(candidates, best, p), 6)
    return out


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y.astype(float))
    return iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()


def _fit_map(
    ex: Examples, model_id: str, method: str, features: Sequence[str], objective: str, target_precision: float | None
) -> Calibration:
    """One method's map and its global threshold on ``ex`` (no per-label thresholds)."""
    from sklearn.linear_model import LogisticRegression

    log_score = ex.x[:, FEATURES.index("log_score")]
    presence_x, presence_y = _isotonic(log_score, ex.right)
    if method == "isotonic":
        features, mean, scale, coef, intercept = ["log_score"], [0.0], [1.0], [1.0], 0.0
        z = log_score
    else:
        features = list(features)
        x = ex.x[:, [FEATURES.index(f) for f in features]]
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0  # a constant feature carries nothing; keep it harmless
        lr = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, ex.right)
        coef, intercept = lr.coef_[0], float(lr.intercept_[0])
        z = ((x - mean) / scale) @ coef + intercept
        mean, scale, coef = mean.tolist(), scale.tolist(), coef.tolist()
    iso_x, iso_y = _isotonic(z, ex.right) if method != "logistic" else ([], [])
    calibration = Calibration(
        model_id, method, features, mean, scale, coef, intercept, iso_x, iso_y, presence_x, presence_y, 0.5, {},
        objective, target_precision,
    )  # fmt: skip
    calibration.threshold = round(fit_threshold(ex, calibration.map_features(ex.x), objective, target_precision), 6)
    return calibration


def _halves(ex: Examples) -> list[tuple[Examples, Examples]] | None:
    """Two-fold split of ``ex`` by image (even and odd images), or None when a half is too small to fit."""
    even = np.arange(len(ex.refs)) % 2 == 0
    a, b = ex.subset(even), ex.subset(~even)
    if any(len(h) < MIN_EXAMPLES or min(h.right.sum(), len(h) - h.right.sum()) < MIN_EACH for h in (a, b)):
        return None
    return [(a, b), (b, a)]


def _enough(ex: Examples) -> None:
    right, n = int(ex.right.sum()), len(ex)
    if n < MIN_EXAMPLES or right < MIN_EACH or n - right < MIN_EACH:
        raise CalibrationError(
            f"too few examples to fit a calibration: {n} labels emitted ({right} right, {n - right} wrong); a fit "
            f"needs at least {MIN_EXAMPLES}, of which {MIN_EACH} right and {MIN_EACH} wrong (use more images)"
        )


def fit(
    ex: Examples,
    model_id: str,
    method: str = "auto",
    features: Sequence[str] = FEATURES,
    objective: str = "f1",
    target_precision: float | None = None,
    min_label_examples: int = MIN_LABEL_EXAMPLES,
    fitted_on: dict[str, Any] | None = None,
) -> Calibration:
    """Fit a ``Calibration`` on a split's ``Examples`` (scikit-learn's logistic and isotonic regressions) and its
    thresholds for ``objective`` (``f1``: best F1; ``precision``: the lowest threshold of ``target_precision``).

    Both choices are measured on the split itself, two-fold by image (fit on one half, score on the other), and
    recorded in ``fitted_on``: ``method="auto"`` takes the method of best held-out F1 at its own fitted threshold
    (ties: the simpler, isotonic first), and per-label thresholds are kept only when, with the F1 objective, they
    beat the global threshold on held-out images (else ``threshold="auto"`` is the global threshold alone).

    Raises ``CalibrationError`` when the split is too small: fewer than ``MIN_EXAMPLES`` labels, or fewer than
    ``MIN_EACH`` right or wrong ones.
    """
    if method not in (*METHODS, "auto"):
        raise ValueError(f"method {method!r}: auto or one of {', '.join(METHODS)}")
    if objective not in OBJECTIVES or (objective == "precision") != (target_precision is not None):
        raise ValueError("objective 'f1', or 'precision' with a target_precision")
    _enough(ex)
    halves = _halves(ex)
    choice: dict[str, Any] = {}

    def held_out_f1(m: str) -> float:
        maps = [(_fit_map(a, model_id, m, features, objective, target_precision), b) for a, b in halves]
        return float(np.mean([mean_f1(b, c.map_features(b.x) >= c.threshold) for c, b in maps]))

    if method == "auto":
        order = ("isotonic", "logistic+isotonic", "logistic")  # simplest first: it wins ties
        if halves is None:
            method, choice["method"] = "isotonic", "isotonic (too few examples to compare methods)"
        else:
            scores = {m: round(held_out_f1(m), 4) for m in order}
            method = max(order, key=lambda m: (scores[m], -order.index(m)))
            choice["method"] = {"chosen": method, "held_out_f1": scores}
    calibration = _fit_map(ex, model_id, method, features, objective, target_precision)
    thresholds = fit_label_thresholds(
        ex, calibration.map_features(ex.x), objective, target_precision, min_label_examples
    )
    if thresholds and objective == "f1":
        gains = []
        for a, b in halves or []:
            c = _fit_map(a, model_id, method, features, objective, target_precision)
            own = fit_label_thresholds(a, c.map_features(a.x), objective, None, min_label_examples)
            pb = c.map_features(b.x)
            cut = np.array([own.get(l, c.threshold) for l in b.label])
            gains.append(mean_f1(b, pb >= cut) - mean_f1(b, pb >= c.threshold))
        choice["label_thresholds"] = {"held_out_f1_gain": round(float(np.mean(gains)), 4) if gains else None}
        if not gains or np.mean(gains) <= 0:
            thresholds = {}  # they do not generalise: the global threshold serves every label
    calibration.thresholds = thresholds
    right = int(ex.right.sum())
    calibration.fitted_on = {"images": len(ex.refs), "labels": len(ex), "right": right, **choice, **(fitted_on or {})}
    return calibration


def auto_keep(calibration: Calibration, ex: Examples, probs: np.ndarray) -> np.ndarray:
    """Which examples ``threshold="auto"`` keeps."""
    return probs >= np.array([calibration.thresholds.get(l, calibration.threshold) for l in ex.label])


# reports ------------------------------------------------------------------------------------------------------


def reliability(probs: np.ndarray, right: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of ``probs`` (the last bin includes 1): the count, the summed probability and the number
    right."""
    index = np.minimum((np.asarray(probs, dtype=float) * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins).astype(float)
    conf = np.bincount(index, weights=probs, minlength=bins)
    hits = np.bincount(index, weights=np.asarray(right, dtype=float), minlength=bins)
    return count, conf, hits


def ece_from_bins(count: np.ndarray, conf: np.ndarray, hits: np.ndarray) -> float:
    """Expected calibration error: the mean over labels of |accuracy - mean probability| of their bin."""
    total = count.sum()
    if total == 0:
        return 0.0
    used = count > 0
    return float((np.abs(hits[used] - conf[used])).sum() / total)


def ece(probs: np.ndarray, right: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of ``probs`` (each label weighted equally)."""
    return ece_from_bins(*reliability(probs, right, bins))


def reliability_diagram(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], size: int = 320) -> Image.Image:
    """A reliability diagram per panel (title -> ``reliability``'s bins), side by side: per bin, the fraction right
    (bar) against the mean probability (dot) and the diagonal of perfect calibration; the bar's shade is the
    bin's share of the labels."""
    margin, head = 36, 40
    width = len(panels) * (size + 2 * margin)
    picture = Image.new("RGB", (width, size + head + margin), "white")
    draw = ImageDraw.Draw(picture)
    for k, (title, (count, conf, hits)) in enumerate(panels.items()):
        left, top = k * (size + 2 * margin) + margin, head
        bins = len(count)
        share = count / max(count.sum(), 1)
        for b in range(bins):
            if not count[b]:
                continue
            x0, x1 = left + b * size / bins, left + (b + 1) * size / bins
            acc = hits[b] / count[b]
            shade = int(200 - 150 * min(1.0, share[b] * 5))
            draw.rectangle([x0 + 1, top + size * (1 - acc), x1 - 1, top + size], fill=(shade, shade, 255))
            cx, cy = (x0 + x1) / 2, top + size * (1 - conf[b] / count[b])
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(220, 60, 40))
        draw.line([left, top + size, left + size, top], fill=(120, 120, 120), width=1)
        draw.rectangle([left, top, left + size, top + size], outline=(0, 0, 0))
        draw.text((left, 6), title, fill=(0, 0, 0))
        draw.text((left, 20), f"ECE {ece_from_bins(count, conf, hits):.3f}, {int(count.sum())} labels", fill=(0, 0, 0))
        draw.text((left, top + size + 4), "probability (bins) -> fraction right (bars)", fill=(80, 80, 80))
    return picture


def threshold_table(ex: Examples, probs: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Precision, recall (micro) and mean per-image F1 of the labels kept at each threshold."""
    rows = []
    for t in thresholds:
        keep = probs >= t
        precision, recall = pr(ex, keep)
        rows.append({"threshold": t, "precision": precision, "recall": recall, "f1": mean_f1(ex, keep)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a Markdown table (numbers to 3 decimals)."""
    keys = list(rows[0])
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    return "\n".join(
        ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + ["| " + " | ".join(c) + " |" for c in cells]
    )


# in training --------------------------------------------------------------------------------------------------


class CalibrationBins(Metric):
    """Reliability bins of (probability, right) pairs as summed states: DDP reduces them once, at ``compute``."""

    full_state_update = False

    def __init__(self, bins: int = ECE_BINS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("count", "conf", "hits"):
            self.add_state(name, torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[Sequence[tuple[str, float]]], references: Sequence[Sequence[str]]) -> None:
        """Every emitted label of each image, right when it is one of the image's references."""
        probs, right = [], []
        for labels, refs in zip(predictions, references):
            truth = {normalize_label(r) for r in refs}
            for label, p in labels:
                probs.append(float(p))
                right.append(normalize_label(label) in truth)
        bins = reliability(np.array(probs), np.array(right), len(self.count))
        for name, value in zip(("count", "conf", "hits"), bins):
            setattr(self, name, getattr(self, name) + torch.from_numpy(value).to(self.count.device))

    def compute(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).cpu().numpy() for name in ("count", "conf", "hits")}


class CalibrationMonitor(L.Callback):
    """``val/ece`` (``ECE_BINS`` bins over every label ``validation_step`` returns, against the batch's references)
    and ``val/reliability``, the reliability diagram, at the end of each validation. The bins are torchmetrics
    states: each rank adds its batches, and they are reduced once per epoch."""

    def __init__(self) -> None:
        self.bins = CalibrationBins()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bins = self.bins.to(pl_module.device)
        self.bins.reset()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx=0
    ) -> None:
        if outputs:
            self.bins.update(outputs, batch.labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        bins = self.bins.compute()  # the sum over every rank
        if not bins["count"].sum():
            return
        pl_module.log("val/ece", ece_from_bins(**bins), sync_dist=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_image"):
            picture = reliability_diagram({"validation: raw one-shot scores": tuple(bins.values())})
            experiment.add_image("val/reliability", np.asarray(picture), trainer.global_step, dataformats="HWC")


# fitting a model's calibration --------------------------------------------------------------------------------

REPORT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def evaluate(calibration: Calibration, ex: Examples) -> dict[str, float]:
    """How raw and calibrated probabilities do on ``ex`` (a split the calibration was not fitted on): ECE of both,
    mean per-image F1 at calibrated 0.5, at the fitted thresholds (``auto``) and at the global one, against the
    best F1 any single raw threshold reaches on ``ex`` itself (chosen on the data it is scored on: a bound)."""
    probs = calibration.map_features(ex.x)
    candidates = _candidates(ex.score)
    raw_f1 = [mean_f1(ex, ex.score >= t) for t in candidates]
    best = int(np.argmax(raw_f1))
    auto = auto_keep(calibration, ex, probs)
    return {
        "images": len(ex.refs),
        "labels": len(ex),
        "ece_raw": ece(ex.score, ex.right),
        "ece_calibrated": ece(probs, ex.right),
        "f1_raw_0.5": mean_f1(ex, ex.score >= 0.5),
        "f1_raw_best": raw_f1[best],
        "raw_best_threshold": float(candidates[best]),
        "f1_calibrated_0.5": mean_f1(ex, probs >= 0.5),
        "f1_calibrated_global": mean_f1(ex, probs >= calibration.threshold),
        "f1_auto": mean_f1(ex, auto),
        "precision_auto": pr(ex, auto)[0],
        "recall_auto": pr(ex, auto)[1],
    }


def split_images(keys: Sequence[str], fraction: float) -> np.ndarray:
    """A boolean mask of the images held out for the report: ``fraction`` of them, chosen by a hash of the sample
    key (the same images on every run, whatever the order they come in)."""
    import zlib

    return np.array([zlib.crc32(k.encode()) % 10_000 < fraction * 10_000 for k in keys], dtype=bool)


@dataclass
class Report:
    """What ``calibrate`` found: the calibration, the figures of ``evaluate`` on the report images, the
    precision/recall table by threshold, the reliability bins (raw and calibrated) and the splits' sizes."""

    calibration: Calibration
    metrics: dict[str, float]
    table: list[dict[str, Any]]
    panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    fitted_images: int
    report_images: int

    def text(self) -> str:
        """The report as a user reads it."""
        m, choice = self.metrics, self.calibration.fitted_on
        lines = [
            f"method {self.calibration.method}"
            + (
                f" (held-out F1 of each: {choice['method']['held_out_f1']})"
                if isinstance(choice.get("method"), dict)
                else ""
            )
            + (
                f"; per-label thresholds: held-out F1 gain {choice['label_thresholds']['held_out_f1_gain']}"
                + ("" if self.calibration.thresholds else ", so none kept: --threshold auto is the global threshold")
                if "label_thresholds" in choice
                else ""
            ),
            f"fitted on {self.fitted_images} images ({self.calibration.fitted_on['labels']} labels), reported on "
            f"{self.report_images} other images ({m['labels']} labels)",
            f"expected calibration error ({ECE_BINS} bins): raw {m['ece_raw']:.4f} -> calibrated "
            f"{m['ece_calibrated']:.4f}",
            f"F1: raw scores >= 0.5 {m['f1_raw_0.5']:.4f}; best single raw threshold "
            f"({m['raw_best_threshold']:.3g}, chosen on the report images) {m['f1_raw_best']:.4f}",
            f"F1: calibrated >= 0.5 {m['f1_calibrated_0.5']:.4f}; calibrated >= global threshold "
            f"{self.calibration.threshold:.3g}: {m['f1_calibrated_global']:.4f}; --threshold auto "
            f"({len(self.calibration.thresholds)} per-label thresholds) {m['f1_auto']:.4f} (precision "
            f"{m['precision_auto']:.4f}, recall {m['recall_auto']:.4f})",
            "",
            "calibrated probability thresholds on the report images:",
            markdown_table(self.table),
        ]
        return "\n".join(lines)


def calibrate(
    recognizer,
    shards,
    report_shards=None,
    holdout: float = 0.3,
    topk: int = 10,
    method: str = "auto",
    target_precision: float | None = None,
    min_label_examples: int = MIN_LABEL_EXAMPLES,
    batch_size: int = 32,
    workers: int = 2,
    limit: int | None = None,
) -> Report:
    """Fit ``recognizer``'s calibration on labelled ``shards`` (``data.*_shards`` syntax; references as evaluation
    takes them) and report on ``report_shards``, or, without them, on a ``holdout`` fraction of the images of
    ``shards`` that the fit does not see. ``target_precision``: thresholds for that precision instead of best F1;
    ``limit``: at most this many images of each split. ``CalibrationError`` for a split with no labelled image or
    too few labels to fit."""
    from datamodules.webdataset import NXTPDataModule

    from .checkpoint import model_identity
    from .sampling import recognize

    def read(split_shards, name: str) -> tuple[Examples, list[str]]:
        data = NXTPDataModule(
            val_shards=split_shards, batch_size=batch_size, num_workers=workers, inputs=recognizer.model.inputs
        )
        predictions, references, keys = [], [], []
        for batch in data.val_dataloader():
            if not len(batch):
                continue
            with torch.no_grad():
                predictions += recognize(recognizer.model, batch.pixels.to(recognizer.device), topk=topk)
            references += batch.labels
            keys += batch.keys
            if limit is not None and len(keys) >= limit:
                break
        predictions, references, keys = predictions[:limit], references[:limit], keys[:limit]
        if not keys:
            raise CalibrationError(
                f"{name} {split_shards!r}: no labelled image (the shards are empty, or every sample was rejected)"
            )
        return Examples.build(predictions, references), keys

    ex, keys = read(shards, "shards")
    if report_shards is not None:
        fit_ex, (report_ex, _) = ex, read(report_shards, "report shards")
    else:
        held = split_images(keys, holdout)
        if held.all() or not held.any():
            raise CalibrationError(f"shards {shards!r}: {len(keys)} images are too few to hold {holdout:.0%} out")
        fit_ex, report_ex = ex.subset(~held), ex.subset(held)
    objective = "precision" if target_precision is not None else "f1"
    source = {"shards": str(shards), "topk": topk}
    calibration = fit(
        fit_ex,
        model_identity(recognizer.model),
        method,
        objective=objective,
        target_precision=target_precision,
        min_label_examples=min_label_examples,
        fitted_on=source,
    )
    probs = calibration.map_features(report_ex.x)
    table = threshold_table(report_ex, probs, REPORT_THRESHOLDS)
    auto = auto_keep(calibration, report_ex, probs)
    precision, recall = pr(report_ex, auto)
    table.append({"threshold": "auto", "precision": precision, "recall": recall, "f1": mean_f1(report_ex, auto)})
    panels = {
        "raw one-shot scores": reliability(report_ex.score, report_ex.right),
        "calibrated": reliability(probs, report_ex.right),
    }
    return Report(calibration, evaluate(calibration, report_ex), table, panels, len(fit_ex.refs), len(report_ex.refs))


def save_report(out: Path, report: Report) -> None:
    """Write the reliability diagram (``reliability.png``) and the report with its threshold table
    (``report.md``) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    reliability_diagram(report.panels).save(out / "reliability.png")
    (out / "report.md").write_text(report.text() + "\n")
