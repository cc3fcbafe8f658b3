"""Engines: how worker gradients reach the PS. ``ENGINES`` maps each ``engine`` option to its job runner.

A runner is ``fn(cfg, plan, out_dir) -> summary``. Engines only move tensors; the loop, the PS step and the
outputs are the trainer's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from detox.approaches import Plan
from detox.models import gradient
from detox.timing import Timer
from detox.trainer import Gradients, Setup, setup, train, unit_samplers


class LocalSource:
    """One process simulates the cluster: one backward pass per unit, copied to the unit's P rows."""

    attack_at_ps = True

    def __init__(self, s: Setup) -> None:
        self.s = s
        self.samplers = unit_samplers(s)
        # reused every step: the PS step finishes with it before the next step overwrites it
        self.grads_nd = torch.empty((s.plan.workers, s.w_d.numel()), dtype=s.w_d.dtype, device=s.w_d.device)

    def gradients(self, step: int, byz_p: np.ndarray) -> Gradients:
        s, size = self.s, self.s.plan.unit_size
        losses, slowest, slowest_cpu = [], 0.0, 0.0
        for u, sampler in enumerate(self.samplers):
            timer = Timer()
            loss = gradient(s.model, s.g_d, *sampler.batch(s.data, step))
            if not byz_p[u * size : (u + 1) * size].all():  # a unit of Byzantines only reports nothing we keep
                losses.append(loss)
            wall, cpu = timer.elapsed()
            slowest, slowest_cpu = max(slowest, wall), max(slowest_cpu, cpu)
            self.grads_nd[u * size : (u + 1) * size] = s.g_d
        # a cluster's workers compute in parallel: the step waits for the slowest one, as t_compute in MPI
        return Gradients(self.grads_nd, losses, t_compute=slowest, t_comm=0.0, t_compute_cpu=slowest_cpu)

    def close(self) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return {}  # stateless across steps: batches and attacks are drawn from (seed, unit, step)

    def restore_state(self, state: dict) -> None:
        pass


def run_local(cfg: DictConfig, plan: Plan, out_dir: Path | None) -> dict:
    s = setup(cfg, plan)
    return train(s, LocalSource(s), out_dir)


def run_mpi(cfg: DictConfig, plan: Plan, out_dir: Path | None) -> dict:
    from detox.mpi import run_mpi as run  # imported lazily: the driver never initialises MPI itself

    return run(cfg, plan, out_dir)


ENGINES: dict[str, Callable[[DictConfig, Plan, Path | None], dict]] = {"local": run_local, "mpi": run_mpi}
