"""The parameter-server step, shared by every engine: attack -> approach (vote, buckets, rule) -> update.

Engines only deliver the (P, d) matrix of worker gradients (row p = worker p) and say which rows are
Byzantine; everything the PS decides happens here, so ``engine=local`` and ``engine=mpi`` follow the same
trajectory for the same seed.
"""

from __future__ import annotations

import numpy as np
import torch

from detox.approaches import APPROACHES, Plan
from detox.attacks import NEEDS_ALL_HONEST, HonestStats, attack_vector
from detox.timing import Timer


def byzantine_units(byz_p: np.ndarray, plan: Plan) -> dict[int, np.ndarray]:
    """Map each unit (group, or worker in baseline) holding a Byzantine worker to its Byzantine rows."""
    rows = np.flatnonzero(byz_p)
    units: dict[int, list[int]] = {}
    for p in rows.tolist():
        units.setdefault(p // plan.unit_size, []).append(p)
    return {u: np.asarray(r) for u, r in units.items()}


def apply_attack(
    grads_nd: torch.Tensor, byz_p: np.ndarray, plan: Plan, attack: str, params: dict, step: int,
    faulty_p: np.ndarray | None = None,
) -> None:
    """Overwrite the Byzantine rows in place with the attack's vectors (colluding within a unit).

    ``faulty_p`` marks rows that arrived malformed (already NaN): they are left out of the honest statistics.
    """
    units = byzantine_units(byz_p, plan)
    if attack == "none" or not units:
        return
    stats = None
    if attack in NEEDS_ALL_HONEST:
        ok = None if faulty_p is None or not faulty_p.any() else torch.from_numpy(~faulty_p)
        stats = HonestStats.of(grads_nd if ok is None else grads_nd[ok])
    for u, rows in units.items():
        honest_d = grads_nd[u * plan.unit_size]  # every member of a unit holds the same honest gradient
        vec_d = attack_vector(
            attack, honest_d, seed=plan.seed, step=step, unit=u, params=params, stats=stats,
            workers=plan.workers, byzantine=plan.byzantine,
        )
        grads_nd[torch.from_numpy(rows)] = vec_d.to(grads_nd.dtype)


class ParameterServer:
    """Flat weights ``w_d`` and momentum ``v_d``; SGD as in the original: v <- mu v + g, w <- w - lr v."""

    def __init__(
        self, plan: Plan, w_d: torch.Tensor, *, attack: str, attack_params: dict, lr: float,
        momentum: float, weight_decay: float = 0.0,
    ) -> None:
        self.plan = plan
        self.w_d = w_d
        self.v_d = torch.zeros_like(w_d)
        # the aggregate of every step is written here: a fresh (d,) tensor per step costs its page faults
        # (at ResNet-18's d more than a memory-bound rule's work, docs/performance.md)
        self.agg_d = torch.empty_like(w_d)
        self.attack = attack
        self.attack_params = dict(attack_params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def step(
        self, step: int, grads_nd: torch.Tensor, byz_p: np.ndarray, attack_at_ps: bool = True,
        faulty_p: np.ndarray | None = None,
    ) -> dict:
        """One PS step on the P worker gradients (modified in place). Returns diagnostics and timings.

        ``attack_at_ps`` is False where the Byzantine workers already attacked themselves (MPI engine,
        attacks that need only their own gradient). ``faulty_p`` marks rows whose message was malformed:
        they count as Byzantine in the diagnostics.
        """
        if attack_at_ps:
            apply_attack(grads_nd, byz_p, self.plan, self.attack, self.attack_params, step, faulty_p)
        if faulty_p is not None and faulty_p.any():
            byz_p = byz_p | faulty_p
        out = self.agg_d if self.agg_d.dtype == grads_nd.dtype and self.agg_d.device == grads_nd.device else None
        agg_d, diag = APPROACHES[self.plan.approach](grads_nd, byz_p, self.plan, step, out=out)
        timer = Timer()
        if self.weight_decay:
            agg_d.add_(self.w_d, alpha=self.weight_decay)
        self.v_d.mul_(self.momentum).add_(agg_d)
        self.w_d.add_(self.v_d, alpha=-self.lr)
        diag["finite"] = bool(torch.isfinite(self.w_d).all())
        timer.stop(diag, "t_update")
        return diag
