"""One pure plotting function per paper figure (DESIGN §5): DataFrames in, a matplotlib Figure out.

``runs`` and ``metrics`` are the frames of ``analysis.load``. Nothing here reads or writes files.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.stats import hypergeom  # noqa: E402

from analysis.load import PHASES, time_to_target  # noqa: E402

STYLE = {"vanilla": dict(linestyle="--", marker="o"), "detox": dict(linestyle="-", marker="s"),
         "other": dict(linestyle=":", marker="^")}
X_LABELS = {"cluster_time": "cluster time (s)", "wall_time": "wall-clock time (s)", "step": "iteration"}


def _rules(df: pd.DataFrame) -> list[str]:
    return [r for r in dict.fromkeys(df["rule"]) if isinstance(r, str)]


def _grid(nrows: int, ncols: int, w: float = 4.0, h: float = 3.2) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    return fig, axes


def fig_a(metrics: pd.DataFrame, x: str = "cluster_time") -> Figure:
    """Test accuracy against time (or iterations): one panel per (attack, rule), vanilla vs DETOX."""
    attacks = list(dict.fromkeys(metrics["err_mode"]))
    rules = [r for r in _rules(metrics) if r not in ("mean",)] or _rules(metrics)
    fig, axes = _grid(len(attacks), len(rules))
    for i, attack in enumerate(attacks):
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            sub = metrics[(metrics["err_mode"] == attack) & (metrics["rule"] == rule)]
            for label, run in sub.groupby("label", sort=False):
                ax.plot(run[x], run["test_acc"], label=label, **STYLE[run["defence"].iloc[0]])
            ax.set_title(f"{rule} — {attack}")
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if len(sub):
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedups(runs: pd.DataFrame, metrics: pd.DataFrame, target: float, x: str = "cluster_time") -> pd.DataFrame:
    """Per (attack, rule): time to ``target`` of vanilla X and DETOX-X and the speedup vanilla / DETOX."""
    ttt = time_to_target(metrics, target, x)
    rows = []
    for (attack, rule), sub in runs.groupby(["err_mode", "rule"], sort=False):
        times = {d: ttt.get(sub[sub["defence"] == d]["job"].iloc[0], np.nan) if (sub["defence"] == d).any()
                 else np.nan for d in ("vanilla", "detox")}
        rows.append({"err_mode": attack, "rule": rule, "target_acc": target, "vanilla_time": times["vanilla"],
                     "detox_time": times["detox"], "speedup": times["vanilla"] / times["detox"]})
    return pd.DataFrame(rows)


def fig_b(runs: pd.DataFrame, metrics: pd.DataFrame, target: float, x: str = "cluster_time") -> Figure:
    """Time to the target accuracy, vanilla X vs DETOX-X, with the speedup above each pair."""
    table = speedups(runs, metrics, target, x)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(table)), 3.6))
    pos = np.arange(len(table))
    ax.bar(pos - 0.2, table["vanilla_time"], 0.4, label="vanilla X")
    ax.bar(pos + 0.2, table["detox_time"], 0.4, label="DETOX-X")
    for p, row in zip(pos, table.itertuples(), strict=True):
        top = np.nanmax([row.vanilla_time, row.detox_time, 0.0])
        text = "never" if np.isnan(row.detox_time) else ("∞" if np.isnan(row.vanilla_time) else f"{row.speedup:.2f}×")
        ax.annotate(text, (p, top), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(pos, [f"{r.rule}\n{r.err_mode}" for r in table.itertuples()])
    ax.set_ylabel(f"{X_LABELS.get(x, x)} to {target:.0%} accuracy")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_c(runs: pd.DataFrame) -> Figure:
    """Mean per-iteration time split into compute, communication, vote, aggregation and update."""
    done = runs[runs["status"].isin(["completed", "diverged"])]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(done)), 3.8))
    bottom = np.zeros(len(done))
    pos = np.arange(len(done))
    for phase in PHASES:
        vals = done[phase].fillna(0.0).to_numpy() * 1000
        ax.bar(pos, vals, 0.6, bottom=bottom, label=phase.removeprefix("t_"))
        bottom += vals
    ax.set_xticks(pos, done["label"], rotation=30, ha="right")
    ax.set_ylabel("ms per iteration")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_d(runs: pd.DataFrame) -> Figure:
    """Final and best test accuracy per method under one attack (ALIE in the paper)."""
    done = runs[runs["status"] != "missing"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(done)), 3.6))
    pos = np.arange(len(done))
    colors = [{"vanilla": "tab:orange", "detox": "tab:blue"}.get(d, "tab:gray") for d in done["defence"]]
    ax.bar(pos, done["final_test_acc"].fillna(0.0), 0.6, color=colors)
    ax.scatter(pos, done["best_test_acc"].fillna(0.0), marker="_", s=300, color="k", label="best during the run")
    ax.set_xticks(pos, done["label"], rotation=30, ha="right")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(" / ".join(dict.fromkeys(done["err_mode"].astype(str))))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_e(runs: pd.DataFrame) -> Figure:
    """Final test accuracy against the number of Byzantine workers q, one line per method."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, sub in runs.sort_values("worker_fail").groupby("label", sort=False):
        ax.plot(sub["worker_fail"], sub["final_test_acc"], label=label, **STYLE[sub["defence"].iloc[0]])
    ax.set_xlabel("Byzantine workers q")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expected_corrupted(workers: int, q: int, r: int) -> float:
    """Hypergeometric expectation of groups with a Byzantine majority: (P/r) * P(X >= ceil((r+1)/2))."""
    return workers // r * float(hypergeom(workers, q, r).sf(r // 2))


def fig_theory(runs: pd.DataFrame) -> Figure:
    """Measured corrupted groups per step (grouped approaches, random placement) vs the expectation."""
    grouped = runs[(runs["approach"] != "baseline") & (runs["placement"] == "random")
                   & runs["corrupted_per_step"].notna()].sort_values("worker_fail")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, sub in grouped.groupby("label", sort=False):
        ax.plot(sub["worker_fail"], sub["corrupted_per_step"], "o", label=f"measured: {label}")
    if len(grouped):
        p, r = int(grouped["workers"].iloc[0]), int(grouped["group_size"].iloc[0])
        qs = np.arange(0, int(grouped["worker_fail"].max()) + 1)
        ax.plot(qs, [expected_corrupted(p, int(q), r) for q in qs], "k-", label="hypergeometric expectation")
        ax.set_title(f"P = {p}, r = {r}")
    ax.set_xlabel("Byzantine workers q")
    ax.set_ylabel("corrupted groups per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
