"""The training loop of the parameter server, shared by every engine.

An engine is a *gradient source*: each step it returns the (P, d) matrix of what the workers sent.
Everything else (Byzantine placement, the PS step, evaluation, metrics, summary) lives here, once.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import stat
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from detox.approaches import Plan
from detox.attacks import byzantine_mask
from detox.config import ConfigError
from detox.data import Data, UnitSampler, load_data
from detox.models import bind_flat, build_model, has_batchnorm, recalibrate_batchnorm
from detox.results import (
    append_jsonl,
    base_summary,
    clean_json,
    model_dir,
    model_path,
    resolved_yaml,
    save_torch_atomic,
    write_json,
    write_text_atomic,
    writes_models,
)
from detox.step import ParameterServer

log = logging.getLogger("detox")

PHASES = ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update")
# the CPU clock (detox.timing): every phase that does work; t_comm is waiting, which only a wall clock measures
CPU_PHASES = ("t_compute_cpu", "t_vote_cpu", "t_aggregate_cpu", "t_update_cpu")
COUNTS = ("corrupted_groups", "vote_fallbacks")
# a unit id outside any worker's range: the evaluator's own stream of BatchNorm calibration batches
CALIBRATION_UNIT = 1 << 30


@dataclass
class Gradients:
    """What an engine delivers for one step."""

    grads_nd: torch.Tensor       # (P, d), row p = worker p; the PS modifies it in place
    losses: list[float]          # honest training losses of the units computed this step
    t_compute: float
    t_comm: float
    malformed_p: np.ndarray | None = None   # (P,) rows whose message could not be read (MPI): NaN-filled
    t_compute_cpu: float | None = None      # CPU seconds of the slowest unit (engine=local; MPI: not measured)


class GradientSource(Protocol):
    attack_at_ps: bool

    def gradients(self, step: int, byz_p: np.ndarray) -> Gradients: ...

    def close(self) -> None: ...

    # what the source remembers across steps (MPI: which ranks misbehaved), kept in checkpoints: plain types only
    def checkpoint_state(self) -> dict: ...

    def restore_state(self, state: dict) -> None: ...


@dataclass
class Setup:
    """The pieces every process of a job builds identically from the config."""

    cfg: DictConfig
    plan: Plan
    data: Data
    model: nn.Module
    w_d: torch.Tensor
    g_d: torch.Tensor


def configure_threads(cfg: DictConfig) -> None:
    # under mpiexec torch starts with 1 thread (DESIGN §7): the count is always set explicitly when given
    if cfg.get("threads"):
        # numba's parallel kernels (the vote, the rules) as well: threads=1 is one core, which the CPU clock assumes
        import numba

        numba.set_num_threads(max(1, min(int(cfg.threads), numba.config.NUMBA_NUM_THREADS)))
        # torch's after numba's: in a process forked from one that had set them (a local_parallel job), numba's
        # first call starts its OpenMP pool, which reset the OpenMP threads torch had just been given (torch then
        # ran its reductions on 2 threads: a trajectory off the single run's in the last bits)
        torch.set_num_threads(int(cfg.threads))


def setup(cfg: DictConfig, plan: Plan) -> Setup:
    configure_threads(cfg)
    if str(cfg.device).startswith("cuda"):
        # same seed, same trajectory: no cuDNN autotuning, and its deterministic algorithms only
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    data = load_data(cfg.dataset).to(cfg.device)
    if cfg.batch_size > len(data.train_y):
        raise ConfigError(f"batch_size={cfg.batch_size}: exceeds the {len(data.train_y)} training samples "
                          f"of dataset={cfg.dataset.name}")
    params = {k: v for k, v in cfg.network.items() if k not in ("name", "input_shape")}
    model = build_model(cfg.network.name, data.shape, data.num_classes, int(cfg.seed), params).to(cfg.device)
    w_d, g_d = bind_flat(model)
    # the original's vote (approach.vote=boyer-moore): DETOX's PS (draco_lite_master) votes per layer, which needs the
    # layers in bind_flat's flat order; DRACO's (rep_master, approach=maj_vote) votes on the whole vector: one layer
    layers = tuple(p.numel() for p in model.parameters()) if plan.approach == "draco-lite" else None
    plan = dataclasses.replace(plan, layer_sizes=layers)
    return Setup(cfg, plan, data, model, w_d, g_d)


def unit_samplers(s: Setup) -> list[UnitSampler]:
    return [UnitSampler(len(s.data.train_y), int(s.cfg.batch_size), int(s.cfg.seed), u, s.cfg.dataset.get("augment"))
            for u in range(s.plan.units)]


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float]:
    """Test loss, top-1 and top-5 accuracy of the current weights (BatchNorm statistics recalibrated)."""
    cfg, data, model = s.cfg, s.data, s.model
    if has_batchnorm(model) and cfg.bn_calibration_batches:
        sampler = UnitSampler(len(data.train_y), min(int(cfg.eval_batch_size), len(data.train_y)),
                              int(cfg.seed), CALIBRATION_UNIT)
        batches = [sampler.batch(data, i)[0] for i in range(int(cfg.bn_calibration_batches))]
        recalibrate_batchnorm(model, batches)
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, len(data.test_y)
    k = min(5, data.num_classes)
    for i in range(0, n, int(cfg.eval_batch_size)):
        x, y = data.test_x[i : i + cfg.eval_batch_size], data.test_y[i : i + cfg.eval_batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(dim=1).sum())
    model.train()
    return {"test_loss": loss_sum / n, "test_acc": top1 / n, "test_acc5": top5 / n}


# the evaluation fields of a metrics record of a run with evaluation=external: its evaluator fills them (eval.jsonl)
NO_EVALUATION: dict[str, float | None] = {"test_loss": None, "test_acc": None, "test_acc5": None}


class _Window:
    """Per-step values since the previous metrics record: their means, and per phase the median.

    The means are what the phase times have always meant; the medians are the robust statistic: on a shared
    machine a step that the OS preempts takes several times its length, and a few such steps move the mean of a
    window (and so ``cluster_time``) far more than they move the median.
    """

    def __init__(self) -> None:
        self.steps, self.values, self.losses = 0, {k: [] for k in PHASES + COUNTS + CPU_PHASES}, []
        self.cpu = True  # every step so far measured every phase's CPU seconds (engine=mpi: compute is not)

    def add(self, diag: dict, grads: Gradients) -> None:
        self.steps += 1
        for k in PHASES + COUNTS:
            self.values[k].append(float(diag.get(k, 0.0)))
        self.cpu = self.cpu and all(diag.get(k) is not None for k in CPU_PHASES)
        if self.cpu:
            for k in CPU_PHASES:
                self.values[k].append(float(diag[k]))
        self.losses += grads.losses

    def robust_step(self) -> float:
        """Seconds of a typical step: the sum over phases of each phase's median in this window."""
        return sum(float(np.median(self.values[k])) for k in PHASES) if self.steps else 0.0

    def cpu_step(self) -> float | None:
        """CPU seconds of a typical step (the sum of each phase's median); None where a phase went unmeasured."""
        if not self.steps:
            return 0.0
        return sum(float(np.median(self.values[k])) for k in CPU_PHASES) if self.cpu else None

    def means(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: (float(np.mean(v)) if v else None) for k, v in self.values.items()}
        out.update(dict.fromkeys(ROBUST_KEYS[1:]))
        if self.steps:
            out.update({f"{k}_median": float(np.median(self.values[k])) for k in PHASES})
            if self.cpu:
                out.update({f"{k}_median": float(np.median(self.values[k])) for k in CPU_PHASES})
            # the spread of a whole step's time (the sum of its phases) within the window
            totals = np.sum([self.values[k] for k in PHASES], axis=0)
            out["t_step_p10"], out["t_step_p90"] = (float(x) for x in np.quantile(totals, [0.1, 0.9]))
        out["train_loss"] = float(np.mean(self.losses)) if self.losses else None
        return out


