"""hydra/launcher=slurm under attack, against the real one-node Slurm of tests/test_slurm.py (its fixture): a job
cancelled mid-run, a job Slurm will never start, a job requeued by ``scontrol requeue``.

hydra-submitit-launcher's own launcher waits for a job's result file, asking ``sacct`` for its state; this cluster
has no accounting (as many small clusters), so a job that ended without a result (scancel, out of memory, a node
failure) or that stays pending forever kept the sweep waiting forever. With accounting it ended the whole sweep
with submitit's UncompletedJobError instead (no summary.jsonl). detox's launcher (detox.launcher.SlurmLauncher)
asks ``scontrol`` and records such a job failed; the sweep goes on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_slurm
from test_launcher_audit2 import plugin_path
from test_slurm import FIVE_MINUTES, SMALL, detox, finished_job, untimed_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = test_slurm.pytestmark


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """tests/test_slurm.py's one-node cluster, started for this module (stopped after it, whatever happened)."""
    yield from test_slurm.slurm.__wrapped__(tmp_path_factory)


def env_with_plugin(slurm: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    plug, target = plugin_path(tmp_path, poll_s=1.0, grace_s=5.0)
    return {**slurm, "PYTHONPATH": f"{ROOT}:{plug}"}, target


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert proc is None or proc.poll() is None, f"the sweep ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def squeue(env: dict[str, str]) -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=env, timeout=30,
                          check=True).stdout.split("\n")[:-1]


def test_a_cancelled_job_is_recorded_failed_and_the_sweep_goes_on(slurm: dict[str, str], tmp_path: Path) -> None:
    # before: the sweep waited for the cancelled job forever (submitit read its state as UNKNOWN without sacct)
    env, target = env_with_plugin(slurm, tmp_path)
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", *target,
                             "max_steps=20,1000000", "eval_freq=100", f"hydra.sweep.dir={sweep}", *SMALL, FIVE_MINUTES],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        long = sweep / "eval_freq=100,max_steps=1000000,threads=1"
        wait_for(lambda: (long / "metrics.jsonl").exists(), 180, "the long job to train", proc)
        (array,) = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}
        task = f"{array}_1"  # the sweep's job #1 is array task 1
        subprocess.run(["scancel", task], env=env, check=True, timeout=30)
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--full", *[line.split()[0] for line in squeue(env)]], env=env, timeout=30)
    assert proc.returncode == 0, stdout
    assert f"detox: sweep {sweep}: 2 jobs: 1 completed, 1 failed" in stdout, stdout
    rows = {r["max_steps"]: r for r in map(json.loads, (sweep / "summary.jsonl").read_text().splitlines())}
    assert rows[20]["status"] == "completed"
    assert rows[1000000]["status"] == "failed"
    assert rows[1000000]["error"].startswith(f"Slurm job {task} CANCELLED without a result (its log: "), rows
    assert finished_job(task, env)["JobState"] == "CANCELLED"
    wait_for(lambda: squeue(env) == [], 60, "Slurm to take the jobs off its queue")  # (a moment after the result)


