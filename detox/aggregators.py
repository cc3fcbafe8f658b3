"""Robust aggregation rules (DESIGN §3).

Each rule is ``fn(grads_nd, f, **params) -> agg_d``: ``grads_nd`` is an (n, d) float tensor, one row per
input, ``f`` the number of rows it must tolerate; the result is a fresh (d,) tensor. Ties are broken by the
lower row index (stable sorts everywhere). ``AGGREGATORS`` maps each ``mode`` option name to its rule.

Work is vectorised over the whole matrix; coordinate-wise order statistics run on cache-sized column blocks
that are transposed to contiguous (block, n) rows, so no rule sorts a strided (n, d) matrix or copies it whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# columns per block for coordinate-wise sorts: about 1 MiB of float32 per block, whatever n is
_BLOCK_ELEMS = 1 << 18
# elements per block of the Gram matrix and of Weiszfeld's distances (4 MiB of float32)
_GEMM_BLOCK_ELEMS = 1 << 20
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


def _column_blocks(grads_nd: torch.Tensor, rows: torch.Tensor | None, reduce: Callable) -> torch.Tensor:
    """Apply ``reduce(sorted_bn) -> (b,)`` to each column block, its values sorted per coordinate.

    ``rows`` optionally selects rows (gathered per block, so the selection is never copied whole).
    NaN sorts above +inf, so a NaN behaves like a huge value and cannot become an order statistic
    in the middle unless more than the tolerated number of rows carry it.
    """
    n_sel = grads_nd.shape[0] if rows is None else rows.numel()
    d = grads_nd.shape[1]
    out_d = torch.empty(d, dtype=grads_nd.dtype, device=grads_nd.device)
    step = max(1, _BLOCK_ELEMS // n_sel)
    for s in range(0, d, step):
        blk = grads_nd[:, s : s + step] if rows is None else grads_nd[rows, s : s + step]
        sorted_bn = blk.t().contiguous().sort(dim=1).values
        out_d[s : s + step] = reduce(sorted_bn)
    return out_d


def _middle_mean(trim: int) -> Callable:
    """Per coordinate, the mean of the sorted values left after dropping ``trim`` at each end."""

    def reduce(sorted_bn: torch.Tensor) -> torch.Tensor:
        return sorted_bn[:, trim : sorted_bn.shape[1] - trim].mean(dim=1)

    return reduce


def _median_reduce(sorted_bn: torch.Tensor) -> torch.Tensor:
    n = sorted_bn.shape[1]
    if n % 2:
        return sorted_bn[:, n // 2]
    # numpy's convention for even n: the mean of the two middle values
    return (sorted_bn[:, n // 2 - 1] + sorted_bn[:, n // 2]) * 0.5


def mean(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Arithmetic mean of the rows (no robustness; f is accepted for a uniform signature)."""
    _check("mean", grads_nd, f)
    return grads_nd.mean(dim=0)


