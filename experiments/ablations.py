"""The paper's three ablations in miniature, in one command (``make ablations``), with their tables.

    python experiments/ablations.py                                   # all three; the tables in logs/ablations/
    python experiments/ablations.py --only sampling --test-batches 2  # one ablation, the samplers on 128 images
    python experiments/ablations.py --tables-only                     # the tables of whatever has finished
    python experiments/ablations.py --suffix smoke --set trainer.max_steps=20 ...   # a smoke run, sweeps of its own

Each ablation is a grid sweep in ``configs/sweep/`` over the setting it compares and ``seed_everything`` (which
seeds the data too: the default data config has ``seed: ${..seed_everything}``), at the default experiment's schedule:

* ``masking`` (``ablation_masking.yaml``): label-masked vs causal attention in training;
* ``depth`` (``ablation_depth.yaml``): 1, 2 and 4 decoder blocks, and one-shot sampling timed on the test subset;
* ``sampling`` (``ablation_sampling.yaml``): the masking ablation's models (label-masked and causal, each seed)
  tested with one-shot sampling, greedy search and beam search on the same first ``--test-batches`` test batches,
  the sampler timed.

1. Each sweep runs with ``nxtp sweep`` (its runs one after another; a finished run is never trained again). Before
   it, every run it plans (``--dry-run``) that another sweep has finished with the same arguments (the same hash of
   its resolved config, the end of a run's name) is linked into the sweep's folder rather than trained again: the
   sampling ablation's runs are the masking ablation's, and the depth ablation's 1-block runs its masked ones. The
   tables and tests take the finished runs from the sweep's ``results.csv``.
2. The sampler tests: ``nxtp test --ckpt_path BEST --model.evaluation.sampler S --model.evaluation.topk [5]
   --trainer.limit_test_batches N`` for each run and sampler, with ``SamplerTimer``, logged to
   ``logs/sweeps/NAME/tests/RUN/S-bN``; a test that has finished is not run again.
3. The tables: ``--out``/``NAME.md`` per ablation and ``ablations.csv`` (a row per run and sampler): exact-label
   recall, precision and F1 at top-5 as the mean ± the sample standard deviation over the seeds, and each setting's
   F1 difference to the sweep's first value (the reference), paired by seed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweep"
SEED = "seed_everything"
METRICS = {"R@5": "test/exact_top5/recall", "P@5": "test/exact_top5/precision", "F1@5": "test/exact_top5/f1"}
SEMANTIC = ("semantic F@5", "test/semantic_top5/f")
F1 = METRICS["F1@5"]
MS = "test/sampler_ms_per_image"
TRAIN = "train_time_s"
SAMPLERS = ("one-shot", "greedy", "beam")


@dataclass(frozen=True)
class Ablation:
    """One ablation: its sweep file, what its table is called, the samplers its runs are tested with on the test
    subset, and whether the table's scores come from those tests (else from each run's own test, the full split)."""

    name: str
    sweep: str
    title: str
    samplers: tuple[str, ...] = ()
    scores_from_tests: bool = False


ABLATIONS = {  # in the order they run: a later one links the runs it shares with an earlier one
    "masking": Ablation("masking", "ablation_masking.yaml", "Label-masked vs causal attention in training"),
    "depth": Ablation("depth", "ablation_depth.yaml", "Decoder depth", samplers=("one-shot",)),
    "sampling": Ablation(
        "sampling", "ablation_sampling.yaml", "One-shot sampling vs greedy and beam search", SAMPLERS, True
    ),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SamplerTimer(L.Callback):
    """Times how the labels are read from the model in each test step (``recognize`` for one-shot sampling,
    ``label_images`` for greedy and beam search, as ``LitNXTP._evaluate`` calls them; not the loss, not the scoring)
    and logs the milliseconds per test image as ``test/sampler_ms_per_image``. A test gets it with
    ``--trainer.callbacks+={"class_path": "experiments.ablations.SamplerTimer"}``."""

    TIMED = ("recognize", "label_images")

    def __init__(self) -> None:
        self.seconds, self.images = 0.0, 0
        self._originals: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_modules import lit_nxtp

        for name in self.TIMED:
            if name not in self._originals:
                self._originals[name] = getattr(lit_nxtp, name)
                setattr(lit_nxtp, name, self._timed(self._originals[name]))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_modules import lit_nxtp

        for name, original in self._originals.items():
            setattr(lit_nxtp, name, original)
        self._originals = {}

    def _timed(self, sample):
        @functools.wraps(sample)
        def timed(model, pixels: torch.Tensor, *args, **kwargs):
            synchronize(pixels.device)
            start = time.perf_counter()
            try:
                return sample(model, pixels, *args, **kwargs)
            finally:
                synchronize(pixels.device)
                self.seconds += time.perf_counter() - start

        return timed

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds, self.images = 0.0, 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.images += len(batch.keys)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.images:
            pl_module.log(MS, 1000 * self.seconds / self.images)


# the sweeps and the tests ----------------------------------------------------------------------------------------


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a sweep's ``fixed`` keys (the values read as YAML: 20 is a number)."""
    fixed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"ablations: --set {pair!r}: expected KEY=VALUE")
        fixed[key] = yaml.safe_load(value)
    return fixed


