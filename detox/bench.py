"""``python -m detox.bench``: time every robust rule and every approach's PS step against the memory floor and a
loop-style reference, and print a table (also written as JSON).

For each rule and each (n, d): the median time over repeats; ``floor`` = the time of one read of the same
(n, d) float32 matrix measured in the same run (``grads.sum()``); the ratio to a straightforward reference
written the way the original code did it (numpy, a Python loop over pairs of rows for distances, np.median /
np.sort for order statistics); and the peak extra memory during the call, in units of the input matrix.
At d = 1e3 the time is the rule's per-call overhead.

Then, per d, the PS step (vote, buckets, rule) of ``vanilla-X`` against ``detox-X`` for X in ``--step-rules``,
each plan composed from its preset (``conf/method/``, via ``detox.bench_scaling.preset_plan``: the original's
Boyer-Moore vote per layer, buckets, counts) at P workers, q = floor(P / 9), r = 3, ResNet-18's layer sizes
scaled to d; the workers' gradients are refilled (each group's honest gradient, the preset's attack) before
every step, untimed; the two steps alternate, so both are sampled under the same load, and below 2^24 elements
(P x d) at least 50 of each are timed. Printed per rule: both medians, baseline / DETOX, the vote's share of the
DETOX step and the vote against one read of the P rows it receives (it compares 2 of the 3 members of a group whose
first two are honest and agree, all 3 otherwise: ``detox.kernels._majority_first``). DETOX-Multi-Krum's vote at
d = 1.1e7 also forms its buckets' Gram matrices in the same pass (``approaches._vote_with_grams``): its vote time
includes them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from detox.aggregators import AGGREGATORS, _row_dists, _weighted_rows, requirement_error
from detox.approaches import APPROACHES
from detox.results import write_text_atomic

RULES = tuple(AGGREGATORS)
PAGE = os.sysconf("SC_PAGE_SIZE")
METHOD_DIR = Path(__file__).resolve().parents[1] / "conf" / "method"
# the rules whose PS step can be compared: a vanilla-X and a detox-X preset both exist (conf/method/)
STEP_RULES = tuple(r for r in RULES if all((METHOD_DIR / f"{k}-{r}.yaml").is_file() for k in ("vanilla", "detox")))


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
    """f = 5, or the largest f the rule accepts at n (the median-type rules need n > 2f)."""
    half = (n - 1) // 2
    bounds = {"krum": (n - 3) // 2, "multi-krum": (n - 3) // 2, "bulyan": (n - 3) // 4, "trimmed-mean": half,
              "coord-median": half, "geometric-median": half, "sign-sgd": half}
    return min(5, bounds.get(rule, 5))


# ------------------------------------------------------------------------------- benchmarks


# the rules whose least work is a multiply-add count: Krum-type rules need the n(n+1)/2 distinct entries of the
# (n, n) Gram matrix, d multiply-adds each (any method: n(n-1)/2 distances of d terms at the least); one Weiszfeld
# iteration of the geometric median is a distance pass and a weighted sum, d per row each
MIN_FMA: dict[str, Callable[[int, int], float]] = {
    "krum": lambda n, d: n * (n + 1) / 2 * d,
    "multi-krum": lambda n, d: n * (n + 1) / 2 * d,
    "bulyan": lambda n, d: n * (n + 1) / 2 * d,
    "geometric-median": lambda n, d: 2.0 * n * d,
}


def fma_rate(device: str, repeats: int = 20) -> float:
    """Multiply-adds per second that torch's BLAS reaches here now: the median time of a float32 matmul of
    square matrices (512 on the CPU, 4096 on a GPU; cache-resident, compute-bound), with the process's threads.
    Dividing a rule's least multiply-add count by it gives the time no implementation on this host beats by
    much: the compute bound (``MIN_FMA``)."""
    s = 4096 if device.startswith("cuda") else 512
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn((s, s), generator=gen).to(device) for _ in range(2))
    return s**3 / timed(lambda: a @ b, repeats, device)


def bench_rules(n: int, d: int, rules: list[str], repeats: int, device: str, with_reference: bool,
                fma_per_s: float | None = None) -> list[dict]:
    # a per-call overhead (small d) is a fraction of a millisecond: a median over 5 calls is mostly scheduler noise
    repeats = repeats if n * d > 1 << 20 else max(repeats, 200)
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
        if fma_per_s and rule in MIN_FMA:
            bound = MIN_FMA[rule](n, d) / fma_per_s
            row.update(compute_bound_seconds=bound, x_compute_bound=t / bound, bound_x_floor=bound / floor)
        if with_reference:
            t_ref = timed(reference(rule, g_np, f, d2), 1)
            if rule in ("krum", "multi-krum", "bulyan"):
                t_ref += t_dists  # the pair loop is part of the reference's work
            row.update(reference_seconds=t_ref, speedup_vs_reference=t_ref / t)
        rows.append(row)
        print(_fmt_rule(row), flush=True)
    return rows


# below this many elements (P x d) a PS step takes a few ms: it is repeated at least _STEADY_REPEATS times
_STEADY_ELEMS = 1 << 24
_STEADY_REPEATS = 50


def bench_steps(workers: int, d: int, rules: list[str], repeats: int, device: str) -> list[dict]:
    """Per rule, the PS step (vote, buckets, rule) of vanilla-X and DETOX-X as their presets run it."""
    import dataclasses

    from detox.bench_scaling import PAPER_NETWORK, honest_groups, layer_sizes, preset_plan, scale_layers

    plans = {(rule, kind): preset_plan(f"{kind}-{rule}", workers, PAPER_NETWORK)
             for rule in rules for kind in ("vanilla", "detox")}
    cfg0 = next(iter(plans.values()))[1]
    layers = scale_layers(layer_sizes(cfg0), d)
    r = int(cfg0.group_size)
    groups = honest_groups(workers // r, d)
    host = torch.empty((workers, d))  # filled on the CPU (the attacks' code), copied to the device
    work = host if device == "cpu" else torch.empty((workers, d), device=device)
    # one read of the P rows the vote receives (it compares 2 or 3 members per group, r = 3),
    # timed on written rows (an untouched allocation reads the shared zero page, far faster than memory)
    work.view(workers // r, r, d).copy_(groups[: workers // r, None, :].to(device))
    floor = timed(lambda: work.sum(), max(repeats, 5), device)
    out_d = torch.empty(d, device=device)  # where the step's aggregate goes, as ParameterServer.step gives it
    # steps of a few ms: enough of them that a median is stable on a shared machine (5 swung the ratio by 10 %)
    repeats = repeats if workers * d >= _STEADY_ELEMS else max(repeats, _STEADY_REPEATS)
    rows = []
    for rule in rules:
        out = {"rule": rule, "workers": workers, "group_size": r, "d": d, "device": device, "read_seconds": floor,
               "repeats": repeats}
        kinds = {}
        for kind in ("vanilla", "detox"):
            plan, cfg, note = plans[(rule, kind)]
            if plan is None:
                raise SystemExit(f"{kind}-{rule} at P = {workers}: {note}")
            kinds[kind] = (dataclasses.replace(plan, layer_sizes=layers), cfg)
            out.update({f"{kind}_byzantine": plan.byzantine, f"{kind}_f": plan.f, f"{kind}_note": note})
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        votes = []
        for i in range(repeats + 1):  # a warm-up step, then the repeats
            for kind, (plan, cfg) in kinds.items():  # alternated: both sampled under the same load
                byz = _refill(work, host, groups, plan, cfg, i, device)
                t0 = time.perf_counter()
                _, diag = APPROACHES[plan.approach](work, byz, plan, i, out=out_d)
                _sync(device)
                if i:
                    times[kind].append(time.perf_counter() - t0)
                    if kind == "detox":
                        votes.append(diag["t_vote"])
        for kind in kinds:
            out[f"{kind}_seconds"] = statistics.median(times[kind])
        out["vote_seconds"] = statistics.median(votes)
        plan, cfg = kinds["detox"]
        out["read_after_fill_seconds"] = _read_after_fill(work, host, groups, plan, cfg, repeats, device)
        out["speedup"] = out["vanilla_seconds"] / out["detox_seconds"]
        out["vote_share"] = out["vote_seconds"] / out["detox_seconds"]
        out["vote_x_read"] = out["vote_seconds"] / floor
        out["vote_x_read_after_fill"] = out["vote_seconds"] / out["read_after_fill_seconds"]
        rows.append(out)
        print(f"PS step {rule:>14}  P={workers} d={d:.3g}: vanilla {out['vanilla_seconds']:.4f} s, DETOX "
              f"{out['detox_seconds']:.4f} s -> {out['speedup']:.1f}x; vote {out['vote_seconds']:.4f} s "
              f"({out['vote_share']:.0%} of DETOX, {out['vote_x_read']:.1f}x one read of the P rows, "
              f"{out['vote_x_read_after_fill']:.1f}x one read right after the refill)", flush=True)
    return rows


def _refill(work: torch.Tensor, host: torch.Tensor, groups: torch.Tensor, plan: object, cfg: object, step: int,
            device: str) -> np.ndarray:
    """What reaches the PS at ``step`` (``bench_scaling.fill`` on the CPU, copied to the device): the Byzantine mask."""
    from detox.attacks import byzantine_mask
    from detox.bench_scaling import fill

    byz = byzantine_mask(str(cfg.adversary.placement), step, work.shape[0], plan.byzantine, plan.unit_size, plan.seed)
    fill(host, groups, plan, byz, cfg, step)
    if work is not host:
        work.copy_(host)
    _sync(device)
    return byz


def _read_after_fill(work: torch.Tensor, host: torch.Tensor, groups: torch.Tensor, plan: object, cfg: object,
                     repeats: int, device: str) -> float:
    """One read of the rows (``work.sum()``) timed where the vote meets them: right after each refill (rows
    partly out of cache, thread pools idle or busy as the step finds them), median over the repeats."""
    times = []
    for i in range(repeats + 1):
        _refill(work, host, groups, plan, cfg, i, device)
        t0 = time.perf_counter()
        work.sum()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_rule(r: dict) -> str:
    ref = (f"  ref {r['reference_seconds']:8.3f} s ({r['speedup_vs_reference']:6.1f}x faster)"
           if "reference_seconds" in r else "")
    mem = f"  mem {r['peak_extra_x_input']:.2f}x" if r["peak_extra_x_input"] is not None else ""
    per = "/iter" if r["rule"] == "geometric-median" else ""
    bound = (f"  {r['x_compute_bound']:5.1f}x compute bound (itself {r['bound_x_floor']:.1f}x floor)"
             if "x_compute_bound" in r else "")
    return (f"{r['rule']:>16} n={r['n']:<3} d={r['d']:<9.3g} {r['seconds'] * 1e3:9.3f} ms{per:5} "
            f"{r['x_floor']:6.1f}x floor ({r['floor_seconds']:.4f} s){bound}{mem}{ref}")


def markdown(result: dict) -> str:
    lines = ["| rule | n | d | ms | × floor | × compute bound | compute bound × floor | peak extra memory (× input) | "
             "reference (s) | speedup vs reference |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rules"]:
        mem = "" if r["peak_extra_x_input"] is None else f"{r['peak_extra_x_input']:.2f}"
        ref = (f"{r['reference_seconds']:.3f} | {r['speedup_vs_reference']:.1f}" if "reference_seconds" in r
               else " | ")
        bound = (f"{r['x_compute_bound']:.1f} | {r['bound_x_floor']:.1f}" if "x_compute_bound" in r else " | ")
        per = " (per iteration)" if r["rule"] == "geometric-median" else ""
        lines.append(f"| {r['rule']}{per} | {r['n']} | {r['d']:.3g} | {r['seconds'] * 1e3:.3f} | {r['x_floor']:.1f} | "
                     f"{bound} | {mem} | {ref} |")
    lines += ["", "| PS step (vote + buckets + rule) | P | d | vanilla (s) | DETOX (s) | vanilla / DETOX | vote (s) | "
              "vote share | vote × one read | vote × one read after the refill |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["steps"]:
        lines.append(f"| {s['rule']} | {s['workers']} | {s['d']:.3g} | {s['vanilla_seconds']:.4f} | "
                     f"{s['detox_seconds']:.4f} | {s['speedup']:.1f} | {s['vote_seconds']:.4f} | "
                     f"{s['vote_share']:.0%} | {s['vote_x_read']:.1f} | {s['vote_x_read_after_fill']:.1f} |")
    if result["machine"].get("gpu"):
        lines += ["", f"GPU: {result['machine']['gpu']} (torch {result['machine']['torch']})"]
    if result["machine"].get("fma_per_s"):
        lines += ["", f"Compute bound: the rule's least multiply-adds (Krum, Multi-Krum, Bulyan: the n(n+1)/2·d of "
                      f"the Gram matrix; geometric median: 2nd per iteration) at the rate a square float32 matmul "
                      f"(512 on the CPU, 4096 on a GPU) reached in this run: "
                      f"{result['machine']['fma_per_s'] / 1e9:.1f} G/s"]
    load = result["machine"].get("loadavg")
    if load:
        lines += ["", f"Load average (1 min) at start / end: {load[0]} / {load[1]}"]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    """The 1-minute load average (the machine may be shared)."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "n/a"


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (MemAvailable); None where /proc/meminfo cannot say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


