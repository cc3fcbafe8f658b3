"""Every number docs/results/README.md publishes is what the committed data says.

Two layers, so that a regenerated CSV and the prose quoting it cannot drift apart unnoticed:

1. Each committed result folder's aggregated tables are rebuilt from its own per-job ``jobs.csv`` with the project's
   analysis code (``analysis.report.table``, ``analysis.figures.speedups``, ``analysis.report.readable`` /
   ``speedup_text`` for the Markdown) and compared with the committed ``table.csv``, ``speedup.csv`` and
   ``table.md``; the tuning folders' picks are redone with ``analysis.tune.pick_table`` from its per-lr losses and
   compared with its ``table.csv``, ``table.md`` and ``lr_picks.yaml``. The multirun folders (metrics.jsonl) are
   not committed: where a table needs a job's time to the target accuracy, the one number of it that the curve
   contributes (``jobs.csv``'s ``<clock>_to_<target>``) is given to that code as a one-record curve per job.
2. ``QUOTES`` lists every number the README quotes that the committed files hold: the README text around it, the
   CSV cells it comes from and how the README prints them. Each test asserts that the README still says it and
   that formatting the cells reproduces it; the messages name the quote and the cells.

Numbers of runs whose outputs are not committed (earlier commits' speedups, the three timing runs of issue #12,
the hog runs of "Timing stability, measured", steps to 85 %) cannot be checked here and are not listed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from analysis import figures as F
from analysis import report, tune
from analysis.labels import labels
from analysis.load import CPU_MEDIAN_PHASES, FINISHED, MEDIAN_PHASES, PHASES
from detox.tuning import KEYS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = RESULTS / "README.md"
# the sweeps' result folders that hold per-job rows (fig_c_paper is the benchmark's, checked by its quotes)
TUNINGS = ("tune_lr_cpu", "tune_lr_alie_cpu")  # analysis.tune's committed outputs
FOLDERS = ("fig_a_cpu", "fig_a_cpu_tuned", "fig_b_cpu", "fig_b_cpu_tuned", "fig_c_cpu", "fig_d_cpu", "fig_d_cpu_tuned",
           "fig_e_cpu")
REL_TOL = 1e-12  # the CSVs print full float precision (repr): a recomputed value must agree to it
TO_TARGET = re.compile(r"(?P<clock>\w+)_to_(?P<target>[0-9.]+)")
KEY = ["label", "err_mode", "worker_fail"]  # one configuration of a figure sweep (no two configs share it: tested)


@cache
def readme() -> str:
    """The README with every run of whitespace as one space (quotes may wrap across lines there)."""
    return " ".join(README.read_text().split())


@cache
def csv(rel: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / rel)


# ---------------------------------------------------------------------------------------------------------------
# 1. the aggregated tables, rebuilt from the per-job rows


@cache
def sweep(folder: str) -> tuple[pd.DataFrame, pd.DataFrame, float | None]:
    """(runs, metrics, target) as ``analysis.load`` would give them, rebuilt from ``folder/jobs.csv``."""
    jobs = csv(f"{folder}/jobs.csv")
    runs = pd.DataFrame({"job": jobs["job"]})
    named = [labels(label, None, None) for label in jobs["label"]]
    runs["label"] = [n[0] for n in named]
    runs["defence"] = [n[1] for n in named]
    runs["rule"] = [n[2] for n in named]
    for c in ("seed", "err_mode", "worker_fail", "status", "steps", "final_test_acc", "best_test_acc", "wall_time",
              "cluster_time", "cluster_time_median", "cluster_time_cpu", "time_to_target", "corrupted_per_step"):
        runs[c] = jobs[c] if c in jobs else np.nan
    for k in (*PHASES, *MEDIAN_PHASES, "t_step_p10", "t_step_p90", *CPU_MEDIAN_PHASES):  # jobs.csv: ms
        runs[k] = jobs[f"{k}_ms"] / 1000 if f"{k}_ms" in jobs else np.nan
    runs["config"] = runs[KEY].astype(str).agg("|".join, axis=1)
    runs["figure"] = "B" if (RESULTS / folder / "speedup.csv").exists() else None
    runs.index = pd.Index(runs["job"].to_list())
    target, metrics = None, pd.DataFrame({"job": runs["job"], "test_acc": np.nan})
    columns = [c for c in jobs.columns if TO_TARGET.fullmatch(c)]
    if columns:
        (column,) = columns
        match = TO_TARGET.fullmatch(column)
        target = float(match["target"])
        reached = jobs[column]
        # one record per job: at the target at its committed time to it, or never
        metrics = pd.DataFrame({"job": jobs["job"], "test_acc": np.where(reached.notna(), 1.0, 0.0),
                                match["clock"]: reached.fillna(1.0)})
    return runs, metrics, target


def plain(value: object) -> object:
    """numpy scalars as Python's, for messages."""
    if isinstance(value, tuple | list):
        return type(value)(plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def differences(name: str, committed: pd.DataFrame, rebuilt: pd.DataFrame, key: list[str]) -> list[str]:
    """One line per cell of ``committed`` that ``rebuilt`` (same rows, same order) does not reproduce."""
    out = []
    if len(committed) != len(rebuilt):
        return [f"{name}: {len(committed)} rows committed, {len(rebuilt)} rebuilt from jobs.csv"]
    for i in range(len(committed)):
        where = f"{name} line {i + 2} ({', '.join(str(committed[k].iloc[i]) for k in key)})"
        for c in committed.columns:
            if c not in rebuilt.columns:
                out.append(f"{name}: column {c} is not one the analysis code makes")
                continue
            a, b = committed[c].iloc[i], rebuilt[c].iloc[i]
            if isinstance(a, str) or isinstance(b, str) or isinstance(a, bool | np.bool_):
                same = str(a) == str(b)
            elif pd.isna(a) or pd.isna(b):
                same = pd.isna(a) and pd.isna(b)
            else:
                same = math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=1e-15)
            if not same:
                out.append(f"{where} column {c}: committed {plain(a)!r}, rebuilt from the per-job rows {plain(b)!r}")
    return out


def test_every_committed_result_folder_is_checked() -> None:
    found = tuple(sorted(p.parent.name for p in RESULTS.glob("fig_*_cpu*/jobs.csv")))
    assert found == FOLDERS, f"result folders with a jobs.csv: {found}; FOLDERS lists {FOLDERS}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_table_csv_is_its_jobs_aggregated(folder: str) -> None:
    runs, metrics, target = sweep(folder)
    rebuilt = report.table(runs, metrics, target)
    committed = csv(f"{folder}/table.csv")
    assert committed["config"].is_unique and not committed.duplicated(KEY).any(), \
        f"{folder}/table.csv: two rows share a config or a (label, err_mode, worker_fail)"
    problems = differences(f"{folder}/table.csv", committed.drop(columns="config"), rebuilt, KEY)
    # columns an older report did not write must be ones no job has a value of
    for c in rebuilt.columns:
        if c.endswith("_n") and c not in committed.columns and rebuilt[c].any():
            problems.append(f"{folder}/table.csv lacks {c[:-2]}, which jobs.csv has values of")
    assert not problems, "\n".join(problems[:25])


@pytest.mark.parametrize("folder", [f for f in FOLDERS if (RESULTS / f / "speedup.csv").exists()])
def test_speedup_csv_is_its_jobs_paired(folder: str) -> None:
    runs, metrics, target = sweep(folder)
    assert target is not None, f"{folder}/jobs.csv has no <clock>_to_<target> column for speedup.csv"
    rebuilt = F.speedups(runs, metrics, target)
    problems = differences(f"{folder}/speedup.csv", csv(f"{folder}/speedup.csv"), rebuilt, ["err_mode", "rule"])
    assert not problems, "\n".join(problems[:25])


@pytest.mark.parametrize("folder", FOLDERS)
def test_table_md_shows_the_rebuilt_table(folder: str) -> None:
    runs, metrics, target = sweep(folder)
    committed = csv(f"{folder}/table.csv")
    rebuilt = report.table(runs, metrics, target)[committed.columns]  # the columns that report wrote then
    text = (RESULTS / folder / "table.md").read_text()
    tables = [("configurations", report.to_markdown(report.readable(rebuilt)))]
    if (RESULTS / folder / "speedup.csv").exists():
        tables.append(("speedups", report.to_markdown(report.speedup_text(F.speedups(runs, metrics, target)))))
    for what, expected in tables:
        missing = [line for line in expected.splitlines() if line not in text.splitlines()]
        assert not missing, f"{folder}/table.md: its table of {what} lacks these rows rebuilt from jobs.csv: " \
                            f"{missing[:3]}"


