"""Label by label: the test split's exact-label scores per label (``nxtp test`` writes them to
``per_label_test.csv`` in the run's folder and its worst and best labels to TensorBoard), and two such files compared
(``nxtp compare``): which labels a fine-tuning taught, and which it made the model forget.

The counts come from ``metrics.PerLabelScore`` (at top-5, the labels matched after ``normalize_label`` as
``metrics.ExactLabelScore`` matches them). Per label, over the images scored: ``references`` (images that have it),
``predicted`` (images whose top-k labels hold it), ``hits`` (both); ``recall = hits / references``, ``precision =
hits / predicted`` (undefined, an empty cell, when the denominator is 0) and ``f1 = 2 hits / (references +
predicted)``, which is ``2RP / (R + P)`` where both are defined, and 0 for a label only predicted or only referenced.

Nothing here imports torch: ``nxtp compare --help`` answers at once.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PER_LABEL_FILE = "per_label_test.csv"
COLUMNS = ("label", "references", "predicted", "hits", "recall", "precision", "f1")
MIN_REFERENCES = 5  # a label in the TensorBoard table of best and worst has at least this many test images
SHOWN = 10  # labels in each of the two tables


@dataclass(frozen=True)
class LabelScore:
    """One label's counts and scores over a split (a row of ``per_label_test.csv``); None: undefined."""

    label: str
    references: int
    predicted: int
    hits: int
    recall: float | None
    precision: float | None
    f1: float

    @classmethod
    def from_counts(cls, label: str, references: int, predicted: int, hits: int) -> LabelScore:
        """The scores of a label from its counts."""
        return cls(
            label,
            references,
            predicted,
            hits,
            hits / references if references else None,
            hits / predicted if predicted else None,
            2 * hits / (references + predicted) if references + predicted else 0.0,
        )


def label_scores(counts: Mapping[str, Sequence[int]]) -> list[LabelScore]:
    """``{label: (references, predicted, hits)}`` (``PerLabelScore.compute()``) as scores, sorted by label."""
    return [LabelScore.from_counts(label, *map(int, counts[label])) for label in sorted(counts)]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_csv(scores: Iterable[LabelScore], path: str | Path) -> Path:
    """Write ``scores`` as a CSV file with the header ``COLUMNS`` (undefined values as empty cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")  # renamed when complete: a reader never sees half a file
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for s in scores:
            writer.writerow([s.label, s.references, s.predicted, s.hits, *map(_cell, (s.recall, s.precision, s.f1))])
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> list[LabelScore]:
    """Read a file ``write_csv`` wrote (or one written by hand with its columns).

    Raises:
        ValueError: a column is missing, or a value does not parse; the message names the file and its line.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a per-label file, it lacks the column(s) {missing} of {list(COLUMNS)}")
        scores = []
        for row in reader:
            try:
                scores.append(
                    LabelScore(
                        row["label"],
                        int(row["references"]),
                        int(row["predicted"]),
                        int(row["hits"]),
                        *(float(row[c]) if row[c].strip() else None for c in ("recall", "precision")),
                        float(row["f1"]),
                    )
                )
            except ValueError as e:
                raise ValueError(f"{path}, line {reader.line_num}: {e}") from e
    return scores


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(scores: Sequence[LabelScore]) -> str:
    """``scores`` as a Markdown table (the columns of the CSV file)."""
    lines = ["| label | references | predicted | hits | recall | precision | F1 |", "|---" + "|---:" * 6 + "|"]
    for s in scores:
        label = s.label.replace("|", "\\|")  # a label is any text the model wrote: it must not end the cell
        numbers = (_number(s.recall), _number(s.precision), _number(s.f1))
        lines.append(f"| {label} | {s.references} | {s.predicted} | {s.hits} | " + " | ".join(numbers) + " |")
    return "\n".join(lines)


