"""Tests of the robust aggregation rules (DESIGN §3) in ``detox.aggregators``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from detox.aggregators import _BLOCK_ELEMS, AGGREGATORS, aggregate, krum_scores

ALL_RULES = sorted(AGGREGATORS)
PROPS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def run(name: str, g: torch.Tensor, f: int, **params) -> torch.Tensor:
    return AGGREGATORS[name](g, f, **params)


def valid_f(name: str, n: int) -> int:
    """A largest f that satisfies the rule's requirement for n rows."""
    if name == "trimmed-mean":
        return (n - 1) // 2
    if name in ("krum", "multi-krum"):
        return max(0, (n - 3) // 2)
    if name == "bulyan":
        return max(0, (n - 3) // 4)
    return 1


# --------------------------------------------------------------------------------------- numpy reference


def ref_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = x.shape[0]
    x = x.astype(np.float64)
    scores = np.empty(n)
    for i in range(n):
        d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores[i] = sum(d2[: n - f - 2])
    return scores


def ref_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(scores, kind="stable")[:k]


def ref_aggregate(name: str, x: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    n = x.shape[0]
    x64 = x.astype(np.float64)
    if name == "mean":
        return x64.mean(axis=0)
    if name == "coord-median":
        return np.median(x64, axis=0)
    if name == "trimmed-mean":
        return np.sort(x64, axis=0)[f : n - f].mean(axis=0)
    if name == "krum":
        return x64[ref_lowest(ref_krum_scores(x, f), 1)[0]]
    if name == "multi-krum":
        return x64[ref_lowest(ref_krum_scores(x, f), n - f if m is None else m)].mean(axis=0)
    if name == "bulyan":
        theta = n - 2 * f
        sel = x64[np.sort(ref_lowest(ref_krum_scores(x, f), theta))]
        return np.sort(sel, axis=0)[f : theta - f].mean(axis=0)
    if name == "sign-sgd":
        return np.sign(np.sign(x64).sum(axis=0))
    raise KeyError(name)


def gm_objective(x: np.ndarray, z: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) - z.astype(np.float64), axis=1).sum())


def gm_optimum(x: np.ndarray) -> float:
    """Optimum of sum_i ||x_i - z|| from scipy (best of a few starts, tight tolerances)."""
    x64 = x.astype(np.float64)
    best = math.inf
    for z0 in (x64.mean(axis=0), np.median(x64, axis=0), x64[0] + 0.1):
        res = minimize(lambda z: gm_objective(x64, z), z0, method="BFGS", options={"gtol": 1e-10})
        best = min(best, float(res.fun))
        res = minimize(lambda z: gm_objective(x64, z), res.x, method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000})
        best = min(best, float(res.fun))
    return best


# --------------------------------------------------------------------------------------- hand-checked examples


def test_mean_exact():
    g = T([[1, 2], [3, 4], [5, 9]])
    assert torch.equal(run("mean", g, 0), T([3, 5]))


def test_coord_median_odd_n():
    # col 0: 1,2,3 -> 2 ; col 1: 1,5,9 -> 5
    g = T([[1, 5], [3, 1], [2, 9]])
    assert torch.equal(run("coord-median", g, 0), T([2, 5]))


def test_coord_median_even_n_is_mean_of_two_middle_values():
    # col 0 sorted 1,2,4,8 -> (2+4)/2 = 3 ; col 1 sorted 0,3,5,10 -> (3+5)/2 = 4
    g = T([[1, 10], [4, 0], [2, 3], [8, 5]])
    out = run("coord-median", g, 0)
    assert torch.equal(out, T([3, 4]))
    assert np.array_equal(out.numpy(), np.median(g.numpy(), axis=0))


def test_trimmed_mean_drops_f_smallest_and_largest():
    g = T([[10, 0], [1, 7], [2, 8], [-50, 9], [3, 100]])
    # f=1: col 0 sorted -50,1,2,3,10 -> mean(1,2,3) = 2 ; col 1 sorted 0,7,8,9,100 -> mean(7,8,9) = 8
    assert torch.equal(run("trimmed-mean", g, 1), T([2, 8]))
    # f=2 keeps only the middle value (the median): 2 and 8
    assert torch.equal(run("trimmed-mean", g, 2), T([2, 8]))
    # f=0 is the mean: (10+1+2-50+3)/5 = -6.8, (0+7+8+9+100)/5 = 24.8
    assert torch.allclose(run("trimmed-mean", g, 0), T([-6.8, 24.8]))


