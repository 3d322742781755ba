"""A LightningDataModule that streams image-caption WebDataset shards into NXTP training batches.

Each sample of a shard is ``KEY.{jpg,jpeg,png,webp}`` + ``KEY.txt`` (the caption) and/or labels it gives itself
(``KEY.json``'s ``labels`` list or ``KEY.tags``; ``nxtp shards`` writes them from folders, CSV files, COCO and
ImageFolder trees). Shards are given as brace patterns, lists, local paths or URLs (webdataset handles ``pipe:``,
http(s) and s3 itself). Labels are the given ones or the nouns extracted from the caption (``data.labels_from``
says which wins when a sample has both), shuffled per sample, and tokenized after the prompt. Shards
are split by node and by worker, so with resampling off every sample is seen once per epoch.
Training may mix several weighted sources (``data.train_shards`` as a list of ``{shards, weight}``: new data with a
replay of the data a model was first trained on), each sample drawn from a source at random with probability
proportional to its weight, from a seeded generator (``WeightedMix``).
Bad data never stops a run: a sample that cannot be used (broken or oversized image, missing, empty or
non-UTF-8 caption, no labels, or any error while extracting its labels, tokenizing them or transforming its
image) is skipped, and so is a shard that stays unreachable after retries or the rest of a truncated one; each
is logged, counted by reason in the next batch, and listed in ``rejects.jsonl``. What is not bad data stops the
run at once with an error that says so: missing NLTK data, samples failing one after the other with errors,
shards unreachable one after the other, or nothing but rejects for ``data.max_rejects_in_a_row`` samples (see
``SystematicFailure``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import lightning as L
import torch
import webdataset as wds
import yaml
from PIL import Image
from webdataset.gopen import set_options

from lightning_modules.batch import Batch, ModelInputs
from lightning_modules.sequence import SequenceBuilder, collate_text

from .even_epochs import StopTogether
from .images import IMAGE_ERRORS, MAX_IMAGE_PIXELS, ImageError, decode_image
from .labels import (
    LABEL_ERRORS,
    LABEL_SOURCES,
    LabelError,
    NLTKDataError,
    check_labels,
    decode_caption,
    extract_labels,
    given_labels,
    load_nltk_data,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Shards = str | list[str] | None
REJECTS_FILE = "rejects.jsonl"
# Why a sample (or, for the last four, a shard) was skipped: the keys of ``Batch.skipped``, in a fixed order, so
# that ranks can sum their counts as one vector.
REJECT_REASONS = (
    "no image",
    *LABEL_ERRORS,
    *IMAGE_ERRORS,
    "label extraction failed",
    "tokenization failed",
    "image transform failed",
    "malformed sample",
    "truncated shard",
    "corrupt shard",
    "unreachable shard",
)


class _ShardSourceShards(TypedDict):
    shards: str | list[str]


class ShardSource(_ShardSourceShards, total=False):
    """One weighted source of training shards, an entry of ``data.train_shards`` given as a list: ``shards`` (a
    brace pattern, or a list of patterns, paths or URLs) and ``weight`` (default 1; a sample comes from this source
    with probability ``weight`` / the sum of the weights)."""

    weight: float


# A TypedDict (not a dataclass): jsonargparse checks the keys and types of each entry, and the value stays plain
# data (dicts and lists) in hparams.yaml and checkpoints, which a weights-only load reads back.
TrainShards = str | list[str] | list[ShardSource] | None


class Source(NamedTuple):
    """One training source, checked: its shards, its weight and its config key (named in errors)."""

    shards: str | list[str]
    weight: float
    key: str


def shard_sources(shards: TrainShards, key: str = "data.train_shards") -> list[Source]:
    """The sources of ``data.train_shards``: one of weight 1 for a pattern or a list of patterns (as it has always
    been read), or one per ``{shards, weight}`` entry of a list of sources; none for None.

    Raises:
        ValueError: an entry that is not a source, with an unknown key, an empty ``shards`` pattern, or a weight that
            is not a number > 0; the message names the config key, e.g. ``data.train_shards[1].weight``.
    """
    if isinstance(shards, str) and shards.lstrip().startswith("["):
        # What jsonargparse leaves as a string when a list of sources does not parse (a misspelt key, a weight that
        # is no number, a brace pattern left unquoted): read it here, so that the error says what is wrong instead
        # of "matches no shards".
        try:
            parsed = yaml.safe_load(shards)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ValueError(
                f"{key}: {shards!r} is no YAML list of sources ({problem}); quote brace patterns, "
                f'e.g. \'[{{shards: "new/{{0..9}}.tar", weight: 3}}, {{shards: "old/{{0..99}}.tar", weight: 1}}]\''
            ) from e
        if isinstance(parsed, list):
            shards = parsed
    if shards is None:
        return []
    if isinstance(shards, str) or all(isinstance(entry, str) for entry in shards):
        return [Source(shards, 1.0, key)]
    sources = []
    for i, entry in enumerate(shards):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"{where}: {entry!r} is not a source; give every entry of {key} as {{shards: PATTERN, weight: W}}, "
                f"or every entry as a pattern (one source)"
            )
        unknown = sorted(set(entry) - {"shards", "weight"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a source has shards and weight")
        patterns = entry.get("shards")
        listed = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(listed, list) or not listed or not all(isinstance(p, str) and p.strip() for p in listed):
            raise ValueError(f"{where}.shards: give a non-empty shard pattern (or list of them), not {patterns!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{where}.weight: must be a number > 0, not {weight!r}")
        sources.append(Source(patterns, float(weight), f"{where}.shards"))
    return sources


class SystematicFailure(RuntimeError):
    """Samples keep failing with errors: a bug or a broken set-up, not bad data, so the run stops."""


class Rejects:
    """What one data worker skipped since its last batch: counts by reason and one record per sample or shard.

    Workers run in other processes, so both travel with the next batch (see ``Collate``) to the main process.
    It also watches for failures that are not bad data: ``max_failures_in_a_row`` samples in a row that raised
    an error (see :meth:`failed`), ``max_rejects_in_a_row`` samples or shards in a row rejected for any reason
    (resampled shards never end, so a stream of nothing but rejects would go on for ever), or a worker whose every
    sample failed or was rejected.
    """

    def __init__(self, split: str, max_failures_in_a_row: int = 20, max_rejects_in_a_row: int = 10_000) -> None:
        self.split, self.max_failures_in_a_row = split, max_failures_in_a_row
        self.max_rejects_in_a_row = max_rejects_in_a_row
        self.counts: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []
        self.failures_in_a_row = self.rejects_in_a_row = self.converted = self.failures = 0
        self.shard: str | None = None  # the shard being read (set by ``read_shards``), for malformed samples

    def add(self, reason: str, shard: str | None, key: str | None, error: BaseException | None = None) -> None:
        """Count one rejected sample (or a shard, with ``key`` None) and keep its record."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}: add it to REJECT_REASONS")
        self.counts[reason] += 1
        message = f"{type(error).__name__}: {error}" if error is not None else None
        self.records.append({"split": self.split, "shard": shard, "key": key, "reason": reason, "error": message})
        what = f"sample {key} in shard {shard}" if key is not None else f"shard {shard}"
        log.warning("skipping %s: %s%s", what, reason, f" ({message})" if message else "")
        self.rejects_in_a_row += 1
        if self.rejects_in_a_row >= self.max_rejects_in_a_row:
            raise SystematicFailure(
                f"the last {self.rejects_in_a_row} {self.split} samples or shards were all rejected, the last one "
                f"({what}) as {reason}: nothing of data.{self.split}_shards becomes an example "
                f"(see rejects.jsonl and the warnings above; data.max_rejects_in_a_row sets the limit)."
            )

    def failed(self, reason: str, shard: str | None, key: str | None, error: BaseException) -> None:
        """Count a sample whose conversion raised ``error``; raise ``SystematicFailure`` when too many in a row did."""
        self.add(reason, shard, key, error)
        self.failures += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.max_failures_in_a_row:
            raise SystematicFailure(
                f"{self.failures_in_a_row} {self.split} samples in a row failed, the last one ({key} in shard {shard}) "
                f"with {reason}: {type(error).__name__}: {error}. Bad data is rejected one sample at a time; "
                f"this looks like a bug or a broken set-up instead (data.max_failures_in_a_row sets the limit)."
            ) from error

    def succeeded(self) -> None:
        """Count a sample that became a training example."""
        self.converted += 1
        self.failures_in_a_row = self.rejects_in_a_row = 0

    def check_end(self) -> None:
        """At the end of a worker's stream: raise ``SystematicFailure`` if samples failed and none was converted."""
        if self.failures and not self.converted:
            raise SystematicFailure(
                f"no {self.split} sample of this data worker became an example: {self.failures} failed with errors "
                f"and the rest were rejected (see the warnings above for each one)."
            )

    def malformed(self, error: BaseException) -> bool:
        """A webdataset exception handler: count a malformed sample (e.g. a file twice in it) and go on. Its key
        is in the error's message; its shard is the one being read."""
        self.add("malformed sample", self.shard, None, error)
        return True

    def drain(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Everything since the last call, for a batch to carry."""
        counts, records = dict(self.counts), self.records
        self.counts, self.records = Counter(), []
        return counts, records


def worker_rng(seed: int, *stream: object) -> random.Random:
    """A random generator of its own for this data worker: the same ones in every run with ``seed`` (a
    reproducible run), different ones for each worker and ``stream`` (a name, an epoch)."""
    info = torch.utils.data.get_worker_info()
    return random.Random("-".join(map(str, (seed, info.id if info else 0, *stream))))


class Shuffle(wds.PipelineStage):
    """``wds.shuffle`` through a buffer of ``bufsize`` items, drawn by a seeded generator per worker and epoch
    (``worker_rng``): reproducible, and each epoch in another order (``wds.shuffle(seed=)`` repeats the same
    order in every epoch and every worker). The epoch is counted from ``epoch``, one per pass over the data."""

    def __init__(self, bufsize: int, seed: int, name: str, epoch: int = 0) -> None:
        self.bufsize, self.seed, self.name, self.epoch = bufsize, seed, name, epoch - 1

    def run(self, src: Iterable) -> Iterator:
        self.epoch += 1
        return wds.shuffle(self.bufsize, rng=worker_rng(self.seed, self.name, self.epoch))(src)


class WeightedMix(wds.RandomMix):
    """webdataset's ``RandomMix``: each sample from source ``i`` with probability ``weights[i] / sum(weights)``,
    until a source runs out (RandomMix's default). Its draws come from a generator seeded per worker and epoch
    (``worker_rng``, as ``Shuffle``'s) instead of the global ``random`` module RandomMix reads, which nothing seeds
    per worker: the same sequence in every run with ``seed``, another one in each epoch (counted from ``epoch``).
    """

    def __init__(self, datasets: Sequence[Iterable], weights: Sequence[float], seed: int, epoch: int = 0) -> None:
        super().__init__(list(datasets), probs=list(weights))
        self.seed, self.epoch = seed, epoch - 1

    def __iter__(self) -> Iterator:
        self.epoch += 1
        rng = worker_rng(self.seed, "mix", self.epoch)
        sources = [iter(d) for d in self.datasets]
        cumulative = list(itertools.accumulate(self.probs))
        while True:
            (source,) = rng.choices(sources, cum_weights=cumulative)
            try:
                yield next(source)
            except StopIteration:
                return


class SampleDecoder:
    """Turns a raw webdataset sample into ``(pixels, TextSequence, labels, key)``, or None if unusable.

    Unusable samples are counted by reason in ``rejects``; they travel with the next batch (see ``Collate``).
    An error while extracting the labels, tokenizing them or transforming the image rejects the sample
    (``label extraction failed``, ``tokenization failed``, ``image transform failed``); missing NLTK data and
    failures that go on (see ``Rejects.failed``) stop the run instead.

    A sample's labels are the ones it gives (``KEY.json``'s ``labels`` list, else ``KEY.tags``; see
    :func:`~datamodules.labels.given_labels`), used as they are, or the nouns of its caption (``KEY.txt``);
    ``labels_from`` (``given`` or ``caption``) says which wins when it has both. A given label holding the
    delimiter or a special token rejects the sample (``label has delimiter``, ``label has special token``).

    ``labels`` are the labels in the sequence (shuffled and cut to ``max_labels``), or with ``full_references``
    (evaluation) all of the sample's labels, in their order, while the sequence keeps the cut.
    ``reference_compat`` and ``nltk_data`` are passed to :func:`~datamodules.labels.extract_labels`.
    """

    def __init__(
        self,
        transform: Callable,
        sequences: SequenceBuilder,
        prompt: str,
        shuffle_labels: bool,
        hflip: bool,
        max_labels: int,
        seed: int,
        rejects: Rejects,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        full_references: bool = False,
        reference_compat: bool = False,
        nltk_data: str | None = None,
        input_size: int | tuple[int, int] | None = None,
        labels_from: str = "given",
    ) -> None:
        if labels_from not in LABEL_SOURCES:
            raise ValueError(f"labels_from={labels_from!r}: use one of {LABEL_SOURCES}")
        self.transform, self.sequences, self.prompt = transform, sequences, prompt
        self.shuffle_labels, self.hflip, self.max_labels = shuffle_labels, hflip, max_labels
        self.seed, self.rejects, self.max_image_pixels = seed, rejects, max_image_pixels
        self.full_references, self.reference_compat, self.nltk_data = full_references, reference_compat, nltk_data
        self.input_size = input_size  # draft decoding's (images.draft_size); None: every image in full
        self.labels_from = labels_from
        # What a given label may not hold (a plain callable as ``sequences``, in tests, has no tokenizer).
        self.delimiter = getattr(sequences, "delimiter", ",")
        tokenizer = getattr(sequences, "tokenizer", None)
        self.special = tuple(tokenizer.all_special_tokens) if tokenizer is not None else ()
        self.rng: random.Random | None = None
        # here, in the main process: missing data fails before any worker starts, and the workers share what it read
        load_nltk_data(nltk_data)

    def __call__(self, sample: dict[str, Any]):
        if self.rng is None:  # here, in the worker that decodes: label orders and flips differ between workers
            self.rng = worker_rng(self.seed, "labels")
        key, shard = sample.get("__key__"), sample.get("__url__")
        image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_bytes is None:
            return self.rejects.add("no image", shard, key)
        try:
            caption, given = self._text(sample)
        except LabelError as e:
            return self.rejects.add(e.reason, shard, key, e.__cause__ or (e if str(e) != e.reason else None))
        try:
            image = decode_image(image_bytes, self.max_image_pixels, self.input_size)
        except ImageError as e:
            return self.rejects.add(e.reason, shard, key, e.__cause__ or e)
        stage = "label extraction failed"
        try:
            labels = given if given is not None else extract_labels(caption, self.reference_compat, self.nltk_data)
            if not labels:
                return self.rejects.add("no labels", shard, key)
            references = list(labels) if self.full_references else None
            if self.shuffle_labels:
                self.rng.shuffle(labels)
            labels = labels[: self.max_labels]
            stage = "tokenization failed"
            sequence = self.sequences(self.prompt, labels)
            stage = "image transform failed"
            if self.hflip and self.rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = self.transform(image)
        except NLTKDataError:
            raise  # the set-up, not this sample: every sample would fail the same way
        except Exception as e:  # noqa: BLE001 - whatever one sample triggers, the others still train
            return self.rejects.failed(stage, shard, key, e)
        self.rejects.succeeded()
        return pixels, sequence, references if self.full_references else labels, key

    def _text(self, sample: dict[str, Any]) -> tuple[str | None, list[str] | None]:
        """``(caption, None)`` or ``(None, given labels)``: where the sample's labels come from.

        Raises:
            LabelError: the one chosen cannot be used, or the sample has neither (``no caption``).
        """
        if self.labels_from == "caption" and "txt" in sample:
            return decode_caption(sample["txt"]), None
        given = given_labels(sample.get("tags"), sample.get("json"))
        if given is not None:
            if not given:
                raise LabelError("no labels", "the sample gives an empty list of labels")
            return None, check_labels(given, self.delimiter, self.special)
        if "txt" not in sample:
            raise LabelError("no caption")
        return decode_caption(sample["txt"]), None


def _shard_files(url: str, skip: int) -> Iterator[dict[str, Any]]:
    """The files of one shard after its first ``skip``.

    A failed download raises OSError (a ``pipe:`` or curl exit status shows when the stream is closed, so the
    stream is closed before the tar error it caused is raised); a truncated or broken tar raises TarError.
    """
    stream = wds.gopen(url)
    # webdataset's pipe checks the command's exit status after every read: once curl has failed, the next read raises
    # and drops the bytes curl wrote before it stopped, which the pipe still holds. Read them all; the status is
    # raised at close.
    set_options(stream, ignore_errors=True)
    try:
        for i, member in enumerate(wds.tariterators.tar_file_iterator(stream)):
            if i >= skip:
                yield member
    except GeneratorExit:  # the reader stopped early: nothing to report
        with suppress(Exception):
            stream.close()
        raise
    except Exception:
        _close(stream)
        raise
    _close(stream)


def _close(stream) -> None:
    """Close a shard's stream; OSError naming the command when it was one that failed (curl's exit status)."""
    stream.close()
    status = getattr(stream, "status", None)
    if status is not None and status not in stream.ignore_status:
        raise OSError(f"{stream.args}: exit {status}")


def read_shards(
    shards: Iterable[dict[str, Any]], rejects: Rejects, retries: int, retry_wait: float
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{"url": ...}`` shards to the files in them, for ``group_by_keys``.

    A shard that fails to open or stops downloading is read again ``retries`` times (waiting ``retry_wait``
    seconds, doubled each time), skipping files already passed on, then skipped as an ``unreachable shard``.
    A truncated or broken tar is not retried: its files before the damage are kept. So are those of a shard given
    up, and the sample cut off there is counted by what it lacks (e.g. ``no caption``). ``max_failures_in_a_row``
    shards in a row given up, with nothing read from any, stop the run: the storage or the network is down.
    """
    given_up: set[str] = set()  # drawn again (resampling), such a shard is tried once more, without waiting
    unreachable_in_a_row = 0
    for shard in shards:
        url, done = shard["url"], 0
        rejects.shard = url
        attempts = 1 if url in given_up else retries + 1
        for attempt in range(attempts):
            try:
                for member in _shard_files(url, done):
                    member["__url__"] = url
                    unreachable_in_a_row = 0
                    # Again at every file: mixed sources (``WeightedMix``) share ``rejects``, and a malformed sample
                    # is reported (``Rejects.malformed``) right after its file is read, from this shard.
                    rejects.shard = url
                    yield member
                    done += 1
                break
            except tarfile.TarError as e:
                reason = "truncated shard" if "unexpected end of data" in str(e) else "corrupt shard"
                rejects.add(reason, url, None, e)
                break
            except Exception as e:  # noqa: BLE001 - whatever the transport raises, the run goes on without it
                if attempt == attempts - 1:
                    rejects.add("unreachable shard", url, None, e)
                    given_up.add(url)
                    unreachable_in_a_row += 1
                    if unreachable_in_a_row >= rejects.max_failures_in_a_row:
                        raise SystematicFailure(
                            f"{unreachable_in_a_row} {rejects.split} shards in a row could not be read, the last one "
                            f"{url} with {type(e).__name__}: {e} (data.max_failures_in_a_row sets the limit)"
                        ) from e
                else:
                    log.warning("reading shard %s failed (%s), attempt %d of %d", url, e, attempt + 1, attempts)
                    time.sleep(retry_wait * 2**attempt)
        yield {}  # end of shard: group_by_keys must not join its last sample with the next shard's first


def carry_leftovers(batches: Iterable[Batch], rejects: Rejects, empty: bool) -> Iterator[Batch]:
    """Pipeline stage: hold each batch back until the next, so that the last one also carries what was rejected
    after it was collated (training drops a partial last batch). A worker left with rejects and no batch to carry
    them yields ``Batch.empty()`` (a batch of no samples, which evaluation takes) if ``empty``; otherwise (training,
    where every batch is a step) they wait for that worker's next batch, in the next epoch."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    rejects.check_end()
    if held is None and rejects.counts and empty:
        held = Batch.empty()
    if held is not None:
        counts, records = rejects.drain()
        for reason, count in counts.items():
            held.skipped[reason] = held.skipped.get(reason, 0) + count
        held.rejects += records
        yield held


class Collate:
    """Stacks decoded samples into a ``Batch`` and attaches what was rejected since the last batch."""

    def __init__(self, rejects: Rejects, pad_id: int) -> None:
        self.rejects, self.pad_id = rejects, pad_id

    def __call__(self, samples: list) -> Batch:
        pixels, seqs, labels, keys = zip(*samples)
        skipped, records = self.rejects.drain()
        text = collate_text(list(seqs), self.pad_id)
        return Batch(torch.stack(pixels), text, list(labels), list(keys), skipped, records)


def leave_the_process_group(worker_id: int) -> None:
    """DataLoader worker set-up: a process group of its own, so that a stop signal sent to the run's whole group
    (Ctrl-C in a terminal, ``kill -- -PGID``) reaches the main process only, which stops at the end of the step
    (``callbacks.GracefulStop``) and shuts its workers down itself; a worker killed by it would crash the run.
    SLURM's pre-emption warning (USR1, see ``callbacks.SlurmRequeue``) can reach every process of a job: ignored.
    A worker whose main process is gone still exits by itself (PyTorch's worker watchdog)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class NXTPDataModule(L.LightningDataModule):
    """Image-caption shards for NXTP.

    Every rejected sample (and every skipped or truncated shard) is counted by reason in the batch that follows
    it (``Batch.skipped``) and written as one JSON line (``split``, ``shard``, ``key``, ``reason``, ``error``,
    ``step``) to ``rejects.jsonl`` in the run's log directory (``rejects.rank<N>.jsonl`` on other ranks).

    Args:
        train_shards / val_shards / test_shards: brace pattern (``data/train/shard-{000000..000019}.tar``),
            list of patterns, local paths or URLs. ``train_shards`` may also be a list of weighted sources,
            ``[{shards: PATTERN, weight: W}, ...]`` (``ShardSource``), mixed by ``WeightedMix``: each sample comes
            from a source with probability its weight / the sum of the weights (e.g. new data 3 : replay 1). Each
            source is read as a single one is (resampled or in epochs, split by rank and worker, shuffled) from a
            seed of its own; with ``resampled`` off an epoch ends when one source runs out, so every source needs
            a shard for each rank and worker.
        batch_size: samples per batch and device.
        num_workers: DataLoader workers (shards are split between them).
        shuffle_buffer: samples held in the training shuffle buffer.
        resampled: draw training shards with replacement forever (use with ``trainer.max_steps``); off means
            epochs that see every sample once.
        hflip: random horizontal flips for training images.
        augment: use the vision tower's own training transform (random resized crops) instead of its eval one.
        max_labels: at most this many labels per training sequence (after shuffling). Validation and test
            batches still carry every label of the sample in ``Batch.labels``, the references they are scored on.
        seed: seed of shard sampling, shard and sample shuffling, label order and flips; each rank and worker
            draws its own stream from it, and a resumed run one mixed with its step (so a run is reproducible).
        max_image_pixels: images with more pixels (width x height, read from the header) are rejected without
            being decoded. PIL's own guard still refuses images of more than twice ``Image.MAX_IMAGE_PIXELS``.
        shard_retries: a shard that cannot be read (a download that fails) is tried again this many times, then
            skipped with a warning naming it.
        shard_retry_wait: seconds before the first retry of a shard, doubled for each further one.
        nltk_data: folder of NLTK data for label extraction; None: ``$NXTP_NLTK_DATA``, else the packaged copy.
        max_failures_in_a_row: this many samples in a row failing with an error (label extraction, tokenization,
            image transform), or this many shards in a row unreachable, stop the run: that is a bug or a broken
            set-up, not bad data.
        max_rejects_in_a_row: this many samples or shards in a row rejected for any reason, with none becoming an
            example, stop the run (resampled shards that are all bad would otherwise be read for ever).
        labels_from: ``given`` (a sample's own labels, ``KEY.json`` ``labels`` or ``KEY.tags``, win over its caption)
            or ``caption`` (the caption's nouns win); a sample with only one of them uses it either way.
        inputs: what the model needs its batches made with (``LitNXTP.inputs``: tokenizer, prompt, image
            preprocessing); ``nxtp fit`` links the model's, from Python give them here or with ``bind``.
    """

    def __init__(
        self,
        train_shards: TrainShards = None,
        val_shards: Shards = None,
        test_shards: Shards = None,
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        hflip: bool = False,
        augment: bool = False,
        max_labels: int = 16,
        seed: int = 0,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        shard_retries: int = 3,
        shard_retry_wait: float = 1.0,
        nltk_data: str | None = None,
        max_failures_in_a_row: int = 20,
        max_rejects_in_a_row: int = 10_000,
        labels_from: str = "given",
        inputs: ModelInputs | None = None,
    ) -> None:
        if labels_from not in LABEL_SOURCES:
            raise ValueError(f"data.labels_from={labels_from!r}: use one of {LABEL_SOURCES}")
        self.train_sources = shard_sources(train_shards)  # here: a bad source fails before anything is built
        super().__init__()
        self.save_hyperparameters(ignore=["inputs"])
        self.inputs = inputs
        self.rejects_path: Path | None = None
        self._seen_rejects: set[tuple] = set()

    def bind(self, inputs: ModelInputs) -> None:
        """Make batches for the model these ``inputs`` come from (``NXTP.inputs``, ``LitNXTP.inputs``)."""
        self.inputs = inputs

    def setup(self, stage: str) -> None:
        if self.inputs is None:
            raise ValueError(
                "NXTPDataModule: no model inputs; give the model's, e.g. NXTPDataModule(..., inputs=module.inputs) or "
                "datamodule.bind(module.inputs) (nxtp fit links them itself)"
            )
        # Here, as every rank calls setup: trainer.log_dir is a collective call.
        rank = self.trainer.global_rank
        self.rejects_path = Path(self.trainer.log_dir) / (REJECTS_FILE if rank == 0 else f"rejects.rank{rank}.jsonl")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Append the rejects that came with a batch to the rejects file (in the main process, as workers cannot
        share a file handle with it); they leave the batch, which goes on to the device without them."""
        if isinstance(batch, Batch) and batch.rejects:
            # Validation and test read the same shards at every pass; their rejects are written once.
            records = [r for r in batch.rejects if r["split"] == "train" or self._first_time(r)]
            batch.rejects = []
            if records and self.rejects_path is not None:
                self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
                step = self.trainer.global_step if self.trainer is not None else None
                with self.rejects_path.open("a") as f:
                    f.writelines(json.dumps({**r, "step": step}) + "\n" for r in records)
        return batch

    def _first_time(self, record: dict[str, Any]) -> bool:
        # a sample by its key; a shard, or a malformed sample (no key), by its error too
        key = (
            record["split"],
            record["shard"],
            record["key"],
            record["reason"],
            record["error"] if record["key"] is None else None,
        )
        if key in self._seen_rejects:
            return False
        self._seen_rejects.add(key)
        return True

    def _urls(self, shards: Shards, key: str) -> list[str]:
        """The shard URLs of the config key ``key`` (``data.val_shards``, ``data.train_shards[1].shards``), failing
        before any heavy work with a message naming the key."""
        if shards is None:
            raise ValueError(f"{key} is not set")
        patterns = [shards] if isinstance(shards, str) else shards
        urls = [u for p in patterns for u in wds.shardlists.expand_urls(p) if u]
        if not urls:
            raise ValueError(f"{key} matches no shards ({shards!r})")
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:  # remote shards are retried while streaming; a local one that is not there is a typo
            raise FileNotFoundError(
                f"{key}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]} (from {shards!r})"
            )
        return urls

    def _loader(self, sources: list[Source], train: bool, name: str):
        if not sources:
            raise ValueError(f"data.{name}_shards is not set")
        shard_urls = [self._urls(source.shards, source.key) for source in sources]
        hp = self.hparams
        # shared by the stages below; each worker gets its own copy
        rejects = Rejects(name, hp.max_failures_in_a_row, hp.max_rejects_in_a_row)
        # Labels are extracted the reference's way exactly when the model follows the reference
        # (model.reference_compat).
        compat = self.inputs.reference_compat
        # open_clip's training transform crops at random, which can cut objects (and so labels) out of an image.
        transform = self.inputs.train_transform if train and hp.augment else self.inputs.eval_transform
        seed = self._stream_seed() if train else hp.seed
        epoch = self.trainer.current_epoch if self.trainer is not None else 0  # where a resumed epoch run starts
        decoder = SampleDecoder(
            transform,
            self.inputs.sequences,
            self.inputs.prompt,
            shuffle_labels=train,
            hflip=train and hp.hflip,
            max_labels=hp.max_labels,
            seed=seed,
            rejects=rejects,
            max_image_pixels=hp.max_image_pixels,
            full_references=not train,
            reference_compat=compat,
            nltk_data=hp.nltk_data,
            # decoded as the model's preprocessing says; random crops may keep a small part of the image: in full
            input_size=None if train and hp.augment else self.inputs.draft_size,
            labels_from=hp.labels_from,
        )
        resampled = train and hp.resampled

        def samples(urls: list[str], source_seed: int) -> list:
            """The stages from one source's shards to its raw samples."""
            # deterministic: drawn from the seed and the worker, not from the clock and pid
            stages = [
                wds.ResampledShards(urls, seed=source_seed, deterministic=True)
                if resampled
                else wds.SimpleShardList(urls),
                wds.split_by_node,
                wds.split_by_worker,
            ]
            if train and not resampled:
                stages.append(Shuffle(100, source_seed, "shards", epoch))
            return stages + [
                wds.pipelinefilter(read_shards)(rejects, hp.shard_retries, hp.shard_retry_wait),
                wds.pipelinefilter(wds.tariterators.group_by_keys)(handler=rejects.malformed),
            ]

        if len(sources) == 1:  # exactly the pipeline of a single pattern
            stages = samples(shard_urls[0], seed)
        else:
            # Each source draws its shards and their order from a seed of its own (the first one from `seed`, as a
            # single source does); the mix from `seed` itself.
            mixed = [
                wds.DataPipeline(*samples(urls, seed if i == 0 else hash((seed, i)) & 0x7FFFFFFF))
                for i, urls in enumerate(shard_urls)
            ]
            stages = [WeightedMix(mixed, [source.weight for source in sources], seed, epoch)]
        if train:
            stages.append(Shuffle(hp.shuffle_buffer, seed, "samples", epoch))
        stages += [
            wds.map(decoder),
            wds.select(lambda s: s is not None),
            wds.batched(hp.batch_size, Collate(rejects, self.inputs.pad_id), partial=not train),
            wds.pipelinefilter(carry_leftovers)(rejects, not train),
        ]
        # Each worker reads its share of every source's shards: in epochs, one with none of a source would end its
        # mix at once; resampled shards never run out.
        counts = [len(urls) for urls in shard_urls]
        workers = min(hp.num_workers, max(counts) if resampled else min(counts))
        return wds.WebLoader(
            wds.DataPipeline(*stages),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=leave_the_process_group,
        )

    def _stream_seed(self) -> int:
        """The seed of this rank's training stream: ``data.seed`` for a new run on one process (the same command
        gives the same run); mixed with the rank, so that ranks draw different data, and with the step a resumed
        run starts from, so that it does not replay the shards, samples, label orders and flips its first part was
        trained on."""
        step, rank = (self.trainer.global_step, self.trainer.global_rank) if self.trainer is not None else (0, 0)
        # the hash of a tuple of ints is the same in every process (unlike that of a str)
        return self.hparams.seed if step == rank == 0 else hash((self.hparams.seed, step, rank)) & 0x7FFFFFFF

    def train_dataloader(self):
        loader = self._loader(self.train_sources, True, "train")
        if self.hparams.resampled or self.trainer is None or self.trainer.world_size == 1:
            return loader  # resampled shards never run out; one rank has nobody to wait for
        return StopTogether(loader, self.trainer.strategy)

    def _evaluation_sources(self, name: str) -> list[Source]:
        """``data.<name>_shards`` as one source: evaluation reads every sample once, mixing nothing."""
        shards = self.hparams[f"{name}_shards"]
        return [] if shards is None else [Source(shards, 1.0, f"data.{name}_shards")]

    def val_dataloader(self):
        return self._loader(self._evaluation_sources("val"), False, "val")

    def test_dataloader(self):
        return self._loader(self._evaluation_sources("test"), False, "test")

    def predict_dataloader(self):
        return self.test_dataloader()
