"""``python -m analysis.report MULTIRUN_DIR [--out DIR]``: every figure (PNG + PDF) and a table (Markdown + CSV).

Which figures a sweep gets follows its ``figure`` setting (the sweeps in ``sweeps/`` set it); an ad-hoc sweep
gets the curves, the time split and the accuracy bars.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.load import load_metrics, load_runs, time_to_target

TABLE_COLUMNS = ["job", "label", "err_mode", "worker_fail", "status", "final_test_acc", "best_test_acc",
                 "steps", "wall_time", "cluster_time", "time_to_target", "t_compute", "t_comm", "t_vote",
                 "t_aggregate", "t_update", "corrupted_per_step"]


def _figures(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> dict[str, Callable[[], plt.Figure]]:
    """Figure name -> a thunk drawing it, for the figure families this sweep belongs to."""
    a = {"fig_a_time": lambda: F.fig_a(metrics, "cluster_time"), "fig_a_iter": lambda: F.fig_a(metrics, "step")}
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


def table(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> pd.DataFrame:
    out = runs[TABLE_COLUMNS].copy()
    if target is not None and len(metrics):
        out[f"cluster_time_to_{target:g}"] = time_to_target(metrics, target).reindex(out["job"]).to_numpy()
    for k in ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update"):
        out[k] = out[k] * 1000  # ms per iteration
    return out.rename(columns={k: f"{k}_ms" for k in ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update")})


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
        raise ValueError(f"{root}: no numbered job folders; is this a multirun root?")
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
    md = [f"# {root.name}\n", to_markdown(tab)]
    if target is not None and (runs["figure"] == "B").any():
        sp = F.speedups(runs, metrics, target)
        sp.to_csv(out / "speedup.csv", index=False)
        md += [f"\n## Speedup to {target:.0%} test accuracy (cluster time)\n", to_markdown(sp)]
        written.append(out / "speedup.csv")
    (out / "table.md").write_text("\n".join(md))
    written += [out / "table.csv", out / "table.md"]
    print(f"wrote {out / 'table.md'} and table.csv ({len(tab)} jobs)", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__)
    parser.add_argument("sweep", type=Path, help="a multirun root, e.g. multirun/fig_a_cpu")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/report)")
    parser.add_argument("--target", type=float, default=None, help="target test accuracy for time-to-target")
    args = parser.parse_args(argv)
    try:
        report(args.sweep, args.out or args.sweep / "report", args.target)
    except (FileNotFoundError, ValueError) as err:
        print(f"analysis.report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
