"""The ``nxtp`` command: one entry point, one module per subcommand (``nxtp --help`` lists them).

    nxtp fit --config configs/experiment/default.yaml
    nxtp label --checkpoint CKPT.ckpt images/ photo.jpg 'more/*.png' --format csv --output labels.csv
    nxtp export --checkpoint CKPT.ckpt --format onnx --out DIR
    nxtp sweep configs/sweep/decoder_depth.yaml [--launcher slurm]
    nxtp import-official --checkpoint ckpt_epoch_03_iter_0021360.pth --clip openai --tokenizer TOKENIZER --out DIR
    nxtp compare --before logs/base/version_0 --after logs/finetuned/version_0

To add a subcommand: a module here with a ``NAME_main(argv) -> int`` function, and a line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
import sys

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
        run(sys.argv[1:])
    except BrokenPipeError:  # the reader left (`nxtp label ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def run(argv: list[str]) -> None:
    """Run the subcommand ``argv[0]`` with the rest of ``argv``."""
    command = argv[0] if argv else None
    if command not in COMMANDS:
        print(usage(), file=sys.stdout if command in (None, "-h", "--help") else sys.stderr)
        if command not in (None, "-h", "--help"):
            print(f"\nnxtp: unknown command {command!r}", file=sys.stderr)
        sys.exit(0 if command in ("-h", "--help") else 2)
    module, function, _ = COMMANDS[command]
    entry = getattr(importlib.import_module(module, __name__), function)
    if command in LIGHTNING:
        entry()  # LightningCLI reads sys.argv itself
    else:
        sys.exit(entry(argv[1:]))