def test_trimmed_mean_even_n():
    # n=6, f=2: col 0 sorted 0,1,2,3,4,5 -> mean(2,3) = 2.5
    g = T([[5], [0], [3], [1], [4], [2]])
    assert torch.equal(run("trimmed-mean", g, 2), T([2.5]))


KRUM_G = [[0, 0], [1, 0], [0, 2], [3, 0], [10, 10]]
# squared distances: d01=1 d02=4 d03=9 d04=200 d12=5 d13=4 d14=181 d23=13 d24=164 d34=149
# n=5, f=1 -> n-f-2 = 2 nearest other rows:
#   s0 = 1+4 = 5, s1 = 1+4 = 5, s2 = 4+5 = 9, s3 = 4+9 = 13, s4 = 149+164 = 313
KRUM_SCORES = [5, 5, 9, 13, 313]


def test_krum_scores_by_hand():
    assert krum_scores(T(KRUM_G), 1).tolist() == KRUM_SCORES


def test_krum_tie_goes_to_lower_index():
    # s0 == s1 == 5: the lower index wins
    assert torch.equal(run("krum", T(KRUM_G), 1), T([0, 0]))
    swapped = [KRUM_G[1], KRUM_G[0], *KRUM_G[2:]]
    assert torch.equal(run("krum", T(swapped), 1), T([1, 0]))


def test_krum_unique_winner():
    # 1-D rows 0,1,3,7,100 ; f=1 -> 2 nearest others
    #   s0 = 1+9 = 10, s1 = 1+4 = 5, s2 = 4+9 = 13, s3 = 16+36 = 52, s4 = 8649+9409 = 18058 -> row 1
    g = T([[0], [1], [3], [7], [100]])
    assert krum_scores(g, 1).tolist() == [10, 5, 13, 52, 18058]
    assert torch.equal(run("krum", g, 1), T([1]))


def test_krum_f0_uses_n_minus_2_neighbours():
    # n=3, f=0 -> 1 nearest other row; rows 0, 2, 5: s0 = 4, s1 = 4, s2 = 9 -> tie -> row 0
    g = T([[0], [2], [5]])
    assert krum_scores(g, 0).tolist() == [4, 4, 9]
    assert torch.equal(run("krum", g, 0), T([0]))


def test_multi_krum_default_m_is_n_minus_f():
    # scores 5,5,9,13,313 -> m = 4 lowest: rows 0,1,2,3 -> mean((0,0),(1,0),(0,2),(3,0)) = (1, 0.5)
    assert torch.equal(run("multi-krum", T(KRUM_G), 1), T([1, 0.5]))


def test_multi_krum_explicit_m():
    # m=2: rows 0,1 -> (0.5, 0) ; m=3: rows 0,1,2 -> (1/3, 2/3) ; m=1 is krum
    assert torch.equal(run("multi-krum", T(KRUM_G), 1, m=2), T([0.5, 0]))
    assert torch.allclose(run("multi-krum", T(KRUM_G), 1, m=3), T([1 / 3, 2 / 3]))
    assert torch.equal(run("multi-krum", T(KRUM_G), 1, m=1), run("krum", T(KRUM_G), 1))
    assert torch.equal(aggregate("multi-krum", T(KRUM_G), 1, {"m": 2}), T([0.5, 0]))
    assert torch.equal(aggregate("multi-krum", T(KRUM_G), 1, {"m": None}), T([1, 0.5]))


@pytest.mark.parametrize("m", [0, 6, 2.0, True])
def test_multi_krum_bad_m(m):
    with pytest.raises(ValueError, match="m"):
        run("multi-krum", T(KRUM_G), 1, m=m)


