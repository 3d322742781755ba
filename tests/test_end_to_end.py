"""End to end, as a user runs it: `nxtp fit` interrupted at every moment (a signal, a SLURM pre-emption) and
resumed, the same command twice giving the same losses, and a run too short to validate. (A run like
`make train`, then `nxtp label`: tests/test_readme.py.)"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import NXTP_CLI, assert_resumed_to_the_end, fit_command, nxtp_here, run, start_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.cli.train import resume_point

STEPS = 30  # validations every 10 steps; 256 samples in batches of 16 are 16 steps an epoch
STOP = 14  # the step the same command's runs are interrupted at, inside the training step


def command(shapes: Path, save_dir: Path, workers: int = 1) -> list[str]:
    """The command of this module's interrupted runs and of the uninterrupted one they compare with: its training
    data in epochs (not resampled), read by ``workers`` data workers (0 and 1 give the same batches), so that a run
    stopped at step ``STOP`` has validations on both sides of the stop and an epoch boundary of its data after it."""
    return fit_command(shapes, save_dir, STEPS) + ["--data.resampled", "false", "--data.num_workers", str(workers)]


def signal_at(moment: str, step: int, group: bool = False) -> list[str]:
    """The arguments that make a run send itself SIGTERM at ``moment`` of step ``step`` (``tests/signal_at.py``)."""
    return [
        "--trainer.callbacks+=tests.signal_at.SignalAt",
        "--trainer.callbacks.moment",
        moment,
        "--trainer.callbacks.step",
        str(step),
        "--trainer.callbacks.group",
        str(group),
    ]


def losses(save_dir: Path) -> dict[int, float]:
    """The training loss of each step of a run (its first value, where a resumed run logged a step again)."""
    events = EventAccumulator(str(save_dir / "default" / "version_0")).Reload()
    by_step: dict[int, float] = {}
    for event in events.Scalars("train/loss"):
        by_step.setdefault(event.step, event.value)
    return by_step


def final_loss(save_dir: Path) -> float:
    last = [loss for _, loss in sorted(losses(save_dir).items())][-10:]
    return sum(last) / len(last)


def scalars(save_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every value of ``tag`` a run logged, with its step, in order (a resumed run's included)."""
    events = EventAccumulator(str(save_dir / "default" / "version_0")).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def stop_and_resume(shapes: Path, save_dir: Path, stop: list[str], workers: int = 1) -> dict:
    """``command`` with ``stop`` (a ``signal_at``), what it left where it stopped (its step, whether it wrote the
    results of a finished run, its losses), then ``command`` again, which resumes it."""
    version = save_dir / "default" / "version_0"
    stopped = run(command(shapes, save_dir, workers) + stop)
    last = version / "checkpoints" / "last.ckpt"
    return {
        "stopped": stopped,
        "stopped_at": torch.load(last, weights_only=False)["global_step"] if last.exists() else None,
        "over": (version / "metrics.json").exists(),
        "losses": losses(save_dir) if stopped.returncode == 128 + signal.SIGTERM else {},
        "resumed": run(command(shapes, save_dir, workers)),
        "save_dir": save_dir,
        "version": version,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes) -> Path:
    """The save_dir of ``command`` run without interruption, the truth the interrupted runs compare with: run in
    this process (`conftest.nxtp_here`), the data read without a worker (the same batches, and no fork of this
    process)."""
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert nxtp_here(command(shapes, save_dir, workers=0)[len(NXTP_CLI) :], monkeypatch) == 0
    return save_dir


@pytest.fixture(scope="module")
def twice(tmp_path_factory, shapes) -> dict[str, dict]:
    """Two runs of one command, each interrupted inside the training step at step ``STOP`` and resumed: the same
    command twice (test_the_same_command_twice...), and the first is the run interrupted in training of
    test_a_run_interrupted_at_any_moment..."""
    tmp = tmp_path_factory.mktemp("twice")
    return {name: stop_and_resume(shapes, tmp / name, signal_at("training", STOP)) for name in ("first", "second")}


