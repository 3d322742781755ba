"""Label extraction throughput (captions/s in one process), the reference's NLTK pipeline.

    python experiments/bench_labels.py [--n 5000]

Captions are made unique (so the per-caption cache never hits) from real-looking templates. The last line
reads ``captions/s: N`` and compares it with the 5,000 captions/s per data worker that keeps a GPU fed.
"""

from __future__ import annotations

import argparse
import random
import time

from datamodules.labels import extract_labels, extract_labels_batch

SUBJECTS = ["a dog", "two cats", "a young woman", "an old man", "three kids", "a brown horse", "a red car",
            "a group of people", "a small boat", "a wooden table"]
VERBS = ["sitting on", "running across", "standing next to", "playing with", "parked near", "lying under"]
PLACES = ["the grass", "a sandy beach", "a busy street", "the kitchen counter", "a snowy mountain", "the sofa"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} in photo {i}." for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    extract_labels("a warm-up caption with a dog")  # loads the tagger and WordNet once
    texts = captions(args.n)
    start = time.perf_counter()
    one_by_one = [extract_labels(t) for t in texts]
    single = args.n / (time.perf_counter() - start)
    print(f"example: {texts[0]!r} -> {one_by_one[0]}")
    start = time.perf_counter()
    extract_labels_batch(captions(args.n, seed=1))  # fresh captions: no cache hits
    batched = args.n / (time.perf_counter() - start)
    print(f"one by one: {single:.0f} captions/s, batch: {batched:.0f} captions/s (target 5000 per worker)")
    print(f"captions/s: {max(single, batched):.0f}")


if __name__ == "__main__":
    main()
