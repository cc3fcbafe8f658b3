"""Audit of "same seed, same trajectory": a crash and resume (also with augmentation, and with evaluation=external,
whose weights files are written again after the checkpoint), a rerun with another config into the folder, a sweep
job against a single run, the local_parallel launcher against sequential jobs, threads, and engine=mpi against
engine=local on a diverging run.

Compared bit for bit: every record's training and evaluation fields (timings aside), model.pt and every
model_step_<t> file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, read_metrics, run_job

from detox import trainer
from detox.trainer import CHECKPOINT

# the trajectory's fields of a record (timings differ from run to run)
FIELDS = ("step", "epoch", "samples", "train_loss", "test_loss", "test_acc", "test_acc5", "corrupted_groups",
          "vote_fallbacks", "byzantine_workers")
SMALL = ["workers=9", "worker_fail=1", "group_size=3", "max_steps=4", "eval_freq=2", "save_model=true"]


def trajectory(folder: Path) -> list[dict]:
    return [{k: r[k] for k in FIELDS} for r in read_metrics(folder)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    assert trajectory(a) == trajectory(b)
    wa, wb = weights(a / "model.pt"), weights(b / "model.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    files = sorted(p.name for p in (a / "models").glob("model_step_*")) if (a / "models").is_dir() else []
    assert files == (sorted(p.name for p in (b / "models").glob("model_step_*")) if files else [])
    for name in files:
        fa, fb = weights(a / "models" / name), weights(b / "models" / name)
        assert all(torch.equal(fa[k], fb[k]) for k in fa), name


# ------------------------------------------------------------------------------------------- crash and resume

RESUMED = ["max_steps=60", "eval_freq=10", "checkpoint.every=20", "save_model=true"]
# augmented: the crops and flips are drawn from (seed, unit, step), so a resumed run draws the same ones
VARIANTS = {"inloop": [], "external": ["evaluation=external"], "augmented": ["dataset.augment=crop-flip"]}


class Crash(RuntimeError):
    """The stand-in for a crash at a chosen point of the loop."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full")
    for name, extra in VARIANTS.items():
        assert run_job([*RESUMED, *extra], root / name)["status"] == "completed"
    assert trajectory(root / "augmented") != trajectory(root / "inloop")  # the augmentation took effect
    return {name: root / name for name in VARIANTS}


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int, after_checkpoint: bool) -> None:
    """Raise Crash once the loop has written step ``step``'s checkpoint (``after_checkpoint``), or once it has written
    step ``step``'s weights file and metrics record but not yet its checkpoint."""
    if after_checkpoint:
        save = trainer.save_checkpoint

        def save_then_crash(cfg, path, state):  # noqa: ANN001, ANN202
            save(cfg, path, state)
            if state["records"][-1]["step"] == step:
                raise Crash(f"crashed after the checkpoint of step {step}")

        monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    else:
        append = trainer.append_jsonl

        def append_then_crash(path, rec):  # noqa: ANN001, ANN202
            append(path, rec)
            if rec["step"] == step:
                raise Crash(f"crashed after the record of step {step}")

        monkeypatch.setattr(trainer, "append_jsonl", append_then_crash)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("after_checkpoint", [True, False], ids=["after-checkpoint", "between-checkpoints"])
def test_a_crash_and_rerun_give_the_uninterrupted_run(variant: str, after_checkpoint: bool,
                                                      uninterrupted: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashed after the checkpoint of step 40, or at step 30's record (its weights file written, the checkpoint of
    step 20 the last one): the rerun in the folder resumes and ends with the uninterrupted run's records, model.pt and
    weights files, bit for bit, and no checkpoint left."""
    job, run = [*RESUMED, *VARIANTS[variant]], tmp_path / "run"  # (a sweep skips a twin in a sibling)
    with monkeypatch.context() as mp:
        crash_at(mp, 40 if after_checkpoint else 30, after_checkpoint)
        crashed = run_job(job, run, multirun=True)
    assert crashed["status"] == "failed" and "Crash" in crashed["error"], crashed
    state = torch.load(run / CHECKPOINT, weights_only=True)
    assert state["records"][-1]["step"] == (40 if after_checkpoint else 20)
    assert run_job(job, run)["status"] == "completed"
    assert_same_run(uninterrupted[variant], run)
    assert not (run / CHECKPOINT).exists()


@pytest.mark.parametrize("changed", ["threads=2", "evaluation=external", "checkpoint.every=40"])
def test_a_rerun_with_another_config_leaves_the_checkpoint_alone(changed: str, uninterrupted: dict[str, Path],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The folder holds a crashed run with its checkpoint; a rerun with one setting changed (even one that leaves
    the trajectory alone, like threads) is another config: refused in one line, exit 2, nothing touched; the rerun
    with the run's own config then resumes it to the uninterrupted result."""
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        crash_at(mp, 40, after_checkpoint=True)
        assert run_job(RESUMED, run, multirun=True)["status"] == "failed"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(SystemExit) as exit_:
        run_job([*RESUMED, changed], run)
    assert exit_.value.code == 2 and "holds a run of a different config" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert run_job(RESUMED, run)["status"] == "completed"
    assert_same_run(uninterrupted["inloop"], run)


