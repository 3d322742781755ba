"""`make ablations` (experiments/ablations.py): the ablation sweeps repeat seeds at the default schedule and share
their common runs, the sampler timer, the tests' arguments, the tables (mean ± spread over seeds, paired Δ), and a
small run end to end."""

import argparse
import contextlib
import csv
import importlib.util
import inspect
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, fit_overrides, nxtp_here, print_config

from lightning_modules import lit_nxtp
from lightning_modules.sweep import Sweep, identify, trials


def ablations():
    """``experiments/ablations.py`` as a module (experiments/ is no package)."""
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "experiments/ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


A = ablations()
DEFAULT = ROOT / "configs/experiment/default.yaml"


@pytest.mark.parametrize("name", list(A.ABLATIONS))
def test_each_ablation_is_the_default_experiment_over_seeds(name):
    sweep = Sweep.load(A.SWEEPS / A.ABLATIONS[name].sweep)
    assert [Path(c).resolve() for c in sweep.config] == [DEFAULT]
    assert sweep.method == "grid" and sweep.pruner == "none" and sweep.metric == "test/exact_top5/f1"
    assert len(sweep.parameters[A.SEED]) >= 2  # the spread over seeds
    assert len(sweep.parameters) == 2
    # the default experiment's schedule, whatever it becomes: nothing in the ablations overrides it
    assert not any(key.startswith("trainer.") for key in sweep.fixed)
    assert sweep.fixed == {}


def test_a_seed_seeds_the_data_too(monkeypatch, capsys):
    printed = print_config(
        ["fit", "--config", str(DEFAULT), "--seed_everything=3"],
        monkeypatch,
        capsys,
    )
    assert printed["seed_everything"] == 3 and printed["data"]["seed"] == 3


def test_the_ablations_share_their_common_runs(monkeypatch, capsys):
    # The sampling ablation's models are the masking ablation's; the depth ablation's run at the default's depth is
    # the masked one. The same arguments give the same hash, the end of a run's name, by which they are linked.
    def hashes(name: str, where: dict) -> dict:
        sweep = Sweep.load(A.SWEEPS / A.ABLATIONS[name].sweep)
        runs = [p for p in trials(sweep) if all(p[k] == v for k, v in where.items())]
        return {p[A.SEED]: identify(sweep, p) for p in runs}

    masked = hashes("masking", {"model.nxtp.label_attention": "masked"})
    assert masked == hashes("sampling", {"model.nxtp.label_attention": "masked"})
    blocks = print_config(["fit", "--config", str(DEFAULT)], monkeypatch, capsys)["model"]["nxtp"]["decoder"]
    assert masked == hashes("depth", {"model.nxtp.decoder.num_blocks": blocks["num_blocks"]})
    assert len(set(masked.values())) == len(masked)  # each seed its own run


def finished_run(folder: Path, metric: str = "test/exact_top5/f1", value=0.5) -> Path:
    (folder / "version_0").mkdir(parents=True)
    (folder / "version_0/metrics.json").write_text(json.dumps({metric: value}))
    return folder


def test_a_run_another_sweep_finished_is_linked_not_trained_again(tmp_path):
    sweeps = tmp_path / "sweeps"
    mine = sweeps / "b"
    finished_run(mine / "num_blocks=2-seed_everything=0-00000002")
    finished_run(sweeps / "a" / "label_attention=causal-seed_everything=0-00000001", value=None)  # no metric
    assert not A.others_finished(mine, "test/exact_top5/f1")  # nothing to link: its runs are planned by no dry run
    done = finished_run(sweeps / "a" / "label_attention=masked-seed_everything=0-abcd1234")
    assert A.others_finished(mine, "test/exact_top5/f1")
    runs = ["num_blocks=1-seed_everything=0-abcd1234", "x=1-00000001", "num_blocks=2-seed_everything=0-00000002"]
    made = A.link_finished(mine, runs, "test/exact_top5/f1")
    assert made == [mine / runs[0]]
    assert made[0].is_symlink() and made[0].resolve() == done.resolve()
    assert A.finished(made[0], "test/exact_top5/f1")  # nxtp sweep reads it through the link: done already
    assert not (mine / runs[1]).exists()  # unfinished elsewhere: trained here
    assert A.link_finished(mine, runs, "test/exact_top5/f1") == []  # once


def test_the_runs_are_named_by_the_sweep_itself(tmp_path):
    # The names come from `nxtp sweep --dry-run` and its results.csv, in processes of their own: the hashes are the
    # code's as it is when the sweep runs, not as it was when `make ablations` started.
    dry_run = (
        "nxtp fit --config configs/experiment/default.yaml --seed_everything=0 "
        "--trainer.logger.init_args.save_dir=logs "
        "--trainer.logger.init_args.name=sweeps/ablation_depth/num_blocks=2-seed_everything=0-80eda331\n"
    )
    assert A.run_names("# a comment\n" + dry_run, "ablation_depth") == ["num_blocks=2-seed_everything=0-80eda331"]
    sweep = Sweep.load(A.SWEEPS / "ablation_depth.yaml")
    sweep.save_dir = str(tmp_path)
    assert A.finished_runs(sweep) == []  # nothing has run
    sweep.folder.mkdir(parents=True)
    (sweep.folder / "results.csv").write_text(
        "trial,run,model.nxtp.decoder.num_blocks,seed_everything,status\n"
        "0,num_blocks=2-seed_everything=1-3c291cc7,2,1,done\n"
        "1,num_blocks=4-seed_everything=0-38e389d0,4,0,failed\n"
    )
    assert A.finished_runs(sweep) == [
        ({"model.nxtp.decoder.num_blocks": 2, A.SEED: 1}, "num_blocks=2-seed_everything=1-3c291cc7")
    ]


