"""`nxtp sweep`: Optuna's grid, random and TPE draws, the study store, runs' identities, pruning, the results table,
bad input, the SLURM array, and real sweeps."""

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
from conftest import NXTP_CLI, ROOT, fit_overrides, nxtp_here, run, start_until
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_modules.cli.sweep import sweep_main
from lightning_modules.sweep import (
    Sweep,
    identify,
    load_study,
    next_trial,
    prepare,
    run_name,
    run_trial,
    study_name,
    summary,
    table,
    trials,
    write_table,
)


def sweep_file(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "t", "config": "configs/experiment/default.yaml", "save_dir": str(tmp_path / "logs"), **spec}
        )
    )
    return path


def test_a_grid_is_every_combination_in_the_order_of_its_seed(tmp_path):
    spec = dict(parameters={"model.optimization.lr": [1e-3, 2e-3], "model.nxtp.decoder.num_blocks": [1, 2, 4]})
    sweep = Sweep.load(sweep_file(tmp_path, **spec))
    runs = trials(sweep)
    assert len(runs) == 6
    assert sorted((r["model.optimization.lr"], r["model.nxtp.decoder.num_blocks"]) for r in runs) == [
        (a, b) for a in (1e-3, 2e-3) for b in (1, 2, 4)
    ]
    assert runs == trials(Sweep.load(sweep_file(tmp_path, **spec)))  # Optuna's GridSampler, seeded
    assert len({run_name(r, "0" * 64) for r in runs}) == 6


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_draws_stay_within_bounds_and_repeat_with_their_seed(tmp_path, method):
    spec = dict(
        method=method,
        trials=200 if method == "random" else 12,
        seed=3,
        parameters={
            "model.optimization.lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
            "model.optimization.warmup": {"distribution": "uniform", "low": 0.0, "high": 0.1},
            "data.batch_size": {"distribution": "int", "low": 16, "high": 18},
            "model.nxtp.decoder.num_blocks": {"distribution": "int_uniform", "low": 1, "high": 2},
            "model.optimization.schedule": ["cosine", "wsd"],
        },
    )
    runs = trials(Sweep.load(sweep_file(tmp_path, **spec)))
    assert len(runs) == spec["trials"]
    assert runs == trials(Sweep.load(sweep_file(tmp_path, **spec)))
    assert runs != trials(Sweep.load(sweep_file(tmp_path, **{**spec, "seed": 4})))
    lrs = [r["model.optimization.lr"] for r in runs]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(0 <= r["model.optimization.warmup"] <= 0.1 for r in runs)
    assert {r["model.nxtp.decoder.num_blocks"] for r in runs} == {1, 2}
    if method == "random":
        # log-uniform: about half the draws below the geometric middle (1e-3), not ~10% as a uniform draw would give
        assert 0.35 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.65
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
        ({"parameters": {"model.optimization.lr": [1]}, "method": "tpe"}, "needs `trials`"),
        ({"parameters": {"model.optimization.lr": [1]}, "method": "bayes"}, "method must be one of"),
        ({"parameters": {"model.optimization.lr": [1]}, "pruner": "asha"}, "pruner must be one of"),
        ({"parameters": {"model.optimization.lr": [1]}, "pruner_args": {"typo": 1}}, "pruner_args"),
        ({"parameters": {"model.optimization.lr": [1]}, "storage": "disk"}, "storage must be"),
        (
            {"method": "tpe", "trials": 2, "parameters": {"data.batch_size": {"distribution": "int", "low": 9}}},
            "parameters.data.batch_size: KeyError",
        ),
        ({"parameters": {"model.optimization.lr": [1]}, "config": "nowhere.yaml"}, "nowhere.yaml does not exist"),
    ],
)
def test_a_bad_sweep_file_is_named(tmp_path, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
        Sweep.load(sweep_file(tmp_path, **spec))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"parameters": {"model.optimization.lrr": [1e-3]}}, "parameters.model.optimization.lrr: `nxtp fit` has no"),
        (
            {"parameters": {"model.optimization.lr": [1e-3]}, "fixed": {"trainer.max_stepz": 3}},
            "fixed.trainer.max_stepz: `nxtp fit` has no",
        ),
        ({"parameters": {"model.nxtp.decoder.num_blocks": ["two"]}}, 'Parser key "model.nxtp.decoder.num_blocks"'),
    ],
)
def test_a_key_no_config_has_is_named_before_anything_runs(tmp_path, spec, message, capsys):
    with pytest.raises(SystemExit) as end:
        sweep_main([str(sweep_file(tmp_path, **spec)), "--dry-run"])
    assert end.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("storage, file", [("sqlite", "study.db"), ("journal", "study.journal")])
