"""``python -m analysis.report MULTIRUN_DIR [--out DIR]``: every figure (PNG + PDF) and the tables (Markdown + CSV):
``table.md``/``table.csv`` one row per configuration aggregated over seeds, ``jobs.csv`` one row per job.

Which figures a sweep gets follows its ``figure`` setting (the sweeps in ``sweeps/`` set it); an ad-hoc sweep
gets the curves, the time split and the accuracy bars. Only finished jobs (completed or diverged) enter the numbers;
a figure whose data no finished job has is skipped with one line saying why. Everything is computed before anything
is written, and written into a temporary folder next to ``--out`` that then takes its place in one step (``publish``):
a failure, or a kill at any moment, leaves ``--out`` as it was or as this report made it, never a mix. An existing
``--out`` keeps its files that no report writes; an earlier report's files that this one does not write (a figure it
now skips) go. Two reports into one ``--out`` at once take turns. Bad input is one line and exit 2, nothing written:
among it an ``--out`` that is the sweep root (or holds it), one of its job folders or any folder holding a folder,
jobs that aim at different ``target_acc`` without ``--target``, and a Figure B root where one side of a speedup
pair (vanilla X or DETOX-X of one rule, attack and q) holds two configurations the labels do not tell apart.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import math
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.load import (
    CPU_MEDIAN_PHASES,
    MEDIAN_PHASES,
    PHASES,
    SURROGATE,
    load_metrics,
    load_runs,
    one_line,
    sweep_root,
    time_column,
    time_to_target,
    warn,
)
from analysis.stats import aggregate, fmt
from detox.results import FINISHED

JOB_COLUMNS = ["job", "label", "seed", "err_mode", "worker_fail", "status", "final_test_acc", "best_test_acc",
               "steps", "wall_time", "cluster_time", "cluster_time_median", "cluster_time_cpu", "time_to_target",
               *PHASES, *MEDIAN_PHASES, "t_step_p10", "t_step_p90", *CPU_MEDIAN_PHASES, "corrupted_per_step"]
# the values a configuration's row aggregates over its seeds (times per phase in ms)
VALUES = ["final_test_acc", "best_test_acc", "cluster_time", "cluster_time_median", "cluster_time_cpu",
          *MEDIAN_PHASES, *CPU_MEDIAN_PHASES, "corrupted_per_step"]


# every file a report can write (the figures of every family, as PNG and PDF, and the tables): what it replaces in an
# earlier report's --out, a figure this one skips included; any other file there stays
FIGURE_NAMES = ("fig_a_time", "fig_a_iter", "fig_b", "fig_c", "fig_d", "fig_e", "fig_theory")
REPORT_FILES = frozenset({*(f"{name}.{ext}" for name in FIGURE_NAMES for ext in ("png", "pdf")),
                          "table.md", "table.csv", "jobs.csv", "speedup.csv"})


class ReportError(ValueError):
    """Bad input (a root with nothing to report, an unusable --out or --target): one line, exit 2, nothing written."""


def check_target(target: float, what: str = "--target") -> float:
    """A target test accuracy is a fraction in (0, 1]: NaN never compares true, so nothing would ever reach it."""
    if not (math.isfinite(target) and 0 < target <= 1):
        raise ReportError(f"{what} {target:g}: a target test accuracy lies in (0, 1], e.g. 0.85")
    return target


def check_out(out: Path, root: Path | None = None) -> None:
    """Refuse an output folder that cannot be one before any work (the nearest existing path decides): a file, the
    sweep root or a folder holding it, one of its job folders, a folder that holds a folder (``publish``)."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ReportError(f"--out {out}: {path} exists and is not a folder")
            break
    if root is not None and root.is_dir():
        real_out, real_root = out.resolve(), root.resolve()
        if real_root == real_out or real_out in real_root.parents:
            raise ReportError(f"--out {out}: the sweep root {root} or a folder holding it; the report replaces its "
                              f"--out as a whole (default: <sweep>/report)")
        if real_out.parent == real_root and any((out / f).exists() for f in ("summary.json", "resolved_config.yaml",
                                                                              ".hydra")):
            raise ReportError(f"--out {out}: a job folder of the sweep; the report replaces its --out as a whole")
    if out.is_dir():
        check_files_only(out)


def check_files_only(out: Path) -> None:
    """An --out that is replaced as a whole holds files only: a folder in it would be copied link by link, and
    writes into it meanwhile lost (the sweep root, a home folder)."""
    with os.scandir(out) as entries:
        folder = next((e.name for e in entries if e.is_dir(follow_symlinks=False)), None)
    if folder is not None:
        raise ReportError(f"--out {out}: holds the folder {folder}; the report replaces its --out as a whole: give a "
                          f"new folder or an earlier report's")