def train(s: Setup, source: GradientSource, out_dir: Path | None) -> dict:
    """Run the job to ``max_steps`` (or divergence); write metrics.jsonl and return the summary."""
    cfg, plan = s.cfg, s.plan
    save = out_dir is not None and bool(cfg.save)
    metrics_path = out_dir / "metrics.jsonl" if save else None
    ps = ParameterServer(plan, s.w_d, attack=cfg.err_mode.name,
                         attack_params={k: v for k, v in cfg.err_mode.items() if k != "name"},
                         lr=float(cfg.lr), momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay))
    summary = base_summary(cfg)
    records: list[dict] = []
    # wall: real training seconds in this engine; cluster: the sum of per-step phase times, where compute is
    # the slowest worker's (what a cluster with one process per worker would take; in MPI close to wall)
    wall, cluster, window, status = 0.0, 0.0, _Window(), "completed"
    samples_per_step = plan.units * int(cfg.batch_size)
    n_train = len(s.data.train_y)
    malformed = 0
    every = (cfg.get("checkpoint") or {}).get("every")
    ckpt_path = out_dir / CHECKPOINT if save and every else None
    if ckpt_path is not None and ckpt_path.exists() and not ckpt_path.is_file():
        log.warning("%s exists and is not a file: checkpoints are off for this run", ckpt_path)
        ckpt_path = None
    state = load_checkpoint(cfg, ckpt_path, s.w_d) if ckpt_path is not None else None
    if state is not None:
        s.w_d.copy_(state["w"])
        ps.v_d.copy_(state["v"])
        torch.set_rng_state(state["torch_rng"])
        records, wall, cluster, malformed = state["records"], state["wall"], state["cluster"], state["malformed"]
        source.restore_state(state.get("source") or {})
        log.info("resuming from %s at step %d", ckpt_path, records[-1]["step"])
    if metrics_path is not None:  # the file holds exactly the records of this trajectory so far (written whole: a
        # reader, or a kill while it is written, never sees the previous attempt's file cut short)
        write_text_atomic(metrics_path, "".join(json.dumps(clean_json(r)) + "\n" for r in records))
    # evaluation=external: no evaluation here (the original ran its evaluator on its own node so that it never
    # slowed training); the weights of every evaluation step go to model_step_<t> files for python -m detox.evaluate
    external = cfg.get("evaluation") == "external"
    models = model_dir(cfg, out_dir) if save and writes_models(cfg) else None
    if models is not None:
        models.mkdir(parents=True, exist_ok=True)

    def record(step: int) -> dict:
        t0 = time.perf_counter()
        if models is not None:  # written whole under a temporary name, then renamed: never read half-written
            save_torch_atomic(model_path(models, step), s.model.state_dict())
        ev = NO_EVALUATION if external else evaluate(s)
        eval_time = time.perf_counter() - t0
        # cluster_time_median: cluster_time built from each window's per-phase medians (robust to load spikes);
        # accumulated through the records, so a resumed run continues it from its last record
        robust = (records[-1]["cluster_time_median"] if records else 0.0) + window.steps * window.robust_step()
        # cluster_time_cpu: the same from per-phase CPU medians (detox.timing; None once a window went unmeasured)
        cpu_step, cpu_before = window.cpu_step(), records[-1]["cluster_time_cpu"] if records else 0.0
        cpu = None if cpu_step is None or cpu_before is None else cpu_before + window.steps * cpu_step
        rec = {"step": step, "epoch": step * samples_per_step / n_train, "wall_time": wall,
               "cluster_time": cluster, "eval_time": eval_time, "samples": step * samples_per_step,
               **window.means(), "cluster_time_median": robust, "cluster_time_cpu": cpu, **ev,
               "byzantine_workers": plan.byzantine}
        rec = {k: rec[k] for k in METRIC_KEYS}
        if metrics_path is not None:
            append_jsonl(metrics_path, rec)
        log.info("step %5d | train_loss %s | test_loss %s | test_acc %s | corrupted/step %s | %.1fs",
                 step, _fmt(rec["train_loss"]), _fmt(ev["test_loss"]), _fmt(ev["test_acc"]),
                 _fmt(rec["corrupted_groups"], 3), wall)
        records.append(rec)
        return rec

    if not records:
        record(0)
    window = _Window()
    for t in range(records[-1]["step"], int(cfg.max_steps)):
        t_start = time.perf_counter()
        byz_p = byzantine_mask(cfg.adversary.placement, t, plan.workers, plan.byzantine, plan.unit_size,
                               plan.seed)
        grads = source.gradients(t, byz_p)
        diag = ps.step(t, grads.grads_nd, byz_p, attack_at_ps=source.attack_at_ps, faulty_p=grads.malformed_p)
        diag["t_compute"], diag["t_comm"], diag["t_compute_cpu"] = grads.t_compute, grads.t_comm, grads.t_compute_cpu
        malformed += 0 if grads.malformed_p is None else int(grads.malformed_p.sum())
        wall += time.perf_counter() - t_start
        cluster += sum(diag[k] for k in PHASES)
        window.add(diag, grads)
        done = t + 1
        diverged = not diag["finite"] or any(not math.isfinite(x) for x in grads.losses)
        if diverged or done % int(cfg.eval_freq) == 0 or done == int(cfg.max_steps):
            record(done)
            window = _Window()
            if ckpt_path is not None and done % int(every) == 0 and not diverged:
                save_checkpoint(cfg, ckpt_path, {"w": s.w_d, "v": ps.v_d, "torch_rng": torch.get_rng_state(),
                                                 "records": records, "wall": wall, "cluster": cluster,
                                                 "malformed": malformed, "source": source.checkpoint_state()})
        if diverged:
            status = "diverged"
            log.warning("step %d: non-finite %s; stopping (status diverged)", done,
                        "weights" if not diag["finite"] else "training loss")
            break
    source.close()

    accs = [r["test_acc"] for r in records if r["test_acc"] is not None and math.isfinite(r["test_acc"])]
    target = cfg.target_acc
    hit = next((r["wall_time"] for r in records
                if target is not None and r["test_acc"] is not None and r["test_acc"] >= target), None)
    summary.update({
        "status": status, "steps": records[-1]["step"], "final_test_acc": records[-1]["test_acc"],
        "best_test_acc": max(accs) if accs else None, "final_test_loss": records[-1]["test_loss"],
        "wall_time": wall, "cluster_time": cluster, "time_to_target": hit, "malformed_messages": malformed,
    })
    if save:
        if cfg.get("save_model"):
            save_torch_atomic(out_dir / "model.pt", s.model.state_dict())  # a full disk leaves no torn model.pt
        write_json(out_dir / "summary.json", summary)
        if ckpt_path is not None:
            ckpt_path.unlink(missing_ok=True)  # the run is finished: nothing left to resume
    return summary


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(cfg: DictConfig, path: Path, state: dict) -> None:
    """Weights, momentum, RNG state, step and the records so far; written atomically."""
    save_torch_atomic(path, {**state, "w": state["w"].cpu(), "v": state["v"].cpu(), "config": resolved_yaml(cfg)})