@pytest.mark.slow
def test_slurm_preemption_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, shapes):
    # A SLURM job as the sbatch scripts launch it: SLURM sends USR1 before pre-empting (--signal=USR1@120);
    # the run writes checkpoints/hpc_ckpt_1.ckpt, asks `scontrol requeue` and stops; the requeued job resumes from it.
    calls = tmp_path / "scontrol_calls.txt"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "nxtp",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    steps = 30
    root = tmp_path / "logs" / "default"
    command = fit_command(shapes, tmp_path / "logs", steps)
    proc = start_until(
        command,
        root / "version_0" / "checkpoints" / "last.ckpt",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0  # stopped by itself, without waiting for SLURM's SIGTERM
    assert calls.read_text().split() == ["requeue", "77"]
    hpc = root / "version_0" / "checkpoints" / "hpc_ckpt_1.ckpt"  # in the run's folder: no other run resumes it
    saved_at = torch.load(hpc, weights_only=False)["global_step"]
    assert 10 <= saved_at < steps
    assert not (root / "version_0" / "metrics.json").exists()  # the run is not over

    requeued = run(command, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {hpc}" in requeued.stdout
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    assert not (root / "version_1").exists()
    assert (root / "version_0" / "metrics.json").exists()  # written once, by the job that finished the run


def test_a_run_resumes_from_its_own_checkpoints_only(tmp_path):
    root = tmp_path / "default"
    first, second = root / "version_0" / "checkpoints", root / "version_1" / "checkpoints"
    for folder in (first, second):
        folder.mkdir(parents=True)
    torch.save({"global_step": 1000}, first / "hpc_ckpt_1.ckpt")  # run 0 was pre-empted at step 1000, then finished
    torch.save({"global_step": 2400}, first / "last.ckpt")
    torch.save({"global_step": 300}, second / "last.ckpt")  # run 1, a new run, stopped by SIGTERM at step 300
    path, version, state = resume_point(root)
    assert (path, version, state["global_step"]) == (second / "last.ckpt", "version_1", 300)
    torch.save({"global_step": 350}, second / "hpc_ckpt_1.ckpt")  # run 1 pre-empted later: its furthest state wins
    assert resume_point(root)[:2] == (second / "hpc_ckpt_1.ckpt", "version_1")
    (root / "version_2").mkdir()  # a run that stopped before its first checkpoint: the one before it continues
    assert resume_point(root)[1] == "version_1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment, step, group", [("training", STOP, False), ("validation", 10, True), ("checkpoint", 10, False)]
)
def test_a_run_interrupted_at_any_moment_resumes_and_ends_with_its_final_checkpoint(
    tmp_path, shapes, moment, step, group, uninterrupted, twice
):
    # group: the signal goes to the whole process group, as Ctrl-C in a terminal does, the data workers of the
    # validation under way included (which the run still reads from after the signal)
    if moment == "training":  # the first of the same command's two runs (the test below) is this one
        stopped = twice["first"]
    else:
        stopped = stop_and_resume(shapes, tmp_path / "logs", signal_at(moment, step, group), 1 if group else 0)
    interrupted, stopped_at, version = stopped["stopped"], stopped["stopped_at"], stopped["version"]
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-3000:]
    assert "stopped by SIGTERM" in interrupted.stdout
    assert step <= stopped_at <= step + 1  # at the end of the step under way (after the validation under way)
    assert not stopped["over"]  # the run is not over: no metrics.json

    # Until the signal it was the uninterrupted run, step for step: the same seed draws the same data.
    before = {step: loss for step, loss in stopped["losses"].items() if step < stopped_at}
    whole = losses(uninterrupted)
    assert before and before == pytest.approx({step: whole[step] for step in before}, rel=1e-5)
    assert_resumed_to_the_end(stopped["resumed"], version, STEPS, stopped_at)
    # It trained as far as a run that was never stopped (not bit for bit: the resumed run draws a stream of its own).
    assert abs(final_loss(stopped["save_dir"]) - final_loss(uninterrupted)) < 0.3 * final_loss(uninterrupted)


@pytest.mark.slow
def test_a_signal_during_a_test_stops_it_with_its_exit_status_and_no_results(tmp_path, shapes, uninterrupted):
    checkpoint = uninterrupted / "default" / "version_0" / "checkpoints" / "last.ckpt"
    command = [a if a != "fit" else "test" for a in fit_command(shapes, tmp_path / "logs", 30)]
    tested = run(
        command
        + [
            "--ckpt_path",
            str(checkpoint),
            "--data.test_shards",
            str(shapes / "test/shard-000000.tar"),
            "--trainer.callbacks+=tests.signal_at.SignalAt",
            "--trainer.callbacks.moment",
            "test",
            "--trainer.callbacks.step",
            "0",
        ]
    )
    assert tested.returncode == 128 + signal.SIGTERM, tested.stderr[-3000:]  # Lightning alone exits with 0
    assert "stopped by SIGTERM during test: no results written" in tested.stdout
    assert not list(tmp_path.glob("logs/**/metrics.json"))


@pytest.mark.slow
def test_a_run_shorter_than_the_validation_interval_tests_its_last_weights(tmp_path, shapes, monkeypatch, capsys):
    # What is checked is what `fit --test_after_fit` does without a validation, not the command (started as a user
    # does in the tests above): `nxtp fit` in this process.
    fit = fit_command(shapes, tmp_path / "logs", 4)[len(NXTP_CLI) :]
    code = nxtp_here(
        fit + ["--test_after_fit", "true", "--data.test_shards", str(shapes / "test/shard-000000.tar")], monkeypatch
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "no validation ran, so there is no best checkpoint: testing the last weights" in out
    metrics = json.loads((tmp_path / "logs" / "default" / "version_0" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["test/images"] == 32


@pytest.mark.slow
def test_the_same_command_twice_gives_the_same_losses_to_the_last_digit(twice):
    # Two runs of one command, each interrupted at step STOP and resumed, across validations (every 10 steps) and an
    # epoch boundary of its data worker (16 steps an epoch: the resumed run crosses it). Before the loss rows were
    # gathered with index_select, the first losses differed at about step 27 (two runs side by side).
    for name in ("first", "second"):
        stopped, resumed = twice[name]["stopped"], twice[name]["resumed"]
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
        assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    first, second = twice["first"]["save_dir"], twice["second"]["save_dir"]
    train = scalars(first, "train/loss")
    # every step but the one the signal ended, whose loss the stopped run does not log
    assert {s for s, _ in train} >= set(range(STEPS)) - {STOP}
    assert train == scalars(second, "train/loss")  # every digit
    validations = scalars(first, "val/loss")
    assert len(validations) >= 3 and validations == scalars(second, "val/loss")