def namespace(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"suffix": None, "seeds": None, "set": None, "save_dir": None, "out": "", **kwargs})


def test_the_shipped_sweep_or_a_copy_that_says_what_changed(tmp_path):
    ablation = A.ABLATIONS["masking"]
    sweep, path = A.load(ablation, namespace())
    assert path == A.SWEEPS / "ablation_masking.yaml" and sweep.name == "ablation_masking"
    args = namespace(
        suffix="smoke", seeds=[0], set=["trainer.max_steps=20", "data.batch_size=16"], save_dir=str(tmp_path / "logs")
    )
    copy, path = A.load(ablation, namespace(**{**vars(args), "out": str(tmp_path / "out")}))
    assert path == tmp_path / "out/sweeps/ablation_masking-smoke.yaml"
    assert copy.name == "ablation_masking-smoke" and copy.save_dir == str(tmp_path / "logs")
    assert copy.fixed == {"trainer.max_steps": 20, "data.batch_size": 16}
    assert copy.parameters == {"model.nxtp.label_attention": ["masked", "causal"], A.SEED: [0]}
    assert copy.config == sweep.config
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        A.overrides(["trainer.max_steps"])


@pytest.mark.e2e  # `nxtp test` takes its options from Trainer.test, which the unit run replaces (conftest)
def test_a_sampler_test_is_a_valid_nxtp_test(monkeypatch, capsys, tmp_path):
    sweep = Sweep.load(A.SWEEPS / "ablation_sampling.yaml")
    params = {"model.nxtp.label_attention": "masked", A.SEED: 1}
    folder = A.tests_folder(sweep, "run-1a2b3c4d", "beam", 4, 5)
    assert folder == Path("logs/sweeps/ablation_sampling/tests/run-1a2b3c4d/beam5-b4")
    args = A.test_args(sweep, params, str(tmp_path / "best.ckpt"), "beam", 4, 5, folder)
    monkeypatch.syspath_prepend(str(ROOT))  # the callback's class_path, experiments.ablations.SamplerTimer
    printed = print_config(args, monkeypatch, capsys)
    evaluation = printed["model"]["evaluation"]
    assert (evaluation["sampler"], evaluation["beams"], evaluation["topk"]) == ("beam", 5, [5])
    assert evaluation["semantic_metric"] is False and printed["trainer"]["limit_test_batches"] == 4
    assert printed["data"]["seed"] == 1 and printed["ckpt_path"] == str(tmp_path / "best.ckpt")
    assert printed["trainer"]["logger"]["init_args"]["name"] == "sweeps/ablation_sampling/tests/run-1a2b3c4d/beam5-b4"
    assert printed["trainer"]["callbacks"][-1]["class_path"] == "experiments.ablations.SamplerTimer"


def test_the_timer_times_the_sampler_alone_and_puts_it_back(monkeypatch):
    # LitNXTP._evaluate reads the labels with these two, looked up in lit_nxtp when called: what the timer wraps.
    source = inspect.getsource(lit_nxtp.LitNXTP._evaluate)
    assert "recognize(" in source and "label_images(" in source
    calls = []

    def slow(model, pixels, *args, **kwargs):
        calls.append(args)
        time.sleep(0.02)
        return [[("circle", 1.0)]] * len(pixels)

    monkeypatch.setattr(lit_nxtp, "recognize", slow)
    monkeypatch.setattr(lit_nxtp, "label_images", slow)
    timer = A.SamplerTimer()
    timer.setup(None, None, "test")
    timer.on_test_epoch_start(None, None)
    assert lit_nxtp.recognize is not slow and lit_nxtp.recognize.__wrapped__ is slow
    assert lit_nxtp.recognize(None, torch.zeros(4, 3, 8, 8), 5) == [[("circle", 1.0)]] * 4 and calls == [(5,)]
    timer.on_test_batch_end(None, None, None, SimpleNamespace(keys=list("abcd")), 0)
    lit_nxtp.label_images(None, torch.zeros(2, 3, 8, 8))
    timer.on_test_batch_end(None, None, None, SimpleNamespace(keys=list("ef")), 1)
    logged = {}
    timer.on_test_epoch_end(None, SimpleNamespace(log=lambda key, value: logged.update({key: value})))
    assert 2 * 20 / 6 <= logged[A.MS] < 100  # two calls of 20 ms over 6 images
    timer.teardown(None, None, "test")
    assert lit_nxtp.recognize is slow and lit_nxtp.label_images is slow


