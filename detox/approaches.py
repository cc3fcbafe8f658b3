"""Approaches (DESIGN §3): how the P worker gradients become the input of the robust rule.

* ``baseline``   — ``mode`` over all P gradients with f = q.
* ``maj_vote``   — per group of r the majority vector, then the mean of the P/r winners (DRACO).
* ``draco-lite`` — DETOX: per-group majority, winners shuffled into buckets, ``inner`` rule per bucket,
  ``mode`` across the bucket outputs.

The vote (``approach.vote``): ``strict`` (default) keeps the vector a strict majority of the group sends and
falls back to the group's coordinate median; ``boyer-moore`` is the original DETOX code's vote, Boyer-Moore per
layer (per parameter tensor, ``Plan.layer_sizes``) keeping the surviving candidate unchecked.

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

VOTES = ("strict", "boyer-moore")


def majority(r: int) -> int:
    """Members needed for a strict majority in a group of r: ceil((r + 1) / 2)."""
    return r // 2 + 1


def decisive(r: int, vote: str = "strict") -> int:
    """Byzantine members that can decide a group's vote in the worst case: a strict majority, ceil((r + 1) / 2),
    for ``strict``; ceil(r / 2) for ``boyer-moore`` (with even r, r/2 colluders voting first survive it, as the
    original code's f = floor(q / ceil(r / 2)) assumes). The two differ only for even r."""
    if vote not in VOTES:
        raise ValueError(f"approach.vote={vote!r}: choose from {', '.join(VOTES)}")
    return majority(r) if vote == "strict" else -(-r // 2)


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
    vote: str = "strict"
    # sizes of the model's parameter tensors in flat order (the layers of the boyer-moore vote); None: one layer
    layer_sizes: tuple[int, ...] | None = None

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
    vote = str(a.get("vote") or "strict")
    worst_groups = q // decisive(r, vote)
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
        vote=vote,
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


def _layer_starts(d: int, layer_sizes: tuple[int, ...] | None) -> np.ndarray:
    """Start offsets of the layers in a flat vector of length d (one layer when no sizes are given)."""
    if not layer_sizes:
        return np.zeros(1, dtype=np.int64)
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes <= 0).any() or int(sizes.sum()) != d:
        raise ValueError(f"layer_sizes must be positive and sum to the gradient length d={d}; "
                         f"got {len(sizes)} sizes summing to {int(sizes.sum())}")
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _layer_agreement(rows_rd: torch.Tensor, tol: float, starts: np.ndarray) -> np.ndarray:
    """(r, r, L) bool: whether members i and j send the same values on layer l (``_same``'s equality)."""
    r, n_layers = rows_rd.shape[0], starts.size
    eq = np.ones((r, r, n_layers), dtype=bool)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows_rd.element_size()]
    for i in range(r):
        for j in range(i + 1, r):
            if tol > 0:
                differ = ~((rows_rd[i] - rows_rd[j]).abs() <= tol)  # NaN compares False: never a match
                if not bool(differ.any()):
                    continue
            elif torch.equal(rows_rd[i].view(bits), rows_rd[j].view(bits)):
                continue  # without a (d,) temporary
            else:
                differ = rows_rd[i].view(bits) != rows_rd[j].view(bits)
            eq[i, j] = eq[j, i] = ~np.logical_or.reduceat(differ.cpu().numpy(), starts)
    return eq