def load_checkpoint(cfg: DictConfig, path: Path, w_d: torch.Tensor) -> dict | None:
    """The checkpoint in ``path`` if it was written by a run of exactly this config and is whole, else None
    (with one warning line): a torn, foreign or tampered file never crashes the resume, it is started over."""
    if not path.exists():
        return None
    try:
        state = load_torch_file(path, checkpoint_limit(cfg, w_d))
        problem = checkpoint_problem(cfg, state, w_d)
    except Exception as err:  # unreadable: torn, not a torch file, a directory, ...
        problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if problem:
        log.warning("ignoring checkpoint %s: %s; starting from step 0", path, problem)
        return None
    return state


def checkpoint_limit(cfg: DictConfig, w_d: torch.Tensor) -> int:
    """The most bytes a checkpoint of this config can hold: weights and momentum, the RNG state, at most one record
    (a few hundred bytes pickled) every eval_freq steps, the config and the MPI source's counts, with room to spare."""
    records = int(cfg.max_steps) // int(cfg.eval_freq) + 2
    return 4 * w_d.numel() * w_d.element_size() + 4096 * records + 64 * int(cfg.workers) + (1 << 20)


def load_torch_file(path: Path, limit: int, map_location: str | torch.device = "cpu",
                    follow_symlinks: bool = True) -> object:
    """``torch.load(path, weights_only=True)`` (no code from the file runs) of a file that can only be one
    ``torch.save`` wrote: a regular file (a fifo or a device is never read: the read would hang, or never end) and a
    zip archive of stored (uncompressed) entries, at most ``limit`` bytes unpacked. torch allocates every tensor
    before anything can check its shape, and reads deflated entries too: a few hundred KB could unpack into GBs.
    Raises ValueError (or OSError) saying why the file is refused."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)  # non-blocking: opening a fifo with no writer returns at once
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks:
            raise ValueError("a symbolic link, not a file the run wrote") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        os.set_blocking(fd, True)
        if info.st_size > limit:
            raise ValueError(f"{info.st_size} bytes, more than such a file holds (at most {limit})")
        try:
            with zipfile.ZipFile(f) as archive:  # (f stays open)
                entries = archive.infolist()
        except (zipfile.BadZipFile, EOFError, ValueError):
            raise ValueError("not a file torch.save wrote (no zip archive)") from None
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
            raise ValueError("compressed entries (torch.save stores its data uncompressed)")
        if (unpacked := sum(e.file_size for e in entries)) > limit:
            raise ValueError(f"{unpacked} bytes unpacked, more than such a file holds (at most {limit})")
        f.seek(0)
        return torch.load(f, map_location=map_location, weights_only=True)


def checkpoint_problem(cfg: DictConfig, state: object, w_d: torch.Tensor) -> str | None:
    """Why ``state`` cannot be resumed from (one phrase), or None. Everything a checkpoint this code wrote always
    satisfies is checked, so a tampered one is refused here rather than crashing the resumed run at its end (and
    again on every rerun, the checkpoint staying behind)."""
    keys = {"w", "v", "torch_rng", "records", "wall", "cluster", "malformed", "config"}
    if not isinstance(state, dict) or not keys <= set(state):
        return f"not a detox checkpoint (needs the keys {', '.join(sorted(keys))})"
    if state["config"] != resolved_yaml(cfg):
        return "it was written by a different config"
    return _tensors_problem(state, w_d) or _records_problem(cfg, state["records"]) or _totals_problem(cfg, state)


def _tensors_problem(state: dict, w_d: torch.Tensor) -> str | None:
    for k in ("w", "v"):
        t = state[k]
        if not isinstance(t, torch.Tensor) or t.dtype != w_d.dtype or t.shape != w_d.shape:
            return f"{k} is not a {w_d.dtype} tensor of shape {tuple(w_d.shape)}"
        if not bool(torch.isfinite(t).all()):  # a diverged run never writes a checkpoint
            return f"{k} holds non-finite values"
    rng = state["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "torch_rng is not a torch RNG state"
    saved = torch.get_rng_state()
    try:  # the generator checks its own state's content
        torch.set_rng_state(rng)
    except Exception:
        return "torch_rng is not a valid RNG state"
    finally:
        torch.set_rng_state(saved)
    return None


def _is_number(x: object) -> bool:
    """A Python int or float (what the loop writes), not a bool, a tensor, a string."""
    return isinstance(x, int | float) and not isinstance(x, bool)


# record values the loop always writes as numbers (the others may be null: no steps in the window yet, no CPU
# clock, evaluation=external)
ALWAYS_NUMBERS = ("epoch", "wall_time", "cluster_time", "eval_time", "samples", "cluster_time_median",
                  "byzantine_workers")
ACCURACIES = ("test_acc", "test_acc5")


def _record_problem(r: dict) -> str | None:
    for k in METRIC_KEYS[1:]:
        x = r[k]
        if x is None and k not in ALWAYS_NUMBERS:
            continue
        if not _is_number(x):
            return f"{k}={type(x).__name__} is not a number"
        if k in ALWAYS_NUMBERS and not 0 <= x < math.inf:
            return f"{k}={x!r} is not a finite number >= 0"
        if k in ACCURACIES and not 0 <= x <= 1:
            return f"{k}={x!r} is not in [0, 1]"
    return None


def _records_problem(cfg: DictConfig, records: object) -> str | None:
    """Metrics records as the loop writes them: every key, numbers (or null where allowed), one record every
    eval_freq steps up to the checkpoint's own step, a multiple of checkpoint.every within max_steps."""
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and set(r) == set(METRIC_KEYS) for r in records):
        return "records are not a non-empty list of metrics records"
    steps = [r["step"] for r in records]
    freq = int(cfg.eval_freq)
    every = int((cfg.get("checkpoint") or {}).get("every") or freq)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in steps) or steps[0] < 0 \
            or steps[-1] > int(cfg.max_steps):
        return f"record steps {steps[:3]}... are not increasing steps in [0, max_steps]"
    if steps[0] % freq or any(b - a != freq for a, b in zip(steps, steps[1:], strict=False)) or steps[-1] % every:
        return (f"record steps {steps[:3]}...{steps[-1]} are not one every eval_freq={freq} steps up to a multiple "
                f"of checkpoint.every={every}")
    for r in records:
        if problem := _record_problem(r):
            return f"the record of step {r['step']}: {problem}"
    times = [r["wall_time"] for r in records]
    if times != sorted(times):
        return "the records' wall times decrease"
    return None


