"""Issue #15: the compiled vote against the reference loop, and the rules on row indices against the rules on a
copy of those rows (bit for bit), on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detox import approaches
from detox.aggregators import AGGREGATORS, aggregate
from detox.approaches import APPROACHES, Plan, _vote_reference, bucketize, majority, majority_vote, vote_rows

NAN_PAYLOADS = (0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001)  # quiet NaNs with payloads, negative, signalling


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 8: torch.int64}[t.element_size()])


def variants(rng: np.random.Generator, d: int, dtype: np.dtype) -> list[np.ndarray]:
    """A few vectors that are equal, near-equal, or differ in one coordinate (anywhere, so past the first
    compared block), by a NaN payload, or by the sign of a zero."""
    base = rng.standard_normal(d).astype(dtype)
    base[rng.integers(d)] = 0.0
    out = [base]
    for kind in rng.choice(["far", "near", "nan", "zero", "near"], size=4):
        v = base.copy()
        c = int(rng.integers(d))
        if kind == "far":
            v[c] += 1.0
        elif kind == "near":
            v[c] += dtype.type(1e-6) * (1 + abs(v[c]))
        elif kind == "nan":
            if dtype == np.float32:
                v.view(np.uint32)[c] = NAN_PAYLOADS[int(rng.integers(len(NAN_PAYLOADS)))]
            else:
                v[c] = np.nan
        else:
            v[c] = -0.0 if not np.signbit(v[c]) and v[c] == 0 else (0.0 if v[c] == 0 else -0.0)
        out.append(v)
        if rng.random() < 0.5:  # a variant of the variant: equality is not transitive under a tolerance
            w = v.copy()
            with np.errstate(invalid="ignore"):  # a signalling NaN stays NaN
                w[int(rng.integers(d))] += dtype.type(5e-7)
            out.append(w)
    return out


def random_groups(rng: np.random.Generator) -> tuple[torch.Tensor, int, np.ndarray, tuple[int, ...]]:
    r = int(rng.integers(1, 8))
    k = int(rng.integers(1, 6))
    d = int(rng.choice([1, 3, 17, 2048, 2049, 5000]))
    dtype = np.dtype(np.float32 if rng.random() < 0.8 else np.float64)
    g = np.empty((k * r, d), dtype=dtype)
    for grp in range(k):
        pool = variants(rng, d, dtype)
        # ties and duplicates: members draw from two or three of the pool's vectors, often the same one
        picks = rng.choice(len(pool), size=int(rng.integers(1, 4)), replace=False)
        for m in range(r):
            g[grp * r + m] = pool[int(rng.choice(picks))]
            if rng.random() < 0.3:  # a splice of two vectors: members that agree on some layers only
                cut = int(rng.integers(d))
                g[grp * r + m, cut:] = pool[int(rng.integers(len(pool)))][cut:]
    # everyone honest (as an engine without a Byzantine mask counts) or a random 70 %: both sides of the vote's
    # shortcut (the first majority of members honest and equal decides a group unread further)
    honest = rng.random(k * r) < (1.0 if rng.random() < 0.3 else 0.7)
    cuts = np.sort(rng.choice(np.arange(1, d), size=min(d - 1, int(rng.integers(0, 5))), replace=False))
    sizes = tuple(int(s) for s in np.diff(np.concatenate([[0], cuts, [d]])))
    return torch.from_numpy(g), r, honest, sizes


@pytest.mark.parametrize("pool", [False, True], ids=["serial", "pool"])
@pytest.mark.parametrize("vote", ["strict", "boyer-moore"])
@pytest.mark.parametrize("tol", [0.0, 1e-6, 1e-3])
def test_compiled_vote_equals_the_reference_loop(vote, tol, pool, monkeypatch):
    # small votes run the serial twin; pool=True forces every vote onto numba's thread pool instead
    import detox.kernels as K

    monkeypatch.setattr(K, "_SERIAL_VOTE", 0 if pool else 1 << 62)
    rng = np.random.default_rng([len(vote), int(tol * 1e6)])
    decided = set()
    for _ in range(150):
        g, r, honest, sizes = random_groups(rng)
        layers = sizes if vote == "boyer-moore" and rng.random() < 0.7 else None
        got_g, want_g = g.clone(), g.clone()
        got = vote_rows(got_g, r, tol, vote, layers, honest)
        want = _vote_reference(want_g, r, tol, vote, layers, honest)
        assert np.array_equal(got.rows, want.rows) and np.array_equal(got.win_rows, want.win_rows)
        assert (got.fallbacks, got.corrupted) == (want.fallbacks, want.corrupted)
        # the fallback medians and assembled vectors written into the groups' first rows, bit for bit
        assert torch.equal(bits(got_g), bits(want_g))
        decided.update({"fallback" if want.fallbacks else "majority", "corrupted" if want.corrupted else "clean"})
        decided.add("assembled" if (want.win_rows < 0).any() and vote == "boyer-moore" else "sent")
    # the random groups reach every outcome
    outcomes = {"fallback", "majority", "corrupted", "clean"} | ({"assembled"} if vote == "boyer-moore" else set())
    assert outcomes <= decided


@pytest.mark.parametrize("vote", ["strict", "boyer-moore"])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_torch_path_vote_equals_the_reference_loop(vote, tol):
    # what the kernels do not take (a GPU's tensors; here non-contiguous rows) checks every group's unanimity
    # at once (approaches._unanimous) before the loop: the same votes, and the same rows written
    rng = np.random.default_rng([7, len(vote), int(tol * 1e6)])
    for _ in range(100):
        g, r, honest, sizes = random_groups(rng)
        layers = sizes if vote == "boyer-moore" else None
        k = g.shape[0] // r
        want_same = [all(approaches._same(g[i * r], g[i * r + j], tol) for j in range(1, r)) for i in range(k)]
        got_g, want_g = torch.zeros(2 * g.shape[0], g.shape[1], dtype=g.dtype)[::2], g.clone()
        got_g.copy_(g)
        assert got_g.is_contiguous() == (g.shape[0] == 1)
        assert approaches._unanimous(got_g, r, tol).tolist() == want_same
        got = vote_rows(got_g, r, tol, vote, layers, honest)
        want = _vote_reference(want_g, r, tol, vote, layers, honest)
        assert np.array_equal(got.rows, want.rows) and np.array_equal(got.win_rows, want.win_rows)
        assert (got.fallbacks, got.corrupted) == (want.fallbacks, want.corrupted)
        assert torch.equal(bits(got_g), bits(want_g))


def test_fallback_rows_of_the_torch_path_equal_the_kernels():
    # a strict group without a majority gets its members' median: float64 (the torch path, as on a GPU) and
    # float32 (the kernel) write the same values, a NaN chosen as the median included (+inf in both)
    rng = np.random.default_rng(12)
    fallbacks = 0
    for _ in range(120):
        g, r, honest, _ = random_groups(rng)
        if g.dtype != torch.float32:
            continue
        g32, g64 = g.clone(), g.double()
        fallbacks += vote_rows(g32, r, 0.0, "strict", None, honest).fallbacks
        vote_rows(g64, r, 0.0, "strict", None, honest)
        torch.testing.assert_close(g64.float(), g32, rtol=1e-6, atol=0.0, equal_nan=True)
    assert fallbacks > 10


def test_compiled_vote_bit_semantics():
    # NaN payloads: the same payload matches, another does not; -0.0 differs from 0.0 unless a tolerance is set
    x = np.zeros((3, 4), dtype=np.float32)
    x.view(np.uint32)[:, 1] = [0x7FC00001, 0x7FC00001, 0x7FC00002]
    g = torch.from_numpy(x)
    assert vote_rows(g.clone(), 3).win_rows.tolist() == [0]
    x[1].view(np.uint32)[1] = 0x7FC00002
    assert vote_rows(torch.from_numpy(x.copy()), 3).win_rows.tolist() == [1]
    z = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [2.0, 1.0]])
    assert vote_rows(z.clone(), 3).win_rows.tolist() == [-1]
    assert vote_rows(z.clone(), 3, tol=1e-9).win_rows.tolist() == [0]
    # a tolerance compares in the rows' dtype, as torch does: float32(1.05) - 1 = 0.04999995 <= float32(0.05)
    t = torch.tensor([[1.0], [1.05], [9.0]])
    assert vote_rows(t.clone(), 3, tol=0.05).win_rows.tolist() == [0]
    assert _vote_reference(t.clone(), 3, tol=0.05).win_rows.tolist() == [0]


# ------------------------------------------------------------------------------- rules on row indices


def valid_f(rule: str, n: int) -> int:
    return {"krum": (n - 3) // 2, "multi-krum": (n - 3) // 2, "bulyan": (n - 3) // 4}.get(rule, (n - 1) // 2)


PARAMS = {"bulyan": [{}, {"theta": "original", "selection": "original", "average": "original"}],
          "multi-krum": [{}, {"m": "original"}]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", list(AGGREGATORS))
def test_rule_on_row_indices_equals_the_rule_on_a_copy(rule, dtype):
    rng = np.random.default_rng(len(rule))
    for trial in range(6):
        n_all = int(rng.integers(8, 40))
        d = int(rng.choice([5, 300, 5000]))
        g = torch.from_numpy(rng.standard_normal((n_all, d)) + 3.0).to(dtype)
        m = int(rng.integers(7, n_all + 1))
        rows = np.sort(rng.choice(n_all, size=m, replace=False))
        if trial % 3 == 1:
            rows = rng.permutation(rows)  # any order: the rule sees the rows in that order, as on a copy
        if trial % 3 == 2 and rule != "mean":
            g[int(rows[0]), int(rng.integers(d))] = float("nan")  # a hostile row among the selected ones
        f = min(valid_f(rule, m), 2)
        for params in PARAMS.get(rule, [{}]):
            want = aggregate(rule, g[torch.from_numpy(rows)].clone(), f, params)
            got = aggregate(rule, g, f, params, rows=rows)
            assert torch.equal(bits(got), bits(want)), (rule, trial, params)


def test_rows_are_validated():
    g = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="mean: rows must index the 5 rows of grads, got 0..5"):
        aggregate("mean", g, 0, rows=np.array([0, 5]))
    with pytest.raises(ValueError, match="rows must be a 1-D array of row indices"):
        aggregate("krum", g, 0, rows=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="krum needs n >= 2f \\+ 3; got n=2, f=0"):
        aggregate("krum", g, 0, rows=[0, 1])


# ------------------------------------------------------------------------------- the step: indices vs copies


def copy_path(g: torch.Tensor, byz: np.ndarray, plan: Plan, step: int) -> torch.Tensor:
    """DETOX as it ran before issue #15: winners copied out of the matrix, buckets copied, the rule on copies."""
    winners, _ = majority_vote(g, plan.group_size, plan.vote_tol, plan.vote, plan.layer_sizes)
    return aggregate(plan.mode, bucketize(winners, plan, step), plan.f, plan.mode_params)


