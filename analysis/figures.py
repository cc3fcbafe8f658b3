"""One pure plotting function per paper figure (DESIGN §5): DataFrames in, a matplotlib Figure out.

``runs`` and ``metrics`` are the frames of ``analysis.load``. Nothing here reads or writes files, and nothing here
picks a matplotlib backend: the caller does (``analysis.report`` picks Agg; a notebook shows figures inline).

Every configuration (the same config, any seed) is drawn as the mean over its seeds with the 95 % t-interval of
``analysis.stats`` (shaded around curves, whiskers on bars and points) and says how many seeds it holds (``n=3``);
with n = 1 nothing is shaded. One colour per method family everywhere (vanilla X blue, DETOX-X orange, others
grey); markers tell the rules apart. Time axes use ``cluster_time_cpu`` (per-phase CPU medians) where every run
recorded it, else ``cluster_time_median``.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.stats import hypergeom

from analysis.load import CPU_MEDIAN_PHASES, FINISHED, MEDIAN_PHASES, PHASES, time_column, time_to_target
from analysis.stats import Stat, aggregate, interval

FAMILY_COLOURS = {"vanilla": "tab:blue", "detox": "tab:orange", "other": "tab:gray"}
FAMILY_LINES = {"vanilla": "--", "detox": "-", "other": ":"}
RULE_MARKERS = {"multi-krum": "o", "bulyan": "s", "coord-median": "^", "mean": "X", "sign-sgd": "D",
                "maj-vote": "v", "krum": "P", "trimmed-mean": "<", "geometric-median": ">"}
PHASE_COLOURS = {"compute": "tab:cyan", "comm": "tab:purple", "vote": "tab:green", "aggregate": "tab:red",
                 "update": "tab:olive"}
X_LABELS = {"cluster_time": "cluster time (s, per-phase means)",
            "cluster_time_median": "cluster time (s, per-phase medians)",
            "cluster_time_cpu": "cluster time (s, per-phase CPU medians)", "wall_time": "wall-clock time (s)",
            "step": "iteration"}
# presentation order (job folders are listed by name, which would put constant before rev_grad, DETOX before vanilla)
ATTACK_ORDER = ("none", "rev_grad", "constant", "gaussian", "alie", "ipm")
RULE_ORDER = ("multi-krum", "bulyan", "coord-median", "trimmed-mean", "geometric-median", "krum", "mean", "sign-sgd",
              "maj-vote")
FAMILY_ORDER = ("vanilla", "detox", "other")


class NothingToDraw(Exception):
    """What a figure needs is absent (no finished run, a value no run recorded): the message says what; the caller
    skips the figure."""


class Ambiguous(ValueError):
    """Two configurations that a figure would draw or pair as one (two sweeps in one root): the message names two of
    their jobs."""


def plain_text(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Every text of the figure drawn as typed: a label with two ``$`` (an approach or attack named by hand) would
    otherwise be parsed as mathtext when the figure is saved, and fail."""
    @functools.wraps(draw)
    def drawn(*args: object, **kwargs: object) -> Figure:
        # that setting alone, set back after: plt.rc_context would also set back what picking the backend changed
        # meanwhile (a notebook's first figure turns interactive mode on; reverted, no later figure is shown)
        before = plt.rcParams["text.parse_math"]
        plt.rcParams["text.parse_math"] = False
        try:
            return draw(*args, **kwargs)
        finally:
            plt.rcParams["text.parse_math"] = before

    return drawn


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise NothingToDraw(why)


def _finished(runs: pd.DataFrame, col: str | None = None) -> pd.DataFrame:
    """The finished runs (with a value of ``col``), or NothingToDraw: a killed or failed run's numbers are partial."""
    done = runs[runs["status"].isin(FINISHED)]
    _need(len(done) > 0, "no finished (completed or diverged) run")
    if col is not None:
        _need(bool(done[col].notna().any()), f"no finished run has {col}")
    return done


