"""The ``nxtp`` command: LightningCLI subcommands (fit, validate, test, predict), ``label``, ``export``, ``sweep``,
``import-official``.

    nxtp fit --config configs/experiment/default.yaml
    nxtp label --checkpoint CKPT.ckpt images/ photo.jpg 'more/*.png' --format csv --output labels.csv
    nxtp export --checkpoint CKPT.ckpt --format onnx --out DIR
    nxtp sweep configs/sweep/decoder_depth.yaml [--launcher slurm]
    nxtp import-official --checkpoint ckpt_epoch_03_iter_0021360.pth --clip openai --tokenizer TOKENIZER --out DIR
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def resume_point(root: Path) -> tuple[Path, str] | None:
    """Where an interrupted run continues: the newest checkpoint of the newest ``version_N`` under a TensorBoard
    logger's ``save_dir/name``, and that version's folder name.

    The candidates are the version's ``last.ckpt`` (written every validation and on SIGTERM / Ctrl-C) and the
    ``hpc_ckpt_N.ckpt`` files written in ``root`` when SLURM signals a job before pre-empting it
    (``#SBATCH --signal=USR1@120``, see ``callbacks.SlurmRequeue``); the most recently written wins.
    """
    number = lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1  # noqa: E731
    versions = sorted(root.glob("version_*"), key=number)
    if not versions:
        return None
    candidates = [p for v in reversed(versions) if (p := v / "checkpoints" / "last.ckpt").is_file()][:1]
    candidates += root.glob("hpc_ckpt_*.ckpt")
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    version = newest.parents[1].name if newest.name == "last.ckpt" else versions[-1].name
    return newest, version


class NXTPCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit`` (evaluate the best checkpoint after training) and ``--resume``
    (continue the newest run of the same logger from its newest checkpoint, in the same log folder; see
    ``resume_point``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run `test` on the best checkpoint after `fit`")
        parser.add_argument("--resume", type=bool, default=True,
                            help="resume from the last checkpoint of the newest run when one exists (false: start anew)")

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        config = self.config.fit
        logger = config.trainer.logger
        if not hasattr(logger, "init_args") or not str(logger.class_path).endswith("TensorBoardLogger"):
            return
        args = logger.init_args
        root = Path(args.save_dir) / (args.name or "lightning_logs")
        if config.trainer.default_root_dir is None:
            # SLURM pre-emption checkpoints (hpc_ckpt_N.ckpt) go here, next to the runs they belong to.
            config.trainer.default_root_dir = str(root)
        found = resume_point(root) if config.get("resume") and not config.get("ckpt_path") else None
        if found is not None:
            config.ckpt_path, args.version = str(found[0]), found[1]  # continue in the interrupted run's folder
            print(f"resuming from {found[0]} (--resume false starts a new run)")

    def after_fit(self) -> None:
        if any(getattr(c, "requeued", False) for c in self.trainer.callbacks):
            return  # stopped for a SLURM requeue: the requeued job finishes the run
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        if self.config.fit.get("test_after_fit"):
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
            if self.trainer.is_global_zero and results:
                metrics.update(results[0])
                summary = {k: round(v, 4) for k, v in results[0].items() if "/f1" in k or k.endswith("/f")}
                print("test results:", json.dumps(summary))
        self._write_metrics(metrics)

    def after_test(self) -> None:
        self._write_metrics({k: float(v) for k, v in self.trainer.callback_metrics.items()})

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        """The run's final metrics as ``metrics.json`` in its log folder (what ``nxtp sweep`` tabulates)."""
        if not self.trainer.is_global_zero or self.trainer.log_dir is None:
            return
        checkpoint = self.trainer.checkpoint_callback
        metrics = {"global_step": self.trainer.global_step, **metrics}
        if checkpoint is not None and checkpoint.best_model_score is not None:
            metrics.update(best_checkpoint=checkpoint.best_model_path, best_score=float(checkpoint.best_model_score))
        path = Path(self.trainer.log_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1) + "\n")