def _totals_problem(cfg: DictConfig, state: dict) -> str | None:
    for k in ("wall", "cluster"):
        if not _is_number(state[k]) or not 0 <= state[k] < math.inf:
            return f"{k} is not a finite number of seconds"
    last = state["records"][-1]
    if state["wall"] < last["wall_time"] or state["cluster"] < last["cluster_time"]:
        return "its totals are behind its last record's times"
    malformed = state["malformed"]
    if not isinstance(malformed, int) or isinstance(malformed, bool) or malformed < 0:
        return "malformed is not a count"
    if malformed and cfg.engine.name != "mpi":  # only MPI messages can be malformed
        return f"malformed={malformed} in a run of engine={cfg.engine.name}"
    return _source_problem(cfg, state.get("source", {}), malformed)


def _source_problem(cfg: DictConfig, source: object, malformed: int) -> str | None:
    """The gradient source's own state (MPI: malformed messages per rank and malformed gradient rows); absent in
    checkpoints of engine=local and of older code."""
    if source == {}:
        return None
    if cfg.engine.name != "mpi" or not isinstance(source, dict) or set(source) != {"malformed_by_rank",
                                                                                   "malformed_rows"}:
        return "source is not the state of this engine's gradient source"
    by_rank, rows = source["malformed_by_rank"], source["malformed_rows"]
    workers = int(cfg.workers)
    if not isinstance(by_rank, dict) or not all(
            isinstance(r, str) and r.isascii() and r.isdigit() and 1 <= int(r) <= workers
            and isinstance(c, int) and not isinstance(c, bool) and c > 0 for r, c in by_rank.items()):
        return f"source.malformed_by_rank is not counts > 0 of worker ranks 1..{workers}"
    if rows != malformed or rows > sum(by_rank.values()):
        return "source.malformed_rows does not match the malformed gradient count"
    return None


# the DESIGN §4 keys first; then extra robust timing keys (per-window phase medians, the cluster time built from
# them, and the 10th/90th percentile of a step's time), which the analysis prefers where present
ROBUST_KEYS = ("cluster_time_median", *(f"{k}_median" for k in PHASES), "t_step_p10", "t_step_p90",
               "cluster_time_cpu", *(f"{k}_median" for k in CPU_PHASES))
METRIC_KEYS = ("step", "epoch", "wall_time", "cluster_time", "eval_time", "samples", "train_loss", "test_loss",
               "test_acc", "test_acc5", *PHASES, "byzantine_workers", *COUNTS, *ROBUST_KEYS)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
