"""The ``nxtp`` command: one entry point, one module per subcommand (``nxtp --help`` lists them).

    nxtp fit --config configs/experiment/default.yaml
    nxtp label --checkpoint CKPT.ckpt images/ photo.jpg 'more/*.png' --format csv --output labels.csv
    nxtp export --checkpoint CKPT.ckpt --format onnx --out DIR
    nxtp sweep configs/sweep/decoder_depth.yaml [--launcher slurm]
    nxtp import-official --checkpoint ckpt_epoch_03_iter_0021360.pth --clip openai --tokenizer TOKENIZER --out DIR
    nxtp compare --before logs/base/version_0 --after logs/finetuned/version_0

To add a subcommand: a module here with a ``NAME_main(argv) -> int`` function that calls :func:`imported` once it
has imported what it runs on, and a line in ``COMMANDS``.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LIGHTNING = ("fit", "validate", "test", "predict")  # LightningCLI's subcommands (cli/train.py)
# name: (module, function, what it does); the module is imported only when its command runs
COMMANDS = {
    "fit": (".train", "lightning_main", "train (and test) a model from a config; resumes interrupted runs"),
    "validate": (".train", "lightning_main", "evaluate a checkpoint on the validation shards"),
    "test": (".train", "lightning_main", "evaluate a checkpoint on the test shards"),
    "predict": (".train", "lightning_main", "labels for the test shards' images, through Lightning"),
    "label": (".label", "label_main", "name the objects in image files (JSON lines or CSV)"),
    "export": (".export", "export_main", "write a checkpoint as safetensors (pickle-free) or ONNX"),
    "sweep": (".sweep", "sweep_main", "run a hyper-parameter sweep here or as a SLURM array"),
    "import-official": (
        ".import_official",
        "import_main",
        "convert a released NXTP checkpoint (.pth) to a model folder",
    ),
    "serve": (".serve", "serve_main", "an HTTP server that labels images, with dynamic batching (LitServe)"),
    "shards": (".shards", "shards_main", "write your images with captions or labels as training shards"),
    "calibrate": (".calibrate", "calibrate_main", "fit calibrated label probabilities and per-label thresholds"),
    "compare": (".compare", "compare_main", "compare two checkpoints' test F1 label by label (per_label_test.csv)"),
}


def usage() -> str:
    """``nxtp --help``: every subcommand with a line each."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return (
        "usage: nxtp COMMAND [options]   (nxtp COMMAND --help for its options)\n\n"
        "Object recognition as next-token prediction.\n\ncommands:\n" + "\n".join(lines)
    )


def main() -> None:
    """Entry point of the ``nxtp`` console script."""
    try:
        run(sys.argv[1:], process_ends=True)
    except BrokenPipeError:  # the reader left (`nxtp label ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def run(argv: list[str], process_ends: bool = False) -> None:
    """Run the subcommand ``argv[0]`` with the rest of ``argv``; ``process_ends``: nothing runs after it in this
    process (the console script), so what the command froze may stay frozen (:func:`_collector_paused`)."""
    command = argv[0] if argv else None
    if command not in COMMANDS:
        print(usage(), file=sys.stdout if command in (None, "-h", "--help") else sys.stderr)
        if command not in (None, "-h", "--help"):
            print(f"\nnxtp: unknown command {command!r}", file=sys.stderr)
        sys.exit(0 if command in ("-h", "--help") else 2)
    module, function, _ = COMMANDS[command]
    with _collector_paused(process_ends):
        entry = getattr(importlib.import_module(module, __name__), function)
        if command in LIGHTNING:
            entry()  # LightningCLI reads sys.argv itself
        else:
            sys.exit(entry(argv[1:]))


_paused = False  # whether run() paused the garbage collector and the command has not called imported() yet


@contextmanager
def _collector_paused(process_ends: bool = False) -> Iterator[None]:
    """Python's cyclic garbage collector paused until the command calls :func:`imported`, and everything as it was
    found once the command ends (for callers that run commands in their own process).

    When the process ends with the command, what it froze stays frozen: the collections of interpreter shutdown
    then skip those millions of objects: a 6-step `nxtp fit` uses 0.87x the CPU, `nxtp label` 0.82x
    (``experiments/bench_start.py``)."""
    global _paused
    enabled = gc.isenabled()
    _paused = enabled
    gc.disable()
    try:
        yield
    finally:
        _paused = False
        if not process_ends:
            gc.unfreeze()
        if enabled:
            gc.enable()


def imported() -> None:
    """What a command calls once it has imported what it runs on (torch, transformers, Lightning) and, where it
    can, built its model.

    Those imports make millions of objects that live as long as the process, and almost no garbage, and every
    full collection of the cyclic garbage collector walks them all. So the collector is paused until here
    (``run``), and these objects are then frozen out of its way (``gc.freeze``): later collections skip them, and
    the data workers forked afterwards share their memory instead of copying the pages the collector writes to. A
    6-step `nxtp fit` with 2 data workers a loader used 0.84x the CPU (``experiments/bench_start.py``)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