def _rank(values: pd.Series, order: tuple[str, ...]) -> pd.Series:
    return values.map(lambda v: order.index(v) if v in order else len(order))


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: attack, rule (robust rules first), vanilla before DETOX, q, seed; the order of
    the folders otherwise (a stable sort)."""
    keys = pd.DataFrame({"a": _rank(df["err_mode"], ATTACK_ORDER), "r": _rank(df["rule"], RULE_ORDER),
                         "f": _rank(df["defence"], FAMILY_ORDER), "l": df["label"].astype(str),
                         "q": df["worker_fail"].fillna(-1), "s": df["seed"].fillna(-1) if "seed" in df else 0},
                        index=df.index)
    order = keys.reset_index(drop=True).sort_values(["a", "r", "f", "l", "q", "s"], kind="stable").index
    return df.iloc[order]


def style(defence: str, rule: str) -> dict:
    """Colour by family, line style by family, marker by rule: the same method looks the same in every figure."""
    return {"color": FAMILY_COLOURS.get(defence, FAMILY_COLOURS["other"]),
            "linestyle": FAMILY_LINES.get(defence, ":"), "marker": RULE_MARKERS.get(rule, "P")}


def n_text(ns: pd.Series | list[int]) -> str:
    """``n=3``, or ``n=1–3`` where seeds drop out along a curve (a diverged seed stops early)."""
    ns = [int(n) for n in ns if n > 0]
    if not ns:
        return "n=0"
    return f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}–{max(ns)}"


def chance_level(runs: pd.DataFrame) -> pd.Series:
    """Per row, whether the accuracy is no better than guessing (within 1.5× of 1 / classes)."""
    return runs["final_test_acc"].fillna(0.0) <= 1.5 / runs["num_classes"].fillna(10).astype(float)


def _rules(df: pd.DataFrame) -> list[str]:
    return [r for r in dict.fromkeys(df["rule"]) if isinstance(r, str)]


def _first(df: pd.DataFrame, col: str) -> object:
    return df[col].iloc[0] if len(df) else None


def _wrap(label: str, width: int = 32) -> str:
    """A long label (one built from a config: ``baseline/bulyan (average=original, ...)``) over several lines, so
    that rotated tick labels leave the plot room."""
    return "\n".join(textwrap.wrap(str(label), width, break_on_hyphens=False)) or str(label)


def _whiskers(lo: pd.Series | np.ndarray, mean: pd.Series | np.ndarray, hi: pd.Series | np.ndarray) -> np.ndarray:
    """Asymmetric error-bar lengths; 0 where there is no interval (n = 1)."""
    lo, mean, hi = (np.asarray(a, dtype=float) for a in (lo, mean, hi))
    return np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0)


def _zoom_accuracy(ax: Axes, values: list[np.ndarray]) -> bool:
    """Zoom the y axis to where the curves differ (the 0–1 range flattens 0.85 against 0.88); keep 0–1 when some
    curve sits near chance anyway. Returns whether it zoomed."""
    ys = np.concatenate([np.asarray(v, dtype=float) for v in values]) if values else np.array([])
    ys = ys[np.isfinite(ys)]
    if not len(ys) or ys.min() < 0.3:
        ax.set_ylim(0, 1)
        return False
    lo, hi = ys.min(), ys.max()
    pad = max(0.01, 0.1 * (hi - lo))
    ax.set_ylim(lo - pad, min(1.0, hi + pad))
    return True


def seed_curve(metrics: pd.DataFrame, x: str, y: str = "test_acc") -> pd.DataFrame:
    """One configuration's runs -> per evaluation step the mean ``x`` and ``y``'s mean, 95 % interval and n."""
    agg = aggregate(metrics, "step", [c for c in (x, y) if c != "step"]).drop(columns="n")
    # n: seeds with a value at that step (a diverged seed stops early)
    return agg.rename(columns={f"{y}_n": "n"})[list(dict.fromkeys(["step", x, y, f"{y}_lo", f"{y}_hi", "n"]))]


# ------------------------------------------------------------------------------------------------ figure A


@plain_text
def fig_a(metrics: pd.DataFrame, x: str | None = None) -> Figure:
    """Test accuracy against time (or iterations): one panel per (attack, rule), vanilla vs DETOX, each the mean
    over seeds with its 95 % interval shaded; y axes zoomed to the range where the methods differ."""
    x = x or time_column(metrics)
    _need(bool(pd.to_numeric(metrics["test_acc"]).notna().any()), "no evaluation records of a finished run")
    _need(bool(metrics[x].notna().any()), f"no run recorded {x}")
    _need(bool(_rules(metrics)), "no run says which rule it ran")
    metrics = ordered(metrics)
    attacks = list(dict.fromkeys(metrics["err_mode"]))
    rules = [r for r in _rules(metrics) if r not in ("mean",)] or _rules(metrics)
    fig, axes = plt.subplots(len(attacks), len(rules), figsize=(4.4 * len(rules), 3.5 * len(attacks)),
                             squeeze=False)
    zoomed = False
    for i, attack in enumerate(attacks):
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            sub = metrics[(metrics["err_mode"] == attack) & (metrics["rule"] == rule)]
            shown = []
            for _, runs in sub.groupby("config", sort=False):
                curve = seed_curve(runs, x)
                st = style(_first(runs, "defence"), rule)
                ax.plot(curve[x], curve["test_acc"], label=f"{_first(runs, 'label')} ({n_text(curve['n'])})",
                        markersize=4, **st)
                ax.fill_between(curve[x], curve["test_acc_lo"], curve["test_acc_hi"], color=st["color"], alpha=0.2,
                                linewidth=0)
                later = curve["step"] > 0  # step 0 is chance for every method: not where they differ
                shown += [curve.loc[later, "test_acc"], curve.loc[later, "test_acc_lo"],
                          curve.loc[later, "test_acc_hi"]]
            zoomed |= _zoom_accuracy(ax, shown)
            if not shown:
                ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_title(f"{rule} — {_first(sub, 'attack') or attack}", fontsize=10)
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            if shown:
                ax.legend(fontsize=7, loc="best")
    note = "mean over seeds, shaded: 95 % t-interval (none for n=1)"
    fig.suptitle(note + ("\ny axes zoomed to where the methods differ (step 0 is below them)" if zoomed else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ figure B


def speedups(runs: pd.DataFrame, metrics: pd.DataFrame, target: float, x: str | None = None) -> pd.DataFrame:
    """Per (attack, rule, q) (and ``variant``, where a root holds configurations the label alone does not tell
    apart: ``analysis.load``): time to ``target`` of vanilla X and DETOX-X over their seeds (mean, 95 % interval,
    how many seeds reached it) and the speedup vanilla / DETOX: the mean of the per-seed ratios (seed s of X over
    seed s of DETOX-X, paired by seed: a seed one side lacks, or that one side never reached the target with, has no
    ratio; nor has a seed reached at time 0 on either side, before any training) with its interval; the ratio of
    the mean times where no seed pairs up. Raises Ambiguous where one side holds two configurations (which would it
    pair?)."""
    x = x or time_column(metrics)
    ttt = time_to_target(metrics, target, x) if len(metrics) else pd.Series(dtype=float)
    runs = runs[runs["status"].isin(FINISHED)]  # a killed or failed seed is no seed that did not reach it
    variant = runs["variant"].fillna("") if "variant" in runs else ""
    data = ordered(runs.assign(ttt=runs["job"].map(ttt).astype(float), variant=variant))
    rows = []
    for (attack, rule, q, variant), sub in data.groupby(["err_mode", "rule", "worker_fail", "variant"], sort=False,
                                                        dropna=False):
        side = {defence: sub[sub["defence"] == defence] for defence in ("vanilla", "detox")}
        for defence, part in side.items():
            seeds = part["seed"].dropna()
            if part["config"].nunique() > 1 or not seeds.is_unique:
                a, b = (part.drop_duplicates("config") if part["config"].nunique() > 1 else
                        part[part["seed"].duplicated(keep=False)])["job"].iloc[:2]
                raise Ambiguous(f"jobs {a} and {b} are both {defence} {rule} under {attack}, q = {q}, "
                                f"{'with different configs' if part['config'].nunique() > 1 else 'with the same seed'}"
                                f": which would the speedup pair? (one sweep per root)")
        if not len(side["vanilla"]) and not len(side["detox"]):
            continue
        row = {"err_mode": attack, "rule": rule, "worker_fail": q, "variant": variant, "target_acc": target,
               "clock": x}
        for defence, part in side.items():
            s = interval(part["ttt"])
            row.update({f"{defence}_label": _first(part, "label"), f"{defence}_time": s.mean,
                        f"{defence}_time_lo": s.lo, f"{defence}_time_hi": s.hi, f"{defence}_reached": s.n,
                        f"{defence}_seeds": len(part)})
        # paired by seed, never by position (a job without a seed pairs with none); a time of 0 (a target reached
        # before training, at step 0) on either side gives no ratio: x / 0 is no speedup, 0 / x none either
        times = {d: part.dropna(subset=["seed"]).set_index("seed")["ttt"] for d, part in side.items()}
        ratios = [times["vanilla"][seed] / times["detox"][seed] for seed in times["vanilla"].index
                  if seed in times["detox"].index and times["vanilla"][seed] > 0 and times["detox"][seed] > 0]
        sp = interval(ratios)
        if sp.n == 0:  # not paired: the ratio of the mean times, a point estimate without a seed count
            v, d = row["vanilla_time"], row["detox_time"]
            sp = Stat(v / d if v > 0 and d > 0 else np.nan, np.nan, 0, np.nan, np.nan)
        row.update({"speedup": sp.mean, "speedup_sd": sp.sd, "speedup_lo": sp.lo, "speedup_hi": sp.hi,
                    "speedup_n": sp.n})
        rows.append(row)
    out = pd.DataFrame(rows)
    # the variant column only where a root needs one (the tables of a sweep of one setting keep their columns)
    return out.drop(columns="variant") if len(out) and not out["variant"].astype(bool).any() else out


@plain_text
def fig_b(runs: pd.DataFrame, metrics: pd.DataFrame, target: float, x: str | None = None) -> Figure:
    """Time to the target accuracy, vanilla X vs DETOX-X (mean over seeds, 95 % whiskers), with the speedup and
    its interval above each pair."""
    x = x or time_column(metrics)
    _need(bool(metrics[x].notna().any()), f"no evaluation records with {x}")
    table = speedups(runs, metrics, target, x)
    _need(len(table) > 0, "no finished vanilla X or DETOX-X run")
    fig, ax = plt.subplots(figsize=(max(5.5, 2.2 * len(table)), 4.2))
    pos = np.arange(len(table))
    tops = []
    for offset, defence, name in ((-0.2, "vanilla", "vanilla X"), (0.2, "detox", "DETOX-X")):
        mean = table[f"{defence}_time"] if len(table) else pd.Series(dtype=float)
        lo, hi = (table[f"{defence}_time_{k}"] if len(table) else mean for k in ("lo", "hi"))
        ax.bar(pos + offset, mean.fillna(0.0), 0.4, color=FAMILY_COLOURS[defence], label=name)
        ax.errorbar(pos + offset, mean, yerr=_whiskers(lo, mean, hi), fmt="none", ecolor="k", capsize=3, lw=1)
        tops.append(np.fmax(mean.to_numpy(dtype=float), hi.to_numpy(dtype=float)))
    finite = np.concatenate(tops)
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if len(finite) and finite.max() > 0 else 1.0  # no time to show: an axis of 0..1
    for p, row in zip(pos, table.itertuples(), strict=True):
        pair_top = np.nanmax([row.vanilla_time, row.vanilla_time_hi, row.detox_time, row.detox_time_hi, 0.0])
        for offset, defence in ((-0.2, "vanilla"), (0.2, "detox")):
            if not np.isfinite(getattr(row, f"{defence}_time")):
                ax.text(p + offset, 0.02 * top, "never" if getattr(row, f"{defence}_seeds") else "no run",
                        ha="center", va="bottom", rotation=90, fontsize=8)
        if np.isfinite(row.speedup):
            text = f"{row.speedup:.2f}×"
            if row.speedup_n >= 2:
                text += f"\n[{row.speedup_lo:.2f}, {row.speedup_hi:.2f}]"
            text += f"\nn={row.speedup_n}" if row.speedup_n else "\nunpaired"
        elif np.isfinite(row.vanilla_time) and np.isfinite(row.detox_time):
            text = "no ratio:\nreached at time 0"  # the target lies below the accuracy before training
        else:  # one side (or both) has no time: no finished seed, or none reached the target
            missing = [name for name, d in (("X", "vanilla"), ("DETOX-X", "detox"))
                       if not np.isfinite(getattr(row, f"{d}_time"))]
            runs_of = [name for name, d in (("X", "vanilla"), ("DETOX-X", "detox")) if not getattr(row, f"{d}_seeds")]
            if runs_of:
                text = f"no finished\n{' or '.join(runs_of)} run"
            else:
                text = "neither\nreached it" if len(missing) == 2 else f"{missing[0]} never\nreached it"
        # centred over the pair, above the taller bar's whisker; the y limit leaves room so it never meets the frame
        ax.text(p, pair_top + 0.04 * top, text, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.45)
    variants = table["variant"] if "variant" in table else pd.Series("", index=table.index)
    ax.set_xticks(pos, [f"{r.rule}\n{r.err_mode}{chr(10) + v if v else ''}\nreached {r.vanilla_reached}/"
                        f"{r.vanilla_seeds} · {r.detox_reached}/{r.detox_seeds}"
                        for r, v in zip(table.itertuples(), variants, strict=True)], fontsize=8)
    ax.set_ylabel(f"{X_LABELS.get(x, x)}\nto {target:.0%} accuracy")
    ax.set_title("mean over seeds, whiskers: 95 % t-interval\nspeedup: mean of per-seed ratios [95 % interval]",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ figure C


@plain_text
def fig_c(runs: pd.DataFrame) -> Figure:
    """Per-iteration time split (per-phase medians where recorded, else means), one bar per configuration: mean
    over seeds, whisker the 95 % interval of the total, a grey line the within-run spread of a step (10th–90th
    percentile); phases that are always 0 (communication in ``engine=local``) are left out; diverged and
    chance-level methods are hatched and named."""
    done = ordered(_finished(runs)).copy()
    _need(bool(done[[*PHASES, *MEDIAN_PHASES]].notna().any().any()), "no finished run recorded phase times")
    # the CPU clock where every run has it (a loaded machine leaves it alone), else wall-clock medians, else means
    if done[list(CPU_MEDIAN_PHASES)].notna().all().all() and len(done):
        phases = list(CPU_MEDIAN_PHASES)
    else:
        phases = list(MEDIAN_PHASES if done[list(MEDIAN_PHASES)].notna().any().any() else PHASES)
    done["total"] = done[phases].fillna(0.0).sum(axis=1)
    done["diverged"] = (done["status"] == "diverged").astype(float)
    done["chance"] = chance_level(done).astype(float)
    agg = aggregate(done, "config", [*phases, "total", "t_step_p10", "t_step_p90", "diverged", "chance"])
    meta = done.groupby("config", sort=False)[["label", "defence"]].first()
    agg = agg.join(meta, on="config")
    shown = [p for p in phases if agg[p].fillna(0.0).abs().max() > 0]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(agg) + 1.5), 4.4))
    pos = np.arange(len(agg))
    bottom = np.zeros(len(agg))
    bad = (agg["diverged"] > 0) | (agg["chance"] >= 0.5)
    for phase in shown:
        name = phase.removeprefix("t_").removesuffix("_median").removesuffix("_cpu")
        vals = agg[phase].fillna(0.0).to_numpy() * 1000
        ax.bar(pos, vals, 0.6, bottom=bottom, label=name, color=PHASE_COLOURS.get(name),
               hatch=["//" if b else None for b in bad], edgecolor="white", linewidth=0)
        bottom += vals
    total = agg["total"].to_numpy() * 1000
    ax.errorbar(pos, total, yerr=_whiskers(agg["total_lo"] * 1000, total, agg["total_hi"] * 1000), fmt="none",
                ecolor="k", capsize=3, lw=1)
    p10, p90 = agg["t_step_p10"].to_numpy() * 1000, agg["t_step_p90"].to_numpy() * 1000
    ax.vlines(pos + 0.36, p10, p90, color="0.45", lw=2)
    top = np.nanmax(np.concatenate([total, p90, agg["total_hi"].to_numpy() * 1000, [1e-9]]))
    for p, row in zip(pos, agg.itertuples(), strict=True):
        if row.diverged > 0:
            note = f"diverged\n{round(row.diverged * row.n)}/{row.n} seeds"
        elif row.chance >= 0.5:
            note = "chance\naccuracy"
        else:
            continue
        ax.text(p, np.nanmax([row.total_hi, row.total]) * 1000 + 0.03 * top, note, ha="center", va="bottom",
                fontsize=7, color="darkred")
    ax.set_ylim(0, top * 1.3)
    ax.set_xticks(pos, [f"{_wrap(r.label)}\n(n={r.n})" for r in agg.itertuples()], rotation=30, ha="right",
                  fontsize=8)
    for tick, defence in zip(ax.get_xticklabels(), agg["defence"], strict=True):
        tick.set_color(FAMILY_COLOURS.get(defence, FAMILY_COLOURS["other"]))
    clock = {CPU_MEDIAN_PHASES[0]: "CPU median", MEDIAN_PHASES[0]: "median"}.get(phases[0], "mean")
    ax.set_ylabel(f"ms per iteration ({clock} per phase)")
    extra = [Line2D([], [], color="k", marker="_", lw=1, label="95 % interval over seeds"),
             Line2D([], [], color="0.45", lw=2, label="10th–90th pct of a step (wall clock)")]
    if bad.any():
        extra.append(Patch(facecolor="white", edgecolor="0.3", hatch="//", label="diverged / chance"))
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + extra, fontsize=7, ncol=2, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ figure D


def _setting(runs: pd.DataFrame) -> str:
    """``alie (z = 1), q = 5 of P = 45`` for a figure's title."""
    attacks = " / ".join(str(a) for a in dict.fromkeys(runs["attack"].dropna()))
    qs = sorted({int(q) for q in runs["worker_fail"].dropna()})
    ps = sorted({int(p) for p in runs["workers"].dropna()})
    p = f"P = {ps[0]}" if len(ps) == 1 else ""
    if len(qs) == 1:
        return f"{attacks}, q = {qs[0]} of {p}" if p else f"{attacks}, q = {qs[0]}"
    return f"{attacks}, {p}" if p else attacks


