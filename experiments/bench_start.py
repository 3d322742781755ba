"""What the ``nxtp`` command's handling of Python's garbage collector saves: the CPU time of short commands, each a
process of its own as a user starts it, with the collector paused while the command imports and then its objects
frozen (``lightning_modules.cli.imported``) and left frozen as the process ends, against the same commands with
the objects unfrozen at the end (as ``cli.run`` leaves an in-process caller), and with the collector left as Python
sets it.

    python experiments/bench_start.py [--repeats 3] [--steps 6] [--workers 2]

It builds a tiny synthetic dataset (with its tokenizer) in a temporary folder, then times ``nxtp fit`` (``--steps``
steps of the default experiment, validated and checkpointed every 3, ``--workers`` data workers a loader) and
``nxtp label`` of 32 of the dataset's images with the model the first fit wrote. The two ways alternate, so other
work on the machine affects both alike. It prints the CPU seconds (user + system, the command's data workers
included) and wall seconds of each, their medians and the ratio.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
# The baselines: the same entry point with the collector left alone (``imported`` then does nothing), and with the
# frozen objects unfrozen as the command ends (what the interpreter's shutdown then collects).
UNTOUCHED = (
    "import contextlib, sys; import lightning_modules.cli as cli; "
    "cli._collector_paused = contextlib.nullcontext; sys.argv[0] = 'nxtp'; cli.main()"
)
UNFROZEN = "import sys; import lightning_modules.cli as cli; sys.argv[0] = 'nxtp'; cli.run(sys.argv[1:])"
WAYS = {
    "paused, then frozen": ["-m", "lightning_modules.cli"],
    "unfrozen at the end": ["-c", UNFROZEN],
    "untouched": ["-c", UNTOUCHED],
}


def timed(way: str, args: list[str]) -> tuple[float, float]:
    """CPU and wall seconds of ``nxtp ARGS`` started the ``way`` given; a failed command stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *WAYS[way], *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"nxtp {' '.join(args[:2])} ({way}) failed:\n{done.stderr[-3000:]}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="data workers of each loader of the fit")
    args = parser.parse_args(argv)

    from datamodules.synthetic import build_dataset
    from datamodules.tokenizer import build_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_start-"))
    data = tmp / "shapes"
    build_dataset(data, 256, 32, 32, samples_per_shard=128, workers=1)
    build_tokenizer(data)
    images = tmp / "images"
    images.mkdir()
    with tarfile.open(data / "test" / "shard-000000.tar") as tar:
        for member in [m for m in tar.getmembers() if m.name.endswith(".jpg")][:32]:
            (images / Path(member.name).name).write_bytes(tar.extractfile(member).read())

    def fit(run: int) -> list[str]:
        logs = tmp / f"logs-{run}"
        return [
            "fit", "--config", "configs/experiment/default.yaml",
            "--model.nxtp.tokenizer", str(data / "tokenizer"),
            "--model.evaluation.semantic_metric", "false", "--test_after_fit", "false",
            "--data.train_shards", str(data / "train/shard-{000000..000001}.tar"),
            "--data.val_shards", str(data / "val/shard-000000.tar"),
            "--data.batch_size", "16", "--data.num_workers", str(args.workers),
            "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(logs),
        ]  # fmt: skip

    checkpoint = None
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    run = 0
    for _ in range(args.repeats):
        for way in WAYS:
            run += 1
            times.setdefault(("fit", way), []).append(timed(way, fit(run)))
            checkpoint = checkpoint or next((tmp / f"logs-{run}").rglob("last.ckpt"))
            label = ["label", "--checkpoint", str(checkpoint), "--workers", "0", str(images)]
            times.setdefault(("label", way), []).append(timed(way, label))

    print(f"| command | collector | CPU s (median of {args.repeats}) | wall s | each run's CPU s |")
    print("|---|---|---|---|---|")
    medians = {}
    for (command, way), values in times.items():
        cpu, wall = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        medians[command, way] = cpu
        each = ", ".join(f"{v[0]:.1f}" for v in values)
        print(f"| {command} | {way} | {cpu:.1f} | {wall:.1f} | {each} |")
    for command in ("fit", "label"):
        for baseline in ("untouched", "unfrozen at the end"):
            ratio = medians[command, "paused, then frozen"] / medians[command, baseline]
            print(f"{command}: CPU {ratio:.2f}x of the {baseline} collector's")


if __name__ == "__main__":
    main()
