"""``nxtp sweep``: hyper-parameter sweeps over any LightningCLI key, described in YAML.

    nxtp sweep configs/sweep/decoder_depth.yaml                     # runs one after another on this machine
    nxtp sweep configs/sweep/lr.yaml --launcher slurm               # one SLURM array task per run
    nxtp sweep configs/sweep/lr.yaml --collect                      # the table of whatever has finished

A sweep file::

    name: decoder_depth
    config: [../experiment/default.yaml]      # LightningCLI --config files, relative to the sweep file
    method: grid                              # grid (every combination) or random (``trials`` draws)
    metric: test/exact_top5/f1                # the column runs are sorted by
    mode: max
    fixed: {trainer.max_steps: 600}           # overrides shared by every run
    parameters:
      model.nxtp.decoder.num_blocks: [1, 2, 4]                          # a list: grid values, or a random choice
      model.optimization.lr: {distribution: log_uniform, low: 1.0e-4, high: 1.0e-2}   # random search only
      data.batch_size: {distribution: int_uniform, low: 16, high: 64}

Every run is an ordinary ``nxtp fit`` whose TensorBoard logger is named ``sweeps/NAME/RUN``, so each run has
its own folder with its config, hyper-parameters (HParams tab), curves, checkpoints and ``metrics.json``, and an
interrupted sweep picks up where it stopped: finished runs are skipped, an interrupted run resumes from its
``last.ckpt``. A run that fails is recorded as failed (its output is in ``logs/sweeps/NAME/RUN.log``) and the
sweep goes on. At the end ``results.md`` and ``results.csv`` in ``logs/sweeps/NAME`` list the runs sorted by the
metric.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .metrics import MAIN_METRIC, metric_tag

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    config: list[str]
    parameters: dict[str, Any]
    method: str = "grid"
    trials: int | None = None
    metric: str = MAIN_METRIC
    mode: str = "max"
    fixed: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    save_dir: str = "logs"
    slurm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; errors name the file and the key."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for key in ("config", "parameters"):
            if not raw.get(key):
                raise ValueError(f"{path}: `{key}` is required")
        raw.setdefault("name", path.stem)
        configs = [raw["config"]] if isinstance(raw["config"], str) else raw["config"]
        raw["config"] = []
        for c in configs:  # relative to the sweep file, as LightningCLI resolves the includes of a config
            resolved = c if Path(c).is_absolute() or Path(c).exists() else str(path.parent / c)
            if not Path(resolved).is_file():
                raise FileNotFoundError(f"{path}: config: {c} does not exist")
            raw["config"].append(os.path.relpath(resolved))
        sweep = cls(**raw)
        if sweep.method not in ("grid", "random"):
            raise ValueError(f"{path}: method must be grid or random, got {sweep.method!r}")
        if sweep.mode not in ("max", "min"):
            raise ValueError(f"{path}: mode must be max or min, got {sweep.mode!r}")
        for key, spec in sweep.parameters.items():
            if isinstance(spec, dict):
                if sweep.method == "grid":
                    raise ValueError(f"{path}: parameters.{key}: a grid takes a list of values, not a distribution")
                if spec.get("distribution") not in DISTRIBUTIONS:
                    raise ValueError(f"{path}: parameters.{key}.distribution must be one of {DISTRIBUTIONS}")
            elif not isinstance(spec, list) or not spec:
                raise ValueError(f"{path}: parameters.{key} must be a non-empty list of values or a distribution")
        if sweep.method == "random" and not sweep.trials:
            raise ValueError(f"{path}: a random sweep needs `trials`")
        return sweep

    @property
    def folder(self) -> Path:
        return Path(self.save_dir) / "sweeps" / self.name


def draw(spec: Any, rng: random.Random) -> Any:
    """One value of a random-search parameter: a list is a uniform choice, a dict a distribution."""
    if isinstance(spec, list):
        return rng.choice(spec)
    kind = spec["distribution"]
    if kind == "choice":
        return rng.choice(spec["values"])
    if kind == "uniform":
        return rng.uniform(spec["low"], spec["high"])
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(spec["low"]), math.log(spec["high"])))
    return rng.randint(spec["low"], spec["high"])  # int_uniform, both ends included


def trials(sweep: Sweep) -> list[dict[str, Any]]:
    """The hyper-parameters of every run, in launch order."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return [dict(zip(keys, values)) for values in itertools.product(*sweep.parameters.values())]
    rng = random.Random(sweep.seed)
    return [{k: draw(sweep.parameters[k], rng) for k in keys} for _ in range(sweep.trials)]


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_name(index: int, params: dict[str, Any]) -> str:
    """``03-num_blocks=2-lr=0.002``: the index keeps names unique, the values make them readable."""
    parts = [f"{key.split('.')[-1]}={short(value)}" for key, value in params.items()]
    return "-".join([f"{index:02d}"] + parts).replace("/", "_")


def cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def fit_args(sweep: Sweep, index: int, params: dict[str, Any]) -> list[str]:
    """The ``nxtp fit`` arguments of one run."""
    args = ["fit"] + [a for c in sweep.config for a in ("--config", c)]
    args += [f"--{key}={cli_value(value)}" for key, value in {**sweep.fixed, **params}.items()]
    return args + [
        f"--trainer.logger.init_args.save_dir={sweep.save_dir}",
        f"--trainer.logger.init_args.name=sweeps/{sweep.name}/{run_name(index, params)}",
    ]


