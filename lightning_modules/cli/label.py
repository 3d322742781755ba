"""``nxtp label``: name the objects in image files, as JSON lines or CSV; or score a closed vocabulary exactly
(``--vocabulary``), or map the free labels onto one (``--map-to``), in the same output format. The loop itself is
``inference.label_files``."""

from __future__ import annotations

import argparse
import csv
import sys
from functools import partial
from pathlib import Path

from ..inference import (
    InferenceOptions,
    csv_header,
    image_paths,
    label_files,
    write_csv,
    write_jsonl,
)
from . import imported


def build_parser() -> argparse.ArgumentParser:
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
    InferenceOptions.add_arguments(
        parser,
        notes={
            "topk": "with --vocabulary, the most probable entries to print (default all)",
            "min_prob": "with --map-to: after mapping",
        },
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
    # no `choices`: attention_maps.METHODS lives beside torch; the name is checked once it is imported
    parser.add_argument(
        "--attention-method",
        help="how the map is made: gradient (the default: gradient-weighted attention), mean, rollout, "
        "or head (one decoder head)",
    )
    parser.add_argument("--attention-layer", type=int, default=-1, help="--attention-method head: the decoder layer")
    parser.add_argument("--attention-head", type=int, default=0, help="--attention-method head: the head")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that read and preprocess images")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument("--files-from", help="a text file with one image path per line")
    parser.add_argument("paths", nargs="*", help="image files, directories or glob patterns")
    return parser


def label_main(argv: list[str]) -> int:
    """``nxtp label``: labels sorted by probability for every image, as JSON lines (default) or CSV; 1 if an image
    could not be read, 2 if the checkpoint, its calibration or the vocabulary was refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = InferenceOptions.from_args(args)
    except ValueError as e:  # options that contradict each other
        parser.error(str(e))
    paths = image_paths(args.paths, args.files_from)
    if not paths:
        parser.error("no images: give files, directories, glob patterns or --files-from")
    if options.topk is not None and options.topk < 1:
        parser.error(f"--topk {options.topk}: must be at least 1")
    if args.chunk_tokens < 1:
        parser.error(f"--chunk-tokens {args.chunk_tokens}: must be at least 1")

    from tqdm import tqdm

    from datamodules.labels import NLTKDataError

    from ..attention_maps import DEFAULT_METHOD, METHODS, patch_grid, pixels_to_image, write_maps
    from ..calibration import CalibrationError
    from ..checkpoint_io import UntrustedCheckpointError
    from ..vocabulary import LabelMapper, Vocabulary, VocabularyError

    method = args.attention_method or DEFAULT_METHOD
    if method not in METHODS:
        parser.error(f"--attention-method: invalid choice {method!r} (choose from {', '.join(METHODS)})")
    vocabulary = mapper = None
    if options.locate and args.map_to:
        parser.error("--locate works with free labels and --vocabulary, not --map-to (a mapped entry has no map)")
    try:  # a bad vocabulary fails before the model loads, naming its file and line
        closed = Vocabulary.from_file(args.vocabulary or args.map_to) if args.vocabulary or args.map_to else None
        recognizer = options.load(args.checkpoint, trust=args.trust_checkpoint)
        if options.threshold == "auto" and recognizer.calibration is None:
            raise CalibrationError(
                f"--threshold auto: {args.checkpoint} has no calibration; fit one with "
                f"`nxtp calibrate --checkpoint {args.checkpoint} --shards LABELLED_SHARDS`"
            )
        if options.locate or args.attention_maps:
            patch_grid(recognizer.model)
        if args.vocabulary:
            vocabulary = recognizer.tokenize(closed)
        elif args.map_to:
            mapper = LabelMapper(closed, args.map_threshold, args.map_by, device=options.device)
            mapper.prepare()
    except (UntrustedCheckpointError, VocabularyError, NLTKDataError, CalibrationError, ValueError) as e:
        print(f"nxtp label: {e}", file=sys.stderr)
        return 2
    imported()  # the model is loaded
    results = label_files(
        recognizer,
        paths,
        options,
        vocabulary=vocabulary,
        mapper=mapper,
        keep_unmapped=args.keep_unmapped,
        chunk_tokens=args.chunk_tokens,
        explain=method if args.attention_maps else None,
        layer=args.attention_layer,
        head=args.attention_head,
        workers=args.workers,
    )
    stream = open(args.output, "w", newline="") if args.output else sys.stdout
    calibrated = recognizer.calibration is not None
    write = partial(write_csv, calibrated=calibrated, located=options.locate) if args.format == "csv" else write_jsonl
    if args.format == "csv":
        csv.writer(stream).writerow(csv_header(calibrated, options.locate))
    failed = 0
    progress = tqdm(total=len(paths), desc="labelling", unit="image", file=sys.stderr, disable=not sys.stderr.isatty())
    for result in results:
        if result.error:
            failed += 1
            print(f"nxtp label: cannot read {result.image}: {result.error}", file=sys.stderr)
        write(stream, result)
        if result.maps is not None:
            image = pixels_to_image(recognizer.model, result.pixels)
            probs = [pair[1] for pair in result.labels]
            write_maps(args.attention_maps, Path(result.image).stem, image, result.maps, probs)
        progress.update()
    progress.close()
    if stream is not sys.stdout:
        stream.close()
    if failed:
        print(f"nxtp label: {failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
