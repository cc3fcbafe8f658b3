"""Compiled CPU kernels (numba) for the coordinate-wise order statistics of the robust rules.

Per coordinate, coord-median, trimmed-mean and Bulyan need the mean of the sorted values at positions
[lo, hi). Sorting 45 values for each of 11 million coordinates is what makes these rules slow in numpy
(np.median, np.sort) and torch (torch.sort); here a block of coordinates is copied into a cache-resident
buffer and put through a fixed selection network (Batcher's sorting network, pruned to what decides the
[lo, hi) positions). Each compare-exchange runs across the whole block at once: min and max of two buffer
rows written into two free rows (no aliasing, so LLVM vectorises it). Blocks run in parallel.

Bulyan's literature average (the beta values closest to the median) needs every position sorted: the full
network, then per coordinate the cheapest window of beta consecutive sorted values (``closest_mean``).
Weiszfeld's weighted sums have a float64-accumulating twin (``weighted_sum64``).

NaN sorts as +inf: it becomes an order statistic only if more than the tolerated rows carry it.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange

# coordinates per block: (m + 2) x 256 float32 rows stay in L1/L2 for the m the rules see
BLOCK = 256
# columns per block of the row-streaming kernels (sign votes, weighted sums): a 16 KiB accumulator
_COLS = 4096
# no "nnan"/"ninf": the loader must see NaN to turn it into +inf, and +inf is a legitimate value
_FAST = {"nsz", "arcp", "contract", "reassoc"}
# below this many elements to read a kernel runs on one thread: waking the pool costs more than it saves
_SERIAL_ELEMS = 1 << 16


def _rows(x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The row indices a kernel reads (int64; all rows of ``x`` when None)."""
    if rows is None:
        return np.arange(x.shape[0], dtype=np.int64)
    return rows if rows.dtype == np.int64 and rows.flags.c_contiguous else np.ascontiguousarray(rows, np.int64)


def _threads(threads: int, x: np.ndarray, rows: np.ndarray | None) -> int:
    """Threads for a kernel: ``threads`` within numba's pool, one for a small read."""
    n = x.shape[0] if rows is None else rows.shape[0]
    if n * x.shape[1] < _SERIAL_ELEMS:
        return 1
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


