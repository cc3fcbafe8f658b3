"""Turn a multirun root (one folder per job, named by its overrides; DESIGN §4) into pandas DataFrames.

``load_runs(root)``    — one row per job: config choices as columns, the summary's numbers, and per-step
                         time split means computed from ``metrics.jsonl``.
``load_metrics(root)`` — one row per evaluation of every job, with the job's choices as columns.
Jobs are ordered as ``detox.results.job_dirs`` lists them (numbered folders by number, then by name). A job without a readable summary is a row with status
``missing``; a failed job keeps its ``error``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from detox.results import job_dirs, job_id

CHOICES = ("network", "dataset", "mode", "approach", "err_mode", "engine", "task", "method")
PHASES = ("t_compute", "t_comm", "t_vote", "t_aggregate", "t_update")
# summary keys copied into the runs table
SUMMARY_KEYS = ("status", "error", "figure", "workers", "worker_fail", "group_size", "batch_size", "lr", "seed",
                "max_steps", "placement", "target_acc", "steps", "final_test_acc", "best_test_acc",
                "final_test_loss", "wall_time", "cluster_time", "time_to_target", "malformed_messages")


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


def labels(method: str | None, approach: str | None, mode: str | None) -> tuple[str, str, str]:
    """(label, defence, rule): ``detox-bulyan`` -> ("detox-bulyan", "detox", "bulyan")."""
    if not method:
        prefix = {"baseline": "vanilla", "draco-lite": "detox", "maj_vote": "maj-vote"}.get(approach or "", approach)
        method = f"{prefix}-{mode}" if prefix != "maj-vote" else "maj-vote"
    for defence in ("vanilla", "detox"):
        if method.startswith(defence + "-"):
            return method, defence, method[len(defence) + 1 :]
    return method, "other", method


def step_weighted_phases(records: list[dict]) -> dict[str, float]:
    """Mean per-step seconds of each phase over a run (records hold means since the previous record)."""
    out = {}
    prev = 0
    weights = []
    for r in records:
        weights.append(r["step"] - prev)
        prev = r["step"]
    total = sum(w for w, r in zip(weights, records, strict=True) if r.get("t_compute") is not None)
    for k in PHASES:
        vals = [(w, r[k]) for w, r in zip(weights, records, strict=True) if r.get(k) is not None]
        out[k] = sum(w * v for w, v in vals) / total if total else np.nan
    corr = [(w, r["corrupted_groups"]) for w, r in zip(weights, records, strict=True)
            if r.get("corrupted_groups") is not None]
    out["corrupted_per_step"] = sum(w * v for w, v in corr) / total if total else np.nan
    return out


def load_runs(root: str | Path) -> pd.DataFrame:
    rows = []
    for job in job_dirs(root):
        try:
            summary = json.loads((job / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {"status": "missing", "error": "no readable summary.json"}
        row: dict = {"job": job_id(job), "dir": str(job)}
        choices = summary.get("choices") or {}
        row.update({k: choices.get(k) for k in CHOICES})
        row.update({k: summary.get(k) for k in SUMMARY_KEYS})
        row["label"], row["defence"], row["rule"] = labels(row["method"], row["approach"], row["mode"])
        row.update(step_weighted_phases(_read_jsonl(job / "metrics.jsonl")))
        rows.append(row)
    cols = ["job", "dir", *CHOICES, "label", "defence", "rule", *SUMMARY_KEYS, *PHASES, "corrupted_per_step"]
    return pd.DataFrame(rows, columns=cols).set_index("job", drop=False).rename_axis(None)


def load_metrics(root: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    runs = load_runs(root) if runs is None else runs
    frames = []
    for job, run in runs.iterrows():
        records = _read_jsonl(Path(run["dir"]) / "metrics.jsonl")
        if not records:
            continue
        df = pd.DataFrame(records)
        for k in ("job", *CHOICES, "label", "defence", "rule", "worker_fail", "status", "figure"):
            df[k] = run[k] if k != "job" else job
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["job", "step", "test_acc"])
    # frames are in job_dirs order, each in step order (job ids may mix numbers and names: no sort by id)
    return pd.concat(frames, ignore_index=True)


def time_to_target(metrics: pd.DataFrame, target: float, x: str = "cluster_time") -> pd.Series:
    """Per job, the first ``x`` at which test accuracy reached ``target`` (NaN if never)."""
    hit = metrics[metrics["test_acc"] >= target].groupby("job")[x].min()
    return hit.reindex(metrics["job"].unique())
