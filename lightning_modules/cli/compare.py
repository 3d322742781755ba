"""``nxtp compare``: two checkpoints' test scores label by label, from the ``per_label_test.csv`` that ``nxtp test``
wrote for each (see ``lightning_modules.per_label``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compare_main(argv: list[str]) -> int:
    """``nxtp compare --before A.csv --after B.csv [--min-references N]``: per label, F1 before and after and the
    change, the largest drop first, and the mean over the labels in both."""
    from ..per_label import PER_LABEL_FILE, compare, format_comparison, read_csv  # torch-free

    parser = argparse.ArgumentParser(
        prog="nxtp compare",
        description=f"Compare two checkpoints label by label: the {PER_LABEL_FILE} files `nxtp test` wrote for each "
        "(the labels a fine-tuning taught, and those it made the model forget).",
    )
    parser.add_argument("--before", required=True, type=Path, help=f"a {PER_LABEL_FILE}, or the run folder holding it")
    parser.add_argument("--after", required=True, type=Path, help=f"a {PER_LABEL_FILE}, or the run folder holding it")
    parser.add_argument(
        "--min-references",
        type=int,
        default=1,
        help="only labels with at least this many test images in either file (default 1: no label only predicted)",
    )
    args = parser.parse_args(argv)
    files = [path / PER_LABEL_FILE if path.is_dir() else path for path in (args.before, args.after)]
    try:
        before, after = (read_csv(path) for path in files)
    except (OSError, ValueError) as e:  # a missing file, one that is not a per-label file
        print(f"nxtp compare: {e}", file=sys.stderr)
        return 2
    print(format_comparison(compare(before, after, args.min_references), str(files[0]), str(files[1])))
    return 0