def worst_and_best(
    scores: Iterable[LabelScore], n: int = SHOWN, min_references: int = MIN_REFERENCES
) -> tuple[list[LabelScore], list[LabelScore]]:
    """The ``n`` labels of lowest and of highest F1 among those with at least ``min_references`` references (ties:
    the label with more references first, then by name)."""
    kept = [s for s in scores if s.references >= min_references]
    worst = sorted(kept, key=lambda s: (s.f1, -s.references, s.label))[:n]
    best = sorted(kept, key=lambda s: (-s.f1, -s.references, s.label))[:n]
    return worst, best


def markdown_report(
    scores: Sequence[LabelScore],
    k: int,
    images: int | None = None,
    n: int = SHOWN,
    min_references: int = MIN_REFERENCES,
) -> str:
    """The TensorBoard text of ``test/per_label``: the ``n`` worst and best labels (of at least ``min_references``
    references) as Markdown tables, under a line saying what was counted."""
    worst, best = worst_and_best(scores, n, min_references)
    kept = sum(s.references >= min_references for s in scores)
    over = f" over {images} test images" if images is not None else ""
    head = (
        f"Exact labels at top-{k}{over}: {len(scores)} labels in `{PER_LABEL_FILE}`, {kept} of them with at least "
        f"{min_references} references."
    )
    if not kept:
        return head
    tables = [f"**{len(worst)} worst**", markdown_table(worst), f"**{len(best)} best**", markdown_table(best)]
    return "\n\n".join([head, *tables])


# comparing two checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A label's F1 before and after (None: the label is not in that file) and the change (None unless both)."""

    label: str
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


def compare(before: Iterable[LabelScore], after: Iterable[LabelScore], min_references: int = 1) -> list[Change]:
    """Every label with at least ``min_references`` references in either file, with its F1 in each, sorted by the
    change (the largest drop first), then the labels of one file only (by name)."""
    old = {s.label: s for s in before}
    new = {s.label: s for s in after}

    def references(label: str) -> int:
        return max(scores[label].references for scores in (old, new) if label in scores)

    def f1(scores: dict[str, LabelScore], label: str) -> float | None:
        return scores[label].f1 if label in scores else None

    labels = [label for label in old.keys() | new.keys() if references(label) >= min_references]
    changes = [Change(label, f1(old, label), f1(new, label)) for label in labels]
    return sorted(changes, key=lambda c: (c.change is None, c.change or 0.0, c.label))


def mean_f1(changes: Sequence[Change]) -> tuple[int, float, float, float]:
    """Over the labels in both files: how many, and the mean F1 before, after, and the mean change."""
    both = [c for c in changes if c.change is not None]
    if not both:
        return 0, math.nan, math.nan, math.nan
    before = sum(c.before for c in both) / len(both)
    after = sum(c.after for c in both) / len(both)
    return len(both), before, after, after - before


def format_comparison(changes: Sequence[Change], before_name: str = "before", after_name: str = "after") -> str:
    """``changes`` as an aligned text table (F1 before, after, change; ``-`` where a file lacks the label) and a last
    line with the mean over the labels in both files."""

    def cell(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")

    width = max([len("label"), *(len(c.label) for c in changes)])
    lines = [f"{'label':<{width}}  {'F1 before':>9}  {'F1 after':>9}  {'change':>9}"]
    for c in changes:
        lines.append(f"{c.label:<{width}}  {cell(c.before):>9}  {cell(c.after):>9}  {cell(c.change, True):>9}")
    n, before, after, change = mean_f1(changes)
    if n:
        lines.append(
            f"{'mean':<{width}}  {before:>9.4f}  {after:>9.4f}  {change:>+9.4f}   "
            f"(F1 over the {n} labels in both {before_name} and {after_name})"
        )
    else:
        lines.append(f"no label is in both {before_name} and {after_name}")
    only = [c.label for c in changes if c.change is None]
    if only:
        lines.append(f"{len(only)} label(s) in one file only (no change): {', '.join(only)}")
    return "\n".join(lines)
