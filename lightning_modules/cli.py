"""The ``nxtp`` command: LightningCLI subcommands (fit, validate, test, predict), ``label`` and ``import-official``.

    nxtp fit --config configs/experiment/default.yaml
    nxtp label --checkpoint CKPT.ckpt images/ photo.jpg
    nxtp import-official --checkpoint ckpt_epoch_03_iter_0021360.pth --clip openai --tokenizer TOKENIZER --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class NXTPCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit``: evaluate the best checkpoint on the test split after training."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run `test` on the best checkpoint after `fit`")

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit"):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
        if self.trainer.is_global_zero and results:
            summary = {k: round(v, 4) for k, v in results[0].items() if "/f1" in k or k.endswith("/f")}
            print("test results:", json.dumps(summary))


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def label_main(argv: list[str]) -> int:
    """``nxtp label``: print one JSON line per image with its labels sorted by probability."""
    parser = argparse.ArgumentParser(prog="nxtp label", description="Name the objects in images.")
    parser.add_argument("--checkpoint", required=True,
                        help="a Lightning checkpoint (.ckpt) written by `nxtp fit`, or a folder written by `import-official`")
    parser.add_argument("--topk", type=int, default=10, help="first tokens to branch from (at most this many labels)")
    parser.add_argument("--min-prob", type=float, default=0.0, help="drop labels below this probability")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("paths", nargs="+", help="image files or directories")
    args = parser.parse_args(argv)

    from .recognizer import Recognizer

    recognizer = Recognizer.from_checkpoint(args.checkpoint, args.device)
    failed = 0
    paths = image_paths(args.paths)
    for start in range(0, len(paths), args.batch_size):
        good, pixels = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                pixels.append(recognizer.preprocess(path))
                good.append(path)
            except Exception as e:  # report and go on: one bad file must not cost the others
                failed += 1
                print(f"nxtp label: cannot read {path}: {e}", file=sys.stderr)
                print(json.dumps({"image": str(path), "error": str(e)}), flush=True)
        if not good:
            continue
        results = recognizer.label(pixels, topk=args.topk, min_prob=args.min_prob, batch_size=args.batch_size)
        for path, labels in zip(good, results):
            entry = {"image": str(path), "labels": [{"label": l, "prob": p} for l, p in labels]}
            print(json.dumps(entry), flush=True)
    return 1 if failed else 0


def main() -> None:
    """Entry point of the ``nxtp`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "label":
        sys.exit(label_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "import-official":
        from .official import import_main

        sys.exit(import_main(sys.argv[2:]))
    from datamodules import NXTPDataModule

    from .lit_nxtp import LitNXTP

    NXTPCLI(LitNXTP, NXTPDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
