"""``python -m detox.bench``: time every robust rule and every approach's PS step against the memory floor and a
loop-style reference, and print a table (also written as JSON).

For each rule and each (n, d): the median time over repeats; ``floor`` = the time of one read of the same
(n, d) float32 matrix measured in the same run (``grads.sum()``); the ratio to a straightforward reference
written the way the original code did it (numpy, a Python loop over pairs of rows for distances, np.median /
np.sort for order statistics); and the peak extra memory during the call, in units of the input matrix.
Then the PS step of ``draco-lite`` + X against ``baseline`` + X at P workers, r = 3, q Byzantine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from detox.aggregators import AGGREGATORS, _row_dists, _weighted_rows
from detox.approaches import APPROACHES, Plan

RULES = tuple(AGGREGATORS)
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- loop-style references


def _ref_sq_dists(g: np.ndarray) -> np.ndarray:
    n = g.shape[0]
    d2 = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d2[i, j] = d2[j, i] = float(np.linalg.norm(g[i] - g[j]) ** 2)
    return d2


def _ref_krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    n = d2.shape[0]
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


def _ref_trimmed(g: np.ndarray, f: int) -> np.ndarray:
    s = np.sort(g, axis=0)
    return s[f : g.shape[0] - f].mean(axis=0)


def _ref_geomed_iteration(g: np.ndarray, z: np.ndarray) -> np.ndarray:
    w = 1.0 / np.maximum(np.linalg.norm(g - z, axis=1), 1e-12)
    return (w[:, None] * g).sum(axis=0) / w.sum()


def reference(rule: str, g: np.ndarray, f: int, d2: np.ndarray | None) -> Callable[[], object]:
    """A thunk running the loop-style reference of ``rule`` (distances precomputed once in ``d2``; their
    cost is added to the distance-based rules' time by the caller)."""
    n = g.shape[0]
    refs: dict[str, Callable[[], object]] = {
        "mean": lambda: g.mean(axis=0),
        "coord-median": lambda: np.median(g, axis=0),
        "trimmed-mean": lambda: _ref_trimmed(g, f),
        "geometric-median": lambda: _ref_geomed_iteration(g, g.mean(axis=0)),
        "krum": lambda: g[int(np.argmin(_ref_krum_scores(d2, f)))].copy(),
        "multi-krum": lambda: g[np.argsort(_ref_krum_scores(d2, f), kind="stable")[: n - f]].mean(axis=0),
        "bulyan": lambda: _ref_trimmed(g[np.argsort(_ref_krum_scores(d2, f), kind="stable")[: n - 2 * f]], f),
        "sign-sgd": lambda: np.sign(np.sign(g).sum(axis=0)),
    }
    return refs[rule]


# ------------------------------------------------------------------------------- measurement helpers


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory while the block runs, sampled every millisecond (large tensors are touched as
    they are filled, so their pages show up in the samples)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, device: str = "cpu",
          setup: Callable[[], object] | None = None) -> float:
    """Median seconds over ``repeats`` calls (after one warm-up call); ``setup`` runs untimed before each."""
    if setup:
        setup()
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
            _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _matrix(n: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # honest-looking rows: a shared direction plus noise, so distance-based rules do real work
    base = torch.randn(d, generator=gen)
    g = base + 0.5 * torch.randn((n, d), generator=gen)
    return g.to(device)


def _f_for(rule: str, n: int) -> int:
    bounds = {"krum": (n - 3) // 2, "multi-krum": (n - 3) // 2, "bulyan": (n - 3) // 4, "trimmed-mean": (n - 1) // 2}
    return min(5, bounds.get(rule, 5))


# ------------------------------------------------------------------------------- benchmarks


def bench_rules(n: int, d: int, rules: list[str], repeats: int, device: str, with_reference: bool) -> list[dict]:
    g = _matrix(n, d, device)
    nbytes = g.numel() * g.element_size()
    floor = timed(lambda: g.sum(), max(repeats, 5), device)
    g_np = g.cpu().numpy() if with_reference else None
    d2, t_dists = None, 0.0
    if with_reference and any(r in ("krum", "multi-krum", "bulyan") for r in rules):
        t0 = time.perf_counter()
        d2 = _ref_sq_dists(g_np)
        t_dists = time.perf_counter() - t0
    rows = []
    for rule in rules:
        f = _f_for(rule, n)
        call = partial(AGGREGATORS[rule], g, f)
        if rule == "geometric-median":
            # one Weiszfeld iteration is one distance pass and one weighted sum of the rows
            z, w = g[0].clone(), torch.full((n,), 1.0 / n, dtype=torch.float64)
            t = timed(lambda z=z, w=w: (_row_dists(g, z), _weighted_rows(g, w)), repeats, device)
        else:
            t = timed(call, repeats, device)
        with PeakRSS() as mem:
            call()
        row = {"rule": rule, "n": n, "d": d, "f": f, "device": device, "seconds": t, "floor_seconds": floor,
               "x_floor": t / floor, "peak_extra_x_input": mem.extra / nbytes if device == "cpu" else None}
        if with_reference:
            t_ref = timed(reference(rule, g_np, f, d2), 1)
            if rule in ("krum", "multi-krum", "bulyan"):
                t_ref += t_dists  # the pair loop is part of the reference's work
            row.update(reference_seconds=t_ref, speedup_vs_reference=t_ref / t)
        rows.append(row)
        print(_fmt_rule(row), flush=True)
    return rows


def _step_input(workers: int, r: int, q: int, d: int, device: str) -> tuple[torch.Tensor, np.ndarray]:
    """P rows: each group's honest members hold identical gradients; q Byzantines send reversed ones."""
    groups = _matrix(workers // r, d, device)
    g = groups.repeat_interleave(r, dim=0)
    byz = np.zeros(workers, dtype=bool)
    byz[np.random.default_rng(0).choice(workers, q, replace=False)] = True
    g[torch.from_numpy(byz).to(device)] *= -100.0
    return g, byz


def bench_steps(workers: int, r: int, q: int, d: int, rules: list[str], repeats: int, device: str) -> list[dict]:
    g, byz = _step_input(workers, r, q, d, device)
    rows = []
    for rule in rules:
        out = {"rule": rule, "workers": workers, "group_size": r, "byzantine": q, "d": d, "device": device}
        for approach in ("baseline", "draco-lite"):
            f = q if approach == "baseline" else q // (r // 2 + 1)
            plan = Plan(approach=approach, workers=workers, group_size=r, byzantine=q, mode=rule, f=f)
            work = torch.empty_like(g)  # the PS step owns and overwrites its input: a fresh copy per call
            out[f"{approach}_seconds"] = timed(lambda p=plan, w=work: APPROACHES[p.approach](w, byz, p, 0)[0],
                                               repeats, device, setup=lambda w=work: w.copy_(g))
            del work
        out["speedup"] = out["baseline_seconds"] / out["draco-lite_seconds"]
        rows.append(out)
        print(f"PS step {rule:>14}  P={workers} d={d:.3g}: baseline {out['baseline_seconds']:.3f} s, "
              f"draco-lite {out['draco-lite_seconds']:.3f} s  ->  {out['speedup']:.1f}x", flush=True)
    return rows


def _fmt_rule(r: dict) -> str:
    ref = (f"  ref {r['reference_seconds']:8.3f} s ({r['speedup_vs_reference']:6.1f}x faster)"
           if "reference_seconds" in r else "")
    mem = f"  mem {r['peak_extra_x_input']:.2f}x" if r["peak_extra_x_input"] is not None else ""
    per = "/iter" if r["rule"] == "geometric-median" else ""
    return (f"{r['rule']:>16} n={r['n']:<3} d={r['d']:<9.3g} {r['seconds']:8.4f} s{per:5} "
            f"{r['x_floor']:6.1f}x floor ({r['floor_seconds']:.4f} s){mem}{ref}")


def markdown(result: dict) -> str:
    lines = ["| rule | n | d | seconds | × floor | peak extra memory (× input) | reference (s) | "
             "speedup vs reference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rules"]:
        mem = "" if r["peak_extra_x_input"] is None else f"{r['peak_extra_x_input']:.2f}"
        ref = (f"{r['reference_seconds']:.3f} | {r['speedup_vs_reference']:.1f}" if "reference_seconds" in r
               else " | ")
        per = " (per iteration)" if r["rule"] == "geometric-median" else ""
        lines.append(f"| {r['rule']}{per} | {r['n']} | {r['d']:.3g} | {r['seconds']:.4f} | {r['x_floor']:.1f} | "
                     f"{mem} | {ref} |")
    lines += ["", "| PS step | P | d | baseline (s) | draco-lite (s) | speedup |", "|---|---:|---:|---:|---:|---:|"]
    for s in result["steps"]:
        lines.append(f"| {s['rule']} | {s['workers']} | {s['d']:.3g} | {s['baseline_seconds']:.3f} | "
                     f"{s['draco-lite_seconds']:.3f} | {s['speedup']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detox.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[15, 45], help="rows (inputs of the rule)")
    parser.add_argument("--d", type=float, nargs="+", default=[1e5, 1.1e7], help="coordinates (1.1e7 ≈ ResNet-18)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--step-rules", nargs="+", default=["multi-krum", "bulyan", "coord-median"], choices=RULES)
    parser.add_argument("--workers", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the loop-style references (slow)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (and a .md table)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    dims = [int(d) for d in args.d]
    print(f"detox.bench on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}", flush=True)
    result: dict = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "device": args.device},
                    "rules": [], "steps": []}
    for d in dims:
        for n in args.n:
            result["rules"] += bench_rules(n, d, args.rules, args.repeats, args.device, not args.no_reference)
    result["steps"] = bench_steps(args.workers, 3, 5, max(dims), args.step_rules, args.repeats, args.device)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}\n\n" + markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
