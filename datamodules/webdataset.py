"""A LightningDataModule that streams image-caption WebDataset shards into NXTP training batches.

Each sample of a shard is ``KEY.{jpg,jpeg,png,webp}`` + ``KEY.txt`` (the caption). Shards are given as
brace patterns, lists, local paths or URLs (webdataset handles ``pipe:``, http(s) and s3 itself). Labels
are extracted from the caption (``labels``), shuffled per sample, and tokenized after the prompt. Shards
are split by node and by worker, so with resampling off every sample is seen once per epoch.
A sample that cannot be decoded is skipped, logged with its shard and key, and counted in the batch.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import webdataset as wds
from PIL import Image

from lightning_modules.sequence import SequenceBuilder, collate_text

from .labels import extract_labels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Shards = str | list[str] | None


class SampleDecoder:
    """Turns a raw webdataset sample into ``(pixels, TextSequence, labels, key)``, or None if unusable.

    Counts skipped samples by reason in ``skipped``; the counts travel with the next batch (see ``Collate``).
    """

    def __init__(self, transform: Callable, sequences: SequenceBuilder, prompt: str, shuffle_labels: bool,
                 hflip: bool, max_labels: int, seed: int) -> None:
        self.transform, self.sequences, self.prompt = transform, sequences, prompt
        self.shuffle_labels, self.hflip, self.max_labels = shuffle_labels, hflip, max_labels
        self.seed = seed
        self.rng: random.Random | None = None
        self.skipped: Counter[str] = Counter()

    def _worker_rng(self) -> random.Random:
        # Seeded per worker and rank, so that workers do not all draw the same label orders and flips.
        info = torch.utils.data.get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return random.Random(f"{self.seed}-{rank}-{info.id if info else 0}")

    def __call__(self, sample: dict[str, Any]):
        if self.rng is None:
            self.rng = self._worker_rng()
        key, shard = sample.get("__key__"), sample.get("__url__")
        try:
            image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            if image_bytes is None:
                return self._skip("no image", shard, key)
            if "txt" not in sample:
                return self._skip("no caption", shard, key)
            caption = sample["txt"].decode("utf-8")
            image = Image.open(io.BytesIO(image_bytes))
            image = image.convert("RGB")
        except Exception as e:  # a corrupt member must not stop a run of days
            return self._skip(f"{type(e).__name__}", shard, key, e)
        labels = extract_labels(caption)
        if not labels:
            return self._skip("no labels", shard, key)
        if self.shuffle_labels:
            self.rng.shuffle(labels)
        labels = labels[: self.max_labels]
        if self.hflip and self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.transform(image), self.sequences(self.prompt, labels), labels, key

    def _skip(self, reason: str, shard, key, error: Exception | None = None):
        self.skipped[reason] += 1
        log.warning("skipping sample %s in shard %s: %s%s", key, shard, reason, f" ({error})" if error else "")
        return None


class Collate:
    """Stacks decoded samples into a batch dict and attaches the decoder's skip counts since the last batch."""

    def __init__(self, decoder: SampleDecoder, pad_id: int) -> None:
        self.decoder, self.pad_id = decoder, pad_id

    def __call__(self, samples: list) -> dict[str, Any]:
        pixels, seqs, labels, keys = zip(*samples)
        skipped = dict(self.decoder.skipped)
        self.decoder.skipped.clear()
        return {"pixels": torch.stack(pixels), "text": collate_text(list(seqs), self.pad_id),
                "labels": list(labels), "keys": list(keys), "skipped": skipped}


class NXTPDataModule(L.LightningDataModule):
    """Image-caption shards for NXTP.

    Args:
        train_shards / val_shards / test_shards: brace pattern (``data/train/shard-{000000..000019}.tar``),
            list of patterns, local paths or URLs.
        batch_size: samples per batch and device.
        num_workers: DataLoader workers (shards are split between them).
        shuffle_buffer: samples held in the training shuffle buffer.
        resampled: draw training shards with replacement forever (use with ``trainer.max_steps``); off means
            epochs that see every sample once.
        hflip: random horizontal flips for training images.
        augment: use the vision tower's own training transform (random resized crops) instead of its eval one.
        max_labels: at most this many labels per image (after shuffling).
        seed: seed of shard/sample shuffling and label order.
    """

    def __init__(self, train_shards: Shards = None, val_shards: Shards = None, test_shards: Shards = None,
                 batch_size: int = 64, num_workers: int = 2, shuffle_buffer: int = 2000, resampled: bool = False,
                 hflip: bool = False, augment: bool = False, max_labels: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None

    def bind(self, model) -> None:
        """Take the tokenizer, prompt and image preprocessing from an ``NXTP`` model."""
        self.model = model

    def setup(self, stage: str) -> None:
        if self.model is None:
            self.bind(self.trainer.lightning_module.model)

    def _loader(self, shards: Shards, train: bool, name: str):
        if shards is None:
            raise ValueError(f"data.{name}_shards is not set")
        urls = [u for s in ([shards] if isinstance(shards, str) else shards) for u in wds.shardlists.expand_urls(s)]
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:  # fail before any heavy work, naming the key; remote shards are retried while streaming
            raise FileNotFoundError(f"data.{name}_shards: {len(missing)} of {len(urls)} shards do not exist, "
                                    f"e.g. {missing[0]} (from {shards!r})")
        hp = self.hparams
        # open_clip's training transform crops at random, which can cut objects (and so labels) out of an image.
        transform = self.model.train_transform if train and hp.augment else self.model.eval_transform
        decoder = SampleDecoder(transform, self.model.sequences, self.model.prompt, shuffle_labels=train,
                                hflip=train and hp.hflip, max_labels=hp.max_labels, seed=hp.seed)
        resampled = train and hp.resampled
        dataset = wds.WebDataset(
            urls, resampled=resampled, shardshuffle=100 if train and not resampled else False,
            nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, handler=wds.warn_and_continue,
            empty_check=False, seed=hp.seed,
        )
        if train:
            dataset = dataset.shuffle(hp.shuffle_buffer, seed=hp.seed)
        dataset = dataset.map(decoder).select(lambda s: s is not None)
        dataset = dataset.batched(hp.batch_size, collation_fn=Collate(decoder, self.model.sequences.pad_id), partial=not train)
        workers = min(hp.num_workers, len(urls))
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self):
        return self._loader(self.hparams.train_shards, True, "train")

    def val_dataloader(self):
        return self._loader(self.hparams.val_shards, False, "val")

    def test_dataloader(self):
        return self._loader(self.hparams.test_shards, False, "test")

    def predict_dataloader(self):
        return self.test_dataloader()