@pytest.mark.parametrize("vote", ["strict", "boyer-moore"])
@pytest.mark.parametrize("mode,buckets,inner,inner_params", [
    ("mean", 2, "multi-krum", {"m": "original"}), ("multi-krum", None, "mean", {}), ("bulyan", None, "mean", {}),
    ("coord-median", 5, "mean", {}), ("mean", 3, "coord-median", {}), ("geometric-median", None, "mean", {}),
    ("trimmed-mean", 4, "trimmed-mean", {}), ("krum", None, "mean", {}), ("sign-sgd", 3, "mean", {}),
])
@pytest.mark.parametrize("in_place", [True, False], ids=["losing-rows", "stacked"])
def test_detox_step_on_indices_equals_the_copy_path(vote, mode, buckets, inner, inner_params, in_place, monkeypatch):
    # bucket outputs into the vote's losing rows (as for large rows), or a fresh stack (small rows)
    monkeypatch.setattr(approaches, "_INPLACE_BYTES", 0 if in_place else 1 << 62)
    rng = np.random.default_rng(7)
    p, r, q, d = 45, 3, 5, 3000
    honest = torch.from_numpy(rng.standard_normal((p // r, d)).astype(np.float32))
    for step in range(3):
        g = honest.repeat_interleave(r, dim=0)
        byz = np.zeros(p, dtype=bool)
        byz[rng.choice(p, q, replace=False)] = True
        for i in np.flatnonzero(byz):  # colluding pairs in a group; a lone Byzantine differs on one layer
            g[i] = -100.0 * honest[i // r] + (i // r) if rng.random() < 0.7 else g[i]
            g[i, int(rng.integers(d))] += 1.0
        f = min(2, valid_f(mode, buckets or p // r))
        inner_f = {"mean": 0, "multi-krum": 2}.get(inner, 1)
        plan = Plan(approach="draco-lite", workers=p, group_size=r, byzantine=q, mode=mode, f=f, buckets=buckets,
                    inner=inner, inner_f=inner_f, inner_params=inner_params, vote=vote, seed=3,
                    layer_sizes=(1000, 1500, 500) if vote == "boyer-moore" else None)
        want = copy_path(g.clone(), byz, plan, step)
        got, diag = APPROACHES["draco-lite"](g.clone(), byz, plan, step)
        assert torch.equal(bits(got), bits(want)), (mode, step)
        out_d = torch.empty(d)  # the PS's persistent aggregate buffer
        got_out, _ = APPROACHES["draco-lite"](g.clone(), byz, plan, step, out=out_d)
        assert got_out.data_ptr() == out_d.data_ptr() and torch.equal(bits(got_out), bits(want)), (mode, step)
        assert diag["vote_fallbacks"] >= 0 and 0 <= diag["corrupted_groups"] <= p // r
    assert majority(r) == 2