def rows(settings: dict[str, list[float]], key: str = "model.nxtp.label_attention", ms=None) -> list[dict]:
    found = []
    for i, (value, f1s) in enumerate(settings.items()):
        for seed, f1 in enumerate(f1s):
            row = {"setting": {key: value}, "seed": seed, "R@5": f1, "P@5": f1, "F1@5": f1}
            if ms is not None:
                row["ms/image"] = ms[i]
            found.append(row)
    return found


def by_value(values: list):
    return lambda setting: tuple(values.index(v) for v in setting.values())


def test_the_table_shows_the_spread_over_seeds_and_the_paired_difference():
    found = rows({"masked": [0.90, 0.92], "causal": [0.80, 0.84], "other": [0.91, 0.89]})
    header, lines = A.summarize(found, by_value(["masked", "causal", "other"]))
    assert header == [
        "label_attention",
        "seeds",
        "R@5",
        "P@5",
        "F1@5",
        "Δ F1@5 vs label_attention=masked (per seed)",
        "Δ reads as",
    ]
    assert lines[0] == ["masked", "0, 1", "0.910 ± 0.014", "0.910 ± 0.014", "0.910 ± 0.014", "reference", ""]
    assert lines[1][4:] == ["0.820 ± 0.028", "−0.090 (−0.100, −0.080)", "beyond the seed spread"]
    assert lines[2][4:] == ["0.900 ± 0.014", "−0.010 (+0.010, −0.030)", "within the seed spread"]  # signs differ
    one_seed = [r for r in found if r["seed"] == 0]
    assert A.summarize(one_seed, by_value(["masked", "causal", "other"]))[1][1][-1].startswith("one seed")


def test_the_sampling_table_times_each_sampler_against_the_reference():
    found = rows({"one-shot": [0.9, 0.9], "greedy": [0.6, 0.7]}, key="sampler", ms=[40.0, 140.0])
    header, lines = A.summarize(found, by_value(["one-shot", "greedy"]))
    assert header[-4:-2] == ["ms/image", "ms × reference"]
    assert lines[0][-4:-2] == ["40 ± 0", "1.00x"] and lines[1][-4:-2] == ["140 ± 0", "3.50x"]


def sweeps_here(monkeypatch) -> None:
    """From here on, ``nxtp sweep`` as ``make ablations`` starts it (``A.nxtp_sweep``, its ``--dry-run`` too) runs in
    this process (``conftest.nxtp_here``): once the real commands have run, what a later start does (which runs it
    links, skips or trains) is the ablation's and the sweep's, not the command's, and a run it trained would still
    be an ``nxtp fit`` subprocess. Saves a start of the command (importing torch and Lightning) each time."""

    def nxtp_sweep(path: Path, *flags: str, capture: bool = False) -> subprocess.CompletedProcess:
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
            code = nxtp_here(["sweep", str(path), *flags], monkeypatch)
        return subprocess.CompletedProcess(["nxtp", "sweep", str(path), *flags], code, out.getvalue(), "")

    monkeypatch.setattr(A, "nxtp_sweep", nxtp_sweep)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_small_sampling_ablation_end_to_end_then_the_masking_one_from_its_runs(tmp_path, shapes, capfd, monkeypatch):
    fixed = fit_overrides(shapes, tmp_path, 6)
    fixed.update(
        {
            "trainer.val_check_interval": 3,
            "test_after_fit": "true",
            "data.test_shards": str(shapes / "test/shard-000000.tar"),
        }
    )
    common = ["--suffix", "t", "--seeds", "0", "--save-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]
    common += [a for key, value in fixed.items() for a in ("--set", f"{key}={value}")]
    sampling = ["--only", "sampling", "--samplers", "one-shot", "greedy", "--test-batches", "1", *common]
    # The real commands: `nxtp sweep` (no dry run: no other sweep has runs to link), its two `nxtp fit` runs, and
    # an `nxtp test` per model and sampler, each a process of its own.
    assert A.main(sampling) == 0, capfd.readouterr().out[-3000:]
    out = capfd.readouterr().out
    assert out.count(" on 1 test batches ...") == 4  # 2 models x 2 samplers
    table = (tmp_path / "out/sampling.md").read_text()
    for label in (
        "| masked | one-shot | 0 |",
        "| masked | greedy | 0 |",
        "| causal | one-shot |",
        "| causal | greedy |",
    ):
        assert label in table
    assert "ms × reference" in table and "first 1 test batches" in table
    found = list(csv.DictReader(open(tmp_path / "out/ablations.csv")))
    assert len(found) == 4 and all(float(r["ms/image"]) > 0 and r["test images"] == "16.0" for r in found)

    sweeps_here(monkeypatch)
    assert A.main(sampling) == 0  # nothing runs twice: no run trained, no sampler tested again
    assert " ..." not in capfd.readouterr().out

    # The masking ablation's runs are the sampling ablation's: linked, none trained again.
    assert A.main(["--only", "masking", *common]) == 0
    out = capfd.readouterr().out
    assert out.count("linked, not trained again") == 2 and "(done already: same arguments)" in out
    assert "| masked | 0 |" in (tmp_path / "out/masking.md").read_text()
