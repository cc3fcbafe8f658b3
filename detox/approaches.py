"""Approaches (DESIGN §3): how the P worker gradients become the input of the robust rule.

* ``baseline``   — ``mode`` over all P gradients with f = q.
* ``maj_vote``   — per group of r the majority vector, then the mean of the P/r winners (DRACO).
* ``draco-lite`` — DETOX: per-group majority, winners shuffled into buckets, ``inner`` rule per bucket,
  ``mode`` across the bucket outputs.

The vote (``approach.vote``): ``strict`` (default) keeps the vector a strict majority of the group sends and
falls back to the group's coordinate median; ``boyer-moore`` is the original DETOX code's vote, Boyer-Moore per
layer (per parameter tensor, ``Plan.layer_sizes``) keeping the surviving candidate unchecked.

``APPROACHES`` maps each option name to ``fn(grads_nd, byz_p, plan, step) -> (agg_d, diagnostics)``. The vote
leaves the winners where they are: the rules read them as row indices into ``grads_nd`` (no copy). The PS owns
``grads_nd``: a kept vector no single member sent (median fallback, Boyer-Moore layers of several members) is
written into its group's first row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from detox.aggregators import (
    BUCKETED,
    MIDDLE,
    aggregate,
    bulyan,
    bulyan_gram_ref,
    coord_median,
    gram_split,
    mean_of_bucket_multi_krum,
    middle_of_bucket_means,
    per_bucket,
    split_gram_refs,
)
from detox.attacks import TAG_BUCKETS, rng_for
from detox.timing import Timer

VOTES = ("strict", "boyer-moore")
# bucket outputs of at least this many bytes per row go into the vote's losing rows: a fresh allocation that large
# is mapped anew and page-faulted (16 MB rows: 84 ms against 13 ms in place); below ~1 MB glibc reuses cached memory,
# which is a little faster than rows no longer in cache (0.39 against 0.45 ms at 400 kB rows)
_INPLACE_BYTES = 1 << 20


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


@dataclass(frozen=True)
class Votes:
    """The vote of every group, as rows of the gradient matrix (no winner is copied out of it)."""

    rows: np.ndarray  # (k,) int64: the row holding group g's kept vector
    win_rows: np.ndarray  # (k,) int64: the member that sent it, -1 where none did (fallback or assembled vector)
    fallbacks: int  # groups without a strict majority (boyer-moore: on some layer)
    corrupted: int  # groups whose kept vector lacks the support of a strict majority of honest members


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same(a_d: torch.Tensor, b_d: torch.Tensor, tol: float) -> bool:
    if tol > 0:
        return bool((a_d - b_d).abs().max() <= tol)  # NaN compares False: never a match
    # bit-exact on the raw bits, so identical NaN payloads match and -0.0 != 0.0
    return torch.equal(_bits(a_d), _bits(b_d))


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


def _layer_starts(d: int, layer_sizes: tuple[int, ...] | None) -> np.ndarray:
    """Start offsets of the layers in a flat vector of length d (one layer when no sizes are given); read-only,
    computed once per (d, sizes)."""
    return _starts(d, tuple(np.asarray(layer_sizes).tolist()) if layer_sizes is not None else None)


@lru_cache(maxsize=64)
def _starts(d: int, layer_sizes: tuple | None) -> np.ndarray:
    if not layer_sizes:
        return np.zeros(1, dtype=np.int64)
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes <= 0).any() or int(sizes.sum()) != d:
        raise ValueError(f"layer_sizes must be positive and sum to the gradient length d={d}; "
                         f"got {len(sizes)} sizes summing to {int(sizes.sum())}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    starts.flags.writeable = False
    return starts


def _unanimous(grads_nd: torch.Tensor, r: int, tol: float) -> np.ndarray:
    """(k,) bool: groups of r rows whose members all send member 0's vector (``_same``'s equality), found for
    every group at once: one device sync, where the loop's pairwise checks cost one each (on a GPU, 4 ms at
    d = 1e3 for 15 groups)."""
    k = grads_nd.shape[0] // r
    x = grads_nd[: k * r].unflatten(0, (k, r))
    same = torch.ones(k, dtype=torch.bool, device=grads_nd.device)
    for j in range(1, r):
        if tol > 0:
            same &= ((x[:, j] - x[:, 0]).abs() <= tol).all(dim=1)  # NaN compares False: never a match
        else:
            same &= (_bits(x[:, j]) == _bits(x[:, 0])).all(dim=1)
    return same.cpu().numpy()


def _layer_agreement(rows_rd: torch.Tensor, tol: float, starts: np.ndarray) -> np.ndarray:
    """(r, r, L) bool: whether members i and j send the same values on layer l (``_same``'s equality)."""
    r, n_layers = rows_rd.shape[0], starts.size
    eq = np.ones((r, r, n_layers), dtype=bool)
    for i in range(r):
        for j in range(i + 1, r):
            if tol > 0:
                differ = ~((rows_rd[i] - rows_rd[j]).abs() <= tol)  # NaN compares False: never a match
                if not bool(differ.any()):
                    continue
            elif torch.equal(_bits(rows_rd[i]), _bits(rows_rd[j])):
                continue  # without a (d,) temporary
            else:
                differ = _bits(rows_rd[i]) != _bits(rows_rd[j])
            eq[i, j] = eq[j, i] = ~_any_per_layer(differ, starts)
    return eq


def _any_per_layer(flags_d: torch.Tensor, starts: np.ndarray) -> np.ndarray:
    """(L,) bool: whether any flag is set in each layer (layers begin at ``starts``), counted where the flags
    are: only L numbers leave a GPU, not d flags (copying them made the vote 15 ms at d = 1.1e7 on an H100)."""
    ends = torch.from_numpy(np.append(starts[1:], flags_d.numel()) - 1).to(flags_d.device)
    total = flags_d.cumsum(0)[ends]  # int64: exact
    return (torch.diff(total, prepend=total.new_zeros(1)) > 0).cpu().numpy()


def _fallback(grads_nd: torch.Tensor, g: int, r: int) -> None:
    """No strict majority in group g: its members' coordinate median, written into its first row."""
    grads_nd[g * r] = coord_median(grads_nd[g * r : (g + 1) * r])  # computed into a fresh vector first


def _vote_reference(grads_nd: torch.Tensor, r: int, tol: float = 0.0, vote: str = "strict",
                    layer_sizes: tuple[int, ...] | None = None, honest_p: np.ndarray | None = None,
                    unanimous: np.ndarray | None = None) -> Votes:
    """The vote as a Python loop over groups and pairs of members (torch): the definition the compiled vote is
    tested against, and the path for tensors the kernels do not take (CUDA, float16, non-contiguous).

    A kept vector that no single member sent (strict: the median fallback; boyer-moore: layers of several
    members) is written into the group's first row. ``unanimous`` (``_unanimous``): which groups agree, found
    beforehand; the loop then compares members only in the others."""
    k = grads_nd.shape[0] // r
    need = majority(r)
    honest_p = np.ones(grads_nd.shape[0], dtype=bool) if honest_p is None else honest_p
    rows = np.arange(k, dtype=np.int64) * r
    win_rows = np.full(k, -1, dtype=np.int64)
    fallbacks = corrupted = 0
    if vote == "strict":
        for g in range(k):
            known = unanimous is not None and unanimous[g]
            i, members = (0, range(r)) if known else _vote(grads_nd[g * r : (g + 1) * r], tol)
            if i >= 0:
                rows[g] = win_rows[g] = g * r + i
                corrupted += int(int(honest_p[[g * r + j for j in members]].sum()) < need)
            else:
                fallbacks += 1
                _fallback(grads_nd, g, r)
        return Votes(rows, win_rows, fallbacks, corrupted)
    d = grads_nd.shape[1]
    starts = _layer_starts(d, layer_sizes)
    ends = np.append(starts[1:], d)
    n_layers, layer_idx = starts.size, np.arange(starts.size)
    for g in range(k):
        rows_rd = grads_nd[g * r : (g + 1) * r]
        honest = honest_p[g * r : (g + 1) * r]
        if (all(_same(rows_rd[0], rows_rd[i], tol) for i in range(1, r)) if unanimous is None
                else unanimous[g]):
            # unanimous (every honest group): member 0 wins every layer, supported by all
            win_rows[g] = g * r
            corrupted += int(int(honest.sum()) < need)
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
        corrupted += int(((support & honest).sum(axis=1) < need).any())
        senders = np.flatnonzero(support.all(axis=0))  # members that sent the kept values on every layer
        if (cand == cand[0]).all() or senders.size:
            c = int(cand[0]) if (cand == cand[0]).all() else int(senders[0])
            rows[g] = win_rows[g] = g * r + c
        else:
            for layer in range(n_layers):  # every layer comes from a member of this group
                s, e = int(starts[layer]), int(ends[layer])
                rows_rd[0, s:e] = rows_rd[int(cand[layer]), s:e]
    return Votes(rows, win_rows, fallbacks, corrupted)


def _compiled(grads_nd: torch.Tensor) -> bool:
    """Whether the compiled vote applies: a contiguous float32/float64 matrix on the CPU (it writes in place)."""
    return (grads_nd.device.type == "cpu" and grads_nd.dtype in (torch.float32, torch.float64)
            and grads_nd.is_contiguous())


def vote_rows(grads_nd: torch.Tensor, r: int, tol: float = 0.0, vote: str = "strict",
              layer_sizes: tuple[int, ...] | None = None, honest_p: np.ndarray | None = None,
              settled: np.ndarray | None = None, known: tuple[np.ndarray, np.ndarray] | None = None) -> Votes:
    """The vote of every contiguous group of r rows (``strict`` or the original's ``boyer-moore``, DESIGN §3),
    as row indices into ``grads_nd``: one compiled pass over the rows each group must compare (on the CPU).

    ``grads_nd`` belongs to the caller's step: where no single member sent the kept vector (the strict vote's
    median fallback, or Boyer-Moore layers of several members) it is written into the group's first row.
    ``honest_p`` (default: everyone) is what ``corrupted`` is counted against. ``settled`` (per group, from
    ``kernels.vote_grams``): groups whose first members are honest and already found to agree, left unread by the
    compiled vote (their result is member 0's, as the vote finds it); ``known`` (Boyer-Moore): (groups, how their
    members agree per layer), decided from that unread."""
    decisive(r, vote)  # validates the name
    starts = _layer_starts(grads_nd.shape[1], layer_sizes) if vote == "boyer-moore" else None
    if not _compiled(grads_nd) or grads_nd.shape[0] < r:
        return _vote_reference(grads_nd, r, tol, vote, layer_sizes, honest_p, _unanimous(grads_nd, r, tol))
    from detox.kernels import boyer_moore_vote, strict_vote

    k, need = grads_nd.shape[0] // r, majority(r)
    honest_p = np.ones(grads_nd.shape[0], dtype=bool) if honest_p is None else np.asarray(honest_p, dtype=bool)
    x = grads_nd.numpy()
    x = x if tol > 0 else _bits(grads_nd).numpy()
    rows = np.arange(k, dtype=np.int64) * r
    if vote == "strict":
        honest = honest_p[: k * r].reshape(k, r)
        from detox.kernels import _strict_tally

        leader, member = strict_vote(x, r, need, tol, honest.ravel(), settled)
        return _strict_votes(grads_nd, r, _strict_tally(leader, member, honest.ravel().astype(np.int64), r, need))
    win_rows, fallback, corrupted, _ = boyer_moore_vote(x, r, need, tol, starts, honest_p, True, settled,
                                                        *(known or (None, None)))
    return Votes(np.where(win_rows >= 0, win_rows, rows), win_rows, int(fallback.sum()), int(corrupted.sum()))


def majority_vote(
    grads_nd: torch.Tensor, r: int, tol: float = 0.0, vote: str = "strict",
    layer_sizes: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Per contiguous group of r rows, the majority vector (``strict``: median of members if none;
    ``boyer-moore``: the original's per-layer vote), as a fresh (P/r, d) matrix (``grads_nd`` is left as it is).

    Returns the (P/r, d) winners and, per group, the winning row index in ``grads_nd`` (-1: fallback, or a
    Boyer-Moore winner assembled from layers that no single member sent together).
    """
    decisive(r, vote)  # validates the name
    work = grads_nd.clone()
    votes = vote_rows(work, r, tol, vote, layer_sizes)
    return work[torch.from_numpy(votes.rows).to(work.device)], votes.win_rows


def _vote_stage(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int | None = None,
                prep: _Prepared | None = None) -> tuple[Votes, dict, list | None]:
    """The vote, and where DETOX-Multi-Krum's buckets would each form their Gram matrix across threads (``step``
    given: d in the millions), those matrices in the same pass through the rows (``_vote_with_grams``), aligned
    with the step's buckets (None: not formed). ``prep``: the plan's compiled calls (``_prepared``)."""
    timer = Timer()
    fused = None
    if step is not None and ((plan.inner == "multi-krum" and plan.mode == "mean")
                             or (plan.mode == "bulyan" and not plan.buckets)):
        from detox.kernels import _SERIAL_PAIRS

        # not even a matrix over all k winners reaches the pass's limit (checked per matrix by _vote_with_grams):
        # not asked (~30 us per step at d = 1e5, where its Python runs out of cache after the rows arrive)
        k = grads_nd.shape[0] // plan.group_size
        if k * (k + 1) // 2 * grads_nd.shape[1] >= _SERIAL_PAIRS:
            fused = _vote_with_grams(grads_nd, byz_p, plan, step)
    if fused is None:
        fused = (prep.vote(grads_nd, byz_p) if prep is not None else
                 vote_rows(grads_nd, plan.group_size, plan.vote_tol, plan.vote, plan.layer_sizes, ~byz_p)), None
    votes, grams = fused
    # corrupted: the kept vector lacks the support of a strict majority of honest members, so the Byzantines
    # decided the vote (even if they chose to send the honest vector)
    diag = timer.stop({"corrupted_groups": votes.corrupted, "vote_fallbacks": votes.fallbacks}, "t_vote")
    return votes, diag, grams


def _vote_with_grams(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int) -> tuple[Votes, list] | None:
    """The vote, with the buckets' Gram matrices formed in its pass through the rows (``kernels.vote_grams``): the
    vote reads each group's first two rows anyway, and the Gram matrices read the winners again (0.66 GB of 2.3 at
    ResNet-18's d, issue #15). The buckets are known before the vote (they shuffle positions, one per group), their
    rows are not: each group's winner is guessed by the vote on the first columns alone, and a bucket's matrix is
    kept only where every guess was the vote's winner, a row that no vote wrote (else None: formed afterwards).
    DETOX-Bulyan (no buckets) has one matrix, over all the winners. None where no matrix would be split across
    threads (nothing voted yet)."""
    r, tol, honest_p = plan.group_size, plan.vote_tol, ~byz_p
    k = grads_nd.shape[0] // r
    if plan.buckets:  # DETOX-Multi-Krum: the buckets' matrices
        cuts = _bounds(k, plan.buckets) if k > plan.buckets else ()
        sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

        def spec_of(rows: np.ndarray) -> list | None:
            return _buckets(rows, plan, step)

        def refs_of(spec: list) -> tuple[list[int], int] | None:
            return split_gram_refs(grads_nd, spec, plan.inner_f, plan.inner_params)
    else:  # DETOX-Bulyan: one matrix over the winners, in group order (the rows the rule reads)
        sizes = [k]

        def spec_of(rows: np.ndarray) -> list | None:
            return [rows]

        def refs_of(spec: list) -> tuple[list[int], int] | None:
            return bulyan_gram_ref(grads_nd, spec[0], plan.f, plan.mode_params)
    # the matrices' sizes are known before the vote: nothing to do where none of them would be split, or where
    # each is small work (at d = 1e5 DETOX-Bulyan's 15-row matrix is split, but the pass, with its guess, would
    # cost more than it saves: 1.45 against 1.05 ms per step)
    from detox.kernels import _SERIAL_PAIRS, _SPAN, BLOCK, vote_grams

    d = grads_nd.shape[1]
    if not (_compiled(grads_nd) and len(sizes)
            and all(n * (n + 1) // 2 * d >= _SERIAL_PAIRS and gram_split(grads_nd, n) > 1 for n in sizes)):
        return None

    cols = min(grads_nd.shape[1], BLOCK * 4 * _SPAN)
    # a copy, so that what the guess writes (a fallback median, assembled layers) stays there: .contiguous() is no
    # copy where cols == d, and the guess's median written into a group's first row made the real vote find a
    # majority in [a, a, b, b] (a median equal to b)
    head = grads_nd[:, :cols].clone(memory_format=torch.contiguous_format)
    guess = vote_rows(head, r, tol, plan.vote, (cols,) if plan.vote == "boyer-moore" else None, honest_p).win_rows
    guess = np.where(guess >= 0, guess, np.arange(k) * r)
    spec = spec_of(guess)
    split = None if spec is None else refs_of(spec)
    if split is None:
        return None
    x = grads_nd.numpy()
    starts = _layer_starts(x.shape[1], plan.layer_sizes) if plan.vote == "boyer-moore" else None
    settled, grams, known, eqs = vote_grams(x, x if tol > 0 else _bits(grads_nd).numpy(), r, majority(r), tol,
                                            honest_p, spec, *split, starts)
    votes = vote_rows(grads_nd, r, tol, plan.vote, plan.layer_sizes, honest_p, settled,
                      None if known is None else (known, eqs))
    real = spec_of(votes.win_rows)
    return votes, [g if np.array_equal(a, b) else None for g, a, b in zip(grams, spec, real, strict=True)]


@dataclass(frozen=True)
class _Prepared:
    """One plan's step as compiled calls, with every argument that stays the same from step to step set up once
    (per matrix shape, dtype and torch's thread count): the step's Python is then a handful of calls. At d = 1e5 that
    Python runs right after the rows arrive, with the interpreter out of cache, where each check and small array
    costs ~5x its warm time: the vote's and the rules' wrappers took half of DETOX's step (issue #15)."""

    plan: Plan
    key: tuple
    vote: Callable[[torch.Tensor, np.ndarray], Votes]  # (grads_nd, byz_p): as vote_rows
    bounds: np.ndarray | None  # the buckets' cut points (None: no buckets)
    stage: Callable[[torch.Tensor, np.ndarray, torch.Tensor | None], torch.Tensor | None] | None
    compiled_shuffle: bool = False  # the buckets drawn by kernels._shuffled_order (else numpy's Generator)


_PREPARED: dict[int, _Prepared] = {}


def _prepared(plan: Plan, grads_nd: torch.Tensor, byz_p: np.ndarray) -> _Prepared | None:
    """The plan's step as compiled calls (``_prepare``), where it takes them: a contiguous float32/float64 CPU
    matrix of whole groups and a boolean Byzantine mask per row; None: the general path."""
    if not (_compiled(grads_nd) and isinstance(byz_p, np.ndarray) and byz_p.dtype == np.bool_
            and byz_p.shape == grads_nd.shape[:1] and grads_nd.shape[0] % plan.group_size == 0
            and grads_nd.shape[0] >= plan.group_size):
        return None
    # torch's thread count (training sets numba's to match): which kernels are pooled. Results do not depend on
    # it (the vote compares bits; the stages split no sum across threads), so numba's count is not asked each
    # step (~20 us with the interpreter out of cache)
    key = (tuple(grads_nd.shape), grads_nd.dtype, torch.get_num_threads())
    prep = _PREPARED.get(id(plan))
    if prep is None or prep.plan is not plan or prep.key != key:
        if len(_PREPARED) >= 64:
            _PREPARED.clear()
        prep = _PREPARED[id(plan)] = _prepare(plan, grads_nd, key)
    return prep


def _prepare(plan: Plan, grads_nd: torch.Tensor, key: tuple) -> _Prepared:
    from detox import kernels as K
    from detox.aggregators import prepared_bucket_stage, prepared_rule_stage

    decisive(plan.group_size, plan.vote)  # validates the name
    (rows, d), r = grads_nd.shape, plan.group_size
    k, need = rows // r, majority(r)
    x = grads_nd.numpy()
    bits = None if plan.vote_tol > 0 else _bits(grads_nd).numpy().dtype  # compared as integers unless a tol
    tol = K._tol(x if bits is None else x.view(bits), plan.vote_tol)
    pooled = K._threads(torch.get_num_threads(), x, None, k * r * d, K._SERIAL_VOTE) > 1  # as _vote_threads
    if plan.vote == "boyer-moore":
        starts, ends = K._layer_bounds(_layer_starts(d, plan.layer_sizes), d)
        bm = K._bm_step if pooled else K._bm_step_serial

        def vote(grads_nd: torch.Tensor, byz_p: np.ndarray) -> Votes:
            x = grads_nd.numpy()
            return Votes(*bm(x if bits is None else x.view(bits), r, need, tol, starts, ends, byz_p))
    else:
        strict = K._strict_step if pooled else K._strict_step_serial

        def vote(grads_nd: torch.Tensor, byz_p: np.ndarray) -> Votes:
            x = grads_nd.numpy()
            return _strict_votes(grads_nd, r, strict(x if bits is None else x.view(bits), r, need, tol, byz_p))

    bounds, stage = None, None
    if plan.buckets and plan.buckets < k:
        bounds = np.array(_bounds(k, plan.buckets), dtype=np.int64)
        if grads_nd.dtype == torch.float32:
            stage = prepared_bucket_stage(plan.inner, plan.mode, tuple(np.diff(bounds).tolist()), plan.f,
                                          plan.mode_params, plan.inner_f, plan.inner_params, d, torch.get_num_threads())
    elif grads_nd.dtype == torch.float32 and plan.approach == "draco-lite":  # the rule over the winners
        stage = prepared_rule_stage(plan.mode, k, plan.f, plan.mode_params, d)
    # the buckets' permutation drawn by the compiled twin of numpy's (kernels.permutation) where the seed fits it
    return _Prepared(plan, key, vote, bounds, stage, 0 <= plan.seed < 2**63)


def _strict_votes(grads_nd: torch.Tensor, r: int, tally: tuple) -> Votes:
    """The strict vote's result from its tally (``kernels._strict_tally``: rows kept, winning rows, fallbacks,
    corrupted); a group without a strict majority gets its members' median, written into its first row."""
    votes = Votes(*tally)
    for g in np.flatnonzero(votes.win_rows < 0).tolist() if votes.fallbacks else ():
        _fallback(grads_nd, g, r)
    return votes


def baseline(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    timer = Timer()
    agg_d = aggregate(plan.mode, grads_nd, plan.f, plan.mode_params, out=out)
    diag = {"corrupted_groups": int(byz_p.sum()), "vote_fallbacks": 0, "t_vote": 0.0, "t_vote_cpu": 0.0}
    return agg_d, timer.stop(diag, "t_aggregate")


def maj_vote(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    votes, diag, _ = _vote_stage(grads_nd, byz_p, plan, prep=_prepared(plan, grads_nd, byz_p))
    timer = Timer()
    agg_d = aggregate("mean", grads_nd, 0, rows=votes.rows, out=out)
    timer.stop(diag, "t_aggregate")
    return agg_d, diag


def _buckets(rows: np.ndarray, plan: Plan, step: int) -> list[np.ndarray] | None:
    """The winners ``rows`` shuffled into ``plan.buckets`` near-equal buckets (each in ascending order), or None
    where there is nothing to bucket (no buckets, or at most one winner per bucket)."""
    k = rows.shape[0]
    if not plan.buckets or plan.buckets >= k:
        return None
    perm = rng_for(plan.seed, TAG_BUCKETS, step).permutation(k)
    bounds = _bounds(k, plan.buckets)
    return [rows[np.sort(perm[a:b])] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@lru_cache(maxsize=64)
def _bounds(k: int, buckets: int) -> tuple[int, ...]:
    """np.array_split's cut points of k items into ``buckets`` parts (the first k % buckets one larger): the same
    buckets, without its per-call overhead (5 buckets of 15 winners cut and sorted: 12 -> 6 µs)."""
    sizes = [k // buckets + (i < k % buckets) for i in range(buckets)]
    return tuple(np.concatenate([[0], np.cumsum(sizes)]).tolist())


def bucket_rows(
    grads_nd: torch.Tensor, rows: np.ndarray, plan: Plan, step: int, buckets: list[np.ndarray] | None = None
) -> tuple[torch.Tensor, np.ndarray | None]:
    """What ``mode`` aggregates, as (matrix, rows of it; None: all): the winners ``grads_nd[rows]`` shuffled into
    ``plan.buckets`` near-equal buckets, the ``inner`` rule per bucket (reading its rows in place); without
    bucketing (grads_nd, rows) itself.

    The bucket outputs go into rows of ``grads_nd`` that are not in ``rows`` (the vote's losers: the step owns the
    matrix, and nothing reads them again), returned as (grads_nd, those rows): no fresh (buckets, d) tensor, whose
    page faults cost more than the rule at ResNet-18's d (issue #15). Where too few such rows exist, or rows are
    small enough for the allocator to reuse cached memory, a stacked (buckets, d) tensor and None. ``buckets``: the
    step's cut when the caller already made it (``_buckets``)."""
    buckets = _buckets(rows, plan, step) if buckets is None else buckets
    if buckets is None:
        return grads_nd, rows
    dest = None
    if grads_nd.shape[1] * grads_nd.element_size() >= _INPLACE_BYTES and grads_nd.is_contiguous():
        spare = np.setdiff1d(np.arange(grads_nd.shape[0]), rows)[: plan.buckets]
        dest = spare if spare.shape[0] == plan.buckets else None
    # all buckets in one call where the inner rule has a batched form (the same values as bucket by bucket)
    batched = BUCKETED.get(plan.inner)
    if batched is not None:
        outs = batched(grads_nd, buckets, plan.inner_f, plan.inner_params, dest=dest)
    else:
        outs = per_bucket(plan.inner, grads_nd, buckets, plan.inner_f, plan.inner_params, dest)
    return (outs, None) if dest is None else (grads_nd, dest)


def bucketize(winners_kd: torch.Tensor, plan: Plan, step: int) -> torch.Tensor:
    """Shuffle the winners into ``plan.buckets`` near-equal buckets; ``inner`` rule per bucket."""
    out, rows = bucket_rows(winners_kd, np.arange(winners_kd.shape[0]), plan, step)
    return out if rows is None else winners_kd  # rows: every winner, no bucketing (no spare rows to write into)


def _fused(plan: Plan) -> Callable[[torch.Tensor, list, torch.Tensor | None, list | None], torch.Tensor] | None:
    """DETOX's bucket stage as one pass, where (inner, mode) has one: the mean inside and an order statistic
    across (the original's DETOX-median), or Multi-Krum inside and the mean across (its DETOX-Multi-Krum, with the
    Gram matrices the vote's pass formed); each bit for bit ``bucket_rows`` then ``mode``."""
    if plan.inner == "mean" and plan.mode in MIDDLE:
        return lambda g, buckets, out, _: middle_of_bucket_means(plan.mode, g, buckets, plan.f, plan.mode_params,
                                                                 plan.inner_f, plan.inner_params, out=out)
    if plan.inner == "multi-krum" and plan.mode == "mean":
        return lambda g, buckets, out, grams: mean_of_bucket_multi_krum(
            g, buckets, plan.inner_f, plan.inner_params, plan.f, plan.mode_params, out=out, grams=grams)
    return None


def draco_lite(grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, step: int,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    prep = _prepared(plan, grads_nd, byz_p)
    votes, diag, grams = _vote_stage(grads_nd, byz_p, plan, step, prep)
    timer = Timer()
    if prep is not None and prep.stage is not None and grams is None:
        # the buckets' rows one after the other (or the winners', without buckets), and the stage (None: the
        # rule's own path)
        from detox.kernels import _shuffled_order

        if prep.bounds is None:
            rows = votes.rows
        elif prep.compiled_shuffle and type(step) is int and 0 <= step < 2**63:
            rows = _shuffled_order(votes.rows, plan.seed, TAG_BUCKETS, step, prep.bounds)
        else:
            rows = np.concatenate(_buckets(votes.rows, plan, step))
        agg_d = prep.stage(grads_nd, rows, out)
        if agg_d is not None:
            return agg_d, timer.stop(diag, "t_aggregate")
    buckets = _buckets(votes.rows, plan, step)
    fused = _fused(plan) if buckets is not None else None
    if fused is not None:  # inner and mode in one pass: the bucket outputs are never written out
        agg_d = fused(grads_nd, buckets, out, grams)
    elif grams is not None:  # DETOX-Bulyan, with the Gram matrix the vote's pass formed (or None)
        agg_d = bulyan(grads_nd, plan.f, rows=votes.rows, out=out, gram=grams[0], **plan.mode_params)
    else:
        inputs, rows = bucket_rows(grads_nd, votes.rows, plan, step, buckets)
        agg_d = aggregate(plan.mode, inputs, plan.f, plan.mode_params, rows=rows, out=out)
    timer.stop(diag, "t_aggregate")
    return agg_d, diag


APPROACHES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "baseline": baseline,
    "maj_vote": maj_vote,
    "draco-lite": draco_lite,
}
