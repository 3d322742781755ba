"""experiments/gpu_check.sh (run on a GPU machine) parses, and every step it runs exists here."""

import shlex
import subprocess

import pytest
from conftest import ROOT

pytestmark = pytest.mark.e2e  # every test here starts a command

SCRIPT = ROOT / "experiments" / "gpu_check.sh"


def test_the_gpu_check_parses_and_names_only_what_exists():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    dry = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    steps = dict(line.split(": ", 1) for line in dry.stdout.splitlines())
    assert [s.split()[0] for s in steps] == ["attention", "train_paper", "sampling_paper", "label_paper", "fsdp"]
    words = [w for command in steps.values() for w in shlex.split(command.replace("bash -c", ""))]
    files = [w for w in words if w.endswith((".py", ".yaml")) and not w.startswith("$")]
    assert files and all((ROOT / f).is_file() for f in files), files
    assert "--trainer.strategy fsdp" in steps["fsdp (120 s)"]
