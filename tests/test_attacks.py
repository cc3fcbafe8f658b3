"""Tests of the Byzantine attacks and adversary placements (DESIGN §3) in ``detox.attacks``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from detox.attacks import (
    ATTACKS,
    NEEDS_ALL_HONEST,
    PLACEMENTS,
    HonestStats,
    alie_z_max,
    attack_vector,
    byzantine_mask,
    rng_for,
    seed_for,
)


def honest_matrix(p: int = 6, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(p, d, generator=torch.Generator().manual_seed(seed))


G = torch.tensor([1.0, -2.0, 0.0, 3.5])


def test_registry():
    assert set(ATTACKS) == {"none", "rev_grad", "constant", "gaussian", "alie", "ipm"}
    assert NEEDS_ALL_HONEST == {"alie", "ipm"}
    assert set(PLACEMENTS) == {"random", "fixed", "worst"}


# --------------------------------------------------------------------------------------- attacks


def test_none_is_honest():
    assert torch.equal(ATTACKS["none"](G), G)
    assert torch.equal(attack_vector("none", G, seed=0, step=0, unit=0, params={}), G)


def test_rev_grad():
    assert torch.equal(ATTACKS["rev_grad"](G, scale=2.0), torch.tensor([-2.0, 4.0, 0.0, -7.0]))
    assert torch.equal(ATTACKS["rev_grad"](G), -100.0 * G)  # original default c = 100
    out = attack_vector("rev_grad", G, seed=1, step=2, unit=3, params={"scale": 3.0})
    assert torch.equal(out, -3.0 * G)


def test_constant():
    assert torch.equal(ATTACKS["constant"](G, value=7.0), torch.full((4,), 7.0))
    assert torch.equal(ATTACKS["constant"](G), torch.full((4,), -100.0))  # original default c = -100
    out = attack_vector("constant", G, seed=0, step=0, unit=0, params={"value": -3.0})
    assert torch.equal(out, torch.full((4,), -3.0))
    assert out.dtype == G.dtype


@pytest.mark.parametrize("std", [0.5, 3.0, 10.0])
def test_gaussian_has_the_given_std(std):
    g = torch.zeros(200_000)
    out = attack_vector("gaussian", g, seed=0, step=0, unit=0, params={"std": std})
    assert out.shape == g.shape and out.dtype == g.dtype
    # sample std of 2e5 normals: relative standard error ~ 1/sqrt(2 * 2e5) = 0.0016
    assert float(out.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(out.mean())) < 5 * std / math.sqrt(g.numel())


def test_gaussian_ignores_the_honest_gradient():
    a = attack_vector("gaussian", torch.zeros(100), seed=5, step=1, unit=2, params={"std": 1.0})
    b = attack_vector("gaussian", torch.full((100,), 50.0), seed=5, step=1, unit=2, params={"std": 1.0})
    assert torch.equal(a, b)


def test_gaussian_reproducible_from_seed_step_unit():
    g = torch.zeros(1000)

    def vec(seed, step, unit):
        return attack_vector("gaussian", g, seed=seed, step=step, unit=unit, params={"std": 2.0})

    assert torch.equal(vec(3, 7, 1), vec(3, 7, 1))
    assert not torch.equal(vec(3, 7, 1), vec(3, 7, 2))  # another unit
    assert not torch.equal(vec(3, 7, 1), vec(3, 8, 1))  # another step
    assert not torch.equal(vec(3, 7, 1), vec(4, 7, 1))  # another seed


def test_seed_helpers_are_deterministic():
    assert seed_for(1, 2, 3) == seed_for(1, 2, 3)
    assert seed_for(1, 2, 3) != seed_for(1, 2, 4)
    assert 0 <= seed_for(0, 0) < 2**63
    assert np.array_equal(rng_for(1, 2).permutation(10), rng_for(1, 2).permutation(10))


def test_honest_stats_population_std():
    m = honest_matrix(7, 5)
    stats = HonestStats.of(m)
    x = m.numpy().astype(np.float64)
    np.testing.assert_allclose(stats.mean_d.numpy(), x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std_d.numpy(), x.std(axis=0, ddof=0), rtol=1e-5, atol=1e-6)
    # by hand: rows 0, 2 -> mean 1, population std 1 (the sample std would be sqrt(2))
    s = HonestStats.of(torch.tensor([[0.0], [2.0]]))
    assert s.mean_d.tolist() == [1.0] and s.std_d.tolist() == [1.0]


def test_alie_with_explicit_z():
    m = honest_matrix(6, 5)
    stats = HonestStats.of(m)
    x = m.numpy().astype(np.float64)
    expected = x.mean(axis=0) + 1.5 * x.std(axis=0, ddof=0)
    out = attack_vector("alie", m[0], seed=0, step=0, unit=0, params={"z": 1.5}, stats=stats, workers=6, byzantine=1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the same vector whatever the unit's own gradient
    out2 = attack_vector("alie", m[3], seed=0, step=4, unit=2, params={"z": 1.5}, stats=stats)
    assert torch.equal(out, out2)


def test_alie_by_hand():
    # rows (0, 10) and (2, 10): mean (1, 10), population std (1, 0); z = 2 -> (3, 10)
    stats = HonestStats.of(torch.tensor([[0.0, 10.0], [2.0, 10.0]]))
    assert ATTACKS["alie"](torch.zeros(2), stats=stats, z=2.0).tolist() == [3.0, 10.0]


def test_alie_default_z_is_z_max():
    m = honest_matrix(45, 8)
    stats = HonestStats.of(m)
    out = attack_vector("alie", m[0], seed=0, step=0, unit=0, params={}, stats=stats, workers=45, byzantine=5)
    expected = stats.mean_d + alie_z_max(45, 5) * stats.std_d
    torch.testing.assert_close(out, expected)
    out_none = attack_vector("alie", m[0], seed=0, step=0, unit=0, params={"z": None}, stats=stats, workers=45,
                             byzantine=5)
    torch.testing.assert_close(out_none, expected)


def test_alie_z_max_value():
    # s = floor(45/2 + 1) - 5 = 23 - 5 = 18 ; z = Phi^-1((45 - 18)/45) = Phi^-1(0.6)
    assert alie_z_max(45, 5) == pytest.approx(float(norm.ppf((45 - 18) / 45)), rel=1e-12)
    assert alie_z_max(45, 5) == pytest.approx(0.2533471031357997, rel=1e-9)
    # P=10, q=2: s = 6 - 2 = 4 -> Phi^-1(0.6) too
    assert alie_z_max(10, 2) == pytest.approx(float(norm.ppf(0.6)), rel=1e-12)
    # q = 0: s = floor(P/2 + 1) -> a negative z for P=45 (Phi^-1(22/45))
    assert alie_z_max(45, 0) == pytest.approx(float(norm.ppf(22 / 45)), rel=1e-12)


@pytest.mark.parametrize("workers,byzantine", [(45, 23), (45, 30), (10, 6), (4, 3)])
def test_alie_z_max_undefined_when_s_not_positive(workers, byzantine):
    assert math.floor(workers / 2 + 1) - byzantine <= 0
    with pytest.raises(ValueError, match="alie"):
        alie_z_max(workers, byzantine)


def test_alie_z_max_largest_valid_q():
    # P=45: s = 23 - q > 0 for q <= 22
    assert alie_z_max(45, 22) == pytest.approx(float(norm.ppf(44 / 45)), rel=1e-12)


def test_ipm():
    m = honest_matrix(6, 5)
    stats = HonestStats.of(m)
    out = attack_vector("ipm", m[1], seed=0, step=0, unit=0, params={"epsilon": 0.5}, stats=stats)
    torch.testing.assert_close(out, -0.5 * m.mean(dim=0))
    # default epsilon 0.1; by hand: mean of (1, 2) and (3, -4) is (2, -1) -> (-0.2, 0.1)
    s = HonestStats.of(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    torch.testing.assert_close(ATTACKS["ipm"](torch.zeros(2), stats=s), torch.tensor([-0.2, 0.1]))


@pytest.mark.parametrize("name", ["none", "rev_grad", "constant", "gaussian", "alie", "ipm"])
def test_attacks_keep_shape_and_dtype_and_do_not_modify_input(name):
    m = honest_matrix(6, 5).double()
    g = m[0].clone()
    before = g.clone()
    params = {"z": 1.0} if name == "alie" else {}
    out = attack_vector(name, g, seed=0, step=0, unit=0, params=params, stats=HonestStats.of(m))
    assert out.shape == g.shape and out.dtype == g.dtype
    assert torch.equal(g, before)


# --------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("placement", ["random", "fixed", "worst"])
@pytest.mark.parametrize("workers,r,q", [(45, 3, 5), (12, 3, 0), (12, 3, 12), (10, 1, 3), (15, 5, 7)])
def test_mask_has_exactly_q_byzantines(placement, workers, r, q):
    for step in range(5):
        mask = byzantine_mask(placement, step, workers, q, r, seed=0)
        assert mask.dtype == bool and mask.shape == (workers,)
        assert int(mask.sum()) == q


def test_fixed_is_the_same_set_every_step():
    masks = [byzantine_mask("fixed", step, 45, 5, 3, seed=11) for step in range(20)]
    for m in masks[1:]:
        assert np.array_equal(m, masks[0])
    # another seed draws another set (for this seed pair)
    assert not np.array_equal(byzantine_mask("fixed", 0, 45, 5, 3, seed=12), masks[0])


def test_random_differs_across_steps_but_is_reproducible():
    masks = [byzantine_mask("random", step, 45, 5, 3, seed=11) for step in range(20)]
    distinct = {m.tobytes() for m in masks}
    assert len(distinct) > 15
    for step in range(20):
        assert np.array_equal(byzantine_mask("random", step, 45, 5, 3, seed=11), masks[step])
    assert not np.array_equal(byzantine_mask("random", 0, 45, 5, 3, seed=12), masks[0])


def test_worst_45_3_5():
    mask = byzantine_mask("worst", 0, 45, 5, 3, seed=0)
    per_group = mask.reshape(15, 3).sum(axis=1)
    assert per_group[:3].tolist() == [2, 2, 1]
    assert per_group[3:].sum() == 0
    assert int((per_group >= 2).sum()) == 2  # floor(5 / ceil(4/2)) = 2 groups with a Byzantine majority


def test_worst_does_not_depend_on_step_or_seed():
    a = byzantine_mask("worst", 0, 45, 5, 3, seed=0)
    for step, seed in [(1, 0), (7, 3), (100, 99)]:
        assert np.array_equal(byzantine_mask("worst", step, 45, 5, 3, seed=seed), a)


@pytest.mark.parametrize(
    "workers,r,q",
    [
        (45, 3, 0), (45, 3, 1), (45, 3, 5), (45, 3, 9), (45, 3, 30),
        (45, 5, 7), (45, 5, 14), (45, 9, 20),
        (12, 4, 6), (16, 2, 5), (10, 1, 3), (12, 3, 7), (20, 5, 12),
    ],
)
def test_worst_maximises_byzantine_majority_groups(workers, r, q):
    need = math.ceil((r + 1) / 2)
    groups = workers // r
    mask = byzantine_mask("worst", 0, workers, q, r, seed=0)
    per_group = mask.reshape(groups, r).sum(axis=1)
    assert int(mask.sum()) == q
    assert int((per_group >= need).sum()) == min(q // need, groups)


def test_q_zero_means_no_byzantines():
    for placement in PLACEMENTS:
        assert not byzantine_mask(placement, 3, 45, 0, 3, seed=0).any()