def test_bulyan_by_hand():
    g = T([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [0, 5], [9, 9]])
    # n=7, f=1 -> Krum with n-f-2 = 4 nearest others (squared distances):
    #   s0 = 1+1+2+4 = 8, s1 = 1+1+1+2 = 5, s2 = 1+1+2+5 = 9, s3 = 1+1+2+2 = 6, s4 = 1+2+4+5 = 12,
    #   s5 = 16+17+25+26 = 84, s6 = 97+128+130+145 = 500
    assert krum_scores(g, 1).tolist() == [8, 5, 9, 6, 12, 84, 500]
    # theta = n-2f = 5 lowest: rows 1,3,0,2,4 = (0,0),(1,0),(0,1),(1,1),(2,0)
    # per coordinate, middle theta-2f = 3 of the sorted values:
    #   col 0 sorted 0,0,1,1,2 -> mean(0,1,1) = 2/3 ; col 1 sorted 0,0,0,1,1 -> mean(0,0,1) = 1/3
    out = run("bulyan", g, 1)
    assert torch.allclose(out, T([2 / 3, 1 / 3]), rtol=0, atol=1e-7)


def test_bulyan_f0_is_mean():
    g = T([[1, 2], [3, 4], [5, 9]])
    assert torch.allclose(run("bulyan", g, 0), T([3, 5]))


def test_sign_sgd_by_hand():
    g = T([[1, -2, 0, 3], [-1, -1, 0, 2], [5, 4, 0, -1], [-2, -3, 7, 1]])
    # sums of signs per column: 1-1+1-1 = 0 ; -1-1+1-1 = -2 ; 0+0+0+1 = 1 ; 1+1-1+1 = 2
    assert torch.equal(run("sign-sgd", g, 0), T([0, -1, 1, 1]))
    # magnitudes do not matter: one huge positive value loses to two small negatives
    assert torch.equal(run("sign-sgd", T([[1e6], [-1e-3], [-1e-3]]), 0), T([-1]))


def test_geometric_median_symmetric_case():
    # corners of a square centred at (3, 5) plus the centre: the median is the centre, objective 4*sqrt(2)
    g = T([[4, 6], [4, 4], [2, 6], [2, 4], [3, 5]])
    z = run("geometric-median", g, 0)
    assert torch.allclose(z, T([3, 5]), atol=1e-5)
    assert gm_objective(g.numpy(), z.numpy()) == pytest.approx(4 * math.sqrt(2), rel=1e-6)


def test_geometric_median_collinear_points_is_middle_point():
    # on a line the geometric median of an odd number of points is the middle one
    g = T([[0, 0], [1, 1], [5, 5]])
    z = run("geometric-median", g, 0)
    assert torch.allclose(z, T([1, 1]), atol=1e-4)


@pytest.mark.parametrize("n,d,seed", [(3, 1, 0), (5, 2, 1), (7, 3, 2), (10, 5, 3), (12, 6, 4)])
def test_geometric_median_objective_matches_scipy(n, d, seed):
    x = (np.random.default_rng(seed).standard_normal((n, d)) * 10).astype(np.float32)
    z = run("geometric-median", torch.from_numpy(x), 0).numpy()
    opt = gm_optimum(x)
    assert gm_objective(x, z) <= opt * (1 + 1e-6)


@pytest.mark.parametrize(
    "rows",
    [
        # 1-D: points -6, 0, 1, 2, 3; the mean (0) is a data point, the median is 1 (objective 11 vs 12 at 0)
        [[-6], [0], [1], [2], [3]],
        # 2-D: the mean (0, 0) is a data point but not the optimum
        [[0, 0], [3, 0], [3, 1], [3, -1], [-9, 0]],
    ],
)
def test_geometric_median_when_the_mean_is_a_data_point(rows):
    # DESIGN §3: the objective must be within 1e-6 relative of the optimum, wherever Weiszfeld starts
    x = np.array(rows, dtype=np.float32)
    z = run("geometric-median", torch.from_numpy(x), 0).numpy()
    assert gm_objective(x, z) <= gm_optimum(x) * (1 + 1e-6)


def test_geometric_median_ignores_non_finite_rows():
    g = T([[0, 0], [1, 1], [5, 5], [float("nan"), 0], [float("inf"), 1]])
    assert torch.allclose(run("geometric-median", g, 0), T([1, 1]), atol=1e-4)


