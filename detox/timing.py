"""Phase timers: each phase's wall-clock seconds and this process's CPU seconds.

The CPU clock is what a phase costs on a core of its own: another process on a shared machine delays the phase's
wall-clock end but leaves its CPU seconds alone, so times built from it (``cluster_time_cpu``) agree between runs
on a loaded machine where wall-clock times do not (docs/performance.md). It equals wall-clock time on an idle
machine with ``threads=1`` (every timing sweep's setting); with more threads it sums their CPU seconds.
"""

from __future__ import annotations

import time


class Timer:
    """Started on creation; ``stop(diag, key)`` writes ``diag[key]`` (wall) and ``diag[key + "_cpu"]`` (CPU)."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the start."""
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def stop(self, diag: dict, key: str) -> dict:
        diag[key], diag[f"{key}_cpu"] = self.elapsed()
        return diag
