"""The LightningModule: NXTP training, evaluation (one-shot sampling, or the paper's baselines), and logging."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, SumMetric

from datamodules.webdataset import REJECT_REASONS

from .batch import Batch, ModelInputs
from .calibration import CalibrationMonitor
from .callbacks import RandomStreams, Throughput, ValidationPredictions
from .checkpoint import TrainingState, load_weights, read_weights, save_model_record
from .metrics import ExactLabelScore, PerLabelScore, SemanticLabelScore, per_label_topk, score_name
from .nonfinite import NonFiniteGuard, restore_stats, save_stats
from .nxtp import NXTP, Attention, NXTPConfig
from .optimization import OptimizationConfig, build_optimizer, set_trainable, train_rows
from .per_label import PER_LABEL_FILE, label_scores, markdown_report, write_csv
from .sampling import Sampler, label_images, recognize
from .vocabulary import LabelMapper, Vocabulary, VocabularyScore, score_vocabulary, tokenize, vocabulary_targets


@dataclass(frozen=True)
class EvaluationConfig:
    """How validation and test score a model (``model.evaluation.*`` in a config).

    Args:
        topk: the top-k cut-offs at which recall, precision and F1 are reported.
        min_prob: labels below this probability are dropped before scoring.
        vocabulary: a vocabulary file (``nxtp label --vocabulary``'s format); validation and test then also
            report closed-set scores over it: ``vocab_scored/*`` (every entry scored exactly, ``vocabulary``) and
            ``vocab_mapped/*`` (the open-set labels at the largest ``topk`` mapped onto it): mAP, and recall,
            precision and F1 of the entries at or above ``vocabulary_threshold``.
        semantic_metric: also report the paper's semantic scores (sentence-embedding similarity).
        embedder: sentence embedder for the semantic scores; None uses the offline all-MiniLM-L6-v2 copy.
        log_images: how many validation images to log with their predicted labels (``val/predictions``).
        sampler: how labels are read from the model: ``one-shot`` (NXTP's; the top-k labels come from a sampling
            with exactly k branches), or the paper's baselines ``greedy`` and ``beam`` (``beams`` beams: the label
            list generated as text, its k most probable labels scored at top-k).
    """

    topk: list[int] = field(default_factory=lambda: [5, 10])
    min_prob: float = 0.0
    vocabulary: str | None = None
    vocabulary_threshold: float = 0.1
    semantic_metric: bool = True
    embedder: str | None = None
    log_images: int = 8
    sampler: Sampler = "one-shot"
    beams: int = 3

    def __post_init__(self) -> None:
        if self.sampler not in Sampler.__args__:
            raise ValueError(f"model.evaluation.sampler={self.sampler!r}: choose one of {Sampler.__args__}")
        if self.beams < 1:
            raise ValueError(f"model.evaluation.beams={self.beams}: beam search needs at least 1 beam")


@dataclass(frozen=True)
class SpeedConfig:
    """How fast and in how much memory (``model.speed.*``); results do not depend on them.

    Args:
        activation_checkpointing: recompute block activations in the backward pass to save memory.
        attention / pad_to_multiple: see ``NXTP``; how the label-masked attention is computed (``auto``, ``dense``,
            ``compact``, ``flex``) and the multiple the training sequences are padded to.
        compile: ``torch.compile`` every decoder block (each block is compiled in place, so parameter names and
            checkpoints are unchanged). The first steps are slow while it compiles, and each new sequence length
            may recompile: set ``pad_to_multiple`` (e.g. 64) to keep the lengths few.
    """

    activation_checkpointing: bool = False
    attention: Attention = "auto"
    pad_to_multiple: int | None = None
    compile: bool = False


class LitNXTP(L.LightningModule):
    """NXTP as a LightningModule: the model (``nxtp``: ``NXTPConfig``), how it trains (``optimization``), how it is
    scored (``evaluation``) and how fast it runs (``speed``), the sections of ``configs/model/*.yaml``.

    Beside the model it keeps the run's counts (skipped samples by reason and non-finite steps, over every rank,
    saved in checkpoints) and the evaluation metrics; it asks Lightning for the callbacks it relies on
    (``configure_callbacks``: random streams in checkpoints, the validation picture, throughput).
    """

    def __init__(
        self,
        nxtp: NXTPConfig,
        # frozen dataclasses: a shared default cannot be changed by one module for the others
        optimization: OptimizationConfig = OptimizationConfig(),  # noqa: B008
        evaluation: EvaluationConfig = EvaluationConfig(),  # noqa: B008
        speed: SpeedConfig = SpeedConfig(),  # noqa: B008
    ) -> None:
        super().__init__()
        # LitNXTP.load_from_checkpoint (and from_config) pass plain data: the form saved below
        nxtp = nxtp if isinstance(nxtp, NXTPConfig) else NXTPConfig.from_dict(nxtp, "model.nxtp")
        optimization, evaluation, speed = (
            value if isinstance(value, kind) else kind(**value)
            for value, kind in (
                (optimization, OptimizationConfig),
                (evaluation, EvaluationConfig),
                (speed, SpeedConfig),
            )
        )
        if Path(nxtp.tokenizer).exists():  # a checkpoint must find its tokenizer from any working directory
            nxtp = replace(nxtp, tokenizer=os.path.abspath(nxtp.tokenizer))
        if optimization.init_from is not None and Path(optimization.init_from).exists():  # (a missing source
            optimization = replace(optimization, init_from=os.path.abspath(optimization.init_from))  # fails in setup)
        # Plain data: what a checkpoint stores, TensorBoard shows and a weights-only load reads back.
        groups = {"optimization": optimization, "evaluation": evaluation, "speed": speed}
        self.save_hyperparameters({"nxtp": nxtp.to_dict(), **{k: asdict(v) for k, v in groups.items()}})
        self.optimization, self.evaluation, self.speed = optimization, evaluation, speed
        self.model = NXTP(nxtp, attention=speed.attention, pad_to_multiple=speed.pad_to_multiple)
        set_trainable(self.model, optimization.trainable)
        if optimization.train_new_token_embeddings:
            train_rows(self.model.decoder.get_input_embeddings().weight, self.model.sequences.new_token_ids)
        if speed.activation_checkpointing:
            self.model.decoder.gradient_checkpointing_enable()
            self.model.visual.set_grad_checkpointing(True)
        if speed.compile:
            for block in self.model.decoder.get_decoder().layers:
                block.compile()
        names = list(self.model.state_dict())
        for pattern in optimization.init_allow_missing or []:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"model.optimization.init_allow_missing: pattern {pattern!r} matches no tensor of the model"
                )
        self._initialized_from: str | None = None
        self.guard = NonFiniteGuard(self.model, optimization.max_nonfinite_steps)
        self.train_skipped = dict.fromkeys(REJECT_REASONS, 0)  # since the run started, over every rank
        self.flops_per_batch: float | None = None  # for ThroughputMonitor's MFU: measured on devices of known peak
        # Evaluation keeps only sums (torchmetrics states) and syncs them once per epoch: ranks may hold different
        # numbers of batches (shards are split between ranks), so no collective may run per batch.
        self.eval_loss = MeanMetric()  # weighted by counted tokens: the same mean whatever the batching
        self.eval_images = SumMetric()  # every sample is evaluated once: this is the size of the split
        self.eval_skipped: dict[str, float] = {}
        self.metrics = torch.nn.ModuleDict()
        for k in evaluation.topk:
            self.metrics[score_name("exact", k)] = ExactLabelScore()
            if evaluation.semantic_metric:
                kwargs = {"embedder": evaluation.embedder} if evaluation.embedder else {}
                self.metrics[score_name("semantic", k)] = SemanticLabelScore(**kwargs)
        self.vocabulary = Vocabulary.from_file(evaluation.vocabulary) if evaluation.vocabulary else None
        if self.vocabulary is not None:
            self._candidates = tokenize(self.model, self.vocabulary)  # once, not per batch
            self._mapper = LabelMapper(self.vocabulary, embedder=evaluation.embedder)
            self._entry_index = {entry.name: i for i, entry in enumerate(self.vocabulary.entries)}
            for name in ("vocab_scored", "vocab_mapped"):
                self.metrics[name] = VocabularyScore(len(self.vocabulary), evaluation.vocabulary_threshold)
        # The test's exact-label matches label by label (``_report_per_label``), at top-5 or the nearest topk.
        self.per_label = PerLabelScore()
        self.per_label_k = per_label_topk(evaluation.topk)

    @classmethod
    def from_config(cls, config: dict) -> LitNXTP:
        """Build from a ``model`` section as plain data, the form of ``configs/model/*.yaml``: ``nxtp`` (with
        dataclasses or dicts for its vision and decoder) and the optional ``optimization``, ``evaluation`` and
        ``speed``; an unknown section is an error naming it."""
        unknown = sorted(set(config) - {"nxtp", "optimization", "evaluation", "speed"})
        if unknown:
            raise ValueError(f"model: unknown sections {unknown}; LitNXTP takes nxtp, optimization, evaluation, speed")
        return cls(**config)  # each section as a dict or its config class: __init__ takes either

    @property
    def inputs(self) -> ModelInputs:
        """What the data pipeline needs from the model (linked to ``data.inputs`` by ``nxtp fit``)."""
        return self.model.inputs

    def configure_callbacks(self) -> list[L.Callback]:
        return [RandomStreams(), ValidationPredictions(self.evaluation.log_images), Throughput(), CalibrationMonitor()]

    def setup(self, stage: str) -> None:
        """Load ``optimization.init_from`` once, when a Trainer first sets the module up (not in ``__init__``, which
        ``load_from_checkpoint`` also runs: a fine-tuned checkpoint must not need its source to load). A resumed
        run's ``--ckpt_path`` is restored after this and replaces these weights."""
        path = self.optimization.init_from
        if path is None or self._initialized_from == path:
            return
        kept = load_weights(self.model, read_weights(path), self.optimization.init_allow_missing or [], source=path)
        self._initialized_from = path
        rank_zero_info(f"model.optimization.init_from: loaded {path}" + (f"; kept as built: {kept}" if kept else ""))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The config and tokenizer travel inside the checkpoint, so that a checkpoint copied elsewhere still loads;
        # how long the run is meant to be (a run that got there is finished) and its counts go on when it resumes.
        save_model_record(checkpoint, self.model)
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        TrainingState(max_steps, dict(self.train_skipped), self.guard.skipped).save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = TrainingState.load(checkpoint)
        self.train_skipped.update(state.skipped)
        self.guard.skipped = state.nonfinite_steps

    # training -------------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.guard.before_forward()
        loss, n_tokens = self.model(batch.pixels, batch.text)
        skip = self._count_step(batch.skipped, loss)
        if skip:  # backward still runs (with DDP, every rank must take part); its gradients are dropped
            self._skip(loss, batch)
        # A skipped step's loss is logged as NaN: Lightning would write the last value again for a key not logged.
        self.log("train/loss", float("nan") if skip else loss, prog_bar=True, batch_size=len(batch.keys))
        return loss

    def _count_step(self, skipped: dict[str, int], loss: torch.Tensor) -> bool:
        """Add this step's skipped samples of every rank to the run's totals, logged as ``train/skipped/<reason>``
        (a total, so that no count is lost between the steps that are logged); True if the loss of any rank is not
        finite. One all-reduce of a small vector per step with several ranks: every rank then skips the same
        steps (see ``NonFiniteGuard``)."""
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

    def _skip(self, loss: torch.Tensor, batch: Batch) -> None:
        here = not torch.isfinite(loss)
        where = "on another rank"
        if here:
            world = self.trainer.world_size if self._trainer is not None else 1
            where = f"batch samples {batch.keys[:8]}" + (f" on rank {self.global_rank}" if world > 1 else "")
        self.guard.skip(self.global_step, here, where)
        self.log("train/nonfinite_steps", float(self.guard.skipped), batch_size=len(batch.keys))
        if not here:
            rank_zero_warn(f"skipping step {self.global_step}: loss is not finite ({where})")

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self.flops_per_batch is None and get_available_flops(self.device, torch.get_default_dtype()):
            self.flops_per_batch = self.measure_flops(batch)

    def measure_flops(self, batch: Batch) -> float:
        """FLOPs of one training step (forward and backward) on ``batch``, counted by torch's FlopCounterMode; the
        model, its gradients and the random streams are left as they were."""
        stats = save_stats(self.model)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            flops = measure_flops(self.model, lambda: self.model(batch.pixels, batch.text)[0], lambda loss: loss)
        self.model.zero_grad(set_to_none=True)
        restore_stats(self.model, stats)
        return float(flops)

    def on_after_backward(self) -> None:
        self.guard.after_backward()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.guard.drop_gradients(self.parameters()):
            self.log("train/grad_norm", float("nan"))
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:  # one norm over every gradient (a single host sync; under FSDP, of the sharded gradients)
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, norm_type=2.0))

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimization, self.trainer.estimated_stepping_batches)

    # evaluation -----------------------------------------------------------------------------------------

    def _evaluate(self, batch: Batch, per_label: bool = False) -> list[list[tuple[str, float]]] | None:
        for reason, count in batch.skipped.items():
            self.eval_skipped[reason] = self.eval_skipped.get(reason, 0) + count
        if not batch.keys:
            return  # a batch that only carries rejects (datamodules.webdataset.carry_leftovers)
        loss, n_tokens = self.model(batch.pixels, batch.text)
        self.eval_loss.update(loss, n_tokens)
        self.eval_images.update(len(batch.keys))
        # The paper's protocol: the top-k labels come from a sampling with exactly k branches (cutting a top-10
        # sampling would let branches 6-10 merge into and outrank the top-5 labels).
        evaluation = self.evaluation
        if evaluation.sampler == "one-shot":
            predictions = {
                k: recognize(self.model, batch.pixels, topk=k, min_prob=evaluation.min_prob) for k in evaluation.topk
            }
        else:  # one generated list per image, cut at each k
            generated = label_images(
                self.model,
                batch.pixels,
                evaluation.sampler,
                max(evaluation.topk),
                evaluation.min_prob,
                evaluation.beams,
            )
            predictions = {k: [labels[:k] for labels in generated] for k in evaluation.topk}
        for k, labels in predictions.items():
            labels = [[label for label, _ in p] for p in labels]
            self.metrics[score_name("exact", k)].update(labels, batch.labels)
            if self.evaluation.semantic_metric:
                self.metrics[score_name("semantic", k)].update(labels, batch.labels)
            if per_label and k == self.per_label_k:
                self.per_label.update(labels, batch.labels)
        if self.vocabulary is not None:
            self._evaluate_vocabulary(batch, predictions[max(predictions)])
        return predictions[max(predictions)]  # the outputs callbacks read (ValidationPredictions)

    def _evaluate_vocabulary(self, batch: Batch, open_set: list[list[tuple[str, float]]]) -> None:
        """Closed-set scores over ``model.evaluation.vocabulary``: every entry scored exactly, and the open-set labels
        mapped onto the entries (an entry's score: the summed probability of the labels mapped to it)."""
        targets = vocabulary_targets(self.vocabulary, batch.labels).to(batch.pixels.device)
        scored = score_vocabulary(self.model, batch.pixels, self._candidates, len(self.vocabulary))
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
        shown = {score_name("exact", k) for k in self.evaluation.topk}  # their F1 in the progress bar
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

    def validation_step(self, batch: Batch, batch_idx: int):
        return self._evaluate(batch)

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_start(self):
        self._sync_buffers()

    def test_step(self, batch: Batch, batch_idx: int):
        return self._evaluate(batch, per_label=True)

    def on_test_epoch_end(self):
        self._log_metrics("test")
        self._report_per_label()

    def _report_per_label(self) -> None:
        """The test's exact-label recall, precision and F1 of every label (``PER_LABEL_FILE`` in the run's log folder)
        and its worst and best labels as Markdown tables in TensorBoard's text tab (``test/per_label``). Every rank
        calls this: the counts are gathered from all of them, and rank 0 writes."""
        counts = self.per_label.compute()
        self.per_label.reset()
        log_dir = self.trainer.log_dir  # on every rank: with several ranks this is a collective
        if not self.trainer.is_global_zero or log_dir is None:
            return
        scores = label_scores(counts["labels"])
        path = write_csv(scores, Path(log_dir) / PER_LABEL_FILE)
        rank_zero_info(f"per-label test scores ({len(scores)} labels): {path}")
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            report = markdown_report(scores, self.per_label_k, counts["images"])
            experiment.add_text("test/per_label", report, self.global_step)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        if not batch.keys:
            return []
        ev = self.evaluation
        preds = label_images(self.model, batch.pixels, ev.sampler, max(ev.topk), ev.min_prob, ev.beams)
        return [{"key": k, "labels": p} for k, p in zip(batch.keys, preds)]