@plain_text
def fig_d(runs: pd.DataFrame) -> Figure:
    """Final test accuracy per method under one attack (ALIE in the paper): mean over seeds, 95 % whiskers, and
    the mean best accuracy during the run."""
    done = ordered(_finished(runs, "final_test_acc"))
    agg = aggregate(done, "config", ["final_test_acc", "best_test_acc"])
    agg = agg.join(done.groupby("config", sort=False)[["label", "defence"]].first(), on="config")
    fig, ax = plt.subplots(figsize=(max(5.5, 0.95 * len(agg) + 1.5), 4.0))
    pos = np.arange(len(agg))
    colours = [FAMILY_COLOURS.get(d, FAMILY_COLOURS["other"]) for d in agg["defence"]]
    ax.bar(pos, agg["final_test_acc"].fillna(0.0), 0.6, color=colours)
    ax.errorbar(pos, agg["final_test_acc"], fmt="none", ecolor="k", capsize=3, lw=1,
                yerr=_whiskers(agg["final_test_acc_lo"], agg["final_test_acc"], agg["final_test_acc_hi"]))
    ax.scatter(pos, agg["best_test_acc"], marker="_", s=300, color="k", label="best during the run (mean)")
    ax.set_xticks(pos, [f"{_wrap(r.label)}\n(n={r.final_test_acc_n})" for r in agg.itertuples()], rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{_setting(done) if len(done) else ''}\nmean over seeds, whiskers: 95 % t-interval", fontsize=9)
    handles = [Patch(color=FAMILY_COLOURS[k], label=v) for k, v in
               (("vanilla", "vanilla X"), ("detox", "DETOX-X"), ("other", "other"))
               if k in set(agg["defence"])]
    ax.legend(handles=[*handles, *ax.get_legend_handles_labels()[0]], fontsize=7, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ figure E


def _lines(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``label`` naming one line of a plot against q: the method, and its attack where the runs hold
    several (a line's points are means over the seeds of one configuration each, never over two attacks')."""
    runs = runs.copy()
    if runs["attack"].nunique(dropna=False) > 1:
        runs["label"] = runs["label"].astype(str) + " — " + runs["attack"].astype(str)
    return runs


def _by_q(sub: pd.DataFrame, col: str) -> pd.DataFrame:
    return aggregate(sub.sort_values("worker_fail"), "worker_fail", [col])


def _dodge(k: int, count: int, width: float = 0.3) -> float:
    """x offset of line k of ``count``, so that markers at the same q do not hide each other."""
    return 0.0 if count < 2 else (k / (count - 1) - 0.5) * width


@plain_text
def fig_e(runs: pd.DataFrame) -> Figure:
    """Left: final test accuracy against the number of Byzantine workers q, one line per method (mean over
    seeds, 95 % whiskers). Right: what differs between the robust methods, their gap to their own clean run
    (q = 0; per-seed differences), zoomed; methods that diverge or fall to chance are named, not drawn."""
    done = _lines(ordered(_finished(runs, "final_test_acc")))
    done["chance"] = chance_level(done) | (done["status"] == "diverged")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    lines = list(dict.fromkeys(done["label"]))
    robust, dropped = [], []
    for k, label in enumerate(lines):
        sub = done[done["label"] == label]
        st = style(_first(sub, "defence"), _first(sub, "rule"))
        agg = _by_q(sub, "final_test_acc")
        xs = agg["worker_fail"].astype(float) + _dodge(k, len(lines))
        left.errorbar(xs, agg["final_test_acc"], capsize=2, markersize=5,
                      yerr=_whiskers(agg["final_test_acc_lo"], agg["final_test_acc"], agg["final_test_acc_hi"]),
                      label=f"{label} ({n_text(agg['final_test_acc_n'])})", **st)
        (dropped if sub["chance"].any() else robust).append(label)
    left.set_xlabel("Byzantine workers q")
    left.set_ylabel("final test accuracy")
    left.set_ylim(0, 1)
    left.set_title(_setting(done) if len(done) else "", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    gaps = []
    for k, label in enumerate(robust):
        sub = done[done["label"] == label]
        clean = sub[sub["worker_fail"] == 0].set_index("seed")["final_test_acc"]
        if clean.empty:
            continue
        rows = []
        for q, at_q in sub.groupby("worker_fail"):
            s = interval(at_q.set_index("seed")["final_test_acc"].sub(clean).to_numpy())
            rows.append((q, s.mean, s.lo, s.hi, s.n))
        gaps.append((k, label, sub, pd.DataFrame(rows, columns=["q", "gap", "lo", "hi", "n"])))
    values = []
    for k, label, sub, g in gaps:
        st = style(_first(sub, "defence"), _first(sub, "rule"))
        right.errorbar(g["q"].astype(float) + _dodge(k, len(robust)), g["gap"], capsize=2, markersize=5,
                       yerr=_whiskers(g["lo"], g["gap"], g["hi"]), label=f"{label} ({n_text(g['n'])})", **st)
        values += [g["gap"], g["lo"], g["hi"]]
    if gaps:
        right.axhline(0.0, color="k", lw=0.8)
        right.set_ylabel("accuracy − accuracy at q = 0\n(same method, same seed)")
        title = "gap to the clean run"
    else:  # no clean runs to compare with: the robust methods' accuracy, zoomed
        for k, label in enumerate(robust):
            sub = done[done["label"] == label]
            agg = _by_q(sub, "final_test_acc")
            right.errorbar(agg["worker_fail"].astype(float) + _dodge(k, len(robust)), agg["final_test_acc"],
                           yerr=_whiskers(agg["final_test_acc_lo"], agg["final_test_acc"],
                                          agg["final_test_acc_hi"]),
                           capsize=2, markersize=5, label=label, **style(_first(sub, "defence"), _first(sub, "rule")))
            values += [agg["final_test_acc"]]
        right.set_ylabel("final test accuracy (zoomed)")
        title = "robust methods, zoomed"
    if values:
        v = np.concatenate([np.asarray(a, dtype=float) for a in values])
        v = v[np.isfinite(v)]
        if len(v):
            pad = max(0.005, 0.15 * (v.max() - v.min()))
            right.set_ylim(v.min() - pad, v.max() + pad)
    if dropped:
        title += "\nnot drawn (diverged or at chance): " + ", ".join(dropped)
    right.set_title(title, fontsize=9)
    right.set_xlabel("Byzantine workers q")
    right.grid(alpha=0.3)
    if robust:
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def expected_corrupted(workers: int, q: int, r: int) -> float:
    """Hypergeometric expectation of groups with a Byzantine majority: (P/r) * P(X >= ceil((r+1)/2))."""
    return workers // r * float(hypergeom(workers, q, r).sf(r // 2))


@plain_text
def fig_theory(runs: pd.DataFrame) -> Figure:
    """Measured corrupted groups per step (grouped approaches, random placement; mean over seeds, 95 % whiskers)
    vs the hypergeometric expectation. Methods with the same seeds meet the same Byzantine draws and measure the
    same counts: their markers are set side by side and hollow so that none hides another."""
    grouped = _lines(ordered(runs[(runs["approach"] != "baseline") & (runs["placement"] == "random")
                                  & runs["corrupted_per_step"].notna() & runs["workers"].notna()
                                  & runs["group_size"].notna()]))
    _need(len(grouped) > 0, "no grouped run with random placement recorded corrupted groups")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    labels = list(dict.fromkeys(grouped["label"]))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for k, label in enumerate(labels):
        sub = grouped[grouped["label"] == label]
        agg = _by_q(sub, "corrupted_per_step")
        st = style(_first(sub, "defence"), _first(sub, "rule"))
        ax.errorbar(agg["worker_fail"].astype(float) + _dodge(k, len(labels), 0.25), agg["corrupted_per_step"],
                    yerr=_whiskers(agg["corrupted_per_step_lo"], agg["corrupted_per_step"],
                                   agg["corrupted_per_step_hi"]),
                    fmt=markers[k % len(markers)], mfc="none", mec=st["color"], ecolor=st["color"], capsize=2,
                    markersize=7, label=f"measured: {label} ({n_text(agg['corrupted_per_step_n'])})")
    if len(grouped):
        p, r = int(grouped["workers"].iloc[0]), int(grouped["group_size"].iloc[0])
        qs = np.arange(0, int(grouped["worker_fail"].max()) + 1)
        ax.plot(qs, [expected_corrupted(p, int(q), r) for q in qs], "k-", lw=1, label="hypergeometric expectation")
        ax.set_title(f"P = {p}, r = {r}", fontsize=10)
    ax.set_xlabel("Byzantine workers q")
    ax.set_ylabel("corrupted groups per step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
