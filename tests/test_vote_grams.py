"""Issue #15: DETOX-Multi-Krum's vote and its buckets' Gram matrices in one pass through the rows
(``kernels.vote_grams``, ``approaches._vote_with_grams``) give the step bit for bit what the vote and then the rule
give: honest groups, Byzantine members anywhere in a group, rows that agree on the columns the winners are guessed
from and differ later, groups with no majority (whose first row the vote overwrites), NaN payloads and -0.0, a
tolerance, both votes."""

from __future__ import annotations

import dataclasses
import zlib

import numba
import numpy as np
import pytest
import torch

from detox import aggregators, approaches
from detox import kernels as K
from detox.aggregators import mean_of_bucket_multi_krum
from detox.approaches import Plan, vote_rows

P, R, D = 45, 3, 20_000  # D: 20 column blocks of 1024, not a whole number of them; several spans per thread


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bucket's Gram matrix split across 2 threads, as at ResNet-18's d (here a few thousand columns)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads (the pass exists only where the Gram matrices are split)")
    monkeypatch.setattr(K, "_SERIAL_PAIRS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return a.view({4: np.int32, 8: np.int64}[a.itemsize])


def groups_matrix(rng: np.random.Generator) -> np.ndarray:
    """15 groups of 3 identical rows: a shared direction plus noise per group."""
    honest = (rng.standard_normal(D) + 0.3 * rng.standard_normal((P // R, D))).astype(np.float32)
    return np.repeat(honest, R, axis=0)


def test_vote_grams_equals_centred_gram_and_the_majority_check(split: None) -> None:
    rng = np.random.default_rng(0)
    x = groups_matrix(rng)
    x[1, -1] = np.nextafter(x[1, -1], np.float32(np.inf))  # group 0: member 1 differs in the last column only
    x[4, 0] += 1.0  # group 1: in the first
    x[6, 5:9] = x[7, 5:9] = np.float32(np.nan)  # group 2: NaN with different payloads
    bits(x[7])[5] = 0x7FC00001
    x[9, 77] = 0.0  # group 3: 0.0 against -0.0
    x[10, 77] = -0.0
    x[13, 3000] += 1e-4  # group 4: within the tolerance below
    x[16, :] = rng.standard_normal(D)  # group 5: member 1 attacks, but it is not honest (so never compared)
    honest = np.ones(P, dtype=bool)
    honest[16] = False
    perm = rng.permutation(P // R)
    buckets = [np.sort(perm[:7]) * R, np.sort(perm[7:11]) * R + 2, np.sort(perm[11:]) * R]
    refs = [int(b[len(b) // 2]) for b in buckets]
    x[16, :5000] = x[15, :5000]  # group 5, layers [0, 5000), [5000, 12000), [12000, D): member 1 agrees with 0 on
    x[17, 4999] = -x[17, 4999] - 1  # the first layer only, member 2 on all but the first (one value differs)
    starts = np.array([0, 5000, 12_000])
    for tol, view in ((0.0, x.view(np.int32)), (1e-3, x)):
        settled, grams, known, eqs = K.vote_grams(x, view, R, 2, tol, honest, buckets, refs, 2, starts)
        assert known.tolist() == [g == 5 for g in range(P // R)]  # the group with a non-honest among its first 2
        bounds = [(0, 5000), (5000, 12_000), (12_000, D)]
        for i in range(R):
            for j in range(R):
                a, b = view[15 + i], view[15 + j]
                same = [bool((a[s:e] == b[s:e]).all() if tol == 0 else (np.abs(a[s:e] - b[s:e]) <= tol).all())
                        for s, e in bounds]
                assert eqs[5, i, j].tolist() == same, (i, j)
        assert eqs[5, 0, 1].tolist() == [True, False, False] and eqs[5, 0, 2].tolist() == [False, True, True]
        assert K.vote_grams(x, view, R, 2, tol, honest, buckets, refs, 2)[2:] == (None, None)  # strict: no layers
        expect = np.ones(P // R, dtype=bool)
        expect[[0, 1, 2, 3, 5]] = False
        if tol > 0:
            expect[[0, 3]] = True  # within the tolerance; 0.0 == -0.0 as floats; NaN never equals NaN
        else:
            expect[4] = False
        np.testing.assert_array_equal(settled, expect)
        for gram, b, ref in zip(grams, buckets, refs, strict=True):
            assert np.array_equal(bits(gram), bits(K.centred_gram(x, x[ref], 2, b)))


def plan_for(vote: str, tol: float, buckets: int, seed: int) -> Plan:
    sizes = (5000, 7000, 8000) if vote == "boyer-moore" else None
    return Plan(approach="draco-lite", workers=P, group_size=R, byzantine=5, mode="mean", f=0, inner="multi-krum",
                inner_f=1, buckets=buckets, vote_tol=tol, seed=seed, vote=vote, layer_sizes=sizes)


def scenario(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = groups_matrix(rng)
    byz = np.zeros(P, dtype=bool)
    if name == "attack":  # Byzantine members 0, 1 and 2 of different groups; one sends the honest vector
        for row in (0, 4, 8, 12, 39):
            byz[row] = True
            if row != 39:
                x[row] = rng.standard_normal(D) * 3
        x[42] = x[43] = rng.standard_normal(D)  # two colluders of one group outvote its honest member
        byz[[42, 43]] = True
    elif name == "late":  # agree on the first 4096 columns (what the winners are guessed from), differ after
        for row in (3, 19, 27):
            byz[row] = True
            x[row, 5000:] += 1.0
    elif name == "no-majority":  # three different rows: the vote writes its result into the group's first row
        for g in (2, 9):
            byz[g * R + 1] = byz[g * R + 2] = True
            x[g * R + 1] += 0.5
            x[g * R + 2, ::2] -= 0.5
    elif name == "hostile":  # NaN payloads, -0.0 and inf where the rows are otherwise honest
        x[5, 10:20] = np.float32(np.nan)
        bits(x[5])[12] = 0x7FC00001
        x[22, 100:110] = -0.0
        x[30] = x[31] = x[30]
        x[30, 15000] = x[31, 15000] = np.float32(np.inf)
        byz[[5, 30, 31]] = True
    return x, byz


def two_stages(x: torch.Tensor, byz: np.ndarray, plan: Plan, step: int) -> tuple[torch.Tensor, object]:
    votes = vote_rows(x, plan.group_size, plan.vote_tol, plan.vote, plan.layer_sizes, ~byz)
    buckets = approaches._buckets(votes.rows, plan, step)
    agg = mean_of_bucket_multi_krum(x, buckets, plan.inner_f, plan.inner_params, plan.f, plan.mode_params)
    return agg, votes


@pytest.mark.parametrize("name", ["honest", "attack", "late", "no-majority", "hostile"])
@pytest.mark.parametrize("vote,tol", [("strict", 0.0), ("boyer-moore", 0.0), ("strict", 1e-3)])
def test_step_with_the_gram_pass_equals_the_two_stages(split: None, name: str, vote: str, tol: float) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{name} {vote} {tol}".encode()))  # the same data in every run
    x_np, byz = scenario(name, rng)
    for step, buckets in ((0, 2), (1, 3)):
        plan = plan_for(vote, tol, buckets, seed=step + 7)
        probe = torch.from_numpy(x_np.copy())
        votes, grams = approaches._vote_with_grams(probe, byz, plan, step)
        assert grams is not None and len(grams) == buckets  # the pass ran
        formed = sum(g is not None for g in grams)
        if name in ("honest", "attack"):
            assert formed == buckets  # every guess was right
        elif name == "late":
            assert formed < buckets  # a wrong guess: that bucket's matrix is formed afterwards
        fused_x, plain_x = torch.from_numpy(x_np.copy()), torch.from_numpy(x_np.copy())
        agg, diag = approaches.draco_lite(fused_x, byz, plan, step)
        expect, plain = two_stages(plain_x, byz, plan, step)
        assert np.array_equal(bits(agg), bits(expect))
        assert np.array_equal(bits(fused_x), bits(plain_x))  # the same rows written by the vote
        assert (diag["corrupted_groups"], diag["vote_fallbacks"]) == (plain.corrupted, plain.fallbacks)
        np.testing.assert_array_equal(votes.win_rows, plain.win_rows)


BULYAN_PARAMS = [{}, {"theta": "original", "selection": "original", "average": "original", "neighbours": "original"}]


@pytest.mark.parametrize("name", ["honest", "attack", "late", "no-majority", "hostile"])
@pytest.mark.parametrize("vote,tol", [("strict", 0.0), ("boyer-moore", 0.0), ("strict", 1e-3)])
@pytest.mark.parametrize("params", BULYAN_PARAMS, ids=["literature", "original"])
def test_detox_bulyan_step_with_the_gram_pass_equals_the_two_stages(split: None, name: str, vote: str, tol: float,
                                                                    params: dict) -> None:
    # DETOX-Bulyan (no buckets): one Gram matrix over the 15 winners, formed in the vote's pass where every guess
    # was right; the step equals the vote followed by bulyan over the winners, bit for bit (f = 2 as the original:
    # floor(q / ceil(r / 2)) with q = 5, r = 3)
    rng = np.random.default_rng(zlib.crc32(f"bulyan {name} {vote} {tol}".encode()))
    x_np, byz = scenario(name, rng)
    plan = dataclasses.replace(plan_for(vote, tol, 0, seed=3), mode="bulyan", f=2, inner="mean", inner_f=0,
                               buckets=None, mode_params=params)
    votes, grams = approaches._vote_with_grams(torch.from_numpy(x_np.copy()), byz, plan, 0)
    assert len(grams) == 1  # the pass ran
    if name in ("honest", "attack", "late"):  # every guess right; a wrong guess (the matrix formed afterwards)
        assert (grams[0] is not None) == (name != "late")
    fused_x, plain_x = torch.from_numpy(x_np.copy()), torch.from_numpy(x_np.copy())
    agg, diag = approaches.draco_lite(fused_x, byz, plan, 0)
    plain = vote_rows(plain_x, plan.group_size, plan.vote_tol, plan.vote, plan.layer_sizes, ~byz)
    expect = aggregators.bulyan(plain_x, plan.f, rows=plain.rows, **params)
    assert np.array_equal(bits(agg), bits(expect))
    assert np.array_equal(bits(fused_x), bits(plain_x))
    assert (diag["corrupted_groups"], diag["vote_fallbacks"]) == (plain.corrupted, plain.fallbacks)


def test_settled_groups_are_what_the_vote_finds() -> None:
    """``settled`` only saves reads: both votes give the same result with and without it."""
    rng = np.random.default_rng(5)
    x, byz = scenario("attack", rng)
    xb = x.view(np.int32)
    honest = ~byz
    first = honest.reshape(-1, R)[:, :2].all(axis=1) & (xb[0::R] == xb[1::R]).all(axis=1)
    assert first.sum() >= 10
    a = K.strict_vote(xb, R, 2, 0.0, honest)
    b = K.strict_vote(xb, R, 2, 0.0, honest, first)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    starts = np.array([0, 5000], dtype=np.int64)
    a = K.boyer_moore_vote(xb.copy(), R, 2, 0.0, starts, honest, True)
    b = K.boyer_moore_vote(xb.copy(), R, 2, 0.0, starts, honest, True, first)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