def test_a_corrupt_study_store_is_named(tmp_path, storage, file):
    sweep = Sweep.load(sweep_file(tmp_path, parameters={"model.optimization.lr": [1e-3]}, storage=storage))
    load_study(sweep, "t-0").ask()  # a store that works, and is read back
    assert len(load_study(sweep, "t-0").trials) == 1
    (sweep.folder / file).write_text("not a study\n" * 10)
    with pytest.raises(ValueError, match=f"{sweep.folder / file}: the sweep's study store cannot be read"):
        load_study(sweep, "t-0")


def test_a_run_is_named_by_its_arguments_and_a_changed_base_config_starts_new_runs(tmp_path):
    base = tmp_path / "base.yaml"  # default.yaml, its includes made absolute
    text = (ROOT / "configs/experiment/default.yaml").read_text().replace("../", f"{ROOT / 'configs'}/")
    base.write_text(text)
    spec = dict(config=str(base), parameters={"model.nxtp.decoder.num_blocks": [1, 2]})
    sweep = Sweep.load(sweep_file(tmp_path, **spec))
    planned = [(params, identify(sweep, params)) for params in trials(sweep)]
    assert len({h for _, h in planned}) == 2 and planned[0][1] == identify(sweep, planned[0][0])
    first = load_study(sweep, study_name(sweep))
    assert prepare(sweep, first, planned) == 2
    for params, hash_ in planned:  # as `nxtp fit` ends a run: its metrics.json
        version = sweep.folder / run_name(params, hash_) / "version_0"
        version.mkdir(parents=True)
        (version / "metrics.json").write_text(json.dumps({sweep.metric: 0.5, "global_step": 10}))
    for _ in planned:  # a run whose arguments finished already is not run again
        assert run_trial(sweep, first, first.ask(sweep.distributions()))["status"] == "done"
    assert prepare(sweep, first, planned) == 0 and [r["status"] for r in table(sweep, first)] == ["done", "done"]
    assert study_name(sweep) == first.study_name  # the same sweep, the same study

    base.write_text(text.replace("seed_everything: 0", "seed_everything: 1"))
    changed = [(params, identify(sweep, params)) for params, _ in planned]
    assert not {h for _, h in changed} & {h for _, h in planned}
    second = load_study(sweep, study_name(sweep))
    assert second.study_name != first.study_name and prepare(sweep, second, changed) == 2
    assert {t.user_attrs["run"] for t in second.trials}.isdisjoint(run_name(p, h) for p, h in planned)


def add(study, params: dict, state: TrialState, value=None, steps=None, **attrs) -> None:
    distributions = {k: CategoricalDistribution([1, 2, 4, 8]) if k.endswith("blocks") else FloatDistribution(0, 1)
                     for k in params}  # fmt: skip
    hash_ = f"{len(study.trials):064d}"
    study.add_trial(
        create_trial(
            params=params,
            distributions=distributions,
            value=value,
            state=state,
            intermediate_values=steps or {},
            user_attrs={"hash": hash_, "run": run_name(params, hash_), **attrs},
        )
    )