def image_paths(inputs: list[str], files_from: str | None = None) -> list[Path]:
    """Files as given, glob patterns expanded, image files inside directories (recursively, sorted), and the
    paths listed one per line in ``files_from``."""
    items = list(inputs)
    if files_from:
        items += [line.strip() for line in Path(files_from).read_text().splitlines() if line.strip()]
    paths: list[Path] = []
    for item in items:
        if not Path(item).exists() and glob.has_magic(item):
            paths += [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        elif Path(item).is_dir():
            paths += sorted(p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(Path(item))  # a missing file is reported as an error entry, like an unreadable one
    return paths


class ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images for ``nxtp label``; an unreadable file yields its error instead of pixels."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as image:
                return str(self.paths[i]), self.transform(image.convert("RGB")), None
        except Exception as e:  # reported, never fatal: one bad file must not cost the others
            return str(self.paths[i]), None, f"{type(e).__name__}: {e}"


class LabelWriter:
    """Writes ``nxtp label`` results as JSON lines or CSV (one row per label) to a file or stdout."""

    def __init__(self, fmt: str, output: str | None) -> None:
        self.stream = open(output, "w", newline="") if output else sys.stdout
        self.csv = csv.writer(self.stream) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["image", "label", "prob", "error"])

    def write(self, image: str, labels: list[tuple[str, float]] | None = None, error: str | None = None) -> None:
        if self.csv:
            rows = [[image, label, prob, ""] for label, prob in labels or []] or [[image, "", "", error or ""]]
            self.csv.writerows(rows)
        else:
            entry = {"image": image, "error": error} if error else \
                {"image": image, "labels": [{"label": l, "prob": p} for l, p in labels]}
            self.stream.write(json.dumps(entry) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


def label_main(argv: list[str]) -> int:
    """``nxtp label``: labels sorted by probability for every image, as JSON lines (default) or CSV."""
    parser = argparse.ArgumentParser(prog="nxtp label", description="Name the objects in images.")
    parser.add_argument("--checkpoint", required=True,
                        help="a Lightning checkpoint (.ckpt) written by `nxtp fit`, or a folder written by "
                             "`nxtp export` / `nxtp import-official`")
    parser.add_argument("--topk", type=int, default=10, help="first tokens to branch from (at most this many labels)")
    parser.add_argument("--min-prob", type=float, default=0.0, help="drop labels below this probability")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers that read and preprocess images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32", help="autocast dtype")
    parser.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument("--files-from", help="a text file with one image path per line")
    parser.add_argument("paths", nargs="*", help="image files, directories or glob patterns")
    args = parser.parse_args(argv)
    paths = image_paths(args.paths, args.files_from)
    if not paths:
        parser.error("no images: give files, directories, glob patterns or --files-from")

    from .recognizer import Recognizer

    recognizer = Recognizer.from_checkpoint(args.checkpoint, args.device)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, recognizer.model.eval_transform), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=list)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision)
    writer = LabelWriter(args.format, args.output)
    failed = 0
    for batch in tqdm(loader, desc="labelling", unit="batch", file=sys.stderr, disable=not sys.stderr.isatty()):
        for path, _, error in (item for item in batch if item[2]):
            failed += 1
            print(f"nxtp label: cannot read {path}: {error}", file=sys.stderr)
            writer.write(path, error=error)
        good = [item for item in batch if item[2] is None]
        if not good:
            continue
        with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None):
            results = recognizer.label([pixels for _, pixels, _ in good], topk=args.topk, min_prob=args.min_prob,
                                       batch_size=args.batch_size)
        for (path, _, _), labels in zip(good, results):
            writer.write(path, labels)
    writer.close()
    if failed:
        print(f"nxtp label: {failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    """Entry point of the ``nxtp`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "label":
        sys.exit(label_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from .export import export_main

        sys.exit(export_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "sweep":
        from .sweep import sweep_main

        sys.exit(sweep_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "import-official":
        from .official import import_main

        sys.exit(import_main(sys.argv[2:]))
    from datamodules import NXTPDataModule

    from .callbacks import AttentionMaskImage, SaveConfigToTensorBoard, SlurmRequeue
    from .lit_nxtp import LitNXTP

    NXTPCLI(LitNXTP, NXTPDataModule, seed_everything_default=0, save_config_callback=SaveConfigToTensorBoard,
            save_config_kwargs={"overwrite": True}, trainer_defaults={"callbacks": [AttentionMaskImage(), SlurmRequeue()]})


if __name__ == "__main__":
    main()
