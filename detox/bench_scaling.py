"""The paper's scale, measured (issue #11 item 7).

``python -m detox.bench_scaling scaling`` — Claim 2: the PS step (vote, buckets, rule, update) of vanilla X and
DETOX-X, X in {multi-krum, bulyan, coord-median}, as the number of workers P grows, with r = 3, q = floor(P / 9)
and d = ResNet-18's parameter count (or the largest d that fits ``--max-gib`` at the largest P). Each method's
plan is composed from its preset (``conf/method/``) exactly as a training job composes it, so the benchmark runs
what the presets run. Per (method, P): the median of ``--repeats`` steps after a warm-up, on P rows where each
group's honest members send the same gradient and the Byzantine workers (redrawn every step, as in training)
send the preset's attack; then a least-squares fit of log(seconds) = a + b log(P) per method, a table and a
log-log plot. ``replot <folder>`` redraws them from the saved scaling.json.

``python -m detox.bench_scaling split multirun/fig_c_paper [more roots]`` — Figure C at ResNet-18 size: the
per-iteration split (compute, vote, aggregate, update; per-step medians from metrics.jsonl) of the sweep
``fig_c_paper``, the aggregation's share of the iteration and what DETOX saves per iteration, as a table and a
figure. Several roots (repeated runs of the sweep) are shown side by side.

``python -m detox.bench_scaling iteration`` — the same split measured in one process: one worker's
forward/backward of ResNet-18 alternating with each method's PS step at P = 45, so that compute and aggregation
are sampled under the same load (the sweep's jobs run minutes apart on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import io
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.stats import linregress

import detox.results  # noqa: F401 - registers the resolvers the configs use
import detox.schema  # noqa: F401
from detox.approaches import Plan
from detox.attacks import byzantine_mask
from detox.bench import available_memory, cannot_write
from detox.config import ConfigError, validate
from detox.models import MODELS, bind_flat, build_model, gradient
from detox.results import job_dirs, write_atomic, write_text_atomic
from detox.step import ParameterServer, apply_attack

CONF = Path(__file__).resolve().parents[1] / "conf"
RULES = ("multi-krum", "bulyan", "coord-median")
METHODS = tuple(f"{kind}-{rule}" for rule in RULES for kind in ("vanilla", "detox"))
PHASES = ("t_compute", "t_vote", "t_aggregate", "t_update")
# the network whose size the paper measured: ResNet-18 (CIFAR stem) on 3x32x32 inputs, d = 11,173,962
PAPER_NETWORK = ("network=resnet18", "dataset=synthetic", "dataset.shape=[3,32,32]")
SCALING_COLUMNS = ("method", "rule", "approach", "workers", "group_size", "byzantine", "f", "rule_inputs", "d",
                   "repeats", "t_step", "t_step_min", "t_vote", "t_aggregate", "t_update", "note")
SPLIT_COLUMNS = ("run", "method", "rule", "status", "steps", *PHASES, "t_step", "aggregate_share", "ps_share")
GIB = 2**30


def rule_of(method: str) -> str:
    return method.split("-", 1)[1]


# ------------------------------------------------------------------------------------------ presets -> plans


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    """The job config a training run with these overrides would get (conf/config.yaml + presets)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=list(overrides))


@functools.lru_cache(maxsize=64)
def _method_cfg(method: str, extra: tuple[str, ...]) -> DictConfig:
    return compose_cfg([f"method={method}", *extra])


def preset_plan(method: str, workers: int, extra: Sequence[str] = ()) -> tuple[Plan | None, DictConfig, str]:
    """The plan ``method=<method> workers=<P>`` runs, validated as a training job would be.

    q is the config's default, floor(P / 9). Some presets fix a bucket count, so at other P they refuse that q
    (DETOX-median's 5 buckets need f = floor(q / 2) < 2.5); then the largest q the preset accepts is used and the
    note says so. None when no q fits (DETOX-Multi-Krum's 2 buckets at P = 15 hold 3 and 2 winners).

    The preset is composed once per method (Hydra's compose takes ~0.3-1.5 s here); ``workers`` and
    ``worker_fail`` are then set on a copy, which is what the overrides ``workers=P worker_fail=q`` do: nothing in
    the defaults list depends on them, and the keys that interpolate them (q's default) resolve afterwards."""
    cfg = copy.deepcopy(_method_cfg(method, tuple(extra)))
    cfg.workers = int(workers)
    q0 = int(cfg.worker_fail)
    first: ConfigError | None = None
    for q in range(q0, -1, -1):
        cfg.worker_fail = q
        try:
            plan = validate(cfg)
        except ConfigError as err:
            first = first or err
            continue
        return plan, cfg, "" if q == q0 else f"q={q0} refused by the preset; largest q that fits"
    return None, cfg, f"refused: {first}"


