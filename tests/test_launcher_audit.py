"""hydra/launcher=local_parallel under attack: odd n_jobs values, the launcher killed with -9, a signal while a job is
being started, a job that wrecks its own folder or raises an exception that cannot be pickled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_launcher import gone, make_app, wait_for

from detox.launcher import resolve_n_jobs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
STARTED = re.compile(r"#(\d+) started: (.+) \(pid (\d+)\)")

TASK = """
import os, shutil, signal, subprocess, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

if os.environ.get("SIGNAL_WHILE_STARTING"):
    # the launcher is sent SIGTERM while it forks its first job (signals are blocked there: it arrives right after)
    import detox.launcher as _launcher
    _real_setpgid, _me = os.setpgid, os.getpid()

    def _setpgid(pid, pgid):
        if os.getpid() == _me and pid != 0 and not os.environ.get("SIGNALLED"):
            os.environ["SIGNALLED"] = "1"
            os.kill(_me, signal.SIGTERM)
        return _real_setpgid(pid, pgid)

    _launcher.os.setpgid = _setpgid


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.x == "hang":  # a process of its own, then never ends
        sleeper = subprocess.Popen(["sleep", "1000"])
        (out / "sleeper.pid").write_text(str(sleeper.pid))
        time.sleep(1000)
    if cfg.x == "clobber":  # its folder replaced by a file, then it dies: the launcher cannot record it there
        shutil.rmtree(out)
        out.write_text("not a folder")
        os._exit(3)
    if cfg.x == "unpicklable":
        class Inner(Exception):
            pass
        raise Inner("a local exception class")
    (out / "done").write_text("1")
    return 1.0


if __name__ == "__main__":
    main()
"""


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return make_app(tmp_path, TASK)


def sleeper_pids(root: Path) -> list[int] | None:
    texts = [p.read_text() for p in root.glob("*/sleeper.pid")]
    return [int(t) for t in texts] if len(texts) == 2 and all(texts) else None


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------------------- n_jobs


@pytest.mark.parametrize("value", [1.5, True, "3", None, [2], 0.0])
def test_n_jobs_that_is_not_a_whole_number_is_refused(value: object) -> None:
    # before: 1.5 and true ran one job at a time (int() truncated them), '3' ran three, null and a list failed
    # with a TypeError that the CLI could not fold into one line
    with pytest.raises(ValueError, match=r"^hydra\.launcher\.n_jobs="):
        resolve_n_jobs(value)


def test_n_jobs_that_is_a_whole_float_is_taken() -> None:
    assert resolve_n_jobs(3.0) == 3 and resolve_n_jobs(-1.0) == len(os.sched_getaffinity(0))


def test_a_null_n_jobs_is_one_line_before_the_sweep_starts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=local_parallel",
                           "hydra.launcher.n_jobs=null", f"hydra.sweep.dir={tmp_path / 'root'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("detox: error: hydra.launcher.n_jobs=None: give a whole number of jobs >= 1, or "
                                   "-1 for one per core")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the launcher dies


def test_kill_9_of_the_launcher_ends_what_its_jobs_started(task: Path, tmp_path: Path) -> None:
    # before: PDEATHSIG ended each job process alone; the processes the jobs had started ran on, orphaned
    root = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(task), "-m", "x=hang", "+y=0,1", f"hydra.sweep.dir={root}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    sleepers: list[int] = []
    try:
        sleepers = wait_for(lambda: sleeper_pids(root), 60, "both jobs' sleepers")
        proc.kill()
        proc.wait(timeout=10)
        for pid in sleepers:
            wait_for(lambda pid=pid: gone(pid), 15, f"sleeper {pid} to end")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in sleepers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_signal_while_a_job_is_starting_stops_and_records_that_job(task: Path, tmp_path: Path) -> None:
    # before: the SIGTERM (blocked while forking) was handled before the job was added to the running jobs, so
    # the launcher stopped "no" jobs: the job was never recorded and what it started was left behind
    root = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(task), "-m", "x=hang", "+y=0,1", f"hydra.sweep.dir={root}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**ENV, "SIGNAL_WHILE_STARTING": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM, out
    started = [m for m in (STARTED.search(line) for line in out.splitlines()) if m]
    assert len(started) == 1 and started[0][1] == "0", out  # nothing new starts once stopping
    job, pid = Path(started[0][2]), int(started[0][3])
    assert f"#0 failed: {job} (job process killed by SIGTERM)" in out, out
    assert summary(job)["status"] == "failed" and summary(job)["error"] == "job process killed by SIGTERM"
    wait_for(lambda: gone(pid), 10, "the job process to end")
    sleeper = job / "sleeper.pid"
    if sleeper.exists() and sleeper.read_text():
        wait_for(lambda: gone(int(sleeper.read_text())), 10, "the job's sleeper to end")


# --------------------------------------------------------------------------------------------- jobs that misbehave


def test_a_job_that_wrecks_its_folder_does_not_end_the_sweep(task: Path, tmp_path: Path) -> None:
    # before: recording the failure raised (the folder is a file now) out of the launcher: the sweep ended there,
    # with a traceback, and the job after it never ran. An exception class that cannot be pickled back was
    # reported as "RuntimeError: Inner: ..."
    root = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(task), "-m", "x=clobber,unpicklable,ok", f"hydra.sweep.dir={root}",
                           "hydra.launcher.n_jobs=1"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert (root / "0").is_file() and f"#0: could not record the failure in {root / '0'}" in out
    assert f"#0 failed: {root / '0'} (job process exited with code 3)" in out
    assert summary(root / "1")["error"] == "Inner: a local exception class"
    assert (root / "2" / "done").exists() and f"#2 completed: {root / '2'}" in out


# ------------------------------------------------------------------------------------------ hydra/launcher=slurm

def _slurm_sweep(tmp_path: Path, path: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", "seed=0,1",
                           "max_steps=2", "eval_freq=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**ENV, "PATH": path, "HYDRA_FULL_ERROR": "0"})


def _fake_slurm(tmp_path: Path) -> str:
    """A PATH whose sbatch refuses every job as a misconfigured cluster's does, next to an srun (submitit looks for
    it) and this Python."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_ / tool).chmod(0o755)
    return f"{bin_}:{Path(sys.executable).parent}"


