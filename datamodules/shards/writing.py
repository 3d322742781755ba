"""Writing a source's items (``sources``) as training shards: ``OUT/train`` and ``OUT/val``, each
``shard-NNNNNN.tar`` of ``shard_size`` samples, resumable and byte-identical for the same source and options.

* the validation split is decided per key, by a hash of the key and the seed (``split_of``): stable when images
  are added, whatever their order;
* every image is decoded, so a broken or oversized one is rejected here, naming its file, not in training; JPEG,
  PNG and WebP are stored as they are (EXIF orientation included, which the reader applies), other formats as PNG,
  and images larger than ``max_side`` are turned upright, shrunk (keeping their aspect) and stored as JPEG;
* a shard is written under a temporary name and renamed once complete, then ``nxtp-shards.json`` records how far
  each split got: an interrupted run leaves no half shard, and the same command resumes after the last complete
  shard, as an uninterrupted run would have gone on. When done, that file is the summary.

A sample is ``KEY.jpg`` (or ``.png``, ``.webp``), ``KEY.txt`` (a caption), ``KEY.tags`` (given labels, one per
line) and ``KEY.json`` (``source``: the image's path, and the source's metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.images import MAX_IMAGE_PIXELS, ImageError, decode_image
from datamodules.labels import LabelError, check_labels, extract_labels

from .sources import Item, Reject, detect_form, read_source, reader_options

SPLITS = ("train", "val")
STATE_FILE = "nxtp-shards.json"
SHARD = "shard-{:06d}.tar"
PARTIAL = ".partial"  # suffix of a shard being written (and of the state file being replaced)
# Stored as they are: the formats the training reader takes (``webdataset.IMAGE_EXTENSIONS``), by PIL's name.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95
_MTIME = 0  # tar member times: the same shards on every run


class ConversionError(RuntimeError):
    """Nothing could be written, or the output folder cannot be written into; ``summary`` is what was found."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """``val`` for about ``val_fraction`` of the keys, chosen by a hash of the key and ``seed``; else ``train``."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def encode_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int | None = None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of the image at ``path`` as a shard stores it (see the module docstring).

    Raises:
        ImageError: empty, corrupt, or more than ``max_pixels`` pixels (read from its header).
        FileNotFoundError: no file at ``path``.
    """
    data = path.read_bytes()
    image = decode_image(data, max_pixels)  # upright RGB, or ImageError
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return "jpg", _encode(image, "JPEG", quality=JPEG_QUALITY)
    with Image.open(io.BytesIO(data)) as original:  # the header again: decode_image does not say the format
        fmt = original.format
    return (KEPT_FORMATS[fmt], data) if fmt in KEPT_FORMATS else ("png", _encode(image, "PNG"))


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _sample(item: Item, max_pixels: int, max_side: int | None) -> tuple[dict[str, Any], list[str]]:
    """The sample to write and its labels (given, else the caption's nouns), or ``LabelError`` / ``ImageError``."""
    if item.labels is not None:
        labels = check_labels(list(item.labels))
        if not labels:
            raise LabelError("no labels", "an empty list of labels")
    else:
        labels = extract_labels(item.caption or "")
        if not labels:
            raise LabelError("no labels", "the caption names no object")
    ext, image = encode_image(item.image, max_pixels, max_side)
    sample = {"__key__": item.key, ext: image, "json": json.dumps({"source": str(item.image), **item.meta}).encode()}
    if item.caption is not None:
        sample["txt"] = item.caption.encode()
    if item.labels is not None:
        sample["tags"] = "\n".join(labels).encode()
    return sample, labels


def _fingerprint(keys: list[str]) -> hashlib._Hash:
    """A hash of the keys done, which a resumed run checks: its items up to there must be the same."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\n")
    return digest


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def _ours(out: Path) -> list[Path]:
    """What a conversion writes into ``out``."""
    found = [out / STATE_FILE, out / (STATE_FILE + PARTIAL)]
    for split in SPLITS:
        found += sorted((out / split).glob("shard-*.tar")) + sorted((out / split).glob(f".shard-*.tar{PARTIAL}"))
    return [p for p in found if p.exists()]


def _prepare(out: Path, settings: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The state to resume from, or None for a fresh start; refuses a folder that holds something else."""
    state_path = out / STATE_FILE
    if force:
        for path in _ours(out):
            path.unlink()
        return None
    if not out.exists() or not any(out.iterdir()):
        return None
    if not state_path.is_file():
        raise ConversionError(f"{out} is not empty and holds no conversion to resume: choose another --out, or --force")
    state = json.loads(state_path.read_text())
    if state["settings"] != settings:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        raise ConversionError(
            f"{out} holds a conversion with other options (was, now: {diff}): run it as it was to resume, "
            f"or --force to start over"
        )
    for split in SPLITS:
        for partial in (out / split).glob(f".shard-*.tar{PARTIAL}"):  # the half shard of an interrupted run
            partial.unlink()
    return state


class _SplitWriter:
    """One split's shards: samples go into a temporary shard, renamed when full or at the end, and the state file
    records how far the split's items were done at that moment (``next``), with what was written and rejected."""

    def __init__(
        self, out: Path, split: str, keys: list[str], shard_size: int, state: dict[str, Any], save: Callable[[], None]
    ) -> None:
        self.folder, self.keys, self.shard_size, self.save = out / split, keys, shard_size, save
        self.state = state  # this split's entry of the state file: shards, next, written, labels, rejects, fingerprint
        self.fingerprint = _fingerprint(keys[: state["next"]])
        if state.get("fingerprint", self.fingerprint.hexdigest()) != self.fingerprint.hexdigest():
            raise ConversionError(f"the {split} images listed differ from the ones written: the source changed")
        self.labels = Counter(state["labels"])
        self.rejects: list[dict[str, str]] = list(state["rejects"])
        self.written, self.in_shard = state["written"], 0
        self.tar = self.file = None

    def write(self, sample: dict[str, Any], labels: list[str]) -> None:
        from webdataset import TarWriter  # heavy: imported when writing

        if self.tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = self._partial().open("wb")
            self.tar = TarWriter(self.file, encoder=False, mtime=_MTIME)
        self.tar.write(sample)
        self.in_shard += 1
        self.written += 1
        self.labels.update(labels)

    def reject(self, reason: str, file: str, detail: str) -> None:
        self.rejects.append({"reason": reason, "file": file, "detail": detail})

    def done(self, next_item: int, last: bool = False) -> None:
        """Items up to ``next_item`` are done: close the shard if it is full (or ``last``) and record it."""
        if self.tar is not None and (self.in_shard >= self.shard_size or last):
            self.tar.close()
            self.file.close()
            os.replace(self._partial(), self.folder / SHARD.format(self.state["shards"]))
            self.tar = self.file = None
            self.state["shards"] += 1
            self.in_shard = 0
        if self.in_shard == 0:  # nothing pending: the state may move on
            for key in self.keys[self.state["next"] : next_item]:
                self.fingerprint.update(key.encode() + b"\n")
            self.state.update(next=next_item, written=self.written, labels=dict(self.labels), rejects=self.rejects)
            self.state["fingerprint"] = self.fingerprint.hexdigest()
            self.save()

    def abandon(self) -> None:
        """An error stopped the run: drop the shard being written (the next run writes it again)."""
        if self.tar is not None:
            self.tar.close()  # closes the tar stream before its file, which is then thrown away
            self.file.close()
            self._partial().unlink(missing_ok=True)

    def _partial(self) -> Path:
        return self.folder / f".{SHARD.format(self.state['shards'])}{PARTIAL}"


def convert(
    source: str | Path,
    out: str | Path,
    form: str = "auto",
    val_fraction: float = 0.05,
    seed: int = 0,
    max_side: int | None = None,
    shard_size: int = 1000,
    max_pixels: int = MAX_IMAGE_PIXELS,
    force: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Write the images of ``source`` and their labels as shards in ``out/train`` and ``out/val``; return the summary
    (what ``nxtp-shards.json`` holds): ``written`` and ``shards`` per split, ``labels`` (label: count), ``rejects``
    (``reason``, ``file``, ``detail``) and ``rejected`` (reason: count).

    Args:
        source: a folder, a CSV/TSV/JSONL file or a COCO JSON file (see ``sources``); ``form`` says which
            (``auto``: by what it is). ``options`` go to its reader (``txt``, columns, COCO ``images``).
        out: the output folder; it must be empty or hold this same conversion (which is resumed), unless ``force``
            (this command's earlier output in it is deleted first).
        val_fraction: share of the images in the validation split, chosen by ``split_of(key, seed, ...)``.
        max_side: shrink larger images to this many pixels on their long side.
        shard_size: samples per shard.
        max_pixels: reject images with more pixels, from their header.
        progress: show a progress bar (tqdm) on stderr.

    Raises:
        ConversionError: ``out`` holds something else, or nothing could be written (with the summary so far).
    """
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    if shard_size < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1 and val_fraction={val_fraction} in [0, 1)")
    form = detect_form(source) if form == "auto" else form
    options = reader_options(form, options)
    entries = list(read_source(source, form, **options))
    listed = [e for e in entries if isinstance(e, Reject)]
    items: dict[str, list[Item]] = {split: [] for split in SPLITS}
    for item in entries:
        if isinstance(item, Item):
            items[split_of(item.key, seed, val_fraction)].append(item)
    settings = {
        "source": str(source.resolve()),
        "form": form,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(options.items())},
        "val_fraction": val_fraction,
        "seed": seed,
        "max_side": max_side,
        "shard_size": shard_size,
        "max_pixels": max_pixels,
    }
    if not any(items.values()):
        summary = _summary(settings, {}, listed)
        raise ConversionError(f"{source}: no image to write ({_reasons(summary)})", summary)
    state = _prepare(out, settings, force)
    if state is None:
        empty = {"shards": 0, "next": 0, "written": 0, "labels": {}, "rejects": []}
        state = {"settings": settings, "complete": False, "splits": {split: dict(empty) for split in SPLITS}}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        _save(out / STATE_FILE, state)

    try:  # resuming is only right where the items done before are the same ones
        writers = {
            s: _SplitWriter(out, s, [i.key for i in items[s]], shard_size, state["splits"][s], save) for s in SPLITS
        }
    except ConversionError as e:
        raise ConversionError(f"{source} changed since {out} was started ({e}): --force to start over") from None
    total = sum(map(len, items.values()))
    start = sum(state["splits"][s]["next"] for s in SPLITS)
    with tqdm(total=total, initial=start, unit="img", desc=f"shards {out}", disable=not progress) as bar:
        try:
            for split, writer in writers.items():
                for index in range(writer.state["next"], len(items[split])):
                    item = items[split][index]
                    try:
                        writer.write(*_sample(item, max_pixels, max_side))
                    except (LabelError, ImageError) as e:
                        writer.reject(e.reason, str(item.image), str(e))
                    except (FileNotFoundError, IsADirectoryError) as e:
                        writer.reject("no image", str(item.image), str(e))
                    writer.done(index + 1)
                    bar.update()
                writer.done(len(items[split]), last=True)
        except BaseException:
            for writer in writers.values():
                writer.abandon()
            raise
    summary = _summary(settings, state["splits"], listed)
    state.update(complete=True, **{k: v for k, v in summary.items() if k != "settings"})
    _save(out / STATE_FILE, state)
    if not sum(summary["written"].values()):
        raise ConversionError(f"{source}: every image was rejected ({_reasons(summary)})", summary)
    return summary


def _summary(settings: dict[str, Any], splits: dict[str, Any], listed: list[Reject]) -> dict[str, Any]:
    rejects = [{"reason": r.reason, "file": r.file, "detail": r.detail} for r in listed]
    labels: Counter[str] = Counter()
    for entry in splits.values():
        rejects += entry["rejects"]
        labels.update(entry["labels"])
    return {
        "settings": settings,
        "written": {s: splits[s]["written"] for s in splits},
        "shards": {s: splits[s]["shards"] for s in splits},
        "labels": dict(labels.most_common()),
        "rejects": rejects,
        "rejected": dict(Counter(r["reason"] for r in rejects).most_common()),
    }


def _reasons(summary: dict[str, Any]) -> str:
    rejected = summary["rejected"]
    return ", ".join(f"{n} {reason}" for reason, n in rejected.items()) or "nothing found"


def shard_patterns(out: str | Path, summary: dict[str, Any]) -> dict[str, str]:
    """The ``data.<split>_shards`` value of each split that has shards: a brace pattern over its shard files."""
    patterns = {}
    for split, n in summary["shards"].items():
        if n:
            last = SHARD.format(n - 1)[len("shard-") : -len(".tar")]
            name = SHARD.format(0) if n == 1 else f"shard-{{{SHARD.format(0)[6:-4]}..{last}}}.tar"
            patterns[split] = str(Path(out) / split / name)
    return patterns


def format_summary(out: str | Path, summary: dict[str, Any], top: int = 20, examples: int = 5) -> str:
    """The summary for people: images and shards written, the ``top`` labels, rejects by reason with up to
    ``examples`` files each, and the ``--data.*_shards`` options to train on the result."""
    written, shards = summary["written"], summary["shards"]
    parts = [f"{s} {written[s]} in {shards[s]} shard{'s' * (shards[s] != 1)}" for s in written if written[s]]
    lines = [f"wrote {sum(written.values())} images ({', '.join(parts) or 'none'}) to {out}"]
    labels = summary["labels"]
    if labels:
        shown = ", ".join(f"{label} {n}" for label, n in list(labels.items())[:top])
        lines.append(f"labels (top {min(top, len(labels))} of {len(labels)}): {shown}")
    if summary["rejects"]:
        lines.append(f"rejected {len(summary['rejects'])}:")
        for reason, n in summary["rejected"].items():
            files = [r for r in summary["rejects"] if r["reason"] == reason]
            lines.append(f"  {reason}: {n}")
            lines += [f"    {r['file']}: {r['detail']}" for r in files[:examples]]
            if n > examples:
                lines.append(f"    ... and {n - examples} more (all in {Path(out) / STATE_FILE})")
    patterns = shard_patterns(out, summary)
    if patterns:
        options = " ".join(f"--data.{split}_shards '{pattern}'" for split, pattern in patterns.items())
        lines.append(f"train with: nxtp fit ... {options}")
    return "\n".join(lines)
