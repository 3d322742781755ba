"""The `nxtp` command: `--help` lists every subcommand, and each subcommand answers its own `--help`."""

import gc
import os
import subprocess
import sys

import pytest
from conftest import NXTP_CLI, run, run_with_imports, tiny_nxtp

from lightning_modules.cli import COMMANDS, main
from lightning_modules.cli import run as run_command


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


def test_a_command_pauses_the_collector_while_it_imports_then_freezes_and_leaves_all_as_found(tmp_path, monkeypatch):
    # `nxtp label` in this process: the cyclic garbage collector is paused while it imports and loads its model, then
    # those objects are frozen out of its way (cli.imported; experiments/bench_start.py measures the gain), and once
    # the command ends the collector is as it was found.
    from PIL import Image

    tiny_nxtp().save_pretrained(tmp_path / "model")
    Image.new("RGB", (48, 32), "red").save(tmp_path / "a.png")
    freezes, freeze = [], gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(gc.isenabled()), freeze()))
    with pytest.raises(SystemExit) as end:
        run_command(["label", "--checkpoint", str(tmp_path / "model"), "--workers", "0", str(tmp_path / "a.png")])
    assert end.value.code == 0
    assert freezes == [False]  # once, while still paused
    assert gc.isenabled() and gc.get_freeze_count() == 0

    gc.disable()  # a caller that paused the collector itself: a command leaves it paused
    try:
        with pytest.raises(SystemExit):
            run_command(["label", "--checkpoint", str(tmp_path / "model"), "--workers", "0", str(tmp_path / "a.png")])
        assert not gc.isenabled() and freezes == [False] and gc.get_freeze_count() == 0
    finally:
        gc.enable()

    # The console script (`main`) ends its process: what it froze stays frozen, out of the way of the collections
    # of interpreter shutdown.
    monkeypatch.setattr(sys, "argv", ["nxtp", "label", "--checkpoint", str(tmp_path / "model"), "--workers", "0"])
    sys.argv.append(str(tmp_path / "a.png"))
    try:
        with pytest.raises(SystemExit) as end:
            main()
        assert end.value.code == 0 and freezes == [False, False]
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
