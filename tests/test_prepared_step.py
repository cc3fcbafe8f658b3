"""The PS step's prepared path (``approaches._prepared``: compiled calls with their fixed arguments set up once per
plan) against the general path it replaces, bit for bit: aggregate, diagnostics and the matrix the vote wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detox import approaches
from detox.aggregators import prepared_bucket_stage, prepared_rule_stage
from detox.approaches import APPROACHES, Plan, _bounds, _buckets
from detox.kernels import bucket_order

# (approach, mode, f, inner, inner_f, inner_params, buckets): the presets' pairs, and pairs with no prepared stage
CASES = {
    "median": ("draco-lite", "coord-median", 2, "mean", 2, {}, 5),
    "trimmed": ("draco-lite", "trimmed-mean", 1, "mean", 0, {}, 4),
    "multi-krum": ("draco-lite", "mean", 0, "multi-krum", 2, {"m": "original", "neighbours": "original"}, 2),
    "bulyan": ("draco-lite", "bulyan", 2, "mean", 0, {}, None),
    "bulyan-original": ("draco-lite", "bulyan", 2, "mean", 0, {}, None),  # the preset's settings (ORIGINAL)
    "krum-over-means": ("draco-lite", "krum", 1, "mean", 0, {}, 5),
    "maj_vote": ("maj_vote", "mean", 0, "mean", 0, {}, None),
}


def make_plan(case: str, vote: str, tol: float, workers: int, d: int, seed: int = 0) -> Plan:
    approach, mode, f, inner, inner_f, inner_params, buckets = CASES[case]
    sizes = (d // 3, d // 6, d - d // 3 - d // 6)  # three layers for the Boyer-Moore vote
    original = {"theta": "original", "selection": "original", "average": "original", "neighbours": "original"}
    return Plan(approach=approach, workers=workers, group_size=3, byzantine=workers // 9, mode=mode, f=f,
                mode_params=original if case == "bulyan-original" else {}, inner=inner, inner_f=inner_f,
                inner_params=inner_params, buckets=buckets, vote_tol=tol, seed=seed, vote=vote,
                layer_sizes=sizes if vote == "boyer-moore" else None)


def hostile(workers: int, d: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Groups of 3 with every case the vote meets: unanimous groups, Byzantine majorities, a Byzantine member
    differing on one layer only, NaN payloads, -0.0 against 0.0, tiny differences (inside a tol of 1e-3), and
    groups of three different vectors."""
    gen = np.random.default_rng(seed)
    k = workers // 3
    honest = gen.standard_normal((k, d)).astype(np.float32)
    g = np.repeat(honest, 3, axis=0)
    byz = np.zeros(workers, dtype=bool)
    for grp in range(k):
        kind, rows = grp % 7, [grp * 3 + i for i in range(3)]
        if kind == 1:  # Byzantine majority (members 0 and 1)
            g[rows[:2]] = honest[grp] * -3.0
            byz[rows[:2]] = True
        elif kind == 2:  # one Byzantine member, different on the middle layer only
            g[rows[2], d // 3 + 1] += 5.0
            byz[rows[2]] = True
        elif kind == 3:  # identical NaN payloads in two members, a third different
            g[rows[:2], 0] = np.float32("nan")
            byz[rows[0]] = True
        elif kind == 4:  # -0.0 against 0.0, and a member inside a tolerance
            g[rows, 1] = [0.0, -0.0, 0.0]
            g[rows[1], 2] += 1e-4
            byz[rows[1]] = True
        elif kind == 5:  # three different vectors: the strict vote's median fallback
            g[rows[1]] += 1.0
            g[rows[2]] -= 1.0
            byz[rows[1:]] = True
        elif kind == 6:  # Byzantine member 0 leads on the first layer, honest majority elsewhere
            g[rows[0], : d // 3] = 9.0
            byz[rows[0]] = True
    return torch.from_numpy(g).to(dtype).contiguous(), byz


def step(plan: Plan, grads: torch.Tensor, byz: np.ndarray, i: int, out: torch.Tensor | None,
         general: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:
    work = grads.clone()
    saved = approaches._prepared
    if general:
        approaches._prepared = lambda *a: None
    try:
        agg, diag = APPROACHES[plan.approach](work, byz, plan, i, out=out)
    finally:
        approaches._prepared = saved
    return agg.clone(), {k: v for k, v in diag.items() if not k.startswith("t_")}, work


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("vote,tol", [("strict", 0.0), ("boyer-moore", 0.0), ("strict", 1e-3),
                                      ("boyer-moore", 1e-3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_step_equals_the_general_path(case, vote, tol, dtype):
    workers, d = 45, 600
    plan = make_plan(case, vote, tol, workers, d)
    grads, byz = hostile(workers, d, seed=len(case), dtype=dtype)
    for i in range(3):  # the buckets change with the step
        fast = step(plan, grads, byz, i, None, general=False)
        slow = step(plan, grads, byz, i, None, general=True)
        assert same_bits(fast[0], slow[0]), (case, vote, tol, i)
        assert fast[1] == slow[1] and all(type(v) is int for v in fast[1].values())  # JSON-ready counts
        assert same_bits(fast[2], slow[2])  # what the vote wrote into the matrix (fallbacks, assembled layers)
    assert approaches._PREPARED[id(plan)].plan is plan  # the prepared path was the one taken
    if dtype == torch.float32 and case in ("median", "trimmed", "multi-krum", "bulyan", "bulyan-original"):
        assert approaches._PREPARED[id(plan)].stage is not None


@pytest.mark.parametrize("case", ["median", "multi-krum", "bulyan-original"])
@pytest.mark.parametrize("threads", [1, 2])
def test_prepared_step_at_the_unrolled_size_on_one_and_two_threads(case, threads):
    # 15 winners x 70000 columns: the unrolled bucket kernels and the pooled vote (above 2^20 elements)
    workers, d = 45, 70_000
    plan = make_plan(case, "boyer-moore", 0.0, workers, d)
    grads, byz = hostile(workers, d, seed=3, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty(d)
        fast = step(plan, grads, byz, 5, out, general=False)
        slow = step(plan, grads, byz, 5, None, general=True)
    finally:
        torch.set_num_threads(before)
    assert same_bits(fast[0], slow[0]) and fast[1] == slow[1] and same_bits(fast[2], slow[2])
    assert approaches._PREPARED[id(plan)].key[-1] == threads


def test_prepared_steps_are_set_up_again_for_another_plan_shape_or_thread_count():
    plan = make_plan("median", "boyer-moore", 0.0, 45, 600)
    grads, byz = hostile(45, 600, seed=1, dtype=torch.float32)
    APPROACHES[plan.approach](grads.clone(), byz, plan, 0)
    first = approaches._PREPARED[id(plan)]
    APPROACHES[plan.approach](grads.clone(), byz, plan, 1)
    assert approaches._PREPARED[id(plan)] is first  # set up once per plan
    other = make_plan("median", "boyer-moore", 0.0, 45, 900)
    grads9, byz9 = hostile(45, 900, seed=1, dtype=torch.float32)
    APPROACHES[other.approach](grads9.clone(), byz9, other, 0)
    assert approaches._PREPARED[id(other)].plan is other and approaches._PREPARED[id(plan)] is first
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        APPROACHES[plan.approach](grads.clone(), byz, plan, 2)
        assert approaches._PREPARED[id(plan)] is not first
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("byz", [[False] * 45, np.zeros(45, dtype=np.int64), np.zeros(44, dtype=bool)])
def test_a_mask_that_is_not_a_boolean_array_per_row_takes_the_general_path(byz):
    plan = make_plan("median", "strict", 0.0, 45, 600)
    grads, _ = hostile(45, 600, seed=2, dtype=torch.float32)
    assert approaches._prepared(plan, grads, byz) is None


def test_prepared_stage_hands_a_bucket_of_no_finite_row_back_to_the_rule():
    # every member of every group sends +inf on one coordinate: no row has a finite squared norm, so the compiled
    # Multi-Krum stage returns None and the rule's own path aggregates (same bits as the general path)
    plan = make_plan("multi-krum", "strict", 0.0, 45, 600)
    grads, byz = hostile(45, 600, seed=4, dtype=torch.float32)
    grads[:, 7] = float("inf")
    prep = approaches._prepared(plan, grads, byz)
    assert prep.stage is not None
    rows = np.arange(0, 45, 3, dtype=np.int64)
    assert prep.stage(grads, rows, None) is None
    fast = step(plan, grads, byz, 0, None, general=False)
    slow = step(plan, grads, byz, 0, None, general=True)
    assert same_bits(fast[0], slow[0]) and fast[1] == slow[1]


def test_prepared_stage_checks_out_as_the_rule_does():
    plan = make_plan("median", "boyer-moore", 0.0, 45, 600)
    grads, byz = hostile(45, 600, seed=5, dtype=torch.float32)
    messages = []
    for general in (False, True):
        for bad in (torch.empty(599), "row 0"):  # the wrong shape; a row the stage reads (group 0's winner)
            work = grads.clone()
            saved = approaches._prepared
            if general:
                approaches._prepared = lambda *a: None
            try:
                with pytest.raises(ValueError, match="out") as err:
                    APPROACHES[plan.approach](work, byz, plan, 0, out=work[0] if bad == "row 0" else bad)
            finally:
                approaches._prepared = saved
            messages.append(str(err.value))
    assert messages[:2] == messages[2:]  # the same one line on both paths
    # a row the stage does not read (group 0's third member never wins here) may hold the result
    spare = grads.clone()
    agg, _ = APPROACHES[plan.approach](spare, byz, plan, 0, out=spare[2])
    assert agg.data_ptr() == spare[2].data_ptr()
    assert same_bits(agg, step(plan, grads, byz, 0, None, general=True)[0])


@pytest.mark.parametrize("inner,mode,params", [("mean", "krum", {}), ("geometric-median", "mean", {}),
                                               ("mean", "coord-median", {"bogus": 1})])
def test_no_prepared_stage_for_other_pairs_or_settings_the_rule_refuses(inner, mode, params):
    assert prepared_bucket_stage(inner, mode, (3, 3, 3), 0, params, 0, {}, 600, 2) is None


@pytest.mark.parametrize("sizes,d,threads", [((), 600, 2), ((3, 0, 3), 600, 2), ((3, 3), 0, 2), ((3, 3), -5, 2),
                                             ((3, 3), 600, 0)])
def test_no_prepared_stage_for_empty_buckets_or_matrices(sizes, d, threads):
    assert prepared_bucket_stage("mean", "coord-median", sizes, 0, {}, 0, {}, d, threads) is None
    assert prepared_rule_stage("bulyan", 15, 2, {}, min(d, 0)) is None


@pytest.mark.parametrize("name,n,f,params", [("krum", 15, 2, {}), ("bulyan", 10, 2, {}),
                                             ("bulyan", 15, 2, {"theta": "bogus"})])
def test_no_prepared_rule_stage_but_bulyan_and_none_for_settings_it_refuses(name, n, f, params):
    # bulyan needs n >= 4f + 3: 10 rows with f = 2 are refused (the rule's own path raises its one line)
    assert prepared_rule_stage(name, n, f, params, 600) is None
    assert prepared_rule_stage("bulyan", 15, 2, {}, 600) is not None


@pytest.mark.parametrize("k,buckets,step_", [(15, 5, 0), (15, 2, 3), (7, 3, 9), (2, 1, 1)])
def test_bucket_order_is_the_buckets_one_after_the_other(k, buckets, step_):
    plan = Plan(approach="draco-lite", workers=3 * k, group_size=3, byzantine=0, mode="mean", f=0, buckets=buckets,
                seed=4)
    rows = np.random.default_rng(k).permutation(3 * k)[:k].astype(np.int64)
    from detox.attacks import TAG_BUCKETS, rng_for

    perm = rng_for(plan.seed, TAG_BUCKETS, step_).permutation(k)
    got = bucket_order(rows, perm, np.array(_bounds(k, buckets)))
    expected = _buckets(rows, plan, step_)
    assert np.array_equal(got, np.concatenate(expected) if expected is not None else rows[np.sort(perm)])


@pytest.mark.parametrize("perm,bounds", [([0, 1, 1], [0, 3]), ([0, 1], [0, 3]), ([0, 1, 2], [0, 2]),
                                         ([2, 1, 0], [1, 3]), ([0, 1, 2], [0, 2, 1, 3])])
def test_bucket_order_refuses_what_is_not_a_permutation_and_its_cut(perm, bounds):
    with pytest.raises(ValueError, match="bucket_order: perm must be a permutation"):
        bucket_order(np.arange(3), np.array(perm), np.array(bounds))


def test_permutation_is_numpys_bit_for_bit():
    from detox.kernels import permutation

    gen = np.random.default_rng(11)
    keys = [(0, 3, 0), (1, 3, 1), (2**32 - 1, 3, 2**32), (2**40, 3, 5), (0, 3, 2**33 + 5), (2**63 - 1, 3, 7),
            (5,), (1, 2, 3, 4, 5, 6)]  # words: one, two per integer; fewer and more than the pool's 4
    keys += [tuple(int(v) for v in gen.integers(0, 2**31, 3)) for _ in range(150)]
    for key in keys:
        for k in (0, 1, 2, 3, 15, 16, 17, 1000):
            expected = np.random.default_rng(np.random.SeedSequence(list(key))).permutation(k)
            assert np.array_equal(permutation(key, k), expected), (key, k)


@pytest.mark.parametrize("key,k", [([], 3), ([-1], 3), ([2**63], 3), ([1.5], 3), ([True], 3), ("ab", 3),
                                   ([1], -1), ([1], 2**32), ([1], 1.5)])
def test_permutation_refuses_keys_and_counts_out_of_range_in_one_line(key, k):
    from detox.kernels import permutation

    with pytest.raises(ValueError, match="permutation: ") as err:
        permutation(key, k)
    assert "\n" not in str(err.value)


def test_prepared_step_draws_the_buckets_numpy_draws_for_any_seed():
    # seeds the compiled permutation takes and one it leaves to numpy (>= 2^63): the same buckets either way
    grads, byz = hostile(45, 600, seed=6, dtype=torch.float32)
    for seed in (0, 7, 2**40, 2**63 + 5):
        plan = make_plan("median", "boyer-moore", 0.0, 45, 600, seed=seed)
        for i in (0, 1, 2**35, 2**64 + 3):  # a step past int64 draws from numpy
            fast = step(plan, grads, byz, i, None, general=False)
            slow = step(plan, grads, byz, i, None, general=True)
            assert same_bits(fast[0], slow[0]), (seed, i)
        assert approaches._PREPARED[id(plan)].compiled_shuffle == (seed < 2**63)


@pytest.mark.parametrize("rows,perm,bounds", [([0.5, 1.7], [0, 1], [0, 2]), ([[0, 1]], [0, 1], [0, 2]),
                                              ([0, 1], [0.0, 1.0], [0, 2]), ([0, 1], [0, 1], ["0", "2"])])
def test_bucket_order_refuses_what_is_not_integer_indices(rows, perm, bounds):
    with pytest.raises(ValueError, match="bucket_order: rows, perm and bounds must be 1-D arrays of integers"):
        bucket_order(np.array(rows), np.array(perm), np.array(bounds))


BULYAN_SETTINGS = [{}, {"theta": "original", "selection": "original", "average": "original", "neighbours": "original"},
                   {"selection": "original"}, {"average": "original"}, {"theta": 7, "neighbours": 3},
                   {"theta": "original", "neighbours": 2, "selection": "original"}]


def bulyan_rows(n: int, d: int, seed: int, kind: str) -> torch.Tensor:
    """n rows of a 2n-row matrix (the others never read: a row subset, as the vote's winners), with ``kind`` of
    hostile content: NaN, +inf or a squared norm that overflows float32 in some rows, duplicated rows (tied
    scores), a NaN in the first row (the ranking's differences are taken from it: every candidate ties, the first is
    taken and no centred squared norm is finite, so the rule's own path re-centres), every row non-finite, or a large
    common component (centring matters)."""
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((2 * n, d)).astype(np.float32)
    winners = np.arange(1, 2 * n, 2)
    if kind == "hostile":
        x[winners[2], 5] = np.nan
        x[winners[3], d - 1] = np.inf
        x[winners[4]] *= np.float32(1e20)
    elif kind == "ties":
        x[winners[2]] = x[winners[1]]
        x[winners[5]] = x[winners[1]]
    elif kind == "nan-first":
        x[winners[0], 0] = np.nan  # column 0 is always sampled
    elif kind == "none-finite":
        x[winners, d // 2] = np.inf
    elif kind == "offset":
        x += np.float32(1e4)
    return torch.from_numpy(x)


def bulyan_reference(grads: torch.Tensor, rows: np.ndarray, f: int, params: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The rows Bulyan selects and its output, computed step by step as before the selection was one compiled call:
    ``_distances`` (reference row, centred Gram matrix, re-centred on a finite row where need be), then the one-pass
    or the iterative choice, then the average over the selected rows."""
    from detox.aggregators import _bulyan_k, _closest_rows, _distances, _lowest, _middle_rows, _scores, _settings
    from detox.kernels import iterative_selection

    n = rows.shape[0]
    s, err = _settings("bulyan", n, f, params)
    assert err is None
    k, th = _bulyan_k(n, f, s), s["theta"]
    d2 = _distances(grads, k, rows)
    sel = (np.sort(_lowest(_scores(d2, k), th)) if s["selection"] == "original"
           else iterative_selection(d2, f, th, s["neighbours"]))
    chosen = rows[sel]
    if s["average"] == "original":
        return chosen, _middle_rows(grads, chosen, f, th - f)
    return chosen, _closest_rows(grads, chosen, th - 2 * f)


@pytest.mark.parametrize("params", BULYAN_SETTINGS)
@pytest.mark.parametrize("kind", ["plain", "hostile", "ties", "nan-first", "none-finite", "offset"])
@pytest.mark.parametrize("n,f,d", [(11, 2, 300), (15, 2, 5000), (19, 3, 4099)])
def test_bulyan_selects_in_one_call_what_it_selected_step_by_step(params, kind, n, f, d):
    # kernels.bulyan_selector (the rule's selection on the CPU, and DETOX-Bulyan's prepared stage) against the steps
    # it replaces: the same rows selected, the same bits out, on every path that reaches it
    from detox.aggregators import _bulyan_k, _sample_bounds, _settings, bulyan
    from detox.kernels import bulyan_selector

    grads = bulyan_rows(n, d, seed=n + d, kind=kind)
    rows = np.arange(1, 2 * n, 2, dtype=np.int64)
    s, _ = _settings("bulyan", n, f, params)
    select = bulyan_selector(n, d, f, s["theta"], _bulyan_k(n, f, s), s["neighbours"], s["selection"] != "original",
                             *_sample_bounds(d), torch.get_num_threads())
    chosen, expected = bulyan_reference(grads, rows, f, params)
    found = select(grads.numpy(), rows)
    if kind in ("nan-first", "none-finite"):
        assert found is None  # handed back: the rule re-centres on a finite row
    else:
        assert found.dtype == np.int64 and np.array_equal(found, chosen)
    stage = prepared_rule_stage("bulyan", n, f, params, d)
    for out in (None, torch.empty(d)):
        fast = stage(grads, rows, out)
        assert out is None or fast.data_ptr() == out.data_ptr()
        assert same_bits(fast, expected)
    assert same_bits(bulyan(grads, f, rows=rows, **params), expected)
    sub = grads[torch.from_numpy(rows)].contiguous()  # all rows of a matrix (rows=None)
    assert same_bits(bulyan(sub, f, **params), bulyan_reference(sub, np.arange(n), f, params)[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_bulyan_selection_where_its_gram_matrix_and_ranking_are_split_across_threads(threads):
    # 45 rows x 2^19 columns: the ranking's sample (16384 columns) and the Gram matrix both reach their thread
    # limits, so both run pooled on 2 threads (they round as the rule's own calls do on that many)
    from detox import kernels as K
    from detox.aggregators import _sample_bounds

    n, f, d = 45, 10, 1 << 19
    pairs = n * (n + 1) // 2 * K._SEGMENT * 8
    assert pairs >= K._SERIAL_PAIRS and K._gram_threads_d(2, d, n) == 2
    # the Bulyan output depends on the Gram matrix's bits only through near-ties, so the split is checked as such:
    # the selector's thread counts are those candidate_ranking and centred_gram would use
    x = np.empty((n, d), dtype=np.float32)
    for t in (1, 2):
        select = K.bulyan_selector(n, d, f, n - 2 * f, n - f - 2, None, True, *_sample_bounds(d), t)
        rank = min(K._threads(t, x, None, pairs, K._SERIAL_PAIRS), 8)
        assert select.threads == (rank, K._gram_threads(t, x, n)) == (t, t)
        small = K.bulyan_selector(15, 3000, 2, 11, 11, None, False, *_sample_bounds(3000), t)
        assert small.threads == (1, 1)
    grads = bulyan_rows(n, d, seed=9, kind="hostile")
    rows = np.arange(1, 2 * n, 2, dtype=np.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for params in BULYAN_SETTINGS[:2]:
            stage = prepared_rule_stage("bulyan", n, f, params, d)
            assert same_bits(stage(grads, rows, None), bulyan_reference(grads, rows, f, params)[1])
    finally:
        torch.set_num_threads(before)
