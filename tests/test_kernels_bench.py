"""The compiled kernels against plain numpy, and the benchmark command end to end (tiny sizes, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detox.bench import main as bench_main
from detox.kernels import centred_gram, middle_mean, selection_network, sign_votes, weighted_sum

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 15, 33, 45, 64, 65])
def test_selection_network_selects_the_middle(m: int) -> None:
    for lo, hi in {(0, m), ((m - 1) // 2, m // 2 + 1), (min(2, m - 1), max(m - 2, min(2, m - 1) + 1))}:
        x = RNG.standard_normal((m, 3000)).astype(np.float32)
        got = middle_mean(x, np.arange(m), lo, hi, threads=2)
        want = np.sort(x, axis=0)[lo:hi].mean(axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert len(selection_network(m, lo, hi)) <= max(1, m * m)


def test_middle_mean_on_selected_rows_treats_nan_as_largest() -> None:
    x = RNG.standard_normal((9, 1000)).astype(np.float32)
    x[4, ::3] = np.nan
    rows = np.array([0, 2, 4, 5, 8])
    got = middle_mean(x, rows, 1, 4, threads=2)
    want = np.sort(np.where(np.isnan(x[rows]), np.inf, x[rows]), axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_centred_gram_matches_float64() -> None:
    x = (1000.0 + RNG.standard_normal((13, 7001))).astype(np.float32)
    ref = x[3].copy()
    c = x.astype(np.float64) - ref
    np.testing.assert_allclose(centred_gram(x, ref, threads=2), c @ c.T, rtol=1e-5, atol=1e-3)


def test_weighted_sum_skips_zero_weight_rows_and_sign_votes_ignore_nan() -> None:
    x = RNG.standard_normal((6, 9000)).astype(np.float32)
    x[2] = np.nan
    w = np.array([0.5, 1.0, 0.0, 2.0, 0.0, -1.0], dtype=np.float32)
    want = (w[[0, 1, 3, 5], None] * x[[0, 1, 3, 5]]).sum(axis=0)
    np.testing.assert_allclose(weighted_sum(x, w, threads=2), want, rtol=1e-5, atol=1e-5)
    votes = sign_votes(x, threads=2)
    np.testing.assert_array_equal(votes, np.sign(np.nan_to_num(x, nan=0.0)).sum(axis=0))


def test_bench_command_writes_every_rule_and_step(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench_main(["--n", "11", "--d", "2000", "--repeats", "1", "--workers", "45", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    from detox.aggregators import AGGREGATORS

    assert {r["rule"] for r in result["rules"]} == set(AGGREGATORS)
    assert all(r["seconds"] > 0 and r["floor_seconds"] > 0 and "speedup_vs_reference" in r for r in result["rules"])
    assert {s["rule"] for s in result["steps"]} == {"multi-krum", "bulyan", "coord-median"}
    for s in result["steps"]:  # the presets' plans: vanilla f = q = 5, DETOX's vote (r = 3) over the 45 rows
        assert s["vanilla_f"] == 5 and s["detox_byzantine"] == 5 and s["d"] == 2000
        assert s["speedup"] == pytest.approx(s["vanilla_seconds"] / s["detox_seconds"])
        assert 0 < s["vote_seconds"] < s["detox_seconds"] and s["vote_share"] < 1 and s["vote_x_read"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| PS step (vote + buckets + rule) |" in md and "vanilla / DETOX" in md and "Load average" in md
