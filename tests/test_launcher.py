"""hydra/launcher=local_parallel (detox.launcher): a job whose process dies is recorded failed, the others run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus

from detox.launcher import FailedJobReturn, ParallelLauncher, resolve_n_jobs

ROOT = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"#(\d+) started: (.+) \(pid (\d+)\): (.*)$")
# OpenMP threads that sleep instead of spinning between kernels: same results, and on a busy machine several times
# less CPU (measured: a 2-job sweep 21 s -> 5 s of CPU), which keeps this test's time bounded
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}


def started(log: Path) -> dict[str, tuple[Path, int]]:
    """The launcher's start lines so far: overrides -> (job folder, pid)."""
    text = log.read_text() if log.exists() else ""
    return {m[4]: (Path(m[2]), int(m[3])) for m in (STARTED.search(line) for line in text.splitlines()) if m}


def gone(pid: int) -> bool:
    """No such process (a zombie counts as gone: it runs nothing, and the sandbox's init may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201 - any predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


# -------------------------------------------------------------------------------------- detox sweeps, end to end

SWEEP = ["seed=0,1,2", "max_steps=150", "eval_freq=50", "threads=1"]


@pytest.mark.slow
def test_a_killed_job_is_recorded_failed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    root, log = tmp_path / "parallel", tmp_path / "parallel.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=local_parallel", *SWEEP,
                                 f"hydra.sweep.dir={root}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            # the seed=1 job, as soon as it has evaluated step 0: mid-run (it has 150 steps to go)
            victim, pid = wait_for(lambda: next((v for k, v in started(log).items() if "seed=1" in k.split()), None),
                                   120, "the seed=1 job to start")
            # a whole first record, not just the file: the job creates metrics.jsonl empty before its first evaluation
            metrics = victim / "metrics.jsonl"
            wait_for(lambda: metrics.exists() and metrics.read_text().endswith("\n"), 120, "the first evaluation")
            os.kill(pid, signal.SIGKILL)
            assert proc.wait(timeout=300) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    steps = [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] < 150, "the job finished before it was killed: nothing was tested"
    assert summary(victim)["status"] == "failed" and summary(victim)["error"] == "job process killed by SIGKILL"
    assert summary(victim)["seed"] == 1 and summary(victim)["max_steps"] == 150  # base_summary's fields
    assert re.search(rf"#\d+ failed: {re.escape(str(victim))} \(job process killed by SIGKILL\)", text), text
    assert len(re.findall(r"#\d+ completed: ", text)) == 2  # one progress line per job end
    lines = [json.loads(line) for line in (root / "summary.jsonl").read_text().splitlines()]
    assert sorted((s["seed"], s["status"]) for s in lines) == [(0, "completed"), (1, "failed"), (2, "completed")]
    assert len({s["dir"] for s in lines}) == 3
    assert all(gone(pid) for _, pid in started(log).values())

    # the same jobs under Hydra's basic launcher (in the driver process) end exactly where the parallel ones did
    basic = tmp_path / "basic"
    ref = subprocess.run([sys.executable, "-m", "detox.train", "-m", "seed=0,2", *SWEEP[1:],
                          f"hydra.sweep.dir={basic}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    ours = {s["seed"]: s for s in lines}
    for s in (json.loads(line) for line in (basic / "summary.jsonl").read_text().splitlines()):
        assert s["status"] == "completed"
        assert s["final_test_acc"] == ours[s["seed"]]["final_test_acc"]
        assert s["final_test_loss"] == ours[s["seed"]]["final_test_loss"]


# ------------------------------------------------------------------ the launcher alone, with a tiny task (no torch)

TASK = """
import os, signal, subprocess, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback


class Ends(Callback):
    # every job's end, as Hydra's callbacks see it (dead jobs' ends come from the launcher)
    def on_job_end(self, config, job_return, **kwargs):
        with open(Path(config.hydra.sweep.dir) / "ends.txt", "a") as fh:
            fh.write(f"{config.x} {job_return.status.name}\\n")


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.x == "exit":
        os._exit(3)
    if cfg.x == "raise":
        raise ValueError("boom")
    if cfg.x == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
    if cfg.x == "hang":  # a job that started a process of its own, then never ends
        sleeper = subprocess.Popen(["sleep", "1000"])
        (out / "sleeper.pid").write_text(str(sleeper.pid))
        time.sleep(1000)
    (out / "done").write_text("1")
    return 1.0