def load(ablation: Ablation, args: argparse.Namespace):
    """The ablation's sweep and its file. With ``--suffix``, ``--seeds``, ``--set`` or ``--save-dir``, a copy of the
    shipped file that says so, written to ``OUT/sweeps/NAME.yaml``: its runs have other arguments, so other names."""
    from lightning_modules.sweep import Sweep

    path = SWEEPS / ablation.sweep
    sweep = Sweep.load(path)
    if not (args.suffix or args.seeds or args.set or args.save_dir):
        return sweep, path
    spec = asdict(sweep)
    spec["name"] = f"{sweep.name}-{args.suffix}" if args.suffix else sweep.name
    spec["config"] = [str(Path(c).resolve()) for c in sweep.config]
    spec["fixed"] = {**sweep.fixed, **overrides(args.set or [])}
    if args.seeds:
        spec["parameters"] = {**sweep.parameters, SEED: list(args.seeds)}
    if args.save_dir:
        spec["save_dir"] = args.save_dir
    copy = Path(args.out) / "sweeps" / f"{spec['name']}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(f"# {ablation.sweep} for experiments/ablations.py {' '.join(sys.argv[1:])}\n")
    with open(copy, "a") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return Sweep.load(copy), copy


def finished(folder: Path, metric: str) -> bool:
    """Whether the run or test in ``folder`` ended with ``metric`` in its ``metrics.json``."""
    from lightning_modules.sweep import read_metrics

    metrics = read_metrics(folder) if folder.is_dir() else None
    return metrics is not None and isinstance(metrics.get(metric), float)


def link_finished(folder: Path, runs: list[str], metric: str) -> list[Path]:
    """Link into a sweep's ``folder`` each of ``runs`` (run names, ending with the hash of their arguments) that it
    lacks and that another sweep beside it has finished; ``nxtp sweep`` then counts it as done (same arguments)."""
    made = []
    for run in runs:
        target = folder / run
        if target.exists() or target.is_symlink():
            continue
        digest = run.rsplit("-", 1)[-1]
        for other in sorted(folder.parent.glob(f"*/*-{digest}")):
            if other.parent.name == folder.name or not finished(other, metric):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.relpath(other.resolve(), folder.resolve()), target_is_directory=True)
            print(f"{target}: the same arguments as {other}, which has finished: linked, not trained again")
            made.append(target)
            break
    return made


