"""hydra/launcher=slurm against a real Slurm: Debian's slurm-wlm + munge as a one-node cluster on this machine.

tests/cluster_fixtures/slurm.sh installs the packages when missing, writes a private slurm.conf, starts munged,
slurmctld and slurmd, and waits until the node is idle; the sweep below is submitted through submitit's sbatch
and runs under slurmstepd. The cluster has no slurmdbd (no `sacct`): Slurm's own view of each job comes from
`scontrol show job` (finished jobs are kept for MinJobAge = 1 h) and the jobcomp/filetxt log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "cluster_fixtures" / "slurm.sh"

# small-machine values for conf/hydra/launcher/slurm.yaml (its defaults are for real clusters: 4 CPUs, 16 GB, 4 h)
SMALL = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "threads=1"]
FIVE_MINUTES = "hydra.launcher.timeout_min=5"
RUN = ["max_steps=20"]

pytestmark = [
    pytest.mark.slow,  # about 20 s with the packages installed (apt-get install adds a minute the first time)
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                       reason="a real Slurm cluster needs root (slurmd, munged) on Linux"),
    pytest.mark.skipif(shutil.which("slurmctld") is None and shutil.which("apt-get") is None,
                       reason="slurm-wlm is not installed and there is no apt-get to install it"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment that points Slurm's commands at it. Stopped (daemons
    killed, state folder removed) after the module's tests, whatever happened."""
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    # own ports: a system Slurm or a concurrent test run on the default 6817/6818 is left alone
    env = {**os.environ, "DETOX_SLURMCTLD_PORT": str(free_port()), "DETOX_SLURMD_PORT": str(free_port())}
    try:
        started = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True, env=env,
                                 timeout=900)
        assert started.returncode == 0, f"slurm.sh start failed:\n{started.stdout}\n{started.stderr}"
        assert started.stdout.strip().splitlines()[-1] == f"SLURM_CONF={state}/slurm.conf", started.stdout
        yield {**env, "SLURM_CONF": str(state / "slurm.conf"), "PYTHONUNBUFFERED": "1"}
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not state.exists()


