"""hydra/launcher=slurm's waiting, without a real Slurm: a fake sbatch/scontrol/scancel on PATH. A Slurm job that
ends without a result (scancel, out of memory, a node failure) or that Slurm will never start (it asks for more than
the partition has) is recorded failed and the sweep goes on. hydra-submitit-launcher's own launcher waited for such
a job forever on a cluster without ``sacct`` (its state stays UNKNOWN), and with ``sacct`` ended the whole sweep
with submitit's UncompletedJobError (no summary.jsonl). The real-Slurm versions are in tests/test_slurm_audit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from detox.launcher import SLURM_ENDED, _task_ids, slurm_states

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text()).get("_target_")
# hydra/launcher=slurm is detox's Slurm launcher (detox.launcher.SlurmLauncher, through the shim
# hydra_plugins.detox_launcher: Hydra instantiates launchers only from the hydra_plugins namespace)
DETOX_TARGET = "hydra_plugins.detox_launcher.SlurmLauncher"


def plugin_path(tmp_path: Path, poll_s: float, grace_s: float) -> tuple[Path, list[str]]:
    """A folder for PYTHONPATH whose plugin module (Hydra imports every hydra_plugins module) sets the shipped
    launcher's polling periods, and the overrides that select that launcher (none: it is what slurm.yaml names)."""
    plug = tmp_path / "plug" / "hydra_plugins" / "detox_submitit_launcher"
    plug.mkdir(parents=True)
    (plug / "__init__.py").write_text(textwrap.dedent(f"""\
        from detox import launcher as _launcher

        _launcher.SLURM_POLL_S = {poll_s}
        _launcher.RESULT_GRACE_S = {grace_s}


        class SlurmLauncher(_launcher.SlurmLauncher):
            pass
        """))
    assert SHIPPED == DETOX_TARGET  # the tests run exactly what users run (polling aside)
    return tmp_path / "plug", []


# a fake Slurm: sbatch accepts the array as job 42, scontrol says task 0 was cancelled and task 1 can never start
FAKE = {
    "sbatch": "#!/bin/sh\necho 'Submitted batch job 42'\n",
    "srun": "#!/bin/sh\nexit 0\n",
    "scontrol": textwrap.dedent("""\
        #!/bin/sh
        echo "$@" >> "$FAKE_SLURM_LOG"
        [ "$4" = 42 ] || { echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1; }
        tail='Partition=debug AllocNode:Sid=vm:1 Command=/x/a b'
        echo "JobId=43 JobName=train UserId=root(0) ArrayJobId=42 ArrayTaskId=0 JobState=CANCELLED Reason=None $tail"
        echo "JobId=42 ArrayJobId=42 ArrayTaskId=1-1%2 JobState=PENDING Reason=PartitionConfig $tail"
        """),
    "scancel": '#!/bin/sh\necho "scancel $@" >> "$FAKE_SLURM_LOG"\n',
}


def fake_slurm(tmp_path: Path) -> str:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in FAKE.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    return f"{bin_}:{Path(sys.executable).parent}:/usr/bin:/bin"


def test_jobs_slurm_ended_without_a_result_or_will_never_start_are_recorded_failed(tmp_path: Path) -> None:
    # before: hydra-submitit-launcher polled sacct (absent here, as on a cluster without accounting), read the
    # jobs' state as UNKNOWN and waited for them forever
    plug, target = plugin_path(tmp_path, poll_s=0.2, grace_s=0.5)
    sweep, calls = tmp_path / "sweep", tmp_path / "slurm.log"
    env = {**os.environ, "PATH": fake_slurm(tmp_path), "PYTHONPATH": f"{ROOT}:{plug}", "PYTHONUNBUFFERED": "1",
           "FAKE_SLURM_LOG": str(calls)}
    out = subprocess.run([sys.executable, "-m", "detox.train", "-m", "hydra/launcher=slurm", *target, "seed=0,1",
                          "max_steps=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text  # nothing ran through: the sweep says so with its exit code
    assert f"detox: sweep {sweep}: 2 jobs: 0 completed, 2 failed" in out.stdout, text
    rows = {r["seed"]: r for r in map(json.loads, (sweep / "summary.jsonl").read_text().splitlines())}
    assert rows[0]["status"] == rows[1]["status"] == "failed"
    assert rows[0]["error"].startswith("Slurm job 42_0 CANCELLED without a result (its log: "), rows[0]
    assert rows[1]["error"].startswith("never started: Slurm keeps job 42_1 pending for PartitionConfig (it asks "
                                       "for more CPUs, memory, nodes or GPUs than partition debug has"), rows[1]
    assert rows[0]["max_steps"] == 2  # base_summary's fields: the table can be read like any other sweep's
    assert "#0 failed: " in text and "#1 failed: " in text and "Traceback" not in text
    assert "scancel 42_1" in calls.read_text().splitlines()  # the job that would pend forever is not left queued


# ---------------------------------------------------------------------------------------------------- small parts


def test_array_task_ids_as_scontrol_folds_them() -> None:
    assert _task_ids("3") == [3]
    assert _task_ids("3-5,7%2") == [3, 4, 5, 7]
    assert _task_ids("0-6:3") == [0, 3, 6]


def test_slurm_states_reads_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_slurm(tmp_path))
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "log"))
    states = slurm_states({"42"})
    assert states is not None and set(states) == {"42_0", "42_1"}
    assert states["42_0"]["JobState"] == "CANCELLED" and states["42_0"]["JobState"] in SLURM_ENDED
    assert states["42_1"]["Reason"] == "PartitionConfig" and states["42_1"]["Partition"] == "debug"
    assert slurm_states({"7"}) == {}  # forgotten by Slurm (MinJobAge): absent, i.e. ended
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert slurm_states({"42"}) is None  # Slurm could not be asked: nothing is concluded


def test_a_job_is_dead_only_when_slurm_says_so_every_time_for_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A state seen for a moment (a requeue passing through an end state), or Slurm not answering in between,
    must not get a running job recorded failed: its result would come later and the sweep would report it
    wrongly."""
    from types import SimpleNamespace

    import detox.launcher as launcher

    monkeypatch.setattr(launcher, "RESULT_GRACE_S", 10.0)
    job = launcher._SlurmJob(0, [], SimpleNamespace(job_id="42_0"))
    judge = launcher.SlurmLauncher._judge
    ended, running = {"42_0": {"JobState": "CANCELLED", "Reason": "None"}}, {"42_0": {"JobState": "PENDING",
                                                                                   "Reason": "BeginTime"}}
    judge(None, job, ended, 0.0)
    judge(None, job, running, 5.0)  # requeued: it goes on
    judge(None, job, ended, 6.0)
    judge(None, job, None, 12.0)  # Slurm did not answer
    judge(None, job, ended, 17.0)
    assert not job.dead()
    judge(None, job, ended, 27.0)  # ended at each answer for 10 s
    assert job.dead() and job.why == "Slurm job 42_0 CANCELLED"
    gone = launcher._SlurmJob(1, [], SimpleNamespace(job_id="42_1"))
    judge(None, gone, {}, 0.0)  # Slurm no longer knows it (MinJobAge)
    judge(None, gone, {}, 10.0)
    assert gone.dead() and gone.why == "Slurm job 42_1 ENDED (no longer known to Slurm)"