def run_names(dry_run: str, sweep_name: str) -> list[str]:
    """The run names in ``nxtp sweep FILE --dry-run``'s output (each command's logger name, ``sweeps/NAME/RUN``)."""
    flag, names = "--trainer.logger.init_args.name=", []
    for line in dry_run.splitlines():
        if line.startswith("nxtp fit"):
            name = next(a for a in shlex.split(line) if a.startswith(flag)).removeprefix(flag)
            names.append(name.removeprefix(f"sweeps/{sweep_name}/"))
    return names


def nxtp_sweep(path: Path, *flags: str, capture: bool = False) -> subprocess.CompletedProcess:
    """``nxtp sweep PATH FLAGS`` in a process of its own: the runs' names and hashes come from the code as it is when
    it starts, as the runs' own do (not from what this process imported when it started)."""
    command = [sys.executable, "-m", "lightning_modules.cli", "sweep", str(path), *flags]
    if not capture:
        print(f"$ {shlex.join(command)}", flush=True)
    return subprocess.run(command, env=environment(), capture_output=capture, text=True)


def others_finished(folder: Path, metric: str) -> bool:
    """Whether another sweep beside ``folder`` has a finished run, one that ``link_finished`` could link."""
    return any(other.parent.name != folder.name and finished(other, metric) for other in folder.parent.glob("*/*"))


def link_shared_runs(sweep, path: Path) -> list[Path]:
    """``link_finished`` for every run the sweep plans (the names its ``--dry-run`` prints). Where no other sweep
    beside it has finished a run there is nothing to link: no dry run (a process that imports torch and Lightning)."""
    if not others_finished(sweep.folder, sweep.metric):
        return []
    planned = nxtp_sweep(path, "--dry-run", capture=True)
    if planned.returncode != 0:
        print(f"{path}: nxtp sweep --dry-run failed:\n{planned.stderr[-3000:]}", flush=True)
        return []
    return link_finished(sweep.folder, run_names(planned.stdout, sweep.name), sweep.metric)


