"""Label extraction throughput (captions/s in one process): NLTK's own calls against the fast path.

    python experiments/bench_labels.py [--n 5000] [--repeats 3]

Captions are made unique (so the per-caption cache never hits) from real-looking templates. Both pipelines run
on the same captions in the same process, alternately, and each keeps its best of ``--repeats`` rounds, so the
ratio holds even when other work shares the CPU. The last line reads ``captions/s: N`` for the fast path and
compares it with the 5,000 captions/s per data worker that keeps a GPU fed.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

# NLTK's own calls (the yardstick) read the full copy of the same data in tests/fixtures; the fast path reads the
# copy packaged with datamodules.labels.
os.environ.setdefault("NLTK_DATA", str(Path(__file__).parents[1] / "tests" / "fixtures" / "nltk_data"))

from datamodules.labels import extract_labels, extract_labels_batch, extract_labels_nltk  # noqa: E402

TARGET = 5000

SUBJECTS = [
    "a dog",
    "two cats",
    "a young woman",
    "an old man",
    "three kids",
    "a brown horse",
    "a red car",
    "a group of people",
    "a small boat",
    "a wooden table",
    "the chef's knife",
    "a U.S. flag",
]
VERBS = [
    "sitting on",
    "running across",
    "standing next to",
    "playing with",
    "parked near",
    "lying under",
    "isn't far from",
    "leaning against",
]
PLACES = [
    "the grass",
    "a sandy beach",
    "a busy street",
    "the kitchen counter",
    "a snowy mountain",
    "the sofa",
    "a well-lit room",
    "the old bridge. It's raining",
]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} in photo {seed}-{i}." for i in range(n)]


def rate(extract: Callable[[list[str]], list[list[str]]], texts: list[str]) -> float:
    """Captions per second of one pass."""
    start = time.perf_counter()
    extract(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # Load the tagger, WordNet and punkt once, outside the timings.
    extract_labels_nltk("a warm-up caption with a dog")
    extract_labels("a warm-up caption with a dog")

    def nltk_batch(texts: list[str]) -> list[list[str]]:
        return [extract_labels_nltk(t) for t in texts]

    baseline = fast = 0.0
    for r in range(args.repeats):
        texts = captions(args.n, seed=r)  # fresh captions each round: no cache hits
        baseline = max(baseline, rate(nltk_batch, texts))
        fast = max(fast, rate(extract_labels_batch, texts))
    texts = captions(3, seed=args.repeats)
    assert extract_labels_batch(texts) == nltk_batch(texts)
    print(f"example: {texts[0]!r} -> {extract_labels(texts[0])}")
    print(
        f"NLTK calls: {baseline:.0f} captions/s, fast path: {fast:.0f} captions/s ({fast / baseline:.1f}x), "
        f"best of {args.repeats} x {args.n} unique captions"
    )
    print(f"captions/s: {fast:.0f} (target {TARGET}: {'met' if fast >= TARGET else 'not met'})")


if __name__ == "__main__":
    main()
