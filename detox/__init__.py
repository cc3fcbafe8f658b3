"""detox: Byzantine-resilient distributed SGD — DETOX and robust aggregation, with Hydra sweeps."""

import os

# OpenMP threads spin while they wait; on a shared or oversubscribed machine (parallel sweeps, MPI ranks) that
# spinning multiplied CPU time 2-10x here. It must be set before torch or numba load OpenMP; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
