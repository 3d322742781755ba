"""``nxtp sweep``: hyper-parameter sweeps over any LightningCLI key, described in YAML, run as an Optuna study.

    nxtp sweep configs/sweep/decoder_depth.yaml                     # runs one after another on this machine
    nxtp sweep configs/sweep/lr_tpe.yaml --launcher slurm           # one SLURM array task per run
    nxtp sweep configs/sweep/lr_tpe.yaml --collect                  # the table of whatever has finished

A sweep file::

    name: decoder_depth
    config: [../experiment/default.yaml]      # LightningCLI --config files, relative to the sweep file
    method: grid                              # grid (every combination), random or tpe (``trials`` runs each)
    metric: test/exact_top5/f1                # the study's objective, and the column runs are sorted by
    mode: max
    fixed: {trainer.max_steps: 600}           # overrides shared by every run
    parameters:
      model.nxtp.decoder.num_blocks: [1, 2, 4]                          # a list: grid values, or a choice
      model.optimization.lr: {distribution: log_uniform, low: 1.0e-4, high: 1.0e-2}   # random and tpe only
      data.batch_size: {distribution: int, low: 16, high: 64}
    pruner: median                            # none, median (the default) or hyperband; pruner_args: {...}
    storage: sqlite                           # or journal (a file, for SLURM arrays on shared disks), or a URL

The sweep is an Optuna study (``GridSampler``, ``RandomSampler`` or ``TPESampler``, seeded by ``seed``) kept in
``logs/sweeps/NAME/study.db`` (or ``study.journal``). Every run is an ordinary ``nxtp fit`` in a subprocess whose
TensorBoard logger is named ``sweeps/NAME/RUN``; ``OptunaPruning`` in that run reports the validation metric to
its trial at each validation and stops the run when the pruner says so. A run's name ends with a hash of all of
its arguments (the resolved config ``nxtp fit --print_config`` prints), and the study's name with a hash of the
sweep's resolved base config and search space: a changed base config starts a new study of new runs, while a run
whose arguments are unchanged is never trained twice. An interrupted sweep picks up where it stopped: finished
and pruned runs are kept, an interrupted or failed run runs again from its ``last.ckpt``. At the end
``results.md`` and ``results.csv`` in ``logs/sweeps/NAME`` list the runs sorted by the metric, with the best run
and the importance of each swept key.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from .callbacks import Interrupted
from .metrics import MAIN_METRIC, metric_tag

METHODS = ("grid", "random", "tpe")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "int_uniform", "choice")  # int_uniform: the older name of int
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
STATUS = {
    TrialState.COMPLETE: "done",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


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
    sampler_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna sampler
    pruner: str = "median"
    pruner_args: dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 2, n_warmup_steps: 400}
    storage: str = "sqlite"

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """Read and check a sweep file; errors name the file and the key. (Whether ``nxtp fit`` knows the keys is
        checked by ``resolve``, which parses the runs.)"""
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
        if sweep.method not in METHODS:
            raise ValueError(f"{path}: method must be one of {METHODS}, got {sweep.method!r}")
        if sweep.mode not in ("max", "min"):
            raise ValueError(f"{path}: mode must be max or min, got {sweep.mode!r}")
        if sweep.pruner not in PRUNERS:
            raise ValueError(f"{path}: pruner must be one of {tuple(PRUNERS)}, got {sweep.pruner!r}")
        if sweep.storage not in ("sqlite", "journal") and "://" not in sweep.storage:
            raise ValueError(f"{path}: storage must be sqlite, journal or a database URL, got {sweep.storage!r}")
        for key, spec in sweep.parameters.items():
            if isinstance(spec, dict):
                if sweep.method == "grid" and spec.get("distribution") != "choice":
                    raise ValueError(f"{path}: parameters.{key}: a grid takes a list of values, not a distribution")
                if spec.get("distribution") not in DISTRIBUTIONS:
                    raise ValueError(f"{path}: parameters.{key}.distribution must be one of {DISTRIBUTIONS}")
            elif not isinstance(spec, list) or not spec:
                raise ValueError(f"{path}: parameters.{key} must be a non-empty list of values or a distribution")
            try:
                distribution(spec)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: parameters.{key}: {type(e).__name__}: {e}") from None
        if sweep.method != "grid" and not sweep.trials:
            raise ValueError(f"{path}: a {sweep.method} sweep needs `trials`")
        try:
            make_pruner(sweep.pruner, sweep.pruner_args)
            sweep.sampler()
        except TypeError as e:
            raise ValueError(f"{path}: pruner_args or sampler_args: {e}") from None
        return sweep

    @property
    def folder(self) -> Path:
        return Path(self.save_dir) / "sweeps" / self.name

    @property
    def storage_url(self) -> str:
        """A database URL, or the path of a journal file (what ``open_storage`` takes)."""
        if self.storage == "sqlite":
            return f"sqlite:///{self.folder / 'study.db'}"
        return str(self.folder / "study.journal") if self.storage == "journal" else self.storage

    @property
    def monitor(self) -> str:
        """What the runs report at each validation: the metric, or its validation twin for a test metric."""
        return "val/" + self.metric.removeprefix("test/") if self.metric.startswith("test/") else self.metric

    def distributions(self) -> dict[str, BaseDistribution]:
        return {key: distribution(spec) for key, spec in self.parameters.items()}

    def grid(self) -> dict[str, list]:
        return {k: v if isinstance(v, list) else v["values"] for k, v in self.parameters.items()}

    def sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """The sweep's Optuna sampler; ``seed`` replaces the sweep's (a resumed TPE sweep must not repeat its draws)."""
        seed = self.seed if seed is None else seed
        if self.method == "grid":
            return optuna.samplers.GridSampler(self.grid(), seed=seed, **self.sampler_args)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed, **self.sampler_args)
        # constant_liar: parallel workers (a SLURM array) see each other's running trials and draw elsewhere
        with warnings.catch_warnings():  # experimental before Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(**{"seed": seed, "constant_liar": True, **self.sampler_args})


def distribution(spec: Any) -> BaseDistribution:
    """The Optuna distribution of a ``parameters`` entry: a list is a choice, a dict names a distribution."""
    if isinstance(spec, list):
        return CategoricalDistribution(spec)
    kind = spec["distribution"]
    if kind == "choice":
        return CategoricalDistribution(spec["values"])
    if kind in ("uniform", "log_uniform"):
        return FloatDistribution(spec["low"], spec["high"], log=kind == "log_uniform")
    return IntDistribution(spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step", 1))


def make_pruner(name: str, args: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    return PRUNERS[name](**(args or {}))


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The study's storage: a database URL (SQLite by default), or otherwise the path of a journal file."""
    if "://" not in url:  # Optuna's file journal: appends under a lock that works on shared (NFS) disks
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several processes (the sweep, its run, the tasks of an array) write to it: wait for the lock, not 5 s
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def load_study(sweep: Sweep, name: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study ``name`` in the sweep's storage, or load it; a store that cannot be read is named."""
    try:
        return optuna.create_study(
            study_name=name,
            storage=open_storage(sweep.storage_url),
            sampler=sampler or sweep.sampler(),
            pruner=make_pruner(sweep.pruner, sweep.pruner_args),
            direction="maximize" if sweep.mode == "max" else "minimize",
            load_if_exists=True,
        )
    except Exception as e:  # sqlalchemy's DatabaseError, a JSONDecodeError from the journal, ...
        store = sweep.storage_url.removeprefix("sqlite:///")
        raise ValueError(
            f"{store}: the sweep's study store cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "move it away to start the sweep anew"
        ) from e


def trials(sweep: Sweep) -> list[dict[str, Any]]:
    """The hyper-parameters the sweep's sampler draws, in order: every combination of a grid, the ``trials`` draws
    of a random search, and for TPE its first draws (the later ones follow the results)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(sampler=sweep.sampler())
    finally:
        optuna.logging.set_verbosity(verbosity)
    count = math.prod(len(v) for v in sweep.grid().values()) if sweep.method == "grid" else sweep.trials
    distributions = sweep.distributions()
    return [study.ask(distributions).params for _ in range(count)]


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_name(params: dict[str, Any], digest: str) -> str:
    """``num_blocks=2-lr=0.002-1a2b3c4d``: the values make it readable, the hash of the run's arguments unique."""
    parts = [f"{key.split('.')[-1]}={short(value)}" for key, value in params.items()]
    return "-".join(parts + [digest[:8]]).replace("/", "_")


def cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def fit_args(sweep: Sweep, params: dict[str, Any], run: str | None = None, pruning: dict | None = None) -> list[str]:
    """The ``nxtp fit`` arguments of one run; with ``run``, its logger; with ``pruning``, its ``OptunaPruning``."""
    args = ["fit"] + [a for c in sweep.config for a in ("--config", c)]
    args += [f"--{key}={cli_value(value)}" for key, value in {**sweep.fixed, **params}.items()]
    if run is not None:
        args += [
            f"--trainer.logger.init_args.save_dir={sweep.save_dir}",
            f"--trainer.logger.init_args.name=sweeps/{sweep.name}/{run}",
        ]
    if pruning is not None:
        callback = {"class_path": f"{__name__}.OptunaPruning", "init_args": pruning}
        args.append(f"--trainer.callbacks+={json.dumps(callback)}")
    return args


def resolve(args: list[str]) -> str:
    """The config ``nxtp ARGS --print_config`` prints, parsed in this process (nothing is built); a ValueError
    with the parser's message when it rejects the arguments."""
    from .cli.train import lightning_main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["nxtp", *args, "--print_config"]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            lightning_main()
        code = 0
    except SystemExit as end:
        code = end.code
    finally:
        sys.argv = argv
    if code not in (0, None):
        message = err.getvalue()
        raise ValueError(message[message.rfind("error:") :].strip() if "error:" in message else message[-2000:])
    return "\n".join(line for line in out.getvalue().splitlines() if not line.startswith("#"))  # no versions


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def canonical(value: Any) -> Any:
    """A config with whole floats as ints: a key typed ``int | float`` prints as 8 or 8.0 depending on what else
    the process imported before it parsed (jsonargparse), and a run's identity must not."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def identify(sweep: Sweep, params: dict[str, Any]) -> str:
    """The hash of a run's arguments (its resolved config); a key or value `nxtp fit` rejects is named."""
    try:
        return digest(canonical(yaml.safe_load(resolve(fit_args(sweep, params)))))
    except ValueError as e:
        found = re.search(r"unrecognized arguments: --([\w.]+)=", str(e), re.IGNORECASE)  # jsonargparse's case varies
        unknown = found[1] if found else ""
        where = "parameters" if unknown in sweep.parameters else "fixed" if unknown in sweep.fixed else ""
        what = f"{where}.{unknown}: `nxtp fit` has no such key" if where else f"run {params}"
        raise ValueError(f"sweep {sweep.name}: {what} (`nxtp fit` says: {e})") from None


def study_name(sweep: Sweep) -> str:
    """``NAME-HASH``: the hash of the resolved base config (configs and fixed keys) and of the search, so that a
    changed base config or search is a new study (its runs with unchanged arguments are not trained again)."""
    base = identify(sweep, {})
    search = [sweep.method, sweep.parameters, sweep.seed, sweep.sampler_args, sweep.metric, sweep.mode]
    return f"{sweep.name}-{digest(base, search)[:8]}"


def newest(study: optuna.Study) -> list[FrozenTrial]:
    """The latest trial of each run (a run interrupted or failed runs again as a new trial of the same hash)."""
    runs: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        runs[trial.user_attrs.get("hash") or f"#{trial.number}"] = trial
    return list(runs.values())


def enqueue(study: optuna.Study, params: dict[str, Any], hash_: str) -> None:
    study.enqueue_trial(params, user_attrs={"hash": hash_, "run": run_name(params, hash_)})


def prepare(sweep: Sweep, study: optuna.Study, planned: list[tuple[dict[str, Any], str]]) -> int:
    """Queue what is left to run and return how many runs that is: the planned runs (grid, random) not in the
    study yet, and again every run whose trial was interrupted (left running by a sweep that is gone) or failed.
    Not for a worker of a running array: its fellows' trials are running."""
    for trial in newest(study):
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)  # interrupted: a new trial resumes it from its folder
        if trial.state in (TrialState.RUNNING, TrialState.FAIL) and "hash" in trial.user_attrs:
            enqueue(study, trial.params, trial.user_attrs["hash"])
    known = {trial.user_attrs.get("hash") for trial in study.get_trials(deepcopy=False)}
    for params, hash_ in planned:
        if hash_ not in known:
            enqueue(study, params, hash_)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return waiting + (max(0, sweep.trials - len(newest(study))) if sweep.method == "tpe" else 0)