def coord_median(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values."""
    _check("coord-median", grads_nd, f)
    return _column_blocks(grads_nd, None, _median_reduce)


def trimmed_mean(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate, drop the f smallest and f largest values and average the rest."""
    n, _ = _check("trimmed-mean", grads_nd, f)
    _check("trimmed-mean", grads_nd, f, n > 2 * f, "n > 2f")
    return _column_blocks(grads_nd, None, _middle_mean(f))


def _reference_row(x_nd: torch.Tensor, k: int) -> int:
    """A row inside the bulk of the data: the Krum-style medoid on a strided sample of columns (float64)."""
    n, d = x_nd.shape
    stride = max(1, d // _SAMPLE_COLS)
    sample = x_nd[:, ::stride].double()
    sample = sample - sample[0]
    gram = sample @ sample.t()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    d2.fill_diagonal_(float("inf"))
    k = min(max(k, 1), n - 1)
    return int(torch.sort(d2.topk(k, dim=1, largest=False).values.sum(dim=1), stable=True).indices[0])


def pairwise_sq_dists(grads_nd: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances; rows with a non-finite entry are +inf from every other row.

    Rows are centred on a reference row inside the bulk of the data (``k``: neighbours used to find it)
    before the Gram matrix is formed, block by block with float64 accumulation. Without centring,
    ||a||^2 + ||b||^2 - 2<a, b> in float32 loses every digit when rows share a large common component.
    The diagonal is exactly 0.
    """
    n, d = grads_nd.shape
    d2 = torch.full((n, n), float("inf"), dtype=torch.float64, device=grads_nd.device)
    d2.fill_diagonal_(0.0)
    finite_n = torch.isfinite(grads_nd).all(dim=1)
    idx = torch.nonzero(finite_n).flatten()
    m = idx.numel()
    if m < 2:
        return d2
    x_md = grads_nd if m == n else grads_nd.index_select(0, idx)  # copies only when rows are hostile
    ref_d = x_md[_reference_row(x_md, (k if k is not None else m // 2))]
    gram = torch.zeros((m, m), dtype=torch.float64, device=grads_nd.device)
    step = max(1, _GEMM_BLOCK_ELEMS // m)
    for s in range(0, d, step):
        blk = x_md[:, s : s + step] - ref_d[s : s + step]
        gram += (blk @ blk.t()).double()
    sq = gram.diagonal()
    sub = torch.nan_to_num((sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0), nan=float("inf"))
    sub.fill_diagonal_(0.0)
    d2[idx[:, None], idx[None, :]] = sub
    return d2


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
    return grads_nd[best[0]].clone()


def _row_mean(grads_nd: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # adds selected rows one at a time: reads m rows, never copies the (m, d) selection
    out_d = grads_nd[idx[0]].clone()
    for i in idx[1:].tolist():
        out_d.add_(grads_nd[i])
    return out_d.div_(idx.numel())


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
    return _column_blocks(grads_nd, selected, _middle_mean(f))


def _row_dists(rows_nd: torch.Tensor, z_d: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every row to z (float64), in column blocks: no (n, d) temporary."""
    n, d = rows_nd.shape
    acc = torch.zeros(n, dtype=torch.float64, device=rows_nd.device)
    step = max(1, _GEMM_BLOCK_ELEMS // n)
    for s in range(0, d, step):
        # squares in float64: a finite 1e38 coordinate would overflow float32 and blind every distance
        acc += (rows_nd[:, s : s + step] - z_d[s : s + step]).double().square_().sum(dim=1)
    return acc.sqrt_()


def geometric_median(grads_nd: torch.Tensor, f: int = 0, tol: float = 1e-7, max_iter: int = 1000) -> torch.Tensor:
    """argmin_z sum_i ||G_i - z|| by Weiszfeld iterations from a medoid (Vardi-Zhang step at data points).

    Stops when an iteration moves z by less than ``tol`` times the median distance of the rows to z (a scale
    set by the honest majority, so a few huge rows cannot end the iterations early), or when z is a data
    point that satisfies the optimality condition. Rows with a non-finite entry are infinitely far from
    every candidate and get weight 0.
    """
    n, d = _check("geometric-median", grads_nd, f)
    finite = torch.isfinite(grads_nd).all(dim=1)
    rows = grads_nd if bool(finite.all()) else grads_nd[finite]
    if rows.shape[0] == 0:
        return torch.full((d,), float("nan"), dtype=grads_nd.dtype, device=grads_nd.device)
    # start inside the bulk of the data (a medoid), not at the mean that a few huge rows drag away
    z_d = rows[_reference_row(rows, rows.shape[0] // 2)].clone() if rows.shape[0] > 1 else rows[0].clone()
    for _ in range(max_iter):
        dist_n = _row_dists(rows, z_d)
        scale = float(dist_n.median())
        # rows at z (within round-off of the data's scale) would get an infinite Weiszfeld weight
        at_z = dist_n <= 1e-12 * max(float(dist_n.max()), 1e-300)
        w_n = torch.where(at_z, 0.0, 1.0 / dist_n)
        if float(w_n.sum()) == 0.0:
            break  # every row coincides with z
        t_d = (w_n / w_n.sum()).to(rows.dtype) @ rows
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
    return z_d


def sign_sgd(grads_nd: torch.Tensor, f: int = 0) -> torch.Tensor:
    """signSGD with majority vote: sign of the sum of the rows' signs (NaN votes 0)."""
    _check("sign-sgd", grads_nd, f)
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