def sweep_target(runs: pd.DataFrame) -> float | None:
    """The sweep's own target accuracy (``target_acc`` of its finished jobs), if it is an accuracy. Jobs that aim at
    different ones (two sweeps in one root) are refused: one target for all would misstate the others' times."""
    values = runs.loc[runs["status"].isin(FINISHED), "target_acc"].dropna().astype(float)
    bad = values[~((values > 0) & (values <= 1))]
    if len(bad):
        warn(f"target_acc {bad.iloc[0]:g} in the summary of job {bad.index[0]} is no accuracy; ignored")
    good = values[(values > 0) & (values <= 1)]
    if good.nunique() > 1:
        other = good[good != good.iloc[0]]
        raise ReportError(f"jobs {good.index[0]} and {other.index[0]} aim at different target accuracies "
                          f"(target_acc {good.iloc[0]:g} and {other.iloc[0]:g}): give one with --target")
    return float(good.iloc[0]) if len(good) else None


def check_families(root: Path, runs: pd.DataFrame) -> None:
    """One warning where jobs of several figure families share a root: every family's figures use every job."""
    families = sorted({f for f in runs["figure"] if isinstance(f, str)})
    if len(families) > 1:
        warn(f"{root}: jobs of several figure families (figure = {', '.join(families)}): each family's figures and "
             f"tables are drawn from every job of the root")