# ----------------------------------------------------------------------------------- launchers and settings

@pytest.mark.slow
def test_a_sweep_job_and_the_local_parallel_launcher_follow_the_single_runs_trajectory(tmp_path: Path) -> None:
    """A job of a sequential sweep and of a local_parallel sweep (separate processes) are the single run with the
    same overrides, bit for bit. Fashion-MNIST's MLP: its sums are large enough for torch to split them over threads
    (a forked local_parallel job once ran them on 2 threads with threads=1; digits' are not)."""
    overrides = [*SMALL, "task=fc-fashion"]
    for seed in (0, 1):
        single = cli([*overrides, f"seed={seed}", f"hydra.run.dir={tmp_path / f'single{seed}'}"], cwd=ROOT)
        assert single.returncode == 0, single.stderr[-2000:]
    for name, extra in (("sequential", []), ("parallel", ["hydra/launcher=local_parallel"])):
        sweep = cli(["-m", *overrides, "seed=0,1", *extra, f"hydra.sweep.dir={tmp_path / name}"], cwd=ROOT)
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        jobs = {json.loads(x)["job"] for x in (tmp_path / name / "summary.jsonl").read_text().splitlines()}
        for seed in (0, 1):
            (job,) = [j for j in jobs if f"seed={seed}" in j]
            assert_same_run(tmp_path / f"single{seed}", tmp_path / name / job)


@pytest.mark.slow
def test_threads_move_only_the_last_bits(tmp_path: Path) -> None:
    """threads=2 is its own deterministic trajectory (run to run bit for bit); against threads=1 torch's
    multi-threaded reductions move the last bits only (measured: weights within 1e-7, losses within 1e-8)."""
    job = ["max_steps=40", "eval_freq=10", "save_model=true"]
    for name, extra in (("one", ["threads=1"]), ("two", ["threads=2"]), ("two-again", ["threads=2"])):
        proc = cli([*job, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(tmp_path / "two", tmp_path / "two-again")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for k in FIELDS:
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (k, a["step"])
    wa, wb = weights(tmp_path / "one" / "model.pt"), weights(tmp_path / "two" / "model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_matches_local_bit_for_bit(tmp_path: Path) -> None:
    """On this machine engine=mpi gives engine=local's records and weights exactly (tests/test_mpi.py allows
    float round-off between hosts; one host has none)."""
    job = [*SMALL, "threads=1"]
    assert run_job(job, tmp_path / "local")["status"] == "completed"
    mpi = run_job([*job, "engine=mpi"], tmp_path / "mpi")
    assert mpi["status"] == "completed", mpi.get("error")
    assert_same_run(tmp_path / "local", tmp_path / "mpi")


@pytest.mark.slow
@pytest.mark.mpi
def test_a_diverging_run_stops_at_the_same_step_in_both_engines(tmp_path: Path) -> None:
    """Gaussian rows of std 1e20 into the plain mean: the training loss overflows at step 2. engine=local stops
    there (status diverged); engine=mpi used to count every honest rank's report [loss nan] as malformed (and that
    rank's reports as untrusted for the rest of the run), so its train_loss stayed finite and it stopped a step
    later on non-finite weights. Now the PS checks such a report by computing the batch's loss itself."""
    job = ["workers=6", "worker_fail=1", "group_size=3", "max_steps=10", "eval_freq=2", "approach=baseline",
           "mode=mean", "err_mode=gaussian", "err_mode.std=1e20", "threads=1", "save_model=true"]
    local = run_job(job, tmp_path / "local")
    mpi = run_job([*job, "engine=mpi"], tmp_path / "mpi")
    assert local["status"] == "diverged" and local["steps"] == 2
    assert (mpi["status"], mpi["steps"], mpi["malformed_messages"], mpi["malformed_by_rank"]) == ("diverged", 2, 0, {})
    assert trajectory(tmp_path / "local") == trajectory(tmp_path / "mpi")



FORKED = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import make_cfg
from detox import trainer
torch.set_num_threads(1)  # the launcher's process, as it was set when the job is forked
if os.fork() == 0:
    trainer.configure_threads(make_cfg(["threads=1"]))
    print(torch.get_num_threads(), flush=True)
    os._exit(0)
os.wait()
"""


def test_a_forked_job_runs_on_the_threads_it_was_given() -> None:
    """In a process forked from one that had set torch's threads (a local_parallel job), numba's first call started
    its OpenMP pool after torch.set_num_threads(1) and reset it: torch ran on 2 threads."""
    proc = subprocess.run([sys.executable, "-c", FORKED.format(tests=str(ROOT / "tests"))], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.split() == ["1"], proc.stdout + proc.stderr[-2000:]
