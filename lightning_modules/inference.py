"""How a model is run on images: the options ``nxtp label`` and ``nxtp serve`` share (``InferenceOptions``, which
also declares them on both command lines), the precision's autocast, and the labelling loop over image files
(``label_files``) with its JSON-lines and CSV writers.

torch is imported inside the functions that run a model: building a command's parser (``nxtp label --help``)
imports nothing heavy.

    options = InferenceOptions(device="cuda", precision="bf16", topk=5)
    recognizer = options.load("logs/default/version_0/checkpoints/last.ckpt")
    with open("labels.jsonl", "w") as out:
        for result in label_files(recognizer, image_paths(["photos/"]), options):
            write_jsonl(out, result)
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from datamodules.images import MAX_IMAGE_PIXELS, decode_image

from .locate import RADIUS, SPREAD, VIEWS

if TYPE_CHECKING:
    import torch

    from .attention_maps import LabelMap
    from .recognizer import Recognizer
    from .vocabulary import LabelMapper

# precision name -> torch dtype that autocast runs in (None: float32, autocast off)
PRECISIONS = {"32": None, "bf16": "bfloat16", "16": "float16"}
TOPK = 10  # labels (first tokens branched from) per image where no topk is given, as in Recognizer.label
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LOCATION_COLUMNS = ["x", "y", "x0", "y0", "x1", "y1"]  # --locate: the point and the box (boxes: JSON only)


def csv_header(calibrated: bool = False, located: bool = False) -> list[str]:
    """The CSV columns: a calibrated model's add the raw ``score``, located labels their point and box."""
    return [
        "image",
        "label",
        "prob",
        *(["score"] if calibrated else []),
        *(LOCATION_COLUMNS if located else []),
        "error",
    ]


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A field of ``InferenceOptions`` with its command-line help (and ``add_argument`` keywords such as
    ``choices``): the one definition of the option."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class InferenceOptions:
    """How a recognizer is loaded and run: each field is a command-line option (``--min-prob`` for ``min_prob``)
    whose help is the field's ``help``."""

    device: str = option("cpu", "where the model runs: cpu, cuda, cuda:1, mps")
    precision: str = option("32", "autocast dtype", choices=tuple(PRECISIONS))
    topk: int | None = option(None, f"first tokens to branch from (at most this many labels; default {TOPK})", type=int)
    min_prob: float = option(
        0.0,
        "drop labels below this probability (a calibrated model's: 0.5 keeps labels at least as likely right as not)",
        type=float,
    )
    threshold: str | None = option(
        None,
        "auto: also drop each label below its fitted threshold (a model calibrated by nxtp calibrate)",
        choices=("auto",),
    )
    sampler: str = option(
        "one-shot",
        "one-shot (NXTP's: every label decoded in parallel) or the paper's baselines greedy and beam (the label list "
        "generated as text)",
        choices=("one-shot", "greedy", "beam"),
    )
    beams: int = option(3, "beams of --sampler beam", type=int)
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS,
        "refuse larger images (width x height, read from the header), as data.max_image_pixels",
        type=int,
    )
    decode: str | None = option(
        None,
        "how image files are decoded, which changes the model's inputs: full (every pixel, as the reference "
        "preprocesses) or draft (JPEGs at least 4x the input on the short side at 1/2-1/8 scale: about twice as "
        "fast on photos, slightly different probabilities); default: what the model records (preprocessing.decode)",
        choices=("full", "draft"),
    )
    batch_size: int = option(32, "images the model runs at once", type=int)
    locate: bool = option(
        False,
        "also say where each label is: a point [x, y] and a box [x0, y0, x1, y1] in the image's own pixels (after "
        "its EXIF orientation; the box clipped to the centre crop the model sees), and boxes (one per region)",
    )
    locate_radius: int = option(
        RADIUS, "--locate: cells around the map's peak that the point and box come from", type=int
    )
    locate_spread: float = option(
        SPREAD, "--locate: a box is the centre of mass plus and minus this many standard deviations", type=float
    )
    locate_views: int = option(
        1,
        "--locate: 4 or 5 locate by a map twice as fine, the mean of the maps of the image shifted by half a patch "
        "(and mirrored), each view one more map pass (--locate-radius then counts half-patch cells)",
        type=int,
        choices=VIEWS,
    )

    def __post_init__(self) -> None:
        if self.locate_radius < 0 or self.locate_spread <= 0:
            raise ValueError(
                f"--locate-radius {self.locate_radius} / --locate-spread {self.locate_spread}: at least 0 cells, and "
                "a spread above 0"
            )
        if self.locate_views not in VIEWS:
            raise ValueError(f"--locate-views {self.locate_views}: one of {', '.join(map(str, VIEWS))}")
        if self.beams < 1:
            raise ValueError(f"--beams {self.beams}: beam search needs at least 1 beam")
        if self.sampler != "one-shot" and self.threshold is not None:
            raise ValueError(f"--threshold {self.threshold} needs --sampler one-shot, whose scores are calibrated")

    def locate_rule(self) -> dict[str, Any]:
        """How a label's map becomes a point and a box: the ``radius``, ``spread`` and ``views`` keywords of
        ``Recognizer.label``, ``score``, ``locate`` and ``with_locations``."""
        return {"radius": self.locate_radius, "spread": self.locate_spread, "views": self.locate_views}

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, notes: dict[str, str] | None = None, exclude: Iterable[str] = ()
    ) -> None:
        """Declare the options on ``parser``; ``notes`` add what an option means to this command to its help, and
        the fields in ``exclude`` are left out (``from_args`` then takes their defaults, or the caller's)."""
        notes = notes or {}
        for f in fields(cls):
            if f.name in exclude:
                continue
            kwargs = dict(f.metadata)
            kwargs["help"] = "; ".join(filter(None, [kwargs["help"], notes.get(f.name)]))
            flag = f.name.replace("_", "-")
            if isinstance(f.default, bool):  # a switch that turns the default around
                flag, kwargs["action"] = ("no-" + flag, "store_false") if f.default else (flag, "store_true")
            parser.add_argument(f"--{flag}", dest=f.name, default=f.default, **kwargs)
        if "decode" not in exclude:  # the flag of the versions that draft-decoded by default
            parser.add_argument(
                "--no-draft", dest="decode", action="store_const", const="full", help="the same as --decode full"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> InferenceOptions:
        """The options parsed by a parser that ``add_arguments`` declared them on, ``overrides`` taking precedence."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**(given | overrides))

    def load(self, checkpoint: str | Path, trust: bool = False, device: str | None = None) -> Recognizer:
        """``Recognizer.from_checkpoint`` with these options (on ``device`` instead of ``self.device`` if given)."""
        from .recognizer import Recognizer

        return Recognizer.from_checkpoint(
            checkpoint,
            device=device or self.device,
            trust=trust,
            max_image_pixels=self.max_image_pixels,
            decode=self.decode,
        )


def dtype(precision: str) -> torch.dtype | None:
    """The dtype a precision name (``PRECISIONS``) runs in under autocast; None for float32 (no autocast)."""
    import torch

    return getattr(torch, PRECISIONS[precision]) if PRECISIONS[precision] else None


def autocast(device: str | torch.device, precision: str):
    """The autocast context for a precision name on ``device`` (disabled for ``32``)."""
    import torch

    cast = dtype(precision)
    return torch.autocast(torch.device(device).type, dtype=cast, enabled=cast is not None)


def image_paths(inputs: Iterable[str], files_from: str | Path | None = None) -> list[Path]:
    """Files as given, glob patterns expanded, image files inside directories (recursively, sorted), and the
    paths listed one per line in ``files_from``."""
    items = list(inputs)
    if files_from:
        items += [line.strip() for line in Path(files_from).read_text().splitlines() if line.strip()]
    paths: list[Path] = []
    for item in items:
        if not Path(item).exists() and glob.has_magic(item):
            paths += [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        elif Path(item).is_dir():
            paths += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(Path(item))  # a missing file is reported as an error entry, like an unreadable one
    return paths


class ImageFiles:
    """Preprocessed images, a map-style dataset for a DataLoader: read as in training (``decode_image``: upright
    RGB, at most ``max_image_pixels``, large JPEGs draft-decoded for a tower of ``input_size``, None: every pixel
    decoded); an unreadable file yields its error instead of pixels."""

    def __init__(
        self,
        paths: list[Path],
        transform,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        input_size: int | tuple[int, int] | None = None,
    ) -> None:
        self.paths, self.transform = paths, transform
        self.max_image_pixels, self.input_size = max_image_pixels, input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """``(path, pixels, (width, height) of the upright image, None)``, or ``(path, None, None, error)``."""
        try:
            image = decode_image(self.paths[i], self.max_image_pixels, self.input_size)
            return str(self.paths[i]), self.transform(image), image.size, None
        except Exception as e:  # reported, never fatal: one bad file must not cost the others
            return str(self.paths[i]), None, None, f"{type(e).__name__}: {e}"


@dataclass
class Labelled:
    """One image's result: its labels ``(label, probability)`` sorted by probability, or the error that kept it from
    being read; with ``label_files(explain=...)`` also where each label looks (``maps``) and the pixels the model
    saw (for ``attention_maps.pixels_to_image``)."""

    image: str | None
    labels: list[tuple[str, float]] | None = None
    error: str | None = None
    maps: list[LabelMap] | None = None
    pixels: Any = None  # Tensor [3, H, W]

    def to_json(self) -> dict[str, Any]:
        """``{"image", "labels": [{"label", "prob"}]}`` or ``{"image", "error"}``: ``nxtp label``'s JSON line and
        ``nxtp serve``'s answer (which leaves ``image`` out where the request named no file). A calibrated model's
        labels also give their raw one-shot ``score``, located ones (``--locate``) their ``point``, ``box`` and
        ``boxes`` (``locate.Location``)."""
        entry = {} if self.image is None else {"image": self.image}
        if self.error:
            return entry | {"error": self.error}
        return entry | {"labels": [_label_json(x) for x in self.labels]}


def _label_json(pair: tuple[str, float]) -> dict[str, Any]:
    entry = {"label": pair[0], "prob": pair[1]}
    if getattr(pair, "score", None) is not None:
        entry["score"] = pair.score
    if getattr(pair, "location", None) is not None:
        entry |= pair.location.to_json()
    return entry


def label_files(
    recognizer: Recognizer,
    paths: Iterable[str | Path],
    options: InferenceOptions | None = None,
    *,
    vocabulary: tuple | None = None,
    mapper: LabelMapper | None = None,
    keep_unmapped: bool = False,
    chunk_tokens: int = 2048,
    explain: str | None = None,
    layer: int = -1,
    head: int = 0,
    workers: int = 0,
) -> Iterator[Labelled]:
    """Label image files in batches of ``options.batch_size`` under ``options.precision``'s autocast, read by
    ``workers`` DataLoader processes; yield a ``Labelled`` per file as each batch ends (its unreadable files first).

    Free labels (``Recognizer.label``: ``options.topk`` branches, default ``TOPK``) unless ``vocabulary`` (what
    ``Recognizer.tokenize`` returns: every entry scored exactly, the ``topk`` most probable, default all) or
    ``mapper`` (a prepared ``LabelMapper``: free labels mapped onto its vocabulary, unmapped ones dropped unless
    ``keep_unmapped``). ``explain``: an ``attention_maps`` method; each result then holds the maps of its labels
    (teacher-forced; ``layer`` and ``head`` for the ``head`` method). ``options.locate``: each label is a
    ``locate.Located`` (from the ``explain`` method's maps, default gradient), in the pixels of its upright file.
    """
    import torch

    options = options or InferenceOptions()
    rule = options.locate_rule()
    locate_now = options.locate and not explain
    if options.locate and mapper is not None:
        raise ValueError("--locate works with free labels and --vocabulary, not --map-to (a mapped entry has no map)")
    files = ImageFiles(
        list(paths), recognizer.model.eval_transform, recognizer.max_image_pixels, recognizer.draft_input_size
    )
    loader = torch.utils.data.DataLoader(files, batch_size=options.batch_size, num_workers=workers, collate_fn=list)
    topk, min_prob, batch_size, threshold = options.topk, options.min_prob, options.batch_size, options.threshold
    branches = TOPK if topk is None else topk
    for batch in loader:
        yield from (Labelled(path, error=error) for path, _, _, error in batch if error)
        good = [(path, pixels, size) for path, pixels, size, error in batch if error is None]
        if not good:
            continue
        pixels, sizes = [p for _, p, _ in good], [size for _, _, size in good]
        # Without pictures, labels are located as they are found (sharing the sampler's pass over the image);
        # with them, the maps are made once for both.
        where = {"locate": True, "sizes": sizes, **rule} if locate_now else {}
        with autocast(recognizer.device, options.precision):
            if vocabulary is not None:
                results = recognizer.score(
                    pixels, vocabulary, topk, min_prob, batch_size, chunk_tokens, threshold, **where
                )
            elif mapper is not None:
                results = recognizer.map_labels(
                    pixels, mapper, branches, min_prob, keep_unmapped, batch_size, threshold
                )
            else:
                results = recognizer.label(
                    pixels, branches, min_prob, batch_size, threshold, options.sampler, options.beams, **where
                )
        maps = [None] * len(good)
        if explain:  # the maps of the labels found, teacher-forced (outside autocast: gradient maps need autograd)
            labels = [[label for label, _ in r] for r in results]
            maps = recognizer.explain(pixels, labels, explain, layer, head, batch_size=batch_size)
            if options.locate:
                stacked = torch.stack(pixels)
                results = recognizer.with_locations(stacked, sizes, results, maps, **rule)
        for (path, image, _), labels, label_maps in zip(good, results, maps):
            yield Labelled(path, labels, maps=label_maps, pixels=image if explain else None)


def write_jsonl(stream: TextIO, result: Labelled) -> None:
    """Write a result as one JSON line (``Labelled.to_json``), flushed: a reader sees each image as it is done."""
    stream.write(json.dumps(result.to_json()) + "\n")
    stream.flush()


def write_csv(stream: TextIO, result: Labelled, calibrated: bool = False, located: bool = False) -> None:
    """Write a result as CSV rows (``csv_header(calibrated, located)``'s columns; the header is the caller's), one
    per label; an image with no label left or with an error gets one row with an empty label. Flushed, as
    ``write_jsonl``."""
    width = len(csv_header(calibrated, located))
    rows = []
    for pair in result.labels or []:
        row = [result.image, pair[0], pair[1]]
        if calibrated:
            row.append(getattr(pair, "score", ""))
        if located:
            location = pair.location
            row += [round(v, 1) for v in (*location.point, *location.box)]
        rows.append([*row, ""])
    csv.writer(stream).writerows(rows or [[result.image, *[""] * (width - 2), result.error or ""]])
    stream.flush()
