"""The ``method=vanilla-*`` and ``method=detox-*`` presets against a numpy port of the original DETOX code, and the
rules against ByzFL's definitions where they coincide.

The port re-states, in numpy, the PS aggregation of hwang595/DETOX at commit
1f095d6ba3485f62f6b4090e9140d5e529f7e7fb:

* ``src/master/baseline_master.py`` — ``SyncReplicasMaster_NN._krum`` (Krum / Multi-Krum with
  ``nb_in_score = num_workers - s - 2`` neighbours and, for Multi-Krum, as many rows averaged),
  ``_bulyan_multi_krum`` (one pass: the ``nb_in_score`` rows of lowest score, then per coordinate the mean of the
  sorted values at ``bulyan_inds``, the middle ``nb_in_score - 2s`` positions around the pivot) and
  ``_coord_median`` (``np.median``);
* ``src/master/draco_lite_master.py`` — ``DracoLiteMaster._grad_majority_vote`` (per group and per parameter
  tensor, Boyer-Moore with ``np.array_equal``, the surviving candidate kept unchecked) and
  ``_draco_lite_aggregation``: ``coord-median`` shuffles the group winners into ``bucket_size`` buckets
  (``np.split``), means inside, ``np.median`` across; ``multi-krum`` splits them into 2 buckets
  (``np.array_split``) and runs Multi-Krum in each with ``effective_s = floor(s / ceil(r / 2))``, then the plain
  mean of the two; ``bulyan`` runs Bulyan over all winners with ``effective_s``.

The original draws its bucket permutation from numpy's global generator; here the port is handed the permutation
our step draws (``rng_for(seed, TAG_BUCKETS, step)``), so both see identical buckets. Outputs agree to float32
round-off (the original sums in other orders).

ByzFL: ``byzfl/aggregators/aggregators.py`` of LPD-EPFL/byzfl at commit 0393b669cafbb7ad51e549c287e458be3ee7e654
(``Krum``, ``MultiKrum``, ``TrMean``, ``Median``), ported below; ByzFL is not a dependency.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import make_cfg

from detox.aggregators import AGGREGATORS
from detox.approaches import APPROACHES, majority_vote, plan_from_cfg
from detox.attacks import TAG_BUCKETS, rng_for

P, R, Q = 45, 3, 5  # the original's main setting: 45 workers in 15 groups of 3, 5 Byzantine
LAYERS = (120, 8, 200, 16, 40, 1)  # parameter tensor sizes in flat order
D = sum(LAYERS)


# --------------------------------------------------------------------------------------- port of the original


def orig_scores(grads: np.ndarray, nb_in_score: int) -> list[float]:
    """Krum scores: per row, the sum of its nb_in_score smallest squared distances to the other rows."""
    n = grads.shape[0]
    d2 = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d2[i][j] = d2[j][i] = float(np.linalg.norm(grads[i] - grads[j]) ** 2)
    scores = []
    for i in range(n):
        others = [d2[i][j] for j in range(n) if j != i]
        scores.append(sum(np.take(others, np.argpartition(others, nb_in_score)[:nb_in_score])))
    return scores


def orig_multi_krum(grads: np.ndarray, s: int) -> np.ndarray:
    nb_in_score = grads.shape[0] - s - 2
    scores = orig_scores(grads, nb_in_score)
    return np.mean(grads[np.argpartition(scores, nb_in_score)[:nb_in_score], :], axis=0)


def orig_krum(grads: np.ndarray, s: int) -> np.ndarray:
    scores = orig_scores(grads, grads.shape[0] - s - 2)
    return grads[scores.index(min(scores))]


def orig_bulyan_inds(nb_in_score: int, s: int) -> list[int]:
    """The sorted positions the original averages: bulyan_s = nb_in_score - 2s positions around the pivot."""
    pivot, bulyan_s = nb_in_score // 2, nb_in_score - 2 * s
    if nb_in_score % 2 == 0:
        side = (bulyan_s - 2) // 2
        below = [pivot - 1 - i for i in range(1, side + 1)]
        return below + [pivot - 1, pivot] + [pivot + i for i in range(1, side + 1)]
    side = (bulyan_s - 1) // 2
    return [pivot - i for i in range(1, side + 1)] + [pivot] + [pivot + i for i in range(1, side + 1)]


def orig_bulyan(grads: np.ndarray, s: int) -> np.ndarray:
    nb_in_score = grads.shape[0] - s - 2
    scores = orig_scores(grads, nb_in_score)
    selected = grads[np.argpartition(scores, nb_in_score)[:nb_in_score], :]
    return np.mean(np.sort(selected, axis=0)[orig_bulyan_inds(nb_in_score, s), :], axis=0)


def orig_vote(groups: list[list[np.ndarray]], layer_sizes: tuple[int, ...]) -> np.ndarray:
    """_grad_majority_vote: per group and per layer, Boyer-Moore; the surviving candidate is kept."""
    out = np.zeros((len(groups), sum(layer_sizes)), dtype=np.float32)
    for k, members in enumerate(groups):
        pointer = 0
        for size in layer_sizes:
            counter, cand = 0, None
            for elem in members:
                layer = elem[pointer : pointer + size]
                if counter == 0:
                    cand, counter = layer, 1
                elif np.array_equal(layer, cand):
                    counter += 1
                else:
                    counter -= 1
            out[k, pointer : pointer + size] = cand
            pointer += size
    return out


def orig_detox(mode: str, winners: np.ndarray, perm: np.ndarray, s: int, r: int, bucket_size: int) -> np.ndarray:
    """_draco_lite_aggregation after the vote, with the bucket permutation given."""
    effective_s = math.floor(s / math.ceil(r / 2))
    if mode == "coord-median":
        buckets = winners[np.array(np.split(perm, bucket_size)), :]
        return np.median(np.mean(buckets, axis=1), axis=0)
    if mode == "bulyan":
        return orig_bulyan(winners, effective_s)
    if mode == "multi-krum":
        return np.mean([orig_multi_krum(winners[idx, :], effective_s) for idx in np.array_split(perm, 2)], axis=0)
    raise KeyError(mode)


def orig_vanilla(mode: str, grads: np.ndarray, s: int) -> np.ndarray:
    if mode == "multi-krum":
        return orig_multi_krum(grads, s)
    if mode == "bulyan":
        return orig_bulyan(grads, s)
    if mode == "coord-median":
        return np.median(grads, axis=0)
    raise KeyError(mode)


# --------------------------------------------------------------------------------------- inputs


def worker_grads(seed: int, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """(P, D) float32 worker gradients, group-contiguous (members of a group share an honest gradient), and the
    Byzantine mask. Byzantines in one group collude, except in one group where two of them disagree on the last
    layers (so the per-layer vote has no majority there)."""
    rng = np.random.default_rng(seed)
    honest = rng.standard_normal((P // R, D)).astype(np.float32)
    g = np.repeat(honest, R, axis=0)
    byz = np.zeros(P, dtype=bool)
    byz[[1, 2, 4, 9, 10]] = True  # group 0: two (a corrupted vote); group 1: one (outvoted); group 3: two
    mu, sigma = g.mean(axis=0), g.std(axis=0)
    for p in np.flatnonzero(byz):
        base = honest[p // R]
        bad = -100.0 * base if attack == "rev_grad" else mu + sigma  # ALIE with z = 1, as the original
        g[p] = bad + (p // R) * 1e-3  # colluding within a group, different across groups
    g[10, -41:] += 1.0  # group 3: Byzantine 9 and 10 differ on the last two layers; honest 11 differs from both
    return g.astype(np.float32), byz


def plan_for(method: str, seed: int):
    cfg = make_cfg([f"method={method}", f"workers={P}", f"worker_fail={Q}", f"group_size={R}", f"seed={seed}"])
    return dataclasses.replace(plan_from_cfg(cfg), layer_sizes=LAYERS), cfg


# --------------------------------------------------------------------------------------- presets vs the port


@pytest.mark.parametrize("attack", ["rev_grad", "alie"])
@pytest.mark.parametrize("seed,step", [(0, 0), (1, 7), (5, 123)])
@pytest.mark.parametrize("mode", ["multi-krum", "bulyan", "coord-median"])
def test_detox_preset_reproduces_the_original(mode, seed, step, attack):
    plan, cfg = plan_for(f"detox-{mode}", seed)
    assert plan.approach == "draco-lite" and plan.vote == "boyer-moore"
    g, byz = worker_grads(seed, attack)
    winners = orig_vote([list(g[k * R : (k + 1) * R]) for k in range(P // R)], LAYERS)
    perm = rng_for(seed, TAG_BUCKETS, step).permutation(P // R)
    want = orig_detox(mode, winners, perm, Q, R, int(cfg.approach.buckets or 0))
    got, diag = APPROACHES[plan.approach](torch.from_numpy(g.copy()), byz, plan, step)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert diag["corrupted_groups"] >= 1 and diag["vote_fallbacks"] == 1  # group 0 corrupted; group 3 split


@pytest.mark.parametrize("attack", ["rev_grad", "alie"])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("mode", ["multi-krum", "bulyan", "coord-median"])
def test_vanilla_preset_reproduces_the_original(mode, seed, attack):
    plan, _ = plan_for(f"vanilla-{mode}", seed)
    assert plan.approach == "baseline" and plan.f == Q
    g, byz = worker_grads(seed, attack)
    g += np.random.default_rng(seed + 100).standard_normal(g.shape).astype(np.float32)  # every worker its batch
    got, _ = APPROACHES[plan.approach](torch.from_numpy(g.copy()), byz, plan, 0)
    want = orig_vanilla(mode, g, Q)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    if mode != "coord-median":  # the literature's counts (the mode= defaults) give another result on these inputs
        literature = AGGREGATORS[mode](torch.from_numpy(g), Q).numpy()
        assert not np.allclose(literature, want, rtol=1e-5, atol=1e-6)


def test_preset_counts_are_the_originals():
    # vanilla P = 45, q = 5: Multi-Krum m = 38; Bulyan theta = 38, beta = 28; DETOX Bulyan over 15 winners with
    # f = 2: theta = 11, beta = 7; DETOX Multi-Krum in buckets of 8 and 7: m = 4 and 3
    assert sorted(orig_bulyan_inds(38, 5)) == list(range(5, 33))
    assert sorted(orig_bulyan_inds(11, 2)) == list(range(2, 9))
    vmk, _ = plan_for("vanilla-multi-krum", 0)
    assert vmk.mode_params["m"] == "original"
    dmk, dcfg = plan_for("detox-multi-krum", 0)
    assert (dmk.buckets, dmk.inner, dmk.inner_f, dmk.mode) == (2, "multi-krum", 2, "mean")
    assert dmk.inner_params["m"] == "original"
    db, _ = plan_for("detox-bulyan", 0)
    assert (db.buckets, db.f) == (None, 2)
    assert db.mode_params["theta"] == "original" and db.mode_params["selection"] == "original"
    assert db.mode_params["average"] == "original"
    dcm, _ = plan_for("detox-coord-median", 0)
    assert (dcm.buckets, dcm.inner, dcm.mode) == (5, "mean", "coord-median")


@pytest.mark.parametrize("n,s", [(8, 2), (7, 2), (45, 5), (15, 2), (16, 3)])
def test_rules_with_original_settings_match_the_port(n, s):
    x = np.random.default_rng(n * 7 + s).standard_normal((n, 300)).astype(np.float32)
    mk = AGGREGATORS["multi-krum"](torch.from_numpy(x), s, m="original").numpy()
    np.testing.assert_allclose(mk, orig_multi_krum(x, s), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(AGGREGATORS["krum"](torch.from_numpy(x), s).numpy(), orig_krum(x, s))
    if n >= 4 * s + 3:
        bu = AGGREGATORS["bulyan"](torch.from_numpy(x), s, theta="original", selection="original",
                                   average="original").numpy()
        np.testing.assert_allclose(bu, orig_bulyan(x, s), rtol=1e-5, atol=1e-6)


def test_boyer_moore_vote_matches_the_port():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, D)).astype(np.float32)
    groups = []
    for _ in range(12):  # groups of 3 built from a few shared vectors, mixing layers between members
        members = [base[rng.integers(6)].copy() for _ in range(3)]
        for m in members:
            for _ in range(2):
                lo = int(rng.integers(D - 8))
                m[lo : lo + 8] = base[rng.integers(6), lo : lo + 8]
        groups.append(members)
    g = torch.from_numpy(np.concatenate([np.stack(m) for m in groups]))
    want = orig_vote(groups, LAYERS)
    got, _ = majority_vote(g, 3, vote="boyer-moore", layer_sizes=LAYERS)
    assert torch.equal(got, torch.from_numpy(want))
    one_layer, _ = majority_vote(g, 3, vote="boyer-moore")
    assert torch.equal(one_layer, torch.from_numpy(orig_vote(groups, (D,))))


# --------------------------------------------------------------------------------------- ByzFL's definitions


def byzfl_krum(x: np.ndarray, f: int) -> np.ndarray:
    """ByzFL Krum(f): mean squared distance to the n - f - 1 nearest other vectors; the argmin."""
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(axis=2)
    return x[int(np.argmin(np.sort(d2, axis=1)[:, 1 : len(x) - f].mean(axis=1)))]


def byzfl_multi_krum(x: np.ndarray, f: int) -> np.ndarray:
    """ByzFL MultiKrum(f): the mean of the n - f vectors of lowest Krum(f) score."""
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(axis=2)
    score = np.sort(d2, axis=1)[:, 1 : len(x) - f].mean(axis=1)
    k = len(x) - f
    return x[np.argpartition(score, k - 1)[:k]].mean(axis=0)


def byzfl_trmean(x: np.ndarray, f: int) -> np.ndarray:
    return x.mean(axis=0) if f == 0 else np.sort(x, axis=0)[f:-f].mean(axis=0)


def byzfl_median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=0)


def test_byzfl_documented_examples():
    # the values in ByzFL's docstrings for x = [[1,2,3],[4,5,6],[7,8,9]]
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    # Krum(1) -> [1, 2, 3]: ByzFL's f counts one more (its n - f - 1 neighbours are our n - f - 2 with f - 1)
    assert AGGREGATORS["krum"](x, 0).tolist() == [1.0, 2.0, 3.0]
    # MultiKrum(1) -> [2.5, 3.5, 4.5]: n - f = 2 rows averaged, 1 neighbour each (our bound needs f = 0 here)
    assert AGGREGATORS["multi-krum"](x, 0, m=2, neighbours=1).tolist() == [2.5, 3.5, 4.5]
    assert AGGREGATORS["trimmed-mean"](x, 1).tolist() == [4.0, 5.0, 6.0]  # TrMean(1)
    assert AGGREGATORS["coord-median"](x, 0).tolist() == [4.0, 5.0, 6.0]  # Median


@pytest.mark.parametrize("n,f", [(7, 1), (9, 2), (11, 3), (15, 5), (45, 5)])
def test_rules_agree_with_byzfl_where_definitions_match(n, f):
    x = np.random.default_rng(n + 100 * f).standard_normal((n, 64)).astype(np.float32)
    t = torch.from_numpy(x)
    # our Krum(f) (n - f - 2 neighbours) is ByzFL's Krum(f + 1)
    np.testing.assert_array_equal(AGGREGATORS["krum"](t, f).numpy(), byzfl_krum(x, f + 1))
    # ByzFL's MultiKrum(f): m = n - f (our literature m) with n - f - 1 neighbours
    mk = AGGREGATORS["multi-krum"](t, f, m="literature", neighbours=n - f - 1).numpy()
    np.testing.assert_allclose(mk, byzfl_multi_krum(x, f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(AGGREGATORS["trimmed-mean"](t, f).numpy(), byzfl_trmean(x, f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(AGGREGATORS["coord-median"](t, f).numpy(), byzfl_median(x), rtol=1e-6)