def test_a_slurm_sweep_on_a_machine_without_slurm_is_one_line(tmp_path: Path) -> None:
    """No sbatch/srun on PATH: submitit's traceback ("Could not detect srun") after multirun.yaml was written;
    now one line, exit 2, before the sweep's folder exists."""
    out = _slurm_sweep(tmp_path, str(Path(sys.executable).parent))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "detox: error: hydra/launcher=slurm: sbatch and srun not found on PATH: this machine cannot submit Slurm "
        "jobs (run the sweep on a Slurm login node, or use hydra/launcher=local_parallel)"]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("hydra.launcher.timeout_min=-5", "hydra.launcher.timeout_min=-5: must be a whole number >= 1"),
    ("hydra.launcher.cpus_per_task=0", "hydra.launcher.cpus_per_task=0: must be a whole number >= 1"),
    ("hydra.launcher.mem_gb=-1", "hydra.launcher.mem_gb=-1: must be a whole number >= 1"),
    ("hydra.launcher.array_parallelism=0", "hydra.launcher.array_parallelism=0: must be a whole number >= 1"),
    ("hydra.launcher.partition='a b'", "hydra.launcher.partition='a b': not a Slurm name"),
    # submitit runs one copy of the Hydra job per task: the same run N times, N - 1 of them skipped on its lock
    ("hydra.launcher.tasks_per_node=2", "hydra.launcher.tasks_per_node=2: must be 1"),
    ("hydra.launcher.nodes=2", "hydra.launcher.nodes=2: must be 1"),
])
def test_slurm_settings_sbatch_would_refuse_are_one_line(override: str, message: str, tmp_path: Path) -> None:
    out = _slurm_sweep(tmp_path, _fake_slurm(tmp_path), override)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"detox: error: {message}"), lines
    assert not (tmp_path / "sweep").exists()


def test_sbatch_refusing_the_jobs_is_one_line(tmp_path: Path) -> None:
    """A cluster that refuses the submission (here: sbatch's own error) gave submitit's ~50-line FailedJobError."""
    out = _slurm_sweep(tmp_path, _fake_slurm(tmp_path), "hydra.launcher.partition=gpu")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "detox: error: sbatch refused the sweep: sbatch: error: invalid partition specified: gpu")
    assert "Traceback" not in out.stderr


def test_a_job_another_sweep_holds_is_logged_skipped(tmp_path: Path) -> None:
    """A job whose folder another sweep's run holds was logged ``#N completed`` (its summary was not written yet)."""
    from conftest import TINY, cli

    from detox.results import job_lock

    root = tmp_path / "sweep"
    def folder(seed: int) -> Path:  # named by its overrides, sorted (hydra.job.override_dirname)
        return root / ",".join(sorted([*TINY, f"seed={seed}"]))

    held = folder(1)
    held.mkdir(parents=True)
    with job_lock(held):
        proc = cli(["-m", "hydra/launcher=local_parallel", "seed=0,1", *TINY, f"hydra.sweep.dir={root}"], cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"#1 skipped: {held}" in out and "#1 completed" not in out
    assert f"#0 completed: {folder(0)}" in out
