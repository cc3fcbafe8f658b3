"""Issue #15: a rule writes its aggregate into ``out`` (the PS's persistent buffer, or a row of the gradient matrix
the rule does not read: DETOX's bucket outputs go into the vote's losing rows) bit for bit as it returns a fresh
tensor, and refuses an ``out`` that overlaps the rows it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detox import kernels as K
from detox.aggregators import AGGREGATORS, aggregate, bucket_means

PARAMS = {"multi-krum": {"m": "original"}, "bulyan": {"selection": "original", "average": "original"},
          "geometric-median": {"max_iter": 50}}
F = {"mean": 0, "sign-sgd": 1, "krum": 2, "multi-krum": 2, "bulyan": 1}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 8: torch.int64}[t.element_size()])


def matrix(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d)) + rng.standard_normal(d)
    g[n - 1, :: 7] = np.nan  # a hostile row: NaNs must stay where the rule put them
    return torch.from_numpy(g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
def test_out_equals_the_fresh_result(rule: str, dtype: torch.dtype) -> None:
    # d over the one-thread threshold (70k elements) and under it; rows: all, or a subset leaving spare rows
    for n, d in ((12, 9000), (12, 37)):
        g = matrix(n, d, dtype)
        f, params = F.get(rule, 2), PARAMS.get(rule, {})
        if rule == "bulyan":
            params = {**params, "average": "literature"} if d == 37 else params
        for rows in (None, np.array([0, 2, 3, 5, 6, 7, 8, 10, 11])):
            want = aggregate(rule, g.clone(), f, params, rows=rows)
            buf = torch.full((d,), 7.0, dtype=dtype)
            got = aggregate(rule, g, f, params, rows=rows, out=buf)
            assert got.data_ptr() == buf.data_ptr() and torch.equal(bits(got), bits(want)), (rule, n, d, rows)
            if rows is not None:  # into a row the rule does not read: that row changes, no other
                work = g.clone()
                got = aggregate(rule, work, f, params, rows=rows, out=work[9])
                assert got.data_ptr() == work[9].data_ptr() and torch.equal(bits(got), bits(want))
                others = np.setdiff1d(np.arange(n), [9])
                assert torch.equal(bits(work[others]), bits(g[others]))


def test_out_that_overlaps_the_rows_read_is_refused() -> None:
    g = matrix(6, 100, torch.float32)
    flat = g.view(-1)
    for rows, out, why in (
        (None, g[2], "overlaps rows the rule reads"),                    # every row is read
        (np.array([0, 2, 4]), g[2], "overlaps rows the rule reads"),     # a row that is read
        (np.array([0, 2, 4]), flat[150:250], "overlaps rows the rule reads"),  # straddles rows 1 and 2
        (None, torch.empty(99), "out must be a contiguous \\(100,\\) torch.float32 tensor"),
        (None, torch.empty(100, dtype=torch.float64), "out must be a contiguous"),
        (None, torch.empty(200)[::2], "out must be a contiguous"),
        (None, np.empty(100, np.float32), "out must be a contiguous"),
    ):
        before = g.clone()
        for rule in ("mean", "coord-median", "multi-krum", "sign-sgd"):
            with pytest.raises(ValueError, match=why):
                aggregate(rule, g, 1, PARAMS.get(rule, {}), rows=rows, out=out)
        assert torch.equal(bits(g), bits(before))  # refused before any work


def test_bucket_means_into_rows_of_the_matrix() -> None:
    g = matrix(10, 5000, torch.float32)
    buckets = [np.array([0, 3]), np.array([1, 4, 5]), np.array([8])]
    want = bucket_means(g.clone(), buckets)
    work = g.clone()
    assert bucket_means(work, buckets, dest=np.array([9, 2, 6])) is work
    assert torch.equal(bits(work[[9, 2, 6]]), bits(want))
    assert torch.equal(bits(work[[0, 1, 3, 4, 5, 7, 8]]), bits(g[[0, 1, 3, 4, 5, 7, 8]]))
    for dest, why in ((np.array([9, 3, 6]), "outside every bucket"), (np.array([9, 9, 6]), "distinct"),
                      (np.array([9, 2]), "distinct"), (np.array([9, 2, 10]), "outside every bucket")):
        with pytest.raises(ValueError, match=why):
            bucket_means(g.clone(), buckets, dest=dest)
    with pytest.raises(ValueError, match="none of them read"):
        K.bucket_means(g.numpy(), np.array([0, 3, 1]), np.array([0, 2, 3]), 1, out=g.numpy(), dest=np.array([7, 1]))
