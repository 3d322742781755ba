"""Callbacks that NXTP recipes need beyond Lightning's own."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import callbacks
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from .batch import Batch
from .checkpoint import restore_rng_state, rng_state, save_rng_states
from .locate import Location
from .masking import label_masked_attention
from .metrics import metric_tag


class GlobalBatchSize(L.Callback):
    """Keep the global batch fixed whatever the number of devices: sets ``trainer.accumulate_grad_batches`` to
    ``global_batch_size / (data.batch_size * world_size)`` before the optimizer and schedule are built.

    The paper trains with 512 images per step: 16 per GPU on 32 GPUs, or 16 per GPU with 4 accumulation steps
    on 8 GPUs.
    """

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = global_batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        per_device = trainer.datamodule.hparams.batch_size
        per_step = per_device * trainer.world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"GlobalBatchSize: global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.batch_size={per_device} x {trainer.world_size} devices"
            )
        trainer.accumulate_grad_batches = self.global_batch_size // per_step
        rank_zero_info(
            f"global batch {self.global_batch_size} = {per_device} per device x {trainer.world_size} "
            f"devices x {trainer.accumulate_grad_batches} accumulation steps"
        )


# TensorBoard: what the run is and what the model sees ------------------------------------------------------

# image grey, prompt blue, padding light grey; label blocks use the palette
BLOCK_COLOURS = {-1: (150, 150, 150), 0: (60, 110, 200), -2: (215, 215, 215)}
LABEL_PALETTE = [(230, 120, 40), (50, 160, 80), (200, 60, 60), (140, 90, 190), (40, 170, 170), (190, 170, 40)]


def attention_mask_image(seg: Tensor, mask: Tensor, min_size: int = 384) -> np.ndarray:
    """An RGB picture [H, W, 3] of one sequence's attention mask (rows: queries, columns: keys).

    A cell that may attend is coloured by its query's block (image grey, prompt blue, one colour per label);
    a masked cell is white. Enlarged with nearest-neighbour so that single tokens stay visible.
    """
    seg, mask = seg.cpu(), mask.cpu()
    colours = torch.tensor(
        [BLOCK_COLOURS.get(int(s)) or LABEL_PALETTE[(int(s) - 1) % len(LABEL_PALETTE)] for s in seg], dtype=torch.uint8
    )
    picture = torch.where(mask[..., None], colours[:, None, :], torch.full((1, 1, 3), 255, dtype=torch.uint8))
    scale = max(1, -(-min_size // len(seg)))
    return picture.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


class AttentionMaskImage(L.Callback):
    """Log the label-masked attention mask of the first training sample as an image, once per run.

    It shows at a glance that labels see the image and the prompt but not each other.
    """

    def __init__(self) -> None:
        self.logged = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if self.logged or not trainer.is_global_zero or not hasattr(experiment, "add_image"):
            return
        model = pl_module.model
        seg = model.segments(batch.text)[:1]
        picture = attention_mask_image(seg[0], label_masked_attention(seg)[0, 0])
        experiment.add_image("attention/label_masked_mask", picture, trainer.global_step, dataformats="HWC")
        self.logged = True


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config -> ``{"model.optimization.lr": 0.002, ...}`` with values TensorBoard's HParams tab can show."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # lists, None
            flat[name] = str(value)
    return flat


def hparam_metric_tags(eval_topk: list[int], semantic: bool) -> list[str]:
    """The scalar tags the HParams tab shows next to each run's hyper-parameters."""
    tags = ["train/loss", "val/loss"]
    for stage in ("val", "test"):
        for k in eval_topk:
            tags += [metric_tag(stage, "exact", k, m) for m in ("f1", "recall", "precision")]
            tags += [metric_tag(stage, "semantic", k, "f")] if semantic else []
    return tags


