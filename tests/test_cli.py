"""The `nxtp` command: `--help` lists every subcommand, and each subcommand answers its own `--help`."""

import pytest
from conftest import NXTP_CLI, run

from lightning_modules.cli import COMMANDS


def test_help_lists_every_subcommand_and_an_unknown_one_is_refused():
    result = run(NXTP_CLI + ["--help"])
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    wrong = run(NXTP_CLI + ["trian"])
    assert wrong.returncode == 2 and "unknown command 'trian'" in wrong.stderr


@pytest.mark.parametrize("command", sorted({c for c in COMMANDS if c not in ("validate", "test", "predict")}))
def test_every_subcommand_has_its_own_help(command):
    result = run(NXTP_CLI + [command, "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
