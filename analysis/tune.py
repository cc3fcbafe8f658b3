"""``python -m analysis.tune TUNING_ROOT [--out DIR] [--loss final|mean]``: the learning rate each method trains best
with, picked as the original did (DESIGN §5), from a tuning sweep (``sweeps/tune_lr_*``: every lr of a grid, 200
iterations each). Per (task, method, err_mode) it keeps the lr of the lowest average training loss; writes, into
``--out`` (default ``<root>/tune``), ``table.md`` (one row per (task, method, err_mode), one column per lr),
``table.csv`` (one row per lr) and ``lr_picks.yaml``, the file ``lr_picks=`` reads (``detox.tuning``).

The average training loss (``--loss``): ``final`` (default, the original's: ``src/tune.sh`` keeps each worker's
``Loss`` at the last iteration, ``src/tiny_tuning_parser.py`` averages it over the 45 workers) is the last metrics
record's ``train_loss`` when that record follows the one before by a single step (the tuning sweeps record at
max_steps − 1 and max_steps): the loss of the last iteration's batches, averaged over the units with an honest
member; ``mean`` is the mean of the per-step training loss over the whole run (records weighted by their steps).
With several seeds at an lr their losses are averaged. Ties go to the smaller lr. An lr is never picked where a
run of it diverged, failed, is missing (a seed or the whole lr of the grid: the lrs any job of the root ran) or has
no loss; a (task, method, err_mode) without any lr left gets no pick (one warning line; a job of it with
``lr_picks=`` is then refused). Bad input (no such root, a job still running, no finished job, a last record that
averages several steps under ``--loss final`` (a lone record too: it averages steps 1..its step), jobs of one (task,
method, err_mode) whose configs differ beyond the lr and the seed, a root where no (task, method, err_mode) ran two
lrs (a figure sweep's: nothing was compared), nothing to pick, an ``--out`` that is a file) is one line and exit 2,
with nothing written. Two runs into one ``--out`` at once write one after the other.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from analysis.load import (
    config_key,
    load_runs,
    one_line,
    read_config,
    run_records,
    step_weighted,
    sweep_root,
    warn,
)
from analysis.report import ReportError, check_out, publish, to_markdown
from detox.results import FINISHED
from detox.tuning import KEYS

LOSSES = ("final", "mean")


class TuneError(ReportError):
    """Bad input: one line, exit 2, nothing written."""


def lr_label(lr: float) -> str:
    """``2^-5`` for a power of two (the original's grid), else the number as typed."""
    k = math.log2(lr) if lr > 0 else math.nan
    return f"2^{int(k)}" if math.isfinite(k) and k == int(k) else f"{lr:g}"


def run_loss(job: str, records: list[dict], how: str) -> float | None:
    """A finished run's average training loss (module docstring); None where its records have none. Raises
    TuneError where ``final`` is asked of a run whose last record averages more than the last step."""
    if how == "mean":
        value = step_weighted(records, ("train_loss",))["train_loss"] if records else math.nan
        return value if math.isfinite(value) else None
    last = records[-1] if records else {}
    # a run's first record averages the steps since step 0: a lone record at step 200 is steps 1..200, not the last
    before = records[-2]["step"] if len(records) > 1 else 0
    if last and last["step"] - before != 1:
        raise TuneError(f"{job}: its last metrics record averages the training loss of steps {before + 1}..."
                        f"{last['step']}, not the last iteration alone (the original's measure): tune with "
                        f"eval_freq = max_steps - 1, as sweeps/tune_lr_* do, or pick by --loss mean")
    value = last.get("train_loss")
    return float(value) if value is not None and math.isfinite(value) else None


def job_losses(runs: pd.DataFrame, how: str) -> pd.DataFrame:
    """One row per job of the tuning root that names its (task, method, err_mode) and lr: those, ``seed``,
    ``status`` (``no loss`` for a finished run without one), ``config`` and ``loss``. A job that names none of them
    (killed before it wrote a summary) is left out with one warning."""
    rows = []
    for job, run in runs.iterrows():
        if run["status"] == "duplicate":  # a seed counts once (analysis.load named it)
            continue
        key = [run[k] for k in KEYS]
        lr = run["lr"]
        if any(not isinstance(v, str) for v in key) or lr is None or not math.isfinite(lr):
            warn(f"{run['dir']}: no task, method, err_mode or lr in its summary ({run['status']}); left out")
            continue
        status, loss = run["status"], None
        if status == "completed":
            loss = run_loss(run["dir"], run_records(Path(run["dir"])), how)
            if loss is None:
                warn(f"{run['dir']}: completed without a finite training loss; its lr is not picked")
                status = "no loss"
        rows.append({**dict(zip(KEYS, key, strict=True)), "lr": float(lr), "seed": run["seed"], "status": status,
                     "config": tuned_config(Path(run["dir"]), run), "loss": loss, "job": job})
    out = pd.DataFrame(rows, columns=[*KEYS, "lr", "seed", "status", "config", "loss", "job"])
    finished = out[out["status"].isin([*FINISHED, "no loss"])]
    for key, group in finished.groupby(list(KEYS), sort=False):
        if group["config"].nunique() > 1:  # two sweeps in one root: losses of other settings are no comparison
            a, b = group.drop_duplicates("config").iloc[:2].itertuples()
            at = f"at lr {a.lr:g}" if a.lr == b.lr else f"at lrs {a.lr:g} and {b.lr:g}"
            raise TuneError(f"jobs {a.job} and {b.job} tune {'/'.join(key)} {at} with different configs (beyond "
                            f"the lr and the seed): one tuning sweep per root")
    return out


def tuned_config(job: Path, run: pd.Series) -> str:
    """A short id shared by exactly the jobs whose configs differ only in the lr (what is tuned), how it was set
    (``lr_picks``) and the seed: the runs one (task, method, err_mode) compares must agree on everything else."""
    config, _ = read_config(job)  # (its problem was said once by load_runs)
    if config:
        return config_key({k: v for k, v in config.items() if k not in ("lr", "lr_picks")}, {})
    return config_key(None, {**run.to_dict(), "lr": None})


def _cell_status(statuses: Iterable[str]) -> str:
    """An lr's state over its seeds: ``completed`` only if every seed is."""
    statuses = list(statuses)
    for bad in ("diverged", "failed", "no loss", "running", "missing"):
        if bad in statuses:
            return bad
    return "completed" if statuses and all(s == "completed" for s in statuses) else (statuses or ["missing"])[0]


def pick_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, err_mode) and lr of the grid (every lr any job ran): ``seeds`` (finished and
    not), ``status``, ``loss`` (mean over the seeds, where every seed completed with one) and ``picked``."""
    grid = sorted(jobs["lr"].unique())
    rows = []
    for key, group in jobs.groupby(list(KEYS), sort=False):
        seeds = set(group["seed"].dropna())
        for lr in grid:
            here = group[group["lr"] == lr]
            status = _cell_status(here["status"]) if len(here) else "missing"
            if status == "completed" and set(here["seed"]) != seeds:
                status = "missing"  # a seed the other lrs ran: a mean over other seeds is no fair comparison
            loss = float(here["loss"].mean()) if status == "completed" else math.nan
            rows.append({**dict(zip(KEYS, key, strict=True)), "lr": lr, "seeds": len(here), "status": status,
                         "loss": loss})
    out = pd.DataFrame(rows, columns=[*KEYS, "lr", "seeds", "status", "loss"])
    out["picked"] = False
    for _, group in out.groupby(list(KEYS), sort=False):
        ok = group[group["status"] == "completed"]
        if len(ok):
            # the lowest loss; ties to the smaller lr
            best = ok.sort_values(["loss", "lr"], kind="stable").index[0]
            out.loc[best, "picked"] = True
    return out


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """Task, attack, then each rule's vanilla and DETOX methods next to each other."""
    rule = df["method"].str.split("-", n=1).str[-1]
    return df.assign(_rule=rule).sort_values(["task", "err_mode", "_rule", "method", "lr"], kind="stable").drop(
        columns="_rule")


