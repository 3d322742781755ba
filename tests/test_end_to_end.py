"""End to end, as a user runs it: build data, `nxtp fit` for a few steps, then `nxtp label` on images."""

import json
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import NXTP_CLI, assert_resumed_to_the_end, fit_command, run, start_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


@pytest.mark.slow
def test_fit_then_label(tmp_path, shapes):
    data = shapes
    tokenizer = tmp_path / "tokenizer"  # a copy, removed below to show that the checkpoint carries its own
    shutil.copytree(data / "tokenizer", tokenizer)
    fit = run(fit_command(data, tmp_path / "logs", 6, tokenizer) + [  # later flags override earlier ones
        "--model.semantic_metric", "true", "--test_after_fit", "true", "--trainer.val_check_interval", "3",
        "--data.test_shards", str(data / "test/shard-000000.tar"),
    ])
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "test results:" in fit.stdout
    version = tmp_path / "logs" / "default" / "version_0"
    checkpoint = version / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    events = EventAccumulator(str(version)).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/grad_norm", "val/loss", "val/exact_top5/f1", "val/semantic_top5/f",
                "test/exact_top5/f1", "test/semantic_top10/recall"]:
        assert tag in scalars, tag
    assert {"val/predictions", "attention/label_masked_mask"} <= set(events.Tags()["images"])
    assert "config/text_summary" in events.Tags()["tensors"]
    assert len(events.Scalars("train/loss")) >= 1
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    assert hparams["_hparams_/session_start_info"].session_start_info.hparams["model.lr"].number_value == 2e-3
    assert "val/exact_top5/f1" in [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos]
    final = json.loads((version / "metrics.json").read_text())
    assert final["global_step"] == 6 and 0 <= final["test/exact_top5/f1"] <= 1

    # The checkpoint carries its tokenizer: it still loads once the copy it was trained with is gone.
    shutil.rmtree(tokenizer)
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(data / "test" / "shard-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:3]
        for m in members:
            (images / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    (images / "broken.jpg").write_bytes(b"not an image")
    label = run(NXTP_CLI + ["label", "--checkpoint", str(checkpoint), "--topk", "5", str(images)])
    assert label.returncode == 1  # one image failed
    assert "broken.jpg" in label.stderr
    lines = [json.loads(line) for line in label.stdout.splitlines()]
    assert len(lines) == 4
    broken = [x for x in lines if x["image"].endswith("broken.jpg")]
    assert len(broken) == 1 and "error" in broken[0]
    for entry in lines:
        if "error" in entry:
            continue
        probs = [x["prob"] for x in entry["labels"]]
        assert 1 <= len(probs) <= 5 and probs == sorted(probs, reverse=True)


def final_loss(save_dir: Path) -> float:
    events = EventAccumulator(str(save_dir / "default" / "version_0")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    return sum(losses[-10:]) / 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes) -> Path:
    """The save_dir of the moments test's run (30 steps) done without interruption, for comparison."""
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    whole = run(fit_command(shapes, save_dir, 30))
    assert whole.returncode == 0, whole.stderr[-3000:]
    return save_dir


@pytest.mark.slow
def test_slurm_preemption_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, shapes):
    # A SLURM job as the sbatch scripts launch it: SLURM sends USR1 before pre-empting (--signal=USR1@120);
    # the run writes hpc_ckpt_1.ckpt, asks `scontrol requeue` and stops; the requeued job resumes from it.
    calls = tmp_path / "scontrol_calls.txt"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "nxtp", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    steps = 60
    root = tmp_path / "logs" / "default"
    command = fit_command(shapes, tmp_path / "logs", steps)
    proc = start_until(command, root / "version_0" / "checkpoints" / "last.ckpt", env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0  # stopped by itself, without waiting for SLURM's SIGTERM
    assert calls.read_text().split() == ["requeue", "77"]
    hpc = root / "hpc_ckpt_1.ckpt"
    saved_at = torch.load(hpc, weights_only=False)["global_step"]
    assert 10 <= saved_at < steps
    assert not (root / "version_0" / "metrics.json").exists()  # the run is not over

    requeued = run(command, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {hpc}" in requeued.stdout
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    assert not (root / "version_1").exists()
    assert (root / "version_0" / "metrics.json").exists()  # written once, by the job that finished the run


@pytest.mark.slow
@pytest.mark.parametrize("moment, step, group", [("training", 14, False), ("validation", 10, True),
                                                 ("checkpoint", 10, False)])
def test_a_run_interrupted_at_any_moment_resumes_and_ends_with_its_final_checkpoint(tmp_path, shapes, moment, step,
                                                                                   group, uninterrupted):
    # group: the signal goes to the whole process group, as Ctrl-C in a terminal does, the data workers of the
    # validation under way included (which the run still reads from after the signal)
    steps = 30
    command = fit_command(shapes, tmp_path / "logs", steps) + ["--data.num_workers", "1" if group else "0"]
    version = tmp_path / "logs" / "default" / "version_0"
    interrupted = run(command + ["--trainer.callbacks+=tests.signal_at.SignalAt", "--trainer.callbacks.moment", moment,
                                 "--trainer.callbacks.step", str(step), "--trainer.callbacks.group", str(group)])
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-3000:]
    assert "stopped by SIGTERM" in interrupted.stdout
    stopped_at = torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step <= stopped_at <= step + 1  # at the end of the step under way (after the validation under way)
    assert not (version / "metrics.json").exists()  # the run is not over

    assert_resumed_to_the_end(run(command), version, steps, stopped_at)
    # It trained as far as a run that was never stopped (not bit for bit: the resampled stream is redrawn).
    assert abs(final_loss(tmp_path / "logs") - final_loss(uninterrupted)) < 0.3 * final_loss(uninterrupted)


@pytest.mark.slow
def test_a_run_shorter_than_the_validation_interval_tests_its_last_weights(tmp_path, shapes):
    fit = run(fit_command(shapes, tmp_path / "logs", 4) + [
        "--test_after_fit", "true", "--data.test_shards", str(shapes / "test/shard-000000.tar")])
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "no validation ran, so there is no best checkpoint: testing the last weights" in fit.stdout
    metrics = json.loads((tmp_path / "logs" / "default" / "version_0" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["test/images"] == 32