def test_a_job_slurm_will_never_start_is_recorded_failed(slurm: dict[str, str], tmp_path: Path) -> None:
    # before: sbatch takes a job asking for more CPUs than any node has (Slurm keeps it pending, reason
    # PartitionConfig) and the sweep waited for it forever
    env, target = env_with_plugin(slurm, tmp_path)
    sweep = tmp_path / "sweep"
    out = detox(["-m", "hydra/launcher=slurm", *target, "seed=0,1", "max_steps=2", f"hydra.sweep.dir={sweep}",
                 "hydra.launcher.cpus_per_task=4096", "hydra.launcher.mem_gb=1", FIVE_MINUTES], tmp_path, env,
                timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr  # nothing ran through
    assert f"detox: sweep {sweep}: 2 jobs: 0 completed, 2 failed" in out.stdout, out.stdout
    for row in map(json.loads, (sweep / "summary.jsonl").read_text().splitlines()):
        assert row["status"] == "failed"
        assert re.match(r"never started: Slurm keeps job \d+_\d pending for PartitionConfig \(it asks for more "
                        r"CPUs, memory, nodes or GPUs than partition debug has", row["error"]), row["error"]
    # cancelled, not left pending in the queue (Slurm takes a job off it a moment after its end)
    wait_for(lambda: squeue(env) == [], 60, "Slurm to take the jobs off its queue")


@pytest.mark.parametrize("launcher", ["submitit", "detox"])
def test_a_job_requeued_by_scontrol_resumes_the_identical_trajectory(slurm: dict[str, str], tmp_path: Path,
                                                                     launcher: str) -> None:
    """``scontrol requeue`` (an administrator, or a preemption with PreemptMode=REQUEUE): Slurm sends SIGTERM,
    which submitit's job ignores, then SIGKILL after KillWait (5 s on the test cluster); the job starts again and
    resumes from its last checkpoint, ending where the uninterrupted run ends."""
    env, target = env_with_plugin(slurm, tmp_path) if launcher == "detox" else ({**slurm}, [])
    job = ["max_steps=4000", "eval_freq=500", "checkpoint.every=500"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", *target, *job,
                             f"hydra.sweep.dir={sweep}", *SMALL, FIVE_MINUTES], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(sweep.glob("*/checkpoint.pt")), 180, "a checkpoint", proc)
        (ids,) = {p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+", p.name)}
        subprocess.run(["scontrol", "requeue", ids], env=env, check=True, timeout=30)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert "1 jobs: 1 completed, 0 failed" in stdout, stdout
    (folder,) = [p for p in sweep.iterdir() if (p / "summary.json").exists()]
    resumed = re.findall(r"resuming from .*checkpoint\.pt at step (\d+)", (folder / "train.log").read_text())
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 4000, "the job ended before Slurm killed it: nothing tested"
    assert finished_job(ids, env)["Restarts"] == "1"

    local = tmp_path / "local"
    run = detox([*job, "threads=1", f"hydra.run.dir={local}"], tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr
    assert untimed_metrics(local) == untimed_metrics(folder)


def test_a_job_whose_run_cannot_start_is_recorded_and_the_sweep_goes_on(slurm: dict[str, str], tmp_path: Path) -> None:
    # before: the job function raised in the Slurm job (Hydra's run_job cannot make the job's folder: a file is in
    # the way), submitit's FailedJobError came out of the launcher and ended the sweep with its traceback, exit 1
    env, target = env_with_plugin(slurm, tmp_path)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "max_steps=20,seed=1,threads=1").write_text("a file where the job's folder goes")
    out = detox(["-m", "hydra/launcher=slurm", *target, "seed=0,1", "max_steps=20", f"hydra.sweep.dir={sweep}", *SMALL,
                 FIVE_MINUTES], tmp_path, env, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert re.search(r"#1 failed: \S+max_steps=20,seed=1,threads=1 \(Slurm job \d+_1: FileExistsError: "
                     r"\[Errno 17\] File exists: ", text), text
    assert "#1: could not record the failure in " in text  # a file is there: nothing is written over it
    assert "Traceback" not in out.stdout
    assert f"detox: sweep {sweep}: 1 jobs: 1 completed, 0 failed" in out.stdout, text  # the folder of seed=0


def test_two_sweeps_into_one_root_run_a_job_once(slurm: dict[str, str], tmp_path: Path) -> None:
    """The same job submitted by two sweeps at once: two Slurm jobs under two slurmstepd, one folder. The second
    finds the first holding the folder's lock and skips it (the launcher says so); the first runs it through."""
    env, target = env_with_plugin(slurm, tmp_path)
    sweep = tmp_path / "sweep"
    job = ["max_steps=6000", "eval_freq=1000"]
    args = [sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", *target, *job,
            f"hydra.sweep.dir={sweep}", *SMALL, FIVE_MINUTES]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (folder,) = wait_for(lambda: [p.parent for p in sweep.glob("*/metrics.jsonl")], 180, "the job to train", first)
        second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        stdout, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stdout
    assert "1 jobs: 1 completed, 0 failed" in stdout, stdout
    assert re.search(rf"#0 skipped: {re.escape(str(folder))} \(another process holds the folder", second.stdout + \
                     second.stderr), second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 6001, 1000))  # one run wrote it, once
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    wait_for(lambda: squeue(env) == [], 60, "Slurm to take the jobs off its queue")  # (a moment after the result)