def test_aggregate_dispatch_and_unknown_name():
    g = T(KRUM_G)
    for name in ALL_RULES:
        f = valid_f(name, g.shape[0])
        assert torch.equal(aggregate(name, g, f), AGGREGATORS[name](g, f))
    with pytest.raises(ValueError, match="unknown"):
        aggregate("nope", g, 0)


def test_registry_names():
    assert set(AGGREGATORS) == {
        "mean", "coord-median", "trimmed-mean", "geometric-median", "krum", "multi-krum", "bulyan", "sign-sgd",
    }


# --------------------------------------------------------------------------------------- requirement errors


@pytest.mark.parametrize(
    "name,n,f,bound",
    [
        ("trimmed-mean", 4, 2, "n > 2f"),
        ("trimmed-mean", 1, 1, "n > 2f"),
        ("krum", 4, 1, "n >= 2f + 3"),
        ("krum", 2, 0, "n >= 2f + 3"),
        ("multi-krum", 6, 2, "n >= 2f + 3"),
        ("bulyan", 6, 1, "n >= 4f + 3"),
        ("bulyan", 10, 2, "n >= 4f + 3"),
    ],
)
def test_requirement_errors(name, n, f, bound):
    g = torch.randn(n, 3)
    with pytest.raises(ValueError) as exc:
        run(name, g, f)
    msg = str(exc.value)
    assert name in msg
    assert f"n={n}" in msg
    assert f"f={f}" in msg
    assert bound in msg


@pytest.mark.parametrize("name,n,f", [("trimmed-mean", 5, 2), ("krum", 5, 1), ("multi-krum", 7, 2), ("bulyan", 7, 1)])
def test_requirement_boundary_is_accepted(name, n, f):
    out = run(name, torch.randn(n, 3), f)
    assert out.shape == (3,)