class SaveConfigToTensorBoard(SaveConfigCallback):
    """LightningCLI's config saving, plus the resolved config as text and as hyper-parameters in TensorBoard.

    The hyper-parameters are the flattened ``model.*``, ``data.*`` and scalar ``trainer.*`` keys, so that the
    HParams tab compares the runs of a sweep on exactly the keys that were swept.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        text = self.parser.dump(self.config, skip_none=False)
        # Four spaces make TensorBoard's markdown show the YAML as it is.
        experiment.add_text("config", "\n".join("    " + line for line in text.splitlines()), trainer.global_step)
        config = yaml.safe_load(text)
        params = {
            k: v
            for k, v in flat_config(config).items()
            if k.startswith(("model.", "data.", "seed_everything")) or (k.startswith("trainer.") and k.count(".") == 1)
        }
        evaluation = pl_module.evaluation
        tags = hparam_metric_tags(list(evaluation.topk), evaluation.semantic_metric)
        # The summaries name the metric tags only; their values are the scalars logged during the run.
        writer = experiment._get_file_writer()
        for summary in hparams(params, {tag: 0.0 for tag in tags}):
            writer.add_summary(summary)


HPC_CHECKPOINT = "hpc_ckpt_{}.ckpt"  # Lightning's name for SLURM pre-emption checkpoints, numbered from 1


def numbered(folder: Path, pattern: str) -> dict[int, Path]:
    """The files or folders in ``folder`` named ``pattern`` (one ``{}`` for a number: ``version_{}``,
    ``HPC_CHECKPOINT``), by number."""
    prefix, suffix = pattern.split("{}")
    found = {}
    for path in folder.glob(pattern.replace("{}", "*")):
        middle = path.name[len(prefix) : len(path.name) - len(suffix)]
        if middle.isdigit():
            found[int(middle)] = path
    return found


class SlurmRequeue(L.Callback):
    """SLURM pre-emption: on the warning signal (``#SBATCH --signal=USR1@120``), write ``hpc_ckpt_N.ckpt`` (and
    ``last.ckpt``) in the run's checkpoint folder, ask ``scontrol requeue`` for the job, and stop; the requeued job
    resumes from that checkpoint (see ``cli.train.resume_point``). In the run's own folder, not in
    ``trainer.default_root_dir`` as Lightning does, so that it cannot be taken for the checkpoint of a later run.

    Lightning's own requeue does all of this inside the signal handler, which deadlocks when the signal lands
    while the TensorBoard writer is flushing (the handler flushes it again). Here the handler only sets a flag,
    and the work happens at the end of the next training step, on every rank together.
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.listening = False  # only on SLURM; elsewhere the per-step check (a collective with DDP) is skipped
        self.signalled = False
        self.requeued = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Registered before the trainer sets its handlers, Lightning leaves this signal to us.
        if stage == "fit" and SLURMEnvironment.detect() and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)
            self.listening = True

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if (
            not self.listening
            or self.requeued
            or not trainer.strategy.reduce_boolean_decision(self.signalled, all=False)
        ):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath else trainer.default_root_dir)
        number = max(numbered(folder, HPC_CHECKPOINT), default=0) + 1
        trainer.save_checkpoint(folder / HPC_CHECKPOINT.format(number))
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
            code = subprocess.call(["scontrol", "requeue", job])
            (rank_zero_info if code == 0 else rank_zero_warn)(f"requeue of SLURM job {job}: scontrol exit code {code}")
        self.requeued = True
        save_last_checkpoints(trainer)
        raise Interrupted(0, f"stopped at step {trainer.global_step} for a SLURM requeue; the requeued job resumes")


