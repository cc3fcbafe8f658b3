"""Output files of a run (DESIGN §4): metrics.jsonl, summary.json, resolved_config.yaml, summary.jsonl."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# the config groups whose chosen option goes into summary.json's "choices"
GROUPS = ("network", "dataset", "mode", "approach", "err_mode", "engine")
# preset groups whose label is recorded next to the group choices
PRESETS = ("task", "method")
# numeric/top-level settings copied into summary.json
SETTINGS = ("workers", "worker_fail", "group_size", "batch_size", "lr", "momentum", "weight_decay",
            "max_steps", "eval_freq", "seed", "target_acc", "device", "figure")


def clean_json(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a crash never leaves half a summary)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean_json(obj), indent=2) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(clean_json(obj)) + "\n")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import hydra
    import numpy
    import torch

    from detox import __version__

    return {"detox": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "hydra": hydra.__version__}


def choices(cfg: DictConfig) -> dict[str, str | None]:
    """The chosen option of every config group, plus the preset labels (task, method) when set."""
    out: dict[str, str | None] = {g: str(cfg[g].name) for g in GROUPS if g in cfg}
    out.update({k: cfg.get(k) for k in PRESETS})
    return out


def settings(cfg: DictConfig) -> dict[str, Any]:
    out = {k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in SETTINGS}
    out["placement"] = cfg.adversary.placement
    return out


def base_summary(cfg: DictConfig) -> dict[str, Any]:
    return {"status": "running", "choices": choices(cfg), **settings(cfg), "versions": versions(),
            "git_commit": git_commit()}


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved_config(cfg: DictConfig, out_dir: Path) -> None:
    (out_dir / "resolved_config.yaml").write_text(resolved_yaml(cfg))


FINISHED = ("completed", "diverged")


def finished_summary(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The summary of a finished run of exactly this config in ``out_dir`` (a rerun sweep skips it), else None."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        same = (out_dir / "resolved_config.yaml").read_text() == resolved_yaml(cfg)
    except (OSError, ValueError):
        return None
    return summary if same and summary.get("status") in FINISHED else None


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, ``summary.jsonl`` at its root, one line per job by number."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        write_sweep_summary(root)


def write_sweep_summary(root: Path) -> Path:
    jobs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    lines = []
    for job in jobs:
        path = job / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            summary = {"status": "failed", "error": f"no readable summary.json ({type(err).__name__})"}
        lines.append(json.dumps({"job": int(job.name), "dir": str(job), **summary}))
    out = root / "summary.jsonl"
    out.write_text("".join(line + "\n" for line in lines))
    return out
