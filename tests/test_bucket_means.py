"""Issue #15: DETOX's bucket means in one compiled pass equal the per-bucket ``mean`` rule bit for bit (float32 and
float64, uneven buckets, NaN payloads, +-inf, -0.0, column blocks and thread chunks crossed); and a middle rule
(coord-median, trimmed-mean) over those means in one fused pass equals the two steps bit for bit; and Multi-Krum
inside all buckets at once (the original's DETOX-Multi-Krum) equals the rule bucket by bucket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detox import aggregators, approaches
from detox import kernels as K
from detox.aggregators import (
    aggregate,
    bucket_means,
    bucket_multi_krum,
    mean_of_bucket_multi_krum,
    middle_of_bucket_means,
    multi_krum,
)
from detox.approaches import Plan, bucket_rows
from detox.attacks import TAG_BUCKETS, rng_for

NAN_PAYLOADS = (0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 8: torch.int64}[t.element_size()])


def hostile(rng: np.random.Generator, n: int, d: int, dtype: np.dtype) -> np.ndarray:
    """Rows of mixed scales, some holding NaNs with payloads, +-inf, -0.0 (whole rows or scattered)."""
    x = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-3, 4, size=(n, 1))).astype(dtype)
    x[rng.random((n, d)) < 0.01] = -0.0
    for r in rng.choice(n, size=min(n, 3), replace=False):
        kind = rng.integers(4)
        cols = rng.random(d) < (1.0 if kind == 0 else 0.02)
        if kind < 2:
            payload = NAN_PAYLOADS[rng.integers(len(NAN_PAYLOADS))]
            if dtype == np.float32:
                x[r].view(np.uint32)[cols] = payload
            else:
                x[r].view(np.uint64)[cols] = (payload & 0x80000000) << 32 | 0x7FF8000000000000 | (payload & 0xFF)
        else:
            x[r, cols] = np.inf if kind == 2 else -np.inf
    return x


def old_mean(g: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The mean rule as it was before it used the fused kernel: float32 sums in row order (``weighted_sum``), then
    torch's true division; float64: torch's mean of the gathered rows."""
    if g.dtype == torch.float32:
        return torch.from_numpy(K.weighted_sum(g.numpy(), np.ones(len(rows)), 1, rows=rows)).div_(len(rows))
    return g[torch.from_numpy(rows)].mean(dim=0)


