"""Audit of the attacks and adversary placements (DESIGN §3) against references written from DESIGN, and of their
parameters' refusals. The first tests failed before their fix; the rest pin what held."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg

from detox.approaches import Plan
from detox.attacks import byzantine_mask
from detox.config import validate
from detox.errors import ConfigError
from detox.step import apply_attack

HUGE = "1" * 400  # an integer literal beyond float range


@pytest.mark.parametrize(
    "overrides",
    [
        ["err_mode=rev_grad", f"err_mode.scale={HUGE}"],
        ["err_mode=alie", f"err_mode.z=-{HUGE}"],
        ["err_mode=gaussian", f"err_mode.std={HUGE}"],
        ["err_mode=ipm", f"err_mode.epsilon={HUGE}"],
        # NaN and inf are allowed here on purpose; an int no float holds crashed torch.full_like mid-run
        ["err_mode=constant", f"err_mode.value={HUGE}"],
    ],
)
def test_attack_parameter_beyond_float_range_is_refused_in_one_line(overrides):
    # before: OverflowError from math.isfinite in the schema (a traceback), or for constant no refusal at all
    key = overrides[1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=.*: must be a") as err:
        validate(make_cfg([*TINY, *overrides]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("placement", ["random", "fixed", "worst"])
@pytest.mark.parametrize("workers,q,r", [(9, 10, 3), (9, -1, 3), (10, 3, 3)])
def test_byzantine_mask_refuses_what_it_cannot_place_exactly(placement, workers, q, r):
    # before: `worst` returned 9 Byzantines for q = 10, 8 for q = -1, and 9 of 10 workers for q = 10, r = 3
    with pytest.raises(ValueError, match="byzantine_mask"):
        byzantine_mask(placement, 0, workers, q, r, seed=0)


# ----------------------------------------------------------------------------------------- what held


def corrupted(mask: np.ndarray, r: int) -> int:
    return int((mask.reshape(-1, r).sum(axis=1) >= math.ceil((r + 1) / 2)).sum())


@pytest.mark.parametrize("workers,r", [(6, 3), (9, 3), (12, 3), (10, 5), (7, 7), (8, 1)])
def test_worst_placement_matches_a_brute_force_maximum(workers, r):
    for q in range(workers + 1):
        best = max(corrupted(np.isin(np.arange(workers), c), r) for c in itertools.combinations(range(workers), q))
        mask = byzantine_mask("worst", 0, workers, q, r, seed=0)
        assert int(mask.sum()) == q and corrupted(mask, r) == best, (q, corrupted(mask, r), best)


@pytest.mark.parametrize("approach,workers,size", [("draco-lite", 9, 3), ("baseline", 9, 3), ("maj_vote", 15, 5)])
@pytest.mark.parametrize("q", [1, 2, 4])
def test_apply_attack_matches_a_reference_from_design(approach, workers, size, q):
    plan = Plan(approach=approach, workers=workers, group_size=size, byzantine=q, mode="mean", f=0, seed=3)
    u = plan.unit_size
    rng = np.random.default_rng(q)
    g = np.repeat(rng.standard_normal((workers // u, 7)).astype(np.float32), u, axis=0)
    x = g.astype(np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0)  # over all P honest rows, population std (DESIGN §3, the original)
    z_max = NormalDist().inv_cdf((workers - (math.floor(workers / 2 + 1) - q)) / workers)
    cases = {
        "alie": ({"z": 1.3}, lambda row: mu + 1.3 * sd),
        "alie-zmax": ({"z": None}, lambda row: mu + z_max * sd),
        "ipm": ({"epsilon": 0.7}, lambda row: -0.7 * mu),
        "rev_grad": ({"scale": 4.0}, lambda row: -4.0 * row),
        "constant": ({"value": 2.5}, lambda row: np.full(7, 2.5)),
    }
    for step in range(4):
        byz = byzantine_mask("random", step, workers, q, u, seed=3)
        for name, (params, bad) in cases.items():
            got = torch.from_numpy(g.copy())
            apply_attack(got, byz, plan, name.split("-")[0], params, step)
            want = g.astype(np.float64)
            for p in np.flatnonzero(byz):
                want[p] = bad(x[p])
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_alie_with_equal_honest_rows_sends_the_honest_row_bit_for_bit():
    # std 0 and a mean equal to the common row (numpy's float32 mean is off by an ulp here): the vote sees equal bits
    plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode="mean", f=0)
    g = torch.full((45, 100), 0.1)
    apply_attack(g, byzantine_mask("worst", 0, 45, 5, 3, seed=0), plan, "alie", {"z": 1.0}, 0)
    assert torch.equal(g, torch.full((45, 100), 0.1))
