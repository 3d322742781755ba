"""Every command in README.md works as written.

Each fenced ``bash`` block of the README is tagged: ``bash quick`` blocks are run as written, in a copy of the
project where `make train` has been done on a tiny dataset; ``bash long`` blocks (training for minutes, a SLURM
cluster, data that is not here) are run in a dry form that still parses every argument: ``make -n``, ``nxtp fit
... --print_config``, ``nxtp sweep ... --dry-run``, ``bash -n`` for scripts, ``--help`` for the rest.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, fit_command, run

README = ROOT / "README.md"
FENCE = re.compile(r"^```bash(?P<tags>[^\n]*)\n(?P<body>.*?)^```", re.S | re.M)
PROJECT = ["configs", "datamodules", "experiments", "lightning_modules", "tests", "Makefile", "pyproject.toml",
           "constraints.txt", ".venv"]


def blocks() -> list[tuple[str, list[str]]]:
    """(tag, commands) of every bash block; a command may continue over lines ending in a backslash."""
    found = []
    for match in FENCE.finditer(README.read_text()):
        text = re.sub(r"\\\n\s*", " ", match["body"])
        commands = [line.split("  #")[0].strip() for line in text.splitlines()]
        found.append((match["tags"].strip(), [c for c in commands if c and not c.startswith("#")]))
    return found


def dry(command: str) -> str:
    """The form of a long command that checks it without doing the long work."""
    words = shlex.split(command)
    env = []
    while "=" in words[0]:  # VAR=value prefixes stay in front
        env.append(words.pop(0))
    program = Path(words[0]).name
    command = shlex.join(env + words) if env else command
    if program == "make":
        return f"make -n {shlex.join(words[1:])}"
    if program in ("sbatch", "bash"):
        return f"bash -n {shlex.quote(words[1])}"
    if program == "nxtp" and words[1] == "fit":
        return f"{command} --print_config > /dev/null"
    if program == "nxtp" and words[1] == "sweep":
        return f"{command} --dry-run"
    return f"{shlex.join(env + words[:2])} --help > /dev/null"


def test_every_bash_block_is_tagged():
    tags = [tag for tag, _ in blocks()]
    assert tags and all(tag in ("quick", "long") for tag in tags), tags
    assert "quick" in tags and "long" in tags


@pytest.fixture(scope="module")
def project(tmp_path_factory, shapes) -> Path:
    """A copy of the project after `make train`: the tiny dataset as data/shapes and a short run's checkpoint."""
    root = tmp_path_factory.mktemp("readme")
    for name in PROJECT:
        (root / name).symlink_to(ROOT / name)
    (root / "data").mkdir()
    (root / "data" / "shapes").symlink_to(shapes)
    fit = run(fit_command(shapes, root / "logs", 4))
    assert fit.returncode == 0, fit.stderr[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["quick", "long"])
def test_readme_commands_work(project, tag):
    env = {**os.environ, "PATH": f"{project / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    for block_tag, commands in blocks():
        if block_tag != tag:
            continue
        script = "\n".join(commands if tag == "quick" else [dry(c) for c in commands])
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
