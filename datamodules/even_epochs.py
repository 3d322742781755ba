"""Epochs that end on every rank at the same step, whatever the ranks' shares of the data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class StopTogether:
    """A rank's training batches, ending when the first rank runs out of batches.

    Shards are split between ranks, so with epochs (``data.resampled: false``) one rank can have more batches than
    another; a rank that ends its epoch alone leaves the others waiting for ever in the next gradient all-reduce.
    One step ahead, the ranks agree whether every one of them has a next batch (one small all-reduce per step, in
    step with the training); when one has none, all end the epoch. What the other ranks had left of that epoch is
    not used; the next epoch starts from all of the data again.
    """

    def __init__(self, batches: Iterable[Any], strategy) -> None:
        self.batches, self.strategy = batches, strategy

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.batches)
        while True:
            batch = next(iterator, None)
            if not self.strategy.reduce_boolean_decision(batch is not None, all=True):
                return
            yield batch