# Interrupted runs ---------------------------------------------------------------------------------------------


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state: written at every validation
    and when training ends.

    Lightning 2.6 writes ``last.ckpt`` only at a step where it also writes a top-k checkpoint, so once the monitored
    metric stops improving ``last.ckpt`` falls behind, and a resumed run could end with a ``last.ckpt`` from an
    earlier step than its last.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_last_now(trainer)

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` for the current step unless it is written already (on every rank: a collective)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class Interrupted(SystemExit):
    """Raised on every rank together, at the end of a training step, to end ``fit`` for a later resume; ``code`` is
    the exit status of the process.

    Raising (rather than ``trainer.should_stop``, after which Lightning runs a whole validation first) stops at
    once, and the run skips what follows a finished fit (``test_after_fit``, ``metrics.json``).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


def save_last_checkpoints(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` of every ``ModelCheckpoint`` that keeps one, for the current step (on every rank)."""
    for checkpoint in trainer.checkpoint_callbacks:
        if isinstance(checkpoint, ModelCheckpoint):
            checkpoint.save_last_now(trainer)
        elif isinstance(checkpoint, callbacks.ModelCheckpoint) and checkpoint.save_last:
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


class GracefulStop(L.Callback):
    """SIGTERM or Ctrl-C (SIGINT) stop a run at the end of the current training step, on every rank together,
    after writing ``last.ckpt``; running the same command again resumes there (see ``cli.train.resume_point``).

    Lightning's own handling raises wherever each rank happens to be when the signal lands (inside validation,
    inside a checkpoint write, or between two collectives of different kinds on different ranks), which can leave
    the ranks waiting on each other for ever. Here the handler only records the signal (and passes it on to the
    ranks this process launched); the ranks agree on it once per training step, where they are in step anyway.
    A second signal to the launching process stops at once. Outside training (``nxtp validate``, ``test``,
    ``predict``, ``test_after_fit``) there is nothing to save: a signal stops at once, with 143 (SIGTERM) or 130
    (Ctrl-C) and no results written (Lightning would end a test with exit status 0).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signalled: signal.Signals | None = None
        self._launcher = None
        self._launching = False
        self._stage = "fit"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = str(getattr(stage, "value", stage))  # "fit", "validate", "test", "predict"
        self._listen(trainer)

    # Lightning installs its own handlers after on_fit_start; take the signals back before the loops start.
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen(trainer)

    def _listen(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._launcher = trainer.strategy.launcher
        self._launching = trainer.global_rank == 0
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal if self._stage == "fit" else self._stop_now)

    def _stop_now(self, signum: int, frame) -> None:
        if hasattr(self._launcher, "procs"):  # the ranks this process started stop too
            self._launcher.kill(signum)
        name = signal.Signals(signum).name
        raise Interrupted(128 + signum, f"stopped by {name} during {self._stage}: no results written")

    def _on_signal(self, signum: int, frame) -> None:
        if self.signalled is not None:
            if self._launching:  # asked twice: stop now (Lightning still saves on the way out, if it can)
                for s in self.SIGNALS:
                    signal.signal(s, signal.SIG_DFL)
                raise KeyboardInterrupt
            return  # a launched rank gets the signal twice (from its launcher and from the terminal's group)
        self.signalled = signal.Signals(signum)
        rank_zero_info(f"{self.signalled.name} received: stopping after this training step, with a checkpoint")
        if hasattr(self._launcher, "procs"):  # `--trainer.devices N` started the other ranks from this process
            self._launcher.kill(signum)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled is not None, all=False):
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the last step is done: the run ends as it would have (and is not resumed later)
        signum = self.signalled or signal.SIGTERM  # a rank that saw no signal stops with the others
        save_last_checkpoints(trainer)
        raise Interrupted(
            128 + signum, f"stopped by {signum.name} at step {trainer.global_step}; run the same command to resume"
        )


# What LitNXTP itself asks for (LitNXTP.configure_callbacks) ------------------------------------------------