def _batcher(m: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for the next power of two >= m; compare-exchanges touching a padding
    input (which would hold +inf and never move) are dropped."""
    p = 1
    while p < m:
        p *= 2
    pairs: list[tuple[int, int]] = []
    size = 1
    while size < p:
        k = size
        while k >= 1:
            for j in range(k % size, p - k, 2 * k):
                for i in range(min(k, p - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * size) == b // (2 * size) and b < m:
                        pairs.append((a, b))
            k //= 2
        size *= 2
    return pairs


@lru_cache(maxsize=256)
def selection_network(m: int, lo: int, hi: int) -> np.ndarray:
    """A network that leaves, on positions [lo, hi), the multiset of sorted values lo..hi-1 of m inputs.

    From the full sorting network, repeatedly drop a compare-exchange that is the last to touch both of its
    wires when both wires end in the same class (below lo, inside [lo, hi), from hi on): it cannot change
    which values end in which class. Returns a (k, 2) int64 array.
    """

    def cls(w: int) -> int:
        return 0 if w < lo else (1 if w < hi else 2)

    pairs = _batcher(m)
    changed = True
    while changed:
        last = {}
        for idx, (a, b) in enumerate(pairs):
            last[a] = last[b] = idx
        keep = [(a, b) for idx, (a, b) in enumerate(pairs)
                if not (last[a] == idx and last[b] == idx and cls(a) == cls(b))]
        changed = len(keep) != len(pairs)
        pairs = keep
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@njit(fastmath=_FAST, inline="always", cache=True)
def _minmax(a, b, lo, hi, width):  # pragma: no cover - compiled
    for j in range(width):
        u = a[j]
        w = b[j]
        lo[j] = u if u < w else w
        hi[j] = w if u < w else u


@njit(fastmath=_FAST, cache=True)
def _network_block(x, rows, start, width, net, buf):  # pragma: no cover - compiled
    """Gather columns [start, start + width) of x[rows] into buf (NaN as +inf) and run the compare-exchange
    network on them; returns (pos, free): logical row -> physical row of buf, and one free row of buf."""
    m = rows.shape[0]
    for r in range(m):
        # slices indexed from 0 (here and below): numba drops its negative-index handling, so the loops vectorise
        src = x[rows[r], start : start + width]
        dst = buf[r]
        for j in range(width):
            v = src[j]
            dst[j] = np.inf if v != v else v
    # logical row -> physical row; rows m and m+1 start free: a compare-exchange writes into the free pair
    pos = np.arange(m)
    f1 = m
    f2 = m + 1
    for c in range(net.shape[0]):
        i = net[c, 0]
        k = net[c, 1]
        pi = pos[i]
        pk = pos[k]
        _minmax(buf[pi], buf[pk], buf[f1], buf[f2], width)
        pos[i] = f1
        pos[k] = f2
        f1 = pi
        f2 = pk
    return pos, f1


@njit(fastmath=_FAST, cache=True)
def _block(x, rows, start, width, net, lo, hi, buf, out):  # pragma: no cover - compiled
    pos, f1 = _network_block(x, rows, start, width, net, buf)
    # sum the kept rows row by row (contiguous, vectorised) into the first free row
    acc = buf[f1]
    first = buf[pos[lo]]
    for j in range(width):
        acc[j] = first[j]
    for r in range(lo + 1, hi):
        row = buf[pos[r]]
        for j in range(width):
            acc[j] += row[j]
    scale = 1.0 / (hi - lo)
    dst = out[start : start + width]
    for j in range(width):
        dst[j] = acc[j] * scale


@njit(parallel=True, cache=True)
def _middle_mean(x, rows, net, lo, hi, block, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.empty(d, dtype=x.dtype)
    nblocks = (d + block - 1) // block
    for t in prange(nthreads):
        buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)  # one scratch buffer per thread
        for b in range(t, nblocks, nthreads):
            start = b * block
            _block(x, rows, start, min(block, d - start), net, lo, hi, buf, out)
    return out


def middle_mean(x: np.ndarray, rows: np.ndarray, lo: int, hi: int, threads: int) -> np.ndarray:
    """Per coordinate, the mean of the sorted values at positions [lo, hi) among ``x[rows]``.

    ``x``: C-contiguous float32 (n, d); ``rows``: int64 row indices; runs on ``threads`` threads.
    """
    net = selection_network(int(rows.shape[0]), int(lo), int(hi))
    return _middle_mean(x, _rows(x, rows), net, int(lo), int(hi), BLOCK, _threads(threads, x, rows))


@lru_cache(maxsize=256)
def sorting_network(m: int) -> np.ndarray:
    """Batcher's full sorting network for m inputs, a (k, 2) int64 array."""
    return np.asarray(_batcher(m), dtype=np.int64).reshape(-1, 2)


@njit(fastmath=_FAST, cache=True)
def _closest_block(x, rows, start, width, net, beta, buf, med, first, out):  # pragma: no cover - compiled
    m = rows.shape[0]
    pos, f1 = _network_block(x, rows, start, width, net, buf)  # the full network: every position sorted
    hi_mid = buf[pos[m // 2]]
    lo_mid = buf[pos[(m - 1) // 2]]
    for j in range(width):  # float64: the median of two float32 values and the distances below are exact
        med[j] = 0.5 * (np.float64(lo_mid[j]) + np.float64(hi_mid[j]))
        first[j] = 0
    # The window [s, s + beta) of sorted values costs sum |v - med|; moving it one right changes the cost by
    # |v[s + beta] - med| - |v[s] - med|, which is <= 0 left of the median and non-decreasing across it, so the
    # leftmost cheapest window starts right after the last strictly improving move.
    for s in range(m - beta):
        a = buf[pos[s]]
        b = buf[pos[s + beta]]
        for j in range(width):
            if abs(np.float64(b[j]) - med[j]) < abs(np.float64(a[j]) - med[j]):
                first[j] = s + 1
    acc = buf[f1]  # a free row
    for j in range(width):
        acc[j] = 0
    for t in range(m):  # in ascending order, the values inside each column's window
        v = buf[pos[t]]
        for j in range(width):
            k = t - first[j]
            acc[j] += v[j] if k >= 0 and k < beta else np.float32(0.0)  # a select: stays vectorised
    scale = 1.0 / beta
    dst = out[start : start + width]
    for j in range(width):
        dst[j] = acc[j] * scale


@njit(parallel=True, cache=True)
def _closest_mean(x, rows, net, beta, block, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.empty(d, dtype=x.dtype)
    nblocks = (d + block - 1) // block
    for t in prange(nthreads):
        buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)
        med = np.empty(block)
        first = np.empty(block, dtype=np.int64)
        for b in range(t, nblocks, nthreads):
            start = b * block
            _closest_block(x, rows, start, min(block, d - start), net, beta, buf, med, first, out)
    return out


def closest_mean(x: np.ndarray, rows: np.ndarray, beta: int, threads: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values among ``x[rows]`` closest to their median (Bulyan's
    second step, El Mhamdi et al. 2018): the window of beta consecutive sorted values with the least total
    distance to the median, the lowest such window where several tie.

    ``x``: C-contiguous float32 (n, d); ``rows``: int64 row indices; NaN counts as +inf.
    """
    net = sorting_network(int(rows.shape[0]))
    return _closest_mean(x, _rows(x, rows), net, int(beta), BLOCK, _threads(threads, x, rows))


@njit(parallel=True, cache=True)
def _row_sq_dists(x, rows, z, nthreads):  # pragma: no cover - compiled
    n = rows.shape[0]
    d = x.shape[1]
    part = np.zeros((nthreads, n))
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        a = t * chunk
        b = min(d, a + chunk)
        for r in range(n):
            row = x[rows[r]]
            acc = 0.0
            for j in range(a, b):
                diff = np.float64(row[j]) - np.float64(z[j])
                acc += diff * diff
            part[t, r] = acc
    return part.sum(axis=0)


def row_sq_dists(x: np.ndarray, z: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distance of every row of ``x[rows]`` (float32, C-contiguous; all rows by default) to
    ``z`` (float32 or float64), in float64.

    One read of those rows, no temporary of their size; a row with NaN or inf gets a non-finite distance.
    """
    threads = _threads(threads, x, rows)
    # a float64 z (Weiszfeld's iterate) is used as it is: rounding it to float32 would cost the accuracy it has
    z = np.ascontiguousarray(z, dtype=np.float64 if z.dtype == np.float64 else x.dtype)
    return _row_sq_dists(x, _rows(x, rows), z, threads)


@njit(parallel=True, cache=True, fastmath=_FAST)
def _sign_votes(x, rows, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.empty(d, dtype=x.dtype)
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        acc = np.empty(_COLS, dtype=x.dtype)  # a cache-resident accumulator per thread
        for a in range(t * chunk, min(d, (t + 1) * chunk), _COLS):
            m = min(d, (t + 1) * chunk, a + _COLS) - a
            acc[:m] = 0
            for r in rows:
                row = x[r, a : a + m]
                for j in range(m):
                    v = row[j]
                    acc[j] += np.float32(v > 0) - np.float32(v < 0)  # NaN compares False both ways: votes 0
            out[a : a + m] = acc[:m]
    return out


def sign_votes(x: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate, the sum over ``x[rows]`` (all rows by default) of sign(x) (NaN counts 0), float32, one
    read of those rows."""
    return _sign_votes(x, _rows(x, rows), _threads(threads, x, rows))


@njit(fastmath=_FAST, cache=True)
def _gram_block(x, rows, ref, start, width, buf, acc):  # pragma: no cover - compiled
    n = rows.shape[0]
    rf = ref[start : start + width]
    for r in range(n):
        src = x[rows[r], start : start + width]
        dst = buf[r]
        for j in range(width):
            dst[j] = src[j] - rf[j]
    for i in range(n):
        a = buf[i]
        k = i
        while k + 4 <= n:  # four dot products per pass over row i: 5 loads for 4 multiply-adds
            b0 = buf[k]
            b1 = buf[k + 1]
            b2 = buf[k + 2]
            b3 = buf[k + 3]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for j in range(width):
                v = a[j]
                s0 += v * b0[j]
                s1 += v * b1[j]
                s2 += v * b2[j]
                s3 += v * b3[j]
            acc[i, k] += s0
            acc[i, k + 1] += s1
            acc[i, k + 2] += s2
            acc[i, k + 3] += s3
            k += 4
        while k < n:
            b = buf[k]
            s = np.float32(0.0)
            for j in range(width):
                s += a[j] * b[j]
            acc[i, k] += s
            k += 1


@njit(parallel=True, cache=True)
def _centred_gram(x, rows, ref, block, nthreads):  # pragma: no cover - compiled
    n = rows.shape[0]
    d = x.shape[1]
    part = np.zeros((nthreads, n, n))
    nblocks = (d + block - 1) // block
    for t in prange(nthreads):
        buf = np.empty((n, block), dtype=x.dtype)
        acc = part[t]
        for b in range(t, nblocks, nthreads):
            start = b * block
            _gram_block(x, rows, ref, start, min(block, d - start), buf, acc)
    gram = part.sum(axis=0)
    for i in range(n):
        for k in range(i):
            gram[i, k] = gram[k, i]
    return gram


def centred_gram(x: np.ndarray, ref: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, n) float64 Gram matrix of the rows ``x[rows]`` (float32, C-contiguous; all rows by default) minus
    ``ref``.

    Per cache-resident block of columns the rows are centred into a buffer and every pair's dot product is
    taken in float32 (vectorised), then accumulated in float64: one read of ``x``, n(n+1)/2 dot products,
    no temporary of the matrix's size. For the short-wide matrices of a PS (n <= a few hundred, d in the
    millions) this beats a BLAS call per block (measured in docs/performance.md).
    """
    return _centred_gram(x, _rows(x, rows), np.ascontiguousarray(ref, dtype=x.dtype), BLOCK * 4,
                         _threads(threads, x, rows))


@njit(parallel=True, cache=True, fastmath=_FAST)
def _weighted_sum(x, rows, w, out, nthreads):  # pragma: no cover - compiled
    # accumulates in out's dtype (one compiled specialisation per dtype): float32, or float64 for Weiszfeld
    n = rows.shape[0]
    d = x.shape[1]
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        acc = np.empty(_COLS, dtype=out.dtype)
        for a in range(t * chunk, min(d, (t + 1) * chunk), _COLS):
            m = min(d, (t + 1) * chunk, a + _COLS) - a
            acc[:m] = 0
            for r in range(n):
                wr = w[r]
                if wr == 0:
                    continue  # skipped, not multiplied: 0 * NaN would be NaN
                row = x[rows[r], a : a + m]
                for j in range(m):
                    acc[j] += wr * row[j]
            out[a : a + m] = acc[:m]
    return out


def weighted_sum(x: np.ndarray, w: np.ndarray, threads: int, dtype: type = np.float32,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i x[rows[i]] over the i with w_i != 0 (``rows``: all rows by default), in one read of those rows,
    in the order of ``rows``; accumulated and returned in ``dtype`` (float32, or float64 for ``x`` float32 where
    round-off matters)."""
    out = np.empty(x.shape[1], dtype=dtype)
    return _weighted_sum(x, _rows(x, rows), np.ascontiguousarray(w, dtype=dtype), out, _threads(threads, x, rows))


def weighted_sum64(x: np.ndarray, w: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i x[rows[i]] over the i with w_i != 0, accumulated and returned in float64 (``x`` float32)."""
    return weighted_sum(x, w, threads, np.float64, rows)


# ------------------------------------------------------------------------------------------------ the vote
# Columns compared per step of a row comparison: row i's block stays in L1 while it is compared with the
# other members, so each member is read once; a difference stops the comparison at the end of its block.
_VOTE_COLS = 2048


@njit(cache=True)
def _differs(a, b, s, e, tol):  # pragma: no cover - compiled
    """Whether a[s:e] and b[s:e] differ: raw bits (integer views: NaN payloads and -0.0 vs 0.0 count) when
    tol <= 0, else some |a - b| > tol or NaN (float views; the difference in the rows' dtype, as torch)."""
    j = s
    while j < e:
        m = min(e, j + _VOTE_COLS)
        # slices indexed from 0: numba then drops its negative-index handling and the loops vectorise (6x)
        u = a[j:m]
        v = b[j:m]
        bad = 0
        if tol > 0:
            for c in range(u.shape[0]):
                bad += not (abs(u[c] - v[c]) <= tol)  # NaN compares False: a difference
        else:
            for c in range(u.shape[0]):
                bad += u[c] != v[c]  # typed for float views too, which never take this branch
        if bad != 0:
            return True
        j = m
    return False


@njit(cache=True)
def _compare_many(x, i, cols, js, live, s, e, tol):  # pragma: no cover - compiled
    """Compare row i with the rows js[t] where live[t], over columns [s, e) block by block (row i's block is
    reused from cache for every other row); clears live[t] for a row that differs. Returns the live count."""
    a = x[i]
    n_live = 0
    for t in range(js.shape[0]):
        n_live += live[t]
    j = s
    while j < e and n_live > 0:
        m = min(e, j + cols)
        for t in range(js.shape[0]):
            if live[t] and _differs(a, x[js[t]], j, m, tol):
                live[t] = False
                n_live -= 1
        j = m
    return n_live


@njit(parallel=True, cache=True)
def _strict_vote(x, r, need, tol):  # pragma: no cover - compiled
    k = x.shape[0] // r
    d = x.shape[1]
    leader = np.full(k, -1, dtype=np.int64)
    member = np.zeros((k, r), dtype=np.bool_)
    for g in prange(k):
        claimed = np.zeros(r, dtype=np.bool_)
        js = np.empty(r, dtype=np.int64)
        live = np.zeros(r, dtype=np.bool_)
        for i in range(r):
            if claimed[i]:
                continue
            # the class of member i: every later unclaimed member equal to it, found in one pass over them
            for j in range(r):
                js[j] = g * r + j
                live[j] = j > i and not claimed[j]
            _compare_many(x, g * r + i, _VOTE_COLS, js, live, 0, d, tol)
            size = 1
            for j in range(i + 1, r):
                if live[j]:
                    claimed[j] = True
                    size += 1
            if size >= need:
                leader[g] = i
                member[g, i] = True
                for j in range(i + 1, r):
                    member[g, j] = live[j]
                break
            if r - i - 1 < need:  # too few members left to form a majority
                break
    return leader, member


def strict_vote(x: np.ndarray, r: int, need: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """The strict-majority vote of every contiguous group of r rows of ``x`` (C-contiguous; an integer view of
    the rows' bits when tol <= 0, the float rows otherwise).

    Per group, member i (in order, unclaimed) claims every later unclaimed member equal to it; the first class
    of at least ``need`` members wins. Returns (k,) the winning member or -1, and (k, r) its class."""
    return _strict_vote(x, int(r), int(need), _tol(x, tol))


def _tol(x: np.ndarray, tol: float) -> np.floating:
    # torch compares a float32 difference with a Python float in float32: so does the kernel
    return x.dtype.type(tol) if x.dtype.kind == "f" else np.float64(0.0)


@njit(parallel=True, cache=True)
def _bm_vote(x, r, need, tol, starts, ends, honest, write):  # pragma: no cover - compiled
    k = x.shape[0] // r
    d = x.shape[1]
    n_layers = starts.shape[0]
    win = np.full(k, -1, dtype=np.int64)
    fallback = np.zeros(k, dtype=np.bool_)
    corrupted = np.zeros(k, dtype=np.bool_)
    cands = np.zeros((k, n_layers), dtype=np.int64)
    for g in prange(k):
        base = g * r
        js = np.empty(r, dtype=np.int64)
        live = np.zeros(r, dtype=np.bool_)
        for j in range(r):
            js[j] = base + j
            live[j] = j > 0
        if r == 1 or _compare_many(x, base, _VOTE_COLS, js, live, 0, d, tol) == r - 1:
            # unanimous (every honest group): member 0 wins every layer, supported by all
            win[g] = base
            h = 0
            for j in range(r):
                h += honest[base + j]
            corrupted[g] = h < need
            continue
        # eq[i, j, l]: members i and j send the same values on layer l; one pass over the group, layer by layer
        eq = np.ones((r, r, n_layers), dtype=np.bool_)
        for layer in range(n_layers):
            s = starts[layer]
            e = ends[layer]
            c = s
            while c < e:
                m = min(e, c + _VOTE_COLS)
                for i in range(r):
                    for j in range(i + 1, r):
                        if eq[i, j, layer] and _differs(x[base + i], x[base + j], c, m, tol):
                            eq[i, j, layer] = False
                            eq[j, i, layer] = False
                c = m
        # Boyer-Moore per layer over the members in order
        cand = cands[g]
        count = np.zeros(n_layers, dtype=np.int64)
        for i in range(r):
            for layer in range(n_layers):
                if count[layer] == 0:
                    cand[layer] = i
                    count[layer] = 1
                elif eq[i, cand[layer], layer]:
                    count[layer] += 1
                else:
                    count[layer] -= 1
        sender = np.ones(r, dtype=np.bool_)
        for layer in range(n_layers):
            sup = 0
            hsup = 0
            for j in range(r):
                if eq[cand[layer], j, layer]:
                    sup += 1
                    hsup += honest[base + j]
                else:
                    sender[j] = False
            fallback[g] |= sup < need
            corrupted[g] |= hsup < need
        same = True
        for layer in range(n_layers):
            same &= cand[layer] == cand[0]
        c0 = -1
        if same:
            c0 = cand[0]
        else:
            for j in range(r):
                if sender[j]:
                    c0 = j
                    break
        if c0 >= 0:
            win[g] = base + c0
        elif write:
            # no member sent the kept layers together: assemble them in the group's first row (each layer is
            # copied from one member of this group, so no row still to be read is overwritten)
            dst = x[base]
            for layer in range(n_layers):
                src = x[base + cand[layer]]
                if cand[layer] != 0:
                    for c in range(starts[layer], ends[layer]):
                        dst[c] = src[c]
    return win, fallback, corrupted, cands


def boyer_moore_vote(x: np.ndarray, r: int, need: int, tol: float, starts: np.ndarray, honest: np.ndarray,
                     write: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The original DETOX vote of every contiguous group of r rows of ``x`` (an integer view of the bits when
    tol <= 0): per layer (``starts``: first column of each), Boyer-Moore over the members in order, the
    surviving candidate kept unchecked. Returns per group the row that sent every kept layer (-1: none did;
    with ``write`` the kept layers are then assembled in the group's first row), whether some layer lacks a
    strict majority, whether some layer lacks the support of ``need`` ``honest`` members, and the candidates."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], x.shape[1]).astype(np.int64)
    return _bm_vote(x, int(r), int(need), _tol(x, tol), starts, ends, np.ascontiguousarray(honest, np.int64),
                    bool(write))