def picks(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """task -> method -> err_mode -> picked lr (what ``lr_picks.yaml`` holds)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in _order(table[table["picked"]]).itertuples():
        out.setdefault(r.task, {}).setdefault(r.method, {})[r.err_mode] = float(r.lr)
    return out


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, err_mode), one column per lr (the loss, or why there is none), and the pick."""
    rows = []
    for key, group in _order(table).groupby(list(KEYS), sort=False):
        row = dict(zip(KEYS, key, strict=True))
        for r in group.itertuples():
            cell = f"{r.loss:.4f}" if r.status == "completed" else r.status
            row[lr_label(r.lr)] = f"**{cell}**" if r.picked else cell
        chosen = group[group["picked"]]
        row["pick"] = f"{lr_label(chosen['lr'].iloc[0])} = {chosen['lr'].iloc[0]:.10g}" if len(chosen) else "none"
        rows.append(row)
    return pd.DataFrame(rows)


def picks_yaml(chosen: dict, root: Path, how: str) -> str:
    head = (f"# learning rates picked by python -m analysis.tune {root} --loss {how}:\n"
            "# per task, method and err_mode the lr of the lowest average training loss (ties: the smaller lr;\n"
            "# diverged, failed or missing runs never picked). Use: python -m detox.train ... lr_picks=<this file>\n")
    return head + yaml.safe_dump({"source": str(root), "loss": how, "lr": chosen}, sort_keys=False)


def _warn_gaps(table: pd.DataFrame) -> None:
    """One line per (task, method, err_mode) picked among part of the grid (failed or missing runs), without a
    pick, or picked at the grid's edge (the best lr may lie beyond it)."""
    grid = sorted(table["lr"].unique())
    for key, group in _order(table).groupby(list(KEYS), sort=False):
        name = "/".join(key)
        gaps = group[~group["status"].isin(["completed", "diverged"])]
        chosen = group[group["picked"]]
        if not len(chosen):
            warn(f"{name}: no lr of the grid completed (" + ", ".join(
                f"{lr_label(r.lr)} {r.status}" for r in group.itertuples()) + "): no pick")
            continue
        if len(gaps):
            warn(f"{name}: picked among the lrs that ran; " + ", ".join(
                f"{lr_label(r.lr)} {r.status}" for r in gaps.itertuples()))
        lr = chosen["lr"].iloc[0]
        if len(grid) > 1 and lr in (grid[0], grid[-1]):
            warn(f"{name}: the pick {lr_label(lr)} is the grid's {'smallest' if lr == grid[0] else 'largest'} lr; "
                 f"the best may lie beyond it")


def tune(root: Path, out: Path, how: str = "final") -> tuple[pd.DataFrame, dict]:
    """Pick, then write table.md, table.csv and lr_picks.yaml into ``out``; return the table and the picks.
    Everything is computed first: bad input raises TuneError (or OSError) with nothing written."""
    if how not in LOSSES:
        raise TuneError(f"--loss {how}: choose from {', '.join(LOSSES)}")
    check_out(out)
    runs = load_runs(root)
    if runs.empty:
        raise TuneError(f"{root}: no job folders; is this a tuning sweep's multirun root?")
    running = runs[runs["status"] == "running"]
    if len(running):  # its lr would be picked among the lrs that finished so far, and the file used as final
        raise TuneError(f"{root}: {len(running)} job(s) still running (e.g. {running['dir'].iloc[0]}): tune once "
                        f"the sweep has finished")
    if not runs["status"].isin(FINISHED).any():
        counts = ", ".join(f"{n} {k}" for k, n in runs["status"].value_counts().items())
        raise TuneError(f"{root}: no finished (completed or diverged) job ({counts}): nothing to pick from")
    jobs = job_losses(runs, how)
    if jobs.empty:
        raise TuneError(f"{root}: no job names its task, method, err_mode and lr: nothing to pick from")
    table = pick_table(jobs)
    chosen = picks(table)
    if not chosen:
        raise TuneError(f"{root}: no (task, method, err_mode) has an lr whose runs all completed: nothing to pick")
    ran = table[table["status"] != "missing"].groupby(list(KEYS), sort=False)["lr"].nunique()
    if ran.max() < 2:  # a figure sweep's root: every method at one lr; its "picks" would be that lr, tuned by no one
        lrs = ", ".join(lr_label(lr) for lr in sorted(set(table["lr"])))
        raise TuneError(f"{root}: each (task, method, err_mode) ran one lr ({lrs}): nothing was compared; give a "
                        f"tuning sweep's root (sweeps/tune_lr_*: every lr of a grid)")
    _warn_gaps(table)
    shown = wide(table)
    measure = ("the training loss of the last iteration (mean over the units' batches; the original's measure)"
               if how == "final" else "the mean training loss over the run")
    md = [f"# {root.name}: learning rates\n",
          f"Per task, method and err_mode: {measure} at each lr (the mean over seeds where several), the pick in "
          f"bold (lowest loss, ties to the smaller lr; an lr with a diverged, failed or missing run is never "
          f"picked). One row per lr: `table.csv`; the picks: `lr_picks.yaml`.\n", to_markdown(shown)]
    csv = _order(table).assign(lr_label=lambda d: d["lr"].map(lr_label))
    files = {"table.md": "\n".join(md), "table.csv": csv.to_csv(index=False),
             "lr_picks.yaml": picks_yaml(chosen, sweep_root(root).resolve(), how)}
    written = publish(out, files)  # (under analysis.report.out_lock: two runs into one --out take turns)
    print(to_markdown(shown), end="")
    print(f"wrote {out}: {', '.join(p.name for p in written)} ({len(shown)} (task, method, err_mode), "
          f"{table['lr'].nunique()} lrs, {len(runs)} jobs)", flush=True)
    return table, chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a tuning sweep's multirun root, e.g. multirun/tune_lr_cpu")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/tune)")
    parser.add_argument("--loss", default="final", help="final (default, the original's) or mean")
    args = parser.parse_args(argv)
    try:
        tune(args.sweep, args.out or sweep_root(args.sweep) / "tune", args.loss)
    except (ReportError, OSError) as err:
        print(f"analysis.tune: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
