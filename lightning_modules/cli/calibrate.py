"""``nxtp calibrate``: fit the map from raw one-shot scores to the probability that a label is right, with per-label
thresholds, on labelled shards, and store it with the model (see ``lightning_modules.calibration``).

    nxtp calibrate --checkpoint CKPT --shards 'data/shapes/val/shard-{000000..000001}.tar' \\
        --report-shards 'data/shapes/test/shard-{000000..000001}.tar'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import imported


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxtp calibrate",
        description="Fit calibrated label probabilities and per-label thresholds on labelled shards, report them on "
        "other images, and store them with the model.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by `nxtp fit`, or a model folder")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="let a .ckpt's pickle create any Python object, which can run code: only for files you trust",
    )
    parser.add_argument("--shards", required=True, help="labelled shards to fit on (as data.val_shards)")
    parser.add_argument(
        "--report-shards",
        help="other labelled shards to report on (default: --holdout of the images of --shards, left out of the fit)",
    )
    parser.add_argument("--holdout", type=float, default=0.3, help="without --report-shards: the share held out")
    parser.add_argument("--topk", type=int, default=10, help="first tokens to branch from, as nxtp label's default")
    parser.add_argument(
        "--target-precision",
        type=float,
        help="thresholds: the lowest that reaches this precision (default: the one of best F1)",
    )
    parser.add_argument(
        "--method",
        default="auto",
        choices=["auto", "logistic+isotonic", "logistic", "isotonic"],
        help="auto (default): the method of best F1 on held-out halves of --shards; logistic+isotonic: logistic "
        "regression over the label's features made calibrated by isotonic regression; either alone (isotonic: on "
        "the raw score only)",
    )
    parser.add_argument(
        "--min-label-examples", type=int, default=30, help="emitted occurrences of a label for a threshold of its own"
    )
    parser.add_argument("--limit", type=int, help="at most this many images of each split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that read the shards")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", help="write the calibration to this .json file instead of storing it with the model (for a look)"
    )
    parser.add_argument(
        "--report-dir",
        default="calibration_report",
        help="where to write reliability.png (reliability diagram) and report.md (figures and threshold table)",
    )
    return parser


def calibrate_main(argv: list[str]) -> int:
    """``nxtp calibrate``: 0 when stored, 2 when the model, the shards or the fit was refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout {args.holdout}: a fraction between 0 and 1")
    if args.target_precision is not None and not 0 < args.target_precision <= 1:
        parser.error(f"--target-precision {args.target_precision}: a number in (0, 1]")
    if args.out and not args.out.endswith(".json"):
        parser.error(f"--out {args.out}: a .json file")

    from datamodules.labels import NLTKDataError

    from ..calibration import CalibrationError, calibrate, save_report
    from ..checkpoint import load_model, write_calibration
    from ..checkpoint_io import UntrustedCheckpointError
    from ..recognizer import Recognizer

    imported()
    try:
        # a model's earlier calibration, even a broken one, is replaced: it is not loaded
        recognizer = Recognizer(load_model(args.checkpoint, args.trust_checkpoint, calibration=False), args.device)
        report = calibrate(
            recognizer,
            args.shards,
            args.report_shards,
            args.holdout,
            args.topk,
            args.method,
            args.target_precision,
            args.min_label_examples,
            args.batch_size,
            args.workers,
            args.limit,
        )
    except (UntrustedCheckpointError, CalibrationError, NLTKDataError, FileNotFoundError, ValueError) as e:
        print(f"nxtp calibrate: {e}", file=sys.stderr)
        return 2
    print(report.text())
    save_report(Path(args.report_dir), report)
    where = write_calibration(args.out or args.checkpoint, report.calibration, trust=args.trust_checkpoint)
    print(f"\nwrote {Path(args.report_dir) / 'reliability.png'} and {Path(args.report_dir) / 'report.md'}")
    print(f"calibration for {report.calibration.model_id} stored in {where}")
    return 0
