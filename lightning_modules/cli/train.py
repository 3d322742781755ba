"""``nxtp fit | validate | test | predict``: LightningCLI over ``LitNXTP`` and ``NXTPDataModule``, with automatic
resume of interrupted runs and ``--test_after_fit``."""

from __future__ import annotations

import json
import logging
import signal
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..callbacks import (
    HPC_CHECKPOINT,
    AttentionMaskImage,
    GracefulStop,
    Interrupted,
    SaveConfigToTensorBoard,
    SlurmRequeue,
    numbered,
)
from ..checkpoint import TrainingState, read_config
from ..checkpoint_io import load_checkpoint
from . import imported

# Lightning 2.6 flattens batches with torch's LeafSpec, which torch 2.9 deprecates: harmless, and printed at every
# fit, validation and test.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

# ... and advertises its hosted logger at every start.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡")
)

say = rank_zero_only(print)  # every rank runs the command line; one of them speaks


def resume_point(root: Path) -> tuple[Path, str, dict] | None:
    """Where an interrupted run continues: the furthest checkpoint of the newest ``version_N`` under a TensorBoard
    logger's ``save_dir/name`` that has one, that version's folder name, and the checkpoint (its tensors
    memory-mapped).

    The candidates are the version's ``checkpoints/last.ckpt`` (written at every validation, at the end, and on
    SIGTERM / Ctrl-C) and the ``checkpoints/hpc_ckpt_N.ckpt`` written when SLURM signals a job before pre-empting
    it (``#SBATCH --signal=USR1@120``, see ``callbacks.SlurmRequeue``). The highest global step wins; at a tie,
    the SLURM checkpoint (written for exactly this resume), then the newer file.
    """
    for version in reversed([v for _, v in sorted(numbered(root, "version_{}").items())]):
        folder = version / "checkpoints"
        hpc = set(numbered(folder, HPC_CHECKPOINT).values())
        candidates = [p for p in [folder / "last.ckpt", *hpc] if p.is_file()]
        if candidates:
            states = {p: load_checkpoint(p, mmap=True) for p in candidates}
            newest = max(candidates, key=lambda p: (states[p].get("global_step", 0), p in hpc, p.stat().st_mtime))
            return newest, version.name, states[newest]
    return None


class NXTPCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit`` (evaluate the best checkpoint after training) and ``--resume``
    (continue the newest run of the same logger from its newest checkpoint, in the same log folder; see
    ``resume_point``)."""

    def subcommands(self) -> dict[str, set[str]]:
        """LightningCLI's subcommands (with the Trainer arguments each skips), but only the one on the command line
        when it names one: each subcommand's parser costs a second of introspection at every start, and a run uses
        one. ``nxtp fit --help`` lists fit's options as before."""
        every = LightningCLI.subcommands()
        named = sys.argv[1] if len(sys.argv) > 1 else None
        return {named: every[named]} if named in every else every

    def add_arguments_to_parser(self, parser) -> None:
        # The data module makes batches for the model: it is given the model's tokenizer, prompt and preprocessing.
        parser.link_arguments("model.inputs", "data.inputs", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="run `test` on the best checkpoint after `fit`"
        )
        parser.add_argument(
            "--resume",
            type=bool,
            default=True,
            help="resume from the last checkpoint of the newest run when one exists (false: start anew)",
        )

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the model is built as the checkpoint's was (its architecture, tokenizer and prompt win
        over the config), and everything else (evaluation, speed, optimization) is what the command line says.
        LightningCLI would let every stored hyper-parameter override the command line, so that e.g.
        ``nxtp test --ckpt_path CKPT --model.evaluation.vocabulary FILE`` silently dropped the vocabulary."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        architecture = read_config(path).to_dict()
        self.config = self.parser.parse_object({subcommand: {"model": {"nxtp": architecture}}}, self.config)

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        config = self.config.fit
        logger = config.trainer.logger
        if not hasattr(logger, "init_args") or not str(logger.class_path).endswith("TensorBoardLogger"):
            return
        args = logger.init_args
        root = Path(args.save_dir) / (args.name or "lightning_logs")
        if config.trainer.default_root_dir is None:
            # On SLURM, Lightning resumes by itself from any hpc_ckpt_N.ckpt in default_root_dir, whichever run wrote
            # it; none is written in the logger's folder (SlurmRequeue writes into each run's checkpoints/), so here
            # resuming is left to resume_point, which knows which run a checkpoint belongs to.
            config.trainer.default_root_dir = str(root)
        found = resume_point(root) if config.get("resume") and not config.get("ckpt_path") else None
        if found is None:
            return
        path, version, state = found
        step, planned = state.get("global_step", 0), TrainingState.load(state).max_steps or config.trainer.max_steps
        if planned is not None and 0 < planned <= step:
            say(
                f"not resuming {path}: its run is finished (step {step} of {planned}), so a new run starts; "
                f"`--ckpt_path {path}` continues it on purpose"
            )
            return
        config.ckpt_path, args.version = str(path), version  # continue in the interrupted run's folder
        say(f"resuming from {path} at step {step} (--resume false starts a new run)")

    def after_instantiate_classes(self) -> None:
        imported()  # the model, the data and the trainer are built

    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None:
            # From the first training step to the end of training, validations included, summed over resumes.
            metrics["train_time_s"] = seconds = timer.time_elapsed("train")
            say(f"training: {self.trainer.global_step} steps in {seconds:.0f} s ({seconds / 60:.1f} min)")
        if self.config.fit.get("test_after_fit"):
            checkpoint = self.trainer.checkpoint_callback
            best = "best" if checkpoint is not None and checkpoint.best_model_path else None
            if best is None and self.trainer.is_global_zero:
                print("no validation ran, so there is no best checkpoint: testing the last weights")
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
            if self.trainer.is_global_zero and results:
                metrics.update(results[0])
                summary = {k: round(v, 4) for k, v in results[0].items() if "/f1" in k or k.endswith("/f")}
                print("test results:", json.dumps(summary))
        self._write_metrics(metrics)

    def after_test(self) -> None:
        self._write_metrics({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        """The run's final metrics as ``metrics.json`` in its log folder (what ``nxtp sweep`` tabulates)."""
        log_dir = self.trainer.log_dir  # on every rank: with several ranks this is a collective
        if not self.trainer.is_global_zero or log_dir is None:
            return
        checkpoint = self.trainer.checkpoint_callback
        metrics = {"global_step": self.trainer.global_step, **metrics}
        if checkpoint is not None and checkpoint.best_model_score is not None:
            metrics.update(best_checkpoint=checkpoint.best_model_path, best_score=float(checkpoint.best_model_score))
        path = Path(log_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1) + "\n")


def lightning_main() -> None:
    """Run LightningCLI with the project's module, data module and default callbacks."""
    from datamodules import NXTPDataModule

    from ..lit_nxtp import LitNXTP

    try:
        NXTPCLI(
            LitNXTP,
            NXTPDataModule,
            seed_everything_default=0,
            save_config_callback=SaveConfigToTensorBoard,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf+"},
            trainer_defaults={"callbacks": [AttentionMaskImage(), SlurmRequeue(), GracefulStop(), Timer()]},
        )
    except Interrupted as stop:  # a signal or a SLURM requeue ended the fit at a step boundary, to resume later
        say(stop.message)
        sys.exit(stop.code)
    except SIGTERMException:  # Lightning's own stop (a SystemExit with status 0), where GracefulStop is not in use
        say("stopped by SIGTERM: no results written")
        sys.exit(128 + signal.SIGTERM)
    finally:
        # Lightning leaves the process group up (a later trainer.test reuses it). Left to interpreter shutdown,
        # gloo's worker threads can outlive Python and abort the process ("terminate called without an active
        # exception", exit -6) after a run that succeeded.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