def scontrol_job(job: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env,
                         timeout=30, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def finished_job(job: str, env: dict[str, str], timeout: float = 60) -> dict[str, str]:
    """Slurm's record of a job once it has left RUNNING/COMPLETING. submitit counts a job done as soon as its
    result file exists, while the batch script (and so the Slurm job) may still be exiting."""
    deadline = time.monotonic() + timeout
    while (info := scontrol_job(job, env))["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
        assert time.monotonic() < deadline, f"Slurm job {job} still {info['JobState']} after {timeout} s"
        time.sleep(0.5)
    return info


def untimed_metrics(job: Path) -> list[dict]:
    """metrics.jsonl without its clock readings (wall/cluster/eval time, t_* phases): what must not differ."""
    return [{k: v for k, v in json.loads(line).items() if "time" not in k and not k.startswith("t_")}
            for line in (job / "metrics.jsonl").read_text().splitlines()]


def detox(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detox.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_a_sweep_runs_through_slurm_and_matches_a_local_run(slurm: dict[str, str], tmp_path: Path) -> None:
    state = Path(slurm["SLURM_CONF"]).parent
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=slurm,
                           timeout=30, check=True).stdout.split()
    assert nodes[1] == "idle", nodes

    sweep = tmp_path / "sweep"
    # the command docs/cluster.md shows as verified; submitit runs each job with this same interpreter (the venv)
    out = detox(["-m", "hydra/launcher=slurm", "seed=0,1", *RUN, f"hydra.sweep.dir={sweep}", *SMALL,
                 FIVE_MINUTES], tmp_path, slurm)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{(state / 'slurmctld.log').read_text()[-3000:]}"
    assert f"detox: sweep {sweep}: 2 jobs: 2 completed, 0 failed" in out.stdout, out.stdout

    # detox's own records: each job's summary.json and the sweep's summary.jsonl
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    for row in rows:
        summary = json.loads((Path(row["dir"]) / "summary.json").read_text())
        assert summary["status"] == row["status"] == "completed"
        assert summary["steps"] == 20

    # submitit's records: one folder per Slurm array task, its log written from inside the Slurm job
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2, tasks
    array_id = tasks[0].split("_")[0]
    assert tasks == [f"{array_id}_0", f"{array_id}_1"]
    for task in tasks:
        log = (sweep / ".submitit" / task / f"{task}_0_log.out").read_text()
        # submitit reads the job id from SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID, set by slurmstepd
        assert f"Starting with JobEnvironment(job_id={task}," in log, log
        assert "Job completed successfully" in log, log
        assert (sweep / ".submitit" / task / f"{task}_0_result.pkl").exists()

        # Slurm's own view: slurmctld ran and finished this array task, writing to submitit's folder
        job = finished_job(task, slurm)
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["ArrayJobId"] == array_id and f"{array_id}_{job['ArrayTaskId']}" == task, job
        assert job["StdOut"] == str(sweep / ".submitit" / task / f"{task}_0_log.out"), job
        assert job["NumCPUs"] == "1", job  # hydra.launcher.cpus_per_task reached sbatch
    completed = [line for line in (state / "jobcomp.log").read_text().splitlines()
                 if f"ArrayJobId={array_id} " in line and "JobState=COMPLETED" in line]
    assert len(completed) == 2, (state / "jobcomp.log").read_text()

    # the same seed through Slurm and on the command line: the same run, to the last bit of its metrics
    local = tmp_path / "local"
    run = detox(["seed=0", *RUN, f"hydra.run.dir={local}"], tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr
    through_slurm = next(Path(r["dir"]) for r in rows if r["seed"] == 0)
    mine, theirs = (json.loads((d / "summary.json").read_text()) for d in (local, through_slurm))
    assert mine["final_test_acc"] == theirs["final_test_acc"] and mine["final_test_loss"] == theirs["final_test_loss"]
    assert untimed_metrics(local) == untimed_metrics(through_slurm)


def test_a_job_out_of_time_is_recorded_failed_and_the_sweep_goes_on(slurm: dict[str, str], tmp_path: Path) -> None:
    """Slurm's time limit, for real: sbatch --signal=USR2@30 with a 1-minute limit signals the job after 30 s (up
    to slurmctld's 30 s check period later); with hydra's max_num_timeout=0 submitit gives up on the job, detox
    records why in its summary.json, and the other job of the sweep and the end-of-sweep report are unaffected.
    (The signal must come after submitit has installed its handler, a few seconds into the job: USR2 before that
    kills the job without a result file, and without sacct submitit would wait for it forever.)"""
    sweep = tmp_path / "sweep"
    out = detox(["-m", "hydra/launcher=slurm", "max_steps=20,1000000", "eval_freq=1000", f"hydra.sweep.dir={sweep}",
                 *SMALL, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30"], tmp_path, slurm,
                timeout=240)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "2 jobs: 1 completed, 1 failed" in out.stdout, out.stdout
    rows = {r["max_steps"]: r for r in map(json.loads, (sweep / "summary.jsonl").read_text().splitlines())}
    assert rows[20]["status"] == "completed"
    assert rows[1000000]["status"] == "failed"
    assert "timed-out" in rows[1000000]["error"], rows[1000000]["error"]


def test_a_preempted_job_is_requeued_by_slurm_and_resumes_from_its_checkpoint(slurm: dict[str, str],
                                                                              tmp_path: Path) -> None:
    """USR2 sent through Slurm (scancel --signal, as a preemption or the time limit's warning would) once the job
    has a checkpoint: submitit requeues it (scontrol requeue), Slurm starts it again, detox resumes from the
    checkpoint, and the result is the uninterrupted run's, to the last bit."""
    job = ["max_steps=200", "eval_freq=50", "checkpoint.every=50"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", *job,
                             f"hydra.sweep.dir={sweep}", *SMALL, FIVE_MINUTES, "hydra.launcher.max_num_timeout=1"],
                            cwd=tmp_path, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(sweep.glob("*/checkpoint.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
            time.sleep(0.05)
        (ids,) = {p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+", p.name)}
        subprocess.run(["scancel", "--signal=USR2", ids], env=slurm, check=True, timeout=30)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert "1 jobs: 1 completed, 0 failed" in stdout, stdout

    (folder,) = [p for p in sweep.iterdir() if (p / "summary.json").exists()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 200
    resumed = re.findall(r"resuming from .*checkpoint\.pt at step (\d+)", (folder / "train.log").read_text())
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 200, resumed
    log = (sweep / ".submitit" / ids / f"{ids}_0_log.out").read_text()
    assert log.count(f"Starting with JobEnvironment(job_id={ids},") == 2, log  # two runs of the same Slurm job
    info = finished_job(ids, slurm)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info

    local = tmp_path / "local"
    run = detox([*job, f"hydra.run.dir={local}"], tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr
    assert untimed_metrics(local) == untimed_metrics(folder)


def test_sigcont_gets_its_default_action_in_a_submitit_job_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # submitit's SIGCONT handler logs; a time-limit USR2 handled inside that logging call had its "timed-out" error
    # swallowed by logging (CI: the job trained on until killed). detox gives SIGCONT back its default action.
    import signal

    from detox.train import submitit_signals

    def logs(signum, frame):  # what submitit installs
        pass

    previous = signal.signal(signal.SIGCONT, logs)
    try:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        with submitit_signals() as submitit:  # not a submitit job: untouched
            assert not submitit and signal.getsignal(signal.SIGCONT) is logs
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        with submitit_signals() as submitit:
            assert submitit and signal.getsignal(signal.SIGCONT) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGCONT, previous)
