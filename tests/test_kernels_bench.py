"""The compiled kernels against plain numpy, and the benchmark command end to end (tiny sizes, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detox import bench
from detox import kernels as K
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


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 45])
def test_centred_gram_every_tile_shape(n: int) -> None:
    # rows in groups of 4 (diagonal blocks, 4 x 4 tiles, a 4 x 1 remainder per group, the last n % 4 rows pair by
    # pair): every entry of every shape, on a row subset, in several blocks and a ragged tail, serial and threaded
    x = RNG.standard_normal((n + 3, 2 * K.BLOCK * 4 + 37)).astype(np.float32)
    rows = np.arange(n + 3)[::-1][:n].copy()
    ref = x[rows[0]].copy()
    c = x[rows].astype(np.float64) - ref
    want = c @ c.T
    for threads in (1, 2):
        got = centred_gram(x, ref, threads, rows)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
        assert np.array_equal(got, got.T)
    # the float64 twin (the candidate ranking's segments) is exact to float64 rounding
    acc = np.empty((n, n))
    K._segment_gram(x, rows, 5, 5 + K._CHUNK + 9, np.empty((n, K._CHUNK)), acc)
    seg = x[rows, 5 : 5 + K._CHUNK + 9].astype(np.float64) - x[rows[0], 5 : 5 + K._CHUNK + 9]
    np.testing.assert_allclose(acc, seg @ seg.T, rtol=1e-12, atol=1e-9)


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
        assert s["read_after_fill_seconds"] > 0 and s["vote_x_read_after_fill"] > 0
        assert s["repeats"] == 50  # a few-ms step: at least 50 timed, whatever --repeats says
    md = out.with_suffix(".md").read_text()
    assert "| PS step (vote + buckets + rule) |" in md and "vanilla / DETOX" in md and "Load average" in md
    # the compute bound: the rule's least multiply-adds at the matmul rate measured in the same run
    rate = result["machine"]["fma_per_s"]
    assert rate > 1e8 and "× compute bound" in md and "Compute bound:" in md
    bounded = {r["rule"]: r for r in result["rules"] if "x_compute_bound" in r}
    assert set(bounded) == {"krum", "multi-krum", "bulyan", "geometric-median"}
    for r in bounded.values():
        assert r["compute_bound_seconds"] == pytest.approx(bench.MIN_FMA[r["rule"]](11, 2000) / rate)
        assert r["x_compute_bound"] == pytest.approx(r["seconds"] / r["compute_bound_seconds"])
        assert r["bound_x_floor"] == pytest.approx(r["compute_bound_seconds"] / r["floor_seconds"])


def test_least_multiply_adds_per_rule() -> None:
    # Krum-type: the n(n+1)/2 distinct Gram entries of d terms; a Weiszfeld iteration: two passes of n*d
    assert bench.MIN_FMA["krum"](45, 100_000) == 45 * 46 / 2 * 100_000 == bench.MIN_FMA["bulyan"](45, 100_000)
    assert bench.MIN_FMA["geometric-median"](45, 10) == 900
    assert "coord-median" not in bench.MIN_FMA  # comparisons, not multiply-adds: no compute bound claimed


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--repeats", "-3"], ["--n", "0"], ["--d", "0.5"],
                                  ["--workers", "2"]])
def test_bench_refuses_bad_counts_in_one_line(args: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as err:
        bench_main([*args, "--out", str(out)])
    assert err.value.code == 2 and not out.exists()
    assert "must be >= 1 and --workers >= 3" in capsys.readouterr().err


def test_bench_steps_alternate_vanilla_and_detox(monkeypatch: pytest.MonkeyPatch) -> None:
    # both approaches sampled under the same load: baseline, DETOX, baseline, DETOX, ... (not 51 of one, then the
    # other); at ResNet-18's size the --repeats given

    calls = []
    approaches = dict(bench.APPROACHES)

    def recorder(name):
        def call(*args, **kwargs):
            calls.append(name)
            return approaches[name](*args, **kwargs)
        return call

    monkeypatch.setattr(bench, "APPROACHES", {name: recorder(name) for name in approaches})
    (row,) = bench.bench_steps(45, 300, ["coord-median"], 2, "cpu")
    assert calls == ["baseline", "draco-lite"] * 51 and row["repeats"] == 50
    monkeypatch.setattr(bench, "_STEADY_ELEMS", 45 * 300)
    calls.clear()
    (row,) = bench.bench_steps(45, 300, ["coord-median"], 2, "cpu")
    assert calls == ["baseline", "draco-lite"] * 3 and row["repeats"] == 2


def test_compiled_bulyan_selection_equals_the_numpy_loop() -> None:
    # the same rows, ties included (small integer distances tie often; ties go to the lower row)
    from detox.aggregators import _iterative_selection_reference
    from detox.kernels import iterative_selection

    rng = np.random.default_rng(3)
    for trial in range(400):
        n = int(rng.integers(2, 60))
        d2 = rng.integers(0, 4, (n, n)).astype(float) if trial % 2 else rng.random((n, n)) * 1e3
        d2 = d2 + d2.T
        if trial % 5 == 0:
            d2[rng.integers(0, n)] = np.inf  # a hostile row: +inf from every other row
            d2[:, rng.integers(0, n)] = np.inf
        np.fill_diagonal(d2, np.inf)
        f, theta = int(rng.integers(0, n // 4 + 1)), int(rng.integers(1, n + 1))
        k_fixed = None if trial % 3 else int(rng.integers(0, n))
        np.testing.assert_array_equal(iterative_selection(d2, f, theta, k_fixed),
                                      _iterative_selection_reference(d2, f, theta, k_fixed))


def test_pairwise_sum_is_numpys() -> None:
    from detox.kernels import _pairwise_sum

    for n in [0, 1, 7, 8, 9, 127, 128, 129, 300, 1000, 4099]:
        a = RNG.random(n) * 10.0 ** RNG.uniform(-8, 8, n)
        assert _pairwise_sum(a, 0, n) == np.add.reduce(a)  # bit for bit, not approximately


def test_candidate_ranking_matches_float64_and_any_thread_count() -> None:
    from detox.kernels import candidate_ranking

    x = RNG.standard_normal((30, 40000)).astype(np.float32)
    x[7] += 5.0  # an outlier ranks last
    starts = np.arange(8, dtype=np.int64) * 5000
    ends = starts + 2048
    cols = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
    s = x[:, cols].astype(np.float64) - x[0, cols].astype(np.float64)
    g = s @ s.T
    d2 = np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g
    np.fill_diagonal(d2, np.inf)
    want = np.argsort(np.sort(d2, axis=1)[:, :10].sum(axis=1), kind="stable")
    got = [candidate_ranking(x, None, starts, ends, 10, threads) for threads in (1, 2)]
    np.testing.assert_array_equal(got[0], got[1])  # summed in segment order whatever the thread count
    np.testing.assert_array_equal(got[0], want)
    assert got[0][-1] == 7


def test_serial_twins_equal_the_pooled_kernels_on_one_thread() -> None:
    # below _SERIAL_ELEMS a kernel skips numba's thread pool; its result must be the pooled kernel's on 1 thread
    from detox import kernels as K

    x = RNG.standard_normal((9, 5000)).astype(np.float32)
    rows = np.array([0, 2, 3, 5, 8], dtype=np.int64)
    w = RNG.random(5)
    z = RNG.standard_normal(5000)
    net = K.selection_network(5, 1, 4)
    pairs = [
        (K._middle_mean_serial(x, rows, net, 1, 4, K.BLOCK, np.empty(5000, np.float32)),
         K._middle_mean(x, rows, net, 1, 4, K.BLOCK, 1, np.empty(5000, np.float32))),
        (K._closest_mean_serial(x, rows, K.sorting_network(5), 3, K.BLOCK, np.empty(5000, np.float32)),
         K._closest_mean(x, rows, K.sorting_network(5), 3, K.BLOCK, 1, np.empty(5000, np.float32))),
        (K._row_sq_dists_serial(x, rows, z), K._row_sq_dists(x, rows, z, 1)),
        (K._sign_votes_serial(x, rows), K._sign_votes(x, rows, 1)),
        (K._centred_gram_serial(x, rows, x[1], K.BLOCK * 4), K._centred_gram(x, rows, x[1], K.BLOCK * 4, 1)),
        (K._weighted_sum_serial(x, rows, w, np.empty(5000)), K._weighted_sum(x, rows, w, np.empty(5000), 1)),
    ]
    for serial, pooled in pairs:
        assert serial.tobytes() == pooled.tobytes()


@pytest.mark.parametrize("threads", [2, 3])
def test_order_statistic_kernels_split_columns_into_contiguous_shares_bit_for_bit(threads, tmp_path, monkeypatch):
    # each thread takes one contiguous, equal share of the columns (_col_range), cut into blocks (their last one
    # short where the share ends inside a block): every column's value is still the serial twin's, bit for bit.
    # d = 3 unrolled slices + 37: shares of 4108-4109 columns on 3 threads, one full slice and a short one each
    monkeypatch.setenv("DETOX_CACHE_DIR", str(tmp_path))
    K._unrolled.cache_clear()
    d = 3 * K._UNROLL_COLS + 37
    x = RNG.standard_normal((17, d)).astype(np.float32)
    for value in (np.nan, np.inf, -np.inf, -0.0):
        x[RNG.random(x.shape) < 0.02] = value
    rows = RNG.permutation(17)[:15].astype(np.int64)
    assert [K._col_range(d, threads, t) for t in range(threads)][-1][1] == d

    def out() -> np.ndarray:
        return np.full(d, 7.0, dtype=np.float32)  # a column no thread wrote stays 7.0 and fails the comparison

    net5, net15 = K.selection_network(5, 1, 4), K.selection_network(15, 7, 8)
    starts = np.array([0, 3, 6, 9, 12, 15], dtype=np.int64)
    w, dens = np.ones(15, dtype=np.float32), np.full(5, 3.0, dtype=np.float32)
    plain, buckets = K._unrolled(15, 7, 8), K._unrolled(5, 2, 3, (3, 3, 3, 3, 3))
    pairs = [
        (K._middle_mean_serial(x, rows, net15, 7, 8, K.BLOCK, out()),
         K._middle_mean(x, rows, net15, 7, 8, K.BLOCK, threads, out())),
        (K._closest_mean_serial(x, rows[:5], K.sorting_network(5), 3, K.BLOCK, out()),
         K._closest_mean(x, rows[:5], K.sorting_network(5), 3, K.BLOCK, threads, out())),
        (K._bucket_middle_mean_serial(x, rows, starts, w, dens, net5, 1, 4, K.BLOCK, out()),
         K._bucket_middle_mean(x, rows, starts, w, dens, net5, 1, 4, K.BLOCK, threads, out())),
        (plain.serial(x, rows, K._UNROLL_COLS, out()), plain.pooled(x, rows, K._UNROLL_COLS, threads, out())),
        (buckets.serial(x, rows, K._UNROLL_COLS, out()), buckets.pooled(x, rows, K._UNROLL_COLS, threads, out())),
        # the unrolled kernels and the block kernels compute the same values
        (plain.serial(x, rows, K._UNROLL_COLS, out()), K._middle_mean_serial(x, rows, net15, 7, 8, K.BLOCK, out())),
    ]
    for serial, pooled in pairs:
        assert not (serial == 7.0).any()
        assert serial.tobytes() == pooled.tobytes()
    K._unrolled.cache_clear()


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 15, 45])
def test_gram_centres_where_it_reads_bit_for_bit_as_a_centred_copy(n: int) -> None:
    # the Gram kernel subtracts the reference row where each tile reads a row, instead of writing a centred copy
    # of the block first: each pair's sum must be the copy's, bit for bit (Krum's choices and the committed
    # trajectories depend on its rounding), in every tile shape, block and thread share, NaN and inf included
    block = K.BLOCK * 4
    d = 3 * block + 37
    x = (100.0 + RNG.standard_normal((n + 2, d))).astype(np.float32)
    rows = RNG.permutation(n + 2)[:n].astype(np.int64)
    if n >= 3:  # a NaN and an inf row; the others' pairs stay finite
        x[rows[0], 5], x[rows[1], 9] = np.nan, np.inf
    ref = x[rows[-1]].copy()

    def copied(threads: int) -> np.ndarray:
        part = np.zeros((threads, n, n))
        for t in range(threads):
            lo, hi = K._block_range(d, block, threads, t)
            for b in range(lo, hi):
                a, e = b * block, min(d, (b + 1) * block)
                buf = np.ascontiguousarray(x[rows, a:e] - ref[a:e])  # float32, as the kernel subtracts
                K._gram_tiles(buf, np.arange(n), 0, e - a, None, np.float32(0.0), part[t])
        return K._mirror(part.sum(axis=0))

    assert K._centred_gram_serial(x, rows, ref, block).tobytes() == copied(1).tobytes()
    for threads in (2, 3):
        assert K._centred_gram(x, rows, ref, block, threads).tobytes() == copied(threads).tobytes()
    assert np.isfinite(copied(1)).sum() >= (n - 2) ** 2


def test_gram_split_rule_and_every_caller_that_must_round_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # a Gram matrix is split across threads from _SERIAL_PAIRS pair-columns or _SERIAL_GRAM elements read; the
    # split rounds differently, so centred_gram, gram_split and bucket_grams must all follow the one rule
    import numba
    import torch

    from detox import aggregators

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads (a split exists only with a pool)")
    wide = np.empty((1, 100_000), dtype=np.float32)
    assert K._gram_threads(2, wide, 15) == 2  # DETOX-Bulyan's 15 winners at the MLP twin's d: 1.5e6 elements
    assert K._gram_threads(2, wide, 8) == 1  # a DETOX-Multi-Krum bucket there: 8e5 elements, 3.6e6 pair-columns
    assert K._gram_threads(1, wide, 45) == 1  # one thread asked: none split
    assert K._gram_threads(2, np.empty((1, 1000), dtype=np.float32), 45) == 1  # 1.0e6 pair-columns, 4.5e4 read
    monkeypatch.setattr(K, "_SERIAL_GRAM", 1 << 62)  # either limit alone splits
    assert K._gram_threads(2, np.empty((1, 1 << 23), dtype=np.float32), 2) == 2  # 3 * 2^23 pair-columns
    assert K._gram_threads(2, np.empty((1, 1 << 22), dtype=np.float32), 2) == 1  # 3 * 2^22
    monkeypatch.setattr(K, "_SERIAL_GRAM", 1 << 20)
    monkeypatch.setattr(K, "_SERIAL_PAIRS", 1 << 62)
    assert K._gram_threads(2, np.empty((1, 1 << 19), dtype=np.float32), 2) == 2  # 2^20 elements read
    assert K._gram_threads(2, np.empty((1, (1 << 19) - 1), dtype=np.float32), 2) == 1
    # the callers, on a matrix small enough to test: limits lowered so that 6 rows split and 5 do not
    monkeypatch.setattr(K, "_SERIAL_PAIRS", 1 << 62)
    d = 5 * K.BLOCK * 4 + 37  # several column blocks per thread
    monkeypatch.setattr(K, "_SERIAL_GRAM", 6 * d)
    # a first block at scale 1, the others 2^-20..2^-29 (their products near float64's last bits), so that where
    # the partial sums meet decides the rounding
    rng = np.random.default_rng(0)
    scale = np.repeat(2.0 ** -rng.integers(20, 30, size=d // (K.BLOCK * 4) + 1), K.BLOCK * 4)[:d]
    scale[: K.BLOCK * 4] = 1.0
    x = ((3.0 + rng.standard_normal((12, d))) * scale).astype(np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, split in ((5, False), (6, True)):
            rows = np.arange(n, dtype=np.int64)
            pooled = K._centred_gram(x, rows, x[0], K.BLOCK * 4, 2)
            serial = K._centred_gram_serial(x, rows, x[0], K.BLOCK * 4)
            assert pooled.tobytes() != serial.tobytes()  # the split is visible in the bits
            assert K.centred_gram(x, x[0], 2, rows).tobytes() == (pooled if split else serial).tobytes()
            assert aggregators.gram_split(torch.from_numpy(x), n) == (2 if split else 1)
            found = K.bucket_grams(x, [rows, rows + 6], [1, 1], *aggregators._sample_bounds(d), 2)
            assert (found is None) == split  # split buckets run one by one, as centred_gram forms them
    finally:
        torch.set_num_threads(before)


def test_vote_pass_forms_no_gram_matrix_below_serial_pairs() -> None:
    # DETOX-Bulyan at d = 1e5: its 15-row matrix is split across threads, but the vote's pass (with its guess on
    # the first columns) costs more than it saves there; at ResNet-18's d it forms it
    import dataclasses

    import numba
    import torch

    from detox import approaches
    from detox.approaches import Plan

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads (the pass exists only where the Gram matrix is split)")
    plan = Plan(approach="draco-lite", workers=45, group_size=3, byzantine=5, mode="bulyan", f=1, inner="mean",
                inner_f=0, buckets=0, vote_tol=0.0, seed=0, vote="strict", layer_sizes=None)
    byz = np.zeros(45, dtype=bool)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for d, formed in ((100_000, False), (150_000, True)):  # 120 pairs x d against _SERIAL_PAIRS = 2^24
            x = torch.from_numpy(np.repeat(RNG.standard_normal((15, d)).astype(np.float32), 3, axis=0))
            assert approaches.gram_split(x, 15) == 2
            got = approaches._vote_with_grams(x, byz, dataclasses.replace(plan), 0)
            assert (got is not None) == formed
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rule", ["mean", "coord-median", "trimmed-mean", "krum", "multi-krum", "bulyan",
                                  "geometric-median", "sign-sgd"])
def test_rules_agree_on_the_pool_and_the_serial_twins(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serial-twin thresholds keep small tests off the thread pool: here every kernel is forced onto 2 threads
    and then onto its serial twin; the rules agree (exactly where no float sum is split across threads)."""
    import torch

    from detox import kernels as K
    from detox.aggregators import aggregate

    rng = np.random.default_rng(31)
    g = torch.from_numpy((rng.standard_normal((23, 20_000)) + 3 * rng.standard_normal(20_000)).astype(np.float32))
    f = 4 if rule == "bulyan" else 5
    got = {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for limit, label in ((0, "pool"), (1 << 62, "serial")):
            for name in ("_SERIAL_ELEMS", "_SERIAL_STREAM", "_SERIAL_PAIRS", "_SERIAL_GRAM"):
                monkeypatch.setattr(K, name, limit)
            monkeypatch.setattr(K._threads, "__defaults__", (None, limit))
            got[label] = aggregate(rule, g, f).numpy()
    finally:
        torch.set_num_threads(before)
    if rule in ("coord-median", "trimmed-mean", "mean", "sign-sgd", "krum"):
        assert got["pool"].tobytes() == got["serial"].tobytes()
    else:  # a Gram matrix or a float64 sum split across two threads rounds differently
        np.testing.assert_allclose(got["pool"], got["serial"], rtol=1e-5, atol=1e-6)


def _hostile(m: int, d: int) -> np.ndarray:
    """Rows with NaN, +-inf, -0.0 and 0.0, and integer ties (every branch of a compare-exchange)."""
    x = RNG.standard_normal((m, d)).astype(np.float32)
    for value in (np.nan, np.inf, -np.inf, -0.0, 0.0):
        x[RNG.random(x.shape) < 0.03] = value
    x[:, : d // 3] = np.round(x[:, : d // 3])
    return x


@pytest.mark.parametrize(("m", "lo", "hi"), [(5, 2, 3), (7, 2, 5), (4, 1, 3), (17, 8, 9), (45, 5, 40)])
def test_unrolled_networks_equal_the_block_kernel_bit_for_bit(m, lo, hi, tmp_path, monkeypatch) -> None:
    # above _UNROLL_ELEMS a network runs unrolled, or in segments above _UNROLL_ROWS inputs (generated, compiled
    # once, cached in DETOX_CACHE_DIR); it must give the block kernel's bits on both the pool and the serial twin
    # (d = 5000: 39 segment blocks and a tail of 8 columns)
    import detox.kernels as K

    monkeypatch.setenv("DETOX_CACHE_DIR", str(tmp_path))
    K._unrolled.cache_clear()
    x = _hostile(m + 2, 5000)
    rows = RNG.permutation(m + 2)[:m]
    block = {t: middle_mean(x, rows, lo, hi, threads=t) for t in (1, 2)}
    monkeypatch.setattr(K, "_UNROLL_ELEMS", 0)
    monkeypatch.setattr(K, "_SERIAL_ELEMS", 0)  # the pool even at this size
    for t in (1, 2):
        got = middle_mean(x, rows, lo, hi, threads=t)
        assert got.tobytes() == block[t].tobytes()
    kind = "segmented" if m > K._UNROLL_ROWS else "middle"
    assert (tmp_path / "networks" / f"{kind}_{m}_{lo}_{hi}_v{K._UNROLL_VERSION}.py").is_file()
    K._unrolled.cache_clear()


@pytest.mark.parametrize(("m", "beta"), [(9, 3), (35, 25)])
def test_sorted_networks_equal_the_closest_block_kernel_bit_for_bit(m, beta, tmp_path, monkeypatch) -> None:
    # Bulyan's closest-to-the-median average on large inputs: the full sorting network in segments (generated,
    # cached in DETOX_CACHE_DIR), then the block kernel's window; its bits on the pool and the serial twin
    import detox.kernels as K

    monkeypatch.setenv("DETOX_CACHE_DIR", str(tmp_path))
    K._sorted.cache_clear()
    x = _hostile(m + 2, 5000)
    rows = RNG.permutation(m + 2)[:m]
    block = {t: K.closest_mean(x, rows, beta, threads=t) for t in (1, 2)}
    monkeypatch.setattr(K, "_UNROLL_ELEMS", 0)
    monkeypatch.setattr(K, "_SERIAL_ELEMS", 0)
    for t in (1, 2):
        assert K.closest_mean(x, rows, beta, threads=t).tobytes() == block[t].tobytes()
    assert (tmp_path / "networks" / f"sorted_{m}_v{K._UNROLL_VERSION}.py").is_file()
    K._sorted.cache_clear()


@pytest.mark.parametrize(("m", "lo", "hi"), [(45, 22, 23), (45, 5, 40), (35, 0, 35), (17, 8, 9), (64, 31, 33)])
@pytest.mark.parametrize("wires", [4, 16])
def test_segments_keep_every_wires_order_and_their_bound(m, lo, hi, wires) -> None:
    import detox.kernels as K

    net = selection_network(m, lo, hi) if (lo, hi) != (0, m) else K.sorting_network(m)
    runs = K._segments(net, wires)
    order = [c for run, _ in runs for c in run]
    assert sorted(order) == list(range(len(net)))  # every compare-exchange, once
    for run, held in runs:
        assert len(held) <= wires and set(held) == {int(w) for c in run for w in net[c]}
    for wire in range(m):  # each wire meets its compare-exchanges in the network's order
        mine = [c for c in order if wire in net[c]]
        assert mine == sorted(mine)
    if wires == 16 and m == 45:  # what the segments are for: far fewer loads and stores than 4 per exchange
        assert sum(2 * len(held) for _, held in runs) < 4 * len(net) / 3


def test_unrolled_network_says_when_it_compiles_and_reuses_its_file(tmp_path, monkeypatch, caplog) -> None:
    # the first use on a machine compiles for a few seconds: one log line says so; a later process reuses the file
    import logging

    import detox.kernels as K

    monkeypatch.setenv("DETOX_CACHE_DIR", str(tmp_path))
    K._unrolled.cache_clear()
    with caplog.at_level(logging.INFO, logger="detox"):
        first = K._unrolled(3, 1, 2)
    assert first is not None and "selection network for 3 inputs" in caplog.text
    path = tmp_path / "networks" / f"middle_3_1_2_v{K._UNROLL_VERSION}.py"
    stamp = path.stat().st_mtime_ns
    caplog.clear()
    K._unrolled.cache_clear()  # as a new process would
    with caplog.at_level(logging.INFO, logger="detox"):
        assert K._unrolled(3, 1, 2) is not None
    assert caplog.text == "" and path.stat().st_mtime_ns == stamp
    K._unrolled.cache_clear()


def test_unrolled_network_falls_back_where_the_cache_is_not_writable(tmp_path, monkeypatch) -> None:
    import detox.kernels as K

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache directory would be: nothing can be created under it
    monkeypatch.setenv("DETOX_CACHE_DIR", str(blocker))
    monkeypatch.setattr(K, "_UNROLL_ELEMS", 0)
    K._unrolled.cache_clear()
    assert K._unrolled(5, 2, 3) is None
    x = _hostile(5, 3000)
    got = middle_mean(x, np.arange(5), 2, 3, threads=1)
    assert got.tobytes() == K._middle_mean_serial(x, np.arange(5), selection_network(5, 2, 3), 2, 3, K.BLOCK,
                                                  np.empty(3000, np.float32)).tobytes()
    K._unrolled.cache_clear()


# every argument that cannot run is refused in one line (exit 2) before any measurement; before, each of these
# failed with a traceback, most after minutes of measuring (or after asking for 4 TB), and wrote nothing
SMALL = ["--n", "5", "--d", "10", "--rules", "mean", "--step-rules", "coord-median", "--no-reference",
         "--workers", "15"]


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "1", "--rules", "krum"], "--n 1: too few rows for krum"),
    (["--d", "nan"], "--d nan: give a number of coordinates >= 1"),
    (["--d", "inf"], "--d inf: give a number of coordinates >= 1"),
    (["--d", "1e12"], "--n 5 --d 1e+12 --workers 15: the largest measurement needs about"),
    # the (n, n) distance matrices count too: this one hung in krum's own check of n (a 1e6 x 1e6 Gram)
    (["--n", "1000000", "--rules", "krum"], "--n 1000000 --d 10 --workers 15: the largest measurement needs about"),
    (["--workers", "16"], "--workers 16: the PS step's presets put workers in groups of 3"),
    (["--workers", "9"], "--workers 9: detox-coord-median refused: approach.buckets=5"),
    (["--step-rules", "mean"], "argument --step-rules: invalid choice: 'mean'"),
    (["--device", "foo"], "--device foo: not a device"),
    (["--device", "meta"], "--device meta: give cpu or cuda"),
])
def test_bench_refuses_what_cannot_run_before_measuring(args: list[str], message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:

    measured = []
    monkeypatch.setattr(bench, "bench_rules", lambda *a: measured.append(a) or [])
    monkeypatch.setattr(bench, "bench_steps", lambda *a: measured.append(a) or [])
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as err:
        bench_main([*SMALL, *args, "--out", str(out)])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and stderr[-1].startswith(f"python -m detox.bench: error: {message}"), stderr
    assert not measured and list(tmp_path.iterdir()) == []


def test_bench_f_is_one_every_rule_accepts_from_three_rows() -> None:
    # before: f = 5 for the median-type rules at any n, so `--n 5` (any n <= 10) stopped the run with a traceback
    # at coord-median, after the rules before it were measured; n = 15 and 45 keep f = 5 (bulyan: 3 at 15)
    import torch

    from detox.aggregators import AGGREGATORS
    from detox.bench import _f_for

    for rule, aggregate in AGGREGATORS.items():
        for n in range(3, 50):
            aggregate(torch.zeros((n, 2)), _f_for(rule, n))
        assert _f_for(rule, 45) == 5 and _f_for(rule, 15) == (3 if rule == "bulyan" else 5)


@pytest.mark.parametrize("where", ["folder", "missing", "file_parent", "md", "root", "dot"])
def test_bench_refuses_an_out_it_cannot_write_before_measuring(where: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:

    measured = []
    monkeypatch.setattr(bench, "bench_rules", lambda *a: measured.append(a) or [])
    (tmp_path / "afile").write_text("x")
    out = {"folder": tmp_path, "missing": tmp_path / "missing" / "b.json", "file_parent": tmp_path / "afile" / "b.json",
           "md": tmp_path / "b.md", "root": Path("/"), "dot": Path(".")}[where]  # last two: a traceback before
    with pytest.raises(SystemExit) as err:
        bench_main([*SMALL, "--out", str(out)])
    assert err.value.code == 2 and f"error: --out {out}: " in capsys.readouterr().err
    assert not measured and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_writes_its_files_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the JSON and the table are written to a temporary name and renamed: a failure leaves no half file

    monkeypatch.setattr(bench, "bench_rules", lambda *a: [])
    monkeypatch.setattr(bench, "bench_steps", lambda *a: [])
    monkeypatch.setattr(bench, "markdown", lambda result: (_ for _ in ()).throw(OSError("disk full")))
    out = tmp_path / "bench.json"
    with pytest.raises(OSError, match="disk full"):
        bench_main([*SMALL, "--out", str(out)])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # written whole; no .md, no temporary left
    assert json.loads(out.read_text())["rules"] == []
