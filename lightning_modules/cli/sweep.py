"""``nxtp sweep``: run a hyper-parameter sweep of ``nxtp fit`` runs here or as a SLURM array (see
``lightning_modules.sweep`` for the sweep file)."""

from __future__ import annotations

import argparse
import shlex


def sweep_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nxtp sweep", description="Run a hyper-parameter sweep of `nxtp fit` runs.")
    parser.add_argument("sweep", help="the sweep file (configs/sweep/NAME.yaml)")
    parser.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: runs one after another here; slurm: one array task per run",
    )
    parser.add_argument("--index", type=int, help="run only this trial (what each SLURM array task does)")
    parser.add_argument("--collect", action="store_true", help="only write the table of the runs so far")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands and stop")
    args = parser.parse_args(argv)
    from ..sweep import Sweep, fit_args, read_status, run_name, run_one, submit_slurm, table, trials, write_table

    sweep = Sweep.load(args.sweep)
    runs = trials(sweep)
    if args.dry_run:
        for index, params in enumerate(runs):
            print(shlex.join(["nxtp"] + fit_args(sweep, index, params)))
        return 0
    if args.launcher == "slurm" and args.index is None and not args.collect:
        submit_slurm(sweep, args.sweep, len(runs))
        return 0
    if not args.collect:
        chosen = range(len(runs)) if args.index is None else [args.index]
        for index in chosen:
            if read_status(sweep, index, runs[index])["status"] == "done":
                print(f"[{index + 1}/{len(runs)}] {run_name(index, runs[index])}: done already")
                continue
            print(f"[{index + 1}/{len(runs)}] {run_name(index, runs[index])} ...", flush=True)
            status = run_one(sweep, index, runs[index])
            print(
                f"[{index + 1}/{len(runs)}] {run_name(index, runs[index])}: {status['status']} in "
                f"{status['seconds']} s {status.get('error', '')}",
                flush=True,
            )
    if args.index is not None:
        return 0 if read_status(sweep, args.index, runs[args.index])["status"] == "done" else 1
    rows = table(sweep)
    print(write_table(sweep, rows), end="")
    print(f"table: {sweep.folder / 'results.md'}, {sweep.folder / 'results.csv'}")
    return 0 if all(r["status"] == "done" for r in rows) else 1
