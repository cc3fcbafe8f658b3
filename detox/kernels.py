"""Compiled CPU kernels (numba) for the coordinate-wise order statistics of the robust rules.

Per coordinate, coord-median, trimmed-mean and Bulyan need the mean of the sorted values at positions
[lo, hi). Sorting 45 values for each of 11 million coordinates is what makes these rules slow in numpy
(np.median, np.sort) and torch (torch.sort); here a block of coordinates is copied into a cache-resident
buffer and put through a fixed selection network (Batcher's sorting network, pruned to what decides the
[lo, hi) positions). Each compare-exchange runs across the whole block at once: min and max of two buffer
rows written into two free rows (no aliasing, so LLVM vectorises it). Blocks run in parallel. On large inputs a
network is generated as code: unrolled over one column's values in registers up to 16 inputs, in segments that
each keep at most 16 wires in registers above that (``_unrolled``).

Bulyan's literature average (the beta values closest to the median) needs every position sorted: the full
network, then per coordinate the cheapest window of beta consecutive sorted values (``closest_mean``).
Weiszfeld's weighted sums have a float64-accumulating twin (``weighted_sum64``).

NaN sorts as +inf: it becomes an order statistic only if more than the tolerated rows carry it.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import types
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

# coordinates per block: (m + 2) x 256 float32 rows stay in L1/L2 for the m the rules see
BLOCK = 256
# columns per block of the row-streaming kernels (sign votes, weighted sums): a 16 KiB accumulator
_COLS = 4096
# no "nnan"/"ninf": the loader must see NaN to turn it into +inf, and +inf is a legitimate value
_FAST = {"nsz", "arcp", "contract", "reassoc"}
# Below these a kernel runs its serial twin: entering numba's pool wakes its workers, which under detox's
# OMP_WAIT_POLICY=PASSIVE sleep as soon as a region ends, ~0.1-0.3 ms here. Measured at d = 1e5 with PASSIVE
# (serial vs 2 threads, us, rows in cache): weighted sum of 8 rows 71/83, bucket means of 15 rows 242/268, Gram of 8
# rows 174/256, of 15 rows 436/521 (not so right after the rows arrive: _SERIAL_GRAM), of 45 rows 4278/2948;
# ranking 8 rows 59/134, 45 rows 862/864; median of 5 rows 236/189.
_SERIAL_ELEMS = 1 << 16  # elements read (selection networks, distances: costly per element)
_SERIAL_STREAM = 1 << 21  # elements read by a streaming sum (weighted sums, bucket means: ~0.1 ns each)
_SERIAL_PAIRS = 1 << 24  # pair-columns of a Gram matrix: n(n + 1)/2 times the columns
# ... or elements a Gram matrix reads: right after the rows arrive (the PS step) one core cannot stream them. Gram of
# 15 rows at d = 1e5 in the bench's step (rows written just before): 590 us serial, 389 us on 2 threads; 10 rows
# 344/260, 6 rows 194/178; 20 rows at d = 2e4 124/149 (serial still wins there, under both limits)
_SERIAL_GRAM = 1 << 20
_SERIAL_VOTE = 1 << 21  # elements of the groups a vote compares


def _rows(x: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The row indices a kernel reads (int64; all rows of ``x`` when None)."""
    if rows is None:
        return np.arange(x.shape[0], dtype=np.int64)
    return rows if rows.dtype == np.int64 and rows.flags.c_contiguous else np.ascontiguousarray(rows, np.int64)


def _threads(threads: int, x: np.ndarray, rows: np.ndarray | None, work: int | None = None,
             limit: int = _SERIAL_ELEMS) -> int:
    """Threads for a kernel: ``threads`` within numba's pool, one for small work (``work``, default the elements
    read, below ``limit``). One thread means the kernel's serial twin: entering the pool at all wakes its workers,
    which on a loaded machine waits for a core (~16 ms here at load 4; the whole call is ~0.1 ms)."""
    n = x.shape[0] if rows is None else rows.shape[0]
    if (n * x.shape[1] if work is None else work) < limit:
        return 1
    return _pool(threads)


def _pool(threads: int) -> int:
    """``threads`` within numba's pool (at least one)."""
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


def _gram_threads(threads: int, x: np.ndarray, n: int) -> int:
    """Threads ``centred_gram`` splits the Gram matrix of n rows of ``x`` across: one below both _SERIAL_PAIRS
    pair-columns and _SERIAL_GRAM elements read (every caller that must round as it does asks this)."""
    return _gram_threads_d(threads, x.shape[1], n)


def _gram_threads_d(threads: int, d: int, n: int) -> int:
    """``_gram_threads`` for rows of d columns."""
    if n * (n + 1) // 2 * d < _SERIAL_PAIRS and n * d < _SERIAL_GRAM:
        return 1
    return _pool(threads)


def _out(x: np.ndarray, out: np.ndarray | None, dtype: type | None = None) -> np.ndarray:
    """Where a kernel writes its (d,) result: ``out`` (C-contiguous, of x's row length and ``dtype``, x's by
    default; it may be a row of ``x`` that the kernel does not read: blocks are read before they are written,
    but only other rows), or a fresh array. Writing into memory already mapped saves the page faults of a
    fresh 44 MB array, which here cost 2-10x the kernel itself (issue #15)."""
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if out is None:
        return np.empty(x.shape[1], dtype=dtype)
    if out.shape != (x.shape[1],) or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous ({x.shape[1]},) {dtype} array, got {out.shape} "
                         f"{out.dtype}")
    return out


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
def _run_network(buf, m, net, width):  # pragma: no cover - compiled
    """Run the compare-exchange network on rows 0..m-1 of buf (columns [0, width)); returns (pos, free):
    logical row -> physical row of buf, and one free row of buf."""
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
    return _run_network(buf, m, net, width)


@njit(fastmath=_FAST, cache=True)
def _kept_mean(buf, pos, f1, lo, hi, start, width, out):  # pragma: no cover - compiled
    # sum the kept rows row by row (contiguous, vectorised) into the free row f1
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


@njit(fastmath=_FAST, cache=True)
def _block(x, rows, start, width, net, lo, hi, buf, out):  # pragma: no cover - compiled
    pos, f1 = _network_block(x, rows, start, width, net, buf)
    _kept_mean(buf, pos, f1, lo, hi, start, width, out)


@njit(cache=True)
def _col_range(d, nthreads, t):  # pragma: no cover - compiled
    # thread t's columns for a kernel whose values do not depend on the split (one column at a time): an equal,
    # contiguous share, so each row streams. Blocks dealt out in turn made every thread skip the other's: the
    # bucket stage of DETOX-median (15 rows, 256-column blocks) took 28.5 ms at d = 1.1e7 where this takes 20
    return t * d // nthreads, (t + 1) * d // nthreads


@njit(parallel=True, cache=True)
def _middle_mean(x, rows, net, lo, hi, block, nthreads, out):  # pragma: no cover - compiled
    d = x.shape[1]
    for t in prange(nthreads):
        buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)  # one scratch buffer per thread
        c0, c1 = _col_range(d, nthreads, t)
        for start in range(c0, c1, block):
            _block(x, rows, start, min(block, c1 - start), net, lo, hi, buf, out)
    return out


