"""The `nxtp` command: `--help` lists every subcommand, and each subcommand answers its own `--help`."""

import os
import subprocess
import sys

import pytest
from conftest import NXTP_CLI, run, run_with_imports

from lightning_modules.cli import COMMANDS, main


@pytest.mark.e2e
def test_help_lists_every_subcommand_and_an_unknown_one_is_refused():
    result = run(NXTP_CLI + ["--help"])  # the installed entry point, as a user runs it
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    wrong = run(NXTP_CLI + ["trian"])
    assert wrong.returncode == 2 and "unknown command 'trian'" in wrong.stderr


@pytest.mark.e2e
def test_a_reader_that_leaves_ends_the_command_quietly():
    """`nxtp ... | head`: a closed pipe ends the command with SIGPIPE's status, not a traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write, whatever the timing
    try:
        result = subprocess.run(NXTP_CLI + ["--help"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == ""


@pytest.mark.e2e
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_its_own_help(command, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nxtp", command, "--help"])
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


HEAVY = {"torch", "transformers", "lightning", "open_clip"}
OPTIONS = {  # some options of each command's own, and for label and serve the shared inference options
    "label": ["--checkpoint", "--vocabulary", "--attention-maps", "--format", "--batch-size", "--workers"],
    "serve": ["--checkpoint", "--port", "--max-batch-size", "--timeout"],
    "export": ["--checkpoint", "--format", "--out", "--opset"],
    "import-official": ["--checkpoint", "--clip", "--tokenizer", "--out"],
    "sweep": ["--launcher", "--index", "--dry-run"],
}
SHARED = ["--device", "--precision", "--topk", "--min-prob", "--max-image-pixels", "--no-draft"]


@pytest.mark.e2e
@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_lists_the_options_without_importing_torch(command):
    """`nxtp COMMAND --help` answers at once: nothing heavy is imported before the arguments are parsed."""
    result, imported = run_with_imports([command, "--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_modules.cli" in imported  # what -X importtime reports, so that an empty set proves nothing
    assert not {name.split(".")[0] for name in imported} & HEAVY
    expected = OPTIONS[command] + (SHARED if command in ("label", "serve") else [])
    assert [flag for flag in expected if flag not in result.stdout] == []