def _boyer_moore(
    grads_nd: torch.Tensor, r: int, tol: float, layer_sizes: tuple[int, ...] | None, honest_p: np.ndarray | None,
    in_place: bool = False,
) -> tuple[torch.Tensor, np.ndarray, int, int]:
    """The original DETOX vote: per group and per layer, Boyer-Moore over the members in order (a member equal
    to the candidate adds one, another takes one away, at zero the next member becomes the candidate), and the
    surviving candidate's layer is kept unchecked. Returns (winners, per group a row that sent the kept vector or
    -1 where no member did, groups without a strict majority on some layer, corrupted groups)."""
    k, d = grads_nd.shape[0] // r, grads_nd.shape[1]
    starts = _layer_starts(d, layer_sizes)
    ends = np.append(starts[1:], d)
    n_layers, need, layer_idx = starts.size, majority(r), np.arange(starts.size)
    win_rows = np.full(k, -1, dtype=np.int64)
    winners_kd = grads_nd[:k] if in_place else torch.empty((k, d), dtype=grads_nd.dtype, device=grads_nd.device)
    fallbacks = corrupted = 0
    for g in range(k):
        rows_rd = grads_nd[g * r : (g + 1) * r]
        if all(_same(rows_rd[0], rows_rd[i], tol) for i in range(1, r)):
            # unanimous (every honest group): member 0 wins every layer, supported by all
            win_rows[g] = g * r
            if g != 0 or not in_place:
                winners_kd[g] = rows_rd[0]
            if honest_p is not None:
                corrupted += int(int(honest_p[g * r : (g + 1) * r].sum()) < need)
            continue
        eq = _layer_agreement(rows_rd, tol, starts)
        cand = np.zeros(n_layers, dtype=np.int64)
        count = np.zeros(n_layers, dtype=np.int64)
        for i in range(r):
            fresh = count == 0
            same = eq[i, cand, layer_idx]
            cand = np.where(fresh, i, cand)
            count = np.where(fresh, 1, np.where(same, count + 1, count - 1))
        support = eq[cand, :, layer_idx]  # (L, r): members that send the candidate's values on each layer
        fallbacks += int((support.sum(axis=1) < need).any())
        if honest_p is not None:
            honest = honest_p[g * r : (g + 1) * r]
            corrupted += int(((support & honest).sum(axis=1) < need).any())
        senders = np.flatnonzero(support.all(axis=0))  # members that sent the kept values on every layer
        if (cand == cand[0]).all() or senders.size:
            c = int(cand[0]) if (cand == cand[0]).all() else int(senders[0])
            win_rows[g] = g * r + c
            if g * r + c != g or not in_place:
                winners_kd[g] = rows_rd[c]
        else:
            # group g's rows start at g * r >= g: writing row g never overwrites a row still to be read
            for layer in range(n_layers):
                s, e = int(starts[layer]), int(ends[layer])
                winners_kd[g, s:e] = rows_rd[int(cand[layer]), s:e]
    return winners_kd, win_rows, fallbacks, corrupted


def majority_vote(
    grads_nd: torch.Tensor, r: int, tol: float = 0.0, vote: str = "strict",
    layer_sizes: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Per contiguous group of r rows, the majority vector (``strict``: median of members if none;
    ``boyer-moore``: the original's per-layer vote).

    Returns the (P/r, d) winners and, per group, the winning row index in ``grads_nd`` (-1: fallback, or a
    Boyer-Moore winner assembled from layers that no single member sent together).
    """
    decisive(r, vote)  # validates the name
    if vote == "boyer-moore":
        winners_kd, win_rows, _, _ = _boyer_moore(grads_nd, r, tol, layer_sizes, None)
        return winners_kd, win_rows
    winners_kd, win_rows, _ = _majority(grads_nd, r, tol)
    return winners_kd, win_rows


def _vote_stage(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    decisive(plan.group_size, plan.vote)  # validates the name
    need = majority(plan.group_size)
    if plan.vote == "boyer-moore":
        winners_kd, _, fallbacks, corrupted = _boyer_moore(grads_nd, plan.group_size, plan.vote_tol,
                                                           plan.layer_sizes, ~byz_p, in_place=True)
    else:
        winners_kd, win_rows, classes = _majority(grads_nd, plan.group_size, plan.vote_tol, in_place=True)
        # a group is corrupted when its winning vector lacks the support of a strict majority of honest
        # members: the Byzantines decided the vote (even if they chose to send the honest vector)
        corrupted = sum(1 for members in classes if members and int((~byz_p[members]).sum()) < need)
        fallbacks = int((win_rows < 0).sum())
    diag = {
        "corrupted_groups": corrupted,
        "vote_fallbacks": fallbacks,
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
