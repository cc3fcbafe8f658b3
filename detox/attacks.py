"""Byzantine attacks (``err_mode``) and adversary placement (DESIGN §3).

An attack maps the honest gradient of one Byzantine *unit* (a group in grouped approaches, a worker in
``baseline``) to the vector every Byzantine member of that unit sends: Byzantines collude, so members of
one group send the same vector. Randomness comes from a generator keyed by (seed, step, unit), so a worker
rank in the MPI engine draws exactly what the local engine draws.

Attacks in ``NEEDS_ALL_HONEST`` use statistics of all P honest gradients; they run at the PS (as in the
original). The others can run on the Byzantine worker itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

# stream tags keep the random streams of different purposes independent
TAG_PLACEMENT, TAG_ATTACK, TAG_BUCKETS, TAG_DATA, TAG_AUGMENT = 1, 2, 3, 4, 5


def seed_for(*key: int) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass
class HonestStats:
    """Per-coordinate statistics over all P honest gradients (for attacks at the PS)."""

    mean_d: torch.Tensor
    std_d: torch.Tensor

    @classmethod
    def of(cls, grads_nd: torch.Tensor) -> HonestStats:
        std_d, mean_d = torch.std_mean(grads_nd, dim=0, correction=0)
        return cls(mean_d=mean_d, std_d=std_d)


def alie_z_max(workers: int, byzantine: int) -> float:
    """ALIE's z_max = Phi^-1((P - s) / P) with s = floor(P/2 + 1) - q (Baruch et al. 2019)."""
    s = math.floor(workers / 2 + 1) - byzantine
    p = (workers - s) / workers
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"err_mode=alie: z_max is undefined for workers={workers}, worker_fail={byzantine} "
            f"(needs 0 < floor(P/2+1) - q < P); set err_mode.z explicitly"
        )
    return NormalDist().inv_cdf(p)


def none(g_d: torch.Tensor, **_: object) -> torch.Tensor:
    return g_d


def rev_grad(g_d: torch.Tensor, *, scale: float = 100.0, **_: object) -> torch.Tensor:
    return g_d * (-scale)


def constant(g_d: torch.Tensor, *, value: float = -100.0, **_: object) -> torch.Tensor:
    return torch.full_like(g_d, value)


def gaussian(
    g_d: torch.Tensor, *, std: float = 10.0, gen: torch.Generator | None = None, **_: object
) -> torch.Tensor:
    return torch.randn(g_d.shape, generator=gen, dtype=g_d.dtype, device="cpu").to(g_d.device) * std


def alie(
    g_d: torch.Tensor, *, stats: HonestStats, z: float | None = None, workers: int = 0, byzantine: int = 0,
    **_: object,
) -> torch.Tensor:
    z = alie_z_max(workers, byzantine) if z is None else z
    return stats.mean_d + z * stats.std_d


def ipm(g_d: torch.Tensor, *, stats: HonestStats, epsilon: float = 0.1, **_: object) -> torch.Tensor:
    return stats.mean_d * (-epsilon)


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "none": none,
    "rev_grad": rev_grad,
    "constant": constant,
    "gaussian": gaussian,
    "alie": alie,
    "ipm": ipm,
}

NEEDS_ALL_HONEST = frozenset({"alie", "ipm"})


def attack_vector(
    name: str, g_d: torch.Tensor, *, seed: int, step: int, unit: int, params: dict,
    stats: HonestStats | None = None, workers: int = 0, byzantine: int = 0,
) -> torch.Tensor:
    """The vector the Byzantine members of ``unit`` send at ``step``, given its honest gradient."""
    gen = torch.Generator().manual_seed(seed_for(seed, TAG_ATTACK, step, unit))
    return ATTACKS[name](g_d, gen=gen, stats=stats, workers=workers, byzantine=byzantine, **params)


# ----------------------------------------------------------------------------------------- placement


def _random(step: int, workers: int, q: int, r: int, seed: int) -> np.ndarray:
    return rng_for(seed, TAG_PLACEMENT, step).choice(workers, size=q, replace=False)


def _fixed(step: int, workers: int, q: int, r: int, seed: int) -> np.ndarray:
    return rng_for(seed, TAG_PLACEMENT).choice(workers, size=q, replace=False)


def _worst(step: int, workers: int, q: int, r: int, seed: int) -> np.ndarray:
    # fill ceil((r+1)/2) seats of each group in turn, so floor(q / that) groups fall; leftovers go to the
    # next group's first seats (too few to win it), then to the remaining seats
    m = r // 2 + 1
    groups = workers // r
    order = [k * r + j for k in range(groups) for j in range(m)]
    order += [k * r + j for k in range(groups) for j in range(m, r)]
    return np.asarray(order[:q], dtype=np.int64)


PLACEMENTS: dict[str, Callable[..., np.ndarray]] = {"random": _random, "fixed": _fixed, "worst": _worst}


def byzantine_mask(placement: str, step: int, workers: int, q: int, r: int, seed: int) -> np.ndarray:
    """Boolean (P,) mask of the workers that are Byzantine at ``step``."""
    # exactly q or an error: `worst` would otherwise return fewer than q (q > P, or workers not in groups of r)
    # and a negative q would mark P - |q| workers
    if not 0 <= q <= workers or workers % r:
        raise ValueError(f"byzantine_mask: need 0 <= q <= workers and workers divisible by r; "
                         f"got workers={workers}, q={q}, r={r}")
    mask = np.zeros(workers, dtype=bool)
    if q:
        mask[PLACEMENTS[placement](step, workers, q, r, seed)] = True
    return mask
