"""Turn a multirun root (one folder per job, named by its overrides; DESIGN §4) into pandas DataFrames.

``load_runs(root)``    — one row per job: config choices as columns, the summary's numbers, the label of the
                         config it actually ran (``analysis.labels``), ``seed``, ``config`` (the same for jobs that
                         differ only in their seed: what ``analysis.stats`` aggregates over) and per-step time
                         split means and medians computed from ``metrics.jsonl``.
``load_metrics(root)`` — one row per evaluation of every job, with the job's choices as columns.
A run with ``evaluation=external`` leaves its metrics.jsonl's test fields empty and ``python -m detox.evaluate``
writes them to ``eval.jsonl``: both tables fill them (and the summary's accuracies) from it (``run_records``).
Jobs are ordered as ``detox.results.job_dirs`` lists them (numbered folders by number, then by name). A job without
a readable summary is a row with status ``missing``; a failed job keeps its ``error``. Relative roots are found
from the repository root (where the sweeps write ``multirun/...``) when they are not under the current folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.labels import attack_label, labels
from detox.results import job_dirs, job_id

REPO = Path(__file__).resolve().parents[1]
CHOICES = ("network", "dataset", "mode", "approach", "err_mode", "engine", "task", "method")
PHASES = ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update")
# robust per-step statistics of metrics.jsonl (extra keys next to DESIGN §4's): per-window phase medians and the
# 10th/90th percentile of a step's time; older runs lack them and the analysis falls back to the means
MEDIAN_PHASES = tuple(f"{k}_median" for k in PHASES)
STEP_SPREAD = ("t_step_p10", "t_step_p90")
# the CPU clock (detox.timing, engine=local): per-window CPU medians of the phases that work, and the cluster time
# built from them, which a loaded machine leaves alone; MPI runs lack it
CPU_MEDIAN_PHASES = tuple(f"{k}_cpu_median" for k in ("t_compute", "t_vote", "t_aggregate", "t_update"))
# summary keys copied into the runs table
SUMMARY_KEYS = ("status", "error", "figure", "workers", "worker_fail", "group_size", "batch_size", "lr", "seed",
                "max_steps", "placement", "target_acc", "steps", "final_test_acc", "best_test_acc",
                "final_test_loss", "wall_time", "cluster_time", "time_to_target", "malformed_messages")
# settings that make two jobs the same configuration up to the seed, for runs without resolved_config.yaml
CONFIG_KEYS = ("label", "err_mode", "worker_fail", "workers", "group_size", "batch_size", "lr", "max_steps", "task",
               "network", "dataset", "engine", "placement", "figure", "target_acc")
# resolved-config keys that do not make a different configuration: the seed (aggregated over) and where files go
NOT_CONFIG = ("seed", "data_root", "save", "save_model", "checkpoint", "model_dir")
# the evaluation fields python -m detox.evaluate records per step in eval.jsonl (detox.evaluate.EVAL_KEYS)
EVAL_FIELDS = ("test_loss", "test_acc", "test_acc5", "eval_time")


def repo_root() -> Path:
    """The repository this package lives in (its ``multirun/`` is where the sweeps write)."""
    return REPO


def sweep_root(path: str | Path) -> Path:
    """``path`` itself when absolute or present under the current folder, else under the repository root (a
    notebook kernel starts in ``analysis/``, so ``multirun/fig_a_cpu`` means the repository's)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO / path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a job killed mid-write leaves at most one broken last line
            continue
    return out


def _read_yaml(path: Path) -> dict | None:
    try:
        out = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return out if isinstance(out, dict) else None


def run_records(job: Path) -> list[dict]:
    """The job's metrics.jsonl records, their evaluation fields filled from eval.jsonl (the separate evaluator's,
    by step) where the run did not evaluate in-loop; a job with only eval.jsonl gives its records."""
    records = _read_jsonl(job / "metrics.jsonl")
    evals = {r["step"]: r for r in _read_jsonl(job / "eval.jsonl") if isinstance(r, dict) and "step" in r}
    if not records:
        return sorted(evals.values(), key=lambda r: r["step"])
    for r in records:
        ev = evals.get(r.get("step"))
        if ev is not None and r.get("test_acc") is None:
            r.update({k: ev.get(k) for k in EVAL_FIELDS})
    return records


def _fill_summary(row: dict, records: list[dict]) -> None:
    """A run evaluated externally ends with no accuracy in its summary: take them from the evaluator's records."""
    evaluated = [r for r in records if r.get("test_acc") is not None]
    if row.get("final_test_acc") is not None or not evaluated:
        return
    last = records[-1]
    row["final_test_acc"], row["final_test_loss"] = last.get("test_acc"), last.get("test_loss")
    row["best_test_acc"] = max(r["test_acc"] for r in evaluated)
    target = row.get("target_acc")
    if target is not None and row.get("time_to_target") is None:
        row["time_to_target"] = next((r.get("wall_time") for r in evaluated if r["test_acc"] >= target), None)


def step_weighted(records: list[dict], keys: tuple[str, ...] = PHASES) -> dict[str, float]:
    """Mean per step of each key over a run: records hold one value per window since the previous record (a
    mean or a median of that window), so each is weighted by its window's steps."""
    out = {}
    prev = 0
    weights = []
    for r in records:
        weights.append(r["step"] - prev)
        prev = r["step"]
    for k in keys:
        vals = [(w, r[k]) for w, r in zip(weights, records, strict=True) if r.get(k) is not None]
        total = sum(w for w, _ in vals)
        out[k] = sum(w * v for w, v in vals) / total if total else np.nan
    return out


def step_weighted_phases(records: list[dict]) -> dict[str, float]:
    """Mean per-step seconds of each phase (means and, where recorded, medians), the spread of a step's time
    and corrupted groups per step over a run."""
    out = step_weighted(records, (*PHASES, *MEDIAN_PHASES, *STEP_SPREAD, *CPU_MEDIAN_PHASES))
    out["corrupted_per_step"] = step_weighted(records, ("corrupted_groups",))["corrupted_groups"]
    last = records[-1] if records else {}
    for k in ("cluster_time_median", "cluster_time_cpu"):
        out[k] = np.nan if last.get(k) is None else last[k]
    return out


def config_key(config: dict | None, row: dict) -> str:
    """A short id shared by exactly the jobs whose configs differ only in the seed."""
    if config:
        rest = {k: v for k, v in config.items() if k not in NOT_CONFIG}
        text = json.dumps(rest, sort_keys=True, default=str)
    else:  # an older run without resolved_config.yaml: the settings the summary holds
        text = json.dumps([row.get(k) for k in CONFIG_KEYS], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load_runs(root: str | Path) -> pd.DataFrame:
    rows = []
    for job in job_dirs(sweep_root(root)):
        try:
            summary = json.loads((job / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {"status": "missing", "error": "no readable summary.json"}
        config = _read_yaml(job / "resolved_config.yaml")
        row: dict = {"job": job_id(job), "dir": str(job)}
        choices = summary.get("choices") or {}
        row.update({k: choices.get(k) for k in CHOICES})
        row.update({k: summary.get(k) for k in SUMMARY_KEYS})
        if row["method"] or row["approach"] or config:
            row["label"], row["defence"], row["rule"] = labels(row["method"], row["approach"], row["mode"], config)
        else:  # nothing says what ran (a job killed before writing): name it by its folder
            row["label"], row["defence"], row["rule"] = str(row["job"]), "other", None
        row["attack"] = attack_label(config, row["err_mode"])
        row["num_classes"] = ((config or {}).get("dataset") or {}).get("num_classes") or 10
        row["config"] = config_key(config, row)
        records = run_records(job)
        _fill_summary(row, records)
        row.update(step_weighted_phases(records))
        rows.append(row)
    cols = ["job", "dir", *CHOICES, "label", "defence", "rule", "attack", "config", "num_classes", *SUMMARY_KEYS,
            "cluster_time_median", "cluster_time_cpu", *PHASES, *MEDIAN_PHASES, *STEP_SPREAD, *CPU_MEDIAN_PHASES,
            "corrupted_per_step"]
    return pd.DataFrame(rows, columns=cols).set_index("job", drop=False).rename_axis(None)


def load_metrics(root: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    runs = load_runs(root) if runs is None else runs
    frames = []
    for job, run in runs.iterrows():
        records = run_records(Path(run["dir"]))
        if not records:
            continue
        df = pd.DataFrame(records)
        for k in ("job", *CHOICES, "label", "defence", "rule", "attack", "config", "seed", "worker_fail", "status",
                  "figure"):
            df[k] = run[k] if k != "job" else job
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["job", "step", "test_acc", "config", "seed"])
    # frames are in job_dirs order, each in step order (job ids may mix numbers and names: no sort by id)
    return pd.concat(frames, ignore_index=True)


def time_column(df: pd.DataFrame) -> str:
    """The clock to compare approaches on: ``cluster_time_cpu`` (per-phase CPU medians: what a loaded machine
    leaves alone) where every record has it, else ``cluster_time_median`` (per-phase wall-clock medians, robust to
    load spikes) where the runs recorded it, else ``cluster_time`` (per-phase means; older runs)."""
    def recorded(col: str) -> bool:
        return col in df.columns and bool((df[col] > 0).any())

    if recorded("cluster_time_cpu") and df["cluster_time_cpu"].notna().all():  # never one clock for some jobs only
        return "cluster_time_cpu"
    return "cluster_time_median" if recorded("cluster_time_median") else "cluster_time"


def time_to_target(metrics: pd.DataFrame, target: float, x: str | None = None) -> pd.Series:
    """Per job, the first ``x`` (default: ``time_column``) at which test accuracy reached ``target`` (NaN if
    never)."""
    x = x or time_column(metrics)
    hit = metrics[metrics["test_acc"] >= target].groupby("job")[x].min()
    return hit.reindex(metrics["job"].unique())
