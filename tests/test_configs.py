"""Every shipped experiment config parses, and every run of every shipped sweep is a valid `nxtp fit` command."""

import shlex
from pathlib import Path

import pytest
from conftest import ROOT, print_config

from lightning_modules.cli.sweep import sweep_main
from lightning_modules.sweep import Sweep, trials

EXPERIMENTS = sorted((ROOT / "configs" / "experiment").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_config_parses(config: Path, monkeypatch, capsys):
    printed = print_config(["fit", "--config", str(config)], monkeypatch, capsys)
    assert printed["model"]["nxtp"]["vision"]["model_name"] and printed["trainer"]["max_steps"] > 0
    assert printed["data"]["train_shards"]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_run_of_every_sweep_parses(sweep: Path, monkeypatch, capsys):
    assert sweep_main([str(sweep), "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("nxtp fit")]
    assert commands and len(commands) == len(trials(Sweep.load(sweep)))  # one command per run
    for command in commands:
        printed = print_config(command[1:], monkeypatch, capsys)
        swept = dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--model.") and "=" in arg)
        for key, value in swept.items():  # each swept value reaches the model's config
            node = printed["model"]
            for part in key.split(".")[1:]:
                node = node[part]
            assert str(node) == value or float(node) == float(value), key


def test_interpolations_follow_the_command_line(monkeypatch, capsys, tmp_path):
    # finetune_g70m.yaml names the imported release once: the tokenizer is `${..optimization.init_from}/tokenizer`,
    # the test split `${.val_shards}`; overriding the source on the command line moves both.
    printed = print_config(
        [
            "fit",
            "--config",
            str(ROOT / "configs/experiment/finetune_g70m.yaml"),
            "--model.optimization.init_from",
            str(tmp_path / "mine"),
            "--data.val_shards",
            "v/{0..3}.tar",
        ],
        monkeypatch,
        capsys,
    )
    assert printed["model"]["nxtp"]["tokenizer"] == f"{tmp_path / 'mine'}/tokenizer"
    assert printed["data"]["test_shards"] == printed["data"]["val_shards"] == "v/{0..3}.tar"
