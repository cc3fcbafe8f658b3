"""Shared helpers: compose the real Hydra config and run jobs in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("network", "dataset", "mode", "approach", "err_mode", "engine")

# a tiny cluster that every rule accepts: 9 workers in 3 groups, 1 Byzantine
TINY_CLUSTER = ["workers=9", "worker_fail=1", "group_size=3", "max_steps=3", "eval_freq=2", "batch_size=8"]
TINY = [*TINY_CLUSTER, "dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=list(overrides))


def run_job(overrides, out_dir: Path, multirun: bool = False) -> dict:
    """Compose and run one job in this process, files in ``out_dir``; return its summary.

    ``multirun``: as inside a sweep, a failed job returns its summary instead of exiting.
    """
    from detox.train import run

    out_dir.mkdir(parents=True, exist_ok=True)
    return run(make_cfg(overrides), out_dir, multirun=multirun)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m detox.train ARGS`` as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "detox.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root, so no test depends on (or fills) the user's cache."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("DETOX_DATA", str(root))
    return root


def fake_svhn(folder: Path, monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, int] = (7, 5),
              seed: int = 2) -> dict[str, np.ndarray]:
    """Tiny SVHN release files in ``folder`` in the real format (scipy .mat: ``X`` uint8 (32, 32, 3, N), ``y``
    (N, 1) with labels 1..10, 10 meaning digit 0), and torchvision's md5 table patched to accept them (the real
    files are 180 MB and cannot be downloaded here). Returns the labels written per split."""
    import hashlib

    import torchvision
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rng, split_list, labels = np.random.default_rng(seed), {}, {}
    for split, n in zip(("train", "test"), sizes, strict=True):
        labels[split] = rng.integers(1, 11, (n, 1), dtype=np.uint8)
        savemat(folder / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                "y": labels[split]})
        digest = hashlib.md5((folder / f"{split}_32x32.mat").read_bytes(), usedforsecurity=False).hexdigest()
        split_list[split] = ["unused-url", f"{split}_32x32.mat", digest]
    split_list["extra"] = ["unused-url", "extra_32x32.mat", "0" * 32]
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)
    return labels
