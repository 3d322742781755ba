"""``nxtp sweep``: run a hyper-parameter sweep of ``nxtp fit`` runs here or as a SLURM array (see
``lightning_modules.sweep`` for the sweep file)."""

from __future__ import annotations

import argparse
import shlex

from . import imported


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nxtp sweep", description="Run a hyper-parameter sweep of `nxtp fit` runs.")
    parser.add_argument("sweep", help="the sweep file (configs/sweep/NAME.yaml)")
    parser.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: runs one after another here; slurm: one array task per run",
    )
    parser.add_argument("--index", type=int, help="run one trial as this array task (what each SLURM task does)")
    parser.add_argument("--collect", action="store_true", help="only write the table of the runs so far")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands and stop")
    args = parser.parse_args(argv)
    try:
        return run_sweep(args)
    except (ValueError, FileNotFoundError) as e:  # a bad sweep file, a key no config has, an unreadable study
        parser.exit(2, f"nxtp sweep: error: {e}\n")


def run_sweep(args: argparse.Namespace) -> int:
    """What ``nxtp sweep`` does with its parsed arguments; returns the exit status."""
    import optuna

    from .. import sweep as S

    imported()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what it does itself
    sweep = S.Sweep.load(args.sweep)
    draws = S.trials(sweep) if not (args.collect or args.index is not None) else []
    if sweep.method == "tpe" and not args.dry_run:
        draws = draws[:1]  # to check its keys: the runs' values are drawn as they start
    planned = [(params, S.identify(sweep, params)) for params in draws]  # checks every run's keys and values
    if args.dry_run:
        if sweep.method == "tpe":
            print(f"# tpe: the first {len(planned)} draws; once runs finish, the draws follow their results")
        for params, hash_ in planned:
            print(shlex.join(["nxtp"] + S.fit_args(sweep, params, S.run_name(params, hash_))))
        return 0
    study = S.load_study(sweep, S.study_name(sweep))
    if args.index is None and not args.collect:
        count = S.prepare(sweep, study, planned if sweep.method != "tpe" else [])
        if args.launcher == "slurm":
            if count:
                S.submit_slurm(sweep, args.sweep, count)
                return 0
            print(f"sweep {sweep.name}: nothing left to run")
        # A resumed TPE search must not repeat the draws of its first start: its seed moves on with the study.
        study = S.load_study(sweep, study.study_name, sweep.sampler(sweep.seed + len(study.trials)))
        for number in range(1, count + 1):
            trial = S.next_trial(sweep, study)
            if trial is None:
                break
            run = f"[{number}/{count}] {trial.user_attrs['run']} (trial {trial.number})"
            print(f"{run} ...", flush=True)
            status = S.run_trial(sweep, study, trial)
            print(f"{run}: {status['status']} in {status['seconds']} s {status.get('error', '')}", flush=True)
    if args.index is not None:  # a SLURM array task: a seed of its own, not its fellows' draws
        seed = sweep.seed + len(study.trials) + 1000 * (args.index + 1)
        study = S.load_study(sweep, study.study_name, sweep.sampler(seed))
        trial = S.next_trial(sweep, study, worker=args.index)
        if trial is None:
            print(f"sweep {sweep.name}: nothing left to run")
            return 0
        status = S.run_trial(sweep, study, trial)
        print(f"{trial.user_attrs['run']} (trial {trial.number}): {status['status']} in {status['seconds']} s")
        return 0 if status["status"] in ("done", "pruned") else 1
    rows = S.table(sweep, study)
    notes = S.summary(sweep, study)
    print(S.write_table(sweep, rows, notes), end="")
    print(notes, end="")
    print(f"study {study.study_name} in {sweep.storage_url}; table: {sweep.folder / 'results.md'}, .csv")
    return 0 if rows and all(r["status"] in ("done", "pruned") for r in rows) else 1
