"""`nxtp sweep`: grid and random trials, the results table, failures, the SLURM array, and a real sweep."""

import csv
import json
import math
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NXTP_CLI, fit_overrides, run, start_until
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_modules.sweep import Sweep, run_name, table, trials, write_table


def sweep_file(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "t", "config": "configs/experiment/default.yaml", "save_dir": str(tmp_path / "logs"), **spec}
        )
    )
    return path


def test_a_grid_is_every_combination(tmp_path):
    sweep = Sweep.load(
        sweep_file(
            tmp_path, parameters={"model.optimization.lr": [1e-3, 2e-3], "model.nxtp.decoder.num_blocks": [1, 2, 4]}
        )
    )
    runs = trials(sweep)
    assert len(runs) == 6
    assert {(r["model.optimization.lr"], r["model.nxtp.decoder.num_blocks"]) for r in runs} == {
        (a, b) for a in (1e-3, 2e-3) for b in (1, 2, 4)
    }
    assert len({run_name(i, r) for i, r in enumerate(runs)}) == 6


def test_random_search_draws_within_bounds_and_repeats_with_its_seed(tmp_path):
    spec = dict(
        method="random",
        trials=200,
        seed=3,
        parameters={
            "model.optimization.lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
            "model.optimization.warmup": {"distribution": "uniform", "low": 0.0, "high": 0.1},
            "data.batch_size": {"distribution": "int_uniform", "low": 16, "high": 18},
            "model.optimization.schedule": ["cosine", "wsd"],
        },
    )
    runs = trials(Sweep.load(sweep_file(tmp_path, **spec)))
    assert runs == trials(Sweep.load(sweep_file(tmp_path, **spec)))
    assert runs != trials(Sweep.load(sweep_file(tmp_path, **{**spec, "seed": 4})))
    lrs = [r["model.optimization.lr"] for r in runs]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # log-uniform: about half the draws below the geometric middle (1e-3), not ~10% as a uniform draw would give
    assert 0.35 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.65
    assert all(0 <= r["model.optimization.warmup"] <= 0.1 for r in runs)
    assert {r["data.batch_size"] for r in runs} == {16, 17, 18}
    assert {r["model.optimization.schedule"] for r in runs} == {"cosine", "wsd"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"parameters": {"model.optimization.lr": [1]}, "typo": 1}, "unknown keys ['typo']"),
        (
            {"parameters": {"model.optimization.lr": {"distribution": "log_uniform", "low": 1, "high": 2}}},
            "parameters.model.optimization.lr",
        ),
        ({"parameters": {"model.optimization.lr": []}}, "parameters.model.optimization.lr"),
        ({"parameters": {"model.optimization.lr": [1]}, "method": "random"}, "needs `trials`"),
        ({"parameters": {"model.optimization.lr": [1]}, "config": "nowhere.yaml"}, "nowhere.yaml does not exist"),
    ],
)
def test_a_bad_sweep_file_is_named(tmp_path, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
        Sweep.load(sweep_file(tmp_path, **spec))


def test_the_table_sorts_finished_runs_by_the_metric_and_lists_failures(tmp_path):
    sweep = Sweep.load(
        sweep_file(tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1, 2, 4, 8]}, metric="val/exact_top5/f1")
    )
    runs = trials(sweep)
    for index, f1 in [(0, 0.5), (1, 0.9), (2, 0.7)]:  # what `nxtp fit` writes at the end of a run
        version = sweep.folder / run_name(index, runs[index]) / "version_0"
        version.mkdir(parents=True)
        (version / "metrics.json").write_text(json.dumps({"val/exact_top5/f1": f1, "global_step": 10}))
    (sweep.folder / f"{run_name(3, runs[3])}.failed").write_text("exit code 1: ValueError: decoder.num_blocks=8\n")
    rows = table(sweep)
    assert [r["model.nxtp.decoder.num_blocks"] for r in rows] == ["2", "4", "1", "8"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert "num_blocks=8" in rows[-1]["error"]
    markdown = write_table(sweep, rows)
    assert markdown.splitlines()[2].startswith("| 01-num_blocks=2 |")
    with open(sweep.folder / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [float(r["val/exact_top5/f1"] or math.nan) for r in written][:3] == [0.9, 0.7, 0.5]
    assert (sweep.folder / "results.md").read_text().count("\n| ") == 5  # header + 4 runs

    sweep.mode = "min"
    assert [r["model.nxtp.decoder.num_blocks"] for r in table(sweep)] == ["1", "4", "2", "8"]


def test_the_slurm_launcher_submits_an_array_and_a_table_job(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = sweep_file(tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1, 2, 4]}, slurm={"gres": "gpu:1"})
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    result = run(NXTP_CLI + ["sweep", str(path), "--launcher", "slurm"], env=env)
    assert result.returncode == 0, result.stderr
    script = (tmp_path / "logs" / "sweeps" / "t" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH --requeue" in script
    assert f"sweep {path} --index $SLURM_ARRAY_TASK_ID" in script
    submitted = calls.read_text().splitlines()
    assert submitted[0].endswith("sweep.sbatch")
    assert "--dependency=afterany:4242" in submitted[1] and "--collect" in submitted[1]


@pytest.mark.slow
def test_a_real_sweep_records_every_run_and_goes_on_after_a_failure(tmp_path, shapes):
    # The fixed settings are those of the end-to-end tests' short fit; a decoder of num_blocks=0 cannot be built.
    fixed = fit_overrides(shapes, tmp_path, 6)
    fixed.update({"trainer.val_check_interval": 3})
    path = sweep_file(
        tmp_path, parameters={"model.nxtp.decoder.num_blocks": [2, 0, 1]}, fixed=fixed, metric="val/loss", mode="min"
    )
    result = run(NXTP_CLI + ["sweep", str(path)])
    assert result.returncode == 1  # one run failed; the others ran
    folder = tmp_path / "logs" / "sweeps" / "t"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert (
        rows[-1]["model.nxtp.decoder.num_blocks"] == "0"
        and "num_blocks=0" in (folder / "01-num_blocks=0.log").read_text()
    )
    assert float(rows[0]["val/loss"]) <= float(rows[1]["val/loss"])
    for row in rows[:2]:
        events = EventAccumulator(str(folder / row["run"] / "version_0")).Reload()
        assert "val/exact_top5/f1" in events.Tags()["scalars"]
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        ).session_start_info
        assert start.hparams["model.nxtp.decoder.num_blocks"].number_value == float(
            row["model.nxtp.decoder.num_blocks"]
        )

    again = run(NXTP_CLI + ["sweep", str(path)])  # finished runs are not run twice
    assert again.stdout.count("done already") == 2


@pytest.mark.slow
def test_sigterm_reaches_the_run_and_the_sweep_resumes_it(tmp_path, shapes):
    fixed = fit_overrides(shapes, tmp_path, 30)
    path = sweep_file(
        tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1]}, fixed=fixed, metric="val/loss", mode="min"
    )
    run_dir = tmp_path / "logs" / "sweeps" / "t" / "00-num_blocks=1"
    proc = start_until(
        NXTP_CLI + ["sweep", str(path)],
        run_dir / "version_0/checkpoints/last.ckpt",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err
    assert not list(run_dir.parent.glob("*.failed"))  # interrupted, not failed
    assert torch.load(run_dir / "version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] < 30

    again = run(NXTP_CLI + ["sweep", str(path)])
    assert again.returncode == 0, again.stdout[-2000:]
    assert "resuming from" in (run_dir.parent / "00-num_blocks=1.log").read_text()
    assert json.loads((run_dir / "version_0/metrics.json").read_text())["global_step"] == 30