DISTANCE_RULES = {"krum", "multi-krum", "bulyan"}  # they hold (n, n) matrices


def peak_bytes(ns: list[int], dims: list[int], workers: int, with_reference: bool = True,
               rules: list[str] | tuple[str, ...] = ("krum",)) -> int:
    """About what the largest measurement holds at once, float32: a rule's (n, d) input with up to two (n, d)
    working copies in the loop-style references (their sorts, Bulyan's selection) or half of one in the kernels,
    or the PS step's (P, d) rows, the (P / 3, d) group gradients they are refilled from, and a few d-vectors; plus
    the distance-type rules' (n, n) matrices (float64 and their Gram, or the references' Python lists of floats),
    which at a large n outweigh the rows."""
    d = max(dims)
    n = max(*ns, workers) if set(rules) & DISTANCE_RULES else workers
    rows = 3 * max(ns) if with_reference else (3 * max(ns) + 1) // 2
    return max(rows * d, (workers + workers // 3 + 4) * d) * 4 + n * n * (40 if with_reference else 16)


def check_out(out: Path) -> str | None:
    """Why the results cannot be written to ``out`` (and ``out.md``), checked before any measurement; None if
    they can."""
    if out.name in ("", ".", ".."):
        return f"--out {out}: give a file name for the JSON results, e.g. {out / 'bench.json'}"
    md = out.with_suffix(".md")
    if md == out:
        return f"--out {out}: the table goes to {md}: give the JSON file, e.g. {out.with_suffix('.json')}"
    for path in (out, md):
        if path.exists() and not path.is_file():
            return f"--out {out}: {path} is a folder, not a file"
    folder = out.parent
    if not folder.is_dir():
        return f"--out {out}: its folder {folder} does not exist" if not folder.exists() else \
            f"--out {out}: {folder} is not a folder"
    return cannot_write(out, folder)


def cannot_write(out: Path, folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (for ``--out out``), or None: a real probe, since os.access says yes
    to root on a read-only mount's folders."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".detox-bench-"):
            pass
    except OSError as err:
        return f"--out {out}: cannot write in {folder} ({err.strerror or err})"
    return None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument that cannot run is refused here, in one line (argparse's usage, exit 2), before the first
    measurement: a long benchmark must not fail at its end, or after allocating what the machine does not have."""
    bad = [d for d in args.d if not math.isfinite(d)]
    if bad:
        parser.error(f"--d {bad[0]}: give a number of coordinates >= 1")
    if args.repeats < 1 or min(args.n) < 1 or min(args.d) < 1 or args.workers < 3:
        parser.error(f"--repeats, every --n and every --d must be >= 1 and --workers >= 3; got --repeats "
                     f"{args.repeats}, --n {args.n}, --d {args.d}, --workers {args.workers}")
    if args.workers % 3:
        parser.error(f"--workers {args.workers}: the PS step's presets put workers in groups of 3; give a multiple "
                     f"of 3")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        parser.error(f"--device {args.device}: not a device ({str(err).splitlines()[0]})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: give cpu or cuda")
    need = peak_bytes(args.n, [int(d) for d in args.d], args.workers, not args.no_reference, args.rules)
    have = available_memory()
    if have is not None and need > have:
        parser.error(f"--n {max(args.n)} --d {max(args.d):g} --workers {args.workers}: the largest measurement needs "
                     f"about {need / 2**30:.1f} GiB and {have / 2**30:.1f} GiB is available; give a smaller --d, --n "
                     f"or --workers")
    for rule in args.rules:  # each rule's own check of (n, f): arithmetic only, instant at any n
        for n in args.n:
            if (err := requirement_error(rule, n, _f_for(rule, n))) is not None:
                parser.error(f"--n {n}: too few rows for {rule} ({err})")
    if (why := check_out(args.out)) is not None:
        parser.error(why)
    from detox.bench_scaling import PAPER_NETWORK, preset_plan

    for rule in args.step_rules:  # the presets at --workers, as bench_steps composes them
        for kind in ("vanilla", "detox"):
            plan, _, note = preset_plan(f"{kind}-{rule}", args.workers, PAPER_NETWORK)
            if plan is None:
                parser.error(f"--workers {args.workers}: {kind}-{rule} {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detox.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[15, 45], help="rows (inputs of the rule)")
    parser.add_argument("--d", type=float, nargs="+", default=[1e3, 1e5, 1.1e7],
                        help="coordinates (1e3: per-call overhead; 1.1e7 ≈ ResNet-18)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--step-rules", nargs="+", default=["multi-krum", "bulyan", "coord-median"],
                        choices=STEP_RULES, help="rules whose PS step is compared (those with both presets)")
    parser.add_argument("--workers", type=int, default=45, help="P for the PS step (a multiple of 3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the loop-style references (slow)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (and a .md table)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    dims = [int(d) for d in args.d]
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    print(f"detox.bench on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
          + (f" ({gpu})" if gpu else ""), flush=True)
    load0 = loadavg()
    print(f"load average {load0}", flush=True)
    result: dict = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "device": args.device, "gpu": gpu},
                    "rules": [], "steps": []}
    rate = fma_rate(args.device)
    result["machine"]["fma_per_s"] = rate
    print(f"compute: {rate / 1e9:.1f} G multiply-adds/s (float32 matmul, {torch.get_num_threads()} threads): "
          f"the compute bound of {', '.join(MIN_FMA)}", flush=True)
    for d in dims:
        for n in args.n:
            result["rules"] += bench_rules(n, d, args.rules, args.repeats, args.device, not args.no_reference, rate)
    for d in dims:
        result["steps"] += bench_steps(args.workers, d, args.step_rules, args.repeats, args.device)
    result["machine"]["loadavg"] = [load0, loadavg()]
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), markdown(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}\n\n" + markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
