"""device=cuda (issue #14 item 3): the rules and the local engine on a GPU agree with the CPU.

Skipped, with the reason, where torch sees no CUDA device (CI and the development machines have none); run on a
GPU machine with ``python -m pytest tests/test_cuda.py``. The rules take torch's paths on the GPU (the numba
kernels are CPU-only), so agreement is to float32 round-off, not bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg, read_metrics, run_job
from test_vote_rows import random_groups

from detox import aggregators
from detox.aggregators import AGGREGATORS, aggregate
from detox.approaches import APPROACHES, plan_from_cfg, vote_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none here)")

# every rule with its literature and original parameters (n = 45, f = 5: every rule's requirement holds)
RULES = [(name, {}) for name in AGGREGATORS] + [
    ("multi-krum", {"m": "original", "neighbours": "original"}),
    ("bulyan", {"theta": "original", "selection": "original", "average": "original", "neighbours": "original"}),
]


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a common offset plus spread, and 5 far-away Byzantine rows, so selections are not ties
    x = 3.0 + torch.randn(n, d, generator=g)
    x[:5] *= -20.0
    return x


@pytest.mark.parametrize(("rule", "params"), RULES, ids=[f"{r}-{'-'.join(p.values()) or 'literature'}"
                                                          for r, p in RULES])
def test_rule_on_gpu_matches_cpu(rule: str, params: dict) -> None:
    x = _rows(45, 100_000, seed=1)
    cpu = aggregate(rule, x, 5, params)
    gpu = aggregate(rule, x.cuda(), 5, params)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rule", "params"), RULES, ids=[f"{r}-{'-'.join(p.values()) or 'literature'}"
                                                          for r, p in RULES])
def test_rule_on_gpu_in_many_blocks_matches_cpu(rule: str, params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # a GPU's blocks hold 2**25 elements: shrunk here to 4093 columns at n = 45, so d = 1e5 is 24 blocks and a tail
    monkeypatch.setattr(aggregators, "_GPU_BLOCK_ELEMS", 45 * 4093)
    x = _rows(45, 100_000, seed=4)
    torch.testing.assert_close(aggregate(rule, x.cuda(), 5, params).cpu(), aggregate(rule, x, 5, params),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["coord-median", "trimmed-mean"])
def test_negative_nans_sort_above_inf_on_gpu(rule: str) -> None:
    # CUDA's radix sort puts NaNs with the sign bit first (pytorch/pytorch#190781): 5 rows of them would then be
    # trimmed as the smallest values instead of the largest, and the trimmed mean would change
    x = _rows(45, 10_000, seed=5)
    x[40:, ::3] = -float("nan")
    assert torch.signbit(x[40:, ::3]).all()
    torch.testing.assert_close(aggregate(rule, x.cuda(), 5).cpu(), aggregate(rule, x, 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vote", ["strict", "boyer-moore"])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_vote_rows_on_gpu_equal_the_compiled_vote(vote: str, tol: float) -> None:
    # random groups with near-misses, NaN payloads, -0.0, splices and ties (tests/test_vote_rows.py)
    rng = np.random.default_rng([11, len(vote), int(tol * 1e6)])
    for _ in range(60):
        g, r, honest, sizes = random_groups(rng)
        layers = sizes if vote == "boyer-moore" else None
        got_g, want_g = g.cuda(), g.clone()
        got = vote_rows(got_g, r, tol, vote, layers, honest)
        want = vote_rows(want_g, r, tol, vote, layers, honest)
        assert np.array_equal(got.rows, want.rows) and np.array_equal(got.win_rows, want.win_rows)
        assert (got.fallbacks, got.corrupted) == (want.fallbacks, want.corrupted)
        # the fallback medians and assembled vectors written into first rows (a mean of two may round apart)
        torch.testing.assert_close(got_g.cpu(), want_g, rtol=1e-6, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("approach", ["maj_vote", "draco-lite"])
def test_vote_on_gpu_matches_cpu(approach: str) -> None:
    cfg = make_cfg([f"approach={approach}", "workers=45", "worker_fail=5", "group_size=3"])
    plan = plan_from_cfg(cfg)
    groups = _rows(15, 10_000, seed=2)
    x = groups.repeat_interleave(3, dim=0)
    x[[1, 7, 8, 20]] = 1e3  # group 2 outvoted (7, 8), three groups with one liar
    byz = torch.zeros(45, dtype=torch.bool)
    byz[[1, 7, 8, 20]] = True
    cpu, dcpu = APPROACHES[approach](x.clone(), byz.numpy(), plan, 0)
    gpu, dgpu = APPROACHES[approach](x.cuda(), byz.numpy(), plan, 0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    assert (dgpu["corrupted_groups"], dgpu["vote_fallbacks"]) == (dcpu["corrupted_groups"], dcpu["vote_fallbacks"])


def test_local_engine_trains_on_gpu_like_on_cpu(tmp_path: Path) -> None:
    job = ["max_steps=60", "eval_freq=20", "seed=3"]
    cpu = run_job([*job, "device=cpu"], tmp_path / "cpu")
    gpu = run_job([*job, "device=cuda"], tmp_path / "gpu")
    assert cpu["status"] == gpu["status"] == "completed"
    a, b = read_metrics(tmp_path / "cpu"), read_metrics(tmp_path / "gpu")
    assert a[0]["test_loss"] == pytest.approx(b[0]["test_loss"], rel=1e-5)  # same initial weights and data
    # cuBLAS sums in another order: trajectories drift by round-off, not by behaviour
    assert abs(cpu["final_test_acc"] - gpu["final_test_acc"]) < 0.03
    assert [r["corrupted_groups"] for r in a] == [r["corrupted_groups"] for r in b]


def test_gpu_run_is_repeatable(tmp_path: Path) -> None:
    # same seed, same trajectory on the GPU too (cuDNN deterministic, no autotuning: detox.trainer.setup)
    job = ["network=lenet", "dataset=synthetic", "dataset.shape=[1,28,28]", "max_steps=30", "eval_freq=10", "seed=4",
           "device=cuda"]
    a, b = run_job(job, tmp_path / "a"), run_job(job, tmp_path / "b")
    assert a["final_test_acc"] == b["final_test_acc"]
    drop = ("t_", "cluster_time", "wall_time", "eval_time")  # timings
    same = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "a")]
    assert same == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "b")]
