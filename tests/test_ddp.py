"""Multi-process training as users launch it: 2 gloo ranks on the CPU through Lightning (`--trainer.devices 2`) and
through `torchrun` as two "nodes" on 127.0.0.1. Every run has a deadline (conftest.run kills its whole process
group), so a hang fails the test in minutes."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    NXTP_CLI,
    ROOT,
    assert_resumed_to_the_end,
    fit_command,
    fit_overrides,
    group_alive,
    nxtp_here,
    run,
    start_until,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
DEADLINE = 300  # seconds for one multi-process run; the tiny runs take well under a minute alone


def write_uneven_shards(source: Path, out: Path, sizes: list[int]) -> list[Path]:
    """Split the samples of ``source`` (a shard) into shards of the given numbers of samples."""
    with tarfile.open(source) as tar:
        members = tar.getmembers()
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
        assert sum(sizes) <= len(keys), (sizes, len(keys))
        out.mkdir(parents=True)
        shards, start = [], 0
        for i, size in enumerate(sizes):
            chosen = set(keys[start : start + size])
            start += size
            shards.append(out / f"shard-{i:06d}.tar")
            with tarfile.open(shards[-1], "w") as dst:
                for m in members:
                    if m.name.split(".")[0] in chosen:
                        dst.addfile(m, tar.extractfile(m))
    return shards


def count_samples(shards: list[Path]) -> int:
    keys = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys |= {(shard, m.name.split(".")[0]) for m in tar.getmembers()}
    return len(keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event_files(version: Path) -> list[Path]:
    return sorted(version.glob("events.out.tfevents.*"))


# ddp_run's steps, and its first validation (which writes last.ckpt, and after which the SIGTERM comes): every 4
# training batches, 2 steps of 2 accumulated batches. The other 10 steps leave the signal time to land.
STEPS, FIRST_CHECKPOINT = 12, 2


def event_pids(files: list[Path]) -> set[str]:
    """The processes that wrote these TensorBoard event files (``events.out.tfevents.TIME.HOST.PID.N``)."""
    return {f.name.split(".")[4] for f in files}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shapes):
    """One 2-rank DDP fit with test_after_fit: one validation shard for two ranks (one rank gets none), and a test
    split of three shards of very different sizes read by 2 ranks x 2 workers. It is stopped by a SIGTERM to the
    launching process once it has written its first checkpoint, and the same command resumes it to the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    test_shards = write_uneven_shards(shapes / "test" / "shard-000000.tar", tmp / "test", [23, 7, 2])
    command = (
        fit_command(shapes, tmp / "logs", STEPS)
        + DDP
        + [
            "--test_after_fit",
            "true",
            "--model.evaluation.min_prob",
            "0",
            "--data.num_workers",
            "2",
            "--data.test_shards",
            str(tmp / "test" / "shard-{000000..000002}.tar"),
            "--trainer.val_check_interval",
            "4",
            "--trainer.callbacks+=lightning_modules.callbacks.GlobalBatchSize",
            "--trainer.callbacks.global_batch_size",
            "64",  # 16 per device x 2 devices x 2 accumulation steps
        ]
    )
    version = tmp / "logs" / "default" / "version_0"
    proc = start_until(
        command,
        version / "checkpoints" / "last.ckpt",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        proc.send_signal(signal.SIGTERM)  # rank 0 alone, as a scheduler or `kill PID` would
        out, err = proc.communicate(timeout=DEADLINE)
        deadline = time.time() + 60
        while time.time() < deadline and group_alive(proc.pid):  # rank 1, started by rank 0, ends too
            time.sleep(0.5)
        group_ended = not group_alive(proc.pid)
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    last = version / "checkpoints" / "last.ckpt"
    stopped = {
        "returncode": proc.returncode,
        "out": out,
        "err": err,
        "group_ended": group_ended,
        "at": torch.load(last, weights_only=False)["global_step"] if last.exists() else None,
        "event_files": event_files(version),
    }
    return {
        "stopped": stopped,
        "result": run(command, timeout=DEADLINE),  # the same command: it resumes the run and ends it
        "test_shards": test_shards,
        "version": version,
        "tmp": tmp,
        "command": command,
    }


@pytest.mark.slow
def test_a_ddp_fit_runs_to_the_end_and_writes_its_metrics(ddp_run):
    result, version = ddp_run["result"], ddp_run["version"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test results:" in result.stdout
    assert "global batch 64 = 16 per device x 2 devices x 2 accumulation steps" in result.stdout + result.stderr
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS
    assert metrics["test/images"] == count_samples(ddp_run["test_shards"]) == 32  # every test sample, once
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    # TensorBoard is written by rank 0 alone: the files of each start (the stopped one, then the resumed one) are
    # one process's, and each training step is logged once, but the step the signal ended, which the stopped run
    # does not log (an uninterrupted DDP run logs every step: test_a_finished_run_is_not_resumed...).
    stopped, stopped_at = ddp_run["stopped"]["event_files"], ddp_run["stopped"]["at"]
    resumed = sorted(set(event_files(version)) - set(stopped))
    assert len(event_pids(stopped)) == 1 and len(event_pids(resumed)) == 1, event_files(version)
    steps = [e.step for e in EventAccumulator(str(version)).Reload().Scalars("train/loss")]
    assert steps == sorted(set(steps)) and set(steps) >= set(range(STEPS)) - {(stopped_at or 0) - 1}


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_both_ranks_and_the_same_command_resumes_them(ddp_run):
    # ddp_run's first start, stopped by a SIGTERM to its launching process once it wrote its first checkpoint, and
    # resumed by the same command.
    stopped, version = ddp_run["stopped"], ddp_run["version"]
    assert stopped["group_ended"]  # rank 1 (and every data worker) ended with rank 0
    assert stopped["returncode"] == 128 + signal.SIGTERM, stopped["err"][-3000:]
    assert "stopped by SIGTERM" in stopped["out"]
    stopped_at = stopped["at"]
    assert FIRST_CHECKPOINT <= stopped_at < STEPS

    resumed = ddp_run["result"]
    assert f"resuming from {version / 'checkpoints' / 'last.ckpt'} at step {stopped_at}" in resumed.stdout
    assert_resumed_to_the_end(resumed, version, STEPS, stopped_at)


@pytest.mark.slow
def test_ddp_test_metrics_equal_a_single_process_test_of_the_same_checkpoint(ddp_run, monkeypatch):
    assert ddp_run["result"].returncode == 0, ddp_run["result"].stderr[-3000:]
    ddp = json.loads((ddp_run["version"] / "metrics.json").read_text())
    command = [
        a if a != "fit" else "test" for a in ddp_run["command"][: ddp_run["command"].index("--trainer.strategy")]
    ]
    # The truth: `nxtp test` of the same checkpoint in one process, this one (the command is ddp_run's)
    code = nxtp_here(
        command[len(NXTP_CLI) :]
        + [
            "--model.evaluation.min_prob",
            "0",
            "--data.num_workers",
            "0",
            "--data.test_shards",
            str(ddp_run["tmp"] / "test" / "shard-{000000..000002}.tar"),
            "--ckpt_path",
            ddp["best_checkpoint"],
            "--trainer.logger.init_args.save_dir",
            str(ddp_run["tmp"] / "single"),
        ],
        monkeypatch,
    )
    assert code == 0
    alone = json.loads((ddp_run["tmp"] / "single" / "default" / "version_0" / "metrics.json").read_text())
    keys = [k for k in alone if k.startswith("test/")]
    assert {"test/loss", "test/images", "test/exact_top5/recall", "test/exact_top10/f1"} <= set(keys)
    assert alone["test/exact_top10/recall"] > 0  # labels were predicted and some were right: not a 0 == 0 check
    for key in keys:
        assert ddp[key] == pytest.approx(alone[key], abs=1e-6), key


def write_shard_without_some_captions(source: Path, out: Path, samples: int, every: int) -> int:
    """The first ``samples`` samples of ``source``, every ``every``-th without its caption (nor the labels its
    ``KEY.json`` gives, which would stand in for it); the number of those."""
    with tarfile.open(source) as tar, tarfile.open(out, "w") as dst:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))[:samples]
        dropped = set(keys[::every])
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if key in keys and not (key in dropped and ext in ("txt", "json")):
                dst.addfile(m, tar.extractfile(m))
    return len(dropped)