def test_the_table_sorts_finished_runs_by_the_metric_then_pruned_and_failed_ones(tmp_path):
    sweep = Sweep.load(
        sweep_file(tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1, 2, 4, 8]}, metric="val/exact_top5/f1")
    )
    study = load_study(sweep, "t-0")
    for blocks, f1 in [(1, 0.5), (2, 0.9), (4, 0.7)]:  # finished runs, with what `nxtp fit` writes at the end
        add(study, {"model.nxtp.decoder.num_blocks": blocks}, TrialState.COMPLETE, f1)
        version = sweep.folder / study.trials[-1].user_attrs["run"] / "version_0"
        version.mkdir(parents=True)
        (version / "metrics.json").write_text(json.dumps({"val/exact_top5/f1": f1, "global_step": 10}))
    add(study, {"model.nxtp.decoder.num_blocks": 8}, TrialState.PRUNED, 0.1, steps={5: 0.1})
    add(study, {"model.nxtp.decoder.num_blocks": 8}, TrialState.FAIL, error="exit code 1: ValueError: num_blocks=8")
    rows = table(sweep, study)
    assert [r["model.nxtp.decoder.num_blocks"] for r in rows] == ["2", "4", "1", "8", "8"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "pruned", "failed"]
    assert rows[3]["val/exact_top5/f1"] == 0.1 and rows[3]["global_step"] == 5  # where it was pruned
    assert "num_blocks=8" in rows[-1]["error"]
    markdown = write_table(sweep, rows, summary(sweep, study))
    assert markdown.splitlines()[2].startswith("| 1 | num_blocks=2-")
    with open(sweep.folder / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [float(r["val/exact_top5/f1"] or math.nan) for r in written][:3] == [0.9, 0.7, 0.5]
    results = (sweep.folder / "results.md").read_text()
    assert results.count("\n| ") == 6  # header + 5 runs
    assert "best run: num_blocks=2-" in results and "val/exact_top5/f1 = 0.9" in results

    sweep.mode = "min"
    assert [r["model.nxtp.decoder.num_blocks"] for r in table(sweep, study)] == ["1", "4", "2", "8", "8"]


def test_the_summary_gives_the_importance_of_each_swept_key_when_it_can(tmp_path):
    keys = {"model.optimization.lr": [0.1, 0.2], "model.optimization.warmup": [0.1, 0.2]}
    sweep = Sweep.load(sweep_file(tmp_path, parameters=keys, mode="max"))
    study = load_study(sweep, "t-0")
    assert summary(sweep, study) == "best run: none finished yet\n"
    add(study, {"model.optimization.lr": 0.1, "model.optimization.warmup": 0.1}, TrialState.COMPLETE, 0.1)
    assert "needs 2 finished runs" in summary(sweep, study)
    for lr, warmup in [(0.9, 0.15), (0.2, 0.12), (0.8, 0.2), (0.3, 0.11)]:
        add(study, {"model.optimization.lr": lr, "model.optimization.warmup": warmup}, TrialState.COMPLETE, lr)
    text = summary(sweep, study)
    assert "best run: lr=0.9-warmup=0.15-" in text
    importance = dict(part.rsplit(" ", 1) for part in text.split("importance of the swept keys: ")[1].split(", "))
    assert set(importance) == set(keys) and float(importance["model.optimization.lr"]) > 0.5


@pytest.mark.e2e  # runs a stand-in sbatch
def test_the_slurm_launcher_submits_an_array_and_a_table_job(tmp_path, monkeypatch):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = sweep_file(
        tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1, 2, 4]}, slurm={"gres": "gpu:1"}, storage="journal"
    )
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    # the launcher, not the command, is what is checked here: `nxtp sweep` in this process
    assert nxtp_here(["sweep", str(path), "--launcher", "slurm"], monkeypatch) == 0
    script = (tmp_path / "logs" / "sweeps" / "t" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH --requeue" in script
    assert f"sweep {path} --index $SLURM_ARRAY_TASK_ID" in script
    submitted = calls.read_text().splitlines()
    assert submitted[0].endswith("sweep.sbatch")
    assert "--dependency=afterany:4242" in submitted[1] and "--collect" in submitted[1]
    sweep = Sweep.load(path)  # the array's tasks take the queued trials from the study's journal
    study = load_study(sweep, study_name(sweep))
    assert [t.state for t in study.trials] == [TrialState.WAITING] * 3


def test_an_array_task_takes_a_queued_trial_and_after_a_requeue_its_own(tmp_path):
    sweep = Sweep.load(sweep_file(tmp_path, parameters={"model.nxtp.decoder.num_blocks": [1, 2]}, storage="journal"))
    study = load_study(sweep, "t-0")
    planned = [(params, f"{i:064d}") for i, params in enumerate(trials(sweep))]
    assert prepare(sweep, study, planned) == 2
    one, zero = next_trial(sweep, study, worker=1), next_trial(sweep, study, worker=0)
    assert {one.params["model.nxtp.decoder.num_blocks"], zero.params["model.nxtp.decoder.num_blocks"]} == {1, 2}
    assert next_trial(sweep, study, worker=1).number == one.number  # SLURM requeued task 1: its trial again
    assert next_trial(sweep, study, worker=2) is None  # nothing left to take
    assert prepare(sweep, study, planned) == 2  # submitted anew after the array was cancelled: both run again
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]


def trial_states(sweep: Sweep) -> list[str]:
    return [t.state.name for t in load_study(sweep, study_name(sweep)).trials]