def run_dir(sweep: Sweep, index: int, params: dict[str, Any]) -> Path:
    return sweep.folder / run_name(index, params)


def read_status(sweep: Sweep, index: int, params: dict[str, Any]) -> dict[str, Any]:
    """What is known of a run: ``status`` (done / failed / pending) and, when done, its metrics."""
    folder = run_dir(sweep, index, params)
    versions = sorted(folder.glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if versions:
        return {"status": "done", "metrics": json.loads(versions[-1].read_text())}
    failed = sweep.folder / f"{run_name(index, params)}.failed"
    if failed.exists():
        return {"status": "failed", "error": failed.read_text().strip()}
    return {"status": "pending"}


def run_one(sweep: Sweep, index: int, params: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one trial in a subprocess; its output goes to ``RUN.log``; a failure is recorded.

    SIGTERM and SLURM's pre-emption warning (SIGUSR1) are passed on to the run, which checkpoints (and, for the
    warning, asks for a requeue); a run stopped that way is not a failure. After a SIGTERM the sweep stops too.
    """
    name = run_name(index, params)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    (sweep.folder / f"{name}.failed").unlink(missing_ok=True)
    command = [sys.executable, "-m", "lightning_modules.cli"] + fit_args(sweep, index, params)
    started = time.perf_counter()
    received: list[int] = []
    with open(sweep.folder / f"{name}.log", "a") as log:  # a resumed run appends to its log
        log.write(shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def forward(signum, frame) -> None:
            received.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    status = read_status(sweep, index, params)
    if status["status"] != "done" and received:
        status = {"status": "interrupted", "error": f"stopped by signal {received[-1]}; run the sweep again to resume"}
    elif code != 0 or status["status"] != "done":
        lines = (sweep.folder / f"{name}.log").read_text().strip().splitlines()
        error = f"exit code {code}: {lines[-1] if lines else ''}"
        (sweep.folder / f"{name}.failed").write_text(error + "\n")
        status = {"status": "failed", "error": error}
    status["seconds"] = round(time.perf_counter() - started)
    if signal.SIGTERM in received:
        raise SystemExit(f"sweep {sweep.name}: stopped by SIGTERM during {name}")
    return status


def table(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per run (params, status, metrics), finished runs sorted by the metric, best first."""
    rows = []
    for index, params in enumerate(trials(sweep)):
        status = read_status(sweep, index, params)
        metrics = status.get("metrics", {})
        row = {"run": run_name(index, params), **{k: short(v) for k, v in params.items()}, "status": status["status"]}
        for key in dict.fromkeys(
            [
                sweep.metric,
                MAIN_METRIC,
                metric_tag("test", "exact", 5, "f1"),
                metric_tag("test", "semantic", 5, "f"),
                "val/loss",
                "global_step",
            ]
        ):
            value = metrics.get(key)
            row[key] = "" if value is None else (round(value, 4) if isinstance(value, float) else value)
        row["error"] = status.get("error", "")
        rows.append(row)
    sign = -1 if sweep.mode == "max" else 1
    return sorted(rows, key=lambda r: (r[sweep.metric] == "", sign * r[sweep.metric] if r[sweep.metric] != "" else 0))


def write_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Write ``results.csv`` and ``results.md`` in the sweep's folder; return the markdown."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)]
    with open(sweep.folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    (sweep.folder / "results.md").write_text(
        f"Sweep `{sweep.name}`, sorted by {sweep.metric} ({sweep.mode}).\n\n" + markdown
    )
    return markdown


def slurm_script(sweep: Sweep, sweep_file: str, count: int) -> str:
    """An sbatch script with one array task per run; each task runs ``nxtp sweep FILE --index $SLURM_ARRAY_TASK_ID``."""
    options = {
        "job-name": f"sweep-{sweep.name}",
        "array": f"0-{count - 1}",
        "output": str(sweep.folder / "slurm-%A_%a.out"),
        "requeue": None,
        "signal": "USR1@120",
        **sweep.slurm,
    }
    lines = ["#!/bin/bash"] + [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in options.items()]
    lines += [
        f"cd {shlex.quote(os.getcwd())}",
        f"srun {shlex.quote(sys.executable)} -m lightning_modules.cli sweep {shlex.quote(sweep_file)} "
        "--index $SLURM_ARRAY_TASK_ID",
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(sweep: Sweep, sweep_file: str, count: int) -> None:
    """Write ``sweep.sbatch``, submit it, and submit the table-making job that waits for the array."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError("--launcher slurm: `sbatch` is not on PATH (is this a SLURM login node?)")
    sweep.folder.mkdir(parents=True, exist_ok=True)
    script = sweep.folder / "sweep.sbatch"
    script.write_text(slurm_script(sweep, sweep_file, count))
    out = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=True).stdout
    job = out.strip().split(";")[0]
    collect = f"{shlex.quote(sys.executable)} -m lightning_modules.cli sweep {shlex.quote(sweep_file)} --collect"
    subprocess.run(
        [
            sbatch,
            "--parsable",
            f"--dependency=afterany:{job}",
            f"--job-name=sweep-{sweep.name}-table",
            f"--output={sweep.folder / 'table-%j.out'}",
            f"--chdir={os.getcwd()}",
            f"--wrap={collect}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"submitted array job {job} ({count} runs); the table will be in {sweep.folder / 'results.md'}")