def layer_sizes(cfg: DictConfig) -> tuple[int, ...]:
    """The network's parameter tensor sizes in flat order (the layers of the original's per-layer vote), built on
    the meta device: no memory."""
    params = {k: v for k, v in cfg.network.items() if k not in ("name", "input_shape")}
    with torch.device("meta"):
        model = MODELS[cfg.network.name](tuple(cfg.dataset.shape), int(cfg.dataset.num_classes), **params)
    return tuple(p.numel() for p in model.parameters())


def scale_layers(sizes: Sequence[int], d: int) -> tuple[int, ...]:
    """``sizes`` rescaled to sum to d, keeping the number of layers and their proportions (a smaller d than the
    network's still votes over as many layers)."""
    total = sum(sizes)
    if d == total:
        return tuple(sizes)
    if d < len(sizes):
        return (d,)
    s = np.maximum(1, np.floor(np.asarray(sizes, dtype=np.float64) * d / total)).astype(np.int64)
    s[int(np.argmax(s))] += d - int(s.sum())
    return tuple(int(x) for x in s)


# ------------------------------------------------------------------------------------------ the PS step's cost


def peak_bytes(max_workers: int, group_size: int, d: int) -> int:
    """What the benchmark holds at once: the (P, d) matrix the PS step works on, the (P/r, d) honest group
    gradients it is refilled from, weights, momentum and the rules' few d-vectors (bucket outputs, results),
    plus ~0.6 GiB of interpreter, torch and numba."""
    return (max_workers + max_workers // group_size + 12) * d * 4 + int(0.6 * GIB)


def largest_d(max_workers: int, group_size: int, d: int, max_bytes: int) -> int:
    """d, or the largest d (a multiple of 1000) whose benchmark fits ``max_bytes``."""
    if peak_bytes(max_workers, group_size, d) <= max_bytes:
        return d
    per = (max_workers + max_workers // group_size + 12) * 4
    return max(1000, (max_bytes - int(0.6 * GIB)) // per // 1000 * 1000)


def honest_groups(k: int, d: int, seed: int = 0) -> torch.Tensor:
    """(k, d) float32: a shared direction plus per-group noise, so that distance-based rules do real work; filled
    row by row so that no (k, d) temporary is ever allocated."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    out = torch.empty((k, d))
    for i in range(k):
        torch.randn(d, generator=gen, out=out[i])
        out[i].mul_(0.5).add_(base)
    return out


def fill(work: torch.Tensor, groups: torch.Tensor, plan: Plan, byz: np.ndarray, cfg: DictConfig, step: int) -> None:
    """What reaches the PS at one step: each group's members hold their group's honest gradient (in ``baseline``
    every worker draws its own batch, so its rows are made distinct), then the Byzantine rows are overwritten
    with the preset's attack, colluding within a group, by the code training uses."""
    p, d = work.shape
    r = plan.group_size
    work.view(p // r, r, d).copy_(groups[: p // r, None, :])
    if not plan.grouped:
        work.add_(torch.arange(p, dtype=work.dtype)[:, None], alpha=1e-3)
    params = {k: v for k, v in cfg.err_mode.items() if k != "name"}
    apply_attack(work, byz, plan, str(cfg.err_mode.name), params, step)


def time_ps_step(plan: Plan, cfg: DictConfig, work: torch.Tensor, groups: torch.Tensor, repeats: int,
                 warmup: int = 1, compute: Callable[[], object] | None = None) -> dict:
    """Median seconds of ``ParameterServer.step`` (vote, buckets, rule, momentum update; the attack is the
    workers' doing and is applied before the clock starts) and of its phases, over ``repeats`` steps.

    ``compute`` (one worker's forward/backward) is timed before each step, so that compute and PS step are
    sampled alternately under the same load: their ratio is a same-run ratio even on a busy machine."""
    d = work.shape[1]
    ps = ParameterServer(plan, torch.zeros(d), attack=str(cfg.err_mode.name), attack_params={}, lr=1e-3,
                         momentum=float(cfg.momentum))
    steps: list[float] = []
    phases: dict[str, list[float]] = {k: [] for k in ("t_vote", "t_aggregate", "t_update")}
    computes: list[float] = []
    for i in range(warmup + repeats):
        if compute is not None:
            t0 = time.perf_counter()
            compute()
            computes.append(time.perf_counter() - t0)
        byz = byzantine_mask(str(cfg.adversary.placement), i, plan.workers, plan.byzantine, plan.unit_size,
                             plan.seed)
        fill(work, groups, plan, byz, cfg, i)
        t0 = time.perf_counter()
        diag = ps.step(i, work, byz, attack_at_ps=False)
        t = time.perf_counter() - t0
        if i >= warmup:
            steps.append(t)
            for k in phases:
                phases[k].append(float(diag.get(k, 0.0)))
    out = {"t_step": statistics.median(steps), "t_step_min": min(steps),
           **{k: statistics.median(v) for k, v in phases.items()}}
    if compute is not None:
        out["t_compute"] = statistics.median(computes[warmup:])
    return out


def bench_scaling(workers: Sequence[int], d: int | None = None, methods: Sequence[str] = METHODS,
                  repeats: int = 3, warmup: int = 1, extra: Sequence[str] = PAPER_NETWORK,
                  max_bytes: int = 8 * GIB, log: bool = True) -> tuple[list[dict], dict]:
    """One row per (method, P); and the setting (d, why that d, the memory it needed)."""
    workers = sorted(workers)
    plans = {(m, p): preset_plan(m, p, extra) for p in workers for m in methods}
    cfg0 = next(iter(plans.values()))[1]
    sizes = layer_sizes(cfg0)
    r = int(cfg0.group_size)
    want = sum(sizes) if d is None else int(d)
    d = largest_d(max(workers), r, want, max_bytes)
    setting = {"network": str(cfg0.network.name), "network_d": sum(sizes), "d": d, "layers": len(sizes),
               "group_size": r, "max_gib": max_bytes / GIB,
               "d_note": ("the network's parameter count" if d == sum(sizes) else
                          f"the largest d that fits {max_bytes / GIB:.1f} GiB at P = {max(workers)}" if d < want
                          else "as asked"),
               "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__}
    layers = scale_layers(sizes, d)
    if log:
        print(f"bench_scaling: d = {d:,} ({setting['d_note']}), {len(layers)} layers, r = {r}, P in {workers}, "
              f"{repeats} repeats; expected peak {peak_bytes(max(workers), r, d) / GIB:.1f} GiB", flush=True)
    groups = honest_groups(max(workers) // r, d)
    buffer = torch.empty((max(workers), d))
    rows = []
    for p in workers:
        work = buffer[:p]  # the first p rows of one buffer: contiguous, no reallocation per P
        for m in methods:
            plan, cfg, note = plans[(m, p)]
            row = dict.fromkeys(SCALING_COLUMNS, None) | {
                "method": m, "rule": rule_of(m), "workers": p, "group_size": r, "d": d, "repeats": repeats,
                "note": note}
            if plan is not None:
                plan = dataclasses.replace(plan, layer_sizes=layers)
                row.update(approach=plan.approach, byzantine=plan.byzantine, f=plan.f, rule_inputs=plan.rule_inputs,
                           **time_ps_step(plan, cfg, work, groups, repeats, warmup))
            rows.append(row)
            if log:
                t = "n/a" if row["t_step"] is None else f"{row['t_step']:.3f} s"
                print(f"  P={p:<3} {m:<21} q={row['byzantine']} f={row['f']} inputs={row['rule_inputs']}: "
                      f"{t}  {note}", flush=True)
    setting["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return rows, setting


def bench_iteration(workers: int = 45, methods: Sequence[str] = METHODS, repeats: int = 5, warmup: int = 1,
                    extra: Sequence[str] = PAPER_NETWORK, log: bool = True) -> tuple[list[dict], dict]:
    """Figure C's split at the presets' setting measured in one process: per method, one worker's forward/backward
    of the real network (the config's batch_size, random inputs of the dataset's shape) alternating with the PS
    step at P workers; rows in ``read_split``'s format (run = "bench"), compute = the median unit."""
    plans = {m: preset_plan(m, workers, extra) for m in methods}
    cfg0 = next(iter(plans.values()))[1]
    params = {k: v for k, v in cfg0.network.items() if k not in ("name", "input_shape")}
    shape, classes = tuple(cfg0.dataset.shape), int(cfg0.dataset.num_classes)
    model = build_model(str(cfg0.network.name), shape, classes, int(cfg0.seed), params)
    _, g_d = bind_flat(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((int(cfg0.batch_size), *shape), generator=gen)
    y = torch.randint(0, classes, (int(cfg0.batch_size),), generator=gen)
    d, r = g_d.numel(), int(cfg0.group_size)
    layers = layer_sizes(cfg0)
    setting = {"network": str(cfg0.network.name), "d": d, "workers": workers, "batch_size": int(cfg0.batch_size),
               "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__}
    if log:
        print(f"bench_iteration: {setting['network']} d = {d:,}, P = {workers}, batch {setting['batch_size']}, "
              f"{repeats} repeats, {setting['threads']} threads", flush=True)
    groups = honest_groups(workers // r, d)
    work = torch.empty((workers, d))
    rows = []
    for m in methods:
        plan, cfg, note = plans[m]
        row = dict.fromkeys(SPLIT_COLUMNS, None) | {"run": "bench", "method": m, "rule": rule_of(m),
                                                    "status": "refused" if plan is None else "completed",
                                                    "steps": repeats}
        if plan is not None:
            plan = dataclasses.replace(plan, layer_sizes=layers)
            t = time_ps_step(plan, cfg, work, groups, repeats, warmup,
                             compute=lambda: gradient(model, g_d, x, y))
            row.update({k: t[k] for k in PHASES})
            row["t_step"] = sum(row[k] for k in PHASES)
            row["aggregate_share"] = row["t_aggregate"] / row["t_step"]
            row["ps_share"] = (row["t_vote"] + row["t_aggregate"] + row["t_update"]) / row["t_step"]
        rows.append(row)
        if log and plan is not None:
            print(f"  {m:<21} compute {row['t_compute']:.3f} s, vote {row['t_vote']:.3f}, aggregate "
                  f"{row['t_aggregate']:.3f}, update {row['t_update']:.3f}  {note}", flush=True)
    setting["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return rows, setting


def fit_exponents(rows: Iterable[dict]) -> dict[str, dict]:
    """Per method, the least-squares fit log(t_step) = a + b log(P) over the measured points: b, its standard
    error b_se, a, r^2."""
    by: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("t_step") is not None:
            by.setdefault(r["method"], []).append((r["workers"], r["t_step"]))
    fits = {}
    for m, pts in by.items():
        x, y = np.log([p for p, _ in pts]), np.log([t for _, t in pts])
        if len(pts) < 2 or np.ptp(x) == 0:
            fits[m] = {"b": math.nan, "b_se": math.nan, "a": math.nan, "r2": math.nan, "points": len(pts)}
            continue
        fit = linregress(x, y)
        # two points fit exactly: no residual to estimate an error from
        se = float(fit.stderr) if len(pts) > 2 else math.nan
        fits[m] = {"b": float(fit.slope), "b_se": se, "a": float(fit.intercept), "r2": float(fit.rvalue**2),
                   "points": len(pts)}
    return fits


def scaling_markdown(rows: list[dict], fits: dict[str, dict], setting: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    workers = sorted({r["workers"] for r in rows})
    at = {(r["method"], r["workers"]): r for r in rows}

    def sec(m: str, p: int) -> str:
        r = at.get((m, p))
        return "n/a" if r is None or r["t_step"] is None else f"{r['t_step']:.3f}"

    lines = [f"PS step seconds (median of {rows[0]['repeats']}), d = {setting['d']:,}, r = {setting['group_size']}, "
             f"q = floor(P/9) unless marked*", "",
             "| P | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for p in workers:
        cells = []
        for m in methods:
            r = at.get((m, p))
            mark = "*" if r is not None and r["note"] and r["t_step"] is not None else ""
            cells.append(sec(m, p) + mark)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    def exponent(m: str) -> str:
        fit = fits.get(m)
        if fit is None or not math.isfinite(fit["b"]):
            return "n/a"
        return f"{fit['b']:.2f}" + (f" ± {fit['b_se']:.2f}" if math.isfinite(fit["b_se"]) else "")

    lines.append("| fitted exponent b (± s.e.) | " + " | ".join(exponent(m) for m in methods) + " |")
    rules = [x for x in RULES if f"vanilla-{x}" in methods and f"detox-{x}" in methods]
    if rules:
        lines += ["", "Speedup of the PS step, vanilla X / DETOX-X", "",
                  "| P | " + " | ".join(rules) + " |", "|---:|" + "---:|" * len(rules)]
        for p in workers:
            cells = []
            for x in rules:
                v, t = at.get((f"vanilla-{x}", p)), at.get((f"detox-{x}", p))
                ok = v and t and v["t_step"] is not None and t["t_step"] is not None
                cells.append(f"{v['t_step'] / t['t_step']:.1f}×" if ok else "n/a")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    notes = sorted({(r["workers"], r["method"], r["byzantine"], r["note"]) for r in rows if r["note"]},
                   key=lambda x: (x[0], x[1]))
    if notes:
        lines += [""] + [f"* P = {p}, {m}: " + (f"q = {q} ({n})" if q is not None else n) for p, m, q, n in notes]
    return "\n".join(lines) + "\n"


def plot_scaling(rows: list[dict], fits: dict[str, dict]):  # -> matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(RULES, ("tab:blue", "tab:red", "tab:green"), strict=True))
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["workers"], r["t_step"]) for r in rows if r["method"] == m and r["t_step"] is not None)
        if not pts:
            continue
        x, y = np.array(pts, dtype=float).T
        fit = fits.get(m, {})
        b = fit.get("b", math.nan)
        label = f"{m} (b = {b:.2f})" if math.isfinite(b) else m
        vanilla = m.startswith("vanilla")
        ax.plot(x, y, "o-" if vanilla else "s--", color=colours.get(rule_of(m), "k"), label=label,
                mfc="white" if not vanilla else None)
        if math.isfinite(b):
            xs = np.geomspace(x.min(), x.max(), 20)
            ax.plot(xs, np.exp(fit["a"]) * xs**b, ":", color=colours.get(rule_of(m), "k"), lw=0.8)
    workers = sorted({r["workers"] for r in rows})
    times = [r["t_step"] for r in rows if r["t_step"] is not None]
    if len(workers) > 1 and times:
        # guides for Claim 2's words: linear and quadratic in P, through the geometric mean of the smallest P's
        p0, t0 = workers[0], float(np.exp(np.mean(np.log(
            [r["t_step"] for r in rows if r["workers"] == workers[0] and r["t_step"] is not None] or times))))
        xs = np.array([workers[0], workers[-1]], dtype=float)
        for k, style in ((1, (0, (6, 3))), (2, (0, (2, 2)))):
            ax.plot(xs, t0 * (xs / p0) ** k, color="0.6", lw=1, ls=style, zorder=0,
                    label="∝ P" if k == 1 else "∝ P²")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(workers)
    ax.set_xticklabels([str(p) for p in workers])
    ax.minorticks_off()
    # labelled ticks at 1-2-5 steps: a log axis spanning one decade otherwise shows a single label
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("workers P (r = 3, q ≈ P/9)")
    ax.set_ylabel("PS step (s): vote + aggregation + update")
    d = rows[0]["d"]
    ax.set_title(f"PS step cost vs P at d = {d:,} (log-log; b = fitted exponent)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def write_scaling(rows: list[dict], fits: dict[str, dict], setting: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "scaling.csv", SCALING_COLUMNS, rows)
    write_text_atomic(out / "scaling.json", json.dumps({"command": command, "setting": setting, "rows": rows,
                                                         "fits": fits}, indent=2) + "\n")
    write_text_atomic(out / "scaling.md", f"```bash\n{command}\n```\n\n" + scaling_markdown(rows, fits, setting))
    save_figure(plot_scaling(rows, fits), out / "scaling")


# ------------------------------------------------------------------------------------------ Figure C, paper size


def read_split(root: str | Path) -> list[dict]:
    """One row per job of the sweep: per-step medians of the phases over the last metrics window (the
    ``*_median`` keys; the means where a record predates them), their sum and the PS side's shares. A job whose
    summary or records are not a run's (``analysis.load``'s checks) is skipped with one warning."""
    from analysis.load import job_summary, read_run_records, warn

    rows = []
    for job in job_dirs(root):
        summary, problem = job_summary(job)
        records, problems = read_run_records(job)
        if problem or problems or summary["status"] == "missing":
            warn(f"{job}: skipped ({'; '.join([problem, *problems] if problem else problems) or 'no summary.json'})")
            continue
        last = next((r for r in reversed(records) if r["step"] > 0), None)
        method = str((summary.get("choices") or {}).get("method") or job.name)
        row = dict.fromkeys(SPLIT_COLUMNS, None) | {
            "run": Path(root).name, "method": method, "rule": rule_of(method) if "-" in method else method,
            "status": summary.get("status"), "steps": summary.get("steps")}
        if last is not None:
            for k in PHASES:
                v = last.get(f"{k}_median")
                row[k] = float(v if v is not None else last.get(k) or 0.0)
            row["t_step"] = sum(row[k] for k in PHASES)
            if row["t_step"] > 0:
                row["aggregate_share"] = row["t_aggregate"] / row["t_step"]
                row["ps_share"] = (row["t_vote"] + row["t_aggregate"] + row["t_update"]) / row["t_step"]
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (order.get(r["method"], len(order)), r["method"]))


def read_splits(roots: Sequence[str | Path]) -> list[dict]:
    """``read_split`` of several sweeps (repeated runs of the same sweep), the runs of a method together."""
    order = {m: i for i, m in enumerate(METHODS)}
    rows = [row for root in roots for row in read_split(root)]
    runs = {run: i for i, run in enumerate(dict.fromkeys(r["run"] for r in rows))}
    return sorted(rows, key=lambda r: (order.get(r["method"], len(order)), r["method"], runs[r["run"]]))


def savings(rows: list[dict]) -> list[dict]:
    """Per run and rule with both methods: what DETOX-X saves per iteration against vanilla X (whole step and PS
    side)."""
    at = {(r["run"], r["method"]): r for r in rows if r["t_step"] is not None}
    out = []
    for run, x in ((run, x) for run in dict.fromkeys(r["run"] for r in rows) for x in RULES):
        v, t = at.get((run, f"vanilla-{x}")), at.get((run, f"detox-{x}"))
        if not (v and t):
            continue
        ps_v = v["t_vote"] + v["t_aggregate"] + v["t_update"]
        ps_t = t["t_vote"] + t["t_aggregate"] + t["t_update"]
        out.append({"run": run, "rule": x, "vanilla_step": v["t_step"], "detox_step": t["t_step"],
                    "saved_per_step": v["t_step"] - t["t_step"], "step_speedup": v["t_step"] / t["t_step"],
                    "vanilla_ps": ps_v, "detox_ps": ps_t, "ps_speedup": ps_v / ps_t if ps_t > 0 else math.inf})
    return out


def split_markdown(rows: list[dict], saved: list[dict]) -> str:
    def f(x: float | None, digits: int = 3) -> str:
        return "" if x is None else f"{x:.{digits}f}"

    lines = ["| run | method | status | steps | compute (s) | vote (s) | aggregate (s) | update (s) | step (s) | "
             "aggregate share | PS share |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = "" if r["aggregate_share"] is None else f"{100 * r['aggregate_share']:.0f} %"
        ps = "" if r["ps_share"] is None else f"{100 * r['ps_share']:.0f} %"
        lines.append(f"| {r['run']} | {r['method']} | {r['status']} | {r['steps']} | {f(r['t_compute'])} | "
                     f"{f(r['t_vote'])} | {f(r['t_aggregate'])} | {f(r['t_update'])} | {f(r['t_step'])} | "
                     f"{share} | {ps} |")
    if saved:
        lines += ["", "| run | rule | vanilla step (s) | DETOX step (s) | saved per step (s) | step speedup | "
                  "vanilla PS side (s) | DETOX PS side (s) | PS-side speedup |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in saved:
            lines.append(f"| {s['run']} | {s['rule']} | {f(s['vanilla_step'])} | {f(s['detox_step'])} | "
                         f"{f(s['saved_per_step'])} | {s['step_speedup']:.2f}× | {f(s['vanilla_ps'])} | "
                         f"{f(s['detox_ps'])} | {s['ps_speedup']:.1f}× |")
    return "\n".join(lines) + "\n"


def plot_split(rows: list[dict], compute_label: str = "compute (slowest unit)"):  # -> matplotlib Figure
    """Left: the whole iteration, phase by phase. Right: the PS side alone (vote, aggregate, update), where DETOX
    acts; compute is the same work in every job (one forward/backward of a batch of 32), so differences there
    are the machine's load, not the method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["t_step"] is not None]
    colours = {"t_compute": "tab:gray", "t_vote": "tab:orange", "t_aggregate": "tab:red", "t_update": "tab:blue"}
    labels = {"t_compute": compute_label, "t_vote": "vote", "t_aggregate": "aggregate",
              "t_update": "update"}
    fig, (ax, ax_ps) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 2.0), sharey=True,
                                    gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(rows))[::-1]
    for axis, phases in ((ax, PHASES), (ax_ps, PHASES[1:])):
        left = np.zeros(len(rows))
        for k in phases:
            vals = np.array([r[k] for r in rows])
            axis.barh(y, vals, left=left, color=colours[k], label=labels[k], height=0.7)
            left += vals
        for yi, total, r in zip(y, left, rows, strict=True):
            note = f" {total:.2f} s" + (f", aggregate {100 * r['aggregate_share']:.0f} %" if axis is ax else "")
            axis.text(total, yi, note, va="center", fontsize=7)
        axis.set_xlim(0, left.max() * (1.5 if axis is ax else 1.25))
    ax.set_yticks(y)
    several = len({r["run"] for r in rows}) > 1
    ax.set_yticklabels([f"{r['method']} ({r['run']})" if several else r["method"] for r in rows], fontsize=8)
    ax.set_xlabel("seconds per iteration (median over the steps)")
    ax_ps.set_xlabel("PS side: vote + aggregate + update (s)")
    ax.set_title("Per-iteration split, ResNet-18 size (d = 11.2M), P = 45, r = 3, q = 5", fontsize=9)
    ax_ps.set_title("the PS side alone", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def write_split(rows: list[dict], out: Path, command: str, table: str = "table", figure: str = "fig_c_paper",
                compute_label: str = "compute (slowest unit)") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    saved = savings(rows)
    write_csv_atomic(out / f"{table}.csv", SPLIT_COLUMNS, rows)
    write_text_atomic(out / f"{table}.md", f"```bash\n{command}\n```\n\n" + split_markdown(rows, saved))
    if any(r["t_step"] is not None for r in rows):
        save_figure(plot_split(rows, compute_label), out / figure)
    return saved


def write_csv_atomic(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows({k: r.get(k) for k in columns} for r in rows)
    write_text_atomic(path, buf.getvalue())


def save_figure(fig: Any, stem: Path) -> None:
    """``<stem>.png`` and ``<stem>.pdf``, each written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    for ext in ("png", "pdf"):
        write_atomic(stem.with_name(f"{stem.name}.{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=150))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ command line


def _out_folder_problem(out: Path) -> str | None:
    """Why ``out`` cannot become the output folder (it or a parent is a file, nothing can be written there);
    checked before any measurement, None if it can."""
    if out.exists():
        if not out.is_dir():
            return f"--out {out}: a file, not a folder"
        probe = out
    else:
        probe = next((p for p in out.parents if p.exists()), Path("."))
        if not probe.is_dir():
            return f"--out {out}: {probe} is a file, not a folder"
    return cannot_write(out, probe)


def _saved_scaling_problem(saved: object) -> str | None:
    """Why a scaling.json cannot be replotted (checked before anything is written), or None: the table, the fits
    and the figure are made from it in memory first, so a file edited by hand fails here, not half-way."""
    if not (isinstance(saved, dict) and isinstance(saved.get("rows"), list) and saved["rows"]
            and all(isinstance(r, dict) for r in saved["rows"]) and isinstance(saved.get("setting"), dict)
            and isinstance(saved.get("command"), str)):
        return "expected an object with a non-empty list of rows, a setting and a command"
    missing = [k for k in SCALING_COLUMNS if any(k not in r for r in saved["rows"])]
    if missing:
        return f"a row lacks {missing[0]!r}"
    try:
        fits = fit_exponents(saved["rows"])
        scaling_markdown(saved["rows"], fits, saved["setting"])
        import matplotlib.pyplot as plt

        plt.close(plot_scaling(saved["rows"], fits))
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


# keys a method preset sets: an --override of them would measure another method under the preset's name
METHOD_KEYS = ("method", "mode", "approach", "err_mode", "workers", "worker_fail", "group_size")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``scaling`` and ``iteration``: every argument that cannot run is refused in one line (exit 2) before the first
    allocation and measurement (a run of minutes must not fail at its end, or ask for memory the machine lacks)."""
    workers = args.workers if isinstance(args.workers, list) else [args.workers]
    if args.repeats < 1 or min(workers) < 3:
        parser.error("--repeats must be >= 1 and every --workers >= 3")
    if len(set(workers)) < len(workers):
        parser.error(f"--workers {' '.join(map(str, workers))}: each P once (a repeated P is measured twice and "
                     f"counted twice in the fit)")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be >= 0")
    for o in args.override:
        key = o.lstrip("+~").split("=", 1)[0].split("@", 1)[0].split(".", 1)[0].strip()
        if key in METHOD_KEYS:
            parser.error(f"--override {o}: {key} is set by each method's preset (--methods, --workers); override "
                         f"the network, the data set or other keys only")
    d = getattr(args, "d", None)
    if d is not None and not (math.isfinite(d) and d >= 1):
        parser.error(f"--d {d}: give a number of coordinates >= 1")
    max_gib = getattr(args, "max_gib", None)
    if max_gib is not None and not (math.isfinite(max_gib) and max_gib > 0):
        parser.error(f"--max-gib {max_gib}: give a memory budget in GiB > 0")
    if args.out is not None and (why := _out_folder_problem(args.out)) is not None:
        parser.error(why)
    try:
        cfg = _method_cfg(args.methods[0], tuple(args.override))
        r = int(cfg.group_size)
        sizes = layer_sizes(cfg)
    except Exception as err:  # an override Hydra cannot compose, a network that cannot be built
        parser.error(f"--override {' '.join(args.override)}: {str(err).splitlines()[0] if str(err) else err!r}")
    odd = [p for p in workers if p % r]
    if odd:
        parser.error(f"--workers {odd[0]}: workers come in groups of group_size = {r}; give multiples of {r}")
    p = max(workers)
    if args.command == "scaling":
        want = sum(sizes) if d is None else int(d)
        need = peak_bytes(p, r, largest_d(p, r, want, int(max_gib * GIB)))
    else:  # the real network's d, and the model with its gradient
        need = peak_bytes(p, r, sum(sizes)) + 4 * sum(sizes) * 4
    have = available_memory()
    if have is not None and need > have:
        what = "--max-gib or --d" if args.command == "scaling" else "--workers"
        parser.error(f"--workers {' '.join(map(str, workers))}: the benchmark needs about {need / GIB:.1f} GiB and "
                     f"{have / GIB:.1f} GiB is available; give a smaller {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detox.bench_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scaling", help="the PS step's cost vs P, vanilla X and DETOX-X (Claim 2)")
    sc.add_argument("--workers", type=int, nargs="+", default=[15, 30, 45, 60, 90])
    sc.add_argument("--d", type=float, default=None, help="coordinates (default: the network's parameter count)")
    sc.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    sc.add_argument("--repeats", type=int, default=3)
    sc.add_argument("--warmup", type=int, default=1)
    sc.add_argument("--max-gib", type=float, default=8.0, help="memory budget: d shrinks to fit it at the largest P")
    sc.add_argument("--override", nargs="*", default=list(PAPER_NETWORK),
                    help="config overrides for every plan (default: ResNet-18 on 3x32x32)")
    sc.add_argument("--out", type=Path, default=None, help="folder for scaling.{csv,md,json,png,pdf}")
    it = sub.add_parser("iteration", help="Figure C's split measured in one process: compute and PS step alternating")
    it.add_argument("--workers", type=int, default=45)
    it.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    it.add_argument("--repeats", type=int, default=5)
    it.add_argument("--warmup", type=int, default=1)
    it.add_argument("--override", nargs="*", default=list(PAPER_NETWORK))
    it.add_argument("--out", type=Path, default=None,
                    help="folder for iteration.{md,csv,json} and fig_c_iteration.{png,pdf}")
    rp = sub.add_parser("replot", help="redraw scaling.{md,png,pdf} of a folder from its scaling.json")
    rp.add_argument("folder", type=Path)
    sp = sub.add_parser("split", help="per-iteration split of a fig_c_paper sweep")
    sp.add_argument("roots", type=Path, nargs="+", help="multirun roots of fig_c_paper (repeated runs)")
    sp.add_argument("--out", type=Path, default=None, help="folder for table.{md,csv} and fig_c_paper.{png,pdf}")
    args = parser.parse_args(argv)
    command = "python -m detox.bench_scaling " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.command == "split":
        if args.out is not None and (why := _out_folder_problem(args.out)) is not None:
            parser.error(f"split {why}")
        try:
            rows = read_splits(args.roots)
        except FileNotFoundError as err:
            parser.error(f"split {err}")
        if not rows:
            parser.error(f"split {' '.join(map(str, args.roots))}: no job of a sweep there (a folder with a run's "
                     f"summary.json and metrics.jsonl)")
        print(split_markdown(rows, savings(rows)))
        if args.out:
            write_split(rows, args.out, command)
            print(f"wrote {args.out}/table.md, table.csv, fig_c_paper.png/.pdf")
        return 0

    if args.command in ("scaling", "iteration"):
        _check_args(parser, args)
    if args.command == "iteration":
        t0 = time.perf_counter()
        rows, setting = bench_iteration(args.workers, args.methods, args.repeats, args.warmup, args.override)
        print()
        print(split_markdown(rows, savings(rows)))
        print(f"peak RSS {setting['peak_rss_gib']:.2f} GiB; {time.perf_counter() - t0:.0f} s")
        if args.out:
            write_split(rows, args.out, command, table="iteration", figure="fig_c_iteration",
                        compute_label="compute (one unit, median)")
            write_text_atomic(args.out / "iteration.json", json.dumps({"command": command, "setting": setting,
                                                                       "rows": rows}, indent=2) + "\n")
            print(f"wrote {args.out}/iteration.md, .csv, .json, fig_c_iteration.png/.pdf")
        return 0

    if args.command == "replot":
        try:
            saved = json.loads((args.folder / "scaling.json").read_text())
        except (OSError, ValueError) as err:
            parser.error(f"replot {args.folder}: no readable scaling.json there ({err})")
        if (why := _saved_scaling_problem(saved)) is not None:
            parser.error(f"replot {args.folder / 'scaling.json'}: not one `scaling` writes ({why})")
        write_scaling(saved["rows"], fit_exponents(saved["rows"]), saved["setting"], args.folder, saved["command"])
        print(f"redrew {args.folder}/scaling.md, .png, .pdf")
        return 0

    t0 = time.perf_counter()
    rows, setting = bench_scaling(args.workers, None if args.d is None else int(args.d), args.methods,
                                  args.repeats, args.warmup, args.override, int(args.max_gib * GIB))
    fits = fit_exponents(rows)
    setting["seconds"] = time.perf_counter() - t0
    print()
    print(scaling_markdown(rows, fits, setting))
    for m, fit in fits.items():
        print(f"{m:<21} t ∝ P^{fit['b']:.2f}  (r² = {fit['r2']:.3f}, {fit['points']} points)")
    print(f"peak RSS {setting['peak_rss_gib']:.2f} GiB; {setting['seconds']:.0f} s")
    if args.out:
        write_scaling(rows, fits, setting, args.out, command)
        print(f"wrote {args.out}/scaling.csv, .md, .json, .png, .pdf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
