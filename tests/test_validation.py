"""Bad configs are refused before any work, with one line naming the key, the value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, make_cfg

from detox.config import ConfigError, validate

BAD = [
    (["workers=0"], "workers=0: must be an integer >= 1"),
    (["worker_fail=46"], "worker_fail=46: must be <= workers (45)"),
    (["worker_fail=-1"], "worker_fail=-1"),
    (["group_size=4"], "group_size=4: workers=45 must be divisible"),
    (["batch_size=0"], "batch_size=0"),
    (["lr=0"], "lr=0"),
    (["momentum=1.0"], "momentum=1.0: must be in [0, 1)"),
    (["max_steps=0"], "max_steps=0"),
    (["eval_freq=-5"], "eval_freq=-5"),
    (["target_acc=1.5"], "target_acc=1.5"),
    (["adversary.placement=everywhere"], "adversary.placement='everywhere': unknown"),
    (["approach.buckets=16"], "approach.buckets=16: must be null or an integer in [1, 15]"),
    (["mode=bulyan", "workers=9"], "bulyan needs n >= 4f + 3; got n=3, f=2"),
    (["mode=krum", "approach=baseline", "worker_fail=22"], "krum needs n >= 2f + 3; got n=45, f=22"),
    (["approach.buckets=3", "approach.inner=multi-krum", "mode=mean"],
     "approach.inner=multi-krum sees as few as n=5 winners per bucket with f=2"),
    (["err_mode=alie", "worker_fail=23", "approach=baseline", "mode=mean"], "err_mode=alie: z_max is undefined"),
    (["network=lenet"], "network=lenet expects inputs of shape [1, 28, 28] but dataset=digits has [1, 8, 8]"),
    (["eval_batch_size=0"], "eval_batch_size=0"),
    (["mode.f=-1"], "mode.f=-1: must be >= 0"),
    (["weight_decay=-0.1"], "weight_decay=-0.1: must be >= 0"),
    (["checkpoint.every=15"], "checkpoint.every=15: must be null or a positive multiple of eval_freq (50)"),
    (["dataset=synthetic", "dataset.num_classes=1"], "dataset.num_classes=1: a classifier needs at least 2"),
    (["err_mode=gaussian", "err_mode.std=-1"], "err_mode.std=-1: must be a finite number >= 0"),
    (["err_mode.scale=inf"], "err_mode.scale=inf: must be a finite number >= 0 for err_mode=rev_grad"),
    (["approach.vote_tol=-0.5"], "approach.vote_tol=-0.5: must be >= 0"),
    (["approach.inner_f=-2"], "approach.inner_f=-2: must be null or an integer >= 0"),
    (["mode.m=0"], "multi-krum: m must be an integer in [1, n]; got m=0, n=15"),
    (["engine=mpi", "engine.timeout=0"], "engine.timeout=0: must be > 0 seconds"),
    (["engine=mpi", "save=false"], "save=false: engine=mpi reports through files"),
    (["engine=mpi", "engine.compress=zip"], "engine.compress='zip': must be null or blosc"),
    (["engine=mpi", "engine.faults=[{rank: 99, kind: exit}]"], "engine.faults[0].rank=99: must be a worker rank"),
]
if not torch.cuda.is_available():
    BAD.append((["device=cuda"], "device='cuda': no CUDA device is available here; use device=cpu"))


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(overrides))


def test_default_config_is_valid() -> None:
    plan = validate(make_cfg())
    assert (plan.approach, plan.mode, plan.f, plan.rule_inputs) == ("draco-lite", "multi-krum", 2, 15)


def test_cli_refuses_with_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = cli(["group_size=4", f"hydra.run.dir={tmp_path}"], cwd=ROOT)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["detox: error: group_size=4: workers=45 must be divisible by it for approach=draco-lite"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # no training started


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "detox.train", "group_size=4", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_at_least_fifteen_bad_configs() -> None:
    assert len(BAD) >= 15