def next_trial(sweep: Sweep, study: optuna.Study, worker: int | None = None) -> Trial | None:
    """The next trial to run: for a SLURM array task requeued by SLURM, the trial it was running; else a queued
    trial; else, for TPE while the study has fewer than ``trials`` runs, a new draw; else None."""
    if worker is not None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker") == worker:
                resumed = Trial(study, trial._trial_id)
                resumed.set_user_attr("error", "")  # running again
                return resumed
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting and (sweep.method != "tpe" or len(newest(study)) >= sweep.trials):
        return None
    trial = study.ask(sweep.distributions())
    if "hash" not in trial.user_attrs:  # a new TPE draw
        try:
            hash_ = identify(sweep, trial.params)
        except ValueError as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            return next_trial(sweep, study, worker)
        trial.set_user_attr("hash", hash_)
        trial.set_user_attr("run", run_name(trial.params, hash_))
    if worker is not None:
        trial.set_user_attr("worker", worker)
    return trial


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """The ``metrics.json`` of a run's newest version, written by ``nxtp fit`` when it ends."""
    versions = sorted(folder.glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(versions[-1].read_text()) if versions else None


def run_trial(sweep: Sweep, study: optuna.Study, trial: Trial) -> dict[str, Any]:
    """Run (or resume) one trial's ``nxtp fit`` in a subprocess, its output in ``RUN.log``, and tell the study how it
    ended: its metric (done), pruned (told by the run itself), or failed, with the last line of its output.

    SIGTERM, Ctrl-C and SLURM's pre-emption warning (SIGUSR1) are passed on to the run, which checkpoints (and, for
    the warning, asks for a requeue); the trial stays running, to be resumed. After a SIGTERM or Ctrl-C the sweep
    stops too. The run has a process group of its own so that a signal to the sweep's group reaches it once, from
    here (a second SIGTERM would stop it at once, see ``callbacks.GracefulStop``).
    """
    name, started = trial.user_attrs["run"], time.perf_counter()
    folder = sweep.folder / name
    metrics = read_metrics(folder)
    if metrics is not None and isinstance(metrics.get(sweep.metric), float):  # the same arguments finished before
        study.tell(trial, metrics[sweep.metric])
        return {"status": "done", "error": "(done already: same arguments)", "seconds": 0}
    pruning = dict(
        storage=sweep.storage_url,
        study_name=study.study_name,
        trial_id=trial._trial_id,
        monitor=sweep.monitor,
        pruner=sweep.pruner,
        pruner_args=sweep.pruner_args,
    )
    command = [sys.executable, "-m", "lightning_modules.cli"] + fit_args(sweep, trial.params, name, pruning)
    received: list[int] = []
    sweep.folder.mkdir(parents=True, exist_ok=True)
    with open(sweep.folder / f"{name}.log", "a") as log:  # a resumed run appends to its log
        log.write(shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def forward(signum, frame) -> None:
            received.append(signum)
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    seconds = round(time.perf_counter() - started)
    state = study.get_trials(deepcopy=False)[trial.number].state
    metrics = read_metrics(folder) or {}
    if state == TrialState.PRUNED:
        return {"status": "pruned", "seconds": seconds}
    if received and code != 0:
        trial.set_user_attr("error", f"stopped by signal {received[-1]}; run the sweep again to resume")
        if {signal.SIGTERM, signal.SIGINT} & set(received):
            stop = signal.Signals(received[-1]).name
            raise SystemExit(f"sweep {sweep.name}: stopped by {stop} during {name}; run it again to resume")
        return {"status": "interrupted", "error": trial.user_attrs["error"], "seconds": seconds}
    if code == 0 and isinstance(metrics.get(sweep.metric), float):
        study.tell(trial, metrics[sweep.metric])  # a NaN is recorded as failed
        state = study.get_trials(deepcopy=False)[trial.number].state
        return {"status": STATUS[state], "seconds": seconds}
    lines = (sweep.folder / f"{name}.log").read_text().strip().splitlines()
    error = f"exit code {code}: {lines[-1] if lines else ''}"
    if code == 0:
        error = f"{sweep.metric} is not in {folder}/version_*/metrics.json (has: {', '.join(metrics)})"
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)
    return {"status": "failed", "error": error, "seconds": seconds}


class OptunaPruning(L.Callback):
    """Reports the monitored metric of each validation to a trial of a study in ``storage`` (at
    ``trainer.global_step``: runs train by steps) and stops the run, as pruned, when the study's pruner says so.

    ``nxtp sweep`` adds it to each run's command line (``--trainer.callbacks+=...``); the run reaches the study
    through the storage, from its own process. A pruned run stops at once (as ``GracefulStop`` does) and ends with
    status 0, without ``test_after_fit`` and ``metrics.json``.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_id: int,
        monitor: str,
        pruner: str = "median",
        pruner_args: dict[str, Any] | None = None,
    ) -> None:
        self.storage, self.study_name, self.trial_id, self.monitor = storage, study_name, trial_id, monitor
        self.pruner, self.pruner_args = pruner, pruner_args or {}
        self.trial: Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.trial is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(
                study_name=self.study_name,
                storage=open_storage(self.storage),
                sampler=optuna.samplers.RandomSampler(),  # never used: nothing is drawn here
                pruner=make_pruner(self.pruner, self.pruner_args),
            )
            self.trial = Trial(study, self.trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune, value = False, trainer.callback_metrics.get(self.monitor)
        if self.trial is not None and value is not None:
            with warnings.catch_warnings():  # a resumed run reports its last validation step again: ignored
                warnings.simplefilter("ignore")
                self.trial.report(float(value), trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):  # every rank stops together
            if self.trial is not None:
                self.trial.study.tell(self.trial, state=TrialState.PRUNED)
            shown = "?" if value is None else f"{float(value):.4g}"
            raise Interrupted(0, f"pruned at step {trainer.global_step}: {self.monitor} = {shown}")


def table(sweep: Sweep, study: optuna.Study) -> list[dict[str, Any]]:
    """One row per run (params, status, metrics), finished runs sorted by the metric, best first."""
    rows = []
    columns = [sweep.metric, MAIN_METRIC, metric_tag("test", "exact", 5, "f1"), metric_tag("test", "semantic", 5, "f")]
    columns = list(dict.fromkeys(columns + [sweep.monitor, "val/loss", "global_step"]))
    for trial in newest(study):
        status = STATUS[trial.state]
        if status == "running" and trial.user_attrs.get("error"):
            status = "interrupted"
        metrics = read_metrics(sweep.folder / trial.user_attrs.get("run", "-")) if status == "done" else None
        if metrics is None and trial.intermediate_values:  # a pruned or unfinished run: its last validation
            step = max(trial.intermediate_values)
            metrics = {sweep.monitor: trial.intermediate_values[step], "global_step": step}
        row = {"trial": trial.number, "run": trial.user_attrs.get("run", "")}
        row.update({k: short(trial.params[k]) if k in trial.params else "" for k in sweep.parameters})
        row["status"] = status
        for key in columns:
            value = (metrics or {}).get(key)
            row[key] = "" if value is None else (round(value, 4) if isinstance(value, float) else value)
        row["error"] = trial.user_attrs.get("error", "")
        rows.append(row)
    sign = -1 if sweep.mode == "max" else 1
    rank = {"done": 0, "pruned": 1}
    return sorted(
        rows,
        key=lambda r: (
            rank.get(r["status"], 2),
            r[sweep.metric] == "",
            sign * r[sweep.metric] if isinstance(r[sweep.metric], (int, float)) else 0,
        ),
    )


def summary(sweep: Sweep, study: optuna.Study) -> str:
    """The best run and the importance of each swept key (Optuna's PED-ANOVA), or why there is none."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return "best run: none finished yet\n"
    best = study.best_trial
    lines = [f"best run: {best.user_attrs.get('run', best.number)} (trial {best.number}), {sweep.metric} = "]
    lines[0] += f"{best.value:.4g}, " + ", ".join(f"{k}={short(v)}" for k, v in best.params.items())
    if len(sweep.parameters) < 2:
        return lines[0] + "\n"
    if len(done) < 2:
        return lines[0] + "\nimportance of the swept keys: needs 2 finished runs\n"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=list(sweep.parameters)
            )
    except (ValueError, RuntimeError) as e:  # e.g. a key that took a single value in every finished run
        return lines[0] + f"\nimportance of the swept keys: not available ({e})\n"
    lines.append("importance of the swept keys: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    return "\n".join(lines) + "\n"


def write_table(sweep: Sweep, rows: list[dict[str, Any]], notes: str = "") -> str:
    """Write ``results.csv`` and ``results.md`` (the table, then ``notes``) in the sweep's folder; return the
    markdown table."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)] if rows else ["run"]
    with open(sweep.folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    (sweep.folder / "results.md").write_text(
        f"Sweep `{sweep.name}`, sorted by {sweep.metric} ({sweep.mode}).\n\n{markdown}\n{notes}"
    )
    return markdown


def slurm_script(sweep: Sweep, sweep_file: str, count: int) -> str:
    """An sbatch script with one array task per run; each task runs ``nxtp sweep FILE --index $SLURM_ARRAY_TASK_ID``
    (takes the next trial of the study, or resumes its own when SLURM requeued it)."""
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
