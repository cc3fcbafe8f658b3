"""Robust aggregation rules (DESIGN §3).

Each rule is ``fn(grads_nd, f, rows=None, out=None, **params) -> agg_d``: ``grads_nd`` is an (n, d) float
tensor, one row per input, ``f`` the number of rows it must tolerate; the result is a fresh (d,) tensor, or
``out`` (a contiguous (d,) tensor of the same dtype and device, written in place: on the CPU the kernels write
it directly, so a step reuses memory already mapped instead of faulting in a fresh 44 MB array; it may be a
row of ``grads_nd`` that the rule does not read). ``rows`` (int indices) makes the rule aggregate
``grads_nd[rows]`` without copying those rows: on the CPU the kernels read them in place (DETOX's group
winners and buckets are index arrays into the PS's matrix), elsewhere torch gathers them. Either way the
result is bit for bit the one of ``fn(grads_nd[rows], f)``. Ties are broken by the
lower row index (stable sorts everywhere). ``AGGREGATORS`` maps each ``mode`` option name to its rule.

Counts on which the literature and the original DETOX code differ (Multi-Krum's ``m``, Bulyan's ``theta``,
Krum's ``neighbours``) and Bulyan's two steps take a named choice, ``"literature"`` (the default) or
``"original"``, resolved on every call from that call's (n, f) — so buckets of different sizes each get their
own count — or, for counts, an integer. ``requirement_error`` states, by arithmetic alone, whether a rule
accepts (n, f, params); every rule raises exactly that message as a ValueError.

Work is vectorised over the whole matrix, never copying it whole: distances come from a blocked Gram matrix,
coordinate-wise order statistics from a compiled selection network over cache-sized column blocks
(``detox.kernels``), Weiszfeld's distances and weighted sums from column blocks (accumulated in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from numbers import Integral, Real

import numpy as np
import torch

# columns per block of the torch fallback of coordinate-wise sorts on the CPU (float16, float64): about 1 MiB
_BLOCK_ELEMS = 1 << 18
# elements per block of the Gram matrix (about 3 MiB of float32 at n = 45; measured best, docs/performance.md)
_GEMM_BLOCK_ELEMS = 45 << 14
# elements per block of a torch fallback on a GPU, where every block costs kernel launches and ~10 µs of Python
# each: 32 Mi (256 MiB in float64). At n = 45, d = 1.1e7 the CPU's block sizes made coord-median 231 ms on an H100
_GPU_BLOCK_ELEMS = 1 << 25
# columns sampled to find a reference row for centring: d / 32 of them, at least _SAMPLE_MIN and at most
# _SAMPLE_COLS (a float64 Gram of 16 Ki columns was 0.5 ms of Krum's 3 ms at n = 45, d = 1e5)
_SAMPLE_COLS = 1 << 14
_SAMPLE_MIN = 1 << 11

LITERATURE = "literature"
ORIGINAL = "original"
CHOICES = (LITERATURE, ORIGINAL)

# the parameters each rule accepts and their defaults (None in a call or a config also means the default)
RULE_PARAMS: dict[str, dict[str, object]] = {
    "mean": {},
    "coord-median": {},
    "trimmed-mean": {},
    "geometric-median": {"tol": 1e-7, "max_iter": 1000},
    "krum": {"neighbours": LITERATURE},
    "multi-krum": {"m": LITERATURE, "neighbours": LITERATURE},
    "bulyan": {"theta": LITERATURE, "neighbours": LITERATURE, "selection": LITERATURE, "average": LITERATURE},
    "sign-sgd": {},
}

# the (n, f) each rule needs (DESIGN §3, "requires"): text for the message, and the test
_NEEDS: dict[str, tuple[str, Callable[[int, int], bool]]] = {
    "coord-median": ("n > 2f", lambda n, f: n > 2 * f),
    "trimmed-mean": ("n > 2f", lambda n, f: n > 2 * f),
    "geometric-median": ("n > 2f", lambda n, f: n > 2 * f),
    "krum": ("n >= 2f + 3", lambda n, f: n >= 2 * f + 3),
    "multi-krum": ("n >= 2f + 3", lambda n, f: n >= 2 * f + 3),
    "bulyan": ("n >= 4f + 3", lambda n, f: n >= 4 * f + 3),
    "sign-sgd": ("n > 2f", lambda n, f: n > 2 * f),
}


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _count(rule: str, key: str, value: object, named: dict[str, int], lo: int, hi: int, lo_text: str,
           hi_text: str, n: int, f: int) -> tuple[int | None, str | None]:
    """Resolve a count given as a named choice or an integer; (value, None) or (None, reason)."""
    if value is None:
        value = LITERATURE
    if isinstance(value, str) and value in named:
        return named[value], None
    if _is_int(value) and lo <= int(value) <= hi:
        return int(value), None
    choices = ", ".join(f"{k!r}: {v}" for k, v in _NAMED_TEXT[(rule, key)].items())
    got = f"got {key}={value!r}, n={n}" + (f", f={f}" if "f" in lo_text + hi_text else "")
    return None, f"{rule}: {key} must be an integer in [{lo_text}, {hi_text}]; {got} (or {choices})"


# how each named count reads, for the messages (DESIGN §3 gives the citations)
_NAMED_TEXT = {
    ("multi-krum", "m"): {LITERATURE: "n - f", ORIGINAL: "n - f - 2"},
    ("krum", "neighbours"): {LITERATURE: "n - f - 2", ORIGINAL: "n - f - 2"},
    ("multi-krum", "neighbours"): {LITERATURE: "n - f - 2", ORIGINAL: "n - f - 2"},
    ("bulyan", "neighbours"): {LITERATURE: "|R| - f - 2", ORIGINAL: "|R| - f - 2"},
    ("bulyan", "theta"): {LITERATURE: "n - 2f", ORIGINAL: "n - f - 2"},
}


def _settings(rule: str, n: object, f: object, params: dict | None) -> tuple[dict, str | None]:
    """Resolve ``params`` of ``rule`` for (n, f): (settings, None), or ({}, a one-line reason)."""
    if rule not in RULE_PARAMS:
        return {}, f"unknown aggregation rule {rule!r}; choose from {sorted(RULE_PARAMS)}"
    if not _is_int(n) or int(n) < 1:
        return {}, f"{rule}: needs at least one row, got n={n!r}"
    if not _is_int(f) or int(f) < 0:
        return {}, f"{rule}: f must be an integer >= 0, got f={f!r}"
    n, f = int(n), int(f)
    params = dict(params or {})
    allowed = RULE_PARAMS[rule]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        return {}, (f"{rule}: unknown parameter {unknown[0]!r}; "
                    f"{'allowed: ' + ', '.join(allowed) if allowed else 'it takes none'}")
    if rule in _NEEDS:
        bound, ok = _NEEDS[rule]
        if not ok(n, f):
            return {}, f"{rule} needs {bound}; got n={n}, f={f}"
    out: dict = {}
    if rule == "geometric-median":
        tol = params.get("tol")
        tol = allowed["tol"] if tol is None else tol
        if isinstance(tol, bool) or not isinstance(tol, Real) or not math.isfinite(tol) or not tol > 0:
            return {}, f"geometric-median: tol must be a finite number > 0; got tol={tol!r}"
        max_iter = params.get("max_iter")
        max_iter = allowed["max_iter"] if max_iter is None else max_iter
        if not _is_int(max_iter) or max_iter < 1:
            return {}, f"geometric-median: max_iter must be an integer >= 1; got max_iter={max_iter!r}"
        return {"tol": float(tol), "max_iter": int(max_iter)}, None
    if "neighbours" in allowed:
        # Krum's score: squared distances to the k nearest other rows; literature and original alike use
        # k = n - f - 2 (Blanchard et al. 2017) over the rows Krum runs on (Bulyan's iterations: the rows left)
        formula = None if rule == "bulyan" else n - f - 2
        k, err = _count(rule, "neighbours", params.get("neighbours"), {LITERATURE: formula, ORIGINAL: formula},
                        1, n - 1, "1", "n - 1", n, f)
        if err:
            return {}, err
        out["neighbours"] = k
    if rule == "multi-krum":
        m, err = _count(rule, "m", params.get("m"), {LITERATURE: n - f, ORIGINAL: n - f - 2}, 1, n, "1", "n", n, f)
        if err:
            return {}, err
        out["m"] = m
    if rule == "bulyan":
        theta, err = _count(rule, "theta", params.get("theta"), {LITERATURE: n - 2 * f, ORIGINAL: n - f - 2},
                            2 * f + 1, n, "2f + 1", "n", n, f)
        if err:
            return {}, err
        out["theta"] = theta
        for key, what in (("selection", "'literature' (Krum re-run on the rows left) or 'original' (one pass)"),
                          ("average", "'literature' (the beta values closest to the median) or 'original' "
                                      "(the middle beta sorted values)")):
            value = params.get(key)
            value = LITERATURE if value is None else value
            if not isinstance(value, str) or value not in CHOICES:
                return {}, f"bulyan: {key} must be {what}; got {key}={value!r}"
            out[key] = value
    return out, None


def requirement_error(rule: str, n: int, f: int, params: dict | None = None) -> str | None:
    """Why ``rule`` cannot aggregate n rows tolerating f with ``params``, in one line; None if it can.

    Pure arithmetic (no tensors, instant at any n): the rules raise exactly this message as a ValueError.
    """
    return _settings(rule, n, f, params)[1]


def _check(name: str, grads_nd: torch.Tensor, f: int, params: dict | None = None,
           rows: object = None, out: object = None) -> tuple[int, int, dict, torch.Tensor, np.ndarray | None]:
    """Validate the input matrix, the row indices, ``out``, then (n, f, params) (``requirement_error``); raise one
    clear ValueError. Returns (n, d, settings, matrix, rows): the rows the rule reads, as int64 indices into the
    matrix on the CPU kernels' path (None: all rows), else gathered by torch (rows None)."""
    if not isinstance(grads_nd, torch.Tensor) or grads_nd.dim() != 2 or not grads_nd.is_floating_point():
        raise ValueError(f"{name}: grads must be a 2-D float tensor (n, d), got {_describe(grads_nd)}")
    n, d = grads_nd.shape
    idx = None
    if rows is not None:
        idx = _indices(name, rows, n)
        n = idx.shape[0]
    _check_out(name, grads_nd, idx, out)
    settings, err = _settings(name, n, f, params)
    if err:
        raise ValueError(err)
    if idx is not None and not _cpu32(grads_nd):
        return n, d, settings, grads_nd[torch.from_numpy(idx).to(grads_nd.device)], None
    return n, d, settings, grads_nd, idx


