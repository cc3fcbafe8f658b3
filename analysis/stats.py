"""Aggregation over seeds: mean, standard deviation, count and a 95 % Student-t interval.

Every figure and table shows a configuration (same config, any seed) as the mean over its seeds with the 95 %
t-interval ``mean ± t(0.975, n−1)·sd/√n`` and says how many seeds it holds; with n = 1 there is no interval
(and the figure or table says n = 1), with n = 0 nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float      # sample standard deviation (ddof = 1); NaN for n < 2
    n: int         # finite values the statistic holds
    lo: float      # 95 % t-interval; NaN for n < 2
    hi: float

    def text(self, digits: int = 3) -> str:
        """``0.853 ± 0.004 (n=3)``; ``0.853 (n=1)``; ``""`` for n = 0."""
        return fmt(self.mean, self.sd, self.n, digits)


def interval(values: Iterable[float | None]) -> Stat:
    """Mean, sd, n and the 95 % t-interval of the finite values (None and NaN are left out)."""
    x = np.array([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Stat(np.nan, np.nan, 0, np.nan, np.nan)
    # in units of a power of two near the largest magnitude (exact: the same bits as unscaled, where that neither
    # overflows nor underflows): a sum of values near the float maximum would overflow to inf, the squares of tiny
    # ones (1e-300) underflow to a standard deviation of 0
    e = int(np.frexp(np.abs(x).max())[1])
    y = np.ldexp(x, -e)

    def unscaled(v: float) -> float:
        with np.errstate(over="ignore"):  # an interval reaching past the float maximum: its end is inf
            return float(np.ldexp(v, e))

    mean = unscaled(y.mean())
    if n == 1:
        return Stat(mean, np.nan, 1, np.nan, np.nan)
    sd_y = float(y.std(ddof=1))
    if sd_y == 0.0:  # identical seeds (e.g. a deterministic count): a zero-width interval, not NaN
        return Stat(mean, 0.0, n, mean, mean)
    lo, hi = stats.t.interval(LEVEL, n - 1, loc=float(y.mean()), scale=sd_y / np.sqrt(n))
    return Stat(mean, unscaled(sd_y), n, unscaled(lo), unscaled(hi))


def fmt(mean: float, sd: float, n: int, digits: int = 3) -> str:
    """``mean ± sd (n=k)`` with ``digits`` significant digits; no ``± sd`` for n = 1, empty for n = 0."""
    if n == 0 or not np.isfinite(mean):
        return ""
    if n == 1 or not np.isfinite(sd):
        return f"{mean:.{digits}g} (n={n})"
    if sd <= 1e-9 * abs(mean):  # identical up to float round-off
        sd = 0.0
    return f"{mean:.{digits}g} ± {sd:.2g} (n={n})"


def aggregate(df: pd.DataFrame, by: str | list[str], columns: Iterable[str]) -> pd.DataFrame:
    """One row per group of ``by`` (in order of appearance): for each column ``c`` of ``columns`` the columns
    ``c`` (the mean), ``c_sd``, ``c_n``, ``c_lo``, ``c_hi``; plus ``n`` (rows in the group)."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, sub in df.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n"] = len(sub)
        for c in columns:
            s = interval(sub[c])
            row.update({c: s.mean, f"{c}_sd": s.sd, f"{c}_n": s.n, f"{c}_lo": s.lo, f"{c}_hi": s.hi})
        rows.append(row)
    return pd.DataFrame(rows)
