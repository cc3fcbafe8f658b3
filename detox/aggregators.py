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


def pairwise_sq_dists(grads_nd: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances from one matrix product; non-finite entries become +inf.

    The Gram matrix is computed in the input dtype (one pass over the data); norms and differences are
    combined in float64. The diagonal is exactly 0.
    """
    gram = (grads_nd @ grads_nd.t()).double()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    d2 = torch.nan_to_num(d2, nan=float("inf"))
    d2.fill_diagonal_(0.0)
    return d2


def krum_scores(grads_nd: torch.Tensor, f: int) -> torch.Tensor:
    """score_i = sum of squared distances from row i to its n - f - 2 nearest other rows."""
    n = grads_nd.shape[0]
    d2 = pairwise_sq_dists(grads_nd)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = n - f - 2
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


def geometric_median(
    grads_nd: torch.Tensor, f: int = 0, tol: float = 1e-8, max_iter: int = 1000, eps: float = 1e-12
) -> torch.Tensor:
    """argmin_z sum_i ||G_i - z|| by Weiszfeld iterations from the mean.

    Stops when the objective decreases by less than ``tol`` relative. Rows with a non-finite entry are
    infinitely far from every candidate and get weight 0.
    """
    n, d = _check("geometric-median", grads_nd, f)
    finite = torch.isfinite(grads_nd).all(dim=1)
    rows = grads_nd if bool(finite.all()) else grads_nd[finite]
    if rows.shape[0] == 0:
        return torch.full((d,), float("nan"), dtype=grads_nd.dtype, device=grads_nd.device)
    z_d = rows.mean(dim=0)
    prev = float("inf")
    for _ in range(max_iter):
        dist_n = torch.linalg.vector_norm(rows - z_d, dim=1).double()
        obj = float(dist_n.sum())
        if prev - obj <= tol * max(obj, eps):
            break
        prev = obj
        w_n = 1.0 / dist_n.clamp(min=eps)
        z_d = (w_n / w_n.sum()).to(rows.dtype) @ rows
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