def environment() -> dict[str, str]:
    """This process's environment with the repository importable (the tests load ``experiments.ablations``)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run_sweep(sweep, path: Path) -> bool:
    """Link the shared runs, then ``nxtp sweep PATH``; whether every run ended (done or pruned)."""
    link_shared_runs(sweep, path)
    return nxtp_sweep(path).returncode == 0


def finished_runs(sweep) -> list[tuple[dict[str, Any], str]]:
    """The parameters and name of each finished run in the sweep's ``results.csv`` (what ``nxtp sweep`` wrote at its
    end, or with ``--collect``, for its study: the runs of the sweep file and the code as they are)."""
    table = sweep.folder / "results.csv"
    if not table.is_file():
        return []
    with open(table, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["status"] == "done"]
    return [({key: yaml.safe_load(row[key]) for key in sweep.parameters}, row["run"]) for row in rows]


def sampler_label(sampler: str, beams: int) -> str:
    return f"beam{beams}" if sampler == "beam" else sampler


def tests_folder(sweep, run: str, sampler: str, batches: int, beams: int) -> Path:
    """Where the test of ``run`` with ``sampler`` on the first ``batches`` test batches logs (its logger's name under
    the sweep's ``save_dir``)."""
    return Path(sweep.save_dir) / "sweeps" / sweep.name / "tests" / run / f"{sampler_label(sampler, beams)}-b{batches}"


def best_checkpoint(run: Path) -> str:
    """The checkpoint a run's own test used (its best), or its newest ``last.ckpt``."""
    from lightning_modules.sweep import read_metrics

    best = (read_metrics(run) or {}).get("best_checkpoint")
    if best and Path(best).is_file():
        return best
    last = sorted(run.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not last:
        raise FileNotFoundError(f"{run}: no checkpoint to test")
    return str(last[-1])


def test_args(sweep, params: dict, checkpoint: str, sampler: str, batches: int, beams: int, folder: Path) -> list[str]:
    """The ``nxtp test`` arguments of one sampler test: the run's config and arguments, its checkpoint (whose
    architecture wins), the sampler, top-5, exact-label scores only, the first ``batches`` test batches."""
    from lightning_modules.sweep import cli_value

    args = ["test"] + [a for c in sweep.config for a in ("--config", c)]
    args += [f"--{key}={cli_value(value)}" for key, value in {**sweep.fixed, **params}.items()]
    return args + [
        f"--ckpt_path={checkpoint}",
        f"--model.evaluation.sampler={sampler}",
        f"--model.evaluation.beams={beams}",
        "--model.evaluation.topk=[5]",
        "--model.evaluation.semantic_metric=false",
        f"--trainer.limit_test_batches={batches}",
        f"--trainer.logger.init_args.save_dir={sweep.save_dir}",
        f"--trainer.logger.init_args.name={folder.relative_to(sweep.save_dir)}",
        "--trainer.callbacks+=" + json.dumps({"class_path": f"experiments.ablations.{SamplerTimer.__name__}"}),
    ]


def test_samplers(sweep, samplers: tuple[str, ...], batches: int, beams: int) -> bool:
    """Test every finished run of the sweep with each sampler (``test_args``), output in ``FOLDER.log``; a finished
    test is not run again. Whether every test finished."""
    ok = True
    for params, run in finished_runs(sweep):
        checkpoint = best_checkpoint(sweep.folder / run)
        for sampler in samplers:
            folder = tests_folder(sweep, run, sampler, batches, beams)
            if finished(folder, F1):
                continue
            command = [sys.executable, "-m", "lightning_modules.cli"]
            command += test_args(sweep, params, checkpoint, sampler, batches, beams, folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            log = folder.parent / f"{folder.name}.log"
            print(f"{run}: {sampler_label(sampler, beams)} on {batches} test batches ...", flush=True)
            started = time.perf_counter()
            with open(log, "a") as out:
                out.write(shlex.join(command) + "\n")
                out.flush()
                code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=environment()).returncode
            seconds = round(time.perf_counter() - started)
            if code == 0 and finished(folder, F1):
                print(f"{run}: {sampler_label(sampler, beams)} done in {seconds} s", flush=True)
            else:
                print(f"{run}: {sampler_label(sampler, beams)} failed (exit code {code}), see {log}", flush=True)
                ok = False
    return ok


# the tables ------------------------------------------------------------------------------------------------------


def collect(ablation: Ablation, sweep, samplers: tuple[str, ...], batches: int, beams: int) -> list[dict[str, Any]]:
    """One row per finished run (per sampler, where the scores come from the sampler tests): its setting, seed,
    scores and, where it was tested, its sampler's ms/image."""
    from lightning_modules.sweep import read_metrics

    rows = []
    for params, run in finished_runs(sweep):
        setting = {key: value for key, value in params.items() if key != SEED}
        own = read_metrics(sweep.folder / run) or {}
        tests = {s: read_metrics(tests_folder(sweep, run, s, batches, beams)) for s in samplers}
        if ablation.scores_from_tests:
            pairs = [({**setting, "sampler": sampler_label(s, beams)}, m, m) for s, m in tests.items() if m]
        else:
            pairs = [(setting, own, tests[samplers[0]] if samplers else None)]
        for where, scores, timing in pairs:
            row = {"ablation": ablation.name, "run": run, "setting": where, "seed": params.get(SEED, "")}
            row["steps"], row["test images"] = own.get("global_step"), scores.get("test/images")
            row.update({column: scores.get(key) for column, key in METRICS.items()})
            if isinstance(scores.get(SEMANTIC[1]), float):
                row[SEMANTIC[0]] = scores[SEMANTIC[1]]
            if not ablation.scores_from_tests and isinstance(own.get(TRAIN), float):  # where nxtp fit records it
                row["train s"] = own[TRAIN]
            if timing is not None and isinstance(timing.get(MS), float):
                row["ms/image"], row["timed images"] = timing[MS], timing.get("test/images")
            rows.append(row)
    return rows


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def shown(values: list[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def order(sweep, samplers: tuple[str, ...], beams: int):
    """The sort key of a setting: the order of its values in the sweep file (the first is the reference), then the
    samplers' order."""
    labels = [sampler_label(s, beams) for s in samplers]

    def key(setting: dict[str, Any]) -> tuple:
        place = []
        for name, value in setting.items():
            values = labels if name == "sampler" else sweep.grid().get(name, [])
            place.append(values.index(value) if value in values else len(values))
        return tuple(place)

    return key


def describe(setting: dict[str, Any]) -> str:
    return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in setting.items()) or "-"


def summarize(rows: list[dict[str, Any]], key) -> tuple[list[str], list[list[str]]]:
    """The table of an ablation's rows: a line per setting (the reference, first, by ``key``) with its seeds, each
    score as mean ± sd over them, and its F1 difference to the reference paired by seed, with how it reads."""
    settings: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (key(r["setting"]), str(r["seed"]))):
        settings.setdefault(json.dumps(row["setting"]), []).append(row)
    groups = list(settings.values())
    names = list(groups[0][0]["setting"]) if groups else []
    scores = list(METRICS) + [c for c in (SEMANTIC[0], "train s", "ms/image") if any(c in r for r in rows)]
    reference = groups[0] if groups else []
    by_seed = {r["seed"]: r for r in reference}
    header = [name.split(".")[-1] for name in names] + ["seeds"] + scores
    header += [f"Δ F1@5 vs {describe(reference[0]['setting'])} (per seed)", "Δ reads as"] if reference else []
    if "ms/image" in scores:
        header.insert(len(header) - 2, "ms × reference")
    lines = []
    for group in groups:
        line = [str(group[0]["setting"].get(name, "")) for name in names]
        line.append(", ".join(str(r["seed"]) for r in group))
        for column in scores:
            values = [r[column] for r in group if isinstance(r.get(column), (int, float))]
            line.append(shown(values, 0 if column in ("train s", "ms/image") else 3) if values else "")
        if "ms/image" in scores:
            mine = [r["ms/image"] for r in group if "ms/image" in r]
            base = [r["ms/image"] for r in reference if "ms/image" in r]
            line.append(f"{mean_sd(mine)[0] / mean_sd(base)[0]:.2f}x" if mine and base else "")
        if group is reference:
            line += ["reference", ""]
            lines.append(line)
            continue
        deltas = [r["F1@5"] - by_seed[r["seed"]]["F1@5"] for r in group if r["seed"] in by_seed]
        if not deltas:
            line += ["no seed in common", ""]
            lines.append(line)
            continue
        mean = sum(deltas) / len(deltas)
        line.append(f"{signed(mean)} ({', '.join(signed(d) for d in deltas)})")
        spread = [mean_sd([r["F1@5"] for r in g])[1] for g in (group, reference)]
        if len(deltas) < 2 or None in spread:
            line.append("one seed: no spread to compare with")
        elif (all(d > 0 for d in deltas) or all(d < 0 for d in deltas)) and abs(mean) > max(spread):
            line.append("beyond the seed spread")
        else:
            line.append("within the seed spread")
        lines.append(line)
    return header, lines


def markdown(ablation: Ablation, sweep, rows: list[dict[str, Any]], samplers, batches: int, beams: int) -> str:
    """An ablation's table in Markdown, with what it was measured on and how to read it."""
    key = order(sweep, samplers, beams)
    header, lines = summarize(rows, key)
    seeds = sorted({str(r["seed"]) for r in rows})
    steps = sorted({str(r["steps"]) for r in rows if r.get("steps") is not None})
    images = sorted({str(int(r["test images"])) for r in rows if isinstance(r.get("test images"), (int, float))})
    text = [f"## {ablation.title}", ""]
    text.append(
        f"`{sweep.name}` ({len(rows)} finished {'tests' if ablation.scores_from_tests else 'runs'}): "
        f"{', '.join(steps) or '?'} training steps, seeds {', '.join(seeds) or '-'}; exact-label scores at top-5 on "
        f"{', '.join(images) or '?'} test images"
        + (
            f" (the first {batches} test batches, the same for every sampler; each model's best checkpoint)"
            if ablation.scores_from_tests
            else " (each run's own test of its best checkpoint)"
        )
        + "."
    )
    if any("ms/image" in r for r in rows):
        timed = sorted({str(int(r["timed images"])) for r in rows if isinstance(r.get("timed images"), (int, float))})
        text[-1] += (
            f" ms/image: the sampler alone (not the loss, not the scoring), on {', '.join(timed)} test images, "
            f"on this machine{'; beam search with ' + str(beams) + ' beams' if 'beam' in samplers else ''}."
        )
    if any("train s" in r for r in rows):
        text[-1] += " train s: the training time `nxtp fit` recorded (validations included), on this machine."
    text += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(line) + " |" for line in lines]
    text += [
        "",
        "± is the sample standard deviation over the seeds. Δ is paired by seed (a seed is the initialisation and the "
        "data order): its mean, then each seed's. It reads as beyond the seed spread when it has the same sign in "
        "every seed and its mean is larger than the ± of both rows; a Δ within the seed spread is not a result.",
        "",
    ]
    return "\n".join(text)


def write_tables(out: Path, tables: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """``NAME.md`` per ablation and ``ablations.csv`` (every row) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        (out / f"{name}.md").write_text(text)
    columns = ["ablation", "setting", "seed", "run", "steps", "train s", "test images", *METRICS, SEMANTIC[0]]
    columns.append("ms/image")
    columns.append("timed images")
    with open(out / "ablations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "setting": describe(r["setting"])} for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(ABLATIONS), help="these ablations (default: all three)")
    parser.add_argument("--out", default="logs/ablations", help="folder of the tables (default: logs/ablations)")
    parser.add_argument(
        "--test-batches",
        type=int,
        default=4,
        help="test batches (of data.batch_size) the samplers are tested and timed on (default: 4, 256 images)",
    )
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, help="the sampling ablation's (default: all)")
    parser.add_argument("--beams", type=int, default=3, help="beam search's beams (default: 3)")
    parser.add_argument("--tables-only", action="store_true", help="only write the tables of what has finished")
    parser.add_argument("--suffix", help="run copies of the sweeps named NAME-SUFFIX (with --set, --seeds)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed key of every run (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", help="these seeds instead of the sweep files' (0 1)")
    parser.add_argument("--save-dir", help="the sweeps' save_dir instead of theirs (logs)")
    args = parser.parse_args(argv)
    chosen = [name for name in ABLATIONS if name in (args.only or ABLATIONS)]
    ok, tables, rows = True, {}, []
    for name in chosen:
        ablation = ABLATIONS[name]
        sweep, path = load(ablation, args)
        samplers = tuple(args.samplers or ablation.samplers) if ablation.scores_from_tests else ablation.samplers
        if not args.tables_only:
            ok = run_sweep(sweep, path) and ok
            if samplers:
                ok = test_samplers(sweep, samplers, args.test_batches, args.beams) and ok
        else:
            nxtp_sweep(path, "--collect", capture=True)  # results.csv of whatever has finished
        found = collect(ablation, sweep, samplers, args.test_batches, args.beams)
        tables[name] = markdown(ablation, sweep, found, samplers, args.test_batches, args.beams)
        rows += found
        print(tables[name], flush=True)
    write_tables(Path(args.out), tables, rows)
    print(f"tables: {', '.join(str(Path(args.out) / f'{name}.md') for name in tables)}, ablations.csv")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