class RandomStreams(L.Callback):
    """Every rank's random streams (torch, numpy, Python: dropout, augmentation, label order) saved in each
    checkpoint and continued on resume, so that an interrupted run draws what it would have drawn; each rank its
    own (see ``checkpoint.save_rng_states``). Every rank saves a checkpoint together, so gathering them is safe."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        save_rng_states(checkpoint, states)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        restore_rng_state(checkpoint, trainer.global_rank)


class ValidationPredictions(L.Callback):
    """``val/predictions``: the first validation batch's first ``n`` images with their true and predicted labels
    (with probabilities), and below each image where its top-3 labels look (``attention_maps``' default map).
    ``validation_step`` returns the predictions it scored."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx=0
    ) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if (
            batch_idx
            or not outputs
            or self.n <= 0
            or not trainer.is_global_zero
            or not hasattr(experiment, "add_image")
        ):
            return
        experiment.add_image(
            "val/predictions", self.grid(pl_module.model, batch, outputs), trainer.global_step, dataformats="HWC"
        )

    def grid(self, model, batch, predictions: list[list[tuple[str, float]]]) -> np.ndarray:
        """The tiles of the first ``n`` images side by side, as an RGB array [H, W, 3]."""
        from .attention_maps import explain, overlay, pixels_to_image
        from .locate import ViewGeometry, locate

        n = min(self.n, len(predictions))
        top3 = [[label for label, _ in p[:3]] for p in predictions[:n]]
        # Validation runs in inference mode; the gradient-weighted maps need autograd (on a copy of the pixels).
        with torch.inference_mode(False), torch.enable_grad():
            maps = explain(model, batch.pixels[:n].clone(), top3)
        tiles = []
        for i in range(n):
            image = pixels_to_image(model, batch.pixels[i])
            view = ViewGeometry.of(image.size, image.size)  # drawn on the view itself
            overlays = [(m.label, overlay(image, m.grid, min_size=1, scale_bar=False)) for m in maps[i]]
            where = [(m.label, p, locate(m.grid, view)) for m, (_, p) in zip(maps[i], predictions[i])]
            tiles.append(caption_tile(image, batch.labels[i], predictions[i][:5], overlays, where))
        grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
        for i, tile in enumerate(tiles):
            grid.paste(tile, (i * tiles[0].width, 0))
        return np.asarray(grid)


def caption_tile(
    image: Image.Image,
    truth: list[str],
    predicted: list[tuple[str, float]],
    maps: list[tuple[str, Image.Image]] = (),
    locations: list[tuple[str, float, Location]] = (),
    size: int = 160,
) -> Image.Image:
    """The image enlarged, with the ``locations`` (label, probability, ``locate.Location`` in the image's pixels)
    drawn on it as boxes and points, one colour each; the true labels and the predicted ones (with probabilities)
    written below, then the given maps (label, overlay) side by side under their labels."""
    from .attention_maps import LOCATION_COLOURS, draw_location

    lines = ["true: " + ", ".join(sorted(truth))] + [f"{p:.2f} {label}" for label, p in predicted]
    text_height = 12 * len(lines) + 4
    small = size // 3
    tile = Image.new("RGB", (size, size + text_height + (small + 14 if maps else 0)), "white")
    enlarged = image.resize((size, size), Image.Resampling.NEAREST)
    for (label, p, where), colour in zip(locations, LOCATION_COLOURS):
        draw_location(enlarged, label, p, where.point, where.box, size / image.width, colour)
    tile.paste(enlarged, (0, 0))
    draw = ImageDraw.Draw(tile)
    for j, line in enumerate(lines):
        draw.text((3, size + 2 + 12 * j), line[:30], fill="black")
    for j, (label, picture) in enumerate(maps[:3]):
        x, y = j * small, size + text_height
        draw.text((x + 2, y), label[:8], fill="black")
        tile.paste(picture.resize((small - 2, small - 2), Image.Resampling.BILINEAR), (x + 1, y + 13))
    return tile


class Throughput(callbacks.ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` over the last ``window`` steps: ``train/device/samples_per_sec`` (images),
    ``train/device/items_per_sec`` (text tokens, padding excluded), and ``train/device/mfu`` where the device's peak
    is known and the module measured its FLOPs per batch (``flops_per_batch``); summed over ranks without
    ``device/``. A batch of no samples (one that only carries a data worker's reject counts) is not a step of
    work: Lightning's counter refuses it, and it is passed over."""

    def __init__(self, window: int = 20) -> None:
        super().__init__(
            batch_size_fn=len,  # Batch.__len__: its images
            length_fn=Batch.token_count,
            window_size=window,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if batch.keys:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if batch.keys:
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if batch.keys:
            super().on_test_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if batch.keys:
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