if __name__ == "__main__":
    main()
"""


def make_app(tmp_path: Path, source: str, extra_cfg: str = "") -> Path:
    """A Hydra app in ``tmp_path/app`` running ``source`` (its task.py) with the shipped local_parallel.yaml; x: ok by
    default; ``extra_cfg`` is appended to its cfg.yaml."""
    app = tmp_path / "app"
    (app / "hydra" / "launcher").mkdir(parents=True)
    (app / "hydra" / "launcher" / "local_parallel.yaml").write_text(
        (ROOT / "conf" / "hydra" / "launcher" / "local_parallel.yaml").read_text())
    (app / "cfg.yaml").write_text(textwrap.dedent("""\
        defaults:
          - override hydra/launcher: local_parallel
          - _self_
        x: ok
        """) + extra_cfg)
    (app / "task.py").write_text(source)
    return app / "task.py"


@pytest.fixture
def task(tmp_path: Path) -> Path:
    """A Hydra app using the shipped local_parallel.yaml and the Ends callback."""
    return make_app(tmp_path, TASK, "hydra:\n  callbacks:\n    ends: {_target_: __main__.Ends}\n")


def test_every_way_a_job_process_can_die_is_recorded(task: Path, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(task), "-m", "x=ok,exit,raise,signal", f"hydra.sweep.dir={root}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert (root / "0" / "done").exists() and not (root / "0" / "summary.json").exists()  # ran through, untouched
    errors = {job: summary(root / job)["error"] for job in ("1", "2", "3")}
    assert errors == {"1": "job process exited with code 3", "2": "ValueError: boom",
                      "3": "job process killed by SIGTERM"}
    assert all(summary(root / job)["status"] == "failed" for job in ("1", "2", "3"))
    for job, error in errors.items():
        assert f"#{job} failed: {root / job} ({error})" in out
    assert f"#0 completed: {root / '0'}" in out
    ends = sorted((root / "ends.txt").read_text().splitlines())
    assert ends == ["exit FAILED", "ok COMPLETED", "raise FAILED", "signal FAILED"]
    assert "Launching 4 jobs locally, 2 at a time" in out


def sleeper_pids(root: Path) -> list[int] | None:
    texts = [p.read_text() for p in root.glob("*/sleeper.pid")]
    return [int(t) for t in texts] if len(texts) == 2 and all(texts) else None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_launcher_stops_every_job_and_what_they_started(task: Path, tmp_path: Path,
                                                                     sig: signal.Signals) -> None:
    root, log = tmp_path / "sweep", tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(task), "-m", "x=hang", "+y=0,1,2", f"hydra.sweep.dir={root}"],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            wait_for(lambda: len(started(log)) == 2, 60, "two jobs to start")
            sleepers = wait_for(lambda: sleeper_pids(root), 60, "both jobs' sleepers")
            proc.send_signal(sig)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc != 0, log.read_text()
    if sig == signal.SIGTERM:
        assert rc == -signal.SIGTERM  # it dies of the signal it was sent, once its children are stopped
    jobs = started(log)
    assert len(jobs) == 2  # nothing new starts once stopping
    for pid in [pid for _, pid in jobs.values()] + sleepers:
        wait_for(lambda pid=pid: gone(pid), 10, f"process {pid} to end")
    for job, _ in jobs.values():
        assert summary(job)["status"] == "failed" and summary(job)["error"] == "job process killed by SIGTERM"


# ---------------------------------------------------------------------------------------------------- small parts


def test_n_jobs() -> None:
    assert resolve_n_jobs(3) == 3
    assert resolve_n_jobs(-1) == len(os.sched_getaffinity(0))
    assert ParallelLauncher().n_jobs == 2
    with pytest.raises(ValueError, match="n_jobs=0"):
        resolve_n_jobs(0)


def test_a_bad_n_jobs_is_one_line_before_the_sweep_starts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=local_parallel",
                           "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path / 'root'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "detox: error: hydra.launcher.n_jobs=0: give a number of jobs >= 1, or -1 for " \
                                  "one per core"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_return_does_not_raise_in_the_sweeper() -> None:
    ret = FailedJobReturn(status=JobStatus.FAILED)
    ret.return_value = RuntimeError("job process killed by SIGKILL")
    assert ret.return_value is None  # Hydra's sweeper reads it: the sweep goes on
    assert ret.status == JobStatus.FAILED and str(ret.error) == "job process killed by SIGKILL"