@pytest.mark.slow
def test_a_finished_run_is_not_resumed_and_a_nonfinite_loss_on_one_rank_is_skipped_by_both(ddp_run, shapes, tmp_path):
    # One DDP fit checks both. It is the finished ddp_run's command (the same logger folder: a copy of it, which
    # leaves ddp_run's one run for the other tests) with other training shards, a user's own data, so it must not
    # "resume" that run but start version_1 from step 0.
    # Its shards make a non-finite loss on one rank: rank 0 reads a good shard, rank 1 one with 16 samples of 64
    # missing their caption (epochs), and at step 2 rank 1's loss is NaN; rank 0 must skip that step too (alone, it
    # would wait for rank 1's gradients for ever). Skipped samples are summed over the ranks.
    assert ddp_run["result"].returncode == 0
    logs = tmp_path / "logs"
    shutil.copytree(ddp_run["tmp"] / "logs", logs)
    shards = tmp_path / "train"
    shards.mkdir()
    (shards / "shard-000000.tar").symlink_to(shapes / "train" / "shard-000000.tar")
    dropped = write_shard_without_some_captions(
        shapes / "train" / "shard-000001.tar", shards / "shard-000001.tar", 64, 4
    )
    command = (
        fit_command(shapes, logs, 6)
        + DDP
        + [
            "--data.train_shards",
            str(shards / "shard-{000000..000001}.tar"),
            "--data.resampled",
            "false",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.callbacks+=tests.nonfinite_at.NonFiniteAt",
            "--trainer.callbacks.rank",
            "1",
            "--trainer.callbacks.step",
            "2",
        ]
    )
    result = run(command, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"its run is finished (step {STEPS} of {STEPS}), so a new run starts" in result.stdout
    version = logs / "default" / "version_1"
    assert json.loads((version / "metrics.json").read_text())["global_step"] == 6  # its own run, from step 0

    assert "skipping step 2: loss is not finite (on another rank)" in result.stderr
    assert "skipping step 2: loss is not finite (batch samples ['train-0000" in result.stderr  # rank 1's
    assert "on rank 1)" in result.stderr
    checkpoint = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6 and checkpoint["nxtp_train_skipped"]["nonfinite"] == 1
    scalars = EventAccumulator(str(version)).Reload()
    # TensorBoard is written by rank 0 alone: one process's files, each training step logged once (here, in a DDP
    # run that was not stopped on the way, as ddp_run was).
    assert len(event_pids(event_files(version))) == 1, event_files(version)
    assert [e.step for e in scalars.Scalars("train/loss")] == list(range(6))
    losses = [e.value for e in scalars.Scalars("train/loss")]
    assert len(losses) == 6 and math.isnan(losses[2]) and all(map(math.isfinite, losses[:2] + losses[3:]))
    assert losses[3] < losses[1]  # it trained before and after the skipped step
    # Rank 0 logs the total over both ranks: every reject rank 1 wrote down, none of its own.
    rejects = [json.loads(line) for line in (version / "rejects.rank1.jsonl").open()]
    assert not (version / "rejects.jsonl").exists()
    assert {r["reason"] for r in rejects} == {"no caption"} and len(rejects) >= dropped == 16
    assert scalars.Scalars("train/skipped/no caption")[-1].value == len(rejects)
    assert checkpoint["nxtp_train_skipped"]["skipped"]["no caption"] == len(rejects)


@pytest.mark.slow
def test_torchrun_on_two_nodes_trains_epochs_over_uneven_shards_and_stops_them_together(tmp_path, shapes):
    # Rank 0 reads shards 0 and 2 (96 + 8 samples: 13 batches of 8), rank 1 shard 1 (24: 3 batches). Every epoch
    # stops after 3 steps on both ranks; 2 epochs are 6 steps. Without that, rank 0 waits for rank 1 for ever.
    write_uneven_shards(shapes / "train" / "shard-000000.tar", tmp_path / "train", [96, 24, 8])
    port = free_port()
    fit = fit_command(shapes, tmp_path / "logs", 1000)[len(NXTP_CLI) :] + [  # max_steps sizes the lr schedule only
        "--data.train_shards",
        str(tmp_path / "train" / "shard-{000000..000002}.tar"),
        "--data.resampled",
        "false",
        "--data.batch_size",
        "8",
        "--trainer.max_epochs",
        "2",
        "--trainer.val_check_interval",
        "1.0",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.strategy",
        "ddp",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.accelerator",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "lightning_modules.cli",
                *fit,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=DEADLINE))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    metrics = json.loads((tmp_path / "logs" / "default" / "version_0" / "metrics.json").read_text())
    assert metrics["global_step"] == 6


@pytest.mark.slow
def test_a_sweep_of_ddp_runs_records_them_as_done(tmp_path, shapes, monkeypatch, capsys):
    fixed = fit_overrides(shapes, tmp_path, 6)
    fixed.update(
        {"trainer.strategy": "ddp", "trainer.devices": 2, "trainer.accelerator": "cpu", "trainer.val_check_interval": 3}
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "ddp",
                "config": "configs/experiment/default.yaml",
                "save_dir": str(tmp_path / "logs"),
                "parameters": {"model.optimization.lr": [0.002]},
                "fixed": fixed,
                "metric": "val/loss",
                "mode": "min",
            }
        )
    )
    # what is checked is how the sweep records DDP runs, not the command: `nxtp sweep` in this process, its run an
    # `nxtp fit` subprocess with two ranks
    assert nxtp_here(["sweep", str(path)], monkeypatch) == 0, capsys.readouterr().out[-3000:]
    rows = (tmp_path / "logs" / "sweeps" / "ddp" / "results.md").read_text()
    assert "| done |" in rows
    (metrics,) = (tmp_path / "logs" / "sweeps" / "ddp").glob("*/version_0/metrics.json")
    assert json.loads(metrics.read_text())["global_step"] == 6
