"""What to convert: the images of a source and their caption or labels, as ``Item``s, and what cannot be used, as
``Reject``s naming the file. Listing reads no image (that is ``writing``'s work); it reads every sidecar and row.

Four forms (``FORMS``):

* ``folder``: images with sidecars of the same name, in any subfolder: ``.txt`` (a caption, or with
  ``txt="tags"`` comma-separated tags, as many tagging tools write), ``.tags`` (one label per line or
  comma-separated), ``.json`` (a ``labels`` list; other fields are kept as the sample's metadata);
* ``table``: a CSV, TSV or JSONL file with an image path column (relative to the file) and a caption and/or tags
  column;
* ``coco``: a COCO captions file (the image's captions joined) or instances file (the category names of the
  image's objects are its labels);
* ``imagefolder``: ``ROOT/CLASS/.../image``, the class folder's name being the label ("stop_sign" -> "stop sign").
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.labels import LabelError, decode_caption, given_labels, normalize_labels, split_tags

# Files read as images (what PIL opens; the shards keep JPEG, PNG and WebP as they are, see ``writing``).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_SUFFIXES = (".txt", ".tags", ".json")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# The forms, with the options each one's reader takes.
OPTIONS = {
    "folder": ("txt",),
    "table": ("image_column", "caption_column", "tags_column"),
    "coco": ("images",),
    "imagefolder": (),
}
FORMS = tuple(OPTIONS)
# Column names tried, in order, when none is given.
COLUMNS = {
    "image": ("image", "image_path", "path", "file", "filename", "file_name"),
    "caption": ("caption", "text", "txt"),
    "tags": ("tags", "labels", "label"),
}
# Why a source's entry was skipped while listing (besides ``LABEL_ERRORS``: sidecars, tags; ``no image``: the
# image file is not there, or a sidecar has no image).
LISTING_ERRORS = ("no image", "duplicate key", "malformed row")


@dataclass(frozen=True)
class Item:
    """One image to convert. ``key`` is unique in the source; ``caption`` and/or ``labels`` say what it shows;
    ``meta`` goes to the sample's ``.json``; ``origin`` is where it was described (a sidecar, a table's line)."""

    key: str
    image: Path
    caption: str | None = None
    labels: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


@dataclass(frozen=True)
class Reject:
    """An entry of the source that is not converted: ``reason``, the offending ``file`` and what was wrong."""

    reason: str
    file: str
    detail: str = ""


def detect_form(source: Path) -> str:
    """The form of ``source``: a table or COCO file by its suffix, a folder with sidecars, else an ImageFolder."""
    if source.is_file():
        if source.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        if source.suffix.lower() == ".json":
            return "coco"
        raise ValueError(f"{source}: not a .csv, .tsv, .jsonl or COCO .json file")
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    has_sidecars = any(p.suffix.lower() in SIDECAR_SUFFIXES for p in _files(source))
    return "folder" if has_sidecars else "imagefolder"


def read_source(source: Path, form: str = "auto", **options: Any) -> Iterator[Item | Reject]:
    """The items of ``source`` (see the module docstring), in a fixed order, each key once: a later entry with
    a key already seen is a ``duplicate key`` reject. ``options`` go to the form's reader (``reader_options``)."""
    form = detect_form(source) if form == "auto" else form
    readers = {"folder": read_folder, "table": read_table, "coco": read_coco, "imagefolder": read_imagefolder}
    seen: dict[str, str] = {}
    for entry in readers[form](source, **reader_options(form, options)):
        if isinstance(entry, Item):
            if entry.key in seen:
                entry = Reject("duplicate key", str(entry.image), f"key {entry.key!r} is also {seen[entry.key]}")
            else:
                seen[entry.key] = str(entry.image)
        yield entry


