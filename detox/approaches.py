"""Approaches (DESIGN §3): how the P worker gradients become the input of the robust rule.

* ``baseline``   — ``mode`` over all P gradients with f = q.
* ``maj_vote``   — per group of r the majority vector, then the mean of the P/r winners (DRACO).
* ``draco-lite`` — DETOX: per-group majority, winners shuffled into buckets, ``inner`` rule per bucket,
  ``mode`` across the bucket outputs.

``APPROACHES`` maps each option name to ``fn(grads_nd, byz_p, plan, step) -> (agg_d, diagnostics)``. The PS owns
``grads_nd``: grouped approaches compact the group winners into its first rows (no per-step copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from detox.aggregators import aggregate, coord_median
from detox.attacks import TAG_BUCKETS, rng_for


def majority(r: int) -> int:
    """Members needed for a strict majority in a group of r: ceil((r + 1) / 2)."""
    return r // 2 + 1


@dataclass(frozen=True)
class Plan:
    """Everything the PS needs to aggregate one step, resolved once from the config."""

    approach: str
    workers: int
    group_size: int
    byzantine: int
    mode: str
    f: int
    mode_params: dict = field(default_factory=dict)
    inner: str = "mean"
    inner_f: int = 0
    inner_params: dict = field(default_factory=dict)
    buckets: int | None = None
    vote_tol: float = 0.0
    seed: int = 0

    @property
    def grouped(self) -> bool:
        return self.approach != "baseline"

    @property
    def units(self) -> int:
        """Distinct gradient computations per step: groups, or workers in ``baseline``."""
        return self.workers // self.group_size if self.grouped else self.workers

    @property
    def unit_size(self) -> int:
        return self.group_size if self.grouped else 1

    @property
    def rule_inputs(self) -> int:
        """Rows the ``mode`` rule sees each step."""
        if not self.grouped:
            return self.workers
        return self.buckets if self.buckets else self.units


def plan_from_cfg(cfg) -> Plan:
    """Resolve the automatic f values (DESIGN §3) and the rule parameters from a composed config."""
    approach = cfg.approach.name
    q, r, workers = int(cfg.worker_fail), int(cfg.group_size), int(cfg.workers)
    mode_params = {k: v for k, v in dict(cfg.mode).items() if k not in ("name", "f")}
    a = cfg.approach
    worst_groups = q // majority(r)
    buckets = a.get("buckets")
    if approach == "baseline":
        f_auto = q
    elif approach == "maj_vote":
        f_auto = 0
    else:
        f_auto = min(worst_groups, buckets if buckets else workers // r)
    f = f_auto if cfg.mode.get("f") is None else int(cfg.mode.f)
    inner_f = a.get("inner_f")
    return Plan(
        approach=approach,
        workers=workers,
        group_size=r,
        byzantine=q,
        # maj_vote is DRACO's repetition code: the mean of the winners, whatever mode says
        mode="mean" if approach == "maj_vote" else cfg.mode.name,
        f=f,
        mode_params={} if approach == "maj_vote" else mode_params,
        inner=a.get("inner") or "mean",
        inner_f=worst_groups if inner_f is None else int(inner_f),
        inner_params=dict(a.get("inner_params") or {}),
        buckets=int(buckets) if buckets else None,
        vote_tol=float(a.get("vote_tol") or 0.0),
        seed=int(cfg.seed),
    )


def _same(a_d: torch.Tensor, b_d: torch.Tensor, tol: float) -> bool:
    if tol > 0:
        return bool((a_d - b_d).abs().max() <= tol)  # NaN compares False: never a match
    # bit-exact on the raw bits, so identical NaN payloads match and -0.0 != 0.0
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a_d.element_size()]
    return torch.equal(a_d.view(bits), b_d.view(bits))


def _vote(rows_rd: torch.Tensor, tol: float) -> tuple[int, list[int]]:
    """(first member of the strict-majority class, the class's members), or (-1, [])."""
    r = rows_rd.shape[0]
    need = majority(r)
    claimed = [False] * r
    for i in range(r):
        if claimed[i]:
            continue
        members = [i]
        for j in range(i + 1, r):
            if not claimed[j] and _same(rows_rd[i], rows_rd[j], tol):
                claimed[j] = True
                members.append(j)
        if len(members) >= need:
            return i, members
        if r - i - 1 < need:  # too few members left to form a majority
            break
    return -1, []


def vote_group(rows_rd: torch.Tensor, tol: float = 0.0) -> int:
    """Index of the first member whose vector a strict majority of the group sends, or -1."""
    return _vote(rows_rd, tol)[0]


def _majority(
    grads_nd: torch.Tensor, r: int, tol: float, in_place: bool = False
) -> tuple[torch.Tensor, np.ndarray, list[list[int]]]:
    """Votes of every group. ``in_place``: the winners are compacted into the first P/r rows of ``grads_nd``
    and returned as a view (the PS owns that buffer; a fresh (P/r, d) matrix per step costs page faults)."""
    k = grads_nd.shape[0] // r
    win_rows = np.full(k, -1, dtype=np.int64)
    classes: list[list[int]] = []
    winners_kd = grads_nd[:k] if in_place else torch.empty((k, grads_nd.shape[1]), dtype=grads_nd.dtype,
                                                            device=grads_nd.device)
    for g in range(k):
        rows_rd = grads_nd[g * r : (g + 1) * r]
        i, members = _vote(rows_rd, tol)
        classes.append([g * r + j for j in members])
        # group g's rows start at g * r >= g: writing row g never overwrites a later group's rows
        if i >= 0:
            win_rows[g] = g * r + i
            if g * r + i != g or not in_place:
                winners_kd[g] = rows_rd[i]
        else:
            winners_kd[g] = coord_median(rows_rd)  # computed into a fresh vector before it is written
    return winners_kd, win_rows, classes


def majority_vote(grads_nd: torch.Tensor, r: int, tol: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Per contiguous group of r rows, the majority vector (median of members if none).

    Returns the (P/r, d) winners and, per group, the winning row index in ``grads_nd`` (-1: fallback).
    """
    winners_kd, win_rows, _ = _majority(grads_nd, r, tol)
    return winners_kd, win_rows


def _vote_stage(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    winners_kd, win_rows, classes = _majority(grads_nd, plan.group_size, plan.vote_tol, in_place=True)
    need = majority(plan.group_size)
    # a group is corrupted when its winning vector lacks the support of a strict majority of honest
    # members: the Byzantines decided the vote (even if they chose to send the honest vector)
    corrupted = sum(1 for members in classes if members and int((~byz_p[members]).sum()) < need)
    diag = {
        "corrupted_groups": corrupted,
        "vote_fallbacks": int((win_rows < 0).sum()),
        "t_vote": time.perf_counter() - t0,
    }
    return winners_kd, diag


def baseline(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    agg_d = aggregate(plan.mode, grads_nd, plan.f, plan.mode_params)
    return agg_d, {
        "corrupted_groups": int(byz_p.sum()),
        "vote_fallbacks": 0,
        "t_vote": 0.0,
        "t_aggregate": time.perf_counter() - t0,
    }


def maj_vote(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int) -> tuple[torch.Tensor, dict]:
    winners_kd, diag = _vote_stage(grads_nd, byz_p, plan)
    t0 = time.perf_counter()
    agg_d = aggregate("mean", winners_kd, 0)
    diag["t_aggregate"] = time.perf_counter() - t0
    return agg_d, diag


def bucketize(winners_kd: torch.Tensor, plan: Plan, step: int) -> torch.Tensor:
    """Shuffle the winners into ``plan.buckets`` near-equal buckets; ``inner`` rule per bucket."""
    k = winners_kd.shape[0]
    if not plan.buckets or plan.buckets >= k:
        return winners_kd
    perm = rng_for(plan.seed, TAG_BUCKETS, step).permutation(k)
    outs = [
        aggregate(plan.inner, winners_kd[torch.from_numpy(np.sort(chunk))], plan.inner_f, plan.inner_params)
        for chunk in np.array_split(perm, plan.buckets)
    ]
    return torch.stack(outs)


def draco_lite(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int) -> tuple[torch.Tensor, dict]:
    winners_kd, diag = _vote_stage(grads_nd, byz_p, plan)
    t0 = time.perf_counter()
    agg_d = aggregate(plan.mode, bucketize(winners_kd, plan, step), plan.f, plan.mode_params)
    diag["t_aggregate"] = time.perf_counter() - t0
    return agg_d, diag


APPROACHES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "baseline": baseline,
    "maj_vote": maj_vote,
    "draco-lite": draco_lite,
}