@njit(cache=True)
def _middle_mean_serial(x, rows, net, lo, hi, block, out):  # pragma: no cover - compiled
    # _middle_mean on one thread, without entering the thread pool (see _threads)
    d = x.shape[1]
    buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)
    for b in range((d + block - 1) // block):
        start = b * block
        _block(x, rows, start, min(block, d - start), net, lo, hi, buf, out)
    return out


# A network of at most _UNROLL_ROWS inputs runs unrolled: one column's values stay in registers through the whole
# network (the block kernel stores both outputs of every compare-exchange; its stores bound it). Measured, 2 threads:
# 11 inputs (Bulyan over 15 winners) at d = 1.1e7 62 -> 25 ms, at d = 101,770 0.46 -> 0.19 ms (one thread 0.43 ->
# 0.14); at 35 or 45 inputs the registers spill and it is 2.3x slower than the block kernel. Each network is
# compiled once per machine (2-6 s, then numba's cache), so only where the work repays it: at least
# _UNROLL_ELEMS elements read (DETOX-Bulyan on the MLP twins' d = 101,770 is 1.1M).
_UNROLL_ROWS = 16
_UNROLL_ELEMS = 1 << 20
_UNROLL_VERSION = 2  # part of the generated files' names: bump when _unrolled_source changes
# columns per slice of the unrolled kernels (their values stay in registers: no buffer bounds it); each thread's
# share is one contiguous run of them (_col_range). DETOX-median's bucket stage at d = 1.1e7: 256 columns dealt out
# in turn 28.5 ms, contiguous runs of 4096 20 ms; at d = 1e5, after the vote, 0.14 -> 0.06 ms
_UNROLL_COLS = 4096
# bucket_middle_mean unrolls over bucket means up to this many rows in all (one load of each per column)
_UNROLL_BUCKET_ROWS = 64
# Above _UNROLL_ROWS inputs (up to _SEGMENT_ROWS) the network runs in segments instead: its compare-exchanges,
# reordered only past those on other wires (every wire meets the same ones in the same order: the block kernel's
# values bit for bit), cut into runs that each touch at most _SEGMENT_WIRES wires. A run loads its wires from an
# L1-resident block of _SEGMENT_COLS columns, keeps them in registers through its compare-exchanges and stores them
# once: at 45 inputs 340 loads and stores per column instead of the block kernel's 1160. Measured at n = 45,
# d = 1e5 (one thread, alternated): median 4.5-5.0 -> 2.5-2.9 ms, trimmed mean 4.9-5.4 -> 2.9-3.0 ms; compiling
# one network takes ~7 s, once per machine (the segments are separate functions: as one, 30 s).
_SEGMENT_ROWS = 64
_SEGMENT_WIRES = 16
_SEGMENT_COLS = 128


def _unrolled_source(m: int, lo: int, hi: int, sizes: tuple[int, ...] | None = None) -> str:
    """The source of _middle_mean and its serial twin for one network, unrolled over named scalars: the block
    kernel's values, bit for bit (NaN as +inf, its compare-exchange, the kept values summed in order in float32,
    times the float64 1 / (hi - lo)). No ``reassoc``: the sum keeps its order.

    With ``sizes`` (one per input) the inputs are bucket means instead, as ``bucket_middle_mean`` (``rows``: the
    buckets' rows one after the other): each the float32 sum from +0.0 in row order, then a true division by the
    bucket's size, as ``bucket_means``. Compiled without fastmath: no flag may fold the +0.0 or turn the division
    into a multiplication."""
    net = selection_network(m, lo, hi)
    body = ["    d = x.shape[1]", "    nblocks = (d + block - 1) // block", f"    scale = 1.0 / {hi - lo}",
            "    big = np.empty(1, dtype=x.dtype)", "    big[0] = np.inf", "    inf = big[0]  # +inf in x's dtype"]
    n_rows = m if sizes is None else sum(sizes)
    col = [f"{' ' * 8}r{i} = x[rows[{i}], start:end]" for i in range(n_rows)]
    col += [f"{' ' * 8}dst = out[start:end]", f"{' ' * 8}for j in range(end - start):"]
    ind = " " * 12
    if sizes is None:
        for i in range(m):
            col.append(f"{ind}v{i} = r{i}[j]")
            col.append(f"{ind}v{i} = inf if v{i} != v{i} else v{i}")
    else:
        body += ["    big[0] = 0.0", "    zero = big[0]  # +0.0 in x's dtype, where bucket_means' sums start"]
        first = 0
        for i, size in enumerate(sizes):
            body += [f"    big[0] = {size}", f"    n{i} = big[0]"]
            col.append(f"{ind}v{i} = zero + r{first}[j]")
            col += [f"{ind}v{i} = v{i} + r{first + k}[j]" for k in range(1, size)]
            col.append(f"{ind}v{i} = v{i} / n{i}")
            col.append(f"{ind}v{i} = inf if v{i} != v{i} else v{i}")
            first += size
    for a, b in net.tolist():  # as _minmax: the smaller to a, the larger to b, ties keep b's value at a
        col.append(f"{ind}v{a}, v{b} = (v{a} if v{a} < v{b} else v{b}), (v{b} if v{a} < v{b} else v{a})")
    col.append(f"{ind}acc = v{lo}")
    col += [f"{ind}acc += v{i}" for i in range(lo + 1, hi)]
    col.append(f"{ind}dst[j] = acc * scale")

    def block(pad: int) -> list[str]:  # the per-block code, indented for the pooled or the serial loop
        return [(" " * pad) + line for line in col]

    fast = "" if sizes is not None else ", fastmath={'nsz', 'arcp', 'contract'}"
    return "\n".join([
        "# generated by detox.kernels._unrolled_source: do not edit",
        "import numpy as np",
        "from numba import njit, prange",
        "",
        "from detox.kernels import _col_range",
        "", "",
        f"@njit(parallel=True, cache=True{fast})",
        "def pooled(x, rows, block, nthreads, out):",
        *body,
        "    for t in prange(nthreads):",
        "        c0, c1 = _col_range(d, nthreads, t)",
        "        for start in range(c0, c1, block):",
        "            end = min(c1, start + block)",
        *block(4),
        "    return out",
        "", "",
        f"@njit(cache=True{fast})",
        "def serial(x, rows, block, out):",
        *body,
        "    for b in range(nblocks):",
        "        start = b * block",
        "        end = min(d, start + block)",
        *block(0),
        "    return out",
        "",
    ])


def run_unrolled(net: types.ModuleType, x: np.ndarray, rows: np.ndarray, threads: int, out: np.ndarray) -> np.ndarray:
    """A module of ``_unrolled``'s kernels over ``x[rows]`` into ``out``: its serial twin on one thread, else its pooled
    kernel on ``threads``, in slices of _UNROLL_COLS columns."""
    if threads == 1:
        return net.serial(x, rows, _UNROLL_COLS, out)
    return net.pooled(x, rows, _UNROLL_COLS, threads, out)


def _segments(net: np.ndarray, wires: int) -> list[tuple[list[int], list[int]]]:
    """``net``'s compare-exchanges as runs of at most ``wires`` wires: (indices into net, the run's sorted wires)
    per run. Each compare-exchange waits for the previous one on each of its wires (so every wire meets the same
    ones in the same order); among those ready, a run takes next the one that adds the fewest new wires."""
    pairs = [(int(a), int(b)) for a, b in net.tolist()]
    last: dict[int, int] = {}
    users: list[list[int]] = [[] for _ in pairs]
    waiting = [0] * len(pairs)
    for i, (a, b) in enumerate(pairs):
        for before in {last[w] for w in (a, b) if w in last}:
            users[before].append(i)
            waiting[i] += 1
        last[a] = last[b] = i
    ready = sorted(i for i, n in enumerate(waiting) if n == 0)
    runs = []
    while ready:
        run: list[int] = []
        held: set[int] = set()
        while True:
            fits = [(len({*pairs[i]} - held), i) for i in ready if len(held | {*pairs[i]}) <= wires]
            if not fits:
                break
            i = min(fits)[1]
            ready.remove(i)
            run.append(i)
            held |= {*pairs[i]}
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    ready.append(u)
            ready.sort()
        runs.append((run, sorted(held)))
    return runs


_SEGMENT_FAST = "fastmath={'nsz', 'arcp', 'contract'}"  # as _unrolled_source's: no reassoc


def _segment_runs(net: np.ndarray, m: int) -> str:
    """Source of ``network(x, rows, start, width, buf)``: columns [start, start + width) of x[rows] gathered into
    the flat buffer (row i at offset i * W, W = _SEGMENT_COLS a literal, so the compiler sees that rows do not
    overlap; NaN as +inf; the columns past width zero), then ``net`` run in segments (see _SEGMENT_WIRES): on
    row i, the value wire i ends with in the block kernel, bit for bit."""
    pairs, w = net.tolist(), _SEGMENT_COLS
    src = []
    runs = _segments(net, _SEGMENT_WIRES)
    for k, (run, held) in enumerate(runs):
        src += ["", "", f"@njit(cache=True, {_SEGMENT_FAST})", f"def run{k}(buf):", f"    for j in range({w}):"]
        src += [f"        v{i} = buf[{i * w} + j]" for i in held]
        for c in run:  # as _minmax: the smaller to a, the larger to b, ties keep b's value at a
            a, b = pairs[c]
            src.append(f"        v{a}, v{b} = (v{a} if v{a} < v{b} else v{b}), (v{b} if v{a} < v{b} else v{a})")
        src += [f"        buf[{i * w} + j] = v{i}" for i in held]
    calls = "\n".join(f"    run{k}(buf)" for k in range(len(runs)))
    return "\n".join(src) + f"""


@njit(cache=True, {_SEGMENT_FAST})
def network(x, rows, start, width, buf):
    big = np.empty(1, dtype=x.dtype)
    big[0] = np.inf
    inf = big[0]  # +inf in x's dtype
    for i in range({m}):
        src = x[rows[i], start:start + width]
        dst = buf[i * {w}:(i + 1) * {w}]
        for j in range(width):
            v = src[j]
            dst[j] = inf if v != v else v
        for j in range(width, {w}):
            dst[j] = 0
{calls}
"""


def _drivers(arg: str, scratch: list[str], call: str) -> str:
    """Source of ``pooled(x, rows, <arg>, nthreads, out)`` and its serial twin ``serial(x, rows, <arg>, out)``:
    the columns in blocks of _SEGMENT_COLS, a contiguous run of blocks per thread, each block ``call`` (with
    ``start`` and ``width``) on the thread's ``scratch`` arrays."""
    w = _SEGMENT_COLS
    pooled_scratch = "\n".join(" " * 8 + line for line in scratch)
    serial_scratch = "\n".join(" " * 4 + line for line in scratch)
    return f"""

@njit(parallel=True, cache=True)
def pooled(x, rows, {arg}, nthreads, out):
    d = x.shape[1]
    nblocks = (d + {w - 1}) // {w}
    per = (nblocks + nthreads - 1) // nthreads
    for t in prange(nthreads):
{pooled_scratch}
        for b in range(t * per, min(nblocks, (t + 1) * per)):
            start = b * {w}
            width = min({w}, d - start)
            {call}
    return out


@njit(cache=True)
def serial(x, rows, {arg}, out):
    d = x.shape[1]
{serial_scratch}
    for b in range((d + {w - 1}) // {w}):
        start = b * {w}
        width = min({w}, d - start)
        {call}
    return out
"""


def _segmented_source(m: int, lo: int, hi: int) -> str:
    """The source of _middle_mean and its serial twin for one network of more than _UNROLL_ROWS inputs, run in
    segments (``_segment_runs``): the block kernel's values, bit for bit (its network, the kept values summed in
    order in float32, times the float64 1 / (hi - lo)). ``block_cols``: unused (``_unrolled_source``'s signature)."""
    w = _SEGMENT_COLS
    kept = "\n".join(f"        acc += buf[{i * w} + j]" for i in range(lo + 1, hi))
    return f"""# generated by detox.kernels._segmented_source: do not edit
import numpy as np
from numba import njit, prange
{_segment_runs(selection_network(m, lo, hi), m)}

@njit(cache=True, {_SEGMENT_FAST})
def block(x, rows, start, width, buf, out):
    network(x, rows, start, width, buf)
    scale = 1.0 / {hi - lo}
    dst = out[start:start + width]
    for j in range(width):
        acc = buf[{lo * w} + j]
{kept}
        dst[j] = acc * scale

{_drivers("block_cols", [f"buf = np.empty({m * w}, dtype=x.dtype)"], "block(x, rows, start, width, buf, out)")}"""


def _sorted_source(m: int) -> str:
    """closest_mean's kernels for m inputs with the full sorting network run in segments (``_segment_runs``),
    then the window of ``_closest_window``: the block kernel's values, bit for bit."""
    w = _SEGMENT_COLS
    return f"""# generated by detox.kernels._sorted_source: do not edit
import numpy as np
from numba import njit, prange

from detox.kernels import _closest_window
{_segment_runs(sorting_network(m), m)}

@njit(cache=True)
def block(x, rows, start, width, beta, buf, pos, med, first, out):
    network(x, rows, start, width, buf)
    _closest_window(buf.reshape(({m + 1}, {w})), pos, {m}, {m}, beta, start, width, med, first, out)

{_drivers("beta", [f"buf = np.empty({(m + 1) * w}, dtype=x.dtype)  # row m: the window's sums",
                   f"pos = np.arange({m})", f"med = np.empty({w})", f"first = np.empty({w}, dtype=np.int64)"],
          "block(x, rows, start, width, beta, buf, pos, med, first, out)")}"""


def _cache_dir() -> Path:
    return Path(os.environ.get("DETOX_CACHE_DIR") or Path.home() / ".cache" / "detox")


@lru_cache(maxsize=64)
def _unrolled(m: int, lo: int, hi: int, sizes: tuple[int, ...] | None = None) -> types.ModuleType | None:
    """The unrolled kernels of one network (module with ``pooled`` and ``serial``; over bucket means of ``sizes``
    rows when given; in segments above _UNROLL_ROWS inputs), or None where the cache directory is not writable."""
    if sizes is not None:
        return _generated(f"buckets_{'x'.join(map(str, sizes))}_{lo}_{hi}", _unrolled_source(m, lo, hi, sizes),
                          f"the selection network for {m} inputs (bucket means)")
    if m > _UNROLL_ROWS:
        return _generated(f"segmented_{m}_{lo}_{hi}", _segmented_source(m, lo, hi),
                          f"the selection network for {m} inputs")
    return _generated(f"middle_{m}_{lo}_{hi}", _unrolled_source(m, lo, hi), f"the selection network for {m} inputs")


@lru_cache(maxsize=64)
def _sorted(m: int) -> types.ModuleType | None:
    """closest_mean's kernels for m inputs (``_sorted_source``), or None where the cache is not writable."""
    return _generated(f"sorted_{m}", _sorted_source(m), f"the sorting network for {m} inputs")


def _generated(stem: str, source: str, what: str) -> types.ModuleType | None:
    """The module of generated kernels ``source``, from a file in the cache directory (so numba can cache their
    compiled code); None where the directory is not writable."""
    path = _cache_dir() / "networks" / f"{stem}_v{_UNROLL_VERSION}.py"
    try:
        if not path.is_file() or path.read_text() != source:
            logging.getLogger("detox").info("compiling %s, once for this machine (a few seconds; cached in %s)",
                                            what, path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)  # atomic: a concurrent job reads the old file or the new one, never half
        # the source run is the one generated here (the file only names it, for numba's cache); registered under
        # its name: numba's cache rebuilds a kernel's environment by importing its module
        name = f"detox_network_{path.stem}"
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - our own generated source
        return module
    except OSError:
        return None


def middle_mean(x: np.ndarray, rows: np.ndarray, lo: int, hi: int, threads: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate, the mean of the sorted values at positions [lo, hi) among ``x[rows]``.

    ``x``: C-contiguous float32 (n, d); ``rows``: int64 row indices; runs on ``threads`` threads. Written into
    ``out`` when given (see ``_out``), else into a fresh array.
    """
    m, lo, hi = int(rows.shape[0]), int(lo), int(hi)
    out = _out(x, out)
    threads = _threads(threads, x, rows)
    idx = _rows(x, rows)
    unrolled = _unrolled(m, lo, hi) if m <= _SEGMENT_ROWS and m * x.shape[1] >= _UNROLL_ELEMS else None
    if unrolled is not None:
        return run_unrolled(unrolled, x, idx, threads, out)
    net = selection_network(m, lo, hi)
    if threads == 1:
        return _middle_mean_serial(x, idx, net, lo, hi, BLOCK, out)
    return _middle_mean(x, idx, net, lo, hi, BLOCK, threads, out)


@lru_cache(maxsize=256)
def sorting_network(m: int) -> np.ndarray:
    """Batcher's full sorting network for m inputs, a (k, 2) int64 array."""
    return np.asarray(_batcher(m), dtype=np.int64).reshape(-1, 2)


@njit(fastmath=_FAST, cache=True)
def _closest_block(x, rows, start, width, net, beta, buf, med, first, out):  # pragma: no cover - compiled
    pos, f1 = _network_block(x, rows, start, width, net, buf)  # the full network: every position sorted
    _closest_window(buf, pos, f1, rows.shape[0], beta, start, width, med, first, out)


@njit(fastmath=_FAST, cache=True)
def _closest_window(buf, pos, f1, m, beta, start, width, med, first, out):  # pragma: no cover - compiled
    # sorted position i of each column on row pos[i] of buf; row f1 free
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
def _closest_mean(x, rows, net, beta, block, nthreads, out):  # pragma: no cover - compiled
    d = x.shape[1]
    for t in prange(nthreads):
        buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)
        med = np.empty(block)
        first = np.empty(block, dtype=np.int64)
        c0, c1 = _col_range(d, nthreads, t)
        for start in range(c0, c1, block):
            _closest_block(x, rows, start, min(block, c1 - start), net, beta, buf, med, first, out)
    return out


@njit(cache=True)
def _closest_mean_serial(x, rows, net, beta, block, out):  # pragma: no cover - compiled
    # _closest_mean on one thread, without entering the thread pool (see _threads)
    d = x.shape[1]
    buf = np.empty((rows.shape[0] + 2, block), dtype=x.dtype)
    med = np.empty(block)
    first = np.empty(block, dtype=np.int64)
    for b in range((d + block - 1) // block):
        start = b * block
        _closest_block(x, rows, start, min(block, d - start), net, beta, buf, med, first, out)
    return out


def closest_mean(x: np.ndarray, rows: np.ndarray, beta: int, threads: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values among ``x[rows]`` closest to their median (Bulyan's
    second step, El Mhamdi et al. 2018): the window of beta consecutive sorted values with the least total
    distance to the median, the lowest such window where several tie.

    ``x``: C-contiguous float32 (n, d); ``rows``: int64 row indices; NaN counts as +inf. Written into ``out``
    when given (see ``_out``).
    """
    m = int(rows.shape[0])
    out = _out(x, out)
    threads = _threads(threads, x, rows)
    sorted_ = _sorted(m) if m <= _SEGMENT_ROWS and m * x.shape[1] >= _UNROLL_ELEMS else None
    if sorted_ is not None:
        idx = _rows(x, rows)
        return sorted_.serial(x, idx, int(beta), out) if threads == 1 else sorted_.pooled(x, idx, int(beta), threads,
                                                                                          out)
    net = sorting_network(m)
    if threads == 1:
        return _closest_mean_serial(x, _rows(x, rows), net, int(beta), BLOCK, out)
    return _closest_mean(x, _rows(x, rows), net, int(beta), BLOCK, threads, out)


@njit(cache=True)
def _row_sq_dists_cols(x, rows, z, a, b, out):  # pragma: no cover - compiled
    # each row's sum runs in column order (a float64 chain); four rows at a time keep four chains in flight
    n = rows.shape[0]
    r = 0
    while r + 4 <= n:
        x0 = x[rows[r]]
        x1 = x[rows[r + 1]]
        x2 = x[rows[r + 2]]
        x3 = x[rows[r + 3]]
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for j in range(a, b):
            zj = np.float64(z[j])
            d0 = np.float64(x0[j]) - zj
            d1 = np.float64(x1[j]) - zj
            d2 = np.float64(x2[j]) - zj
            d3 = np.float64(x3[j]) - zj
            a0 += d0 * d0
            a1 += d1 * d1
            a2 += d2 * d2
            a3 += d3 * d3
        out[r] = a0
        out[r + 1] = a1
        out[r + 2] = a2
        out[r + 3] = a3
        r += 4
    while r < n:
        row = x[rows[r]]
        acc = 0.0
        for j in range(a, b):
            diff = np.float64(row[j]) - np.float64(z[j])
            acc += diff * diff
        out[r] = acc
        r += 1


@njit(parallel=True, cache=True)
def _row_sq_dists(x, rows, z, nthreads):  # pragma: no cover - compiled
    n = rows.shape[0]
    d = x.shape[1]
    part = np.zeros((nthreads, n))
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        _row_sq_dists_cols(x, rows, z, t * chunk, min(d, (t + 1) * chunk), part[t])
    return part.sum(axis=0)


@njit(cache=True)
def _row_sq_dists_serial(x, rows, z):  # pragma: no cover - compiled
    # what _row_sq_dists computes on one thread, without entering a thread pool (see _threads)
    out = np.zeros(rows.shape[0])
    _row_sq_dists_cols(x, rows, z, 0, x.shape[1], out)
    return out


def row_sq_dists(x: np.ndarray, z: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distance of every row of ``x[rows]`` (float32, C-contiguous; all rows by default) to
    ``z`` (float32 or float64), in float64.

    One read of those rows, no temporary of their size; a row with NaN or inf gets a non-finite distance.
    """
    threads = _threads(threads, x, rows)
    # a float64 z (Weiszfeld's iterate) is used as it is: rounding it to float32 would cost the accuracy it has
    z = np.ascontiguousarray(z, dtype=np.float64 if z.dtype == np.float64 else x.dtype)
    if threads == 1:
        return _row_sq_dists_serial(x, _rows(x, rows), z)
    return _row_sq_dists(x, _rows(x, rows), z, threads)


@njit(cache=True, fastmath=_FAST)
def _sign_votes_cols(x, rows, out, lo, hi, acc):  # pragma: no cover - compiled
    for a in range(lo, hi, _COLS):
        m = min(hi, a + _COLS) - a
        acc[:m] = 0
        for r in rows:
            row = x[r, a : a + m]
            for j in range(m):
                v = row[j]
                acc[j] += np.float32(v > 0) - np.float32(v < 0)  # NaN compares False both ways: votes 0
        out[a : a + m] = acc[:m]


@njit(parallel=True, cache=True, fastmath=_FAST)
def _sign_votes(x, rows, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.empty(d, dtype=x.dtype)
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        acc = np.empty(_COLS, dtype=x.dtype)  # a cache-resident accumulator per thread
        _sign_votes_cols(x, rows, out, t * chunk, min(d, (t + 1) * chunk), acc)
    return out


@njit(cache=True, fastmath=_FAST)
def _sign_votes_serial(x, rows):  # pragma: no cover - compiled
    out = np.empty(x.shape[1], dtype=x.dtype)
    _sign_votes_cols(x, rows, out, 0, x.shape[1], np.empty(_COLS, dtype=x.dtype))
    return out


def sign_votes(x: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Per coordinate, the sum over ``x[rows]`` (all rows by default) of sign(x) (NaN counts 0), float32, one
    read of those rows."""
    threads = _threads(threads, x, rows)
    if threads == 1:
        return _sign_votes_serial(x, _rows(x, rows))
    return _sign_votes(x, _rows(x, rows), threads)


@njit(fastmath=_FAST, inline="always", cache=True)
def _gram_tiles(x, rows, a, width, rf, zero, acc):  # pragma: no cover - compiled
    """acc[i, k] += the dot product, over columns [a, a + width), of rows ``x[rows[i]] - rf`` and
    ``x[rows[k]] - rf`` (rf: those columns of the reference row; None where the rows are already centred) for
    i <= k, each difference taken where it is used, the products summed in the type of ``zero`` (float32 for the
    Gram kernel, float64 for the candidate ranking).

    Rows go in groups of four; group g meets every earlier group (``_gram_tile4``: 8 loads for 16 multiply-adds,
    16 accumulators in registers; 2 rows against 4 was 25 % slower at n = 45, d = 1e5), then itself
    (``_gram_diagonal4``), so each group's rows are first read just before they are used; the last n % 4 rows
    meet each group, then each other. Centring into a buffer first, which the tiles then read back, was 1.8x
    slower at 8 rows, d = 1e5 (serial: 0.14-0.15 against 0.08 ms); each pair's sum is the same either way."""
    n = rows.shape[0]
    e = a + width
    n4 = n - n % 4
    for k in range(0, n4, 4):
        v0 = x[rows[k], a:e]
        v1 = x[rows[k + 1], a:e]
        v2 = x[rows[k + 2], a:e]
        v3 = x[rows[k + 3], a:e]
        for i in range(0, k, 4):
            _gram_tile4(x[rows[i], a:e], x[rows[i + 1], a:e], x[rows[i + 2], a:e], x[rows[i + 3], a:e],
                        v0, v1, v2, v3, rf, i, k, width, zero, acc)
        _gram_diagonal4(v0, v1, v2, v3, rf, k, width, zero, acc)
    for k in range(n4, n):
        v = x[rows[k], a:e]
        for i in range(0, n4, 4):
            u0 = x[rows[i], a:e]
            u1 = x[rows[i + 1], a:e]
            u2 = x[rows[i + 2], a:e]
            u3 = x[rows[i + 3], a:e]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for j in range(width):
                c = _centred(v, rf, j)
                s0 += _centred(u0, rf, j) * c
                s1 += _centred(u1, rf, j) * c
                s2 += _centred(u2, rf, j) * c
                s3 += _centred(u3, rf, j) * c
            acc[i, k] += s0
            acc[i + 1, k] += s1
            acc[i + 2, k] += s2
            acc[i + 3, k] += s3
        for i in range(n4, k + 1):
            u = x[rows[i], a:e]
            s = zero
            for j in range(width):
                s += _centred(u, rf, j) * _centred(v, rf, j)
            acc[i, k] += s


@njit(fastmath=_FAST, inline="always", cache=True)
def _centred(u, rf, j):  # pragma: no cover - compiled
    # u[j] minus the reference row's (rf None: compiled without the subtraction)
    if rf is None:
        return u[j]
    return u[j] - rf[j]


@njit(fastmath=_FAST, inline="always", cache=True)
def _gram_diagonal4(u0, u1, u2, u3, rf, i, width, zero, acc):  # pragma: no cover - compiled
    # the 10 pairs among rows i..i+3 (each minus rf)
    s00 = s01 = s02 = s03 = s11 = s12 = s13 = s22 = s23 = s33 = zero
    for j in range(width):
        e0 = _centred(u0, rf, j)
        e1 = _centred(u1, rf, j)
        e2 = _centred(u2, rf, j)
        e3 = _centred(u3, rf, j)
        s00 += e0 * e0
        s01 += e0 * e1
        s02 += e0 * e2
        s03 += e0 * e3
        s11 += e1 * e1
        s12 += e1 * e2
        s13 += e1 * e3
        s22 += e2 * e2
        s23 += e2 * e3
        s33 += e3 * e3
    acc[i, i] += s00
    acc[i, i + 1] += s01
    acc[i, i + 2] += s02
    acc[i, i + 3] += s03
    acc[i + 1, i + 1] += s11
    acc[i + 1, i + 2] += s12
    acc[i + 1, i + 3] += s13
    acc[i + 2, i + 2] += s22
    acc[i + 2, i + 3] += s23
    acc[i + 3, i + 3] += s33


@njit(fastmath=_FAST, inline="always", cache=True)
def _gram_tile4(u0, u1, u2, u3, v0, v1, v2, v3, rf, i, k, width, zero, acc):  # pragma: no cover - compiled
    # rows i..i+3 against rows k..k+3 (each minus rf)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for j in range(width):
        e0 = _centred(u0, rf, j)
        e1 = _centred(u1, rf, j)
        e2 = _centred(u2, rf, j)
        e3 = _centred(u3, rf, j)
        a0 = _centred(v0, rf, j)
        a1 = _centred(v1, rf, j)
        a2 = _centred(v2, rf, j)
        a3 = _centred(v3, rf, j)
        s00 += e0 * a0
        s01 += e0 * a1
        s02 += e0 * a2
        s03 += e0 * a3
        s10 += e1 * a0
        s11 += e1 * a1
        s12 += e1 * a2
        s13 += e1 * a3
        s20 += e2 * a0
        s21 += e2 * a1
        s22 += e2 * a2
        s23 += e2 * a3
        s30 += e3 * a0
        s31 += e3 * a1
        s32 += e3 * a2
        s33 += e3 * a3
    acc[i, k] += s00
    acc[i, k + 1] += s01
    acc[i, k + 2] += s02
    acc[i, k + 3] += s03
    acc[i + 1, k] += s10
    acc[i + 1, k + 1] += s11
    acc[i + 1, k + 2] += s12
    acc[i + 1, k + 3] += s13
    acc[i + 2, k] += s20
    acc[i + 2, k + 1] += s21
    acc[i + 2, k + 2] += s22
    acc[i + 2, k + 3] += s23
    acc[i + 3, k] += s30
    acc[i + 3, k + 1] += s31
    acc[i + 3, k + 2] += s32
    acc[i + 3, k + 3] += s33


@njit(fastmath=_FAST, cache=True)
def _gram_block(x, rows, ref, start, width, acc):  # pragma: no cover - compiled
    # the fastmath boundary: _gram_tiles is inlined at numba-IR level and takes its caller's flags (inlined into
    # _gram_blocks, which has none, its sums would not vectorise: ~9x slower on a 45 x 1024 block)
    _gram_tiles(x, rows, start, width, ref[start : start + width], np.float32(0.0), acc)


@njit(cache=True, inline="always")
def _block_range(d, block, nthreads, t):  # pragma: no cover - compiled
    # thread t's share of the column blocks: one contiguous run each (block b of every row is next to block b + 1,
    # so each row streams; blocks dealt out in turn made every thread skip every other 4 KiB: 10-25 % slower at
    # 8 rows, d = 1.1e7). What each thread sums, in what order, is what a Gram matrix's rounding depends on.
    nblocks = (d + block - 1) // block
    per = (nblocks + nthreads - 1) // nthreads
    return min(nblocks, t * per), min(nblocks, (t + 1) * per)


@njit(cache=True)
def _gram_blocks(x, rows, ref, block, lo, hi, acc):  # pragma: no cover - compiled
    # column blocks [lo, hi) in order
    d = x.shape[1]
    for b in range(lo, hi):
        start = b * block
        _gram_block(x, rows, ref, start, min(block, d - start), acc)


@njit(cache=True)
def _sum_parts(part):  # pragma: no cover - compiled
    # the threads' partial Gram matrices summed, in thread order, and mirrored
    return _mirror(part.sum(axis=0))


@njit(cache=True)
def _mirror(gram):  # pragma: no cover - compiled
    for i in range(gram.shape[0]):
        for k in range(i):
            gram[i, k] = gram[k, i]
    return gram


@njit(parallel=True, cache=True)
def _centred_gram(x, rows, ref, block, nthreads):  # pragma: no cover - compiled
    n = rows.shape[0]
    part = np.zeros((nthreads, n, n))
    for t in prange(nthreads):
        lo, hi = _block_range(x.shape[1], block, nthreads, t)
        _gram_blocks(x, rows, ref, block, lo, hi, part[t])
    return _sum_parts(part)


@njit(cache=True)
def _centred_gram_serial(x, rows, ref, block):  # pragma: no cover - compiled
    # what _centred_gram computes on one thread, without entering a thread pool (see _threads)
    n = rows.shape[0]
    gram = np.zeros((n, n))
    lo, hi = _block_range(x.shape[1], block, 1, 0)
    _gram_blocks(x, rows, ref, block, lo, hi, gram)
    return _mirror(gram)


def centred_gram(x: np.ndarray, ref: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(n, n) float64 Gram matrix of the rows ``x[rows]`` (float32, C-contiguous; all rows by default) minus
    ``ref``.

    Per cache-resident block of columns every pair's dot product of centred rows is taken in float32
    (vectorised), then accumulated in float64: one read of ``x``, n(n+1)/2 dot products,
    no temporary of the matrix's size. For the short-wide matrices of a PS (n <= a few hundred, d in the
    millions) this beats a BLAS call per block (measured in docs/performance.md).
    """
    n = x.shape[0] if rows is None else rows.shape[0]
    threads = _gram_threads(threads, x, n)
    ref = np.ascontiguousarray(ref, dtype=x.dtype)
    if threads == 1:
        return _centred_gram_serial(x, _rows(x, rows), ref, BLOCK * 4)
    return _centred_gram(x, _rows(x, rows), ref, BLOCK * 4, threads)


@njit(cache=True, fastmath=_FAST)
def _weighted_sum_cols(x, rows, w, out, lo, hi, acc):  # pragma: no cover - compiled
    # columns [lo, hi) of the sum, _COLS at a time in the cache-resident accumulator ``acc``
    for a in range(lo, hi, _COLS):
        m = min(hi, a + _COLS) - a
        _accumulate(x, rows, w, 0, rows.shape[0], a, m, acc)
        out[a : a + m] = acc[:m]


@njit(cache=True, fastmath=_FAST)
def _accumulate(x, rows, w, r0, r1, a, m, acc):  # pragma: no cover - compiled
    # acc[:m] = sum of w[r] * x[rows[r], a : a + m] over r in [r0, r1) in order, from +0.0 (the one loop behind
    # every weighted sum and bucket mean, so they all sum alike)
    acc[:m] = 0
    for r in range(r0, r1):
        wr = w[r]
        if wr == 0:
            continue  # skipped, not multiplied: 0 * NaN would be NaN
        row = x[rows[r], a : a + m]
        for j in range(m):
            acc[j] += wr * row[j]


@njit(parallel=True, cache=True, fastmath=_FAST)
def _weighted_sum(x, rows, w, out, nthreads):  # pragma: no cover - compiled
    # accumulates in out's dtype (one compiled specialisation per dtype): float32, or float64 for Weiszfeld
    d = x.shape[1]
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        acc = np.empty(_COLS, dtype=out.dtype)
        _weighted_sum_cols(x, rows, w, out, t * chunk, min(d, (t + 1) * chunk), acc)
    return out


@njit(cache=True, fastmath=_FAST)
def _weighted_sum_serial(x, rows, w, out):  # pragma: no cover - compiled
    _weighted_sum_cols(x, rows, w, out, 0, x.shape[1], np.empty(_COLS, dtype=out.dtype))
    return out


def weighted_sum(x: np.ndarray, w: np.ndarray, threads: int, dtype: type = np.float32,
                 rows: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i x[rows[i]] over the i with w_i != 0 (``rows``: all rows by default), in one read of those rows,
    in the order of ``rows``; accumulated and returned in ``dtype`` (float32, or float64 for ``x`` float32 where
    round-off matters), into ``out`` when given (see ``_out``)."""
    out = _out(x, out, dtype)
    threads = _threads(threads, x, rows, limit=_SERIAL_STREAM)
    if threads == 1:
        return _weighted_sum_serial(x, _rows(x, rows), np.ascontiguousarray(w, dtype=dtype), out)
    return _weighted_sum(x, _rows(x, rows), np.ascontiguousarray(w, dtype=dtype), out, threads)


def weighted_sum64(x: np.ndarray, w: np.ndarray, threads: int, rows: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i x[rows[i]] over the i with w_i != 0, accumulated and returned in float64 (``x`` float32)."""
    return weighted_sum(x, w, threads, np.float64, rows)


@njit(cache=True, fastmath=False)
def _divide(dst, acc, m, den):  # pragma: no cover - compiled
    # no fastmath: "arcp" would turn the division into a multiply by 1/den, which rounds differently from torch's
    # true division (div_ by the count) for a third of the values. Stated explicitly: a callee with no fastmath
    # option inherits its caller's (numba's _inherit_if_not_set), and _bucket_means_cols has "arcp"
    for j in range(m):
        dst[j] = acc[j] / den


@njit(cache=True, fastmath=_FAST)
def _bucket_value(x, rows, starts, w, dens, b, a, m, acc, dst):  # pragma: no cover - compiled
    # bucket b on columns [a, a + m) into dst[:m]: the weighted sum of its rows in order, then a true division by
    # dens[b]
    _accumulate(x, rows, w, starts[b], starts[b + 1], a, m, acc)
    _divide(dst, acc, m, dens[b])


@njit(cache=True, fastmath=_FAST)
def _bucket_means_cols(x, rows, starts, w, dens, out, dest, lo, hi, acc):  # pragma: no cover - compiled
    # columns [lo, hi) of every bucket's mean, _COLS at a time, each divided while the block is in cache and
    # written to its row dest[b] of out
    for a in range(lo, hi, _COLS):
        m = min(hi, a + _COLS) - a
        for b in range(starts.shape[0] - 1):
            _bucket_value(x, rows, starts, w, dens, b, a, m, acc, out[dest[b], a : a + m])


@njit(cache=True, fastmath=_FAST)
def _bucket_means_mean_cols(x, rows, starts, w, dens, out, lo, hi, acc, buf):  # pragma: no cover - compiled
    # columns [lo, hi) of the mean of the bucket values: each block of them in buf (nb, _COLS), then their mean
    # by the mean rule's own path (_bucket_value over buf's rows in order, weights 1, a true division by nb)
    nb = starts.shape[0] - 1
    across = np.arange(nb)
    whole = np.array([0, nb])
    ones = np.ones(nb, dtype=buf.dtype)
    count = np.full(1, nb, dtype=buf.dtype)
    for a in range(lo, hi, _COLS):
        m = min(hi, a + _COLS) - a
        for b in range(nb):
            _bucket_value(x, rows, starts, w, dens, b, a, m, acc, buf[b])
        _bucket_value(buf, across, whole, ones, count, 0, 0, m, acc, out[a : a + m])


@njit(parallel=True, cache=True)
def _bucket_means_mean(x, rows, starts, w, dens, out, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        _bucket_means_mean_cols(x, rows, starts, w, dens, out, t * chunk, min(d, (t + 1) * chunk),
                                np.empty(_COLS, dtype=out.dtype), np.empty((starts.shape[0] - 1, _COLS), out.dtype))
    return out


@njit(cache=True)
def _bucket_means_mean_serial(x, rows, starts, w, dens, out):  # pragma: no cover - compiled
    _bucket_means_mean_cols(x, rows, starts, w, dens, out, 0, x.shape[1], np.empty(_COLS, dtype=out.dtype),
                            np.empty((starts.shape[0] - 1, _COLS), out.dtype))
    return out


@njit(parallel=True, cache=True)
def _bucket_means(x, rows, starts, w, dens, out, dest, nthreads):  # pragma: no cover - compiled
    d = x.shape[1]
    chunk = (d + nthreads - 1) // nthreads
    for t in prange(nthreads):
        _bucket_means_cols(x, rows, starts, w, dens, out, dest, t * chunk, min(d, (t + 1) * chunk),
                           np.empty(_COLS, dtype=out.dtype))
    return out


@njit(cache=True)
def _bucket_means_serial(x, rows, starts, w, dens, out, dest):  # pragma: no cover - compiled
    _bucket_means_cols(x, rows, starts, w, dens, out, dest, 0, x.shape[1], np.empty(_COLS, dtype=out.dtype))
    return out


def _bucket_starts(name: str, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts as int64, bucket sizes), or a ValueError unless they cut ``rows`` into non-empty buckets."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    counts = np.diff(starts)
    if starts.ndim != 1 or starts.shape[0] < 2 or starts[0] != 0 or starts[-1] != rows.shape[0] or (counts < 1).any():
        raise ValueError(f"{name}: starts must run from 0 to {rows.shape[0]} in steps >= 1, got {starts}")
    return starts, counts


def bucket_means(x: np.ndarray, rows: np.ndarray, starts: np.ndarray, threads: int,
                 out: np.ndarray | None = None, dest: np.ndarray | None = None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """(buckets, d): row b the mean of ``x[rows[starts[b]:starts[b + 1]]]`` (every bucket non-empty), all buckets in
    one read of their rows. Bit for bit ``weighted_sum`` of ones over the bucket's rows (in their order, float32
    accumulation) then a true division by the count, as the mean rule computes each bucket.

    With ``out`` (a C-contiguous 2-D array of x's dtype and row length) bucket b is written into its row
    ``dest[b]`` (default b) and ``out`` is returned. ``out`` may be ``x``'s memory when no ``dest`` row is read:
    rows the caller no longer needs (DETOX's vote losers) then hold the means without a fresh allocation; any
    other view of x's memory is the caller's to keep apart from the rows read.

    With ``weights`` (one per entry of ``rows``) row b is instead the bucket's weighted sum, bit for bit
    ``weighted_sum`` of those weights over its rows (the division is by 1: exact)."""
    starts, counts = _bucket_starts("bucket_means", starts, rows)
    rows = _rows(x, rows)
    nb = counts.shape[0]
    if out is None:
        out = np.empty((nb, x.shape[1]), dtype=x.dtype)
    elif (out.ndim != 2 or out.shape[1] != x.shape[1] or out.dtype != x.dtype or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise ValueError(f"bucket_means: out must be a writable C-contiguous (k, {x.shape[1]}) {x.dtype} array, "
                         f"got {out.shape} {out.dtype}")
    if dest is None:
        dest = np.arange(nb, dtype=np.int64)
    elif (np.shape(dest) != (nb,) or np.unique(dest).shape != (nb,) or (np.asarray(dest) < 0).any()
          or (np.asarray(dest) >= out.shape[0]).any()
          or (out.ctypes.data == x.ctypes.data and np.isin(dest, rows).any())):
        raise ValueError(f"bucket_means: dest must be {nb} distinct rows of out (none of them read when out is x), "
                         f"got {dest}")
    else:
        dest = np.ascontiguousarray(dest, dtype=np.int64)
    w, dens = _bucket_weights("bucket_means", x, rows, counts, weights)
    threads = _threads(threads, x, rows, limit=_SERIAL_STREAM)
    if threads == 1:
        _bucket_means_serial(x, rows, starts, w, dens, out, dest)
    else:
        _bucket_means(x, rows, starts, w, dens, out, dest, threads)
    return out


def _bucket_weights(name: str, x: np.ndarray, rows: np.ndarray, counts: np.ndarray,
                    weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(per-row weights, per-bucket divisors): ones and the bucket sizes (means), or ``weights`` and ones (sums)."""
    if weights is None:
        return np.ones(rows.shape[0], dtype=x.dtype), counts.astype(x.dtype)
    w = np.ascontiguousarray(weights, dtype=x.dtype)
    if w.shape != rows.shape:
        raise ValueError(f"{name}: weights must give one weight per row, got {w.shape} for {rows.shape}")
    return w, np.ones(counts.shape[0], dtype=x.dtype)


def bucket_means_mean(x: np.ndarray, rows: np.ndarray, starts: np.ndarray, threads: int,
                      out: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """(d,): the ``mean`` rule over the rows ``bucket_means`` would return (with ``weights``: the buckets' weighted
    sums), bit for bit, in one pass: each block of bucket values stays in a cache-resident buffer, so they are never
    written out. DETOX-Multi-Krum's step (the original's preset: Multi-Krum in 2 buckets, the mean across). Written
    into ``out`` when given (see ``_out``)."""
    starts, counts = _bucket_starts("bucket_means_mean", starts, rows)
    rows = _rows(x, rows)
    out = _out(x, out)
    w, dens = _bucket_weights("bucket_means_mean", x, rows, counts, weights)
    threads = _threads(threads, x, rows, limit=_SERIAL_STREAM)
    if threads == 1:
        return _bucket_means_mean_serial(x, rows, starts, w, dens, out)
    return _bucket_means_mean(x, rows, starts, w, dens, out, threads)


# columns per block of bucket_middle_mean: (buckets + 3) rows of 8 KiB stay in L2, and each of the bucket rows is
# read in 8 KiB runs (at 256 columns, as middle_mean's blocks, it was ~10% slower at d = 1e5)
_BUCKET_BLOCK = 2048
# measured at d = 1e5 / 3e4 / 1e4 (15 rows in 5 buckets, serial vs 2 threads, us): 322/219, 98/99, 32/44
_SERIAL_BUCKETS = 1 << 19


@njit(fastmath=_FAST, cache=True)
def _bucket_middle_block(x, rows, starts, w, dens, start, width, net, lo, hi, buf, out):  # pragma: no cover
    # each bucket's mean on the block, as _bucket_means_cols computes it (the same operations per element), into
    # row b of buf; then NaN as +inf and the network, as _block does for rows gathered from x. The sums go to
    # buf's last row: a division in place would not vectorise (LLVM's overlap check sends it to the scalar loop)
    nb = starts.shape[0] - 1
    acc = buf[nb + 2]
    for b in range(nb):
        mean = buf[b]
        _bucket_value(x, rows, starts, w, dens, b, start, width, acc, mean)
        for j in range(width):
            v = mean[j]
            mean[j] = np.inf if v != v else v
    pos, f1 = _run_network(buf, nb, net, width)
    _kept_mean(buf, pos, f1, lo, hi, start, width, out)


@njit(parallel=True, cache=True)
def _bucket_middle_mean(x, rows, starts, w, dens, net, lo, hi, block, nthreads, out):  # pragma: no cover
    d = x.shape[1]
    for t in prange(nthreads):
        buf = np.empty((starts.shape[0] + 2, block), dtype=x.dtype)  # buckets, 2 free rows, the sums; per thread
        c0, c1 = _col_range(d, nthreads, t)
        for start in range(c0, c1, block):
            _bucket_middle_block(x, rows, starts, w, dens, start, min(block, c1 - start), net, lo, hi, buf, out)
    return out


@njit(cache=True)
def _bucket_middle_mean_serial(x, rows, starts, w, dens, net, lo, hi, block, out):  # pragma: no cover
    d = x.shape[1]
    buf = np.empty((starts.shape[0] + 2, block), dtype=x.dtype)
    for b in range((d + block - 1) // block):
        start = b * block
        _bucket_middle_block(x, rows, starts, w, dens, start, min(block, d - start), net, lo, hi, buf, out)
    return out


def bucket_middle_mean(x: np.ndarray, rows: np.ndarray, starts: np.ndarray, lo: int, hi: int, threads: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """``middle_mean`` over the bucket means (``bucket_means``' buckets: ``x[rows[starts[b]:starts[b + 1]]]``),
    bit for bit, in one pass over the buckets' rows: each block of bucket means stays in a cache-resident
    buffer, so the (buckets, d) matrix of means is never written. DETOX's coord-median preset (mean inside
    5 buckets, median across) every step. Written into ``out`` when given (see ``_out``)."""
    starts, counts = _bucket_starts("bucket_middle_mean", starts, rows)
    nb = counts.shape[0]
    if not 0 <= lo < hi <= nb:
        raise ValueError(f"bucket_middle_mean: need 0 <= lo < hi <= {nb} buckets, got lo={lo} hi={hi}")
    rows = _rows(x, rows)
    out = _out(x, out)
    threads = _threads(threads, x, rows, limit=_SERIAL_BUCKETS)
    unrolled = None
    if nb <= _UNROLL_ROWS and rows.shape[0] <= _UNROLL_BUCKET_ROWS and rows.shape[0] * x.shape[1] >= _UNROLL_ELEMS:
        unrolled = _unrolled(nb, int(lo), int(hi), tuple(counts.tolist()))
    if unrolled is not None:
        return run_unrolled(unrolled, x, rows, threads, out)
    net = selection_network(nb, int(lo), int(hi))
    w, dens = _bucket_weights("bucket_middle_mean", x, rows, counts, None)
    if threads == 1:
        return _bucket_middle_mean_serial(x, rows, starts, w, dens, net, int(lo), int(hi), _BUCKET_BLOCK, out)
    return _bucket_middle_mean(x, rows, starts, w, dens, net, int(lo), int(hi), _BUCKET_BLOCK, threads, out)


# ------------------------------------------------------------------------------------- Krum's distances and scores
# Small (n, n) float64 work that used to be a dozen torch/numpy calls per rule call (~0.5 ms at d = 1e3): one
# compiled call each, with numpy's and torch's arithmetic reproduced operation for operation (same results).


@njit(cache=True)
def _sq_dists_from_gram(gram, diagonal):  # pragma: no cover - compiled
    n = gram.shape[0]
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            # (sq_i + sq_j) - 2 g_ij, clamped at 0, NaN -> +inf: the order torch evaluated it in
            v = (gram[i, i] + gram[j, j]) - 2.0 * gram[i, j]
            if v != v:
                v = np.inf
            elif v < 0.0:
                v = 0.0
            out[i, j] = v
    for i in range(n):
        if not np.isfinite(gram[i, i]):  # a hostile row spoils its own row and column, nothing else
            for j in range(n):
                out[i, j] = np.inf
                out[j, i] = np.inf
    for i in range(n):
        out[i, i] = diagonal
    return out


def sq_dists_from_gram(gram: np.ndarray, diagonal: float) -> np.ndarray:
    """(n, n) squared distances ||a||^2 + ||b||^2 - 2<a, b> from a float64 Gram matrix, clamped at 0; a row
    whose squared norm is not finite is +inf from every other row, NaN is +inf; the diagonal is ``diagonal``."""
    return _sq_dists_from_gram(np.ascontiguousarray(gram, dtype=np.float64), float(diagonal))


@njit(fastmath=_FAST, cache=True)
def _segment_gram(x, rows, a, b, buf, acc):  # pragma: no cover - compiled
    """acc = float64 Gram matrix of columns [a, b) of x[rows] minus the first selected row (exact differences),
    in L1-sized column chunks (the chunks' dot products summed in column order). The differences are taken once
    per chunk, into buf (n, _CHUNK) float64: taken where the tiles use them, as the float32 kernel does, they were
    1.3x slower in float64."""
    n = rows.shape[0]
    acc[:] = 0.0
    iota = np.arange(n)
    for c0 in range(a, b, _CHUNK):
        w = min(b, c0 + _CHUNK) - c0
        first = x[rows[0], c0 : c0 + w]
        for r in range(n):
            src = x[rows[r], c0 : c0 + w]
            dst = buf[r]
            for j in range(w):
                dst[j] = np.float64(src[j]) - np.float64(first[j])
        _gram_tiles(buf, iota, 0, w, None, 0.0, acc)
    for i in range(n):
        for k in range(i):
            acc[i, k] = acc[k, i]


@njit(cache=True)
def _rank(gram, k):  # pragma: no cover - compiled
    n = gram.shape[0]
    scores = np.empty(n)
    row = np.empty(n)
    big = np.finfo(np.float64).max
    for i in range(n):
        for j in range(n):
            v = (gram[i, i] + gram[j, j]) - 2.0 * gram[i, j]
            # as torch.nan_to_num(nan=inf) did: NaN (a NaN row) -> +inf, +inf (an inf row) -> the largest float
            row[j] = np.inf if v != v else (0.0 if v < 0.0 else (big if v == np.inf else v))
        row[i] = np.inf
        scores[i] = _pairwise_sum(np.sort(row), 0, k)
    return np.argsort(scores, kind="mergesort")


@njit(parallel=True, cache=True)
def _candidate_ranking(x, rows, starts, ends, k, nthreads):  # pragma: no cover - compiled
    n = rows.shape[0]
    nseg = starts.shape[0]
    part = np.empty((nseg, n, n))
    for t in prange(nthreads):
        buf = np.empty((n, _CHUNK))
        for g in range(t, nseg, nthreads):
            _segment_gram(x, rows, starts[g], ends[g], buf, part[g])
    gram = part[0].copy()
    for g in range(1, nseg):  # in segment order, whatever the thread count
        gram += part[g]
    return _rank(gram, k)


@njit(cache=True)
def _candidate_ranking_serial(x, rows, starts, ends, k):  # pragma: no cover - compiled
    n = rows.shape[0]
    buf = np.empty((n, _CHUNK))
    gram = np.empty((n, n))
    part = np.empty((n, n))
    _segment_gram(x, rows, starts[0], ends[0], buf, gram)
    for g in range(1, starts.shape[0]):
        _segment_gram(x, rows, starts[g], ends[g], buf, part)
        gram += part
    return _rank(gram, k)


# columns per sampled segment when ranking reference-row candidates (detox.aggregators._candidates), and per
# chunk of one (45 float64 rows of 128 columns stay in L1: 2x faster than whole segments from L2)
_SEGMENT = 2048
_CHUNK = 128


def _sample_segments(name: str, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sampled column segments [starts, ends) as writable int64 copies, each at most _SEGMENT wide. Writable: the
    caller's may be read-only (cached), and numba compiles read-only arrays as another specialisation, which made
    the vote's loops 2x slower (issue #15)."""
    starts = np.array(starts, dtype=np.int64)
    ends = np.array(ends, dtype=np.int64)
    if int((ends - starts).max()) > _SEGMENT:
        raise ValueError(f"{name}: segments are at most {_SEGMENT} columns")
    return starts, ends


def _ranking_threads(threads: int, n: int, starts: np.ndarray, ends: np.ndarray) -> int:
    """Threads ``candidate_ranking`` splits the ranking of n rows on the segments across (one below _SERIAL_PAIRS
    pair-columns, at most one per segment)."""
    pairs = n * (n + 1) // 2 * int((ends - starts).sum())
    return min(_pool(threads) if pairs >= _SERIAL_PAIRS else 1, starts.shape[0])


def candidate_ranking(x: np.ndarray, rows: np.ndarray | None, starts: np.ndarray, ends: np.ndarray, k: int,
                      threads: int) -> np.ndarray:
    """Rows of ``x[rows]`` (positions) ranked by the sum of their k smallest squared distances to the other rows
    (stable: ties to the lower position) on the sampled columns [starts[g], ends[g]) (each at most 2048 wide).

    float64 throughout: per segment the exact differences from the first selected row and their Gram matrix,
    summed in segment order, so the ranking is the same on any number of threads (MKL's product, used before,
    rounds differently on 1 and 2 threads). One compiled call: ~0.1 ms at n = 45, d = 1e3."""
    starts, ends = _sample_segments("candidate_ranking", starts, ends)
    idx = _rows(x, rows)
    n = idx.shape[0]
    threads = _ranking_threads(threads, n, starts, ends)
    if threads == 1:
        return _candidate_ranking_serial(x, idx, starts, ends, int(k))
    return _candidate_ranking(x, idx, starts, ends, int(k), threads)


@njit(cache=True)
def _bucket_gram(x, rows, starts, ks, seg_starts, seg_ends, block, b, refs, grams):  # pragma: no cover - compiled
    # bucket b on one thread: its best-ranked candidate (candidate_ranking) as the reference row, then its centred
    # Gram matrix (centred_gram on one thread)
    idx = rows[starts[b] : starts[b + 1]]
    n = idx.shape[0]
    best = 0 if n == 1 else _candidate_ranking_serial(x, idx, seg_starts, seg_ends, ks[b])[0]
    refs[b] = idx[best]
    grams[b, :n, :n] = _centred_gram_serial(x, idx, x[idx[best]], block)


@njit(parallel=True, cache=True)
def _bucket_grams(x, rows, starts, ks, seg_starts, seg_ends, block, refs, grams):  # pragma: no cover - compiled
    for b in prange(starts.shape[0] - 1):
        _bucket_gram(x, rows, starts, ks, seg_starts, seg_ends, block, b, refs, grams)


@njit(cache=True)
def _bucket_grams_serial(x, rows, starts, ks, seg_starts, seg_ends, block, refs, grams):  # pragma: no cover
    for b in range(starts.shape[0] - 1):
        _bucket_gram(x, rows, starts, ks, seg_starts, seg_ends, block, b, refs, grams)


def bucket_grams(x: np.ndarray, buckets: list[np.ndarray], ks: list[int], seg_starts: np.ndarray,
                 seg_ends: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For each bucket of rows of ``x``: the best row of ``candidate_ranking`` (``ks[b]`` neighbours, on the
    sampled columns [seg_starts, seg_ends)) and the Gram matrix of the bucket centred on that row, as
    ``centred_gram`` computes it on one thread. The buckets run side by side, one per thread, in one pass
    through the pool: DETOX's Multi-Krum inside each bucket (the original's preset) at the MLP twins' d, where
    each bucket alone is too small to split across threads.

    Returns (refs, grams): refs[b] the reference row (an index into x), grams[b, :n_b, :n_b] bucket b's Gram
    matrix; or None where a bucket is large enough that ``centred_gram`` would split it across threads (its
    result then rounds differently: the caller runs the buckets one by one)."""
    layout = _side_by_side("bucket_grams", x, buckets, seg_starts, seg_ends, threads)
    if layout is None:
        return None
    rows, starts, seg_starts, seg_ends, pooled = layout
    sizes = np.diff(starts)
    refs = np.empty(len(buckets), dtype=np.int64)
    grams = np.zeros((len(buckets), sizes.max(), sizes.max()))
    run = _bucket_grams if pooled else _bucket_grams_serial
    run(x, rows, starts, np.asarray(ks, dtype=np.int64), seg_starts, seg_ends, BLOCK * 4, refs, grams)
    return refs, grams


def _side_by_side(name: str, x: np.ndarray, buckets: list[np.ndarray], seg_starts: np.ndarray, seg_ends: np.ndarray,
                  threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool] | None:
    """Where the buckets' Gram matrices can run side by side (none would be split across threads; else None):
    their rows and starts, the sampled segments as writable int64 copies (see candidate_ranking), and whether
    they go through the pool."""
    sizes = [int(b.shape[0]) for b in buckets]
    if threads > 1 and any(_gram_threads(threads, x, n) > 1 for n in sizes):
        return None
    rows = np.ascontiguousarray(np.concatenate(buckets), dtype=np.int64)
    starts = np.array([0, *itertools.accumulate(sizes)], dtype=np.int64)
    seg_starts, seg_ends = _sample_segments(name, seg_starts, seg_ends)
    return rows, starts, seg_starts, seg_ends, min(threads, len(buckets), numba.config.NUMBA_NUM_THREADS) > 1


@njit(cache=True)
def _lowest_krum(gram, k, m):  # pragma: no cover - compiled
    # positions of the m lowest Krum scores (k nearest, +inf diagonal), ascending: bit for bit
    # np.sort(_lowest(_scores(sq_dists_from_gram(gram, inf), k), m)) (numpy's sort, pairwise sum, stable argsort)
    n = gram.shape[0]
    d2 = _sq_dists_from_gram(np.ascontiguousarray(gram), np.inf)
    scores = np.zeros(n)
    if k > 0:
        for i in range(n):
            scores[i] = _pairwise_sum(np.sort(d2[i]), 0, k)
    return np.sort(np.argsort(scores, kind="mergesort")[:m])


@njit(cache=True)
def _multi_krum_means_mean(x, rows, starts, ks, ms, seg_starts, seg_ends, block, pooled, stream, nthreads,
                           out):  # pragma: no cover - compiled
    # bucket_grams, each bucket's Multi-Krum choice from its matrix, bucket_means_mean of the chosen rows with
    # weights 1/m: what mean_of_bucket_multi_krum's three calls compute, in one (False: a bucket whose every
    # squared norm is non-finite, nothing written; the rule's own path takes it)
    nb = starts.shape[0] - 1
    refs = np.empty(nb, dtype=np.int64)
    size = 0
    for b in range(nb):
        size = max(size, starts[b + 1] - starts[b])
    grams = np.zeros((nb, size, size))
    if pooled:
        _bucket_grams(x, rows, starts, ks, seg_starts, seg_ends, block, refs, grams)
    else:
        _bucket_grams_serial(x, rows, starts, ks, seg_starts, seg_ends, block, refs, grams)
    chosen = np.empty(rows.shape[0], dtype=np.int64)
    cstarts = np.zeros(nb + 1, dtype=np.int64)
    w = np.empty(rows.shape[0], dtype=x.dtype)
    for b in range(nb):
        n = starts[b + 1] - starts[b]
        gram = grams[b, :n, :n]
        finite = False
        for i in range(n):
            finite = finite or np.isfinite(gram[i, i])
        if n > 1 and not finite:
            return False
        idx = _lowest_krum(gram, ks[b], ms[b])
        c = cstarts[b]
        for i in range(idx.shape[0]):
            chosen[c + i] = rows[starts[b] + idx[i]]
            w[c + i] = 1.0 / idx.shape[0]  # rounded to x's dtype as numpy's cast rounds it
        cstarts[b + 1] = c + idx.shape[0]
    chosen = chosen[: cstarts[nb]]
    dens = np.ones(nb, dtype=x.dtype)
    if chosen.shape[0] * x.shape[1] < stream or nthreads == 1:
        _bucket_means_mean_serial(x, chosen, cstarts, w[: cstarts[nb]], dens, out)
    else:
        _bucket_means_mean(x, chosen, cstarts, w[: cstarts[nb]], dens, out, nthreads)
    return True


def multi_krum_means_mean(x: np.ndarray, buckets: list[np.ndarray], neighbours: list[int], ms: list[int],
                          seg_starts: np.ndarray, seg_ends: np.ndarray, threads: int,
                          out: np.ndarray | None = None) -> np.ndarray | None:
    """The mean over the buckets of each bucket's Multi-Krum (scores over ``neighbours[b]`` nearest rows, in
    [1, n - 1], which also rank its reference row; the ``ms[b]`` rows of lowest score): bit for bit ``bucket_grams``,
    the rule's choice from each matrix and ``bucket_means_mean`` with weights 1/m, in one compiled call.
    DETOX-Multi-Krum's step at the MLP twins' d, where the Python between those calls, run with the rows just
    arrived and the interpreter out of cache, cost as much as their work (issue #15). None where a bucket's matrix
    would be split across threads, or a bucket has no row of finite squared norm (the caller's path handles both)."""
    layout = _side_by_side("multi_krum_means_mean", x, buckets, seg_starts, seg_ends, threads)
    if layout is None:
        return None
    rows, starts, seg_starts, seg_ends, pooled = layout
    # checked in Python: on two buckets each numpy call costs more than the loop (the step's Python runs cold)
    if len(neighbours) != len(buckets) or not all(1 <= k < len(b) for k, b in zip(neighbours, buckets, strict=True)):
        raise ValueError(f"multi_krum_means_mean: neighbours must be in [1, n - 1] per bucket, got {neighbours}")
    if len(ms) != len(buckets) or not all(1 <= m <= len(b) for m, b in zip(ms, buckets, strict=True)):
        raise ValueError(f"multi_krum_means_mean: m must be in [1, n] per bucket, got {ms}")
    out = _out(x, out)
    done = _multi_krum_means_mean(x, rows, starts, np.array(neighbours, dtype=np.int64), np.array(ms, dtype=np.int64),
                                  seg_starts, seg_ends, BLOCK * 4, pooled, _SERIAL_STREAM, _pool(threads), out)
    return out if done else None


# Gram blocks (BLOCK * 4 columns) the vote + Gram pass takes at once: each row it compares then streams 16 KiB at a
# time (4 KiB pieces of 30 rows ran at half the vote's own speed), and a bucket's rows are still in L2 when its
# Gram blocks are formed
_SPAN = 4


@njit(parallel=True, cache=True)
def _vote_grams(x, xv, r, need, tol, fast, rows, bstarts, refs, block, nthreads, differ, part,
                starts, ends, eqs):  # pragma: no cover - compiled
    d = x.shape[1]
    for t in prange(nthreads):
        lo, hi = _block_range(d, block, nthreads, t)
        for b0 in range(lo, hi, _SPAN):
            b1 = min(hi, b0 + _SPAN)
            s = b0 * block
            e = min(d, b1 * block)
            for q in range(bstarts.shape[0] - 1):
                idx = rows[bstarts[q] : bstarts[q + 1]]
                for i in range(idx.shape[0]):
                    g = idx[i] // r
                    base = g * r
                    for j in range(1, need):  # _majority_first, these columns
                        if fast[g] and not differ[t, g] and _differs(xv[base], xv[base + j], s, e, tol):
                            differ[t, g] = True
                    if not fast[g] and eqs.shape[1] > 0:  # Boyer-Moore's layer pass, these columns
                        _layer_eq(xv, base, r, tol, starts, ends, s, e, eqs[t, g])
                _gram_blocks(x, idx, x[refs[q]], block, b0, b1, part[t, q])


def vote_grams(x: np.ndarray, xv: np.ndarray, r: int, need: int, tol: float, honest: np.ndarray,
               buckets: list[np.ndarray], refs: list[int], threads: int, starts: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """Two stages of DETOX's step in one pass through the rows, where each alone streams the same rows: the vote's
    check that a group's first ``need`` members agree (``_majority_first`` on ``xv``, the rows the vote compares,
    for the groups whose first ``need`` members are ``honest``), and the Gram matrix of each bucket of rows of
    ``x`` centred on its row ``refs[b]``, exactly as ``centred_gram`` on ``threads`` threads computes it.

    With ``starts`` (the first column of each layer: the Boyer-Moore vote) the pass also compares every pair of
    members, layer by layer, of the groups it does not check that way (a non-honest among their first ``need``),
    which the vote would otherwise read again (``boyer_moore_vote``'s ``known``, ``eqs``).

    Returns (settled, grams, known, eqs): per group of r rows, whether that check passed over every column (the
    vote's result for it: its first row wins, ``strict_vote``/``boyer_moore_vote``'s ``settled``); per bucket its
    Gram matrix, valid where its rows are the vote's winners, which is for the caller to check; the groups whose
    layers were compared and how their members agree per layer (None without ``starts``)."""
    k = x.shape[0] // r
    honest = np.asarray(honest, dtype=bool)[: k * r].reshape(k, r)
    fast = np.ascontiguousarray(honest[:, :need].all(axis=1))
    rows = np.ascontiguousarray(np.concatenate(buckets), dtype=np.int64)
    sizes = [int(b.shape[0]) for b in buckets]
    bstarts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    width = max(sizes)
    differ = np.zeros((threads, k), dtype=np.bool_)
    part = np.zeros((threads, len(buckets), width, width))
    bm = starts is not None
    starts, ends = _layer_bounds(starts if bm else [0], x.shape[1])
    eqs = np.ones((threads, k if bm else 0, r, r, starts.shape[0]), dtype=np.bool_)
    _vote_grams(x, xv, int(r), int(need), _tol(xv, tol), fast, rows, bstarts, np.asarray(refs, dtype=np.int64),
                BLOCK * 4, int(threads), differ, part, starts, ends, eqs)
    grams = [_sum_parts(np.ascontiguousarray(part[:, b, :n, :n])) for b, n in enumerate(sizes)]
    known = ~fast if bm else None
    return fast & ~differ.any(axis=0), grams, known, eqs.all(axis=0) if bm else None


@njit(cache=True)
def _pairwise_block(a, s, n):  # pragma: no cover - compiled
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[s + i]
        return res
    r0 = a[s]
    r1 = a[s + 1]
    r2 = a[s + 2]
    r3 = a[s + 3]
    r4 = a[s + 4]
    r5 = a[s + 5]
    r6 = a[s + 6]
    r7 = a[s + 7]
    i = 8
    while i < n - (n % 8):
        r0 += a[s + i]
        r1 += a[s + i + 1]
        r2 += a[s + i + 2]
        r3 += a[s + i + 3]
        r4 += a[s + i + 4]
        r5 += a[s + i + 5]
        r6 += a[s + i + 6]
        r7 += a[s + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[s + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum(a, s, n):  # pragma: no cover - compiled
    """numpy's pairwise summation of a[s : s + n] (``np.add.reduce`` on a contiguous float64 run): 8 partial
    sums up to 128 elements, the two halves (split at a multiple of 8) above; reproduced so that the compiled
    scores equal numpy's bit for bit. numpy recurses; here an explicit stack does (numba's cache cannot hold a
    recursive function: a cached one crashes when it is loaded)."""
    if n <= 128:
        return _pairwise_block(a, s, n)
    starts = np.empty(192, dtype=np.int64)  # frames: (start, length, children pushed)
    sizes = np.empty(192, dtype=np.int64)
    open_ = np.zeros(192, dtype=np.bool_)
    vals = np.empty(192)
    top = 0
    nv = 0
    starts[0] = s
    sizes[0] = n
    while top >= 0:
        cs = starts[top]
        cn = sizes[top]
        if cn <= 128:
            vals[nv] = _pairwise_block(a, cs, cn)
            nv += 1
            top -= 1
        elif open_[top]:  # both halves done: left + right, as numpy adds them
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            open_[top] = False
            top -= 1
        else:
            n2 = cn // 2
            n2 -= n2 % 8
            open_[top] = True
            starts[top + 1] = cs + n2  # the right half below the left one: the left is summed first
            sizes[top + 1] = cn - n2
            open_[top + 1] = False
            starts[top + 2] = cs
            sizes[top + 2] = n2
            open_[top + 2] = False
            top += 2
    return vals[0]


@njit(cache=True)
def _before(a, b):  # pragma: no cover - compiled
    """a sorts strictly before b (numpy's order: NaN last)."""
    return a < b or (b != b and a == a)


@njit(cache=True)
def _iterative_selection(d2, f, theta, k_fixed):  # pragma: no cover - compiled
    n = d2.shape[0]
    # each row's columns in ascending order once: restricted to the rows left it is still ascending, so the k
    # smallest distances among them are the first k left in that order (equal values are interchangeable)
    order = np.empty((n, n), dtype=np.int64)
    for i in range(n):
        order[i] = np.argsort(d2[i], kind="mergesort")
    alive = np.ones(n, dtype=np.bool_)
    chosen = np.empty(theta, dtype=np.int64)
    vals = np.empty(n)
    for it in range(theta):
        size = n - it
        k = size - f - 2 if k_fixed < 0 else k_fixed
        k = min(max(k, 0), size - 1)
        best = -1
        best_score = 0.0
        for i in range(n):
            if not alive[i]:
                continue
            score = 0.0
            if k > 0:
                c = 0
                for t in range(n):
                    j = order[i, t]
                    if alive[j]:
                        vals[c] = d2[i, j]
                        c += 1
                        if c == k:
                            break
                score = _pairwise_sum(vals, 0, k)
            if best < 0 or _before(score, best_score):  # ties: the lower row
                best = i
                best_score = score
        chosen[it] = best
        alive[best] = False
    return np.sort(chosen)


def iterative_selection(d2: np.ndarray, f: int, theta: int, k_fixed: int | None) -> np.ndarray:
    """Bulyan's selection (El Mhamdi et al. 2018) from (n, n) float64 squared distances with +inf on the
    diagonal: theta times, the Krum choice among the rows not yet selected (|R| - f - 2 neighbours, or
    ``k_fixed``, clipped to [0, |R| - 1]; ties to the lower row) moves to the selection. Returns the selected
    rows sorted; the same rows as ``detox.aggregators._iterative_selection_reference``."""
    return _iterative_selection(np.ascontiguousarray(d2, dtype=np.float64), int(f), int(theta),
                                -1 if k_fixed is None else int(k_fixed))


@njit(cache=True)
def _bulyan_selection(x, rows, seg_starts, seg_ends, kr, k, f, theta, k_fixed, iterative, rank_threads,
                      gram_threads, block):  # pragma: no cover - compiled
    # Bulyan's selection over x[rows] as aggregators._bulyan_checked computes it without a Gram matrix given: the
    # reference row (candidate_ranking, kr neighbours), the centred Gram matrix, then the one-pass choice of the theta
    # lowest Krum scores (k neighbours) or the iterative one. x's rows, ascending; empty where no centred squared norm
    # is finite (the reference row itself is not: the rule's own path then centres on a finite row)
    n = rows.shape[0]
    best = 0
    if n > 1:
        if rank_threads > 1:
            best = _candidate_ranking(x, rows, seg_starts, seg_ends, kr, rank_threads)[0]
        else:
            best = _candidate_ranking_serial(x, rows, seg_starts, seg_ends, kr)[0]
    ref = x[rows[best]]
    if gram_threads > 1:
        gram = _centred_gram(x, rows, ref, block, gram_threads)
    else:
        gram = _centred_gram_serial(x, rows, ref, block)
    finite = n == 1
    for i in range(n):
        finite = finite or np.isfinite(gram[i, i])
    if not finite:
        return np.empty(0, dtype=np.int64)
    if iterative:
        sel = _iterative_selection(_sq_dists_from_gram(gram, np.inf), f, theta, k_fixed)
    else:
        sel = _lowest_krum(gram, k, theta)
    return rows[sel]


def bulyan_selector(n: int, d: int, f: int, theta: int, k: int, k_fixed: int | None, iterative: bool,
                    seg_starts: np.ndarray, seg_ends: np.ndarray, threads: int,
                    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray | None]:
    """``select(x, rows)``: the rows Bulyan selects among n rows ``rows`` of a C-contiguous float32 (., d) ``x``, as
    ``aggregators.bulyan`` selects them on ``threads`` threads (its reference row ranked on the sampled columns
    [seg_starts, seg_ends), its centred Gram matrix, theta rows by the one-pass choice over k neighbours or, with
    ``iterative``, by repeated Krum with ``k_fixed`` neighbours or |R| - f - 2), in one compiled call with the thread
    counts resolved once: DETOX-Bulyan's step, where the Python between those calls cost ~0.2 ms a step with the
    interpreter out of cache (issue #15). x's rows, ascending; None where no centred squared norm is finite (the
    reference row is not: ``aggregators.bulyan`` then re-centres on a finite row)."""
    seg_starts, seg_ends = _sample_segments("bulyan_selector", seg_starts, seg_ends)
    rank_threads = _ranking_threads(threads, n, seg_starts, seg_ends)
    gram_threads = _gram_threads_d(threads, d, n)
    kr = min(max(k, 1), n - 1)
    args = (int(kr), int(k), int(f), int(theta), -1 if k_fixed is None else int(k_fixed), bool(iterative),
            int(rank_threads), int(gram_threads), BLOCK * 4)

    def select(x: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        chosen = _bulyan_selection(x, rows, seg_starts, seg_ends, *args)
        return chosen if chosen.shape[0] else None

    select.threads = (rank_threads, gram_threads)  # as candidate_ranking and centred_gram split (tests check)
    return select


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


@njit(cache=True)
def _honest_first(honest, base, need):  # pragma: no cover - compiled
    """Whether the group's first ``need`` members are honest."""
    for j in range(need):
        if not honest[base + j]:
            return False
    return True


@njit(cache=True)
def _majority_first(x, base, r, need, tol, js, live):  # pragma: no cover - compiled
    """Whether the group's first ``need`` members equal its first. Where they are also honest
    (``_honest_first``), member 0 wins either vote (Boyer-Moore's count for it cannot fall to 0 over the r - need
    others, and it is the first class of need members), with no fallback and enough honest support, whatever the
    others sent; so their rows are not read (2 rows of 3: the vote's traffic is what it costs, issue #15)."""
    for j in range(r):
        js[j] = base + j
        live[j] = 0 < j < need
    return _compare_many(x, base, _VOTE_COLS, js, live, 0, x.shape[1], tol) == need - 1


@njit(cache=True)
def _strict_vote_group(x, g, r, need, tol, honest, leader, member):  # pragma: no cover - compiled
    claimed = np.zeros(r, dtype=np.bool_)
    js = np.empty(r, dtype=np.int64)
    live = np.zeros(r, dtype=np.bool_)
    d = x.shape[1]
    if _honest_first(honest, g * r, need) and _majority_first(x, g * r, r, need, tol, js, live):
        leader[g] = 0
        for j in range(need):  # the class as far as it was read: enough to count its honest support
            member[g, j] = True
        return
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
            return
        if r - i - 1 < need:  # too few members left to form a majority
            return


@njit(parallel=True, cache=True)
def _strict_vote(x, r, need, tol, honest, groups, leader, member):  # pragma: no cover - compiled
    for i in prange(groups.shape[0]):
        _strict_vote_group(x, groups[i], r, need, tol, honest, leader, member)


@njit(cache=True)
def _strict_vote_serial(x, r, need, tol, honest, groups, leader, member):  # pragma: no cover - compiled
    # _strict_vote on one thread, without entering the thread pool (see _threads); a function of its own name:
    # numba's cache index is keyed by name and bytecode, not by parallel=, so njit(f.py_func) would share f's
    # cache entry and either dispatcher could load the other's code
    for i in range(groups.shape[0]):
        _strict_vote_group(x, groups[i], r, need, tol, honest, leader, member)


def strict_vote(x: np.ndarray, r: int, need: int, tol: float, honest: np.ndarray | None = None,
                settled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The strict-majority vote of every contiguous group of r rows of ``x`` (C-contiguous; an integer view of
    the rows' bits when tol <= 0, the float rows otherwise).

    Per group, member i (in order, unclaimed) claims every later unclaimed member equal to it; the first class
    of at least ``need`` members wins. Returns (k,) the winning member or -1, and (k, r) its class: complete,
    except where the first ``need`` members are ``honest`` (default: all) and agree, which decides the group
    unread further (``_majority_first``): there the class lists those ``need``. ``settled`` (k,): groups already
    found so (``vote_grams``), given that result unread."""
    k = x.shape[0] // r
    leader = np.full(k, -1, dtype=np.int64)
    member = np.zeros((k, r), dtype=np.bool_)
    honest = np.ones(k * r, dtype=np.int64) if honest is None else np.ascontiguousarray(honest, np.int64)
    groups = _unsettled(k, settled)
    if settled is not None:
        leader[settled] = 0
        member[settled, :need] = True
    vote = _strict_vote if _vote_threads(x, groups.shape[0] * r) > 1 else _strict_vote_serial
    vote(x, int(r), int(need), _tol(x, tol), honest, groups, leader, member)
    return leader, member


def _unsettled(k: int, settled: np.ndarray | None) -> np.ndarray:
    """The groups a vote still reads: all k, or those not ``settled``."""
    return np.arange(k, dtype=np.int64) if settled is None else np.flatnonzero(~settled).astype(np.int64)


def _vote_threads(x: np.ndarray, rows: int) -> int:
    """Threads for a vote over ``rows`` rows of ``x``: numba's (training's ``threads``), one below _SERIAL_VOTE
    elements (the vote streams its rows like a sum, but stops a group's comparison at its first difference)."""
    return _threads(numba.get_num_threads(), x, None, rows * x.shape[1], _SERIAL_VOTE)


def _tol(x: np.ndarray, tol: float) -> np.floating:
    # torch compares a float32 difference with a Python float in float32: so does the kernel
    return x.dtype.type(tol) if x.dtype.kind == "f" else np.float64(0.0)


@njit(cache=True)
def _bm_vote_group(x, g, r, need, tol, starts, ends, honest, write,
                   win, fallback, corrupted, cands):  # pragma: no cover - compiled
    base = g * r
    js = np.empty(r, dtype=np.int64)
    live = np.zeros(r, dtype=np.bool_)
    if _honest_first(honest, base, need) and _majority_first(x, base, r, need, tol, js, live):
        win[g] = base  # member 0 wins every layer (see _majority_first)
        return
    # eq[i, j, l]: members i and j send the same values on layer l; one pass over the group, layer by layer (a
    # unanimous group comes out of it as member 0 winning every layer with everyone's support; checking for that
    # first read its rows twice whenever it was not: 4 rows where a Byzantine member 0 or 1 attacks)
    eq = np.ones((r, r, starts.shape[0]), dtype=np.bool_)
    _layer_eq(x, base, r, tol, starts, ends, 0, x.shape[1], eq)
    _bm_decide(x, g, r, need, starts, ends, honest, write, eq, win, fallback, corrupted, cands)


@njit(cache=True)
def _layer_eq(x, base, r, tol, starts, ends, lo, hi, eq):  # pragma: no cover - compiled
    # clears eq[i, j, l] where members i and j of the group at row base differ on layer l's columns in [lo, hi)
    layer = max(0, np.searchsorted(starts, lo, side="right") - 1)
    while layer < starts.shape[0] and starts[layer] < hi:
        c = max(starts[layer], lo)
        e = min(ends[layer], hi)
        while c < e:
            m = min(e, c + _VOTE_COLS)
            for i in range(r):
                for j in range(i + 1, r):
                    if eq[i, j, layer] and _differs(x[base + i], x[base + j], c, m, tol):
                        eq[i, j, layer] = False
                        eq[j, i, layer] = False
            c = m
        layer += 1


@njit(cache=True)
def _bm_decide(x, g, r, need, starts, ends, honest, write, eq,
               win, fallback, corrupted, cands):  # pragma: no cover - compiled
    # group g's Boyer-Moore vote from eq (see _bm_vote_group)
    n_layers = starts.shape[0]
    base = g * r
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


@njit(parallel=True, cache=True)
def _bm_vote(x, r, need, tol, starts, ends, honest, write, groups, known, eqs,
             win, fallback, corrupted, cands):  # pragma: no cover - compiled
    for i in prange(groups.shape[0]):
        _bm_vote_one(x, groups[i], r, need, tol, starts, ends, honest, write, known, eqs, win, fallback, corrupted,
                     cands)


@njit(cache=True)
def _bm_vote_one(x, g, r, need, tol, starts, ends, honest, write, known, eqs,
                 win, fallback, corrupted, cands):  # pragma: no cover - compiled
    # group g from its layers' agreement where already ``known`` (vote_grams), else read
    if known[g]:
        _bm_decide(x, g, r, need, starts, ends, honest, write, eqs[g], win, fallback, corrupted, cands)
    else:
        _bm_vote_group(x, g, r, need, tol, starts, ends, honest, write, win, fallback, corrupted, cands)


@njit(cache=True)
def _bm_vote_serial(x, r, need, tol, starts, ends, honest, write, groups, known, eqs,
                    win, fallback, corrupted, cands):  # pragma: no cover - compiled
    # _bm_vote on one thread (see _strict_vote_serial)
    for i in range(groups.shape[0]):
        _bm_vote_one(x, groups[i], r, need, tol, starts, ends, honest, write, known, eqs, win, fallback, corrupted,
                     cands)


@njit(cache=True)
def _honest_of(byz):  # pragma: no cover - compiled
    # the votes' ``honest`` (1 per honest row, 0 per Byzantine one) from the Byzantine mask
    honest = np.empty(byz.shape[0], dtype=np.int64)
    for i in range(byz.shape[0]):
        honest[i] = 0 if byz[i] else 1
    return honest


@njit(cache=True)
def _bm_outputs(k, layers):  # pragma: no cover - compiled
    # what _bm_vote_group writes per group: the winning row, fallback, corrupted, the candidate per layer
    return (np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=np.bool_), np.zeros(k, dtype=np.bool_),
            np.zeros((k, layers), dtype=np.int64))


@njit(cache=True)
def _bm_tally(win, fallback, corrupted, r):  # pragma: no cover - compiled
    # the rows the groups keep (a group's first where no single member sent its kept layers: the vote assembled
    # them there), and the numbers of groups with a fallback and corrupted
    rows = np.empty_like(win)
    for g in range(win.shape[0]):
        rows[g] = win[g] if win[g] >= 0 else g * r
    return rows, win, fallback.sum(), corrupted.sum()


@njit(parallel=True, cache=True)
def _bm_step(x, r, need, tol, starts, ends, byz):  # pragma: no cover - compiled
    # boyer_moore_vote over every group, writing the assembled layers, from the Byzantine mask: (the rows kept,
    # who sent them, fallbacks, corrupted), as approaches.vote_rows returns them, in one call (approaches._prepared)
    k = x.shape[0] // r
    honest = _honest_of(byz)
    win, fallback, corrupted, cands = _bm_outputs(k, starts.shape[0])
    for g in prange(k):
        _bm_vote_group(x, g, r, need, tol, starts, ends, honest, True, win, fallback, corrupted, cands)
    return _bm_tally(win, fallback, corrupted, r)


@njit(cache=True)
def _bm_step_serial(x, r, need, tol, starts, ends, byz):  # pragma: no cover - compiled
    # _bm_step on one thread (see _strict_vote_serial)
    k = x.shape[0] // r
    honest = _honest_of(byz)
    win, fallback, corrupted, cands = _bm_outputs(k, starts.shape[0])
    for g in range(k):
        _bm_vote_group(x, g, r, need, tol, starts, ends, honest, True, win, fallback, corrupted, cands)
    return _bm_tally(win, fallback, corrupted, r)


@njit(cache=True)
def _strict_tally(leader, member, honest, r, need):  # pragma: no cover - compiled
    # the strict vote's (rows kept, winning rows or -1, fallbacks, corrupted) from its leaders and classes; a
    # fallback group keeps its first row, where the caller writes its median (approaches._strict_votes)
    k = leader.shape[0]
    rows = np.empty(k, dtype=np.int64)
    win = np.full(k, -1, dtype=np.int64)
    fallbacks = 0
    corrupted = 0
    for g in range(k):
        rows[g] = g * r
        if leader[g] < 0:
            fallbacks += 1
            continue
        win[g] = rows[g] = g * r + leader[g]
        support = 0
        for j in range(r):
            support += member[g, j] and honest[g * r + j] > 0
        corrupted += support < need
    return rows, win, fallbacks, corrupted


@njit(parallel=True, cache=True)
def _strict_step(x, r, need, tol, byz):  # pragma: no cover - compiled
    # strict_vote over every group from the Byzantine mask, and its tally, in one call (approaches._prepared)
    k = x.shape[0] // r
    honest = _honest_of(byz)
    leader, member = np.full(k, -1, dtype=np.int64), np.zeros((k, r), dtype=np.bool_)
    for g in prange(k):
        _strict_vote_group(x, g, r, need, tol, honest, leader, member)
    return _strict_tally(leader, member, honest, r, need)


@njit(cache=True)
def _strict_step_serial(x, r, need, tol, byz):  # pragma: no cover - compiled
    # _strict_step on one thread (see _strict_vote_serial)
    k = x.shape[0] // r
    honest = _honest_of(byz)
    leader, member = np.full(k, -1, dtype=np.int64), np.zeros((k, r), dtype=np.bool_)
    for g in range(k):
        _strict_vote_group(x, g, r, need, tol, honest, leader, member)
    return _strict_tally(leader, member, honest, r, need)


def _layer_bounds(starts: object, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's first column and its end (int64, writable copies, as in candidate_ranking)."""
    starts = np.array(starts, dtype=np.int64)
    return starts, np.append(starts[1:], d).astype(np.int64)


def boyer_moore_vote(x: np.ndarray, r: int, need: int, tol: float, starts: np.ndarray, honest: np.ndarray,
                     write: bool, settled: np.ndarray | None = None, known: np.ndarray | None = None,
                     eqs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The original DETOX vote of every contiguous group of r rows of ``x`` (an integer view of the bits when
    tol <= 0): per layer (``starts``: first column of each), Boyer-Moore over the members in order, the
    surviving candidate kept unchecked. Returns per group the row that sent every kept layer (-1: none did;
    with ``write`` the kept layers are then assembled in the group's first row), whether some layer lacks a
    strict majority, whether some layer lacks the support of ``need`` ``honest`` members, and the candidates.
    ``settled`` (k,): groups already found to be won by their first row (``vote_grams``), left unread; ``known``
    (k,): groups whose members' agreement per layer is already in ``eqs`` (k, r, r, layers), decided from it unread."""
    starts, ends = _layer_bounds(starts, x.shape[1])
    k = x.shape[0] // r
    win = np.full(k, -1, dtype=np.int64)
    fallback = np.zeros(k, dtype=np.bool_)
    corrupted = np.zeros(k, dtype=np.bool_)
    cands = np.zeros((k, starts.shape[0]), dtype=np.int64)
    groups = _unsettled(k, settled)
    if settled is not None:
        win[settled] = np.flatnonzero(settled) * r
    if known is None:
        known, eqs = np.zeros(k, dtype=np.bool_), np.empty((0, r, r, starts.shape[0]), dtype=np.bool_)  # unread
    vote = _bm_vote if _vote_threads(x, int((~known[groups]).sum()) * r) > 1 else _bm_vote_serial
    vote(x, int(r), int(need), _tol(x, tol), starts, ends, np.ascontiguousarray(honest, np.int64), bool(write),
         groups, np.ascontiguousarray(known, np.bool_), np.ascontiguousarray(eqs, np.bool_), win, fallback,
         corrupted, cands)
    return win, fallback, corrupted, cands


@njit(cache=True)
def _bucket_order(rows, perm, bounds, out):  # pragma: no cover - compiled
    # bucket b: rows[np.sort(perm[bounds[b]:bounds[b + 1]])], the buckets one after the other
    for b in range(bounds.shape[0] - 1):
        pos = np.sort(perm[bounds[b] : bounds[b + 1]])
        for i in range(pos.shape[0]):
            out[bounds[b] + i] = rows[pos[i]]
    return out


def bucket_order(rows: np.ndarray, perm: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The winners ``rows`` in their buckets' order: bucket b holds ``rows[np.sort(perm[bounds[b]:bounds[b + 1]])]``
    (``approaches._buckets``' cut, as one int64 array; ``bounds``: the cut points, 0 first and len(rows) last)."""
    arrays = [np.asarray(a) for a in (rows, perm, bounds)]
    if any(a.ndim != 1 or (a.size and a.dtype.kind not in "iu") for a in arrays):
        raise ValueError("bucket_order: rows, perm and bounds must be 1-D arrays of integers, got "
                         + ", ".join(f"{a.shape} {a.dtype}" for a in arrays))
    rows, perm, bounds = (np.ascontiguousarray(a, dtype=np.int64) for a in arrays)
    k = rows.shape[0]
    if (perm.shape != (k,) or bounds.ndim != 1 or bounds.shape[0] < 2 or bounds[0] != 0 or bounds[-1] != k
            or (np.diff(bounds) < 0).any() or not np.array_equal(np.sort(perm), np.arange(k))):
        raise ValueError(f"bucket_order: perm must be a permutation of {k} positions and bounds cut points from 0 "
                         f"to {k}, got {perm.shape[0]} positions and bounds {bounds.tolist()}")
    return _bucket_order(rows, perm, bounds, np.empty(k, dtype=np.int64))


# ------------------------------------------------------------------ numpy's Generator permutation, compiled
# default_rng(SeedSequence(key)).permutation(k), step for step: SeedSequence's hash mixing of the key's 32-bit
# words into its pool and out to 4 uint64s, PCG64 seeded from them (128-bit LCG, XSL-RR output, 32-bit draws
# served from halves of 64-bit ones) and Generator.shuffle's Fisher-Yates with masked rejection sampling. The
# step's buckets (attacks.rng_for(seed, TAG_BUCKETS, step)) in one compiled call: creating the Generator costs
# ~10 us warm and ~55 us right after the rows arrive (issue #15). numpy is the definition: tests compare the
# two on thousands of keys, and the general path (approaches._buckets) still draws from numpy.

_U1, _U16, _U32, _U58, _U63 = (np.uint64(v) for v in (1, 16, 32, 58, 63))
_M32 = np.uint64(0xFFFFFFFF)
_SS = tuple(np.uint64(v) for v in (0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED, 0xCA01F9DD, 0x4973F715))
_PCG_MULT = (np.uint64(2549297995355413924), np.uint64(4865540595714422341))


@njit(cache=True, inline="always")
def _hashmix(value, h):  # pragma: no cover - compiled
    # SeedSequence's hashmix on uint32 values held in uint64s: (the mixed value, the next hash constant)
    value = (value ^ h) & _M32
    h = (h * _SS[1]) & _M32
    value = (value * h) & _M32
    return value ^ (value >> _U16), h


@njit(cache=True, inline="always")
def _mix(x, y):  # pragma: no cover - compiled
    r = (_SS[4] * x - _SS[5] * y) & _M32
    return r ^ (r >> _U16)


@njit(cache=True, inline="always")
def _mul128(ah, al, bh, bl):  # pragma: no cover - compiled
    # (ah, al) * (bh, bl) mod 2^128, each a (high, low) pair of uint64s
    a0, a1, b0, b1 = al & _M32, al >> _U32, bl & _M32, bl >> _U32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _U32) + (p01 & _M32) + (p10 & _M32)
    hi = p11 + (p01 >> _U32) + (p10 >> _U32) + (mid >> _U32)
    return hi + ah * bl + al * bh, al * bl


@njit(cache=True, inline="always")
def _pcg_step(sh, sl, ih, il):  # pragma: no cover - compiled
    # the LCG's step: state * multiplier + inc, mod 2^128
    hi, low = _mul128(sh, sl, _PCG_MULT[0], _PCG_MULT[1])
    lo = low + il
    return hi + ih + np.uint64(lo < low), lo


@njit(cache=True)
def _permutation(key, k):  # pragma: no cover - compiled
    # numpy's default_rng(SeedSequence(key)).permutation(k) (key: ints >= 0 below 2^63)
    words = np.empty(2 * key.shape[0], dtype=np.uint64)
    n = 0
    for v0 in key:
        v = np.uint64(v0)
        if v == 0:
            words[n] = 0
            n += 1
        while v != 0:
            words[n] = v & _M32
            n += 1
            v = v >> _U32
    pool = np.empty(4, dtype=np.uint64)
    h = _SS[0]
    for i in range(4):
        pool[i], h = _hashmix(words[i] if i < n else np.uint64(0), h)
    for s in range(4):
        for d in range(4):
            if s != d:
                m, h = _hashmix(pool[s], h)
                pool[d] = _mix(pool[d], m)
    for s in range(4, n):
        for d in range(4):
            m, h = _hashmix(words[s], h)
            pool[d] = _mix(pool[d], m)
    state = np.empty(8, dtype=np.uint64)  # generate_state(4, uint64): 8 words, pairs little-endian
    hb = _SS[2]
    for i in range(8):
        v = (pool[i % 4] ^ hb) & _M32
        hb = (hb * _SS[3]) & _M32
        v = (v * hb) & _M32
        state[i] = v ^ (v >> _U16)
    s0 = state[0] | (state[1] << _U32)
    s1 = state[2] | (state[3] << _U32)
    s2 = state[4] | (state[5] << _U32)
    s3 = state[6] | (state[7] << _U32)
    ih, il = (s2 << _U1) | (s3 >> _U63), (s3 << _U1) | _U1  # pcg64_set_seed: inc = initseq << 1 | 1
    sh, sl = _pcg_step(np.uint64(0), np.uint64(0), ih, il)
    lo = sl + s1
    sh, sl = sh + s0 + np.uint64(lo < sl), lo
    sh, sl = _pcg_step(sh, sl, ih, il)
    out = np.arange(k)
    spare = np.uint64(0)
    has = False
    for i in range(k - 1, 0, -1):  # Generator.shuffle: random_interval(i), 32-bit draws (i < 2^32)
        mask = np.uint64(i)
        for sh_ in (1, 2, 4, 8, 16, 32):
            mask |= mask >> np.uint64(sh_)
        while True:
            if has:
                draw = spare
                has = False
            else:
                sh, sl = _pcg_step(sh, sl, ih, il)
                v = sh ^ sl
                rot = sh >> _U58
                word = (v >> rot) | (v << ((np.uint64(64) - rot) & _U63))
                spare = word >> _U32
                has = True
                draw = word & _M32
            j = draw & mask
            if j <= np.uint64(i):
                break
        t = out[i]
        out[i] = out[np.int64(j)]
        out[np.int64(j)] = t
    return out


def permutation(key: object, k: int) -> np.ndarray:
    """``np.random.default_rng(np.random.SeedSequence(key)).permutation(k)``, bit for bit, compiled (``key``: a
    sequence of integers in [0, 2^63))."""
    ints = list(key) if isinstance(key, list | tuple | np.ndarray) else None
    if (not ints or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v < 2**63
                            for v in ints)):
        raise ValueError(f"permutation: key must be a non-empty sequence of integers in [0, 2^63), got {key!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < 2**32:
        raise ValueError(f"permutation: k must be an integer in [0, 2^32), got {k!r}")
    return _permutation(np.array(ints, dtype=np.int64), int(k))


@njit(cache=True)
def _shuffled_order(rows, seed, tag, step, bounds):  # pragma: no cover - compiled
    # _bucket_order with the permutation numpy draws for (seed, tag, step)
    perm = _permutation(np.array([seed, tag, step], dtype=np.int64), rows.shape[0])
    return _bucket_order(rows, perm, bounds, np.empty_like(rows))