def check_reportable(root: Path, runs: pd.DataFrame) -> None:
    """A root without a finished job has no number to report."""
    if runs.empty:
        raise ReportError(f"{root}: no job folders; is this a multirun root?")
    if not runs["status"].isin(FINISHED).any():
        counts = ", ".join(f"{n} {k}" for k, n in runs["status"].value_counts().items())
        raise ReportError(f"{root}: no finished (completed or diverged) job ({counts}): nothing to report")


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
    # only finished jobs' numbers: a killed or failed job counts in ``seeds`` and ``status``, never in n
    data.loc[~data["status"].isin(FINISHED), values] = np.nan
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
        # a "|" or a line break (a folder name, a hand-edited label) would end the cell or the row
        return "" if v is None else " ".join(str(v).replace("|", "/").splitlines())

    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def draw_figures(runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> dict[str, plt.Figure]:
    """Every figure of the sweep's families that has data; one line for each one skipped."""
    drawn: dict[str, plt.Figure] = {}
    try:
        for name, draw in _figures(runs, metrics, target).items():
            try:
                drawn[name] = draw()
            except F.NothingToDraw as why:
                warn(f"{name} skipped: {why}")
    except BaseException:  # a figure that fails takes the ones drawn before it along (a notebook keeps running)
        for fig in drawn.values():
            plt.close(fig)
        raise
    return drawn


def tables(root: Path, runs: pd.DataFrame, metrics: pd.DataFrame, target: float | None) -> dict[str, str]:
    """File name -> text of every table: table.csv/.md, jobs.csv and, for Figure B's sweeps, speedup.csv."""
    tab = table(runs, metrics, target)
    jobs = jobs_table(runs, metrics, target)
    md = [f"# {root.name}\n", "Per configuration: mean ± sd over the finished seeds (n = those with a value; a killed, "
          "failed or running job counts in `seeds` and `status` only); 95 % t-intervals in `table.csv` (`_lo`, "
          "`_hi`); times per phase are per-window medians in ms. One row per job: `jobs.csv`.\n",
          to_markdown(readable(tab))]
    out = {"table.csv": tab.to_csv(index=False), "jobs.csv": jobs.to_csv(index=False)}
    if target is not None and (runs["figure"] == "B").any():
        sp = F.speedups(runs, metrics, target)
        out["speedup.csv"] = sp.to_csv(index=False)
        if len(sp):
            md += [f"\n## Speedup to {target:.0%} test accuracy ({F.X_LABELS.get(sp['clock'].iloc[0], '')})\n",
                   to_markdown(speedup_text(sp))]
    out["table.md"] = "\n".join(md)
    return out


def utf8(text: str) -> str:
    """``text`` as a UTF-8 file can hold it: a lone surrogate (a byte of a folder name that is not UTF-8, as Python
    reads it) written as ``\\xNN``, its byte (``\\uNNNN`` for one no byte gave)."""
    def escape(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"

    return SURROGATE.sub(escape, text)


def _write(path: Path, content: str | plt.Figure) -> None:
    if isinstance(content, str):
        path.write_text(utf8(content), encoding="utf-8")
    else:
        content.savefig(path, dpi=120)


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Held while a report (or ``analysis.tune``) moves its files into ``out``: two of them into one ``--out`` at
    once each leave their files whole, one after the other, never a mix (a lock on the folder above it, which the
    OS releases on any exit, kill included; no file left)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _tmp_name(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.([0-9]+)\.[0-9a-f]{{8}}\.tmp")


def _clear_leftovers(out: Path) -> None:
    """Remove the temporary folders a publish into ``out`` that was killed left next to it (their process is gone;
    a live one's, still being written, stays). Called under ``out_lock``."""
    pattern = _tmp_name(out)
    with os.scandir(out.parent) as entries:
        for e in entries:
            if (m := pattern.fullmatch(e.name)) and e.is_dir(follow_symlinks=False) and not _alive(int(m[1])):
                shutil.rmtree(e.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # no process has that number
        return False
    except PermissionError:  # another user's
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (Linux's renameat2 with RENAME_EXCHANGE): at every moment ``b``
    is the one or the other, whole. False where the system or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EBUSY):
        return False  # (EXDEV, EBUSY: --out is a mount point)
    raise OSError(err, os.strerror(err), str(b))


def _carry(src: Path, dst: Path) -> None:
    """Put ``src`` (a file of --out that no report writes) into the new folder as well: a hard link (the same file,
    no copy), a copy where the file system links none, a symbolic link as itself."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if not stat.S_ISREG(src.lstat().st_mode):
            raise
        shutil.copy2(src, dst)


def _rename_unless_made(tmp: Path, out: Path) -> bool:
    """Move the whole report folder into place; False where ``out`` exists (made meanwhile by another program)."""
    try:
        tmp.rename(out)
    except OSError:
        if out.is_dir():
            return False
        raise
    return True


def publish(out: Path, files: dict[str, str | plt.Figure], replaces: Iterable[str] = ()) -> list[Path]:
    """Write ``files`` into a temporary folder next to ``out``, then put it in ``out``'s place in one step: a reader,
    a kill at any moment or a failure sees ``out`` as it was or as this report made it, never a mix. An earlier
    ``out``'s files stay, except those named in ``files`` or ``replaces`` (the files this tool can write: an
    earlier run's that this one did not write would not belong with it). ``out`` holds files only (folders are
    refused: ``check_files_only``). Two publishes into one ``out`` take turns (``out_lock``). Where the file system
    cannot swap two folders in one step (renameat2), the files move one by one, as before."""
    out = out.resolve() if out.is_symlink() else out  # (the folder it names is replaced, not the link)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # hidden: no job folder
    tmp.mkdir()
    try:
        for name, content in files.items():
            _write(tmp / name, content)
        with out_lock(out):
            _clear_leftovers(out)
            if not _rename_unless_made(tmp, out):
                _replace(out, tmp, files, set(files) | set(replaces))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in files]


def _replace(out: Path, tmp: Path, files: Iterable[str], replaced: set[str]) -> None:
    """``out`` exists: carry its other files into ``tmp``, then swap the two (or move the files one by one)."""
    check_files_only(out)
    with os.scandir(out) as entries:
        kept = [e.name for e in entries if e.name not in replaced]
    for name in kept:
        _carry(out / name, tmp / name)
    if _exchange(tmp, out):
        return  # (tmp now holds the earlier folder, removed by the caller)
    for name in files:
        os.replace(tmp / name, out / name)
    for name in replaced - set(files):
        (out / name).unlink(missing_ok=True)


def report(root: Path, out: Path, target: float | None = None) -> list[Path]:
    """Write the sweep's figures and tables into ``out``; return the written paths. Everything is computed first:
    bad input raises ReportError (or OSError) with nothing written."""
    check_out(out, sweep_root(root))
    runs = load_runs(root)
    check_reportable(root, runs)
    check_families(root, runs)
    metrics = load_metrics(root, runs)
    target = target if target is not None else sweep_target(runs)
    try:
        figures = draw_figures(runs, metrics, target)
    except F.Ambiguous as err:  # two sweeps' configurations that a figure would pair as one
        raise ReportError(str(err)) from None
    try:
        files: dict[str, str | plt.Figure] = {f"{name}.{ext}": fig for name, fig in figures.items()
                                              for ext in ("png", "pdf")}
        files.update(tables(root, runs, metrics, target))
        written = publish(out, files, REPORT_FILES)
    except F.Ambiguous as err:
        raise ReportError(str(err)) from None
    finally:
        for fig in figures.values():
            plt.close(fig)
    print(utf8(f"wrote {out}: {', '.join(p.name for p in written)} ({runs['config'].nunique()} configurations, "
               f"{len(runs)} jobs)"), flush=True)
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
        variant = {"variant": r.variant} if "variant" in sp.columns else {}  # (only where a root needs one)
        rows.append({"err_mode": r.err_mode, "rule": r.rule, **variant, "target_acc": r.target_acc,
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
        target = None if args.target is None else check_target(args.target)
        report(args.sweep, args.out or args.sweep / "report", target)
    except (ReportError, OSError) as err:
        print(f"analysis.report: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