@cache
def tuning(folder: str) -> pd.DataFrame:
    """``analysis.tune.pick_table`` redone from ``folder``/table.csv's per-lr losses (one job per lr and key)."""
    committed = csv(f"{folder}/table.csv")
    assert (committed["seeds"] == 1).all(), f"{folder}/table.csv: an lr with several seeds (their mean is shown)"
    jobs = committed.assign(seed=0, config=folder, job=[f"job{i}" for i in range(len(committed))],
                            loss=committed["loss"].where(committed["status"] == "completed"))
    return tune.pick_table(jobs[[*KEYS, "lr", "seed", "status", "config", "loss", "job"]])


@pytest.mark.parametrize("folder", TUNINGS)
def test_tune_table_csv_picks_are_analysis_tunes(folder: str) -> None:
    committed = csv(f"{folder}/table.csv")
    rebuilt = tune._order(tuning(folder)).assign(lr_label=lambda d: d["lr"].map(tune.lr_label))
    problems = differences(f"{folder}/table.csv", committed, rebuilt.reset_index(drop=True), [*KEYS, "lr"])
    assert not problems, "\n".join(problems[:25])


@pytest.mark.parametrize("folder", TUNINGS)
def test_tune_table_md_shows_the_picks(folder: str) -> None:
    text = (RESULTS / folder / "table.md").read_text()
    expected = report.to_markdown(tune.wide(tuning(folder))).splitlines()
    missing = [line for line in expected if line not in text.splitlines()]
    assert not missing, f"{folder}/table.md lacks these rows rebuilt from table.csv: {missing[:3]}"


