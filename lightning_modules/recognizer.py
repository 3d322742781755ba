"""The Python API: name the objects in images.

from lightning_modules import Recognizer
recognizer = Recognizer.from_checkpoint("logs/default/version_0/checkpoints/last.ckpt")
recognizer.label(["cat.jpg", pil_image], topk=10, min_prob=0.1)
# [[("cat", 0.71), ("sofa", 0.12)], [...]]
recognizer.score(["cat.jpg"], ["cat", "dog", ["sofa", "couch"]], topk=2)  # exact, over a closed vocabulary
recognizer.map_labels(["cat.jpg"], "classes.txt")  # open-set labels mapped onto a vocabulary
recognizer.label(["cat.jpg"], locate=True)  # and where: [[Located("cat", 0.71, box=[12, 40, 230, 310]), ...]]
recognizer.locate(["cat.jpg"], [["cat", "collar"]])  # where given labels are

With a calibration (``nxtp calibrate``), every ``prob`` is the calibrated probability that the label is right, and
each pair is a ``calibration.Scored`` that also carries the raw one-shot ``score``; ``threshold="auto"`` keeps each
label at its fitted threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from datamodules.images import MAX_IMAGE_PIXELS, decode_image

from .attention_maps import DEFAULT_METHOD, LabelMap, capture_prefix, explain, finer_maps
from .calibration import Calibration, CalibrationError, Scored
from .locate import RADIUS, SPREAD, Located, locate, model_geometry
from .nxtp import NXTP, Decode
from .sampling import Sampler, label_images, recognize
from .vocabulary import Candidates, LabelMapper, Vocabulary, ranked, score_vocabulary, tokenize

ImageInput = str | Path | bytes | Image.Image | Tensor


class Recognizer:
    """An ``NXTP`` model in eval mode with its preprocessing, for labelling images.

    Images are read as in training (``datamodules.images.decode_image``): EXIF orientation applied, transparency
    over white, any mode to RGB, images of more than ``max_image_pixels`` refused, and decoded as the model's
    preprocessing says (``model.preprocessing``). ``decode`` overrides how, and so changes the model's inputs:
    ``full`` decodes every pixel (the reference's way), ``draft`` decodes large JPEGs at reduced scale (faster; a
    JPEG and a PNG of the same pixels may then get different probabilities); None: the model's.
    """

    def __init__(
        self,
        model: NXTP,
        device: str | torch.device = "cpu",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        decode: Decode | None = None,
    ) -> None:
        if decode not in (None, *Decode.__args__):
            raise ValueError(f"decode={decode!r}: choose one of {Decode.__args__} or None (the model's)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_image_pixels = max_image_pixels
        self.decode: Decode = decode or model.preprocessing.decode

    @property
    def calibration(self) -> Calibration | None:
        """The model's label calibration (``checkpoint.load_model`` attaches it), or None."""
        return getattr(self.model, "calibration", None)

    def _calibration_for(self, threshold: str | None) -> Calibration | None:
        if threshold not in (None, "auto"):
            raise ValueError(f"threshold: 'auto' or None, got {threshold!r}")
        if threshold == "auto" and self.calibration is None:
            raise CalibrationError("threshold 'auto' needs a calibrated model: run nxtp calibrate on it first")
        return self.calibration

    @property
    def draft_input_size(self) -> tuple[int, int] | None:
        """The input size that large JPEGs are draft-decoded for (``decode_image``'s ``input_size``); None: full."""
        return self.model.image_size if self.decode == "draft" else None

    def read(self, image: str | Path | bytes | Image.Image) -> Image.Image:
        """An image as the model is given it before resizing: upright RGB (see ``decode_image``)."""
        return decode_image(image, self.max_image_pixels, self.draft_input_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        trust: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        decode: Decode | None = None,
    ) -> Recognizer:
        """Load a Lightning ``.ckpt`` written by ``nxtp fit`` or a folder written by ``save_pretrained`` /
        ``nxtp import-official``; ``max_image_pixels`` and ``decode`` as for ``Recognizer``.

        A ``.ckpt`` is read without running code from its pickle (see ``checkpoint_io.load_checkpoint``) unless
        ``trust`` is set; a folder holds safetensors and JSON only.
        """
        from .checkpoint import load_model

        return cls(load_model(path, trust), device, max_image_pixels, decode)

    def preprocess(self, image: ImageInput) -> Tensor:
        """Pixels [3, H, W] for one image: a path, encoded bytes, a PIL image, or an already preprocessed tensor."""
        if isinstance(image, Tensor):
            return image
        return self.model.eval_transform(self.read(image))

    @torch.no_grad()
    def label(
        self,
        images: ImageInput | list[ImageInput],
        topk: int = 10,
        min_prob: float = 0.0,
        batch_size: int = 32,
        threshold: str | None = None,
        sampler: Sampler = "one-shot",
        beams: int = 3,
        locate: bool = False,
        sizes: list[tuple[int, int]] | None = None,
        radius: int = RADIUS,
        spread: float = SPREAD,
        views: int = 1,
    ) -> list[list[tuple[str, float]]]:
        """``(label, probability)`` pairs sorted by probability, one list per image, none below ``min_prob``.

        ``sampler``: ``one-shot`` (NXTP's: ``topk`` labels decoded in parallel), or the paper's baselines
        ``greedy`` and ``beam`` (``beams`` beams), which generate the list as text (``sampling.generate_labels``)
        and keep its ``topk`` most probable labels. With a calibration (fitted on one-shot scores, so one-shot
        only), the probability is calibrated (``Scored`` pairs, with the raw ``score``) and ``threshold="auto"``
        also drops each label below its fitted threshold.

        ``locate``: each pair is a ``locate.Located`` that also says where the label is (``.location``: ``point``
        and ``box`` in the pixels of the image given, see :meth:`locate`); ``sizes``: the original (width, height)
        of images given as preprocessed tensors (without them, a tensor's locations are in its own pixels);
        ``radius`` and ``spread``: how a map becomes a point and a box (``locate.locate``); ``views``: 4 or 5 locate
        by a map twice as fine, the mean over shifted (and mirrored) views of the image (``attention_maps.finer_maps``:
        each view costs a map pass; ``radius`` then counts half-patch cells)."""
        if sampler != "one-shot" and threshold is not None:
            raise ValueError(f"threshold={threshold!r} needs the one-shot sampler, whose scores were calibrated")
        calibration = self._calibration_for(threshold)
        results: list[list[tuple[str, float]]] = []
        for pixels, batch_sizes in self._batches(images, batch_size, sizes):
            prefix = None
            if sampler != "one-shot":
                found = label_images(self.model, pixels, sampler, topk, min_prob, beams)
            else:  # locating reuses the image and prompt pass of the sampling
                with capture_prefix(self.model) if locate else contextlib.nullcontext() as prefix:
                    raw = recognize(self.model, pixels, topk=topk, min_prob=0.0 if calibration else min_prob)
                # with a calibration, the whole top-k list: a label is calibrated against the others
                found = raw if calibration is None else [calibration.apply(x, min_prob, threshold) for x in raw]
            if locate:
                found = self.with_locations(
                    pixels, batch_sizes, found, radius=radius, spread=spread, views=views, prefix=prefix
                )
            results += found
        return results

    def _batches(
        self, images: ImageInput | list[ImageInput], batch_size: int, sizes: list[tuple[int, int]] | None = None
    ) -> Iterator[tuple[Tensor, list[tuple[int, int]]]]:
        """Batches of pixels [B, 3, H, W] on the device, with each image's upright (width, height): read from the
        file, or for a preprocessed tensor taken from ``sizes`` or else its own."""
        images = images if isinstance(images, list) else [images]
        if sizes is not None and len(sizes) != len(images):
            raise ValueError(f"{len(sizes)} sizes for {len(images)} images")
        for start in range(0, len(images), batch_size):
            pixels, batch_sizes = [], []
            for i, image in enumerate(images[start : start + batch_size], start):
                if not isinstance(image, Tensor):
                    image = self.read(image)
                    batch_sizes.append(image.size)
                    image = self.model.eval_transform(image)
                else:
                    batch_sizes.append(tuple(sizes[i]) if sizes is not None else (image.shape[-1], image.shape[-2]))
                pixels.append(image)
            yield torch.stack(pixels).to(self.device), batch_sizes

    def _pixels(self, images: ImageInput | list[ImageInput], batch_size: int) -> Iterator[Tensor]:
        for pixels, _ in self._batches(images, batch_size):
            yield pixels

    def with_locations(
        self,
        pixels: Tensor,
        sizes: list[tuple[int, int]],
        found: list[list[tuple[str, float]]],
        maps: list[list[LabelMap]] | None = None,
        method: str = DEFAULT_METHOD,
        radius: int = RADIUS,
        spread: float = SPREAD,
        prefix=None,
        views: int = 1,
    ) -> list[list[Located]]:
        """``found`` (pairs per image of ``pixels`` [B, 3, H, W], whose upright files measure ``sizes``) as
        ``Located`` pairs, from their ``maps`` (``explain``'s) or from teacher-forced maps made here (reusing the
        sampler's image and prompt pass where ``prefix``, ``attention_maps.capture_prefix``'s, recorded it)."""
        if maps is None:
            labels = [[pair[0] for pair in pairs] for pairs in found]
            maps = explain(self.model, pixels, labels, method, prefix=prefix)
        grids = [[m.grid for m in ms] for ms in maps]
        made = next((m for ms in maps for m in ms), None)
        if made is not None:  # the added views' maps (views > 1) are made as the given ones were
            labels = [[m.label for m in ms] for ms in maps]
            grids = finer_maps(self.model, pixels, labels, grids, views, made.method, **made.extra)
        geometries = [model_geometry(self.model, size) for size in sizes]
        return [
            [Located(pair, locate(g, geometry, radius, spread)) for pair, g in zip(pairs, gs)]
            for pairs, gs, geometry in zip(found, grids, geometries)
        ]

    def locate(
        self,
        images: ImageInput | list[ImageInput],
        labels: list[list[str]],
        method: str = DEFAULT_METHOD,
        radius: int = RADIUS,
        spread: float = SPREAD,
        batch_size: int = 32,
        sizes: list[tuple[int, int]] | None = None,
        views: int = 1,
    ) -> list[list[Located]]:
        """Where each of the given ``labels`` of each image is: a ``Located`` (label, probability of the label
        teacher-forced, ``location``) per label. ``location.point`` ``[x, y]`` and ``location.box``
        ``[x0, y0, x1, y1]`` are in pixels of the upright image given (EXIF orientation applied), the box clipped
        to the part the model saw (the centre crop); ``location.boxes`` has a box per region of the label's map
        (several objects of one kind). A label need not be one the sampler produced: its map is the model's
        attention when it is made to say it. ``method``, ``radius`` and ``spread``: see ``attention_maps`` and
        ``locate``; ``views``: as in :meth:`label`."""
        if len(labels) != (len(images) if isinstance(images, list) else 1):
            raise ValueError(f"{len(labels)} label lists for {len(images) if isinstance(images, list) else 1} images")
        out: list[list[Located]] = []
        for i, (pixels, batch_sizes) in enumerate(self._batches(images, batch_size, sizes)):
            given = labels[i * batch_size : i * batch_size + len(pixels)]
            maps = explain(self.model, pixels, given, method)
            found = [[(m.label, m.score) for m in ms] for ms in maps]
            out += self.with_locations(pixels, batch_sizes, found, maps, radius=radius, spread=spread, views=views)
        return out

    def tokenize(self, vocabulary: Vocabulary | str | Path | list) -> tuple[Vocabulary, Candidates]:
        """A vocabulary (itself, a file or a list of names / name lists) and its names as model tokens; raises
        ``vocabulary.VocabularyError`` naming the file and line of a name that cannot be scored."""
        vocabulary = Vocabulary.coerce(vocabulary)
        return vocabulary, tokenize(self.model, vocabulary)

    @torch.no_grad()
    def score_tensor(
        self, images: ImageInput | list[ImageInput], vocabulary, batch_size: int = 32, chunk_tokens: int = 2048
    ) -> Tensor:
        """The probability [images, entries] (float64, on the CPU) of every vocabulary entry: the sum over its names
        of the exact probability of each (see ``vocabulary.score_vocabulary``)."""
        if not (isinstance(vocabulary, tuple) and isinstance(vocabulary[1], Candidates)):
            vocabulary = self.tokenize(vocabulary)
        vocab, candidates = vocabulary
        return torch.cat(
            [
                score_vocabulary(self.model, pixels, candidates, len(vocab), chunk_tokens).cpu()
                for pixels in self._pixels(images, batch_size)
            ]
        )

    def score(
        self,
        images: ImageInput | list[ImageInput],
        vocabulary,
        topk: int | None = None,
        min_prob: float = 0.0,
        batch_size: int = 32,
        chunk_tokens: int = 2048,
        threshold: str | None = None,
        locate: bool = False,
        sizes: list[tuple[int, int]] | None = None,
        radius: int = RADIUS,
        spread: float = SPREAD,
        views: int = 1,
    ) -> list[list[tuple[str, float]]]:
        """``(entry name, probability)`` for every entry of a closed ``vocabulary``, sorted, one list per image: at
        most ``topk`` (None: all) and none below ``min_prob``. ``vocabulary`` is a ``Vocabulary``, a file (text, JSON
        or JSON lines), a list of names and name lists (synonyms, whose probabilities add up), or what
        :meth:`tokenize` returns (to tokenize once for many calls). The image and prompt run once per batch; the
        names, ``chunk_tokens`` tokens per forward, share their KV cache.

        With a calibration, an entry's probability is the calibrated probability that it is present (a ``Scored``
        pair with the raw ``score``); ``threshold="auto"`` drops entries below their fitted threshold. ``locate``,
        ``sizes``, ``radius``, ``spread`` and ``views``: as in :meth:`label`, each entry kept located by the map of its
        name."""
        calibration = self._calibration_for(threshold)
        if not (isinstance(vocabulary, tuple) and isinstance(vocabulary[1], Candidates)):
            vocabulary = self.tokenize(vocabulary)
        scores = self.score_tensor(images, vocabulary, batch_size, chunk_tokens)
        names = vocabulary[0].names
        if calibration is None:
            results = ranked(scores, names, topk, min_prob)
        else:
            results = []
            for row, raw in zip(calibration.presence(scores.numpy()).tolist(), scores.tolist()):
                pairs = sorted(zip(names, row, raw), key=lambda x: x[1], reverse=True)[:topk]
                keep = [
                    p >= min_prob and (threshold != "auto" or p >= calibration.threshold_for(n)) for n, p, _ in pairs
                ]
                results.append([Scored(n, p, s) for (n, p, s), k in zip(pairs, keep) if k])
        if not locate:
            return results
        located, start = [], 0
        for pixels, batch_sizes in self._batches(images, batch_size, sizes):
            found = results[start : start + len(pixels)]
            located += self.with_locations(pixels, batch_sizes, found, radius=radius, spread=spread, views=views)
            start += len(pixels)
        return located

    def map_labels(
        self,
        images: ImageInput | list[ImageInput],
        vocabulary: LabelMapper | Vocabulary | str | Path | list,
        topk: int = 10,
        min_prob: float = 0.0,
        keep_unmapped: bool = False,
        batch_size: int = 32,
        threshold: str | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Open-set labels (``topk`` branches, as :meth:`label`) mapped onto ``vocabulary`` by a ``LabelMapper``
        (give one to choose its threshold and methods), probabilities that land on one entry summed, sorted, none
        below ``min_prob``; labels that map nowhere dropped unless ``keep_unmapped``.

        With a calibration, an entry's probability is that at least one of the labels mapped to it is right
        (``1 - prod(1 - p)`` over their calibrated probabilities), its ``score`` their summed raw scores;
        ``threshold="auto"`` drops entries below their fitted threshold."""
        calibration = self._calibration_for(threshold)
        mapper = (
            vocabulary
            if isinstance(vocabulary, LabelMapper)
            else LabelMapper(Vocabulary.coerce(vocabulary), device=self.device)
        )
        found = self.label(images, topk, 0.0, batch_size)
        if calibration is None:
            return [mapper.map(labels, keep_unmapped, min_prob) for labels in found]
        results = []
        for labels in found:
            missed: dict[str, float] = {}  # entry -> probability that none of its labels is right
            raw: dict[str, float] = {}
            for pair, (hit, _) in zip(labels, mapper.map_labels([l for l, _ in labels])):
                if hit is not None or keep_unmapped:
                    key = mapper.vocabulary.entries[hit].name if hit is not None else pair.label
                    missed[key] = missed.get(key, 1.0) * (1 - pair.prob)
                    raw[key] = raw.get(key, 0.0) + pair.score
            pairs = sorted(((k, 1 - m, raw[k]) for k, m in missed.items()), key=lambda x: x[1], reverse=True)
            results.append(
                [
                    Scored(k, p, s)
                    for k, p, s in pairs
                    if p >= min_prob and (threshold != "auto" or p >= calibration.threshold_for(k))
                ]
            )
        return results

    def explain(
        self,
        images: ImageInput | list[ImageInput],
        labels: list[list[str]] | None = None,
        method: str = DEFAULT_METHOD,
        layer: int = -1,
        head: int = 0,
        topk: int = 10,
        min_prob: float = 0.0,
        batch_size: int = 32,
    ) -> list[list[LabelMap]]:
        """Where each label looks: for every image, a ``LabelMap`` (label, probability, patch grid) per label, the
        given ``labels`` (teacher-forced) or the predicted ones (one-shot sampling). ``method``: ``gradient`` (the
        default: gradient-weighted attention), ``mean``, ``rollout``, or ``head`` (one decoder ``layer`` and
        ``head``, as the official demo shows); see ``attention_maps``."""
        maps: list[list[LabelMap]] = []
        for i, pixels in enumerate(self._pixels(images, batch_size)):
            given = labels[i * batch_size : i * batch_size + len(pixels)] if labels is not None else None
            maps += explain(self.model, pixels, given, method, layer, head, topk, min_prob)
        return maps