def reader_options(form: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that the reader of ``form`` takes (``OPTIONS``) and that are set."""
    if form not in OPTIONS:
        raise ValueError(f"unknown source form {form!r}: use one of {', '.join(FORMS)} or auto")
    return {k: v for k, v in options.items() if k in OPTIONS[form] and v is not None}


def key_of(relative: Path) -> str:
    """A sample key for an image at ``relative``: its path without the suffix; dots become ``_`` as WebDataset
    reads the first dot of a file name as the start of its extension."""
    return relative.with_suffix("").as_posix().replace(".", "_")


def _files(root: Path) -> list[Path]:
    """Every file below ``root``, sorted, hidden files and folders left out."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_folder(root: Path, txt: str = "captions") -> Iterator[Item | Reject]:
    """Images with sidecars of the same name (``a.jpg`` + ``a.txt`` / ``a.tags`` / ``a.json``), recursively;
    ``txt``: ``captions`` or ``tags`` (what a ``.txt`` holds)."""
    if txt not in ("captions", "tags"):
        raise ValueError(f"txt={txt!r}: use captions or tags")
    files = _files(root)
    if not files:
        raise ValueError(f"{root} holds no files")
    by_stem: dict[Path, dict[str, Path]] = defaultdict(dict)
    for p in files:
        by_stem[p.with_suffix("")][p.suffix.lower()] = p
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    used = {p.with_suffix("") for p in images}
    for stem, group in by_stem.items():  # sidecars of no image: counted, so that a typo in a name shows
        if stem not in used:
            for suffix in SIDECAR_SUFFIXES:
                if suffix in group:
                    yield Reject("no image", str(group[suffix]), "a sidecar with no image of the same name")
    for image in images:
        sidecars = by_stem[image.with_suffix("")]
        read = {s: sidecars[s].read_bytes() for s in SIDECAR_SUFFIXES if s in sidecars}
        origin = str(next(iter(sidecars[s] for s in SIDECAR_SUFFIXES if s in sidecars), image))
        tags = read.get(".tags", read.get(".txt") if txt == "tags" else None)
        try:
            labels = given_labels(tags, read.get(".json"))
            caption = decode_caption(read[".txt"]) if txt == "captions" and ".txt" in read else None
        except LabelError as e:
            yield Reject(e.reason, origin, str(e))
            continue
        if labels is None and caption is None:
            yield Reject("no caption", str(image), "no .txt, .tags or .json with labels next to it")
            continue
        meta = {}
        if ".json" in read:
            record = json.loads(read[".json"])  # given_labels has read it
            meta = {k: v for k, v in record.items() if k != "labels"} if isinstance(record, dict) else {"meta": record}
        yield Item(key_of(image.relative_to(root)), image, caption, _labels(labels), meta, origin)


def read_imagefolder(root: Path) -> Iterator[Item | Reject]:
    """``ROOT/CLASS/.../image``: the class folder's name is the label, ``_`` read as a space."""
    files = _files(root)
    if not files:
        raise ValueError(f"{root} holds no files")
    for image in files:
        relative = image.relative_to(root)
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            yield Reject("no image", str(image), "not an image file (by its suffix)")
        elif len(relative.parts) < 2:
            yield Reject("no labels", str(image), "an image outside any class folder")
        else:
            labels = normalize_labels([relative.parts[0].replace("_", " ")])
            yield Item(key_of(relative), image, None, tuple(labels), {}, str(image))


def _column(fields: list[str], given: str | None, kind: str, source: Path) -> str | None:
    if given is not None:
        if given not in fields:
            raise ValueError(f"{source}: no column {given!r} (columns: {', '.join(fields)})")
        return given
    return next((name for name in COLUMNS[kind] if name in fields), None)


def _rows(source: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV, TSV or JSONL file."""
    delimiter = TABLE_SUFFIXES[source.suffix.lower()]
    with source.open(encoding="utf-8", newline="") as f:
        if delimiter is not None:
            reader = csv.DictReader(f, delimiter=delimiter)
            for row in reader:
                yield reader.line_num, row
        else:
            for line_num, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield line_num, json.loads(line)
                    except ValueError as e:
                        yield line_num, {"__error__": str(e)}


def read_table(
    source: Path, image_column: str | None = None, caption_column: str | None = None, tags_column: str | None = None
) -> Iterator[Item | Reject]:
    """A CSV, TSV or JSONL file: an image path (relative to the file) and a caption and/or tags per row; tags are
    comma-separated (or a list, in JSONL). Columns are found by name (``COLUMNS``) unless given."""
    columns: tuple[str | None, str | None, str | None] | None = None
    try:
        for line, row in _rows(source):
            where = f"{source}:{line}"
            if not isinstance(row, dict) or "__error__" in row:
                yield Reject("malformed row", where, f"not a JSON object: {row.get('__error__', row)!r:.200}")
                continue
            if columns is None:  # from the header, or the first JSON object
                fields = list(row)
                columns = (
                    _column(fields, image_column, "image", source),
                    _column(fields, caption_column, "caption", source),
                    _column(fields, tags_column, "tags", source),
                )
                if columns[0] is None or columns[1] is None and columns[2] is None:
                    raise ValueError(
                        f"{source}: needs an image column and a caption or tags column (found {', '.join(fields)}; "
                        f"name them with --image-column, --caption-column, --tags-column)"
                    )
            image_col, caption_col, tags_col = columns
            path = row.get(image_col)
            if not isinstance(path, str) or not path.strip():
                yield Reject("malformed row", where, f"no image path in column {image_col!r}")
                continue
            image = source.parent / path.strip()
            if not image.is_file():
                yield Reject("no image", where, f"{image} does not exist")
                continue
            caption, tags = row.get(caption_col) if caption_col else None, row.get(tags_col) if tags_col else None
            try:
                labels = _table_tags(tags)
                caption = decode_caption(caption.encode()) if isinstance(caption, str) and caption.strip() else None
            except LabelError as e:
                yield Reject(e.reason, where, str(e))
                continue
            if labels is None and caption is None:
                yield Reject("no caption", where, f"neither {caption_col!r} nor {tags_col!r} has a value")
                continue
            yield Item(key_of(Path(path.strip())), image, caption, _labels(labels), {}, where)
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 ({e})") from e
    if columns is None:
        raise ValueError(f"{source} has no rows")


def _table_tags(tags: Any) -> list[str] | None:
    if tags is None or isinstance(tags, str) and not tags.strip():
        return None
    if isinstance(tags, str):
        return normalize_labels(split_tags(tags))
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        return normalize_labels(tags)
    raise LabelError("malformed labels", f"tags are neither text nor a list of strings: {tags!r:.200}")


def _labels(labels: list[str] | None) -> tuple[str, ...] | None:
    return None if labels is None else tuple(labels)


def read_coco(source: Path, images: Path | None = None) -> Iterator[Item | Reject]:
    """A COCO captions or instances file: one item per image (key: the image id, 12 digits), with its captions
    joined by ". " as the caption, or its objects' category names (in annotation order) as its labels; ``meta``
    holds ``image_id``, ``file_name`` and ``captions`` or ``categories``. ``images``: the image folder (default: the
    file's own)."""
    data = json.loads(source.read_text(encoding="utf-8"))
    images = source.parent if images is None else images
    files = {img["id"]: img["file_name"] for img in data["images"]}
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    captions: dict[int, list[str]] = defaultdict(list)
    categories: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        if "caption" in ann:
            captions[ann["image_id"]].append(" ".join(ann["caption"].split()))
        elif "category_id" in ann:
            categories[ann["image_id"]].append(names[ann["category_id"]])
    instances = bool(names)
    for image_id in sorted(files):
        path = images / files[image_id]
        meta: dict[str, Any] = {"image_id": image_id, "file_name": files[image_id]}
        if not path.is_file():
            yield Reject("no image", str(path), f"listed in {source} as image {image_id}")
        elif instances:
            labels = normalize_labels(categories[image_id])
            if not labels:
                yield Reject("no labels", str(path), f"image {image_id} has no objects in {source}")
            else:
                yield Item(f"{image_id:012d}", path, None, tuple(labels), {**meta, "categories": labels}, str(source))
        elif not captions[image_id]:
            yield Reject("no caption", str(path), f"image {image_id} has no captions in {source}")
        else:
            caption = ". ".join(captions[image_id])
            yield Item(f"{image_id:012d}", path, caption, None, {**meta, "captions": captions[image_id]}, str(source))
