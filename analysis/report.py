"""``python -m analysis.report MULTIRUN_DIR [--out DIR]``: every figure (PNG + PDF) and the tables (Markdown + CSV):
``table.md``/``table.csv`` one row per configuration aggregated over seeds, ``jobs.csv`` one row per job.

Which figures a sweep gets follows its ``figure`` setting (the sweeps in ``sweeps/`` set it); an ad-hoc sweep
gets the curves, the time split and the accuracy bars.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.load import CPU_MEDIAN_PHASES, MEDIAN_PHASES, PHASES, load_metrics, load_runs, time_column, time_to_target
from analysis.stats import aggregate, fmt

JOB_COLUMNS = ["job", "label", "seed", "err_mode", "worker_fail", "status", "final_test_acc", "best_test_acc",
               "steps", "wall_time", "cluster_time", "cluster_time_median", "cluster_time_cpu", "time_to_target",
               *PHASES, *MEDIAN_PHASES, "t_step_p10", "t_step_p90", *CPU_MEDIAN_PHASES, "corrupted_per_step"]
# the values a configuration's row aggregates over its seeds (times per phase in ms)
VALUES = ["final_test_acc", "best_test_acc", "cluster_time", "cluster_time_median", "cluster_time_cpu",
          *MEDIAN_PHASES, *CPU_MEDIAN_PHASES, "corrupted_per_step"]


def _figures(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> dict[str, Callable[[], plt.Figure]]:
    """Figure name -> a thunk drawing it, for the figure families this sweep belongs to."""
    a = {"fig_a_time": lambda: F.fig_a(metrics), "fig_a_iter": lambda: F.fig_a(metrics, "step")}
    by_letter = {
        "A": a,
        "B": {"fig_b": lambda: F.fig_b(runs, metrics, target)} if target else {},
        "C": {"fig_c": lambda: F.fig_c(runs)},
        "D": {"fig_d": lambda: F.fig_d(runs), **a},
        "E": {"fig_e": lambda: F.fig_e(runs), "fig_theory": lambda: F.fig_theory(runs)},
    }
    letters = [x for x in dict.fromkeys(runs["figure"]) if isinstance(x, str) and x in by_letter]
    chosen: dict[str, Callable[[], plt.Figure]] = {}
    for letter in letters or ["A", "C", "D"]:
        chosen.update(by_letter[letter])
    return chosen


def jobs_table(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> pd.DataFrame:
    """One row per job (times per phase in ms)."""
    out = F.ordered(runs)[JOB_COLUMNS].copy()
    if target is not None and len(metrics):
        x = time_column(metrics)
        out[f"{x}_to_{target:g}"] = time_to_target(metrics, target, x).reindex(out["job"]).to_numpy()
    ms = (*PHASES, *MEDIAN_PHASES, "t_step_p10", "t_step_p90", *CPU_MEDIAN_PHASES)
    for k in ms:
        out[k] = out[k] * 1000
    return out.rename(columns={k: f"{k}_ms" for k in ms})


def table(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> pd.DataFrame:
    """One row per configuration (jobs that differ only in the seed): ``seeds``, the statuses, and for each value
    its mean over seeds with ``_sd``, ``_n``, ``_lo``, ``_hi`` (95 % t-interval) columns."""
    data = F.ordered(runs).copy()
    values = list(VALUES)
    if target is not None and len(metrics):
        x = time_column(metrics)
        data[f"{x}_to_{target:g}"] = data["job"].map(time_to_target(metrics, target, x)).astype(float)
        values.append(f"{x}_to_{target:g}")
    for k in (*MEDIAN_PHASES, *CPU_MEDIAN_PHASES):
        data[f"{k}_ms"] = data[k] * 1000
    values = [f"{v}_ms" if v in (*MEDIAN_PHASES, *CPU_MEDIAN_PHASES) else v for v in values]
    agg = aggregate(data, "config", values).rename(columns={"n": "seeds"})
    meta = data.groupby("config", sort=False).agg(
        label=("label", "first"), err_mode=("err_mode", "first"), worker_fail=("worker_fail", "first"),
        status=("status", lambda s: ", ".join(f"{n} {k}" for k, n in s.value_counts().items())))
    agg = agg.join(meta, on="config")
    front = ["config", "label", "err_mode", "worker_fail", "seeds", "status"]
    return agg[front + [c for c in agg.columns if c not in front]]


def readable(tab: pd.DataFrame) -> pd.DataFrame:
    """The configuration table with each value as ``mean ± sd (n=k)``."""
    front = ["label", "err_mode", "worker_fail", "seeds", "status"]
    out = tab[front].copy()
    for c in tab.columns:
        if f"{c}_sd" in tab.columns and f"{c}_n" in tab.columns:
            digits = 4 if "acc" in c else 3
            out[c] = [fmt(m, s, int(n), digits) for m, s, n in zip(tab[c], tab[f"{c}_sd"], tab[f"{c}_n"],
                                                                   strict=True)]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "/")

    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def report(root: Path, out: Path, target: float | None = None) -> list[Path]:
    """Write the sweep's figures and tables into ``out``; return the written paths."""
    runs = load_runs(root)
    if runs.empty:
        raise ValueError(f"{root}: no job folders; is this a multirun root?")
    metrics = load_metrics(root, runs)
    if target is None and runs["target_acc"].notna().any():
        target = float(runs["target_acc"].dropna().iloc[0])
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in _figures(runs, metrics, target).items():
        fig = draw()
        for ext in ("png", "pdf"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
        print(f"wrote {out / name}.png/.pdf", flush=True)
    tab = table(runs, metrics, target)
    tab.to_csv(out / "table.csv", index=False)
    jobs = jobs_table(runs, metrics, target)
    jobs.to_csv(out / "jobs.csv", index=False)
    md = [f"# {root.name}\n", "Per configuration: mean ± sd over seeds (n = seeds with a value); 95 % t-intervals "
          "in `table.csv` (`_lo`, `_hi`); times per phase are per-window medians in ms. One row per job: "
          "`jobs.csv`.\n", to_markdown(readable(tab))]
    if target is not None and (runs["figure"] == "B").any():
        sp = F.speedups(runs, metrics, target)
        sp.to_csv(out / "speedup.csv", index=False)
        md += [f"\n## Speedup to {target:.0%} test accuracy ({F.X_LABELS.get(sp['clock'].iloc[0], '')})\n"
               if len(sp) else "", to_markdown(speedup_text(sp))]
        written.append(out / "speedup.csv")
    (out / "table.md").write_text("\n".join(md))
    written += [out / "table.csv", out / "jobs.csv", out / "table.md"]
    print(f"wrote {out / 'table.md'}, table.csv ({len(tab)} configurations), jobs.csv ({len(jobs)} jobs)", flush=True)
    return written


def speedup_text(sp: pd.DataFrame) -> pd.DataFrame:
    """The speedup table as a reader quotes it: times ``mean [95 % interval]`` and how many seeds reached."""

    def ci(m: float, lo: float, hi: float, n: int, digits: int = 3) -> str:
        if not np.isfinite(m):
            return "never"
        return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}] (n={n})" if np.isfinite(lo) else \
            f"{m:.{digits}g} (n={n})"

    rows = []
    for r in sp.itertuples():
        rows.append({"err_mode": r.err_mode, "rule": r.rule, "target_acc": r.target_acc,
                     "vanilla_time": ci(r.vanilla_time, r.vanilla_time_lo, r.vanilla_time_hi, r.vanilla_reached),
                     "vanilla_reached": f"{r.vanilla_reached}/{r.vanilla_seeds}",
                     "detox_time": ci(r.detox_time, r.detox_time_lo, r.detox_time_hi, r.detox_reached),
                     "detox_reached": f"{r.detox_reached}/{r.detox_seeds}",
                     "speedup": ci(r.speedup, r.speedup_lo, r.speedup_hi, r.speedup_n) if r.speedup_n else
                     (f"{r.speedup:.3g} (ratio of means)" if np.isfinite(r.speedup) else "")})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__)
    parser.add_argument("sweep", type=Path, help="a multirun root, e.g. multirun/fig_a_cpu")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/report)")
    parser.add_argument("--target", type=float, default=None, help="target test accuracy for time-to-target")
    args = parser.parse_args(argv)
    # the command only writes files: no display, whatever the default backend (importing this module, e.g. for
    # its tables in a notebook, leaves the backend alone)
    matplotlib.use("Agg")
    try:
        report(args.sweep, args.out or args.sweep / "report", args.target)
    except (FileNotFoundError, ValueError) as err:
        print(f"analysis.report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