def sweep_again(path: Path, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`nxtp sweep PATH` once more, in this process: the real command ran first, in a subprocess of its own; what a
    second start does (which runs it resumes, skips or draws anew) is the sweep's, and its runs are still `nxtp fit`
    subprocesses. Saves a start of the command (importing torch and Lightning)."""
    capsys.readouterr()
    code = nxtp_here(["sweep", str(path)], monkeypatch)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["nxtp", "sweep", str(path)], code, out, err)


@pytest.mark.slow
def test_a_real_sweep_goes_on_after_a_failure_prunes_a_weak_run_and_records_every_run(
    tmp_path, shapes, capsys, monkeypatch
):
    # The end-to-end tests' short fit over three learning rates, validated at steps 3 and 6: AdamW refuses -1 (the run
    # fails), 3e-3 trains, and 1e-7 barely moves from its initial loss, so the median pruner (compared with the
    # first finished run) stops it at its first validation. The seed is one whose grid runs the failing run first
    # and the weak one last: the sweep goes on after a failure, and the weak run has a finished one to meet.
    fixed = fit_overrides(shapes, tmp_path, 6)
    fixed.update({"trainer.val_check_interval": 3})
    spec = dict(
        parameters={"model.optimization.lr": [3e-3, -1.0, 1e-7]},
        fixed=fixed,
        metric="val/loss",
        mode="min",
        pruner="median",
        pruner_args={"n_startup_trials": 1},
    )
    order = [-1.0, 3e-3, 1e-7]
    seed = next(
        s
        for s in range(50)
        if [r["model.optimization.lr"] for r in trials(Sweep.load(sweep_file(tmp_path, **spec, seed=s)))] == order
    )
    path = sweep_file(tmp_path, **spec, seed=seed)
    result = run(NXTP_CLI + ["sweep", str(path)])
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]  # one run failed; the others ran
    folder = tmp_path / "logs" / "sweeps" / "t"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "pruned", "failed"]  # finished by the metric, pruned, failed
    done, pruned, failed = rows
    assert [float(r["model.optimization.lr"]) for r in rows] == [3e-3, 1e-7, -1.0]
    assert int(failed["trial"]) < int(done["trial"]) < int(pruned["trial"])  # it went on after the failure
    assert "ValueError" in failed["error"] and "-1.0" in failed["error"]  # the run's error, as its log ends
    assert failed["error"].split(": ", 1)[1] in (folder / f"{failed['run']}.log").read_text()
    assert pruned["global_step"] == "3" and float(pruned["val/loss"]) > float(done["val/loss"])
    assert "pruned at step 3: val/loss" in (folder / f"{pruned['run']}.log").read_text()
    assert not list((folder / pruned["run"]).glob("version_0/metrics.json"))  # stopped at once
    assert "best run: " + done["run"] in result.stdout
    events = EventAccumulator(str(folder / done["run"] / "version_0")).Reload()  # the finished run's
    assert "val/exact_top5/f1" in events.Tags()["scalars"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["model.optimization.lr"].number_value == pytest.approx(3e-3)

    # Finished and pruned runs are final; the failed one runs again.
    again = sweep_again(path, capsys, monkeypatch)
    assert again.stdout.count(" ...") == 1 and f"{failed['run']} (trial 3) ..." in again.stdout
    assert sorted(trial_states(Sweep.load(path))) == ["COMPLETE", "FAIL", "FAIL", "PRUNED"]


@pytest.mark.slow
def test_an_interrupted_tpe_sweep_resumes_from_its_study(tmp_path, shapes, capsys, monkeypatch):
    path = sweep_file(
        tmp_path,
        method="tpe",
        trials=2,  # the interrupted first draw, and one drawn after it resumed
        seed=2,  # its second draw, a higher lr than its first (0.0093, 0.0027), does better: the table reorders them
        parameters={"model.optimization.lr": {"distribution": "log_uniform", "low": 1e-3, "high": 1e-2}},
        fixed=fit_overrides(shapes, tmp_path, 20),
        metric="val/loss",
        mode="min",
        pruner="none",
        storage="journal",  # the file store, read and written by the sweep and its runs
    )
    sweep = Sweep.load(path)
    first = trials(sweep)[0]  # a new study's first draw
    run_dir = sweep.folder / run_name(first, identify(sweep, first))
    proc = start_until(
        NXTP_CLI + ["sweep", str(path)],
        run_dir / "version_0/checkpoints/last.ckpt",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    os.killpg(proc.pid, signal.SIGTERM)  # the sweep's process group, as a terminal or a scheduler does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err
    assert trial_states(sweep) == ["RUNNING"]  # interrupted, not failed
    assert torch.load(run_dir / "version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] < 20

    again = sweep_again(path, capsys, monkeypatch)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from" in (sweep.folder / f"{run_dir.name}.log").read_text()
    assert json.loads((run_dir / "version_0/metrics.json").read_text())["global_step"] == 20
    assert not (run_dir / "version_1").exists()
    study = load_study(sweep, study_name(sweep))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]  # the first resumed
    runs = {t.user_attrs["run"] for t in study.trials}
    assert len(runs) == 2 and run_dir.name in runs  # a new draw, not a repeat of the first
    rows = list(csv.DictReader(open(sweep.folder / "results.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    assert float(rows[0]["val/loss"]) <= float(rows[1]["val/loss"])  # finished runs sorted by the metric (min)
    assert "best run: " + rows[0]["run"] in again.stdout
