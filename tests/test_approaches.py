"""Tests of the approaches (DESIGN §3) in ``detox.approaches``: majority vote, plans, end-to-end aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from detox.aggregators import aggregate
from detox.approaches import (
    APPROACHES,
    VOTES,
    Plan,
    bucketize,
    decisive,
    majority,
    majority_vote,
    plan_from_cfg,
    vote_group,
)
from detox.attacks import TAG_BUCKETS, rng_for

NAN = float("nan")


def rows(*vs) -> torch.Tensor:
    return torch.tensor(vs, dtype=torch.float32)


A, B, C = [1.0, 2.0], [3.0, -1.0], [0.5, 7.0]


# --------------------------------------------------------------------------------------- vote


@pytest.mark.parametrize("r,need", [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_majority_size(r, need):
    assert majority(r) == need


def test_vote_r1():
    assert vote_group(rows(A)) == 0
    assert vote_group(rows([NAN, NAN])) == 0
    assert vote_group(rows(A), tol=0.1) == 0


@pytest.mark.parametrize(
    "members,expected",
    [
        ([A, A, A], 0),
        ([A, A, B], 0),
        ([A, B, A], 0),
        ([B, A, A], 1),  # lowest index of the majority class
        ([A, B, C], -1),
    ],
)
def test_vote_r3(members, expected):
    assert vote_group(rows(*members)) == expected


@pytest.mark.parametrize(
    "members,expected",
    [
        ([A, B, A, C, A], 0),
        ([B, A, C, A, A], 1),
        ([B, C, A, A, A], 2),
        ([B, B, A, A, A], 2),
        ([A, A, B, B, C], -1),  # 2 of 5 is no strict majority
        ([A, B, A, B, C], -1),
        ([A, B, C, B, A], -1),
        ([C, B, B, C, B], 1),
    ],
)
def test_vote_r5(members, expected):
    assert vote_group(rows(*members)) == expected


def test_vote_r2_needs_both():
    assert vote_group(rows(A, A)) == 0
    assert vote_group(rows(A, B)) == -1


def test_vote_bit_exact_vs_tolerance():
    a = torch.tensor([1.0, 2.0])
    a_eps = a + torch.tensor([1e-6, 0.0])
    assert not torch.equal(a, a_eps)
    g = torch.stack([a, a_eps, torch.tensor(B)])
    assert vote_group(g) == -1  # bit-exact: three different vectors
    assert vote_group(g, tol=1e-5) == 0  # tolerance: a and a_eps agree
    assert vote_group(g, tol=1e-7) == -1  # tolerance smaller than the difference
    # tolerance is a max-abs difference per coordinate
    g2 = torch.stack([torch.tensor(B), a, a + 0.05])
    assert vote_group(g2, tol=0.05) == 1
    assert vote_group(g2, tol=0.04) == -1


def test_vote_bit_exact_distinguishes_signed_zero():
    assert vote_group(rows([0.0], [-0.0], [1.0])) == -1
    assert vote_group(rows([0.0], [-0.0], [1.0]), tol=1e-9) == 0


def test_vote_identical_nan_rows_form_a_majority_bit_exact_only():
    nan_row = [NAN, 1.0]
    g = rows(B, nan_row, nan_row)
    assert vote_group(g) == 1
    assert vote_group(g, tol=1e-3) == -1
    assert vote_group(rows(nan_row, nan_row, nan_row), tol=1.0) == -1
    assert vote_group(rows([NAN, NAN], [NAN, NAN], A, [NAN, NAN], B)) == 0


def test_majority_vote_winners_and_fallback():
    # P=9, r=3: group 0 majority at rows 1,2 ; group 1 no majority ; group 2 unanimous
    g = rows(B, A, A, [0.0, 5.0], [4.0, 1.0], [2.0, 3.0], C, C, C)
    winners, win_rows = majority_vote(g, 3)
    assert win_rows.tolist() == [1, -1, 6]
    assert winners.shape == (3, 2)
    assert torch.equal(winners[0], torch.tensor(A))
    # fallback: coordinate median of the members: col 0 (0,4,2) -> 2 ; col 1 (5,1,3) -> 3
    assert torch.equal(winners[1], torch.tensor([2.0, 3.0]))
    assert torch.equal(winners[2], torch.tensor(C))


def test_majority_vote_fallback_even_r_is_median_mean():
    # r=4, no value held by 3 members: median of 4 = mean of the two middle values
    g = rows([0.0], [0.0], [4.0], [10.0])
    winners, win_rows = majority_vote(g, 4)
    assert win_rows.tolist() == [-1]
    assert winners.tolist() == [[2.0]]


def test_majority_vote_r1_is_identity():
    g = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    winners, win_rows = majority_vote(g, 1)
    assert torch.equal(winners, g)
    assert win_rows.tolist() == list(range(6))


def test_majority_vote_r5_and_tolerance():
    a = torch.tensor(A)
    g = torch.stack([torch.tensor(B), a, a + 1e-6, a - 1e-6, torch.tensor(C)])
    _, exact_rows = majority_vote(g, 5)
    assert exact_rows.tolist() == [-1]
    winners, tol_rows = majority_vote(g, 5, tol=1e-5)
    assert tol_rows.tolist() == [1]
    assert torch.equal(winners[0], a)


# --------------------------------------------------------------------------------------- Boyer-Moore vote


def bm(*members, layer_sizes=None, tol=0.0):
    winners, win_rows = majority_vote(rows(*members), len(members), tol, vote="boyer-moore", layer_sizes=layer_sizes)
    return winners[0].tolist(), int(win_rows[0])


def test_boyer_moore_keeps_the_surviving_candidate_unchecked():
    # issue #11: [a, b, c] -> c ; r = 4 [a, a, b, b] -> a ; the candidate after the last member, majority or not
    assert bm(A, B, C) == (C, 2)
    assert bm(A, A, B, B) == (A, 0)
    assert bm(B, B, A, A) == (B, 0)
    assert bm(A, B, A, B, C) == (C, 4)  # a 1, b 0, a 1, b 0, c 1
    assert bm(A, B, B, A, A) == (A, 4)  # a 1, b 0, b is the candidate (1), a 0, a is the candidate: member 4
    # with a strict majority Boyer-Moore finds it, as the strict vote does
    # (the row reported is the surviving candidate: b 1, a 0, a -> member 2)
    assert bm(B, A, A) == (A, 2)
    assert bm(A, B, A) == (A, 2)
    assert bm(A, A, B) == (A, 0)
    assert bm(C, B, B, C, B) == (B, 4)
    assert vote_group(rows(A, B, C)) == -1 and vote_group(rows(A, A, B, B)) == -1


def test_boyer_moore_per_layer_can_build_a_vector_no_member_sent():
    # layers of sizes 1, 1, 1; strict majorities per layer: {0,1,2} send 1 on layer 0, {2,3,4} send 20 on layer 1,
    # {0,1,3} send 300 on layer 2 -> [1, 20, 300], which no member sent
    g = [[1, 10, 300], [1, 11, 300], [1, 20, 301], [2, 20, 300], [3, 20, 302]]
    winner, win_row = bm(*g, layer_sizes=(1, 1, 1))
    assert winner == [1, 20, 300] and win_row == -1
    assert all(row != winner for row in g)
    # without layer sizes the whole vector is one layer: 0 1, 1 0, 2 1, 3 0, 4 1 -> member 4
    assert bm(*g) == (g[4], 4)
    # the strict vote sees five different vectors and falls back to the median of the members
    assert majority_vote(rows(*g), 5)[1].tolist() == [-1]


def test_boyer_moore_layers_of_several_coordinates_and_tolerance():
    a, b = [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]
    # layers [0:2] and [2:3]: members agree on the first, member 0 is outvoted on the second
    assert bm(a, b, b, layer_sizes=(2, 1)) == (b, 1)
    assert bm(a, a, b, layer_sizes=(2, 1)) == (a, 0)
    # a tolerance makes near-equal layers equal, as in the strict vote
    near = rows([1.0, 2.0, 3.0 + 1e-6])[0].tolist()  # the float32 value
    assert bm(a, b, near, layer_sizes=(2, 1)) == (near, 2)
    assert bm(a, b, near, layer_sizes=(2, 1), tol=1e-5) == (a, 0)


@pytest.mark.parametrize("sizes", [(2, 2), (0, 3), (4, -1), (1,)])
def test_boyer_moore_refuses_layer_sizes_that_do_not_cover_the_vector(sizes):
    with pytest.raises(ValueError, match="layer_sizes must be positive and sum to the gradient length d=3"):
        majority_vote(rows([1, 2, 3], [1, 2, 3]), 2, vote="boyer-moore", layer_sizes=sizes)


def test_unknown_vote_is_refused():
    with pytest.raises(ValueError, match="approach.vote='plurality'"):
        majority_vote(rows(A, A, B), 3, vote="plurality")
    assert VOTES == ("strict", "boyer-moore")


@pytest.mark.parametrize("seed", range(5))
def test_boyer_moore_equals_strict_vote_when_every_group_has_a_majority(seed):
    # P = 15, r = 5: colluding Byzantines (at most 2 per group) never reach a majority
    rng = np.random.default_rng(seed)
    honest = torch.from_numpy(rng.standard_normal((3, 40)).astype(np.float32))
    g = honest.repeat_interleave(5, dim=0)
    for grp in range(3):
        bad = rng.choice(5, size=rng.integers(0, 3), replace=False)
        g[grp * 5 + bad] = -100.0 * honest[grp]
    sizes = (10, 25, 5)
    strict_w, strict_rows = majority_vote(g.clone(), 5)
    bm_w, bm_rows = majority_vote(g.clone(), 5, vote="boyer-moore", layer_sizes=sizes)
    assert torch.equal(strict_w, bm_w)
    assert (strict_rows >= 0).all() and (bm_rows >= 0).all()
    assert torch.equal(strict_w, honest)


def test_boyer_moore_diagnostics_and_in_place_compaction():
    # P = 9, r = 3, layers (1, 1):
    # group 0 rows 0-2: honest h, two non-colluding Byzantines x, y -> Boyer-Moore keeps y (no majority):
    #   a vote fallback (no strict majority) and corrupted (y lacks honest support)
    # group 1 rows 3-5: honest h1, h1 and Byzantine z -> h1, clean
    # group 2 rows 6-8: Byzantines agree with honest on layer 0 only: [5, 9], [5, -9], honest [5, 1]:
    #   layer 0: 5 (all three); layer 1: 9 1, -9 0, 1 -> candidate member 8 (1), no strict majority
    h, x, y, h1, z = [1.0, 1.0], [7.0, 7.0], [8.0, 8.0], [2.0, 3.0], [0.0, 0.0]
    g = rows(h, x, y, h1, h1, z, [5.0, 9.0], [5.0, -9.0], [5.0, 1.0])
    byz = np.zeros(9, dtype=bool)
    byz[[1, 2, 5, 6, 7]] = True
    p = plan("maj_vote", workers=9, r=3, q=5, vote="boyer-moore", layer_sizes=(1, 1))
    agg, diag = APPROACHES["maj_vote"](g.clone(), byz, p, 0)
    expected = rows(y, h1, [5.0, 1.0])
    torch.testing.assert_close(agg, expected.mean(dim=0))
    assert diag["vote_fallbacks"] == 2  # groups 0 and 2 lack a strict majority on some layer
    # corrupted: the kept values lack the support of a strict majority of honest members on some layer. Group 0
    # keeps y; group 2 keeps the honest member's 1 on layer 1, but only because the Byzantines split: they decided
    assert diag["corrupted_groups"] == 2
    strict = plan("maj_vote", workers=9, r=3, q=5)
    agg_s, diag_s = APPROACHES["maj_vote"](g.clone(), byz, strict, 0)
    assert diag_s["vote_fallbacks"] == 2 and diag_s["corrupted_groups"] == 0
    # draco-lite copies no winner: the rule reads rows 2 (y), 3 (h1) and 8 (the honest member, whose values are
    # kept on both layers) where they are, and the buffer is left as it was
    buf = g.clone()
    agg_d, _ = APPROACHES["draco-lite"](buf, byz, p, 0)
    torch.testing.assert_close(buf[[2, 3, 8]], expected)
    assert torch.equal(buf, g)
    torch.testing.assert_close(agg_d, expected.mean(dim=0))


@pytest.mark.parametrize("r,strict_need,bm_need", [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 3, 2), (5, 3, 3), (6, 4, 3)])
def test_decisive_members(r, strict_need, bm_need):
    # the original derives f with ceil(r / 2), the strict vote needs a strict majority ceil((r + 1) / 2)
    assert decisive(r, "strict") == strict_need == majority(r)
    assert decisive(r, "boyer-moore") == bm_need


# --------------------------------------------------------------------------------------- plans


def make_cfg(
    approach: str = "draco-lite", mode: str = "krum", workers: int = 45, q: int = 5, r: int = 3, seed: int = 0,
    mode_extra: dict | None = None, **approach_keys,
):
    a = {"name": approach}
    if approach != "baseline":
        a["vote_tol"] = 0.0
    if approach == "draco-lite":
        a.update({"buckets": None, "inner": "mean", "inner_f": None, "inner_params": {}})
    a.update(approach_keys)
    m = {"name": mode, "f": None, **(mode_extra or {})}
    return OmegaConf.create(
        {"workers": workers, "worker_fail": q, "group_size": r, "seed": seed, "mode": m, "approach": a}
    )


def test_plan_baseline_f_is_q():
    plan = plan_from_cfg(make_cfg("baseline", "krum", q=5))
    assert plan.approach == "baseline"
    assert plan.mode == "krum"
    assert plan.f == 5
    assert plan.byzantine == 5 and plan.workers == 45
    assert plan.units == 45 and plan.rule_inputs == 45 and not plan.grouped


def test_plan_mode_params_exclude_name_and_f():
    plan = plan_from_cfg(make_cfg("baseline", "multi-krum", q=3, mode_extra={"m": 10}))
    assert plan.mode_params == {"m": 10}
    gm = plan_from_cfg(make_cfg("draco-lite", "geometric-median", mode_extra={"tol": 1e-6, "max_iter": 50}))
    assert gm.mode_params == {"tol": 1e-6, "max_iter": 50}


@pytest.mark.parametrize(
    "workers,q,r,buckets,expected_f",
    [
        (45, 5, 3, None, 2),  # floor(5 / 2) = 2 ; 15 groups
        (45, 13, 3, 5, 5),  # floor(13 / 2) = 6, capped by 5 buckets
        (45, 5, 3, 5, 2),
        (45, 7, 5, None, 2),  # ceil(6/2) = 3 -> floor(7 / 3) = 2
        (45, 0, 3, None, 0),
        (15, 12, 3, None, 5),  # floor(12 / 2) = 6, capped by 5 groups
        (16, 8, 4, 3, 2),  # ceil(5/2) = 3 -> floor(8 / 3) = 2
        (10, 4, 1, None, 4),  # r = 1: each Byzantine corrupts its own group
    ],
)
def test_plan_draco_lite_f(workers, q, r, buckets, expected_f):
    plan = plan_from_cfg(make_cfg("draco-lite", "krum", workers=workers, q=q, r=r, buckets=buckets))
    assert plan.f == expected_f
    assert plan.inner == "mean"
    assert plan.inner_f == q // -(-(r + 1) // 2)  # default: worst-case corrupted groups, uncapped
    assert plan.units == workers // r
    assert plan.rule_inputs == (buckets if buckets else workers // r)
    assert plan.buckets == buckets


@pytest.mark.parametrize("approach", ["baseline", "draco-lite"])
def test_plan_explicit_f_overrides(approach):
    cfg = make_cfg(approach, "trimmed-mean", q=13)
    cfg.mode.f = 1
    assert plan_from_cfg(cfg).f == 1
    cfg.mode.f = 0
    assert plan_from_cfg(cfg).f == 0


@pytest.mark.parametrize("r,q,strict_f,bm_f", [(4, 5, 1, 2), (4, 6, 2, 3), (3, 5, 2, 2), (2, 3, 1, 3)])
def test_plan_boyer_moore_derives_f_with_ceil_r_over_2(r, q, strict_f, bm_f):
    # the original: effective_s = floor(q / ceil(r / 2)); the strict vote: floor(q / ceil((r + 1) / 2))
    strict = plan_from_cfg(make_cfg("draco-lite", "coord-median", workers=12, q=q, r=r))
    boyer = plan_from_cfg(make_cfg("draco-lite", "coord-median", workers=12, q=q, r=r, vote="boyer-moore"))
    assert (strict.vote, boyer.vote) == ("strict", "boyer-moore")
    assert (strict.f, strict.inner_f) == (strict_f, strict_f)
    assert (boyer.f, boyer.inner_f) == (min(bm_f, 12 // r), bm_f)
    assert boyer.layer_sizes is None  # the trainer fills in the model's parameter sizes
    with pytest.raises(ValueError, match="approach.vote='majority'"):
        plan_from_cfg(make_cfg("draco-lite", "coord-median", workers=12, q=q, r=r, vote="majority"))


def test_plan_maj_vote_uses_mean():
    plan = plan_from_cfg(make_cfg("maj_vote", "bulyan", q=5, mode_extra={"m": 3}))
    assert plan.mode == "mean"
    assert plan.mode_params == {}
    assert plan.f == 0
    assert plan.grouped and plan.units == 15


def test_plan_draco_lite_options():
    cfg = make_cfg(
        "draco-lite", "coord-median", q=5, seed=7, buckets=4, inner="trimmed-mean", inner_f=1, vote_tol=1e-4,
        inner_params={},
    )
    plan = plan_from_cfg(cfg)
    assert plan.inner == "trimmed-mean" and plan.inner_f == 1
    assert plan.vote_tol == pytest.approx(1e-4)
    assert plan.seed == 7
    assert plan.buckets == 4


def test_plan_baseline_without_approach_keys():
    # the baseline approach config holds only its name
    cfg = OmegaConf.create(
        {"workers": 8, "worker_fail": 2, "group_size": 1, "seed": 0, "mode": {"name": "mean", "f": None},
         "approach": {"name": "baseline"}}
    )
    plan = plan_from_cfg(cfg)
    assert plan.f == 2 and plan.buckets is None and plan.vote_tol == 0.0 and plan.inner == "mean"


# --------------------------------------------------------------------------------------- end to end


def grouped_matrix():
    """P=12, r=3, d=3 with a known Byzantine mask.

    group 0 rows 0-2: honest, unanimous h0                         -> winner row 0 (honest)
    group 1 rows 3-5: Byzantine rows 3, 4 send b, row 5 honest     -> winner row 3 (Byzantine)
    group 2 rows 6-8: rows 6 honest h2, 7 Byzantine x, 8 honest y  -> no majority: median of the three
    group 3 rows 9-11: row 9 Byzantine z, rows 10, 11 honest h3    -> winner row 10 (honest)
    """
    h0, h1, h2, h3 = [1.0, 2.0, 3.0], [0.0, -1.0, 4.0], [2.0, 2.0, 2.0], [-3.0, 1.0, 0.5]
    b, x, y, z = [100.0, 100.0, -100.0], [-50.0, 9.0, 9.0], [3.0, 0.0, 1.0], [7.0, 7.0, 7.0]
    g = rows(h0, h0, h0, b, b, h1, h2, x, y, z, h3, h3)
    byz = np.zeros(12, dtype=bool)
    byz[[3, 4, 7, 9]] = True
    median2 = [2.0, 2.0, 2.0]  # col 0 (2,-50,3) -> 2 ; col 1 (2,9,0) -> 2 ; col 2 (2,9,1) -> 2
    winners = rows(h0, b, median2, h3)
    return g, byz, winners


def plan(approach, mode="mean", f=0, buckets=None, inner="mean", inner_f=0, seed=0, workers=12, r=3, q=4,
         mode_params=None, vote="strict", layer_sizes=None):
    return Plan(
        approach=approach, workers=workers, group_size=r, byzantine=q, mode=mode, f=f,
        mode_params=mode_params or {}, inner=inner, inner_f=inner_f, buckets=buckets, seed=seed, vote=vote,
        layer_sizes=layer_sizes,
    )


def test_baseline_mean_is_row_mean():
    g, byz, _ = grouped_matrix()
    agg, diag = APPROACHES["baseline"](g, byz, plan("baseline", "mean", f=4), 0)
    torch.testing.assert_close(agg, g.mean(dim=0))
    assert diag["corrupted_groups"] == 4
    assert diag["vote_fallbacks"] == 0


def test_baseline_applies_mode_with_plan_f():
    g, byz, _ = grouped_matrix()
    agg, _ = APPROACHES["baseline"](g, byz, plan("baseline", "trimmed-mean", f=4), 0)
    torch.testing.assert_close(agg, aggregate("trimmed-mean", g, 4))


def test_maj_vote_is_mean_of_group_winners():
    g, byz, winners = grouped_matrix()
    agg, diag = APPROACHES["maj_vote"](g, byz, plan("maj_vote"), 0)
    torch.testing.assert_close(agg, winners.mean(dim=0))
    assert diag["corrupted_groups"] == 1  # group 1 only
    assert diag["vote_fallbacks"] == 1  # group 2 only


def test_draco_lite_without_buckets_applies_mode_to_winners():
    g, byz, winners = grouped_matrix()
    agg, diag = APPROACHES["draco-lite"](g, byz, plan("draco-lite", "coord-median", f=1), 0)
    # coordinate median of the 4 winners h0, b, (2,2,2), h3: col 0 (1,100,2,-3) -> 1.5 ; col 1 (2,100,2,1) -> 2 ;
    # col 2 (3,-100,2,0.5) -> 1.25
    torch.testing.assert_close(agg, torch.tensor([1.5, 2.0, 1.25]))
    torch.testing.assert_close(agg, aggregate("coord-median", winners, 1))
    assert diag["corrupted_groups"] == 1
    assert diag["vote_fallbacks"] == 1


def expected_buckets(winners: torch.Tensor, buckets: int, seed: int, step: int) -> list[np.ndarray]:
    perm = rng_for(seed, TAG_BUCKETS, step).permutation(winners.shape[0])
    return [np.sort(c) for c in np.array_split(perm, buckets)]


@pytest.mark.parametrize("seed,step", [(0, 0), (3, 7), (11, 2)])
@pytest.mark.parametrize("mode,f", [("mean", 0), ("coord-median", 1), ("trimmed-mean", 1)])
def test_draco_lite_with_buckets(seed, step, mode, f):
    # P=18, r=3 -> 6 groups; 4 buckets -> sizes 2, 2, 1, 1
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(6, 5, generator=gen)
    g = honest.repeat_interleave(3, dim=0)
    byz = np.zeros(18, dtype=bool)
    g[[3, 4]] = 50.0  # group 1: Byzantine majority
    byz[[3, 4]] = True
    g[13] = -7.0  # group 4: one Byzantine, outvoted
    byz[13] = True
    g[15], g[16] = honest[5] + 1.0, honest[5] - 1.0  # group 5: three different vectors (16 Byzantine)
    byz[16] = True
    winners, win_rows = majority_vote(g, 3)
    assert win_rows.tolist() == [0, 3, 6, 9, 12, -1]

    p = plan("draco-lite", mode, f=f, buckets=4, seed=seed, workers=18, q=4)
    agg, diag = APPROACHES["draco-lite"](g, byz, p, step)

    chunks = expected_buckets(winners, 4, seed, step)
    assert sorted(len(c) for c in chunks) == [1, 1, 2, 2]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(6))
    bucket_means = torch.stack([winners[torch.from_numpy(c)].mean(dim=0) for c in chunks])
    torch.testing.assert_close(bucketize(winners, p, step), bucket_means)
    torch.testing.assert_close(agg, aggregate(mode, bucket_means, f))
    assert diag["corrupted_groups"] == 1
    assert diag["vote_fallbacks"] == 1


def test_draco_lite_buckets_change_with_step_but_not_with_repeat():
    g = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    p = plan("draco-lite", "mean", buckets=3, workers=30, r=1, q=0)
    winners, _ = majority_vote(g, 1)
    b0 = bucketize(winners, p, 0)
    assert torch.equal(b0, bucketize(winners, p, 0))
    assert not torch.equal(b0, bucketize(winners, p, 1))


def test_draco_lite_inner_rule_and_f():
    # 9 groups of r=1, 3 buckets of 3; inner coord-median per bucket, then mean across buckets
    g = torch.arange(27, dtype=torch.float32).reshape(9, 3) ** 1.5
    byz = np.zeros(9, dtype=bool)
    p = plan("draco-lite", "mean", buckets=3, inner="coord-median", inner_f=1, seed=5, workers=9, r=1, q=0)
    agg, diag = APPROACHES["draco-lite"](g, byz, p, 4)
    chunks = expected_buckets(g, 3, 5, 4)
    assert [len(c) for c in chunks] == [3, 3, 3]
    meds = torch.stack([g[torch.from_numpy(c)].median(dim=0).values for c in chunks])
    torch.testing.assert_close(agg, meds.mean(dim=0))
    assert diag["corrupted_groups"] == 0 and diag["vote_fallbacks"] == 0


def test_draco_lite_buckets_not_fewer_than_groups_is_no_bucketing():
    g, byz, winners = grouped_matrix()
    for buckets in (4, 10):
        agg, _ = APPROACHES["draco-lite"](g.clone(), byz, plan("draco-lite", "coord-median", f=1, buckets=buckets), 3)
        torch.testing.assert_close(agg, aggregate("coord-median", winners, 1))


def test_draco_lite_via_plan_from_cfg():
    g, byz, winners = grouped_matrix()
    cfg = make_cfg("draco-lite", "coord-median", workers=12, q=3, r=3)
    p = plan_from_cfg(cfg)
    assert p.f == 1  # floor(3 / 2) = 1, 4 groups
    agg, diag = APPROACHES["draco-lite"](g, byz, p, 0)
    torch.testing.assert_close(agg, aggregate("coord-median", winners, 1))
    assert diag["corrupted_groups"] == 1 and diag["vote_fallbacks"] == 1
    # q = 4 could corrupt 2 of the 4 winners: a median of 4 with 2 bad values is refused (n > 2f)
    p4 = plan_from_cfg(make_cfg("draco-lite", "coord-median", workers=12, q=4, r=3))
    with pytest.raises(ValueError, match="coord-median needs n > 2f; got n=4, f=2"):
        APPROACHES["draco-lite"](g.clone(), byz, p4, 0)


def test_diagnostics_count_byzantine_winners_and_fallbacks():
    # P=15, r=5, three groups: group 0 Byzantine majority (rows 1, 2, 4 send b), group 1 no majority,
    # group 2 honest majority with two Byzantines outvoted
    h, b = [1.0, 1.0], [9.0, -9.0]
    g = rows(h, b, b, h, b, [0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], b, h, h, b, h)
    byz = np.zeros(15, dtype=bool)
    byz[[1, 2, 4, 5, 6, 10, 13]] = True
    _, win_rows = majority_vote(g, 5)
    assert win_rows.tolist() == [1, -1, 11]
    for name in ("maj_vote", "draco-lite"):
        agg, diag = APPROACHES[name](g.clone(), byz, plan(name, "mean", workers=15, r=5, q=7), 0)
        assert diag["corrupted_groups"] == 1
        assert diag["vote_fallbacks"] == 1
        torch.testing.assert_close(agg, rows(b, [2.0, 0.0], h).mean(dim=0))
        assert set(diag) >= {"corrupted_groups", "vote_fallbacks", "t_vote", "t_aggregate"}


def test_grouped_approaches_may_overwrite_their_input_but_not_the_result():
    """The PS owns the (P, d) buffer: winners stay where they are (the rule reads them by row index), and only a
    fallback median, which no member sent, is written into its group's first row."""
    g, byz, winners = grouped_matrix()
    before = g.clone()
    expected = winners.mean(dim=0)
    agg, _ = APPROACHES["maj_vote"](g, byz, plan("maj_vote"), 0)
    torch.testing.assert_close(agg, expected)
    assert torch.equal(g[6], winners[2])  # group 2 (rows 6-8) has no majority: its median sits in row 6
    keep = [i for i in range(12) if i != 6]
    assert torch.equal(g[keep], before[keep])  # no winner copied or moved
