"""Every command in README.md works as written.

Each fenced ``bash`` block of the README is tagged: ``bash quick`` blocks are run as written, in a copy of the
project where `make train` has been done on a tiny dataset; ``bash long`` blocks (training for minutes, a SLURM
cluster, data that is not here) are run in a dry form that still parses every argument: ``make -n``, ``nxtp fit
... --print_config``, ``nxtp sweep ... --dry-run``, ``bash -n`` for scripts, ``--help`` for the rest; the ``nxtp``
and ``python`` ones through their entry points in this process (the quick blocks start the installed ``nxtp``).
"""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import pytest
from conftest import ROOT, fit_command, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_modules.cli import main
from lightning_modules.cli.label import label_main

README = ROOT / "README.md"
FENCE = re.compile(r"^```bash(?P<tags>[^\n]*)\n(?P<body>.*?)^```", re.S | re.M)
PROJECT = [
    "configs",
    "datamodules",
    "experiments",
    "lightning_modules",
    "tests",
    "Makefile",
    "pyproject.toml",
    "constraints.txt",
    ".venv",
]


def blocks() -> list[tuple[str, list[str]]]:
    """(tag, commands) of every bash block; a command may continue over lines ending in a backslash."""
    found = []
    for match in FENCE.finditer(README.read_text()):
        text = re.sub(r"\\\n\s*", " ", match["body"])
        commands = [line.split("  #")[0].strip() for line in text.splitlines()]
        found.append((match["tags"].strip(), [c for c in commands if c and not c.startswith("#")]))
    return found


def dry_run(command: str, monkeypatch) -> None:
    """Check a long command without doing the long work: ``make -n``, ``bash -n`` for scripts; an ``nxtp`` or
    ``python SCRIPT`` command runs in this process (its entry point, with the README's arguments) as ``nxtp fit
    ... --print_config``, ``nxtp sweep ... --dry-run`` or ``--help``."""
    words = shlex.split(command)
    while "=" in words[0]:  # VAR=value prefixes
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    program = Path(words[0]).name
    if program in ("make", "sbatch", "bash"):
        check = ["make", "-n", *words[1:]] if program == "make" else ["bash", "-n", words[1]]
        result = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        return
    if program == "nxtp":
        flag = {"fit": "--print_config", "sweep": "--dry-run"}.get(words[1])
        monkeypatch.setattr(sys, "argv", ["nxtp", *words[1:], flag] if flag else ["nxtp", words[1], "--help"])
        entry = main
    elif program == "python":
        monkeypatch.setattr(sys, "argv", [words[1], "--help"])
        entry = partial(runpy.run_path, str(ROOT / words[1]), run_name="__main__")
    else:
        raise AssertionError(f"README.md: no dry form for {command!r}")
    with pytest.raises(SystemExit) as end:
        entry()
    assert end.value.code in (0, None), command


def test_every_bash_block_is_tagged():
    tags = [tag for tag, _ in blocks()]
    assert tags and all(tag in ("quick", "long") for tag in tags), tags
    assert "quick" in tags and "long" in tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the project after `make train` (the tiny dataset as data/shapes), and that `nxtp fit`: a short run
    of the default experiment that validates and tests its best checkpoint, as `make train` does. It trained with a
    copy of the tokenizer that is gone afterwards: what follows shows that a checkpoint carries its own."""
    root = tmp_path_factory.mktemp("readme")
    for name in PROJECT:
        (root / name).symlink_to(ROOT / name)
    (root / "data").mkdir()
    (root / "data" / "shapes").symlink_to(shapes)
    tokenizer = root / "tokenizer-copy"
    shutil.copytree(shapes / "tokenizer", tokenizer)
    fit = run(
        fit_command(shapes, root / "logs", 6, tokenizer)
        + [  # later flags override earlier ones
            "--model.evaluation.semantic_metric",
            "true",
            "--test_after_fit",
            "true",
            "--trainer.val_check_interval",
            "3",
            "--data.test_shards",
            str(shapes / "test/shard-000000.tar"),
        ]
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    shutil.rmtree(tokenizer)
    return root, fit


@pytest.fixture(scope="module")
def project(trained) -> Path:
    return trained[0]


@pytest.mark.slow
def test_the_run_writes_what_the_readme_lists(trained, tmp_path, capsys):
    # "What `make train` does" and "TensorBoard": the test results, the scalars, images, config text and HParams,
    # metrics.json, and a checkpoint that `nxtp label` reads on its own (the command itself runs as written in
    # test_readme_quick_commands_work_as_written; here, in this process, what it makes of an unreadable image).
    root, fit = trained
    assert "test results:" in fit.stdout
    version = root / "logs" / "default" / "version_0"
    checkpoint = version / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    events = EventAccumulator(str(version)).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in [
        "train/loss",
        "train/grad_norm",
        "val/loss",
        "val/exact_top5/f1",
        "val/semantic_top5/f",
        "test/exact_top5/f1",
        "test/semantic_top10/recall",
    ]:
        assert tag in scalars, tag
    assert {"val/predictions", "attention/label_masked_mask"} <= set(events.Tags()["images"])
    assert "config/text_summary" in events.Tags()["tensors"]
    assert len(events.Scalars("train/loss")) >= 1
    hparams = {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    assert (
        hparams["_hparams_/session_start_info"].session_start_info.hparams["model.optimization.lr"].number_value == 2e-3
    )
    assert "val/exact_top5/f1" in [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos]
    final = json.loads((version / "metrics.json").read_text())
    assert final["global_step"] == 6 and 0 <= final["test/exact_top5/f1"] <= 1

    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(root / "data" / "shapes" / "test" / "shard-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:3]
        for m in members:
            (images / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    (images / "broken.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert label_main(["--checkpoint", str(checkpoint), "--topk", "5", str(images)]) == 1  # one image failed
    out, err = capsys.readouterr()
    assert "broken.jpg" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 4
    broken = [x for x in lines if x["image"].endswith("broken.jpg")]
    assert len(broken) == 1 and "error" in broken[0]
    for entry in lines:
        if "error" in entry:
            continue
        probs = [x["prob"] for x in entry["labels"]]
        assert 1 <= len(probs) <= 5 and probs == sorted(probs, reverse=True)


@pytest.mark.slow
def test_readme_quick_commands_work_as_written(project):
    env = {
        **os.environ,
        "PATH": f"{project / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    for tag, commands in blocks():
        if tag == "quick":
            script = "\n".join(commands)
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.mark.e2e
def test_readme_long_commands_parse(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = [c for tag, block in blocks() if tag == "long" for c in block]
    assert len(commands) > 10
    for command in commands:
        dry_run(command, monkeypatch)
        capsys.readouterr()  # what --help and --print_config printed