def _check_out(name: str, grads_nd: torch.Tensor, idx: np.ndarray | None, out: object) -> None:
    """``out`` must be a contiguous (d,) tensor like the rows, and may share memory with ``grads_nd`` only as one
    whole row that the rule does not read (a rule reads a block of every row before it writes that block of
    ``out``, but only other rows: writing into a row still to be read would change the result)."""
    if out is None:
        return
    d = grads_nd.shape[1]
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != (d,) or out.dtype != grads_nd.dtype
            or out.device != grads_nd.device or not out.is_contiguous()):
        raise ValueError(f"{name}: out must be a contiguous ({d},) {grads_nd.dtype} tensor on {grads_nd.device}, "
                         f"got {_describe(out)}")
    if not grads_nd.is_contiguous() or out.untyped_storage().data_ptr() != grads_nd.untyped_storage().data_ptr():
        return  # a rule reads a non-contiguous matrix through a contiguous copy
    row_bytes = d * out.element_size()
    offset = out.data_ptr() - grads_nd.data_ptr()
    if offset + row_bytes <= 0 or offset >= grads_nd.shape[0] * row_bytes:
        return
    row, rem = divmod(offset, row_bytes)
    if rem or idx is None or bool((idx == row).any()):
        raise ValueError(f"{name}: out overlaps rows the rule reads; give a separate (d,) tensor or a row of grads "
                         f"outside rows")


def _into(out: torch.Tensor | None, agg_d: torch.Tensor) -> torch.Tensor:
    """The result ``agg_d``, copied into ``out`` when one is given (and the rule did not write it there)."""
    if out is None or agg_d.data_ptr() == out.data_ptr():
        return agg_d
    return out.copy_(agg_d)


