"""``nxtp label``: name the objects in image files, as JSON lines or CSV; or score a closed vocabulary exactly
(``--vocabulary``), or map the free labels onto one (``--map-to``), in the same output format."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from datamodules.images import MAX_IMAGE_PIXELS, decode_image

from ..attention_maps import DEFAULT_METHOD, METHODS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(inputs: list[str], files_from: str | None = None) -> list[Path]:
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


class ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images for ``nxtp label``, read as in training (``decode_image``: upright RGB, at most
    ``max_image_pixels``, large JPEGs decoded at reduced scale for a tower of ``input_size``, None: full scale);
    an unreadable file yields its error instead of pixels."""

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
        try:
            image = decode_image(self.paths[i], self.max_image_pixels, self.input_size)
            return str(self.paths[i]), self.transform(image), None
        except Exception as e:  # reported, never fatal: one bad file must not cost the others
            return str(self.paths[i]), None, f"{type(e).__name__}: {e}"


class LabelWriter:
    """Writes ``nxtp label`` results as JSON lines or CSV (one row per label) to a file or stdout."""

    def __init__(self, fmt: str, output: str | None) -> None:
        self.stream = open(output, "w", newline="") if output else sys.stdout
        self.csv = csv.writer(self.stream) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["image", "label", "prob", "error"])

    def write(self, image: str, labels: list[tuple[str, float]] | None = None, error: str | None = None) -> None:
        if self.csv:
            rows = [[image, label, prob, ""] for label, prob in labels or []] or [[image, "", "", error or ""]]
            self.csv.writerows(rows)
        else:
            entry = (
                {"image": image, "error": error}
                if error
                else {"image": image, "labels": [{"label": l, "prob": p} for l, p in labels]}
            )
            self.stream.write(json.dumps(entry) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


def label_main(argv: list[str]) -> int:
    """``nxtp label``: labels sorted by probability for every image, as JSON lines (default) or CSV."""
    parser = argparse.ArgumentParser(prog="nxtp label", description="Name the objects in images.")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a Lightning checkpoint (.ckpt) written by `nxtp fit`, or a folder written by "
        "`nxtp export` / `nxtp import-official`",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let a .ckpt's pickle create any Python object, which can run code: only for files you "
        "trust (by default only what the project's own checkpoints contain is loaded)",
    )
    parser.add_argument(
        "--topk",
        type=int,
        help="first tokens to branch from (at most this many labels; default 10); "
        "with --vocabulary, the most probable entries to print (default all)",
    )
    parser.add_argument(
        "--min-prob", type=float, default=0.0, help="drop labels below this probability (with --map-to: after mapping)"
    )
    closed = parser.add_mutually_exclusive_group()
    closed.add_argument(
        "--vocabulary",
        metavar="FILE",
        help="score every entry of this vocabulary exactly instead of naming objects freely: one label "
        'per line, or .json / .jsonl entries {"name": ..., "synonyms": [...]}',
    )
    closed.add_argument(
        "--map-to",
        metavar="FILE",
        help="name objects freely, then map each label onto an entry of "
        "this vocabulary (same file formats), summing probabilities",
    )
    parser.add_argument(
        "--map-by",
        nargs="+",
        choices=["wordnet", "embedding"],
        help="--map-to: how a label that is no entry's name is mapped, in this order (default both; "
        "WordNet where its noun data is found: `python -m nltk.downloader wordnet`)",
    )
    parser.add_argument(
        "--map-threshold",
        type=float,
        default=0.6,
        help="--map-to: the least sentence-embedding cosine similarity that maps a label",
    )
    parser.add_argument(
        "--keep-unmapped", action="store_true", help="--map-to: keep labels that map to no entry (default: drop them)"
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=2048,
        help="--vocabulary: the most vocabulary tokens in one forward over a batch (lower it to save memory)",
    )
    parser.add_argument(
        "--attention-maps",
        metavar="DIR",
        help="also write where each label looks: per image and label a PNG overlay, the patch grid "
        "(.npy) and a JSON file, in DIR",
    )
    parser.add_argument(
        "--attention-method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="how the map is made (default: gradient-weighted attention; head: one decoder head)",
    )
    parser.add_argument("--attention-layer", type=int, default=-1, help="--attention-method head: the decoder layer")
    parser.add_argument("--attention-head", type=int, default=0, help="--attention-method head: the head")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that read and preprocess images")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="refuse larger images (width x height, read from the header), as data.max_image_pixels",
    )
    parser.add_argument(
        "--no-draft",
        action="store_true",
        help="decode large JPEGs at full scale (slower; by default they are decoded at 1/2-1/8 "
        "scale, never below twice the tower's input)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32", help="autocast dtype")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument("--files-from", help="a text file with one image path per line")
    parser.add_argument("paths", nargs="*", help="image files, directories or glob patterns")
    args = parser.parse_args(argv)
    paths = image_paths(args.paths, args.files_from)
    if not paths:
        parser.error("no images: give files, directories, glob patterns or --files-from")

    if args.topk is not None and args.topk < 1:
        parser.error(f"--topk {args.topk}: must be at least 1")
    if args.chunk_tokens < 1:
        parser.error(f"--chunk-tokens {args.chunk_tokens}: must be at least 1")

    from datamodules.labels import NLTKDataError

    from ..attention_maps import pixels_to_image, write_maps
    from ..checkpoint_io import UntrustedCheckpointError
    from ..recognizer import Recognizer
    from ..vocabulary import LabelMapper, Vocabulary, VocabularyError

    try:  # a bad vocabulary fails before the model loads, naming its file and line
        vocabulary = Vocabulary.from_file(args.vocabulary or args.map_to) if args.vocabulary or args.map_to else None
        recognizer = Recognizer.from_checkpoint(
            args.checkpoint,
            args.device,
            trust=args.trust_checkpoint,
            max_image_pixels=args.max_image_pixels,
            draft=not args.no_draft,
        )
        if args.vocabulary:
            vocabulary = recognizer.tokenize(vocabulary)
        elif args.map_to:
            mapper = LabelMapper(vocabulary, args.map_threshold, args.map_by, device=args.device)
            mapper.prepare()
    except (UntrustedCheckpointError, VocabularyError, NLTKDataError) as e:
        print(f"nxtp label: {e}", file=sys.stderr)
        return 2
    files = ImageFiles(paths, recognizer.model.eval_transform, recognizer.max_image_pixels, recognizer.draft_input_size)
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.workers, collate_fn=list)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision)
    writer = LabelWriter(args.format, args.output)
    failed = 0
    for batch in tqdm(loader, desc="labelling", unit="batch", file=sys.stderr, disable=not sys.stderr.isatty()):
        for path, _, error in (item for item in batch if item[2]):
            failed += 1
            print(f"nxtp label: cannot read {path}: {error}", file=sys.stderr)
            writer.write(path, error=error)
        good = [item for item in batch if item[2] is None]
        if not good:
            continue
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
            pixels = [pixels for _, pixels, _ in good]
            if args.vocabulary:
                results = recognizer.score(
                    pixels, vocabulary, args.topk, args.min_prob, args.batch_size, args.chunk_tokens
                )
            elif args.map_to:
                results = recognizer.map_labels(
                    pixels, mapper, args.topk or 10, args.min_prob, args.keep_unmapped, args.batch_size
                )
            else:
                results = recognizer.label(
                    pixels, topk=args.topk or 10, min_prob=args.min_prob, batch_size=args.batch_size
                )
        for (path, _, _), labels in zip(good, results):
            writer.write(path, labels)
        if args.attention_maps:  # the maps of the labels just written, teacher-forced (autograd for gradient maps)
            maps = recognizer.explain(
                pixels,
                [[label for label, _ in r] for r in results],
                args.attention_method,
                args.attention_layer,
                args.attention_head,
                batch_size=args.batch_size,
            )
            for (path, image, _), label_maps in zip(good, maps):
                write_maps(args.attention_maps, Path(path).stem, pixels_to_image(recognizer.model, image), label_maps)
    writer.close()
    if failed:
        print(f"nxtp label: {failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
