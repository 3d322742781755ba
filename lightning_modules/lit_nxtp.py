"""The LightningModule: NXTP training, evaluation with one-shot sampling, and logging."""

from __future__ import annotations

import fnmatch
import math
import os
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import grad_norm, rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw
from torchmetrics import MeanMetric, SumMetric

from datamodules.webdataset import REJECT_REASONS

from .attention_maps import explain, overlay, pixels_to_image
from .checkpoint import (
    TrainingState,
    load_weights,
    read_weights,
    restore_rng_state,
    rng_state,
    save_model_record,
    save_rng_states,
)
from .decoder import DecoderConfig
from .metrics import ExactLabelScore, SemanticLabelScore, score_name
from .nxtp import NXTP, PROMPT, NXTPConfig
from .sampling import recognize
from .vision import VisionConfig
from .vocabulary import LabelMapper, Vocabulary, VocabularyScore, score_vocabulary, tokenize, vocabulary_targets


def warmup_schedule(kind: str, total: int, warmup: int, decay_fraction: float, min_ratio: float):
    """The lr multiplier per step: linear warm-up, then ``cosine`` decay, or ``wsd`` (warm-up, stable,
    linear decay over the last ``decay_fraction`` of training)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total * (1 - decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, total - decay_start))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return factor


class LitNXTP(L.LightningModule):
    """NXTP as a LightningModule.

    The arguments come in the groups a config lists them in (configs/model/*.yaml).

    Model (vision, decoder, layout):
        vision / decoder / tokenizer / prompt / reference_compat / reset_label_positions: see ``NXTP``.

    Optimization (what trains, from where, how):
        init_from: start from these weights (fine-tuning): a folder written by ``save_pretrained``,
            ``nxtp import-official`` or ``nxtp export --format safetensors``, or a ``.ckpt`` written by
            ``nxtp fit`` (read safely, see ``checkpoint_io``). Only the weights are taken: the optimizer, lr schedule
            and step count start afresh, unlike ``--ckpt_path`` (which resumes a run, and wins over this when
            both are given). The architecture still comes from this config and must match the source's (for a
            folder: ``--model FOLDER/config.yaml --model.tokenizer FOLDER/tokenizer``); every name and shape
            must match. Loaded when a Trainer sets the module up (``setup``).
        init_allow_missing: name patterns (fnmatch, on ``model.state_dict()``) of tensors that ``init_from`` may
            lack, e.g. ``["projection.*"]`` for a new projection; they keep their fresh initialisation.
        trainable: name patterns (fnmatch, on ``model.named_parameters()``) of the parameters to train;
            None trains everything. E.g. ``["visual.transformer.resblocks.1[89].*", "decoder.*"]``.
        train_new_token_embeddings: with a frozen embedding matrix, still train the rows of ``<|image|>`` and
            ``<|empty|>`` (the other rows get no gradient), as the paper does.
        lr, betas, eps, weight_decay: AdamW. Norms, biases and embeddings get no weight decay.
        schedule: ``cosine`` (the paper's) or ``wsd`` (warm-up, stable, linear decay).
        warmup: warm-up steps; a value below 1 is a fraction of the total steps.
        decay_fraction: for ``wsd``, the fraction of steps spent decaying.
        min_lr_ratio: the lr at the end, as a fraction of ``lr``.
        max_nonfinite_steps: a step whose loss is NaN or infinite (on any rank) is skipped by every rank and
            counted; after this many in a run the run stops with an error naming the batch's samples.

    Evaluation:
        eval_topk: the top-k cut-offs at which validation/test recall, precision and F1 are reported.
        eval_min_prob: labels below this probability are dropped before scoring.
        eval_vocabulary: a vocabulary file (``nxtp label --vocabulary``'s format); validation and test then also
            report closed-set scores over it: ``vocab_scored/*`` (every entry scored exactly, ``vocabulary``) and
            ``vocab_mapped/*`` (the open-set labels at the largest ``eval_topk`` mapped onto it): mAP, and recall,
            precision and F1 of the entries at or above ``eval_vocabulary_threshold``.
        semantic_metric: also report the paper's semantic scores (sentence-embedding similarity).
        embedder: sentence embedder for the semantic scores; None uses the offline all-MiniLM-L6-v2 copy.
        log_images: how many validation images to log with their predicted labels.

    Speed (results do not depend on them):
        activation_checkpointing: recompute block activations in the backward pass to save memory.
        attention / pad_to_multiple: see ``NXTP``; how the label-masked attention is computed (``auto``, ``dense``,
            ``compact``, ``flex``) and the multiple the training sequences are padded to.
        compile: ``torch.compile`` every decoder block (each block is compiled in place, so parameter names and
            checkpoints are unchanged). The first steps are slow while it compiles, and each new sequence length
            may recompile: set ``pad_to_multiple`` (e.g. 64) to keep the lengths few.
    """

    def __init__(
        self,
        vision: VisionConfig,
        decoder: DecoderConfig,
        tokenizer: str,
        prompt: str = PROMPT,
        reference_compat: bool = False,
        reset_label_positions: bool = False,
        init_from: str | None = None,
        init_allow_missing: list[str] | None = None,
        trainable: list[str] | None = None,
        train_new_token_embeddings: bool = False,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.1,
        schedule: Literal["cosine", "wsd"] = "cosine",
        warmup: float = 2000,
        decay_fraction: float = 0.25,
        min_lr_ratio: float = 0.0,
        max_nonfinite_steps: int = 10,
        eval_topk: list[int] = [5, 10],  # noqa: B006 (jsonargparse needs a list; never mutated)
        eval_min_prob: float = 0.0,
        eval_vocabulary: str | None = None,
        eval_vocabulary_threshold: float = 0.1,
        semantic_metric: bool = True,
        embedder: str | None = None,
        log_images: int = 8,
        activation_checkpointing: bool = False,
        attention: Literal["auto", "dense", "compact", "flex"] = "auto",
        pad_to_multiple: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if Path(tokenizer).exists():  # a checkpoint must find its tokenizer from any working directory
            self.hparams.tokenizer = tokenizer = os.path.abspath(tokenizer)
        self.model = NXTP(
            NXTPConfig(vision, decoder, tokenizer, prompt, reference_compat, reset_label_positions),
            attention=attention,
            pad_to_multiple=pad_to_multiple,
        )
        self._set_trainable(trainable)
        if train_new_token_embeddings:
            self._train_rows(self.model.decoder.get_input_embeddings().weight, self.model.sequences.new_token_ids)
        if activation_checkpointing:
            self.model.decoder.gradient_checkpointing_enable()
            self.model.visual.set_grad_checkpointing(True)
        if compile:
            for block in self.model.decoder.get_decoder().layers:
                block.compile()
        if init_from is not None and Path(init_from).exists():  # a record that holds from any directory
            self.hparams.init_from = os.path.abspath(init_from)  # (a missing source fails in setup, not here)
        names = list(self.model.state_dict())
        for pattern in init_allow_missing or []:
            if not fnmatch.filter(names, pattern):
                raise ValueError(f"model.init_allow_missing: pattern {pattern!r} matches no tensor of the model")
        self._initialized_from: str | None = None
        self.nonfinite_steps = 0
        self._drop_gradients = False  # set by a skipped step, for the optimizer step that follows it
        self._restore_stats: list[torch.Tensor] | None = None  # ... and its running statistics, put back after backward
        self.train_skipped = dict.fromkeys(REJECT_REASONS, 0)  # since the run started, over every rank
        # Evaluation keeps only sums (torchmetrics states) and syncs them once per epoch: ranks may hold different
        # numbers of batches (shards are split between ranks), so no collective may run per batch.
        self.eval_loss = MeanMetric()  # weighted by counted tokens: the same mean whatever the batching
        self.eval_images = SumMetric()  # every sample is evaluated once: this is the size of the split
        self.eval_skipped: dict[str, float] = {}
        self.metrics = torch.nn.ModuleDict()
        for k in eval_topk:
            self.metrics[score_name("exact", k)] = ExactLabelScore()
            if semantic_metric:
                kwargs = {"embedder": embedder} if embedder else {}
                self.metrics[score_name("semantic", k)] = SemanticLabelScore(**kwargs)
        self.vocabulary = Vocabulary.from_file(eval_vocabulary) if eval_vocabulary else None
        if self.vocabulary is not None:
            self._candidates = tokenize(self.model, self.vocabulary)  # once, not per batch
            self._mapper = LabelMapper(self.vocabulary, embedder=embedder)
            self._entry_index = {entry.name: i for i, entry in enumerate(self.vocabulary.entries)}
            for name in ("vocab_scored", "vocab_mapped"):
                self.metrics[name] = VocabularyScore(len(self.vocabulary), eval_vocabulary_threshold)

    def _set_trainable(self, patterns: list[str] | None) -> None:
        if patterns is None:
            return
        names = [n for n, _ in self.model.named_parameters()]
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ValueError(f"model.trainable: pattern {pattern!r} matches no parameter")
        for name, param in self.model.named_parameters():
            param.requires_grad_(any(fnmatch.fnmatch(name, p) for p in patterns))

    def setup(self, stage: str) -> None:
        """Load ``init_from`` once, when a Trainer first sets the module up (not in ``__init__``, which
        ``load_from_checkpoint`` also runs: a fine-tuned checkpoint must not need its source to load). A resumed
        run's ``--ckpt_path`` is restored after this and replaces these weights."""
        path = self.hparams.get("init_from")
        if path is None or self._initialized_from == path:
            return
        kept = load_weights(self.model, read_weights(path), self.hparams.get("init_allow_missing") or [], source=path)
        self._initialized_from = path
        rank_zero_info(f"model.init_from: loaded {path}" + (f"; kept as built: {kept}" if kept else ""))

    @staticmethod
    def _train_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
        if weight.requires_grad:
            return  # the whole matrix trains already
        weight.requires_grad_(True)
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[rows] = 1
        weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The config and tokenizer travel inside the checkpoint, so that a checkpoint copied elsewhere still loads;
        # how long the run is meant to be (a run that got there is finished), its counts, and every rank's random
        # streams (each rank draws its own dropout and augmentation) let an interrupted run go on as it would have.
        save_model_record(checkpoint, self.model)
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        TrainingState(max_steps, dict(self.train_skipped), self.nonfinite_steps).save(checkpoint)
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank saves together
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        save_rng_states(checkpoint, states)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = TrainingState.load(checkpoint)
        self.train_skipped.update(state.skipped)
        self.nonfinite_steps = state.nonfinite_steps
        restore_rng_state(checkpoint, self.global_rank)

    # training -------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        running_stats = [b.clone() for b in self._running_stats()]
        loss, n_tokens = self.model(batch["pixels"], batch["text"])
        bs = len(batch["keys"])
        skip = self._count_step(batch["skipped"], loss)
        if skip:  # backward still runs (with DDP, every rank must take part); its gradients are dropped
            self._skip_nonfinite(loss, batch, running_stats)
        # A skipped step's loss is logged as NaN: Lightning would write the last value again for a key not logged.
        self.log("train/loss", float("nan") if skip else loss, prog_bar=True, batch_size=bs)
        self._log_throughput(bs, n_tokens.item())
        return loss

    def _count_step(self, skipped: dict[str, int], loss: torch.Tensor) -> bool:
        """Add this step's skipped samples of every rank to the run's totals, logged as ``train/skipped/<reason>``
        (a total, so that no count is lost between the steps that are logged); True if the loss of any rank is not
        finite. One all-reduce of a small vector per step with several ranks: every rank then skips the same
        steps (a rank that skipped alone would leave the others waiting in the gradient all-reduce)."""
        rejected = torch.tensor([skipped.get(reason, 0) for reason in REJECT_REASONS], device=loss.device)
        counts = self._sum_over_ranks(torch.cat([(~torch.isfinite(loss.detach())).long().view(1), rejected]))
        for reason, count in zip(REJECT_REASONS, counts[1:]):
            self.train_skipped[reason] += count
            if self.train_skipped[reason]:
                self.log(f"train/skipped/{reason}", float(self.train_skipped[reason]), batch_size=1)
        return counts[0] > 0

    def _sum_over_ranks(self, counts: torch.Tensor) -> list[int]:
        """``counts`` (a vector of the same length on every rank) summed over every rank, in one all-reduce."""
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return counts.tolist()

    def _running_stats(self) -> list[torch.Tensor]:
        """The buffers a training forward changes: the running statistics of BatchNorm layers (the conv stem)."""
        return [
            buffer
            for module in self.model.modules()
            if isinstance(module, torch.nn.modules.batchnorm._NormBase)
            for buffer in module.buffers(recurse=False)
        ]

    def _skip_nonfinite(self, loss, batch, running_stats: list[torch.Tensor]) -> None:
        """Skip a step where the loss of some rank is not finite, on every rank (see ``_count_step``), leaving the
        model as it was: the running statistics the forward changed are put back after backward (which still reads
        them), and the step's gradients are dropped before the optimizer step (``on_before_optimizer_step``;
        Lightning refuses a training step that returns None under DDP, and a GradScaler skips such a step itself)."""
        self._restore_stats, self._drop_gradients = running_stats, True
        self.nonfinite_steps += 1
        here = not torch.isfinite(loss)
        where = "on another rank"
        if here:
            world = self.trainer.world_size if self._trainer is not None else 1
            where = f"batch samples {batch['keys'][:8]}" + (f" on rank {self.global_rank}" if world > 1 else "")
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=len(batch["keys"]))
        if self.nonfinite_steps > self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss is not finite for the {self.nonfinite_steps}th time (more than "
                f"model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}); {where}"
            )
        (warnings.warn if here else rank_zero_warn)(f"skipping step {self.global_step}: loss is not finite ({where})")

    def on_train_epoch_start(self) -> None:
        self._step_started = None  # waiting for the first batch is not throughput

    def _log_throughput(self, images: int, tokens: int) -> None:
        """Images and counted tokens per second on this device, from one training step to the next."""
        now = time.perf_counter()
        if getattr(self, "_step_started", None) is not None:
            elapsed = now - self._step_started
            self.log("train/images_per_sec", images / elapsed, batch_size=images)
            self.log("train/tokens_per_sec", tokens / elapsed, batch_size=images)
        self._step_started = now

    def on_after_backward(self) -> None:
        if self._restore_stats is not None:
            with torch.no_grad():
                for buffer, saved in zip(self._running_stats(), self._restore_stats):
                    buffer.copy_(saved)
            self._restore_stats = None

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._drop_gradients:  # a skipped step (with gradient accumulation: one of its micro-batches)
            self._drop_gradients = False
            for param in self.parameters():
                param.grad = None  # AdamW leaves a parameter without a gradient as it is
            self.log("train/grad_norm", float("nan"))
            return
        norms = grad_norm(self.model, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("trainer.max_steps must be set: the lr schedule needs the number of steps")
        warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
        factor = warmup_schedule(hp.schedule, int(total), max(1, warmup), hp.decay_fraction, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # evaluation -----------------------------------------------------------------------------------------

    def _evaluate(self, batch, batch_idx: int, stage: str):
        for reason, count in batch["skipped"].items():
            self.eval_skipped[reason] = self.eval_skipped.get(reason, 0) + count
        if not batch["keys"]:
            return  # a batch that only carries rejects (datamodules.webdataset.carry_leftovers)
        loss, n_tokens = self.model(batch["pixels"], batch["text"])
        self.eval_loss.update(loss, n_tokens)
        self.eval_images.update(len(batch["keys"]))
        # The paper's protocol: the top-k labels come from a sampling with exactly k branches (cutting a top-10
        # sampling would let branches 6-10 merge into and outrank the top-5 labels).
        predictions = {
            k: recognize(self.model, batch["pixels"], topk=k, min_prob=self.hparams.eval_min_prob)
            for k in self.hparams.eval_topk
        }
        for k, labels in predictions.items():
            labels = [[label for label, _ in p] for p in labels]
            self.metrics[score_name("exact", k)].update(labels, batch["labels"])
            if self.hparams.semantic_metric:
                self.metrics[score_name("semantic", k)].update(labels, batch["labels"])
        if self.vocabulary is not None:
            self._evaluate_vocabulary(batch, predictions[max(predictions)])
        if stage == "val" and batch_idx == 0 and self.trainer.is_global_zero:
            self._log_predictions(batch, predictions[max(predictions)])

    def _evaluate_vocabulary(self, batch, open_set: list[list[tuple[str, float]]]) -> None:
        """Closed-set scores over ``model.eval_vocabulary``: every entry scored exactly, and the open-set labels
        mapped onto the entries (an entry's score: the summed probability of the labels mapped to it)."""
        targets = vocabulary_targets(self.vocabulary, batch["labels"]).to(batch["pixels"].device)
        scored = score_vocabulary(self.model, batch["pixels"], self._candidates, len(self.vocabulary))
        self.metrics["vocab_scored"].update(scored.float(), targets)
        mapped = torch.zeros_like(targets, dtype=torch.float32)
        for row, labels in enumerate(open_set):
            for name, p in self._mapper.map(labels):
                mapped[row, self._entry_index[name]] = p
        self.metrics["vocab_mapped"].update(mapped, targets)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics) before an evaluation, once, and stop DDP from
        doing it in the first evaluation forward: that is a collective per batch, and a rank with fewer batches
        than the others (or none) would leave them waiting in it for ever."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for buffer in self.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            wrapper.require_forward_param_sync = False  # set again by the next training forward

    def _log_metrics(self, stage: str) -> None:
        """Log the epoch's loss, scores and skip counts, reduced over every rank (each rank calls this once).

        ``compute()`` has already summed the states of all ranks, so every rank logs the same values; ``sync_dist``
        only averages those equal values (one collective per key, the same keys in the same order on every rank).
        """
        if self.eval_images.compute() == 0 and not self.trainer.sanity_checking:  # summed over ranks: all raise
            limit = getattr(self.trainer, f"limit_{stage}_batches")
            read = "" if limit == 1.0 else f" in the batches read (trainer.limit_{stage}_batches={limit})"
            raise RuntimeError(
                f"{stage}: no sample of data.{stage}_shards could be evaluated{read}: every shard "
                f"empty, unreadable or rejected (see rejects.jsonl); there is no score to report"
            )
        for name, metric in (("loss", self.eval_loss), ("images", self.eval_images)):
            self.log(f"{stage}/{name}", metric.compute(), sync_dist=True)
            metric.reset()
        shown = {score_name("exact", k) for k in self.hparams.eval_topk}  # their F1 in the progress bar
        for name, metric in self.metrics.items():
            for key, value in metric.compute().items():
                self.log(f"{stage}/{name}/{key}", value, prog_bar=key == "f1" and name in shown, sync_dist=True)
            metric.reset()
        skipped = torch.tensor([self.eval_skipped.get(reason, 0) for reason in REJECT_REASONS], device=self.device)
        for reason, count in zip(REJECT_REASONS, self._sum_over_ranks(skipped)):
            if count:
                self.log(f"{stage}/skipped/{reason}", float(count), sync_dist=True)
        self.eval_skipped = {}

    def on_validation_epoch_start(self):
        self._sync_buffers()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_start(self):
        self._sync_buffers()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self):
        self._log_metrics("test")

    def predict_step(self, batch, batch_idx):
        if not batch["keys"]:
            return []
        preds = recognize(
            self.model, batch["pixels"], topk=max(self.hparams.eval_topk), min_prob=self.hparams.eval_min_prob
        )
        return [{"key": k, "labels": p} for k, p in zip(batch["keys"], preds)]

    def _log_predictions(self, batch, predictions) -> None:
        """``val/predictions``: validation images with the true and predicted labels, and below each image where its
        top-3 labels look (``attention_maps``' default map)."""
        experiment = getattr(self.logger, "experiment", None)
        if self.hparams.log_images <= 0 or not hasattr(experiment, "add_image"):
            return
        n = min(self.hparams.log_images, len(predictions))
        top3 = [[label for label, _ in p[:3]] for p in predictions[:n]]
        # Validation runs in inference mode; the gradient-weighted maps need autograd (on a copy of the pixels).
        with torch.inference_mode(False), torch.enable_grad():
            maps = explain(self.model, batch["pixels"][:n].clone(), top3)
        tiles = []
        for i in range(n):
            image = pixels_to_image(self.model, batch["pixels"][i])
            overlays = [(m.label, overlay(image, m.grid, min_size=1)) for m in maps[i]]
            tiles.append(caption_tile(image, batch["labels"][i], predictions[i][:5], overlays))
        grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
        for i, tile in enumerate(tiles):
            grid.paste(tile, (i * tiles[0].width, 0))
        experiment.add_image("val/predictions", np.asarray(grid), self.global_step, dataformats="HWC")


def caption_tile(
    image: Image.Image,
    truth: list[str],
    predicted: list[tuple[str, float]],
    maps: list[tuple[str, Image.Image]] = (),
    size: int = 160,
) -> Image.Image:
    """The image enlarged, with the true labels and the predicted ones (with probabilities) written below, then
    the given maps (label, overlay) side by side under their labels."""
    lines = ["true: " + ", ".join(sorted(truth))] + [f"{p:.2f} {label}" for label, p in predicted]
    text_height = 12 * len(lines) + 4
    small = size // 3
    tile = Image.new("RGB", (size, size + text_height + (small + 14 if maps else 0)), "white")
    tile.paste(image.resize((size, size), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    for j, line in enumerate(lines):
        draw.text((3, size + 2 + 12 * j), line[:30], fill="black")
    for j, (label, picture) in enumerate(maps[:3]):
        x, y = j * small, size + text_height
        draw.text((x + 2, y), label[:8], fill="black")
        tile.paste(picture.resize((small - 2, small - 2), Image.Resampling.BILINEAR), (x + 1, y + 13))
    return tile