def _indices(name: str, rows: object, n: int) -> np.ndarray:
    """``rows`` as C-contiguous int64 indices into n rows, or a ValueError."""
    idx = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(f"{name}: rows must be a 1-D array of row indices, got shape {idx.shape} {idx.dtype}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name}: rows must index the {n} rows of grads, got {int(idx.min())}..{int(idx.max())}")
    return idx


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _middle_rows(grads_nd: torch.Tensor, rows: np.ndarray | None, lo: int, hi: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Per coordinate, the mean of the sorted values at positions [lo, hi) among the selected rows (int64
    indices, or a tensor of them; None: all).

    On the CPU a compiled selection network does it block by block (``detox.kernels``); elsewhere (CUDA,
    float64) torch sorts cache-sized column blocks. Either way NaN sorts above +inf, so it can become an
    order statistic only if more than the tolerated number of rows carry it.
    """
    rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
    if grads_nd.device.type == "cpu" and grads_nd.dtype == torch.float32:
        from detox.kernels import middle_mean  # numba compiles (or loads from its cache) on first use

        idx = np.arange(grads_nd.shape[0]) if rows is None else rows
        x = grads_nd.contiguous().numpy()
        return torch.from_numpy(middle_mean(x, idx, lo, hi, torch.get_num_threads(), _np(out)))
    n_sel = grads_nd.shape[0] if rows is None else rows.shape[0]
    rows = None if rows is None else torch.from_numpy(rows).to(grads_nd.device)
    d = grads_nd.shape[1]
    out_d = torch.empty(d, dtype=grads_nd.dtype, device=grads_nd.device) if out is None else out
    step = _block_cols(grads_nd, n_sel, _BLOCK_ELEMS)
    for s in range(0, d, step):
        blk = grads_nd[:, s : s + step] if rows is None else grads_nd[rows, s : s + step]
        srt = _nan_as_inf(blk.t().contiguous())
        out_d[s : s + step] = srt.sort(dim=1).values[:, lo:hi].mean(dim=1)
    return out_d


def _nan_as_inf(x: torch.Tensor) -> torch.Tensor:
    """NaN replaced by +inf, every other value kept, as the kernels sort (``detox.kernels``; a GPU's radix sort would
    put NaNs whose sign bit is set first, pytorch/pytorch#190781). torch.nan_to_num would also clip ±inf."""
    return x.masked_fill(x.isnan(), float("inf"))


def _block_cols(x: torch.Tensor, n: int, cpu_elems: int) -> int:
    """Columns per block of a torch fallback over n rows of ``x``: cache-sized on the CPU, large on a GPU."""
    return max(1, (cpu_elems if x.device.type == "cpu" else _GPU_BLOCK_ELEMS) // max(n, 1))


def _np(out: torch.Tensor | None) -> np.ndarray | None:
    return None if out is None else out.numpy()


def _closest_rows(grads_nd: torch.Tensor, rows: np.ndarray | torch.Tensor, beta: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values among the selected rows closest to their median (for an
    even count the median is the mean of the two middle values). The beta closest values are a window of beta
    consecutive sorted values; of equally close windows the lowest is taken (NaN counts as +inf).
    """
    rows = np.ascontiguousarray(rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
    if grads_nd.device.type == "cpu" and grads_nd.dtype == torch.float32:
        from detox.kernels import closest_mean

        x = grads_nd.contiguous().numpy()
        return torch.from_numpy(closest_mean(x, rows, beta, torch.get_num_threads(), _np(out)))
    m, d = rows.shape[0], grads_nd.shape[1]
    rows = torch.from_numpy(rows)
    out_d = torch.empty(d, dtype=grads_nd.dtype, device=grads_nd.device) if out is None else out
    step = _block_cols(grads_nd, m, _BLOCK_ELEMS)
    for s in range(0, d, step):
        srt = grads_nd[rows.to(grads_nd.device), s : s + step].t()
        # as the kernel: NaN as +inf, float64 distances
        srt = _nan_as_inf(srt).sort(dim=1).values.double()
        med = 0.5 * (srt[:, (m - 1) // 2] + srt[:, m // 2])
        # moving the window [s, s + beta) one right changes its cost by |v[s+beta] - med| - |v[s] - med|: the
        # leftmost cheapest window starts right after the last strictly improving move (detox.kernels)
        better = (srt[:, beta:] - med[:, None]).abs() < (srt[:, : m - beta] - med[:, None]).abs()
        steps = torch.arange(1, m - beta + 1, device=srt.device)
        first = (better * steps).amax(dim=1) if m > beta else torch.zeros_like(med, dtype=torch.long)
        idx = first[:, None] + torch.arange(beta, device=srt.device)
        out_d[s : s + step] = (srt.gather(1, idx).sum(dim=1) / beta).to(grads_nd.dtype)
    return out_d


def mean(grads_nd: torch.Tensor, f: int = 0, rows: object = None, out: torch.Tensor | None = None,
         **other: object) -> torch.Tensor:
    """Arithmetic mean of the rows (no robustness; f is accepted for a uniform signature)."""
    n, d, _, grads_nd, rows = _check("mean", grads_nd, f, other, rows, out)
    if _cpu32(grads_nd):  # one compiled pass at memory speed: sum, then a true division as torch.mean
        from detox.kernels import bucket_means as fused

        x = grads_nd.contiguous().numpy()
        dst = np.empty((1, d), dtype=x.dtype) if out is None else out.numpy()[None, :]
        fused(x, np.arange(n) if rows is None else rows, np.array([0, n]), _threads(), out=dst)
        return torch.from_numpy(dst[0]) if out is None else out
    return _into(out, grads_nd.mean(dim=0))


def _some_buckets(name: str, buckets: list) -> None:
    if not isinstance(buckets, list | tuple) or not buckets:
        raise ValueError(f"{name}: buckets must be a non-empty list of row-index arrays, got {_describe(buckets)}"
                         f"{' (empty)' if isinstance(buckets, list | tuple) else ''}")


def per_bucket(name: str, grads_nd: torch.Tensor, buckets: list, f: int, params: dict | None = None,
               dest: np.ndarray | None = None) -> torch.Tensor:
    """Rule ``name`` bucket by bucket, each call writing its output in place: a (len(buckets), d) tensor, or with
    ``dest`` row dest[b] of ``grads_nd`` for bucket b (the caller keeps those rows out of every bucket), returning
    ``grads_nd``."""
    if dest is None:
        outs = torch.empty((len(buckets), grads_nd.shape[1]), dtype=grads_nd.dtype, device=grads_nd.device)
        for b, row_d in zip(buckets, outs, strict=True):
            aggregate(name, grads_nd, f, params, rows=b, out=row_d)
        return outs
    for b, row in zip(buckets, np.asarray(dest).tolist(), strict=True):
        aggregate(name, grads_nd, f, params, rows=b, out=grads_nd[row])
    return grads_nd


def bucket_means(grads_nd: torch.Tensor, buckets: list, f: int = 0, params: dict | None = None,
                 dest: np.ndarray | None = None) -> torch.Tensor:
    """(len(buckets), d): row b the ``mean`` rule over ``grads_nd[buckets[b]]``, bit for bit the stacked per-bucket
    means. On the compiled path all buckets in one pass over their rows, written in place (no per-bucket outputs,
    no stack, no division pass). With ``dest`` (a row of ``grads_nd`` per bucket, none of them in any bucket) the
    means are written into those rows and ``grads_nd`` is returned."""
    _some_buckets("bucket_means", buckets)
    if dest is not None:
        dest = np.asarray(dest, dtype=np.int64)
        if dest.shape != (len(buckets),) or np.unique(dest).size != dest.size:
            raise ValueError(f"bucket_means: dest must give {len(buckets)} distinct rows, got {dest}")
    if not _cpu32(grads_nd) or not grads_nd.is_contiguous():
        return per_bucket("mean", grads_nd, buckets, f, params, dest)
    # validated as each per-bucket call would be (the same one-line errors)
    idx = [_check("mean", grads_nd, f, params, b)[4] for b in buckets]
    from detox.kernels import bucket_means as fused

    starts = np.concatenate([[0], np.cumsum([i.shape[0] for i in idx])])
    x = grads_nd.numpy()
    rows = np.concatenate(idx)
    if dest is None:
        return torch.from_numpy(fused(x, rows, starts, _threads()))
    if ((dest < 0) | (dest >= x.shape[0])).any() or np.isin(dest, rows).any():
        raise ValueError(f"bucket_means: dest must be rows of grads outside every bucket, got {dest}")
    fused(x, rows, starts, _threads(), out=x, dest=dest)
    return grads_nd


# the rules that are a mean of the sorted values at positions [lo, hi) per coordinate: (n, f) -> (lo, hi)
MIDDLE: dict[str, Callable[[int, int], tuple[int, int]]] = {
    "coord-median": lambda n, f: ((n - 1) // 2, n // 2 + 1),  # numpy's: for even n the mean of the middle two
    "trimmed-mean": lambda n, f: (f, n - f),
}


def middle_of_bucket_means(name: str, grads_nd: torch.Tensor, buckets: list, f: int, params: dict | None = None,
                           inner_f: int = 0, inner_params: dict | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``name`` (a rule of ``MIDDLE``) over the ``mean`` of each bucket of rows: bit for bit
    ``aggregate(name, bucket_means(grads_nd, buckets, inner_f, inner_params), f, params)``. On the CPU kernels'
    path in one pass over the buckets' rows, the bucket means never written out (``kernels.bucket_middle_mean``):
    DETOX's coord-median preset every step."""
    if name not in MIDDLE:
        raise ValueError(f"middle_of_bucket_means: {name!r} is not one of {sorted(MIDDLE)}")
    _some_buckets("middle_of_bucket_means", buckets)
    if not _cpu32(grads_nd) or not grads_nd.is_contiguous():
        return aggregate(name, bucket_means(grads_nd, buckets, inner_f, inner_params), f, params, out=out)
    # validated as the two steps would be, with their one-line errors; all buckets at once where they are plain
    # index arrays (checked one by one, 5 buckets cost 30 us, 15 % of DETOX's step at d = 1e3), else one by one
    sizes = [len(b) if isinstance(b, np.ndarray) and b.ndim == 1 else 0 for b in buckets]
    try:
        if min(sizes) < 1 or _settings("mean", min(sizes), inner_f, inner_params)[1]:
            raise ValueError
        rows = _indices("mean", np.concatenate(buckets), grads_nd.shape[0])
    except ValueError:
        rows = np.concatenate([_check("mean", grads_nd, inner_f, inner_params, b)[4] for b in buckets])
        sizes = [len(b) for b in buckets]
    n = len(buckets)
    _, err = _settings(name, n, f, params)
    if err:
        raise ValueError(err)
    _check_out(name, grads_nd, rows, out)
    from detox.kernels import bucket_middle_mean

    starts = np.concatenate([[0], np.cumsum(sizes)])
    return torch.from_numpy(bucket_middle_mean(grads_nd.numpy(), rows, starts, *MIDDLE[name](n, f), _threads(),
                                               _np(out)))


def coord_median(grads_nd: torch.Tensor, f: int = 0, rows: object = None, out: torch.Tensor | None = None,
                 **other: object) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values. Needs n > 2f."""
    n, _, _, grads_nd, rows = _check("coord-median", grads_nd, f, other, rows, out)
    return _middle_rows(grads_nd, rows, *MIDDLE["coord-median"](n, f), out)


def trimmed_mean(grads_nd: torch.Tensor, f: int, rows: object = None, out: torch.Tensor | None = None,
                 **other: object) -> torch.Tensor:
    """Per coordinate, drop the f smallest and f largest values and average the rest. Needs n > 2f."""
    n, _, _, grads_nd, rows = _check("trimmed-mean", grads_nd, f, other, rows, out)
    return _middle_rows(grads_nd, rows, *MIDDLE["trimmed-mean"](n, f), out)


def _cpu32(x: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels apply (float32 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def _threads() -> int:
    return torch.get_num_threads()


@lru_cache(maxsize=64)
def _sample_cols(d: int) -> tuple[tuple[int, int], ...]:
    """The column segments ranked on: all d columns up to _SAMPLE_MIN, else 8 evenly spaced runs of 1/8 of the
    sample (d / 32 columns, clamped to [_SAMPLE_MIN, _SAMPLE_COLS]), cached: the same few d every step."""
    if d <= _SAMPLE_MIN:
        return ((0, d),)
    seg = min(_SAMPLE_COLS, max(_SAMPLE_MIN, d // 32)) // 8
    # d > 2048 >= 8 seg / 7: the 8 starts are distinct and every run ends inside d
    return tuple((s, s + seg) for s in np.linspace(0, d - seg, num=8, dtype=np.int64).tolist())


@lru_cache(maxsize=64)
def _sample_bounds(d: int) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = np.array(_sample_cols(d), dtype=np.int64).T
    starts.flags.writeable = ends.flags.writeable = False  # shared between calls
    return starts, ends


def _candidates(x_nd: torch.Tensor, k: int, rows: np.ndarray | None = None) -> list[int]:
    """Rows (positions in ``rows``) ranked by a Krum-style score on a sample of columns (float64, cheap): the
    first lie inside the bulk of the data. The sample is a few contiguous column segments, so it costs little
    memory traffic."""
    n = x_nd.shape[0] if rows is None else rows.shape[0]
    if n == 1:
        return [0]
    k = min(max(k, 1), n - 1)
    segs = _sample_cols(x_nd.shape[1])
    if _cpu32(x_nd):
        # one compiled call (the torch ops it replaces cost ~0.3 ms at d = 1e3, and MKL's threaded product waits
        # for a second core: 16 ms on a loaded machine); float64 like them, summed in a fixed order
        from detox.kernels import candidate_ranking

        starts, ends = _sample_bounds(x_nd.shape[1])
        return candidate_ranking(x_nd.contiguous().numpy(), rows, starts, ends, k, _threads()).tolist()
    sel = slice(None) if rows is None else torch.from_numpy(rows)
    sample = torch.cat([x_nd[sel, a:b] for a, b in segs], dim=1).double()
    sample = sample - sample[0]
    gram = sample @ sample.t()
    sq = gram.diagonal()
    d2 = torch.nan_to_num((sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0), nan=float("inf"))
    d2.fill_diagonal_(float("inf"))
    return torch.sort(d2.topk(k, dim=1, largest=False).values.sum(dim=1), stable=True).indices.tolist()


def _finite_rows(x_nd: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """(n,) bool: rows (of ``rows``) without NaN or inf (one read; only needed when a hostile row shows up)."""
    if _cpu32(x_nd):
        from detox.kernels import row_sq_dists

        zero = np.zeros(x_nd.shape[1], dtype=np.float32)
        return torch.isfinite(torch.from_numpy(row_sq_dists(x_nd.contiguous().numpy(), zero, _threads(), rows)))
    return torch.isfinite(x_nd).all(dim=1).cpu()


def _reference_row(x_nd: torch.Tensor, k: int, finite: torch.Tensor | None = None,
                   rows: np.ndarray | None = None) -> int:
    """A row inside the bulk of the data (the best-ranked candidate; among ``finite`` rows if given), or -1;
    a position in ``rows`` when given."""
    for i in _candidates(x_nd, k, rows):
        if finite is None or bool(finite[i]):
            return i
    return -1


def _centred_gram(x_nd: torch.Tensor, ref_d: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """(n, n) float64 Gram matrix of the rows minus ``ref_d``, one column block at a time.

    Blocks are centred into a reused buffer, multiplied in float32 and accumulated in float64: one read of
    the matrix and no temporary of its size (on the CPU a compiled kernel, ``detox.kernels.centred_gram``).
    """
    n, d = x_nd.shape
    if _cpu32(x_nd):
        from detox.kernels import centred_gram

        return torch.from_numpy(centred_gram(x_nd.contiguous().numpy(), ref_d.numpy(), _threads(), rows))
    step = _block_cols(x_nd, n, _GEMM_BLOCK_ELEMS)
    # a GPU's blocks are long: multiplied in float64 there, so the sums' rounding does not grow with them
    wide = x_nd.dtype if x_nd.device.type == "cpu" else torch.float64
    ref_d = ref_d.to(wide)
    gram_t = torch.zeros((n, n), dtype=torch.float64, device=x_nd.device)
    for s in range(0, d, step):
        blk = x_nd[:, s : s + step].to(wide) - ref_d[s : s + step]
        gram_t += (blk @ blk.t()).double()
    # a BLAS product A @ A.T need not be symmetric to the last bit (MKL's float64 one is not): then d2[i, j] !=
    # d2[j, i], and two rows that are each other's nearest neighbour get unequal Krum scores, so an exact tie went
    # to the higher row. Mirror the upper triangle, as the CPU kernel does (kernels._mirror)
    return torch.triu(gram_t) + torch.triu(gram_t, 1).t()


def _sq_dists(grads_nd: torch.Tensor, k: int, rows: np.ndarray | None, diagonal: float,
              gram: np.ndarray | None = None) -> np.ndarray:
    """pairwise_sq_dists as a float64 numpy array whose diagonal is ``diagonal``. ``gram``: the centred Gram
    matrix this would form, formed already (``bulyan_gram_ref``)."""
    n = grads_nd.shape[0] if rows is None else rows.shape[0]
    at = (lambda i: i) if rows is None else (lambda i: int(rows[i]))  # position in rows -> row of grads_nd
    if gram is None:
        gram = _centred_gram(grads_nd, grads_nd[at(_reference_row(grads_nd, k, None, rows))], rows).cpu().numpy()
    if n > 1 and not np.isfinite(gram.diagonal()).any():
        # the reference row itself carried a NaN/inf (outside the sample): centre on a finite row instead
        ref = _reference_row(grads_nd, k, _finite_rows(grads_nd, rows), rows)
        if ref < 0:
            d2 = np.full((n, n), np.inf)
            np.fill_diagonal(d2, diagonal)
            return d2
        gram = _centred_gram(grads_nd, grads_nd[at(ref)], rows).cpu().numpy()
    from detox.kernels import sq_dists_from_gram

    # each Gram entry involves only its two rows: a hostile row spoils its own row and column, nothing else
    return sq_dists_from_gram(gram, diagonal)


def pairwise_sq_dists(grads_nd: torch.Tensor, k: int | None = None, rows: np.ndarray | None = None) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances; a row with a non-finite entry (or whose squared norm
    overflows float32) is +inf from every other row. The diagonal is exactly 0.

    Rows are centred on a finite reference row inside the bulk of the data (``k``: neighbours used to find
    it) before the Gram matrix is formed: without centring, ||a||^2 + ||b||^2 - 2<a, b> in float32 loses
    every digit when rows share a large common component.
    """
    n = grads_nd.shape[0] if rows is None else rows.shape[0]
    return torch.from_numpy(_sq_dists(grads_nd, k if k is not None else n // 2, rows, 0.0))


def _scores(d2_nn: np.ndarray, k: int) -> np.ndarray:
    """Krum scores from squared distances whose diagonal is +inf: the sum of each row's k smallest entries,
    summed in ascending order (so equal multisets of distances give bit-equal scores)."""
    if k <= 0:
        return np.zeros(d2_nn.shape[0])
    return np.sort(d2_nn, axis=1)[:, :k].sum(axis=1)


def _distances(grads_nd: torch.Tensor, k: int, rows: np.ndarray | None = None,
               gram: np.ndarray | None = None) -> np.ndarray:
    """(n, n) float64 squared distances with +inf on the diagonal (a row is not its own neighbour)."""
    return _sq_dists(grads_nd, max(k, 1), rows, np.inf, gram)


def krum_scores(grads_nd: torch.Tensor, f: int, neighbours: int | None = None) -> torch.Tensor:
    """score_i = sum of squared distances from row i to its k nearest other rows (k = n - f - 2 unless
    ``neighbours`` is given)."""
    n = grads_nd.shape[0]
    k = n - f - 2 if neighbours is None else neighbours
    return torch.from_numpy(_scores(_distances(grads_nd, k), k))


def _lowest(scores_n: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores, ties to the lower index."""
    return np.argsort(scores_n, kind="stable")[:k]


def krum(grads_nd: torch.Tensor, f: int, neighbours: int | str | None = None, rows: object = None,
         out: torch.Tensor | None = None, **other: object) -> torch.Tensor:
    """The row with the lowest Krum score (Blanchard et al. 2017). Needs n >= 2f + 3."""
    _, _, s, grads_nd, rows = _check("krum", grads_nd, f, {"neighbours": neighbours, **other}, rows, out)
    k = s["neighbours"]
    best = int(_lowest(_scores(_distances(grads_nd, k, rows), k), 1)[0])
    row_d = grads_nd[best if rows is None else int(rows[best])]
    return row_d.clone() if out is None else out.copy_(row_d)


def _weighted_rows(grads_nd: torch.Tensor, w_n: torch.Tensor, rows: np.ndarray | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i G_i over the rows (of ``rows``) with w_i != 0 (a zero-weight row is skipped, so its NaN cannot
    leak); into ``out`` when given."""
    if _cpu32(grads_nd):
        from detox.kernels import weighted_sum

        return torch.from_numpy(weighted_sum(grads_nd.contiguous().numpy(), w_n.numpy(), _threads(), rows=rows,
                                             out=_np(out)))
    keep = torch.nonzero(w_n).flatten()
    w = w_n.to(grads_nd.dtype).to(grads_nd.device)
    return _into(out, w[keep] @ grads_nd[keep.to(grads_nd.device)])


def _weighted_rows64(grads_nd: torch.Tensor, w_n: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """(d,) float64 sum_i w_i G_i over the rows with w_i != 0, accumulated in float64 (Weiszfeld's iterate:
    float32 accumulation misses the optimum by far more than float32 rounding when rows share a large offset)."""
    if _cpu32(grads_nd):
        from detox.kernels import weighted_sum64

        return torch.from_numpy(weighted_sum64(grads_nd.contiguous().numpy(), w_n.numpy(), _threads(), rows))
    keep = torch.nonzero(w_n).flatten().to(grads_nd.device)
    w = w_n.to(torch.float64).to(grads_nd.device)[keep]
    n, d = grads_nd.shape
    out_d = torch.empty(d, dtype=torch.float64, device=grads_nd.device)
    step = _block_cols(grads_nd, n, _GEMM_BLOCK_ELEMS)
    for s in range(0, d, step):
        out_d[s : s + step] = w @ grads_nd[keep, s : s + step].double()
    return out_d


def _row_mean(grads_nd: torch.Tensor, idx: np.ndarray, rows: np.ndarray | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of the rows at positions ``idx`` (of ``rows``), summed in row order."""
    w_n = np.zeros(grads_nd.shape[0] if rows is None else rows.shape[0])
    w_n[np.asarray(idx)] = 1.0 / len(idx)
    return _weighted_rows(grads_nd, torch.from_numpy(w_n), rows, out)


def multi_krum(grads_nd: torch.Tensor, f: int, m: int | str | None = None,
               neighbours: int | str | None = None, rows: object = None, out: torch.Tensor | None = None,
               **other: object) -> torch.Tensor:
    """Mean of the m rows of lowest Krum score. m: 'literature' n - f (Blanchard et al. 2017), 'original'
    n - f - 2 (the DETOX code), or an integer. Needs n >= 2f + 3."""
    _, _, s, grads_nd, rows = _check("multi-krum", grads_nd, f, {"m": m, "neighbours": neighbours, **other}, rows,
                                     out)
    return _row_mean(grads_nd, _multi_krum_rows(_distances(grads_nd, s["neighbours"], rows), s), rows, out)


def _multi_krum_rows(d2_nn: np.ndarray, settings: dict) -> np.ndarray:
    """Positions of the m rows of lowest Krum score (``settings``: multi-krum's resolved neighbours and m)."""
    return _lowest(_scores(d2_nn, settings["neighbours"]), settings["m"])


def split_gram_refs(grads_nd: torch.Tensor, buckets: list, f: int = 0,
                    params: dict | None = None) -> tuple[list[int], int] | None:
    """Where Multi-Krum bucket by bucket (``bucket_multi_krum``) forms every bucket's Gram matrix with
    ``kernels.centred_gram`` split across threads (d in the millions): the row each is centred on, as ``multi_krum``
    picks it, and the threads; None elsewhere. With them a caller can form those matrices in a pass of its own
    (``grams=``)."""
    threads = _threads()
    if not (buckets and all(gram_split(grads_nd, len(b)) == threads > 1 for b in buckets)):
        return None
    checks = [_check("multi-krum", grads_nd, f, params, b) for b in buckets]
    if any(c[4] is None for c in checks):
        return None
    return [int(c[4][_reference_row(grads_nd, max(c[2]["neighbours"], 1), None, c[4])]) for c in checks], threads


def bulyan_gram_ref(grads_nd: torch.Tensor, rows: np.ndarray, f: int = 0,
                    params: dict | None = None) -> tuple[list[int], int] | None:
    """``split_gram_refs`` for ``bulyan`` over ``rows``: where it forms its Gram matrix split across threads, the
    row it centres on (as ``_distances`` picks it) and the threads; None elsewhere."""
    threads = _threads()
    if not gram_split(grads_nd, len(rows)) == threads > 1:
        return None
    n, _, s, _, idx = _check("bulyan", grads_nd, f, params, rows)
    if idx is None:
        return None
    return [int(idx[_reference_row(grads_nd, max(_bulyan_k(n, f, s), 1), None, idx)])], threads


def _bulyan_k(n: int, f: int, settings: dict) -> int:
    """The neighbours Bulyan's Krum scores count (and its reference row is ranked with)."""
    return n - f - 2 if settings["neighbours"] is None else settings["neighbours"]


def gram_split(grads_nd: torch.Tensor, n: int) -> int:
    """The threads ``kernels.centred_gram`` splits the Gram matrix of n of ``grads_nd``'s rows across (1: none, as
    off the CPU kernels' path)."""
    if not (_cpu32(grads_nd) and grads_nd.is_contiguous()):
        return 1
    from detox.kernels import _gram_threads

    return _gram_threads(_threads(), grads_nd.numpy(), n)


def _multi_krum_choice(grads_nd: torch.Tensor, checks: list,
                       grams: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """On the CPU kernels' path, the rows each bucket's Multi-Krum averages (``checks``: the buckets' ``_check``
    results), as (rows, starts, weights) for ``kernels.bucket_means(weights=)``; None elsewhere. Where each bucket
    is too small to split across threads, their reference rows and Gram matrices come side by side in one pass
    through the pool (``kernels.bucket_grams``); otherwise bucket by bucket, as ``multi_krum`` computes them, or
    from ``grams`` (per bucket: its matrix as that computes it, centred on ``split_gram_refs``' row, or None)."""
    if not (_cpu32(grads_nd) and grads_nd.is_contiguous() and checks):
        return None
    from detox.kernels import bucket_grams, sq_dists_from_gram

    starts, ends = _sample_bounds(grads_nd.shape[1])
    # the neighbour count _candidates ranks each bucket with, as _distances passes it
    ks = [min(max(c[2]["neighbours"], 1), c[0] - 1) for c in checks]
    if grams is None:
        found = bucket_grams(grads_nd.numpy(), [c[4] for c in checks], ks, starts, ends, _threads())
        grams = None if found is None else [found[1][i, :c[0], :c[0]] for i, c in enumerate(checks)]
    chosen, weights = [], []
    for i, (n, _, s, _, rows) in enumerate(checks):
        gram = None if grams is None else grams[i]
        if gram is None or (n > 1 and not np.isfinite(gram.diagonal()).any()):
            d2 = _distances(grads_nd, s["neighbours"], rows)  # the rule's own path (and its hostile-row fallback)
        else:
            d2 = sq_dists_from_gram(gram, np.inf)
        idx = np.sort(_multi_krum_rows(d2, s))  # summed in row order, as _row_mean sums them
        chosen.append(rows[idx])
        weights.append(np.full(idx.shape[0], 1.0 / idx.shape[0]))
    return (np.concatenate(chosen), np.concatenate([[0], np.cumsum([c.shape[0] for c in chosen])]),
            np.concatenate(weights))


def bucket_multi_krum(grads_nd: torch.Tensor, buckets: list, f: int = 0, params: dict | None = None,
                      dest: np.ndarray | None = None) -> torch.Tensor:
    """(len(buckets), d): row b ``multi_krum(grads_nd, f, rows=buckets[b], **params)``, bit for bit; with ``dest``
    written into those rows of ``grads_nd`` (as ``bucket_means``). On the CPU kernels' path the buckets' selections
    come from ``_multi_krum_choice`` and their means from one ``kernels.bucket_means`` call with weights;
    elsewhere bucket by bucket."""
    _some_buckets("bucket_multi_krum", buckets)
    checks = [_check("multi-krum", grads_nd, f, params, b) for b in buckets]
    if dest is not None:
        dest = np.asarray(dest, dtype=np.int64)
        read = [c[4] if c[4] is not None else np.asarray(b) for c, b in zip(checks, buckets, strict=True)]
        if (dest.shape != (len(buckets),) or np.unique(dest).size != dest.size or (dest < 0).any()
                or (dest >= grads_nd.shape[0]).any() or any(np.isin(dest, r).any() for r in read)):
            raise ValueError(f"bucket_multi_krum: dest must be {len(buckets)} distinct rows of grads outside every "
                             f"bucket, got {dest}")
    choice = _multi_krum_choice(grads_nd, checks)
    if choice is None:
        return per_bucket("multi-krum", grads_nd, buckets, f, params, dest)
    from detox.kernels import bucket_means as weighted_buckets

    rows, starts, weights = choice
    x = grads_nd.numpy()
    if dest is None:
        return torch.from_numpy(weighted_buckets(x, rows, starts, _threads(), weights=weights))
    weighted_buckets(x, rows, starts, _threads(), out=x, dest=dest, weights=weights)
    return grads_nd


def mean_of_bucket_multi_krum(grads_nd: torch.Tensor, buckets: list, f: int = 0, params: dict | None = None,
                              mean_f: int = 0, mean_params: dict | None = None,
                              out: torch.Tensor | None = None, grams: list | None = None) -> torch.Tensor:
    """The ``mean`` rule over the buckets' Multi-Krum outputs: bit for bit
    ``aggregate("mean", bucket_multi_krum(grads_nd, buckets, f, params), mean_f, mean_params)``. On the CPU kernels'
    path the bucket outputs are never written out: one pass (``kernels.bucket_means_mean``) sums each block of
    them in cache and averages it. DETOX-Multi-Krum's step (the original's preset: 2 buckets, the mean across).
    ``grams``: buckets' Gram matrices already formed (see ``_multi_krum_choice``)."""
    _some_buckets("mean_of_bucket_multi_krum", buckets)
    checks = [_check("multi-krum", grads_nd, f, params, b) for b in buckets]
    _, err = _settings("mean", len(buckets), mean_f, mean_params)
    if err:
        raise ValueError(err)
    if all(c[4] is not None for c in checks):  # before any work (off the kernels' path the mean rule checks it)
        _check_out("mean", grads_nd, np.concatenate([c[4] for c in checks]), out)
        if grams is None and _cpu32(grads_nd) and grads_nd.is_contiguous():
            from detox.kernels import multi_krum_means_mean

            # the three calls below in one compiled call (None: a case it leaves to them)
            done = multi_krum_means_mean(grads_nd.numpy(), [c[4] for c in checks],
                                         [c[2]["neighbours"] for c in checks], [c[2]["m"] for c in checks],
                                         *_sample_bounds(grads_nd.shape[1]), _threads(), _np(out))
            if done is not None:
                return torch.from_numpy(done)
    choice = _multi_krum_choice(grads_nd, checks, grams)
    if choice is None:
        return aggregate("mean", bucket_multi_krum(grads_nd, buckets, f, params), mean_f, mean_params, out=out)
    from detox.kernels import bucket_means_mean

    rows, starts, weights = choice
    return torch.from_numpy(bucket_means_mean(grads_nd.numpy(), rows, starts, _threads(), _np(out), weights))


def prepared_bucket_stage(inner: str, mode: str, sizes: tuple[int, ...], f: int, params: dict | None,
                          inner_f: int, inner_params: dict | None, d: int, threads: int,
                          ) -> Callable[[torch.Tensor, np.ndarray, torch.Tensor | None], torch.Tensor | None] | None:
    """DETOX's bucket stage for buckets of ``sizes`` rows (``inner`` in each, ``mode`` across) of a contiguous
    float32 CPU matrix of d columns, with everything that stays the same from step to step settled once:
    ``fn(grads_nd, rows, out)``, ``rows`` the buckets' rows one after the other (``kernels.bucket_order``), is bit
    for bit ``middle_of_bucket_means`` (the mean inside, an order statistic across) or ``mean_of_bucket_multi_krum``
    (Multi-Krum inside, the mean across), or None where that rule's own path must run (a bucket of no finite row).
    The step's Python is then two calls: at d = 1e5 it runs right after the rows arrive, with the interpreter out of
    cache, where each of the rules' checks costs ~5x its warm time (issue #15). None: no such stage for (inner,
    mode), or settings the rules' own paths reject (with their one-line errors)."""
    from detox import kernels as K

    nb, total = len(sizes), sum(sizes)
    if nb < 1 or min(sizes) < 1 or d < 1 or threads < 1 or _settings(mode, nb, f, params)[1]:
        return None
    starts = np.array([0, *np.cumsum(sizes).tolist()], dtype=np.int64)
    if inner == "mean" and mode in MIDDLE:
        if _settings("mean", min(sizes), inner_f, inner_params)[1]:
            return None
        lo, hi = MIDDLE[mode](nb, f)
        pool = 1 if total * d < K._SERIAL_BUCKETS else K._pool(threads)  # as bucket_middle_mean decides
        net = None
        if nb <= K._UNROLL_ROWS and total <= K._UNROLL_BUCKET_ROWS and total * d >= K._UNROLL_ELEMS:
            net = K._unrolled(nb, int(lo), int(hi), tuple(sizes))

        def middle(x: np.ndarray, rows: np.ndarray, o: np.ndarray) -> np.ndarray:
            if net is None:
                return K.bucket_middle_mean(x, rows, starts, lo, hi, pool, o)
            return K.run_unrolled(net, x, rows, pool, o)

        return _stage(mode, middle)
    if inner == "multi-krum" and mode == "mean":
        settings = [_settings("multi-krum", n, inner_f, inner_params) for n in sizes]
        if any(err for _, err in settings):
            return None
        if threads > 1 and any(K._gram_threads(threads, np.empty((0, d), np.float32), n) > 1 for n in sizes):
            return None  # a matrix split across threads: the rule's own path
        ks = np.array([s["neighbours"] for s, _ in settings], dtype=np.int64)
        ms = np.array([s["m"] for s, _ in settings], dtype=np.int64)
        seg_starts, seg_ends = (np.array(a, dtype=np.int64) for a in _sample_bounds(d))
        pooled = min(threads, nb, K.numba.config.NUMBA_NUM_THREADS) > 1

        def multi_krum(x: np.ndarray, rows: np.ndarray, o: np.ndarray) -> np.ndarray | None:
            done = K._multi_krum_means_mean(x, rows, starts, ks, ms, seg_starts, seg_ends, K.BLOCK * 4, pooled,
                                            K._SERIAL_STREAM, K._pool(threads), o)
            return o if done else None

        return _stage("mean", multi_krum)
    return None


def prepared_rule_stage(name: str, n: int, f: int, params: dict | None, d: int,
                        ) -> Callable[[torch.Tensor, np.ndarray, torch.Tensor | None], torch.Tensor | None] | None:
    """``prepared_bucket_stage`` for a rule over DETOX's n winners (no buckets): ``fn(grads_nd, rows, out)`` is
    bit for bit ``aggregate(name, grads_nd, f, params, rows=rows, out=out)`` on a contiguous float32 CPU matrix of
    d columns, its settings resolved once (DETOX-Bulyan: its checks cost ~60 us a step with the interpreter out of
    cache, issue #15). ``rows`` must be valid row indices (the vote's). None: no prepared form of ``name``, or
    settings the rule rejects (with its one-line error)."""
    if name != "bulyan" or d < 1:
        return None
    settings, err = _settings(name, n, f, params)
    if err:
        return None

    def stage(grads_nd: torch.Tensor, rows: np.ndarray, out: torch.Tensor | None) -> torch.Tensor:
        _check_out(name, grads_nd, rows, out)
        return _bulyan_checked(grads_nd, rows, n, f, settings, out)

    return stage


def _stage(name: str, kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray | None],
           ) -> Callable[[torch.Tensor, np.ndarray, torch.Tensor | None], torch.Tensor | None]:
    """``kernel(x, rows, out)`` as a bucket stage of ``prepared_bucket_stage``: ``out`` checked as the rule checks
    it (it may be a row the stage does not read), a fresh (d,) tensor where None."""
    def stage(grads_nd: torch.Tensor, rows: np.ndarray, out: torch.Tensor | None) -> torch.Tensor | None:
        _check_out(name, grads_nd, rows, out)
        o = np.empty(grads_nd.shape[1], dtype=np.float32) if out is None else out.numpy()
        done = kernel(grads_nd.numpy(), rows, o)
        return None if done is None else torch.from_numpy(done)

    return stage


# the inner rules DETOX applies to all its buckets in one call (``fn(grads_nd, buckets, f, params, dest=None)``,
# bit for bit the rule bucket by bucket); any other inner rule runs bucket by bucket
BUCKETED: dict[str, Callable[..., torch.Tensor]] = {
    "mean": bucket_means,
    "multi-krum": bucket_multi_krum,
}


def _iterative_selection_reference(d2_nn: np.ndarray, f: int, theta: int, k_fixed: int | None) -> np.ndarray:
    """El Mhamdi et al. 2018: apply Krum to the rows R not yet selected, move its choice to the selection,
    repeat until theta rows are selected. Krum on R uses |R| - f - 2 neighbours (or ``k_fixed``), clipped to
    [0, |R| - 1]: the last iterations run on fewer rows than Krum's own bound, where the paper leaves the
    count undefined. The rule runs the compiled twin (``detox.kernels.iterative_selection``, same rows); this
    loop is what it is tested against."""
    left = np.arange(d2_nn.shape[0])
    chosen = []
    for _ in range(theta):
        size = left.size
        k = size - f - 2 if k_fixed is None else k_fixed
        k = min(max(k, 0), size - 1)
        best = int(_lowest(_scores(d2_nn[np.ix_(left, left)], k), 1)[0])
        chosen.append(int(left[best]))
        left = np.delete(left, best)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def bulyan(grads_nd: torch.Tensor, f: int, theta: int | str | None = None, neighbours: int | str | None = None,
           selection: str | None = None, average: str | None = None, rows: object = None,
           out: torch.Tensor | None = None, gram: np.ndarray | None = None, **other: object) -> torch.Tensor:
    """Bulyan: select theta rows by Krum, then per coordinate average beta = theta - 2f of their values.

    literature (El Mhamdi et al. 2018, the defaults): theta = n - 2f rows selected by re-running Krum on the
    rows left; per coordinate the mean of the beta values closest to the median. original (the DETOX code):
    theta = n - f - 2 rows of lowest Krum score in one pass; per coordinate the mean of the middle beta sorted
    values. Each setting can be chosen alone. Needs n >= 4f + 3. ``gram``: its centred Gram matrix, formed already
    (DETOX-Bulyan's vote pass, ``bulyan_gram_ref``).
    """
    n, _, s, grads_nd, rows = _check("bulyan", grads_nd, f, {"theta": theta, "neighbours": neighbours,
                                                             "selection": selection, "average": average, **other},
                                     rows, out)
    return _bulyan_checked(grads_nd, rows, n, f, s, out, gram)


@lru_cache(maxsize=64)
def _bulyan_selector(n: int, d: int, f: int, theta: int, k: int, k_fixed: int | None, iterative: bool,
                     threads: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray | None]:
    """``kernels.bulyan_selector`` for these counts (the same few every step): the selection ``_distances`` and the
    choice below make, in one compiled call. The Python between the ranking, the Gram matrix and the choice cost
    ~0.15 ms a call, with the interpreter out of cache as in DETOX's step right after the rows arrive (issue #15)."""
    from detox.kernels import bulyan_selector

    return bulyan_selector(n, d, f, theta, k, k_fixed, iterative, *_sample_bounds(d), threads)


def _bulyan_checked(grads_nd: torch.Tensor, rows: np.ndarray | None, n: int, f: int, s: dict,
                    out: torch.Tensor | None, gram: np.ndarray | None = None) -> torch.Tensor:
    """``bulyan``'s work on inputs it has checked (``_check``: n rows, settings ``s``)."""
    th, k_fixed, k = s["theta"], s["neighbours"], _bulyan_k(n, f, s)
    beta = th - 2 * f
    chosen = None
    if gram is None and _cpu32(grads_nd) and grads_nd.is_contiguous() and grads_nd.shape[1] > 0:
        from detox.kernels import _rows

        x = grads_nd.numpy()
        select = _bulyan_selector(n, x.shape[1], f, th, k, k_fixed, s["selection"] != ORIGINAL, _threads())
        chosen = select(x, _rows(x, rows))  # None: centred on a non-finite row, re-centred below
    if chosen is None:
        d2 = _distances(grads_nd, k, rows, gram)
        if s["selection"] == ORIGINAL:
            selected = np.sort(_lowest(_scores(d2, k), th))
        else:
            from detox.kernels import iterative_selection

            selected = iterative_selection(d2, f, th, k_fixed)
        chosen = np.ascontiguousarray(selected if rows is None else rows[selected], dtype=np.int64)
    if s["average"] == ORIGINAL:
        return _middle_rows(grads_nd, chosen, f, th - f, out)
    return _closest_rows(grads_nd, chosen, beta, out)


def _row_dists(rows_nd: torch.Tensor, z_d: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """Euclidean distance of every row (of ``rows``) to z in float64 (a finite 1e38 would overflow float32
    squares); one read, no (n, d) temporary. ``z_d`` may be float64 (Weiszfeld's iterate) or the rows' dtype."""
    if _cpu32(rows_nd):
        from detox.kernels import row_sq_dists

        x = rows_nd.contiguous().numpy()
        return torch.from_numpy(row_sq_dists(x, z_d.numpy(), _threads(), rows)).sqrt_()
    n, d = rows_nd.shape
    acc = torch.zeros(n, dtype=torch.float64, device=rows_nd.device)
    step = _block_cols(rows_nd, n, _GEMM_BLOCK_ELEMS)
    z64 = z_d.to(torch.float64)
    for s in range(0, d, step):
        acc += (rows_nd[:, s : s + step].double() - z64[s : s + step]).square_().sum(dim=1)
    return acc.sqrt_().cpu()


def geometric_median(grads_nd: torch.Tensor, f: int = 0, tol: float | None = None,
                     max_iter: int | None = None, rows: object = None, out: torch.Tensor | None = None,
                     **other: object) -> torch.Tensor:
    """argmin_z sum_i ||G_i - z|| by Weiszfeld iterations from a medoid (Vardi-Zhang step at data points).

    The iterate is kept and accumulated in float64 and rounded to the rows' dtype once, at the end. Stops
    when an iteration moves z by less than ``tol`` times the median distance of the rows to z (a scale set by
    the honest majority, so a few huge rows cannot end the iterations early), or when z is a data point that
    satisfies the optimality condition. Rows with a non-finite entry are infinitely far from every candidate
    and get weight 0. Needs n > 2f (its breakdown point is 1/2).
    """
    n, d, s, grads_nd, idx = _check("geometric-median", grads_nd, f, {"tol": tol, "max_iter": max_iter, **other},
                                    rows, out)
    tol, max_iter = s["tol"], s["max_iter"]
    at = (lambda i: i) if idx is None else (lambda i: int(idx[i]))  # position in idx -> row of grads_nd
    z_d = grads_nd[at(_reference_row(grads_nd, n // 2, None, idx))].to(torch.float64)  # inside the bulk
    dist_n = _row_dists(grads_nd, z_d, idx)
    if not bool(torch.isfinite(dist_n).any()):  # the start row carried a NaN/inf: start from a finite row
        start = _reference_row(grads_nd, n // 2, _finite_rows(grads_nd, idx), idx)
        if start < 0:
            return _into(out, torch.full((d,), float("nan"), dtype=grads_nd.dtype, device=grads_nd.device))
        z_d = grads_nd[at(start)].to(torch.float64)
        dist_n = _row_dists(grads_nd, z_d, idx)
    finite = torch.isfinite(dist_n)  # distances to a finite z: non-finite exactly for rows with NaN/inf
    if not bool(finite.all()):  # leave the hostile rows out: by index on the CPU, else a copy
        if _cpu32(grads_nd):
            idx = (np.arange(n) if idx is None else idx)[finite.numpy()]
        else:
            grads_nd = grads_nd[finite.to(grads_nd.device)]
    rows = grads_nd
    # the (n,) bookkeeping runs in numpy (a torch op on 45 numbers costs ~4 us, a dozen per iteration); the two
    # reductions whose rounding depends on torch's summation order (the weights' total, the step's norm) stay
    # torch's, so the iterates are the same bit for bit
    dist = dist_n.numpy()[finite.numpy()]
    mid = (dist.shape[0] - 1) // 2
    for _ in range(max_iter):
        scale = float(np.partition(dist, mid)[mid])  # torch.median: the lower middle value
        # rows at z (within round-off of the data's scale) would get an infinite Weiszfeld weight
        at_z = dist <= 1e-12 * max(float(dist.max()), 1e-300)
        w_n = torch.from_numpy(np.divide(1.0, dist, out=np.zeros_like(dist), where=~at_z))
        total = w_n.sum()
        if float(total) == 0.0:
            break  # every row coincides with z
        t_d = _weighted_rows64(rows, w_n / total, idx)
        eta = int(at_z.sum())
        if eta:
            # Vardi & Zhang (2000): z is optimal iff ||R|| <= eta, R = sum over other rows of unit vectors
            r = float(torch.linalg.vector_norm(t_d - z_d) * total)
            if r <= eta:
                break
            t_d = t_d * (1 - eta / r) + z_d * (eta / r)
        moved = float(torch.linalg.vector_norm(t_d - z_d))
        z_d = t_d
        if moved <= tol * scale:
            break
        dist = _row_dists(rows, z_d, idx).numpy()
    return _into(out, z_d.to(grads_nd.dtype))


def sign_sgd(grads_nd: torch.Tensor, f: int = 0, rows: object = None, out: torch.Tensor | None = None,
             **other: object) -> torch.Tensor:
    """signSGD with majority vote: sign of the sum of the rows' signs (NaN votes 0). Needs n > 2f."""
    _, _, _, grads_nd, rows = _check("sign-sgd", grads_nd, f, other, rows, out)
    if _cpu32(grads_nd):
        from detox.kernels import sign_votes

        return _into(out, torch.sign(torch.from_numpy(sign_votes(grads_nd.contiguous().numpy(), _threads(), rows))))
    votes_d = torch.zeros(grads_nd.shape[1], dtype=grads_nd.dtype, device=grads_nd.device)
    for row in grads_nd:
        votes_d.add_(torch.nan_to_num(torch.sign(row), nan=0.0))
    return _into(out, torch.sign(votes_d))


AGGREGATORS: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean,
    "coord-median": coord_median,
    "trimmed-mean": trimmed_mean,
    "geometric-median": geometric_median,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "sign-sgd": sign_sgd,
}


def aggregate(name: str, grads_nd: torch.Tensor, f: int, params: dict | None = None,
              rows: object = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Look up ``name`` in AGGREGATORS and apply it (to ``grads_nd[rows]`` when rows are given, read in place;
    into ``out`` when given)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {name!r}; choose from {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](grads_nd, f, rows=rows, out=out, **(params or {}))