@pytest.mark.parametrize("folder", TUNINGS)
def test_lr_picks_yaml_is_the_lowest_loss_of_table_csv(folder: str) -> None:
    picked = yaml.safe_load((RESULTS / folder / "lr_picks.yaml").read_text())["lr"]
    committed = csv(f"{folder}/table.csv")
    problems = []
    for (task, method, attack), group in committed.groupby(list(KEYS)):
        ok = group[group["status"] == "completed"]
        best = ok.sort_values(["loss", "lr"]).iloc[0]  # the lowest loss; ties to the smaller lr
        got = picked.get(task, {}).get(method, {}).get(attack)
        if got != best["lr"]:
            problems.append(f"lr_picks.yaml {task}/{method}/{attack}: {got!r}, but {folder}/table.csv's lowest "
                            f"loss {plain(best['loss'])!r} is at lr {plain(best['lr'])!r}")
        flagged = group.loc[group["picked"], "lr"].to_list()
        if flagged != [best["lr"]]:
            problems.append(f"{folder}/table.csv {task}/{method}/{attack}: picked column marks lr {flagged}, "
                            f"the lowest loss is at {plain(best['lr'])!r}")
    count = sum(len(m) for methods in picked.values() for m in methods.values())
    if count != committed.groupby(list(KEYS)).ngroups:
        problems.append(f"lr_picks.yaml has {count} picks, {folder}/table.csv "
                        f"{committed.groupby(list(KEYS)).ngroups} (task, method, err_mode)")
    if picked != tune.picks(tuning(folder)):
        problems.append(f"lr_picks.yaml {picked} is not analysis.tune.picks of table.csv {tune.picks(tuning(folder))}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# 2. the README's quotes


def num(x: float, digits: int) -> str:
    """As the README prints a number: fixed digits, a real minus sign."""
    return f"{x:.{digits}f}".replace("-", "−")


def ci(digits: int, unit: str = "") -> Callable[..., str]:
    """``mean [lo, hi]`` (``2.49× [1.30, 3.68]`` with ``unit="×"``)."""
    return lambda m, lo, hi: f"{num(m, digits)}{unit} [{num(lo, digits)}, {num(hi, digits)}]"


def fixed(digits: int, unit: str = "") -> Callable[..., str]:
    return lambda x: num(x, digits) + unit


def listed(digits: int, sep: str = ", ", zero: bool = False) -> Callable[..., str]:
    """Numbers one after another; ``zero``: an exact 0 as ``0``."""
    return lambda *xs: sep.join("0" if zero and x == 0 else num(x, digits) for x in xs)


def span(digits: int, unit: str = "") -> Callable[..., str]:
    """``lo–hi`` of the values as printed (``55 %`` where both ends print alike)."""
    def f(*xs: float) -> str:
        lo, hi = num(min(xs), digits), num(max(xs), digits)
        return (lo if lo == hi else f"{lo}–{hi}") + unit
    return f


def sum_of(digits: int) -> Callable[..., str]:
    """``a + b + c = total`` (the total of the unrounded values)."""
    return lambda *xs: " + ".join(num(x, digits) for x in xs) + f" = {num(sum(xs), digits)}"


def row(rel: str, **select: object) -> pd.Series:
    df = csv(rel)
    hit = df[np.logical_and.reduce([df[k] == v for k, v in select.items()])]
    assert len(hit) == 1, f"{rel}: {select} selects {len(hit)} rows, not 1"
    return hit.iloc[0]


@dataclass(frozen=True)
class Quote:
    id: str
    quote: str                     # the number(s) as the README prints them
    context: str                   # the README's text around it (whitespace collapsed); holds ``quote``
    source: str                    # the cells it comes from, as the failure message names them
    values: Callable[[], tuple]    # their values
    fmt: Callable[..., str]        # how the README prints them


def cells(qid: str, quote: str, context: str, rel: str, select: dict, columns: tuple[str, ...],
          fmt: Callable[..., str]) -> Quote:
    """A quote of one CSV row's cells."""
    sel = ", ".join(f"{k}={v}" for k, v in select.items())
    return Quote(qid, quote, context, f"{rel} [{sel}] {'/'.join(columns)}",
                 lambda: tuple(row(rel, **select)[c] for c in columns), fmt)


def stat(column: str) -> tuple[str, str, str]:
    return column, f"{column}_lo", f"{column}_hi"


ACC, BEST = stat("final_test_acc"), stat("best_test_acc")
A, T, C, D, DT, E = (f"{f}/table.csv" for f in ("fig_a_cpu", "fig_a_cpu_tuned", "fig_c_cpu", "fig_d_cpu",
                                                "fig_d_cpu_tuned", "fig_e_cpu"))
SPEEDUP = "fig_b_cpu/speedup.csv"
TUNE = "tune_lr_cpu/table.csv"
RULES = ("multi-krum", "bulyan", "coord-median")
NAMES = {"multi-krum": "Multi-Krum", "bulyan": "Bulyan", "coord-median": "the median"}
NAMES_CAP = {"multi-krum": "Multi-Krum", "bulyan": "Bulyan", "coord-median": "median"}
P_WORKERS, R_GROUP = 45, 3  # the CPU twins' cluster (README "Setting of every CPU twin")


def ratio_series(rule: str, folder: str = "fig_b_cpu") -> pd.Series:
    """Per seed: vanilla X's time to the target over DETOX-X's (``folder``/jobs.csv), in seed order."""
    jobs = csv(f"{folder}/jobs.csv")
    (column,) = [c for c in jobs.columns if TO_TARGET.fullmatch(c)]
    times = {d: jobs[jobs["label"] == f"{d}-{rule}"].set_index("seed")[column] for d in ("vanilla", "detox")}
    return (times["vanilla"] / times["detox"]).sort_index()


def claim1_row(rule: str, context: str, vanilla: str, detox: str, speedup: str, ratios: str,
               folder: str = "fig_b_cpu") -> list[Quote]:
    sel, rel, tag = {"rule": rule}, f"{folder}/speedup.csv", folder.removeprefix("fig_b_cpu")
    return [cells(f"claim1{tag}-{rule}-vanilla", vanilla, context, rel, sel, stat("vanilla_time"), ci(2)),
            cells(f"claim1{tag}-{rule}-detox", detox, context, rel, sel, stat("detox_time"), ci(2)),
            cells(f"claim1{tag}-{rule}-speedup", speedup, context, rel, sel, stat("speedup"), ci(2, "×")),
            Quote(f"claim1{tag}-{rule}-ratios", ratios, context,
                  f"{folder}/jobs.csv cluster_time_cpu_to_0.85 of vanilla-{rule} / detox-{rule}, seed by seed",
                  lambda: tuple(ratio_series(rule, folder)), span(2))]


def smallest_ratio() -> tuple:
    ratios = [(r, rule, seed) for rule in RULES for seed, r in ratio_series(rule).items()]
    return len(ratios), min(r for r, *_ in ratios) > 1, min(ratios)


def fmt_smallest(n: int, all_above: bool, smallest: tuple) -> str:
    r, rule, seed = smallest
    return f"All {n} per-seed ratios {'exceed' if all_above else 'do not all exceed'} 1 (the smallest: " \
           f"{num(r, 2)}, {NAMES[rule]} seed {seed})"


def fmt_established(*lows: float) -> str:
    """lows: speedup_lo per rule at lr 0.05, then at tuned rates."""
    def which(ls: tuple[float, ...]) -> str:
        rules = [NAMES[rule] for rule, lo in zip(RULES, ls, strict=True) if lo > 1]
        return "all three rules" if len(rules) == 3 else " and ".join(rules) + " only"
    return f"Established at 95 % for {which(lows[:3])} at the task's lr, over 10 seeds; at tuned learning rates " \
           f"for {which(lows[3:])}"


def fmt_contains_one(*bounds: float) -> str:
    rules = [NAMES[rule] for rule, lo, hi in zip(RULES, bounds[::2], bounds[1::2], strict=True) if lo <= 1 <= hi]
    return "no interval contains 1×" if not rules else "contains 1× for " + " and ".join(rules)


def fmt_t(*ns: int) -> str:
    assert len(set(ns)) == 1, f"speedup_n differs between rules: {ns}"
    return f"t = {stats.t.ppf(0.975, ns[0] - 1):.2f} at {ns[0] - 1} degrees of freedom"


def fmt_reached(*counts: int) -> str:
    reached, seeds = sum(counts[::2]), sum(counts[1::2])
    return "every seed of every method reached the target" if reached == seeds else \
        f"{reached} of {seeds} seeds reached the target"


def c_split(rule: str, phases: tuple[str, ...], family: str) -> Callable[[], tuple]:
    """fig_c_cpu/table.csv: the per-window CPU medians (ms) of ``phases`` of ``family-rule``."""
    return lambda: tuple(row(C, label=f"{family}-{rule}")[f"t_{p}_cpu_median_ms"] for p in phases)


def c_ratio(rule: str, phases: tuple[str, ...]) -> Callable[[], tuple]:
    """X's over DETOX-X's sum of ``phases`` (fig_c_cpu/table.csv; vanilla's vote is 0)."""
    return lambda: (sum(c_split(rule, phases, "vanilla")()), sum(c_split(rule, phases, "detox")()))


def fig_c_quotes(rule: str, context: str, detox: str, vanilla: str, ratio: str) -> list[Quote]:
    src = "fig_c_cpu/table.csv [label={}-" + rule + "] t_{{vote,aggregate,update}}_cpu_median_ms"
    pss = ("vote", "aggregate", "update")
    return [Quote(f"fig-c-{rule}-detox", detox, context, src.format("detox"), c_split(rule, pss, "detox"),
                  sum_of(2)),
            Quote(f"fig-c-{rule}-vanilla", vanilla, context, src.format("vanilla"),
                  c_split(rule, ("aggregate", "update"), "vanilla"), sum_of(2)),
            Quote(f"fig-c-{rule}-ratio", ratio, context, src.format("vanilla|detox") + ": vanilla sum / DETOX sum",
                  c_ratio(rule, pss), lambda v, d: f"({num(v / d, 1)}×)")]


def fig_e_detox(column: str, qs: range) -> Callable[[], tuple]:
    return lambda: tuple(row(E, label="detox-multi-krum", worker_fail=q)[column] for q in qs)


def expected(qs: range) -> Callable[[], tuple]:
    return lambda: tuple(F.expected_corrupted(P_WORKERS, q, R_GROUP) for q in qs)


def fmt_inside(*values: float) -> str:
    """values: for q = 2…5, (expected, lo, hi) each."""
    inside = [q for q, (e, lo, hi) in zip(range(2, 6), np.reshape(values, (-1, 3)), strict=True) if lo <= e <= hi]
    return "for q = " + ", ".join(map(str, inside)) + " the expectation lies inside its interval"


def fig_e_steps() -> tuple:
    jobs = csv("fig_e_cpu/jobs.csv")
    detox = jobs[jobs["label"] == "detox-multi-krum"]
    return int(row(E, label="detox-multi-krum", worker_fail=5)["corrupted_per_step_n"]), *sorted(set(detox["steps"]))


def vanilla_mean_diverges() -> tuple:
    rows = csv(E)[csv(E)["label"] == "vanilla-mean"]
    return tuple((int(q), s) for q, s in zip(rows["worker_fail"], rows["status"], strict=True))


def fmt_diverges(*rows: tuple) -> str:
    """rows: (q, status) of each vanilla-mean configuration; ``3 diverged``: every seed diverged."""
    diverged = sorted(q for q, s in rows if re.fullmatch(r"\d+ diverged", s))
    first = min(diverged, default=None)
    if first is not None and diverged == sorted(q for q, _ in rows if q >= first):
        return f"diverges for any q ≥ {first}"
    return f"diverges (every seed) at q = {diverged} only"


def fmt_overlap(*bounds: float) -> str:
    """bounds: per rule, vanilla lo, hi, DETOX lo, hi."""
    overlap = [rule for rule, (vl, vh, dl, dh) in zip(RULES, np.reshape(bounds, (-1, 4)), strict=True)
               if vl <= dh and dl <= vh]
    return "no vanilla/DETOX pair's intervals overlap" if not overlap else f"intervals overlap for {overlap}"


def d_bounds() -> tuple:
    out = []
    for rule in RULES:
        out += [row(D, label=f"{f}-{rule}")[c] for f in ("vanilla", "detox") for c in ACC[1:]]
    return tuple(out)


def d_bounds_of(rel: str) -> tuple:
    """Per rule: vanilla-X's final accuracy interval (lo, hi), then DETOX-X's."""
    return tuple(row(rel, label=f"{f}-{rule}")[c] for rule in RULES for f in ("vanilla", "detox") for c in ACC[1:])


def mean_gaps(rel: str) -> tuple:
    """Per rule: DETOX-X's mean final accuracy minus vanilla X's."""
    return tuple(row(rel, label=f"detox-{r}")["final_test_acc"] - row(rel, label=f"vanilla-{r}")["final_test_acc"]
                 for r in RULES)


def tuned_d_margins() -> tuple:
    """Per (rule, seed) of fig_d_cpu_tuned: (DETOX-X minus X final accuracy, rule, seed, X's, DETOX-X's)."""
    jobs = csv("fig_d_cpu_tuned/jobs.csv").set_index(["label", "seed"])["final_test_acc"]
    return tuple((jobs[(f"detox-{r}", s)] - jobs[(f"vanilla-{r}", s)], r, s, jobs[(f"vanilla-{r}", s)],
                  jobs[(f"detox-{r}", s)]) for r in RULES for s in sorted({s for _, s in jobs.index}))


def alie_picks(methods: tuple[str, ...]) -> Callable[[], tuple]:
    def values() -> tuple:
        picks = yaml.safe_load((RESULTS / "tune_lr_alie_cpu" / "lr_picks.yaml").read_text())["lr"]["fc-fashion"]
        return tuple(picks[m]["alie"] for m in methods)
    return values


def by_defence(rel: str, column: str, defence: str | None, **select: object) -> Callable[[], tuple]:
    def values() -> tuple:
        df = csv(rel)
        mask = df["label"].str.startswith(f"{defence}-") if defence else pd.Series(True, index=df.index)
        for k, v in select.items():
            mask &= df[k] == v
        return tuple(df.loc[mask, column])
    return values


def fmt_points(*values: float) -> str:
    """values: per Krum-family rule, vanilla - DETOX final accuracy in points, as the README's range lo–hi."""
    return span(1, " points ahead")(*values)


def krum_gaps() -> tuple:
    return tuple(100 * (row(A, label=f"vanilla-{r}", err_mode="rev_grad")["final_test_acc"]
                        - row(A, label=f"detox-{r}", err_mode="rev_grad")["final_test_acc"])
                 for r in ("multi-krum", "bulyan"))


def same_order() -> tuple:
    """Per rule under rev_grad: does vanilla end ahead of DETOX, at lr 0.05 (fig_a_cpu) and tuned?"""
    return tuple(row(rel, label=f"vanilla-{r}", err_mode="rev_grad")["final_test_acc"]
                 > row(rel, label=f"detox-{r}", err_mode="rev_grad")["final_test_acc"] for rel in (A, T) for r in RULES)


SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power(lr: float) -> str:
    """``2⁻⁴`` for 0.0625 (``analysis.tune.lr_label``'s 2^-4, as the README prints it)."""
    label = tune.lr_label(lr)
    return "2" + label.removeprefix("2^").translate(SUPERSCRIPT) if label.startswith("2^") else label


def picks() -> pd.DataFrame:
    return csv(TUNE)[csv(TUNE)["picked"]]


def pick(method: str, attack: str) -> Callable[[], tuple]:
    return lambda: (float(picks().set_index(["method", "err_mode"]).loc[(method, attack), "lr"]),)


def fmt_mode_pick(*lrs: float) -> str:
    (lr, count), *_ = pd.Series(lrs).value_counts().items()
    return f"{count} of the {len(lrs)} (method, attack) picks are {power(lr)} = {lr:g}"


def fmt_grid(*lrs: float) -> str:
    return f"{power(min(lrs))}…{power(max(lrs))}"


def fmt_jobs(*seeds: int) -> str:
    return f"{'one seed' if set(seeds) == {1} else f'seeds {sorted(set(seeds))}'}, {sum(seeds)} jobs"


def fmt_next_to(*lrs: float) -> str:
    """The most common pick, and whether it is the grid point nearest the task's lr 0.05."""
    mode = pd.Series(lrs).mode().iloc[0]
    grid = sorted(set(csv(TUNE)["lr"]))
    nearest = min(grid, key=lambda lr: abs(lr - 0.05))
    return f"{power(mode)} = {mode:g}, the grid point next to 0.05" if mode == nearest else f"{power(mode)}: not next"


def fmt_edge(lr: float) -> str:
    return f"picks {power(lr)}" + (" (the edge of the grid)" if lr == csv(TUNE)["lr"].max() else "")


def exponents(method: str) -> Callable[[], tuple]:
    """The fitted exponent of ``method``'s PS-step time in P (log-log least squares, as
    ``detox.bench_scaling.fit_exponents``), in the committed run and in scaling_run2."""
    def values() -> tuple:
        out = []
        for rel in ("fig_c_paper/scaling.csv", "fig_c_paper/scaling_run2/scaling.csv"):
            pts = csv(rel)[(csv(rel)["method"] == method) & csv(rel)["t_step"].notna()]
            out.append(stats.linregress(np.log(pts["workers"]), np.log(pts["t_step"])).slope)
        return tuple(out)
    return values


def all_exponents(family: str) -> Callable[[], tuple]:
    return lambda: tuple(b for rule in RULES for b in exponents(f"{family}-{rule}")())


def bulyan_ps_speedup(workers: int) -> Callable[[], tuple]:
    def values() -> tuple:
        out = []
        for rel in ("fig_c_paper/scaling.csv", "fig_c_paper/scaling_run2/scaling.csv"):
            at = csv(rel)[csv(rel)["workers"] == workers].set_index("method")["t_step"]
            out.append(at["vanilla-bulyan"] / at["detox-bulyan"])
        return tuple(out)
    return values


ITERATION = ("fig_c_paper/iteration.csv", "fig_c_paper/iteration_run2/iteration.csv")


def iteration(method: str, what: Callable[[pd.Series], float]) -> Callable[[], tuple]:
    """``what`` of ``method``'s row in both runs of ``bench_scaling iteration``."""
    return lambda: tuple(what(row(rel, method=method)) for rel in ITERATION)


def saving(rule: str, what: str) -> Callable[[], tuple]:
    """What DETOX-X saves against X per iteration (``detox.bench_scaling.savings``), both runs."""
    def values() -> tuple:
        out = []
        for rel in ITERATION:
            v, t = row(rel, method=f"vanilla-{rule}"), row(rel, method=f"detox-{rule}")
            ps_v, ps_t = (x["t_vote"] + x["t_aggregate"] + x["t_update"] for x in (v, t))
            out.append({"saved": v["t_step"] - t["t_step"], "step": v["t_step"] / t["t_step"],
                        "ps": ps_v / ps_t}[what])
        return tuple(out)
    return values


def every(rel: str, column: str) -> Callable[[], tuple]:
    return lambda: tuple(csv(rel)[column])


def share(x: pd.Series) -> float:
    return 100 * x["aggregate_share"]


def vote_share(x: pd.Series) -> float:
    return 100 * x["t_vote"] / x["t_step"]


SPEEDUP_T = "fig_b_cpu_tuned/speedup.csv"
CLAIM3 = ("vanilla Multi-Krum 0.625 [0.484, 0.766], Bulyan 0.558 [0.513, 0.602], median 0.572 [0.516, 0.628], "
          "signSGD 0.621 [0.587, 0.656] — against 0.832 [0.807, 0.857], 0.800 [0.736, 0.863] and 0.826 [0.819, 0.832] "
          "for DETOX-Multi-Krum, DETOX-Bulyan and DETOX-median")
CLAIM4 = ("0, 0, 0.037, 0.135, 0.266, 0.432 for q = 0…5 (mean of 3 seeds, 600 steps each; 95 % intervals [0.028, "
          "0.045], [0.117, 0.153], [0.214, 0.317], [0.320, 0.543] for q = 2…5) against 0, 0, 0.045, 0.134, 0.264, "
          "0.433 expected")
BULLET_A = ("vanilla Multi-Krum 0.876 [0.869, 0.884] vs DETOX 0.852 [0.841, 0.864], Bulyan 0.872 [0.869, 0.875] vs "
            "0.857 [0.841, 0.874], median 0.849 [0.831, 0.866] vs 0.862 [0.844, 0.880]")
CONSTANT = ("the vanilla coordinate median degrades steadily (best 0.77, final 0.576 [0.489, 0.663] over 600 steps, "
            "Figure A bottom right, n = 3)")
CONSTANT_DETOX = "DETOX-median degrades less (best 0.82, final 0.714 [0.669, 0.759])"
CLAIM3_TUNED = ("final vanilla Multi-Krum 0.663 [0.618, 0.708], Bulyan 0.750 [0.694, 0.806], median 0.638 [0.615, "
                "0.662], signSGD 0.618 [0.598, 0.639] against 0.838 [0.834, 0.843], 0.826 [0.820, 0.831] and 0.832 "
                "[0.826, 0.838] for DETOX (`fig_d_cpu_tuned/table.csv`, n = 10)")
TUNED = ("final vanilla Multi-Krum 0.696 [0.527, 0.865], Bulyan 0.762 [0.636, 0.888], median 0.668 [0.626, "
                "0.709], signSGD 0.600 [0.496, 0.703] against 0.838 [0.825, 0.851], 0.829 [0.808, 0.850] and 0.832 "
                "[0.800, 0.863] for DETOX (`fig_d_cpu_tuned/table.csv`)")
TUNED = ("vanilla median final 0.790 [0.783, 0.797] vs DETOX 0.783 [0.682, 0.883] (best 0.791 vs 0.824 [0.815, "
         "0.833])")
SHARES = ("vanilla Multi-Krum 55 %, Bulyan 67–69 %, coordinate median 50–51 %; with DETOX 36–38 %, 29–30 % and "
          "34–35 % (plus a 0.31–0.33 s vote, 13–14 %)")
SAVES = ("1.5–2.0 s with Bulyan (1.65–1.86× per iteration, 2.5–2.8× on the PS side), 0.2–0.4 s with Multi-Krum "
         "(1.07–1.17×) and 0.1–0.2 s with the median (1.04–1.07×)")
EXPONENTS = ("vanilla Multi-Krum 1.30 / 1.00, Bulyan 1.22 / 1.19, median 1.29 / 1.05 against DETOX 1.00 / 0.63, "
             "0.95 / 0.81, 1.16 / 0.79")

QUOTES: list[Quote] = [
    # "The clock": the CPU clock against the per-window wall-clock medians (Figures B and C, per job)
    Quote("clock-agree", "agree to 0.11 %", "in the committed run of Figure C, made at load about 1, "
          "`cluster_time_cpu` and `cluster_time_median` agree to 0.11 %", "fig_c_cpu/jobs.csv: "
          "max |cluster_time_cpu - cluster_time_median| / cluster_time_median",
          lambda: (((csv("fig_c_cpu/jobs.csv")["cluster_time_cpu"] - csv("fig_c_cpu/jobs.csv")["cluster_time_median"])
                    .abs() / csv("fig_c_cpu/jobs.csv")["cluster_time_median"]).max(),),
          lambda r: f"agree to {num(100 * r, 2)} %"),
    Quote("clock-b-load", "up to 22 % (72 % at tuned rates)", "there the wall-clock medians lie up to 22 % (72 % at "
          "tuned rates) above the CPU clock", "fig_b_cpu{,_tuned}/jobs.csv: max (cluster_time_median - "
          "cluster_time_cpu) / cluster_time_cpu",
          lambda: tuple(((j["cluster_time_median"] - j["cluster_time_cpu"]) / j["cluster_time_cpu"]).max()
                        for j in (csv("fig_b_cpu/jobs.csv"), csv("fig_b_cpu_tuned/jobs.csv"))),
          lambda a, b: f"up to {num(100 * a, 0)} % ({num(100 * b, 0)} % at tuned rates)"),
    # Claim 1: the speedup tables (fig_b_cpu{,_tuned}/speedup.csv and the per-seed times of jobs.csv)
    *[q for rule, a, b, c, d in (
        ("multi-krum", "1.00 [0.92, 1.07]", "0.68 [0.63, 0.74]", "1.47× [1.31, 1.63]", "1.22–1.85"),
        ("bulyan", "1.42 [1.36, 1.49]", "0.65 [0.59, 0.71]", "2.25× [1.95, 2.55]", "1.72–2.96"),
        ("coord-median", "1.37 [1.18, 1.55]", "0.42 [0.38, 0.46]", "3.31× [2.73, 3.90]", "2.41–5.14"))
      for q in claim1_row(rule, f"| {rule} | {a} | {b} | {c} | {d} |", a, b, c, d)],
    *[q for rule, a, b, c, d in (
        ("multi-krum", "0.69 [0.60, 0.78]", "0.64 [0.56, 0.73]", "1.11× [0.91, 1.31]", "0.69–1.47"),
        ("bulyan", "1.26 [1.15, 1.36]", "0.68 [0.61, 0.75]", "1.87× [1.62, 2.12]", "1.43–2.51"),
        ("coord-median", "1.28 [1.14, 1.41]", "0.49 [0.44, 0.53]", "2.68× [2.25, 3.10]", "1.66–3.73"))
      for q in claim1_row(rule, f"| {rule} | {a} | {b} | {c} | {d} |", a, b, c, d, "fig_b_cpu_tuned")],
    Quote("claim1-clock", "(`cluster_time_cpu`) to 85 % test accuracy",
          "Cluster CPU seconds (`cluster_time_cpu`) to 85 % test accuracy under `rev_grad`",
          f"{SPEEDUP} and {SPEEDUP_T} clock, target_acc",
          lambda: tuple(csv(s)[c].iloc[i] for c in ("clock", "target_acc") for s in (SPEEDUP, SPEEDUP_T)
                        for i in range(3)),
          lambda *v: f"(`{v[0]}`) to {100 * v[6]:.0f} % test accuracy" if len(set(v[:6])) == len(set(v[6:])) == 1
          else f"clocks and targets {v}"),
    Quote("claim1-established", "Established at 95 % for all three rules at the task's lr, over 10 seeds; at tuned "
          "learning rates for Bulyan and the median only", "**Established at 95 % for all three rules at the task's "
          "lr, over 10 seeds; at tuned learning rates for Bulyan and the median only.**",
          f"{SPEEDUP} and {SPEEDUP_T} speedup_lo per rule",
          lambda: tuple(row(s, rule=r)["speedup_lo"] for s in (SPEEDUP, SPEEDUP_T) for r in RULES), fmt_established),
    Quote("claim1-seeds", "10 seeds", "mean [95 % t-interval] over 10 seeds (`fig_b_cpu/speedup.csv`",
          f"{SPEEDUP} and {SPEEDUP_T} speedup_n", lambda: tuple(int(csv(s)["speedup_n"].iloc[i])
                                                            for s in (SPEEDUP, SPEEDUP_T) for i in range(3)),
          lambda *ns: f"{ns[0]} seeds" if len(set(ns)) == 1 else f"seeds {ns}"),
    Quote("claim1-reached", "every seed of every method reached the target",
          "load 1–4; every seed of every method reached the target)", f"{SPEEDUP} and {SPEEDUP_T} *_reached, *_seeds",
          lambda: tuple(row(s, rule=r)[f"{d}_{c}"] for s in (SPEEDUP, SPEEDUP_T) for r in RULES
                        for d in ("vanilla", "detox") for c in ("reached", "seeds")), fmt_reached),
    Quote("claim1-smallest", "All 30 per-seed ratios exceed 1 (the smallest: 1.22, Multi-Krum seed 4)",
          "All 30 per-seed ratios exceed 1 (the smallest: 1.22, Multi-Krum seed 4)",
          "fig_b_cpu/jobs.csv per-seed ratios of every rule", smallest_ratio, fmt_smallest),
    Quote("claim1-t", "t = 2.26 at 9 degrees of freedom", "(t = 2.26 at 9 degrees of freedom)",
          f"{SPEEDUP} speedup_n", lambda: tuple(int(row(SPEEDUP, rule=r)["speedup_n"]) for r in RULES), fmt_t),
    Quote("claim1-no-one", "no interval contains 1×", "no interval contains 1×",
          f"{SPEEDUP} speedup_lo/speedup_hi per rule",
          lambda: tuple(row(SPEEDUP, rule=r)[c] for r in RULES for c in ("speedup_lo", "speedup_hi")),
          fmt_contains_one),
    Quote("claim1-tuned-contains-one", "and the interval contains 1×. Bulyan and the median keep a speedup "
          "established at 95 %", "and the interval contains 1×. Bulyan and the "
          "median keep a speedup established at 95 %", f"{SPEEDUP_T} speedup_lo/speedup_hi per rule",
          lambda: tuple(row(SPEEDUP_T, rule=r)[c] for r in RULES for c in ("speedup_lo", "speedup_hi")),
          lambda *b: "and the interval contains 1×. Bulyan and the median keep a speedup established at 95 %"
          if fmt_contains_one(*b) == "contains 1× for Multi-Krum" else fmt_contains_one(*b)),
    Quote("claim1-tuned-favour-vanilla", "4 of its 10 seeds favour vanilla (ratios 0.69, 0.73, 0.92, 0.97)",
          "4 of its 10 seeds favour vanilla (ratios 0.69, 0.73, 0.92, 0.97)",
          "fig_b_cpu_tuned/jobs.csv per-seed ratios of Multi-Krum", lambda: tuple(ratio_series("multi-krum",
                                                                                             "fig_b_cpu_tuned")),
          lambda *r: (lambda low: f"{len(low)} of its {len(r)} seeds favour vanilla (ratios "
                                  f"{', '.join(num(x, 2) for x in low)})")(sorted(x for x in r if x < 1))),
    Quote("claim1-tuned-median-time", "0.49 s against 0.42 s", "takes longer to 85 % than lr 0.05 did: 0.49 s against "
          "0.42 s", f"{SPEEDUP_T} and {SPEEDUP} detox_time, coord-median",
          lambda: (row(SPEEDUP_T, rule="coord-median")["detox_time"], row(SPEEDUP, rule="coord-median")["detox_time"]),
          lambda a, b: f"{num(a, 2)} s against {num(b, 2)} s"),
    # Claim 1: Figure C's per-iteration split (fig_c_cpu/table.csv, per-window CPU medians)
    *fig_c_quotes("multi-krum", "vote + aggregate + update 0.42 + 0.69 + 0.36 = 1.47 ms against 5.30 + 0.41 = 5.71 ms "
                  "for vanilla Multi-Krum (3.9×)", "0.42 + 0.69 + 0.36 = 1.47", "5.30 + 0.41 = 5.71", "(3.9×)"),
    *fig_c_quotes("bulyan", "0.46 + 0.88 + 0.37 = 1.71 against 6.93 + 0.45 = 7.38 ms for Bulyan (4.3×)",
                  "0.46 + 0.88 + 0.37 = 1.71", "6.93 + 0.45 = 7.38", "(4.3×)"),
    *fig_c_quotes("coord-median", "0.40 + 0.18 + 0.34 = 0.93 against 3.62 + 0.39 = 4.01 ms for the median (4.3×)",
                  "0.40 + 0.18 + 0.34 = 0.93", "3.62 + 0.39 = 4.01", "(4.3×)"),
    Quote("fig-c-vote-aggregate", "4.8×, 5.2×, 6.2×", "Vote + aggregate alone, the PS step of issue #15: 4.8×, 5.2×, "
          "6.2×.", "fig_c_cpu/table.csv t_{vote,aggregate}_cpu_median_ms, vanilla sum / DETOX sum per rule",
          lambda: tuple(v / d for r in RULES for v, d in [c_ratio(r, ("vote", "aggregate"))()]),
          lambda *xs: ", ".join(num(x, 1) + "×" for x in xs)),
    # Claim 2 and "At the paper's scale" (fig_c_paper: bench_scaling's scaling and iteration runs)
    *[Quote(f"claim2-exponent-{m}", q, EXPONENTS, "fig_c_paper/scaling.csv and scaling_run2/scaling.csv: slope "
            f"of log t_step on log workers, {m}", exponents(m), listed(2, " / "))
      for m, q in (("vanilla-multi-krum", "1.30 / 1.00"), ("vanilla-bulyan", "1.22 / 1.19"),
                   ("vanilla-coord-median", "1.29 / 1.05"), ("detox-multi-krum", "1.00 / 0.63"),
                   ("detox-bulyan", "0.95 / 0.81"), ("detox-coord-median", "1.16 / 0.79"))],
    Quote("claim2-detox-range", "0.6–1.2", "fitted exponents of the PS step's time in P are 0.6–1.2 for DETOX-X and "
          "1.0–1.3 for vanilla X", "fig_c_paper scaling fits, DETOX methods, both runs", all_exponents("detox"),
          span(1)),
    Quote("claim2-vanilla-range", "1.0–1.3", "are 0.6–1.2 for DETOX-X and 1.0–1.3 for vanilla X, larger than DETOX's",
          "fig_c_paper scaling fits, vanilla methods, both runs", all_exponents("vanilla"), span(1)),
    Quote("claim2-larger", "larger than DETOX's for every rule in both runs",
          "larger than DETOX's for every rule in both runs", "fig_c_paper scaling fits, vanilla vs DETOX per rule/run",
          lambda: tuple(v > d for r in RULES for v, d in zip(exponents(f"vanilla-{r}")(), exponents(f"detox-{r}")(),
                                                             strict=True)),
          lambda *ok: "larger than DETOX's for every rule in both runs" if all(ok) else f"larger only: {ok}"),
    Quote("paper-bulyan-p15", "1.9×", "Bulyan 1.9× at P = 15 to 2.8–3.2× at P = 90",
          "fig_c_paper scaling t_step vanilla-bulyan / detox-bulyan at P = 15, both runs", bulyan_ps_speedup(15),
          span(1, "×")),
    Quote("paper-bulyan-p90", "2.8–3.2×", "Bulyan 1.9× at P = 15 to 2.8–3.2× at P = 90",
          "fig_c_paper scaling t_step vanilla-bulyan / detox-bulyan at P = 90, both runs", bulyan_ps_speedup(90),
          span(1, "×")),
    *[Quote(f"paper-share-{m}", q, SHARES, f"fig_c_paper iteration.csv (both runs) aggregate_share, {m}",
            iteration(m, share), span(0, " %"))
      for m, q in (("vanilla-multi-krum", "55 %"), ("vanilla-bulyan", "67–69 %"), ("vanilla-coord-median", "50–51 %"),
                   ("detox-multi-krum", "36–38 %"), ("detox-bulyan", "29–30 %"), ("detox-coord-median", "34–35 %"))],
    Quote("paper-vote-seconds", "0.31–0.33 s", SHARES, "fig_c_paper iteration.csv (both runs) t_vote, DETOX methods",
          lambda: tuple(t for r in RULES for t in iteration(f"detox-{r}", lambda x: x["t_vote"])()), span(2, " s")),
    Quote("paper-vote-share", "13–14 %", SHARES, "fig_c_paper iteration.csv (both runs) t_vote / t_step, DETOX",
          lambda: tuple(s for r in RULES for s in iteration(f"detox-{r}", vote_share)()), span(0, " %")),
    *[Quote(f"paper-saves-{r}-{what}", q, SAVES, f"fig_c_paper iteration.csv (both runs): {r} {what} "
            "(detox.bench_scaling.savings)", saving(r, what), span(digits, unit))
      for r, what, q, digits, unit in (
          ("bulyan", "saved", "1.5–2.0 s", 1, " s"), ("bulyan", "step", "1.65–1.86×", 2, "×"),
          ("bulyan", "ps", "2.5–2.8×", 1, "×"), ("multi-krum", "saved", "0.2–0.4 s", 1, " s"),
          ("multi-krum", "step", "1.07–1.17×", 2, "×"), ("coord-median", "saved", "0.1–0.2 s", 1, " s"),
          ("coord-median", "step", "1.04–1.07×", 2, "×"))],
    Quote("paper-sweep-shares", "(11–67 %)", "so its shares (11–67 %) are not a measurement of the methods",
          "fig_c_paper/table.csv aggregate_share", every("fig_c_paper/table.csv", "aggregate_share"),
          lambda *xs: "(" + span(0, " %")(*(100 * x for x in xs)) + ")"),
    Quote("paper-sweep-backward", "1.2–14 s", "the identical backward pass took 1.2–14 s depending on the load",
          "fig_c_paper/table.csv t_compute", every("fig_c_paper/table.csv", "t_compute"),
          lambda *xs: f"{min(xs):.1f}–{max(xs):.0f} s"),
    # Claim 3 (fig_d_cpu/table.csv)
    *[cells(f"claim3-{label}", q, CLAIM3, D, {"label": label}, ACC, ci(3))
      for label, q in (("vanilla-multi-krum", "0.625 [0.484, 0.766]"), ("vanilla-bulyan", "0.558 [0.513, 0.602]"),
                       ("vanilla-coord-median", "0.572 [0.516, 0.628]"), ("sign-sgd", "0.621 [0.587, 0.656]"),
                       ("detox-multi-krum", "0.832 [0.807, 0.857]"), ("detox-bulyan", "0.800 [0.736, 0.863]"),
                       ("detox-coord-median", "0.826 [0.819, 0.832]"))],
    Quote("claim3-n", "n = 3",
          "(Figure D, `fig_d_cpu/table.csv`, every method at lr 0.05, mean [95 % t-interval], n = 3)",
          f"{D} final_test_acc_n", every(D, "final_test_acc_n"),
          lambda *ns: f"n = {ns[0]}" if len(set(ns)) == 1 else f"n = {ns}"),
    Quote("claim3-no-overlap", "no vanilla/DETOX pair's intervals overlap", CLAIM3 + ": no vanilla/DETOX pair's "
          "intervals overlap", f"{D} final_test_acc_lo/hi, vanilla-X and detox-X", d_bounds, fmt_overlap),
    Quote("claim3-best", "best 0.71–0.79", "The vanilla rules peak early (best 0.71–0.79, mean over seeds)",
          f"{D} best_test_acc of the vanilla-* rows", by_defence(D, "best_test_acc", "vanilla"),
          lambda *xs: "best " + span(2)(*xs)),
    Quote("claim3-corrupted", "0.43", "(0.43 groups per step on average)",
          f"{D} corrupted_per_step of the detox-* rows", by_defence(D, "corrupted_per_step", "detox"), span(2)),
    # Claim 3 at tuned learning rates (fig_d_cpu_tuned/table.csv, picks of tune_lr_alie_cpu/lr_picks.yaml)
    *[cells(f"claim3-tuned-{label}", q, CLAIM3_TUNED, DT, {"label": label}, ACC, ci(3))
      for label, q in (("vanilla-multi-krum", "0.663 [0.618, 0.708]"), ("vanilla-bulyan", "0.750 [0.694, 0.806]"),
                       ("vanilla-coord-median", "0.638 [0.615, 0.662]"), ("sign-sgd", "0.618 [0.598, 0.639]"),
                       ("detox-multi-krum", "0.838 [0.834, 0.843]"), ("detox-bulyan", "0.826 [0.820, 0.831]"),
                       ("detox-coord-median", "0.832 [0.826, 0.838]"))],
    Quote("claim3-tuned-n", "n = 10", "for DETOX (`fig_d_cpu_tuned/table.csv`, n = 10)", f"{DT} final_test_acc_n",
          every(DT, "final_test_acc_n"), lambda *ns: f"n = {ns[0]}" if len(set(ns)) == 1 else f"n = {ns}"),
    Quote("claim3-tuned-picks", "vanilla Multi-Krum and median 2⁻⁶, Bulyan 2⁻⁷; DETOX-Multi-Krum and DETOX-median "
          "2⁻⁴, DETOX-Bulyan 2⁻⁶", "the vanilla rules pick smaller rates than DETOX (vanilla Multi-Krum and median "
          "2⁻⁶, Bulyan 2⁻⁷; DETOX-Multi-Krum and DETOX-median 2⁻⁴, DETOX-Bulyan 2⁻⁶)",
          "tune_lr_alie_cpu/lr_picks.yaml", alie_picks(("vanilla-multi-krum", "vanilla-coord-median", "vanilla-bulyan",
                                                         "detox-multi-krum", "detox-coord-median", "detox-bulyan")),
          lambda a, b, c, d, e, f: (f"vanilla Multi-Krum and median {power(a) if a == b else (a, b)}, "
                                    f"Bulyan {power(c)}; "
                                    f"DETOX-Multi-Krum and DETOX-median {power(d) if d == e else (d, e)}, "
                                    f"DETOX-Bulyan {power(f)}")),
    Quote("claim3-tuned-signsgd", "2⁻¹⁰",
          "signSGD's pick is the grid's smallest rate (2⁻¹⁰, next to its preset's 0.001)",
          "tune_lr_alie_cpu/lr_picks.yaml sign-sgd and tune_lr_alie_cpu/table.csv's smallest lr",
          lambda: (*alie_picks(("sign-sgd",))(), csv("tune_lr_alie_cpu/table.csv")["lr"].min()),
          lambda pick, smallest: power(pick) if pick == smallest else f"{pick} (smallest {smallest})"),
    Quote("claim3-tuned-seeds", "Bulyan seed 4, 0.8080 against 0.8100", "(the smallest margin: Bulyan seed 4, 0.8080 "
          "against 0.8100)",
          "fig_d_cpu_tuned/jobs.csv final_test_acc, detox-X minus vanilla-X per seed", tuned_d_margins,
          lambda *m: "DETOX behind in some pair" if min(x[0] for x in m) <= 0 else
          (lambda s: f"{NAMES_CAP[s[1]]} seed {s[2]}, {s[3]:.4f} against {s[4]:.4f}")(min(m))),
    Quote("claim3-tuned-gap", "21–25 points to 8–19", "the gap between the means shrinks from 21–25 points to 8–19",
          f"{D} and {DT} final_test_acc, detox-X minus vanilla-X", lambda: (*mean_gaps(D), *mean_gaps(DT)),
          lambda a, b, c, d, e, f: f"{span(0)(*(100 * x for x in (a, b, c)))} points to "
                                   f"{span(0)(*(100 * x for x in (d, e, f)))}"),
    Quote("claim3-tuned-apart", "No vanilla/DETOX pair's intervals overlap", "n = 10). No vanilla/DETOX pair's "
          "intervals overlap, and DETOX is ahead in each of the 30 (rule, seed) pairs",
          f"{DT} final_test_acc_lo/hi, vanilla-X and detox-X; fig_d_cpu_tuned/jobs.csv per seed",
          lambda: (*d_bounds_of(DT), len(tuned_d_margins()), min(m for m, *_ in tuned_d_margins()) > 0),
          lambda *b: ("No" if fmt_overlap(*b[:-2]).startswith("no") else "Some") + " vanilla/DETOX pair's intervals "
          f"overlap{'' if b[-1] else ' (DETOX behind in a pair)'}"),
    Quote("claim3-tuned-pairs", "each of the 30 (rule, seed) pairs", "DETOX is ahead in each of the 30 (rule, seed) "
          "pairs", "fig_d_cpu_tuned/jobs.csv final_test_acc, detox-X minus vanilla-X per seed", tuned_d_margins,
          lambda *m: f"each of the {len(m)} (rule, seed) pairs" if min(x[0] for x in m) > 0 else f"behind in {m}"),
    Quote("claim3-tuned-best", "(0.81–0.82) comes within 2–4 points of DETOX's (0.834–0.849)",
          "the vanilla rules' best accuracy (0.81–0.82) comes within 2–4 points of DETOX's (0.834–0.849)",
          f"{DT} best_test_acc", lambda: (*by_defence(DT, "best_test_acc", "vanilla")()[:3],
                                          *by_defence(DT, "best_test_acc", "detox")()),
          lambda a, b, c, d, e, f: f"({span(2)(a, b, c)}) comes within "
                                   f"{span(0)(*(100 * (x - y) for x, y in zip((d, e, f), (a, b, c), strict=True)))} "
                                   f"points of DETOX's ({span(3)(d, e, f)})"),
    # Claim 4 (fig_e_cpu/table.csv, DETOX-Multi-Krum; DETOX-median's points coincide: tested below)
    Quote("claim4-measured", "0, 0, 0.037, 0.135, 0.266, 0.432", CLAIM4,
          f"{E} [label=detox-multi-krum, worker_fail=0…5] corrupted_per_step",
          fig_e_detox("corrupted_per_step", range(6)), listed(3, zero=True)),
    Quote("claim4-intervals", "[0.028, 0.045], [0.117, 0.153], [0.214, 0.317], [0.320, 0.543]", CLAIM4,
          f"{E} [label=detox-multi-krum, worker_fail=2…5] corrupted_per_step_lo/hi",
          lambda: tuple(x for q in range(2, 6) for x in (fig_e_detox("corrupted_per_step_lo", range(q, q + 1))()[0],
                                                           fig_e_detox("corrupted_per_step_hi", range(q, q + 1))()[0])),
          lambda *xs: ", ".join(f"[{num(lo, 3)}, {num(hi, 3)}]" for lo, hi in zip(xs[::2], xs[1::2], strict=True))),
    Quote("claim4-expected", "0, 0, 0.045, 0.134, 0.264, 0.433", CLAIM4,
          "analysis.figures.expected_corrupted(45, q, 3), q = 0…5", expected(range(6)), listed(3, zero=True)),
    Quote("claim4-seeds-steps", "mean of 3 seeds, 600 steps each", CLAIM4,
          f"{E} corrupted_per_step_n and fig_e_cpu/jobs.csv steps, detox-multi-krum", fig_e_steps,
          lambda n, *steps: f"mean of {n} seeds, {steps[0]} steps each" if len(steps) == 1 else f"steps {steps}"),
    Quote("claim4-inside", "for q = 3, 4, 5 the expectation lies inside its interval",
          "for q = 3, 4, 5 the expectation lies inside its interval",
          f"{E} corrupted_per_step_lo/hi against expected_corrupted, q = 2…5",
          lambda: tuple(x for q in range(2, 6) for x in (expected(range(q, q + 1))()[0],
                                                           fig_e_detox("corrupted_per_step_lo", range(q, q + 1))()[0],
                                                           fig_e_detox("corrupted_per_step_hi", range(q, q + 1))()[0])),
          fmt_inside),
    Quote("claim4-q2", "for q = 2 it (0.0455) lies just above the interval (0.0367 [0.0284, 0.0449])",
          "for q = 2 it (0.0455) lies just above the interval (0.0367 [0.0284, 0.0449])",
          f"{E} [label=detox-multi-krum, worker_fail=2] corrupted_per_step(_lo, _hi); expected_corrupted(45, 2, 3)",
          lambda: (expected(range(2, 3))()[0], *fig_e_detox("corrupted_per_step", range(2, 3))(),
                   *fig_e_detox("corrupted_per_step_lo", range(2, 3))(),
                   *fig_e_detox("corrupted_per_step_hi", range(2, 3))()),
          lambda e, m, lo, hi: f"for q = 2 it ({num(e, 4)}) lies {'just above' if e > hi else 'not above'} the "
                               f"interval ({ci(4)(m, lo, hi)})"),
    # "Where our figures disagree": rev_grad, lr 0.05 (fig_a_cpu/table.csv)
    *[cells(f"bullet-a-{label}", q, BULLET_A, A, {"label": label, "err_mode": "rev_grad"}, ACC, ci(3))
      for label, q in (("vanilla-multi-krum", "0.876 [0.869, 0.884]"), ("detox-multi-krum", "0.852 [0.841, 0.864]"),
                       ("vanilla-bulyan", "0.872 [0.869, 0.875]"), ("detox-bulyan", "0.857 [0.841, 0.874]"),
                       ("vanilla-coord-median", "0.849 [0.831, 0.866]"),
                       ("detox-coord-median", "0.862 [0.844, 0.880]"))],
    Quote("bullet-a-range", "≈ 0.85–0.88", "keeps ≈ 0.85–0.88 final accuracy (Figure A, `fig_a_cpu/table.csv`, n = 3)",
          f"{A} [err_mode=rev_grad] final_test_acc", by_defence(A, "final_test_acc", None, err_mode="rev_grad"),
          lambda *xs: "≈ " + span(2)(*xs)),
    Quote("bullet-a-points", "1.5–2.4 points ahead", "vanilla Krum rules end 1.5–2.4 points ahead",
          f"{A} [err_mode=rev_grad] final_test_acc, vanilla - DETOX, Multi-Krum and Bulyan", krum_gaps, fmt_points),
    # under constant (fig_a_cpu/table.csv)
    cells("bullet-constant-vanilla-best", "best 0.77", CONSTANT, A,
          {"label": "vanilla-coord-median", "err_mode": "constant"}, ("best_test_acc",), lambda x: f"best {num(x, 2)}"),
    cells("bullet-constant-vanilla-final", "0.576 [0.489, 0.663]", CONSTANT, A,
          {"label": "vanilla-coord-median", "err_mode": "constant"}, ACC, ci(3)),
    cells("bullet-constant-detox-best", "best 0.82", CONSTANT_DETOX, A,
          {"label": "detox-coord-median", "err_mode": "constant"}, ("best_test_acc",), lambda x: f"best {num(x, 2)}"),
    cells("bullet-constant-detox-final", "0.714 [0.669, 0.759]", CONSTANT_DETOX, A,
          {"label": "detox-coord-median", "err_mode": "constant"}, ACC, ci(3)),
    # tuned learning rates (tune_lr_cpu/table.csv, fig_a_cpu_tuned/table.csv)
    Quote("tune-grid", "2⁻¹⁰…2⁻³", "`tune_lr_cpu` ran the original's grid (2⁻¹⁰…2⁻³, 200 iterations, one seed, 96 "
          "jobs, 13 min)", f"{TUNE} lr", every(TUNE, "lr"), fmt_grid),
    Quote("tune-jobs", "one seed, 96 jobs", "`tune_lr_cpu` ran the original's grid (2⁻¹⁰…2⁻³, 200 iterations, one "
          "seed, 96 jobs, 13 min)", f"{TUNE} seeds", every(TUNE, "seeds"), fmt_jobs),
    Quote("tune-next-to", "2⁻⁴ = 0.0625, the grid point next to 0.05",
          "7 of the 12 (method, attack) picks are 2⁻⁴ = 0.0625, the grid point next to 0.05",
          f"{TUNE} [picked] lr, and the lr grid", lambda: tuple(picks()["lr"]), fmt_next_to),
    Quote("tune-mode", "7 of the 12 (method, attack) picks are 2⁻⁴ = 0.0625",
          "7 of the 12 (method, attack) picks are 2⁻⁴ = 0.0625, the grid point next to 0.05",
          f"{TUNE} [picked] lr", lambda: tuple(picks()["lr"]), fmt_mode_pick),
    *[Quote(f"tune-vanilla-mk-{attack}", "picks 2⁻³ (the edge of the grid)",
            "vanilla Multi-Krum picks 2⁻³ (the edge of the grid)", f"{TUNE} [picked, vanilla-multi-krum, {attack}] lr",
            pick("vanilla-multi-krum", attack), fmt_edge) for attack in ("rev_grad", "constant")],
    Quote("tune-constant-medians", "vanilla 2⁻⁸ and DETOX 2⁻⁷",
          "under `constant` the coordinate medians pick far smaller rates, vanilla 2⁻⁸ and DETOX 2⁻⁷",
          f"{TUNE} [picked, err_mode=constant, *-coord-median] lr",
          lambda: (*pick("vanilla-coord-median", "constant")(), *pick("detox-coord-median", "constant")()),
          lambda v, d: f"vanilla {power(v)} and DETOX {power(d)}"),
    cells("tuned-vanilla-mk", "0.881 [0.872, 0.889]", "Multi-Krum 0.881 [0.872, 0.889] vs DETOX 0.852 [0.847, 0.857]",
          T, {"label": "vanilla-multi-krum", "err_mode": "rev_grad"}, ACC, ci(3)),
    cells("tuned-detox-mk", "0.852 [0.847, 0.857]", "Multi-Krum 0.881 [0.872, 0.889] vs DETOX 0.852 [0.847, 0.857]",
          T, {"label": "detox-multi-krum", "err_mode": "rev_grad"}, ACC, ci(3)),
    Quote("tuned-keeps-order", "keeps every comparison of the first bullet",
          "`fig_a_cpu_tuned` (3 seeds, each job at its pick) keeps every comparison of the first bullet",
          f"{A} and {T} [err_mode=rev_grad] final_test_acc: vanilla > DETOX per rule", same_order,
          lambda *o: "keeps every comparison of the first bullet" if o[:3] == o[3:] else f"flips: {o}"),
    cells("tuned-vanilla-median", "0.790 [0.783, 0.797]", TUNED, T,
          {"label": "vanilla-coord-median", "err_mode": "constant"}, ACC, ci(3)),
    cells("tuned-detox-median", "0.783 [0.682, 0.883]", TUNED, T,
          {"label": "detox-coord-median", "err_mode": "constant"}, ACC, ci(3)),
    cells("tuned-vanilla-median-best", "best 0.791", TUNED, T,
          {"label": "vanilla-coord-median", "err_mode": "constant"}, ("best_test_acc",), lambda x: f"best {num(x, 3)}"),
    cells("tuned-detox-median-best", "0.824 [0.815, 0.833]", TUNED, T,
          {"label": "detox-coord-median", "err_mode": "constant"}, BEST, ci(3)),
    # the vanilla mean (fig_e_cpu/table.csv)
    Quote("bullet-mean-diverges", "diverges for any q ≥ 1",
          "The vanilla mean diverges for any q ≥ 1 under `rev_grad` (Figure E), recorded as status `diverged`",
          f"{E} [label=vanilla-mean] worker_fail, status", vanilla_mean_diverges, fmt_diverges),
]


def test_quote_ids_are_unique() -> None:
    ids = [q.id for q in QUOTES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("q", QUOTES, ids=[q.id for q in QUOTES])
def test_readme_quote_is_the_csv_value(q: Quote) -> None:
    assert q.quote in q.context, f"{q.id}: the entry's quote {q.quote!r} is not in its own context {q.context!r}"
    assert q.context in readme(), f"docs/results/README.md no longer says {q.context!r} (quote {q.quote!r}, from " \
                                  f"{q.source}): update the README's quote or this entry"
    values = q.values()
    got = q.fmt(*values)
    assert got == q.quote, f"docs/results/README.md quotes {q.quote!r} (in {q.context!r}), but {q.source} = " \
                           f"{plain(values)} prints as {got!r}"


def test_claim4_detox_methods_measure_the_same_draws() -> None:
    """The README quotes DETOX-Multi-Krum's corrupted groups as every DETOX method's: their points coincide."""
    cols = list(stat("corrupted_per_step"))
    mk = csv(E)[csv(E)["label"] == "detox-multi-krum"].set_index("worker_fail")[cols]
    med = csv(E)[csv(E)["label"] == "detox-coord-median"].set_index("worker_fail")[cols]
    assert mk.equals(med), f"fig_e_cpu/table.csv: DETOX-Multi-Krum's corrupted_per_step {mk.to_dict()} differs " \
                           f"from DETOX-median's {med.to_dict()}"


@pytest.mark.parametrize("folder", [*FOLDERS, *TUNINGS])
def test_folder_table_job_counts(folder: str) -> None:
    lines = [line for line in README.read_text().splitlines() if line.startswith(f"| [`{folder}`]({folder}) |")]
    assert len(lines) == 1, f"docs/results/README.md's folder table has {len(lines)} rows for {folder}, not 1"
    said = lines[0].rstrip(" |").rsplit("|", 1)[-1].strip()
    if folder in TUNINGS:
        jobs, source = int(csv(f"{folder}/table.csv")["seeds"].sum()), f"{folder}/table.csv seeds (sum)"
    else:
        jobs, source = len(csv(f"{folder}/jobs.csv")), f"{folder}/jobs.csv rows"
    assert said == str(jobs), f"README folder table: {folder} has {said!r} jobs, but {source} = {jobs}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_setting_steps_and_seeds(folder: str) -> None:
    """"600 steps (100 for C), **seeds 0, 1 and 2** for every configuration (0–9 for B and the tuned D)" (README
    "Setting of every CPU twin")."""
    said = "600 steps (100 for C), **seeds 0, 1 and 2** for every configuration (0–9 for B and the tuned D)"
    assert said in readme()
    jobs = csv(f"{folder}/jobs.csv")
    steps = set(jobs.loc[jobs["status"] == "completed", "steps"])
    want = 100 if folder == "fig_c_cpu" else 600
    assert steps == {want}, f"README: {want} steps; {folder}/jobs.csv completed jobs ran {sorted(steps)}"
    seeds = jobs.groupby(KEY)["seed"].apply(lambda s: sorted(s))
    want_seeds = list(range(10)) if folder in ("fig_b_cpu", "fig_b_cpu_tuned", "fig_d_cpu_tuned") else [0, 1, 2]
    bad = seeds[seeds.map(lambda s: s != want_seeds)]
    assert bad.empty, f"README: seeds {want_seeds} for every configuration; {folder}/jobs.csv: {bad.to_dict()}"
    assert set(jobs["status"]) <= set(FINISHED), f"{folder}/jobs.csv: unfinished jobs {set(jobs['status'])}"


def test_scaling_fits_are_the_committed_ones() -> None:
    """The exponents the Claim 2 quotes recompute are the ones bench_scaling wrote (scaling.json's ``fits``)."""
    for rel in ("fig_c_paper/scaling.json", "fig_c_paper/scaling_run2/scaling.json"):
        fits = json.loads((RESULTS / rel).read_text())["fits"]
        index = 0 if "run2" not in rel else 1
        for method, fit in fits.items():
            mine = exponents(method)()[index]
            assert math.isclose(mine, fit["b"], rel_tol=1e-9), f"{rel} fits[{method}].b = {fit['b']!r}, the " \
                                                               f"scaling CSV's points give {mine!r}"

