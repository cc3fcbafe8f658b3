"""Robust aggregation rules (DESIGN §3).

Each rule is ``fn(grads_nd, f, **params) -> agg_d``: ``grads_nd`` is an (n, d) float tensor, one row per
input, ``f`` the number of rows it must tolerate; the result is a fresh (d,) tensor. Ties are broken by the
lower row index (stable sorts everywhere). ``AGGREGATORS`` maps each ``mode`` option name to its rule.

Work is vectorised over the whole matrix, never copying it whole: distances come from a blocked Gram matrix,
coordinate-wise order statistics from a compiled selection network over cache-sized column blocks
(``detox.kernels``), Weiszfeld's distances from column blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# columns per block for the torch fallback of coordinate-wise sorts (CUDA): about 1 MiB of float32 per block
_BLOCK_ELEMS = 1 << 18
# elements per block of the Gram matrix (about 3 MiB of float32 at n = 45; measured best, docs/performance.md)
_GEMM_BLOCK_ELEMS = 45 << 14
# columns sampled to find a reference row for centring
_SAMPLE_COLS = 1 << 14


def _check(name: str, grads_nd: torch.Tensor, f: int, ok: bool = True, bound: str = "") -> tuple[int, int]:
    """Validate the input matrix and the rule's (n, f) requirement; raise one clear ValueError."""
    if not isinstance(grads_nd, torch.Tensor) or grads_nd.dim() != 2 or not grads_nd.is_floating_point():
        raise ValueError(f"{name}: grads must be a 2-D float tensor (n, d), got {_describe(grads_nd)}")
    n, d = grads_nd.shape
    if n < 1:
        raise ValueError(f"{name}: needs at least one row, got n=0")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: f must be an integer >= 0, got f={f!r}")
    if not ok:
        raise ValueError(f"{name} needs {bound}; got n={n}, f={f}")
    return n, d


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _middle_rows(grads_nd: torch.Tensor, rows: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Per coordinate, the mean of the sorted values at positions [lo, hi) among the selected rows.

    On the CPU a compiled selection network does it block by block (``detox.kernels``); elsewhere (CUDA,
    float64) torch sorts cache-sized column blocks. Either way NaN sorts above +inf, so it can become an
    order statistic only if more than the tolerated number of rows carry it.
    """
    if grads_nd.device.type == "cpu" and grads_nd.dtype == torch.float32:
        from detox.kernels import middle_mean  # numba compiles (or loads from its cache) on first use

        idx = np.arange(grads_nd.shape[0]) if rows is None else rows.cpu().numpy()
        x = grads_nd.contiguous().numpy()
        return torch.from_numpy(middle_mean(x, idx, lo, hi, torch.get_num_threads()))
    n_sel = grads_nd.shape[0] if rows is None else rows.numel()
    d = grads_nd.shape[1]
    out_d = torch.empty(d, dtype=grads_nd.dtype, device=grads_nd.device)
    step = max(1, _BLOCK_ELEMS // n_sel)
    for s in range(0, d, step):
        blk = grads_nd[:, s : s + step] if rows is None else grads_nd[rows, s : s + step]
        out_d[s : s + step] = blk.t().contiguous().sort(dim=1).values[:, lo:hi].mean(dim=1)
    return out_d


def mean(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Arithmetic mean of the rows (no robustness; f is accepted for a uniform signature)."""
    n, _ = _check("mean", grads_nd, f)
    if _cpu32(grads_nd):  # one compiled pass at memory speed; sum then divide, as torch.mean
        return _weighted_rows(grads_nd, torch.ones(n, dtype=torch.float64)).div_(n)
    return grads_nd.mean(dim=0)


def coord_median(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values."""
    n, _ = _check("coord-median", grads_nd, f)
    # numpy's convention: for even n the mean of the two middle values
    return _middle_rows(grads_nd, None, (n - 1) // 2, n // 2 + 1)


def trimmed_mean(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate, drop the f smallest and f largest values and average the rest."""
    n, _ = _check("trimmed-mean", grads_nd, f)
    _check("trimmed-mean", grads_nd, f, n > 2 * f, "n > 2f")
    return _middle_rows(grads_nd, None, f, n - f)


def _cpu32(x: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels apply (float32 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def _threads() -> int:
    return torch.get_num_threads()


def _candidates(x_nd: torch.Tensor, k: int) -> list[int]:
    """Rows ranked by a Krum-style score on a sample of columns (float64, cheap): the first lie inside the
    bulk of the data. The sample is a few contiguous column segments, so it costs little memory traffic."""
    n, d = x_nd.shape
    seg = max(1, _SAMPLE_COLS // 8)
    starts = np.linspace(0, max(d - seg, 0), num=8, dtype=np.int64)
    sample = torch.cat([x_nd[:, s : s + seg] for s in np.unique(starts).tolist()], dim=1).double()
    sample = sample - sample[0]
    gram = sample @ sample.t()
    sq = gram.diagonal()
    d2 = torch.nan_to_num((sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0), nan=float("inf"))
    d2.fill_diagonal_(float("inf"))
    if n == 1:
        return [0]
    k = min(max(k, 1), n - 1)
    return torch.sort(d2.topk(k, dim=1, largest=False).values.sum(dim=1), stable=True).indices.tolist()


def _finite_rows(x_nd: torch.Tensor) -> torch.Tensor:
    """(n,) bool: rows without NaN or inf (one read; only needed when a hostile row shows up)."""
    if _cpu32(x_nd):
        from detox.kernels import row_sq_dists

        zero = np.zeros(x_nd.shape[1], dtype=np.float32)
        return torch.isfinite(torch.from_numpy(row_sq_dists(x_nd.contiguous().numpy(), zero, _threads())))
    return torch.isfinite(x_nd).all(dim=1).cpu()


def _reference_row(x_nd: torch.Tensor, k: int, finite: torch.Tensor | None = None) -> int:
    """A row inside the bulk of the data (the best-ranked candidate; among ``finite`` rows if given), or -1."""
    for i in _candidates(x_nd, k):
        if finite is None or bool(finite[i]):
            return i
    return -1


def _centred_gram(x_nd: torch.Tensor, ref_d: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 Gram matrix of the rows minus ``ref_d``, one column block at a time.

    Blocks are centred into a reused buffer, multiplied in float32 and accumulated in float64: one read of
    the matrix and no temporary of its size (on the CPU a compiled kernel, ``detox.kernels.centred_gram``).
    """
    n, d = x_nd.shape
    step = max(1, _GEMM_BLOCK_ELEMS // n)
    if _cpu32(x_nd):
        from detox.kernels import centred_gram

        return torch.from_numpy(centred_gram(x_nd.contiguous().numpy(), ref_d.numpy(), _threads()))
    gram_t = torch.zeros((n, n), dtype=torch.float64, device=x_nd.device)
    for s in range(0, d, step):
        blk = x_nd[:, s : s + step] - ref_d[s : s + step]
        gram_t += (blk @ blk.t()).double()
    return gram_t


def pairwise_sq_dists(grads_nd: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances; a row with a non-finite entry (or whose squared norm
    overflows float32) is +inf from every other row. The diagonal is exactly 0.

    Rows are centred on a finite reference row inside the bulk of the data (``k``: neighbours used to find
    it) before the Gram matrix is formed: without centring, ||a||^2 + ||b||^2 - 2<a, b> in float32 loses
    every digit when rows share a large common component.
    """
    n, d = grads_nd.shape
    k = k if k is not None else n // 2
    gram = _centred_gram(grads_nd, grads_nd[_reference_row(grads_nd, k)]).cpu()
    sq = gram.diagonal()
    if n > 1 and not bool(torch.isfinite(sq).any()):
        # the reference row itself carried a NaN/inf (outside the sample): centre on a finite row instead
        ref = _reference_row(grads_nd, k, _finite_rows(grads_nd))
        if ref < 0:
            d2 = torch.full((n, n), float("inf"), dtype=torch.float64)
            return d2.fill_diagonal_(0.0)
        gram = _centred_gram(grads_nd, grads_nd[ref]).cpu()
        sq = gram.diagonal()
    # each Gram entry involves only its two rows: a hostile row spoils its own row and column, nothing else
    ok = torch.isfinite(sq)
    sub = torch.nan_to_num((sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0), nan=float("inf"))
    sub[~ok, :] = float("inf")
    sub[:, ~ok] = float("inf")
    sub.fill_diagonal_(0.0)
    return sub


def krum_scores(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """score_i = sum of squared distances from row i to its n - f - 2 nearest other rows."""
    n = grads_nd.shape[0]
    k = n - f - 2
    d2 = pairwise_sq_dists(grads_nd, k)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    return d2.topk(k, dim=1, largest=False, sorted=False).values.sum(dim=1)


def _lowest(scores_n: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ties to the lower index."""
    return torch.sort(scores_n, stable=True).indices[:k]


def krum(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """The row with the lowest Krum score."""
    n, _ = _check("krum", grads_nd, f)
    _check("krum", grads_nd, f, n >= 2 * f + 3, "n >= 2f + 3")
    best = _lowest(krum_scores(grads_nd, f), 1)
    return grads_nd[int(best[0])].clone()


def _weighted_rows(grads_nd: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
    """sum_i w_i G_i over the rows with w_i != 0 (a zero-weight row is skipped, so its NaN cannot leak)."""
    if _cpu32(grads_nd):
        from detox.kernels import weighted_sum

        return torch.from_numpy(weighted_sum(grads_nd.contiguous().numpy(), w_n.numpy(), _threads()))
    keep = torch.nonzero(w_n).flatten()
    w = w_n.to(grads_nd.dtype).to(grads_nd.device)
    return w[keep] @ grads_nd[keep.to(grads_nd.device)]


def _row_mean(grads_nd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    w_n = torch.zeros(grads_nd.shape[0], dtype=torch.float64)
    w_n[idx] = 1.0 / idx.numel()
    return _weighted_rows(grads_nd, w_n)


def multi_krum(grads_nd: torch.Tensor, f: int, m: int | None = None) -> torch.Tensor:
    """Mean of the m rows of lowest Krum score (m defaults to n - f)."""
    n, _ = _check("multi-krum", grads_nd, f)
    _check("multi-krum", grads_nd, f, n >= 2 * f + 3, "n >= 2f + 3")
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"multi-krum: m must be an integer in [1, n]; got m={m!r}, n={n}")
    return _row_mean(grads_nd, _lowest(krum_scores(grads_nd, f), m))


def bulyan(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """One-pass Bulyan: the n - 2f rows of lowest Krum score, then per coordinate the middle n - 4f mean."""
    n, _ = _check("bulyan", grads_nd, f)
    _check("bulyan", grads_nd, f, n >= 4 * f + 3, "n >= 4f + 3")
    theta = n - 2 * f
    selected = torch.sort(_lowest(krum_scores(grads_nd, f), theta)).values
    return _middle_rows(grads_nd, selected, f, theta - f)


def _row_dists(rows_nd: torch.Tensor, z_d: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every row to z in float64 (a finite 1e38 would overflow float32 squares);
    one read, no (n, d) temporary."""
    if _cpu32(rows_nd):
        from detox.kernels import row_sq_dists

        return torch.from_numpy(row_sq_dists(rows_nd.contiguous().numpy(), z_d.numpy(), _threads())).sqrt_()
    n, d = rows_nd.shape
    acc = torch.zeros(n, dtype=torch.float64, device=rows_nd.device)
    step = max(1, _GEMM_BLOCK_ELEMS // n)
    for s in range(0, d, step):
        acc += (rows_nd[:, s : s + step] - z_d[s : s + step]).double().square_().sum(dim=1)
    return acc.sqrt_().cpu()


def geometric_median(grads_nd: torch.Tensor, f: int = 0, tol: float = 1e-7, max_iter: int = 1000) -> torch.Tensor:
    """argmin_z sum_i ||G_i - z|| by Weiszfeld iterations from a medoid (Vardi-Zhang step at data points).

    Stops when an iteration moves z by less than ``tol`` times the median distance of the rows to z (a scale
    set by the honest majority, so a few huge rows cannot end the iterations early), or when z is a data
    point that satisfies the optimality condition. Rows with a non-finite entry are infinitely far from
    every candidate and get weight 0.
    """
    n, d = _check("geometric-median", grads_nd, f)
    z_d = grads_nd[_reference_row(grads_nd, n // 2)].clone()  # inside the bulk of the data, unlike the mean
    dist_n = _row_dists(grads_nd, z_d)
    if not bool(torch.isfinite(dist_n).any()):  # the start row carried a NaN/inf: start from a finite row
        start = _reference_row(grads_nd, n // 2, _finite_rows(grads_nd))
        if start < 0:
            return torch.full((d,), float("nan"), dtype=grads_nd.dtype, device=grads_nd.device)
        z_d = grads_nd[start].clone()
        dist_n = _row_dists(grads_nd, z_d)
    finite = torch.isfinite(dist_n)  # distances to a finite z: non-finite exactly for rows with NaN/inf
    rows = grads_nd if bool(finite.all()) else grads_nd[finite.to(grads_nd.device)]  # copies only if hostile
    dist_n = dist_n[finite]
    for _ in range(max_iter):
        scale = float(dist_n.median())
        # rows at z (within round-off of the data's scale) would get an infinite Weiszfeld weight
        at_z = dist_n <= 1e-12 * max(float(dist_n.max()), 1e-300)
        w_n = torch.where(at_z, 0.0, 1.0 / dist_n)
        if float(w_n.sum()) == 0.0:
            break  # every row coincides with z
        t_d = _weighted_rows(rows, w_n / w_n.sum())
        eta = int(at_z.sum())
        if eta:
            # Vardi & Zhang (2000): z is optimal iff ||R|| <= eta, R = sum over other rows of unit vectors
            r = float(torch.linalg.vector_norm((t_d - z_d).double()) * w_n.sum())
            if r <= eta:
                break
            t_d = t_d * (1 - eta / r) + z_d * (eta / r)
        moved = float(torch.linalg.vector_norm((t_d - z_d).double()))
        z_d = t_d
        if moved <= tol * scale:
            break
        dist_n = _row_dists(rows, z_d)
    return z_d


def sign_sgd(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """signSGD with majority vote: sign of the sum of the rows' signs (NaN votes 0)."""
    _check("sign-sgd", grads_nd, f)
    if _cpu32(grads_nd):
        from detox.kernels import sign_votes

        return torch.sign(torch.from_numpy(sign_votes(grads_nd.contiguous().numpy(), _threads())))
    votes_d = torch.zeros(grads_nd.shape[1], dtype=grads_nd.dtype, device=grads_nd.device)
    for row in grads_nd:
        votes_d.add_(torch.nan_to_num(torch.sign(row), nan=0.0))
    return torch.sign(votes_d)


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


def aggregate(name: str, grads_nd: torch.Tensor, f: int, params: dict | None = None) -> torch.Tensor:
    """Look up ``name`` in AGGREGATORS and apply it."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {name!r}; choose from {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](grads_nd, f, **(params or {}))