def per_bucket(g: torch.Tensor, buckets: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([old_mean(g, b) for b in buckets])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_bucket_means_equal_the_per_bucket_rule(dtype: np.dtype) -> None:
    rng = np.random.default_rng(15)
    # d: one partial column block; several blocks; over the one-thread threshold with two chunks whose boundary
    # falls inside a column block
    for d in (37, 3 * 4096 + 5, 70_001):
        for _ in range(4):
            n = int(rng.integers(3, 20))
            x = torch.from_numpy(hostile(rng, n, d, dtype))
            k = int(rng.integers(2, n + 1))
            rows = rng.choice(n, size=k, replace=False)
            nb = int(rng.integers(1, k + 1))
            buckets = [rows[np.sort(c)] for c in np.array_split(rng.permutation(k), nb)]
            want = per_bucket(x, buckets)
            for threads in (1, 2):
                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    got = bucket_means(x, buckets)
                finally:
                    torch.set_num_threads(before)
                assert got.shape == (nb, d) and got.dtype == x.dtype
                assert torch.equal(bits(got), bits(want)), (d, n, [len(b) for b in buckets], threads)


def test_serial_twin_equals_the_pooled_kernel() -> None:
    rng = np.random.default_rng(3)
    x = hostile(rng, 9, 9000, np.float32)
    rows = np.array([8, 0, 3, 5, 1, 2, 7], dtype=np.int64)
    starts = np.array([0, 3, 5, 7], dtype=np.int64)
    w, dens = np.ones(7, np.float32), np.array([3, 2, 2], np.float32)
    dest = np.arange(3)
    serial = K._bucket_means_serial(x, rows, starts, w, dens, np.empty((3, 9000), np.float32), dest)
    for t in (1, 2):
        pooled = K._bucket_means(x, rows, starts, w, dens, np.empty((3, 9000), np.float32), dest, t)
        assert np.array_equal(serial.view(np.int32), pooled.view(np.int32))


def test_bad_buckets_are_refused() -> None:
    x = torch.zeros((4, 10))
    with pytest.raises(ValueError, match="rows must index the 4 rows"):
        bucket_means(x, [np.array([0, 1]), np.array([4])])
    with pytest.raises(ValueError, match="starts must run"):
        K.bucket_means(x.numpy(), np.array([0, 1], np.int64), np.array([0, 0, 2]), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucket_rows_equal_the_per_bucket_path(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """DETOX's bucket stage (the preset's mean inside) gives what the per-bucket calls gave before fusing, written
    into the vote's losing rows (as for large rows: the threshold is lowered to this test's rows)."""
    monkeypatch.setattr(approaches, "_INPLACE_BYTES", 0)
    rng = np.random.default_rng(7)
    x = torch.from_numpy(hostile(rng, 45, 5000, np.float64)).to(dtype)
    rows = np.sort(rng.choice(45, size=15, replace=False))
    for buckets in (2, 4, 5, 7):
        plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode="coord-median", f=2,
                    buckets=buckets, seed=11)
        for step in range(3):
            work = x.clone()
            out, spare = bucket_rows(work, rows, plan, step)
            perm = rng_for(plan.seed, TAG_BUCKETS, step).permutation(rows.shape[0])
            want = per_bucket(x, [rows[np.sort(c)] for c in np.array_split(perm, buckets)])
            # the means went into the first rows the vote did not keep; every other row is untouched
            assert out is work and np.array_equal(spare, np.setdiff1d(np.arange(45), rows)[:buckets])
            assert torch.equal(bits(out[torch.from_numpy(spare)]), bits(want))
            others = np.setdiff1d(np.arange(45), spare)
            assert torch.equal(bits(work[others]), bits(x[others]))


def test_small_rows_stack_fresh_outputs() -> None:
    """Below the in-place threshold the bucket outputs are a fresh stacked tensor and the matrix is left alone."""
    rng = np.random.default_rng(8)
    x = torch.from_numpy(hostile(rng, 45, 500, np.float32))
    rows = np.arange(0, 45, 3)
    plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode="coord-median", f=2, buckets=5)
    work = x.clone()
    out, none = bucket_rows(work, rows, plan, 0)
    assert none is None and out.shape == (5, 500) and torch.equal(bits(work), bits(x))


# ------------------------------------------------------------------ a middle rule over the bucket means, fused


def two_steps(mode: str, g: torch.Tensor, buckets: list[np.ndarray], f: int) -> torch.Tensor:
    """What DETOX computed before the fusion: the bucket means stacked, then the rule over them."""
    return aggregate(mode, bucket_means(g, buckets), f)


@pytest.mark.parametrize("threads", [1, 2])
def test_middle_of_bucket_means_equals_the_two_steps(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the pooled twin too: its threshold lowered to these sizes
    monkeypatch.setattr(K, "_SERIAL_BUCKETS", 0 if threads == 2 else 1 << 40)
    rng = np.random.default_rng(21)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # d: a partial block; several blocks and a remainder (2048 columns per block); odd counts split by threads
        for d in (5, 2 * K._BUCKET_BLOCK + 7, 3 * K._BUCKET_BLOCK):
            for _ in range(6):
                x = torch.from_numpy(hostile(rng, 30, d, np.float32))
                x[rng.integers(30), : d // 2] = x[rng.integers(30), : d // 2]  # ties across buckets
                k = int(rng.integers(3, 31))
                rows = rng.choice(30, size=k, replace=False)
                nb = int(rng.integers(1, k + 1))
                buckets = [rows[np.sort(c)] for c in np.array_split(rng.permutation(k), nb)]
                for mode, f in (("coord-median", 0), ("trimmed-mean", (nb - 1) // 2), ("trimmed-mean", 0)):
                    want = two_steps(mode, x, buckets, f)
                    got = middle_of_bucket_means(mode, x, buckets, f)
                    assert torch.equal(bits(got), bits(want)), (mode, d, nb, f, threads)
                    out = torch.empty(d)
                    assert middle_of_bucket_means(mode, x, buckets, f, out=out) is not None
                    assert torch.equal(bits(out), bits(want))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("sizes", "mode", "f"), [((3, 3, 3, 3, 3), "coord-median", 0),
                                                 ((4, 4, 3, 3, 3), "trimmed-mean", 1),
                                                 ((2, 1), "coord-median", 0)])
def test_unrolled_middle_of_bucket_means_equals_the_two_steps(sizes: tuple[int, ...], mode: str, f: int,
                                                              tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above _UNROLL_ELEMS the bucket means and the network run in one generated kernel (each column's values in
    registers; compiled once per layout and cached in DETOX_CACHE_DIR): bit for bit the two steps, on one thread
    and on two, with -0.0 sums (+0.0 + -0.0 is +0.0), NaN payloads and infinities."""
    monkeypatch.setenv("DETOX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "_UNROLL_ELEMS", 0)
    K._unrolled.cache_clear()
    rng = np.random.default_rng(24)
    d = 2 * K._BUCKET_BLOCK + 5
    x = torch.from_numpy(hostile(rng, 20, d, np.float32))
    x[3] = -0.0  # a bucket of negative zeros, and rows that are negative zero on half their columns
    x[7, : d // 2] = -0.0
    x[8, : d // 2] = -0.0
    rows = np.array([3, 7, 8, 0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17])[: sum(sizes)]
    buckets = np.split(rows, np.cumsum(sizes)[:-1])
    want = two_steps(mode, x, buckets, f)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setattr(K, "_SERIAL_BUCKETS", 1 << 40 if threads == 1 else 0)
            got = middle_of_bucket_means(mode, x, buckets, f)
            assert torch.equal(bits(got), bits(want)), (sizes, threads)
    finally:
        torch.set_num_threads(before)
    assert list((tmp_path / "networks").glob(f"buckets_{'x'.join(map(str, sizes))}_*.py"))
    K._unrolled.cache_clear()


def test_middle_of_bucket_means_off_the_kernels_path_takes_the_two_steps() -> None:
    rng = np.random.default_rng(22)
    x = torch.from_numpy(hostile(rng, 12, 300, np.float64))
    buckets = [np.array([0, 4, 5]), np.array([1, 7]), np.array([2, 3, 11])]
    for mode in ("coord-median", "trimmed-mean"):
        assert torch.equal(bits(middle_of_bucket_means(mode, x, buckets, 1 if mode == "trimmed-mean" else 0)),
                           bits(two_steps(mode, x, buckets, 1 if mode == "trimmed-mean" else 0)))


def test_middle_of_bucket_means_refuses_what_the_two_steps_refuse() -> None:
    x = torch.zeros((6, 10))
    buckets = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    for bad in ([np.array([0, 1]), np.array([6])], [np.array([0, 1]), np.array([], dtype=np.int64)]):
        with pytest.raises(ValueError) as fused:
            middle_of_bucket_means("coord-median", x, bad, 0)
        with pytest.raises(ValueError) as steps:
            two_steps("coord-median", x, bad, 0)
        assert str(fused.value) == str(steps.value)
    with pytest.raises(ValueError, match="trimmed-mean needs") as fused:
        middle_of_bucket_means("trimmed-mean", x, buckets, 2)
    with pytest.raises(ValueError) as steps:
        two_steps("trimmed-mean", x, buckets, 2)
    assert str(fused.value) == str(steps.value)
    with pytest.raises(ValueError, match="overlaps rows the rule reads"):
        middle_of_bucket_means("coord-median", x, buckets, 0, out=x[3])
    with pytest.raises(ValueError, match="not one of"):
        middle_of_bucket_means("krum", x, buckets, 0)


@pytest.mark.parametrize("mode", ["coord-median", "trimmed-mean"])
def test_detox_with_mean_buckets_equals_the_bucket_stage_then_the_rule(mode: str) -> None:
    """draco-lite's fused path gives, bit for bit, what bucket_rows + the rule give (the path every other
    combination still takes)."""
    rng = np.random.default_rng(23)
    x = torch.from_numpy(hostile(rng, 45, 3000, np.float32))
    byz = np.zeros(45, dtype=bool)
    for buckets in (3, 5, 7):
        plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode=mode, f=1, buckets=buckets,
                    seed=5)
        for step in range(3):
            got, _ = approaches.draco_lite(x.clone(), byz, plan, step)
            work = x.clone()
            votes = approaches.vote_rows(work, 3)
            inputs, rows = bucket_rows(work, votes.rows, plan, step)
            want = aggregate(mode, inputs, plan.f, rows=rows)
            assert torch.equal(bits(got), bits(want)), (mode, buckets, step)


# ------------------------------------------------------------------ Multi-Krum inside the buckets, side by side


def mk_rows(rng: np.random.Generator, n: int, d: int, clean: bool) -> torch.Tensor:
    if clean:  # a shared direction plus noise: distances that separate the rows
        return torch.from_numpy((rng.standard_normal(d) + 0.5 * rng.standard_normal((n, d))).astype(np.float32))
    return torch.from_numpy(hostile(rng, n, d, np.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("side_by_side", [True, False])
def test_bucket_multi_krum_equals_the_rule_bucket_by_bucket(threads: int, side_by_side: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # side_by_side False: every bucket counts as big enough to split across threads, so they run one by one
    if not side_by_side:
        monkeypatch.setattr(K, "_SERIAL_PAIRS", 0)
    rng = np.random.default_rng(31)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for d in (9, 3000, 30_000):
            for trial in range(6):
                x = mk_rows(rng, 45, d, clean=trial % 2 == 0)
                k = int(rng.integers(15, 31))
                rows = rng.choice(45, size=k, replace=False)
                nb = int(rng.integers(1, 4))
                buckets = [rows[np.sort(c)] for c in np.array_split(rng.permutation(k), nb)]
                f, params = int(rng.integers(0, 3)), [{}, {"m": "original"}, {"m": 3, "neighbours": 2}][trial % 3]
                found = K.bucket_grams(x.numpy(), buckets, [1] * nb, *aggregators._sample_bounds(d), threads)
                assert (found is not None) == (side_by_side or threads == 1)
                want = torch.stack([multi_krum(x, f, rows=b, **params) for b in buckets])
                got = bucket_multi_krum(x, buckets, f, params)
                assert torch.equal(bits(got), bits(want)), (d, trial, threads)
                spare = np.setdiff1d(np.arange(45), rows)[:nb]
                work = x.clone()
                assert bucket_multi_krum(work, buckets, f, params, dest=spare) is work
                assert torch.equal(bits(work[torch.from_numpy(spare)]), bits(want))
                others = np.setdiff1d(np.arange(45), spare)
                assert torch.equal(bits(work[others]), bits(x[others]))
    finally:
        torch.set_num_threads(before)


def test_bucket_multi_krum_with_a_hostile_reference_row_takes_the_rules_fallback() -> None:
    """The best-ranked row carries a NaN outside the sampled columns: its Gram matrix has no finite diagonal and the
    bucket is recentred on a finite row, as multi_krum does."""
    rng = np.random.default_rng(32)
    d = 30_000
    centre = rng.standard_normal(d).astype(np.float32)
    x = torch.from_numpy(centre + 0.5 * rng.standard_normal((12, d)).astype(np.float32))
    x[4] = torch.from_numpy(centre)  # the closest to everyone: ranked first
    starts, ends = aggregators._sample_bounds(d)
    outside = next(c for c in range(d) if not ((starts <= c) & (c < ends)).any())
    x[4, outside] = float("nan")
    buckets = [np.array([0, 2, 4, 6, 8, 10]), np.array([1, 3, 5, 7, 9, 11])]
    refs, grams = K.bucket_grams(x.numpy(), buckets, [3, 3], starts, ends, 2)
    assert refs[0] == 4 and not np.isfinite(np.diagonal(grams[0])).any()
    want = torch.stack([multi_krum(x, 1, rows=b) for b in buckets])
    assert torch.equal(bits(bucket_multi_krum(x, buckets, 1)), bits(want))
    assert torch.isfinite(want).all()  # the NaN row was not selected


def test_bucket_multi_krum_refuses_bad_input() -> None:
    x = torch.randn(12, 50)
    buckets = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])]
    with pytest.raises(ValueError, match="multi-krum needs"):
        bucket_multi_krum(x, buckets, 2)
    with pytest.raises(ValueError, match="rows must index the 12 rows"):
        bucket_multi_krum(x, [np.array([0, 1, 2, 3, 12])], 0)
    for dest in (np.array([10]), np.array([10, 10]), np.array([4, 11]), np.array([10, 12])):
        with pytest.raises(ValueError, match="dest must be 2 distinct rows of grads outside every bucket"):
            bucket_multi_krum(x, buckets, 1, dest=dest)


def test_detox_multi_krum_buckets_equal_the_bucket_by_bucket_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(33)
    x = mk_rows(rng, 45, 4000, clean=True)
    byz = np.zeros(45, dtype=bool)
    plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode="mean", f=0, buckets=2, seed=3,
                inner="multi-krum", inner_f=2, inner_params={"m": "original"})
    got = [approaches.draco_lite(x.clone(), byz, plan, step)[0] for step in range(3)]
    # the per-bucket loop of bucket_rows, then the mean rule over its stacked outputs
    monkeypatch.setattr(approaches, "_fused", lambda plan: None)
    monkeypatch.delitem(aggregators.BUCKETED, "multi-krum")
    for step, agg in enumerate(got):
        assert torch.equal(bits(agg), bits(approaches.draco_lite(x.clone(), byz, plan, step)[0]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("side_by_side", [True, False])
def test_mean_of_bucket_multi_krum_equals_the_two_steps(threads: int, side_by_side: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """DETOX-Multi-Krum's bucket stage in one pass (the bucket outputs never written) equals Multi-Krum bucket by
    bucket and then the mean rule over the stacked outputs."""
    if not side_by_side:
        monkeypatch.setattr(K, "_SERIAL_PAIRS", 0)
    monkeypatch.setattr(K, "_SERIAL_STREAM", 0 if threads == 2 else 1 << 40)  # the pooled sums too
    rng = np.random.default_rng(34)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for d in (9, 5000, 3 * K._COLS + 11):
            for trial in range(4):
                x = mk_rows(rng, 45, d, clean=trial % 2 == 0)
                rows = rng.choice(45, size=15, replace=False)
                nb = int(rng.integers(1, 3))
                buckets = [rows[np.sort(c)] for c in np.array_split(rng.permutation(15), nb)]
                params = [{"m": "original"}, {}][trial % 2]
                stacked = torch.stack([multi_krum(x, 1, rows=b, **params) for b in buckets])
                want = aggregate("mean", stacked, 0)
                got = mean_of_bucket_multi_krum(x, buckets, 1, params)
                assert torch.equal(bits(got), bits(want)), (d, trial, threads, side_by_side)
                out = torch.empty(d)
                mean_of_bucket_multi_krum(x, buckets, 1, params, out=out)
                assert torch.equal(bits(out), bits(want))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_multi_krum_means_mean_is_one_call_and_the_two_steps(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled stage (``kernels.multi_krum_means_mean``) runs where the buckets' matrices are not split, and
    gives the two steps' bits: neighbour counts above 8 (numpy's pairwise sum) and above the bucket, m from 1 to
    n, tied scores (duplicate rows), hostile rows; where every row of a bucket has a non-finite squared norm it
    leaves the bucket to the rule's own path (None), and the step's result is still the two steps'."""
    monkeypatch.setattr(K, "_SERIAL_STREAM", 0 if threads == 2 else 1 << 40)
    rng = np.random.default_rng(35)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for d in (7, 3 * K._COLS + 11):
            for trial in range(8):
                x = mk_rows(rng, 45, d, clean=trial % 2 == 0)
                x[40:43] = x[39]  # a tie: three identical rows
                rows = np.concatenate([rng.choice(39, size=17, replace=False), [39, 40, 41]])
                nb = int(rng.integers(1, 4))
                buckets = [rows[np.sort(c)] for c in np.array_split(rng.permutation(20), nb)]
                small = min(len(b) for b in buckets)
                params = [{}, {"m": "original"}, {"m": 1, "neighbours": small - 1}, {"m": small, "neighbours": 1},
                          {"neighbours": 9}][trial % 5]
                f = 0 if trial % 5 == 4 else 1
                want = aggregate("mean", torch.stack([multi_krum(x, f, rows=b, **params) for b in buckets]), 0)
                checks = [aggregators._check("multi-krum", x, f, params, b) for b in buckets]
                got = K.multi_krum_means_mean(x.numpy(), [c[4] for c in checks], [c[2]["neighbours"] for c in checks],
                                              [c[2]["m"] for c in checks],
                                              *aggregators._sample_bounds(d), threads)
                assert got is not None, (d, trial)
                assert torch.equal(bits(torch.from_numpy(got)), bits(want)), (d, trial, threads)
                assert torch.equal(bits(mean_of_bucket_multi_krum(x, buckets, f, params)), bits(want))
        # a bucket whose rows all overflow: no finite squared norm to centre on
        x = mk_rows(rng, 45, 300, clean=True)
        buckets = [np.arange(0, 7), np.arange(7, 14)]
        x[7:14] = torch.tensor([np.inf, 1.0, -np.inf]).repeat(100)
        checks = [aggregators._check("multi-krum", x, 1, {}, b) for b in buckets]
        assert K.multi_krum_means_mean(x.numpy(), [c[4] for c in checks], [c[2]["neighbours"] for c in checks],
                                       [c[2]["m"] for c in checks],
                                       *aggregators._sample_bounds(300), threads) is None
        want = aggregate("mean", torch.stack([multi_krum(x, 1, rows=b) for b in buckets]), 0)
        assert torch.equal(bits(mean_of_bucket_multi_krum(x, buckets, 1)), bits(want))
        with pytest.raises(ValueError, match="neighbours must be in"):
            K.multi_krum_means_mean(x.numpy(), [c[4] for c in checks], [7, 3], [1, 1], *aggregators._sample_bounds(300),
                                    threads)
        for ms in ([0, 1], [1, 8], [1]):
            with pytest.raises(ValueError, match="m must be in"):
                K.multi_krum_means_mean(x.numpy(), [c[4] for c in checks], [3, 3], ms, *aggregators._sample_bounds(300),
                                        threads)
    finally:
        torch.set_num_threads(before)


def test_mean_of_bucket_multi_krum_refuses_what_the_two_steps_refuse() -> None:
    x = torch.randn(12, 50)
    buckets = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])]
    for args in ((2, None, 0, None), (1, None, 0, {"bad": 1}), (1, {"m": 9}, 0, None)):
        with pytest.raises(ValueError) as fused:
            mean_of_bucket_multi_krum(x, buckets, *args)
        with pytest.raises(ValueError) as steps:
            aggregate("mean", bucket_multi_krum(x, buckets, args[0], args[1]), args[2], args[3])
        assert str(fused.value) == str(steps.value)
    with pytest.raises(ValueError, match="overlaps rows the rule reads"):
        mean_of_bucket_multi_krum(x, buckets, 1, out=x[7])
    assert torch.equal(mean_of_bucket_multi_krum(x, buckets, 1, out=x[11]), x[11])  # a row no bucket reads


@pytest.mark.parametrize("call", [
    lambda x, b: bucket_means(x, b),
    lambda x, b: bucket_multi_krum(x, b, 0),
    lambda x, b: middle_of_bucket_means("coord-median", x, b, 0),
    lambda x, b: mean_of_bucket_multi_krum(x, b, 0),
])
def test_no_buckets_is_one_clear_error(call) -> None:
    x = torch.randn(6, 10)
    for bad in ([], (), np.array([0, 1]), None):
        with pytest.raises(ValueError, match="buckets must be a non-empty list of row-index arrays"):
            call(x, bad)