@pytest.mark.parametrize("name", ALL_RULES)
def test_bad_inputs(name):
    with pytest.raises(ValueError, match="2-D"):
        run(name, torch.randn(7), 0)
    with pytest.raises(ValueError, match="2-D"):
        run(name, torch.randn(7, 3, 1), 0)
    with pytest.raises(ValueError, match="float"):
        run(name, torch.ones(7, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="2-D"):
        run(name, np.ones((7, 3), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="f=-1"):
        run(name, torch.randn(7, 3), -1)
    with pytest.raises(ValueError):
        run(name, torch.randn(0, 3), 0)


# --------------------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL_RULES)
def test_output_shape_dtype_and_input_untouched(name, dtype):
    g = torch.randn(11, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = g.clone()
    out = run(name, g, valid_f(name, 11))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (5,)
    assert out.dtype == dtype
    assert torch.equal(g, before)
    # a fresh tensor: writing to it never touches the input
    out.fill_(12345.0)
    assert torch.equal(g, before)


@pytest.mark.parametrize("name", ALL_RULES)
def test_single_row(name):
    g = T([[1.5, -2.0, 0.0]])
    if name in ("krum", "multi-krum", "bulyan"):
        with pytest.raises(ValueError):
            run(name, g, 0)
        return
    out = run(name, g, 0)
    expected = T([1, -1, 0]) if name == "sign-sgd" else g[0]
    assert torch.allclose(out, expected)


# --------------------------------------------------------------------------------------- numpy cross-check

CASES = [(5, 1, 3), (7, 1, 60000), (8, 1, 9), (11, 2, 17), (12, 2, 100), (15, 3, 1000)]


def test_block_boundary_is_crossed():
    # n=7 sorts 2**18 // 7 = 37449 columns per block; bulyan's theta = 5 rows, 52428: d = 60000 crosses both
    assert _BLOCK_ELEMS // 7 < 60000 and _BLOCK_ELEMS // 5 < 60000


@pytest.mark.parametrize("n,f,d", CASES)
@pytest.mark.parametrize("name", ["mean", "coord-median", "trimmed-mean", "krum", "multi-krum", "bulyan", "sign-sgd"])
def test_matches_numpy_reference(name, n, f, d):
    if name == "bulyan" and n < 4 * f + 3:
        f = (n - 3) // 4
    x = np.random.default_rng(n * 1000 + d).standard_normal((n, d)).astype(np.float32)
    x[0, : min(d, 4)] = 0.0  # zeros give sign-sgd ties
    if n > 2:
        x[2, : min(d, 2)] = -x[1, : min(d, 2)]
    out = run(name, torch.from_numpy(x.copy()), f).numpy()
    np.testing.assert_allclose(out, ref_aggregate(name, x, f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,f,d", [(7, 1, 60000), (12, 2, 100)])
def test_multi_krum_explicit_m_matches_reference(n, f, d):
    x = np.random.default_rng(d).standard_normal((n, d)).astype(np.float32)
    for m in (1, 3, n):
        out = run("multi-krum", torch.from_numpy(x), f, m=m).numpy()
        np.testing.assert_allclose(out, ref_aggregate("multi-krum", x, f, m=m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,f,d", [(5, 1, 3), (7, 1, 60000), (12, 2, 100)])
def test_krum_scores_match_reference(n, f, d):
    x = np.random.default_rng(d).standard_normal((n, d)).astype(np.float32)
    np.testing.assert_allclose(krum_scores(torch.from_numpy(x), f).numpy(), ref_krum_scores(x, f), rtol=1e-5)


def test_krum_scores_accurate_for_rows_with_a_large_common_component():
    # rows = 100 + N(0, 1): the squared distances (~4000) are small next to the squared norms (~2e7).
    # DESIGN §3 defines the score from the Euclidean distances of the given float32 rows; those are
    # representable to float32 precision, so the scores must match the float64 reference to ~1e-5.
    x = (100.0 + np.random.default_rng(0).standard_normal((9, 2000))).astype(np.float32)
    np.testing.assert_allclose(krum_scores(torch.from_numpy(x), 2).numpy(), ref_krum_scores(x, 2), rtol=1e-4)


def test_krum_selects_the_defined_row_for_rows_with_a_large_common_component():
    # rows = 1000 + N(0, 1), n=9, f=2: the reference winner's score is clearly the lowest (margin checked below)
    x = (1000.0 + np.random.default_rng(0).standard_normal((9, 2000))).astype(np.float32)
    scores = ref_krum_scores(x, 2)
    best, second = np.sort(scores)[:2]
    assert second - best > 1e-3 * best  # no near-tie: float32 round-off cannot justify another winner
    out = run("krum", torch.from_numpy(x), 2).numpy()
    np.testing.assert_array_equal(out, x[int(np.argmin(scores))])


# --------------------------------------------------------------------------------------- properties

int_vals = st.integers(-1000, 1000).map(float)


@st.composite
def int_matrices(draw, min_n=1, max_n=12, max_d=6):
    # integer values: squared norms stay below 2**24, so every distance and sum is exact in float32
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    rows = draw(st.lists(st.lists(int_vals, min_size=d, max_size=d), min_size=n, max_size=n))
    perm = draw(st.permutations(range(n)))
    return np.array(rows, dtype=np.float32), np.array(perm)


def _score_gap(x: np.ndarray, f: int, k: int) -> bool:
    """Whether the k lowest Krum scores are strictly separated from the rest (selection has no tie)."""
    s = np.sort(ref_krum_scores(x, f))
    return k >= len(s) or s[k - 1] < s[k]


@PROPS
@given(data=int_matrices())
def test_permutation_invariance_order_free_rules(data):
    x, perm = data
    n = x.shape[0]
    for name in ("mean", "coord-median", "trimmed-mean", "sign-sgd"):
        f = valid_f(name, n)
        a = run(name, torch.from_numpy(x), f)
        b = run(name, torch.from_numpy(x[perm]), f)
        assert torch.equal(a, b), name


@PROPS
@given(data=int_matrices())
def test_permutation_invariance_geometric_median(data):
    x, perm = data
    a = run("geometric-median", torch.from_numpy(x), 0).numpy()
    b = run("geometric-median", torch.from_numpy(x[perm]), 0).numpy()
    oa, ob = gm_objective(x, a), gm_objective(x, b)
    assert abs(oa - ob) <= 1e-6 * max(oa, ob) + 1e-3


@PROPS
@given(data=int_matrices(min_n=3), rule=st.sampled_from(["krum", "multi-krum", "bulyan"]), fdraw=st.integers(0, 4))
def test_permutation_invariance_krum_family(data, rule, fdraw):
    x, perm = data
    n = x.shape[0]
    f = min(fdraw, valid_f(rule, n))
    assume(n >= (4 * f + 3 if rule == "bulyan" else 2 * f + 3))
    k = {"krum": 1, "multi-krum": n - f, "bulyan": n - 2 * f}[rule]
    assume(_score_gap(x, f, k))
    a = run(rule, torch.from_numpy(x), f)
    b = run(rule, torch.from_numpy(x[perm]), f)
    if rule == "multi-krum":
        # the same rows are averaged, summed in matrix order by one matrix-vector product: equal up to rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(a, b)


huge = st.sampled_from([1e30, -1e30, math.inf, -math.inf, math.nan])
any_val = st.one_of(st.floats(-100, 100, width=32), huge, st.floats(width=32))
honest_val = st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def honest_and_byzantine(draw, rule):
    """(matrix, f, honest rows) with b <= f Byzantine rows mixed in, respecting the rule's n bound."""
    d = draw(st.integers(1, 6))
    if rule == "bulyan":
        f = draw(st.integers(0, 2))
        n_total = draw(st.integers(4 * f + 3, 12))
    elif rule == "krum":
        f = draw(st.integers(0, 4))
        n_total = draw(st.integers(2 * f + 3, 12))
    elif rule == "trimmed-mean":
        f = draw(st.integers(0, 5))
        n_total = draw(st.integers(2 * f + 1, 12))
    else:  # coord-median: f only says how many Byzantine rows may come; honest rows must outnumber them
        f = draw(st.integers(0, 5))
        n_total = draw(st.integers(2 * f + 1, 12))
    b = draw(st.integers(0, f))
    honest = draw(st.lists(st.lists(honest_val, min_size=d, max_size=d), min_size=n_total - b, max_size=n_total - b))
    byz = []
    for _ in range(b):
        row = draw(st.lists(any_val, min_size=d, max_size=d))
        if rule == "krum":
            # Krum's guarantee is about distances: a Byzantine row inside the honest cloud but outside the
            # per-coordinate box can win. Far-away rows (one huge / non-finite coordinate) must never win.
            row[draw(st.integers(0, d - 1))] = draw(huge)
        byz.append(row)
    rows = honest + byz
    perm = draw(st.permutations(range(n_total)))
    x = np.array(rows, dtype=np.float32)[perm]
    return x, f, np.array(honest, dtype=np.float32)


@pytest.mark.parametrize("rule", ["coord-median", "trimmed-mean", "krum", "bulyan"])
def test_robust_rules_stay_in_honest_range(rule):
    @PROPS
    @given(data=honest_and_byzantine(rule))
    def check(data):
        x, f, honest = data
        with np.errstate(all="ignore"):
            out = run(rule, torch.from_numpy(x), f).numpy()
        lo, hi = honest.min(axis=0), honest.max(axis=0)
        tol = 1e-5 * np.maximum(1.0, np.abs(np.concatenate([lo, hi])).max())
        assert np.all(np.isfinite(out)), (x, f, out)
        assert np.all(out >= lo - tol) and np.all(out <= hi + tol), (x, f, out, lo, hi)

    check()


def test_krum_box_property_needs_far_byzantine_rows():
    # documents why the Krum property test uses far-away Byzantine rows: honest (0,0),(2,0),(4,0),(6,0) and one
    # Byzantine (3, 0.1); f=1, 2 nearest others: s = 13.01, 5.01, 5.01, 13.01 and 2.02 for the Byzantine row,
    # so Krum returns it, with y = 0.1 outside the honest range [0, 0]. Bulyan and the median stay inside.
    x = T([[0, 0], [2, 0], [4, 0], [6, 0], [3, 0.1]])
    assert torch.equal(run("krum", x, 1), x[4])
    assert run("coord-median", x, 1)[1] == 0
