"""A Hydra launcher for local parallel sweeps that survive a dead job (``hydra/launcher=local_parallel``).

Each job runs in its own forked child process, at most ``n_jobs`` at once, through the same pieces as Hydra's
basic launcher (``load_sweep_config``, ``run_job``): job folders, ``.hydra/`` and callbacks behave as with it. A
child that dies (a signal, a non-zero exit, an exception out of the task) is recorded as a failed job: its
``summary.json`` says so when the job could not write one, Hydra's ``on_job_end`` callbacks see it, and the other
jobs run. Hydra finds the class through the shim ``hydra_plugins.detox_launcher`` (launchers must live there).

``SlurmLauncher`` is hydra-submitit-launcher's Slurm launcher with the same promise: a Slurm job that ends without
a result (``scancel``, out of memory, a node failure, Slurm's own kill) or that Slurm will never start (it asks for
more than the partition has) is recorded failed and the sweep goes on; hydra-submitit-launcher's own either waits
for it forever (a cluster without ``sacct``: the job's state stays UNKNOWN) or ends the whole sweep with the job's
exception, without ``summary.jsonl``. Slurm's view of each job comes from ``scontrol``, which every cluster has.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from detox.results import JobBusy, base_summary, job_lock, lock_held, read_small, write_json

log = logging.getLogger(__name__)

GRACE_S = 5.0  # after SIGTERM, how long stopped jobs get before SIGKILL
POLL_S = 1.0   # a job's exit is also polled: a process it forked may keep the exit-signalling pipe open
PARENT_POLL_S = 0.2  # how often a job checks that its launcher is alive
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class JobDied(RuntimeError):
    """A job's process ended without reporting a result (killed, crashed, or exited early)."""


class FailedJobReturn(JobReturn):
    """A failed job whose failure is already recorded (summary.json, the progress line, ``on_job_end``).

    Hydra's sweeper reads every ``return_value`` and re-raises a failed job's exception, which would end the whole
    sweep with exit 1 and skip ``on_multirun_end`` (no summary.jsonl). Here it reads as None, as a job that failed
    inside ``detox.train.run`` already does, so the sweep goes on; ``status`` stays FAILED and ``error`` keeps why."""

    @property  # type: ignore[override]
    def return_value(self) -> Any:
        return None

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value

    @property
    def error(self) -> BaseException | None:
        return self._return_value


@dataclass
class _Job:
    idx: int
    config: DictConfig      # the job's composed config, hydra node included
    out_dir: Path
    process: Any            # multiprocessing's fork Process
    conn: Connection | None  # the child's result arrives here; None once read or closed
    result: JobReturn | None = None


class _JobError(RuntimeError):
    """An exception the job raised that could not be pickled back: its type's name and message, as text."""


class _Terminated(BaseException):
    """SIGTERM reached the launcher: unwind like Ctrl-C, stopping the children on the way."""


def resolve_n_jobs(n_jobs: Any) -> int:
    """-1: one job per core this process may use; otherwise a whole number >= 1 (``2``, ``2.0``; not ``1.5``,
    ``true``, ``'3'`` or null, which would otherwise be truncated or fail with a traceback)."""
    key = "hydra.launcher.n_jobs"
    if isinstance(n_jobs, float) and n_jobs.is_integer():
        n_jobs = int(n_jobs)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int):
        raise ValueError(f"{key}={n_jobs!r}: give a whole number of jobs >= 1, or -1 for one per core")
    if n_jobs == -1:
        return _cores()
    if n_jobs < 1:
        raise ValueError(f"{key}={n_jobs}: give a number of jobs >= 1, or -1 for one per core")
    return n_jobs


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ParallelLauncher(Launcher):
    """Run a sweep's jobs in forked child processes, at most ``n_jobs`` at once (-1: one per core)."""

    def __init__(self, n_jobs: int = 2) -> None:
        self.n_jobs = resolve_n_jobs(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally, %d at a time, one process each", len(job_overrides), self.n_jobs)
        if min(self.n_jobs, len(job_overrides)) > _cores():
            log.warning("hydra.launcher.n_jobs=%d is more than the %d cores this process may use: jobs will slow "
                        "each other down (and each holds its own memory)", self.n_jobs, _cores())
        pending = deque((initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides))
        running: list[_Job] = []
        returns: dict[int, JobReturn] = {}
        with _sigterm_raises():
            try:
                while pending or running:
                    while pending and len(running) < self.n_jobs:
                        self._start(*pending.popleft(), running)
                    self._wait(running)
                    for job in [j for j in running if _exited(j)]:
                        # a Ctrl-C now waits until the job is recorded: it is either running or finished, never
                        # neither (then nobody would record it)
                        with _signals_blocked():
                            returns[job.idx] = self._finish(job)
                            running.remove(job)
            except BaseException:  # Ctrl-C, SIGTERM, or a bug here: never leave a child behind
                self._stop(running, returns)
                raise
        return [returns[idx] for idx in sorted(returns)]

    # ------------------------------------------------------------------------------------------------ one job

    def _start(self, idx: int, overrides: list[str], running: list[_Job]) -> None:
        """Fork the job's process and add it to ``running`` (both with signals blocked: a Ctrl-C or SIGTERM
        arriving meanwhile is handled once the job is in ``running``, so it is stopped and recorded with the rest)."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        out_dir = _job_dir(config)
        recv, send = mp.Pipe(duplex=False)
        # fork: the child inherits the composed config, Hydra's singletons and the imported modules (no pickling,
        # no second torch import). Signals stay blocked until the job is in ``running`` so that a Ctrl-C can never
        # leave a child the launcher does not know about.
        with _signals_blocked():
            process = mp.get_context("fork").Process(target=self._child, args=(config, send, os.getpid()),
                                                     name=f"job-{idx}", daemon=False)
            try:
                process.start()
            finally:
                send.close()  # only the child writes: its exit then reads as EOF here
            with contextlib.suppress(OSError):
                os.setpgid(process.pid, process.pid)  # also done in the child: whichever runs first wins
            running.append(_Job(idx, config, out_dir, process, recv))
            log.info("#%d started: %s (pid %d): %s", idx, out_dir, process.pid,
                     " ".join(filter_overrides(overrides)))

    def _child(self, config: DictConfig, send: Connection, parent_pid: int) -> None:
        """In the forked child: run the job exactly as the basic launcher would, send the JobReturn back."""
        # its own process group, so the launcher can stop the job together with anything it started (mpiexec)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        _die_with_parent(parent_pid)
        assert self.hydra_context is not None and self.task_function is not None
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        send.send_bytes(_dumps(ret))
        send.close()

    def _finish(self, job: _Job) -> JobReturn:
        """The child has exited: take its JobReturn, or build a failed one; record and report the outcome."""
        _read(job)
        with contextlib.suppress(OSError):
            os.killpg(job.process.pid, signal.SIGKILL)  # leftovers of its group (the leader is only a zombie)
        job.process.join()
        code = job.process.exitcode
        ret = job.result
        if ret is None:
            ret = _job_return(job.config, job.out_dir)
            ret.status = JobStatus.FAILED
            ret.return_value = JobDied(_death(code))
        if ret.status == JobStatus.COMPLETED:
            status = _summary_status(job.out_dir)
            if status is None and lock_held(job.out_dir):  # its run found another sweep's run holding the folder
                log.info("#%d skipped: %s (another process holds the folder and runs this job)", job.idx, job.out_dir)
            else:
                log.info("#%d %s: %s", job.idx, status or "completed", job.out_dir)
            return ret
        err = ret._return_value
        error = str(err) if isinstance(err, JobDied | _JobError) else f"{type(err).__name__}: {err}"
        try:
            _record_failure(job.config, job.out_dir, error)
        except Exception as record_err:  # a full disk, a folder gone: the other jobs still run
            log.error("#%d: could not record the failure in %s: %s", job.idx, job.out_dir, record_err)
        log.error("#%d failed: %s (%s)", job.idx, job.out_dir, error)
        failed = _failed(ret, err)
        if job.result is None:  # the child died before its own on_job_end: callbacks still see every job end
            assert self.hydra_context is not None
            _on_job_end(self.hydra_context, job.config, failed)
        return failed

    def _wait(self, running: list[_Job]) -> None:
        """Block until a child sends its result or exits (reading results as they come: a big one fills the pipe
        and its child waits for us)."""
        handles = [j.process.sentinel for j in running] + [j.conn for j in running if j.conn is not None]
        for ready in wait(handles, timeout=POLL_S):
            for job in running:
                if ready is job.conn:
                    _read(job)

    def _stop(self, running: list[_Job], returns: dict[int, JobReturn]) -> None:
        """Stop every running job (SIGTERM to its process group, SIGKILL after GRACE_S) and record them failed."""
        if not running:
            return
        with _signals_blocked():  # a second Ctrl-C must not cut this short and leave children behind
            log.warning("sweep interrupted: stopping %d running job(s)", len(running))
            for job in running:
                _signal_group(job, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while (alive := [j for j in running if not _exited(j)]) and time.monotonic() < deadline:
                wait([j.process.sentinel for j in alive], min(POLL_S, max(0.0, deadline - time.monotonic())))
            for job in running:  # nobody reaped them yet: their pids are still theirs
                _signal_group(job, signal.SIGKILL)
            for job in running:
                with contextlib.suppress(Exception):  # recording is best effort while unwinding
                    returns[job.idx] = self._finish(job)


# --------------------------------------------------------------------------------------------- hydra/launcher=slurm

SLURM_POLL_S = 10.0   # how often Slurm is asked (scontrol) about the jobs still without a result
RESULT_POLL_S = 1.0   # how often the jobs' result files are looked for
RESULT_GRACE_S = 30.0  # how long a result file may take to appear after Slurm says its job ended (shared file systems)
# Slurm states of a job that has ended for good (a requeued job goes REQUEUED/PENDING/RUNNING again instead)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "REVOKED",
               "TIMEOUT"}
# reasons a pending job stays pending until an administrator changes the cluster (not those a job may outwait: a
# node down or reserved, a partition switched off, PartitionNodeLimit which can also mean nodes down)
SLURM_NEVER = {
    "PartitionConfig": "it asks for more CPUs, memory, nodes or GPUs than partition {partition} has",
    "PartitionTimeLimit": "its time limit is over partition {partition}'s",
    "BadConstraints": "no node of partition {partition} satisfies what it asks for",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QoS is not valid",
    "AccountNotAllowed": "its account may not use partition {partition}",
    "QOSNotAllowed": "its QoS may not use partition {partition}",
}


@dataclass
class _SlurmJob:
    idx: int
    overrides: list[str]
    job: Any                    # submitit's SlurmJob
    ended: float | None = None  # when Slurm was first seen to have ended it (no result file yet)
    still: float | None = None  # the latest time Slurm said so, every answer since ``ended`` saying the same
    why: str = ""               # Slurm's word on it: state (reason)

    def dead(self) -> bool:
        """Ended without a result: Slurm will never start it, or has said it ended for RESULT_GRACE_S, each time
        it was asked (a state seen for a moment, or Slurm not answering, concludes nothing)."""
        return self.ended is not None and self.still is not None and (
            self.why.startswith("never") or self.still - self.ended >= RESULT_GRACE_S)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher whose sweep survives a job that ends without a result.

    Submission is the same (one job array, the same sbatch parameters, the same job function); the waiting is
    detox's: every job's result file is looked for each second and Slurm asked every ``SLURM_POLL_S`` (scontrol)
    about those without one. A job Slurm has ended without a result, or will never start, is recorded failed
    (``summary.json``, a ``#N failed`` line, Hydra's ``on_job_end``), as is a job whose task failed; the sweep goes
    on. Results are returned in the sweep's order."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        assert self.config is not None and self.hydra_context is not None
        assert len(job_overrides) > 0
        # the executor and its parameters exactly as hydra-submitit-launcher 1.2 builds them
        init = {"folder": self.params["submitit_folder"]}
        init.update({f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k == "max_num_timeout"})
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in ("max_num_timeout", "submitit_folder")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitting %d jobs to Slurm (one job array), output in %s", len(job_overrides), sweep_dir)
        params = [(list(o), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                   Singleton.get_state()) for i, o in enumerate(job_overrides)]
        for overrides, _, idx, _, _ in params:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        submitted = executor.map_array(self, *zip(*params, strict=True))
        jobs = [_SlurmJob(idx, overrides, job)
                for (overrides, _, idx, _, _), job in zip(params, submitted, strict=True)]
        for job in jobs:
            log.info("#%d submitted: Slurm job %s", job.idx, job.job.job_id)
        returns = self._wait(jobs)
        return [returns[idx] for idx in sorted(returns)]

    def _wait(self, jobs: list[_SlurmJob]) -> dict[int, JobReturn]:
        returns: dict[int, JobReturn] = {}
        waiting = list(jobs)
        asked = -float("inf")
        while waiting:
            now = time.monotonic()
            if now - asked >= SLURM_POLL_S:
                asked = now
                states = slurm_states({j.job.job_id.split("_")[0] for j in waiting})
                for job in waiting:
                    self._judge(job, states, now)
            for job in list(waiting):
                if _has_result(job.job):
                    returns[job.idx] = self._result(job)
                elif job.dead():
                    returns[job.idx] = self._dead(job)
                else:
                    continue
                waiting.remove(job)
            if waiting:
                time.sleep(RESULT_POLL_S)
        return returns

    def _judge(self, job: _SlurmJob, states: dict[str, dict[str, str]] | None, now: float) -> None:
        """What Slurm says of a job without a result: ended (and since when), never to start, or still on."""
        if states is None:  # Slurm did not answer (the controller is down, busy, scontrol missing): start over
            job.ended, job.still, job.why = None, None, ""  # (a job is declared dead on Slurm's answers alone)
            return
        info = states.get(job.job.job_id)
        if info is None:  # Slurm forgot it (MinJobAge after its end) or never had it
            state, reason = "ENDED", "no longer known to Slurm"
        else:
            state, reason = info.get("JobState", "UNKNOWN"), info.get("Reason", "None")
        if state == "PENDING" and info is not None and reason in SLURM_NEVER:
            with contextlib.suppress(Exception):
                subprocess.run(["scancel", job.job.job_id], capture_output=True, timeout=60)
            why = SLURM_NEVER[reason].format(partition=info.get("Partition", "?"))
            job.why = (f"never started: Slurm keeps job {job.job.job_id} pending for {reason} ({why}: see "
                       f"hydra.launcher.partition, cpus_per_task, mem_gb, nodes, gpus_per_node, timeout_min, "
                       f"account, qos); cancelled")
            job.ended = job.still = now
        elif state in SLURM_ENDED or state == "ENDED":
            if job.ended is None:
                job.ended = now
                job.why = f"Slurm job {job.job.job_id} {state}" + (f" ({reason})" if reason not in ("None", "") else "")
            job.still = now
        else:  # pending, running, requeued, completing, suspended: a requeued job may end here once more
            job.ended, job.still, job.why = None, None, ""

    def _config(self, job: _SlurmJob) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, job.overrides)
        with open_dict(config):
            config.hydra.job.id = job.job.job_id
            config.hydra.job.num = job.idx
        return config

    def _result(self, job: _SlurmJob) -> JobReturn:
        """The job's result file is there: its JobReturn, a failed one recorded as such."""
        try:
            ret = job.job.results()[0]
        except Exception as err:  # the job function itself failed (submitit's FailedJobError), or a torn result
            return self._record(job, JobDied(f"Slurm job {job.job.job_id}: {_last_error(err)}"), None)
        if not isinstance(ret, JobReturn) or ret.status == JobStatus.COMPLETED:
            out_dir = Path(str(OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir"))) \
                if isinstance(ret, JobReturn) and ret.hydra_cfg is not None else None
            status = _summary_status(out_dir) if out_dir is not None else None
            if out_dir is not None and status is None and lock_held(out_dir):
                # its run found another sweep's run holding the folder (the lock works across Slurm jobs of a node,
                # and of nodes sharing a file system with working locks)
                log.info("#%d skipped: %s (another process holds the folder and runs this job)", job.idx, out_dir)
            else:
                log.info("#%d %s: %s (Slurm job %s)", job.idx, status or "completed", out_dir, job.job.job_id)
            return ret
        return self._record(job, ret._return_value, ret)

    def _dead(self, job: _SlurmJob) -> JobReturn:
        why = job.why if job.why.startswith("never") else \
            f"{job.why} without a result (its log: {_tasks(job.job)[0].paths.stderr})"
        return self._record(job, JobDied(why), None)

    def _record(self, job: _SlurmJob, err: BaseException | None, ret: JobReturn | None) -> JobReturn:
        """A failed job: summary.json (unless the job wrote a final one), the progress line, on_job_end when the
        job could not run its own. Its return reads as None to Hydra's sweeper, so the sweep goes on."""
        assert self.hydra_context is not None
        config = self._config(job)
        out_dir = _job_dir(config)
        error = str(err) if isinstance(err, JobDied | _JobError) else f"{type(err).__name__}: {err}"
        try:
            _record_failure(config, out_dir, error)
        except Exception as record_err:
            log.error("#%d: could not record the failure in %s: %s", job.idx, out_dir, record_err)
        log.error("#%d failed: %s (%s)", job.idx, out_dir, error)
        failed = _failed(ret if ret is not None else _job_return(config, out_dir), err)
        if ret is None:
            _on_job_end(self.hydra_context, config, failed)
        return failed


def _last_error(err: Exception) -> str:
    """The line that says what went wrong: of submitit's FailedJobError (the job's traceback between two rules of
    dashes, then where its logs are), the traceback's last line."""
    parts = re.split(r"\n-{5,}\n", str(err))
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _tasks(job: Any) -> list[Any]:
    """A submitit job's tasks (itself when it has one; tasks_per_node or nodes > 1 give it several)."""
    return list(job._sub_jobs) or [job]


def _has_result(job: Any) -> bool:
    return all(task.paths.result_pickle.exists() for task in _tasks(job))


def slurm_states(array_ids: set[str]) -> dict[str, dict[str, str]] | None:
    """``scontrol -o show job`` of each job (array): submitit's job id (``12_3``, or ``12``) -> the job's fields;
    a job Slurm no longer knows is absent. None when Slurm could not be asked."""
    states: dict[str, dict[str, str]] = {}
    for array_id in sorted(array_ids):
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # purged after MinJobAge: every task of it has ended
                continue
            return None
        for line in out.stdout.splitlines():
            # "Key=value Key2=value with spaces AllocNode:Sid=host:1 ...": a value runs up to the next key
            fields = dict(re.findall(r"(\w+)=(.*?)(?= [\w:/]+=|$)", line.strip()))
            if "JobId" not in fields:
                continue
            array, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
            if array and tasks:  # one task, or pending tasks folded into one line: 3-5,7 (and %N, a throttle)
                for task in _task_ids(tasks):
                    states[f"{array}_{task}"] = fields
            else:
                states[fields["JobId"]] = fields
    return states


def _task_ids(text: str) -> list[int]:
    ids: list[int] = []
    for part in text.split("%")[0].split(","):
        if m := re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part.strip()):
            first, last, step = int(m[1]), int(m[2] or m[1]), int(m[3] or 1)
            ids.extend(range(first, last + 1, step))
    return ids


# ------------------------------------------------------------------------------------------------------ helpers


def _failed(ret: JobReturn, err: BaseException | None) -> FailedJobReturn:
    failed = FailedJobReturn(overrides=ret.overrides, cfg=ret.cfg, hydra_cfg=ret.hydra_cfg,
                             working_dir=ret.working_dir, task_name=ret.task_name, status=JobStatus.FAILED)
    failed.return_value = err
    return failed


def _on_job_end(hydra_context: HydraContext, config: DictConfig, ret: JobReturn) -> None:
    with _hydra_config(config):
        try:
            hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        except Exception:  # a callback's bug must not take the other jobs down
            log.exception("on_job_end callback failed for %s", ret.hydra_cfg.hydra.runtime.output_dir)


def _job_dir(config: DictConfig) -> Path:
    """The job's folder, resolved as run_job resolves it (subdir may interpolate ${hydra:...} values)."""
    with _hydra_config(config):
        out = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / str(OmegaConf.select(config,
                                                                                           "hydra.sweep.subdir"))
    return Path(os.path.abspath(out))


@contextlib.contextmanager
def _hydra_config(config: DictConfig) -> Iterator[None]:
    hc = HydraConfig.instance()
    previous = hc.cfg
    hc.set_config(config)
    try:
        yield
    finally:
        hc.cfg = previous


def _job_return(config: DictConfig, out_dir: Path) -> JobReturn:
    """The JobReturn run_job would have built for this job (the child died before sending its own)."""
    ret = JobReturn()
    ret.cfg = _task_cfg(config)
    hydra_cfg = OmegaConf.create({"hydra": copy.deepcopy(config.hydra)})
    with read_write(hydra_cfg.hydra.runtime), open_dict(hydra_cfg.hydra.runtime):
        hydra_cfg.hydra.runtime.output_dir = str(out_dir)
    ret.hydra_cfg = hydra_cfg
    ret.overrides = list(OmegaConf.to_container(config.hydra.overrides.task))
    ret.working_dir = str(out_dir) if config.hydra.job.get("chdir") else os.getcwd()
    ret.task_name = config.hydra.job.name
    return ret


def _task_cfg(config: DictConfig) -> DictConfig:
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"job process killed by {name}"
    if code:
        return f"job process exited with code {code}"
    return "job process exited without reporting a result"


def _record_failure(config: DictConfig, out_dir: Path, error: str) -> None:
    """summary.json says failed, unless the job wrote a final one itself (a run still marked ``running`` died)."""
    cfg = _task_cfg(config)
    if not cfg.get("save", True):
        return  # save=false: the job writes nothing, neither does its launcher
    if _summary_status(out_dir) not in (None, "running"):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    # the job's own ``running`` summary, where it wrote one, holds what it ran with (an lr from ``lr_picks``, which
    # the launcher's config has not applied); else the settings as the launcher has them
    summary = _summary(out_dir)
    if summary is None or summary.get("status") != "running":
        with _hydra_config(config):
            try:
                summary = base_summary(cfg)
            except Exception:  # a config that does not resolve still gets its failure recorded
                summary = {}
    try:
        with job_lock(out_dir):  # not while another process (a rerun of this sweep) owns the folder
            if _summary_status(out_dir) in (None, "running"):
                write_json(out_dir / "summary.json", {**summary, "status": "failed", "error": error})
    except JobBusy as err:  # another process runs this job now: its run writes the summary
        log.warning("not recording the failure: %s", err)


def _summary(out_dir: Path) -> dict | None:
    try:
        summary = json.loads(read_small(out_dir / "summary.json"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _summary_status(out_dir: Path) -> str | None:
    return (_summary(out_dir) or {}).get("status")


def _read(job: _Job) -> None:
    """Take the child's JobReturn if it sent one (EOF: it died first)."""
    if job.conn is None or not job.conn.poll():
        return
    try:
        job.result = pickle.loads(job.conn.recv_bytes())
    except (EOFError, OSError, pickle.UnpicklingError) as err:
        if not isinstance(err, EOFError):
            log.warning("#%d: unreadable result from the job process (%s)", job.idx, err)
    job.conn.close()
    job.conn = None


def _dumps(ret: JobReturn) -> bytes:
    try:
        return pickle.dumps(ret)
    except Exception:  # an unpicklable return value or exception: its text is enough for the launcher
        value = ret._return_value
        ret.return_value = _JobError(f"{type(value).__name__}: {value}") if isinstance(value, BaseException) \
            else None
        return pickle.dumps(ret)


def _exited(job: _Job) -> bool:
    """The child has exited; unlike ``is_alive`` this does not reap it, so its pid (and process group id) cannot be
    reused before ``_finish`` has cleaned up the group. waitid, not the sentinel alone: a process the job forked
    keeps the sentinel open after the job itself died."""
    if not hasattr(os, "waitid"):  # macOS
        return bool(wait([job.process.sentinel], 0))
    try:
        return os.waitid(os.P_PID, job.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def _signal_group(job: _Job, sig: int) -> None:
    try:
        os.killpg(job.process.pid, sig)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(job.process.pid, sig)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds the launcher (children stopped, failures recorded), then it dies of SIGTERM as asked."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # a non-default previous handler returned
    finally:
        signal.signal(signal.SIGTERM, previous)


def _die_with_parent(parent_pid: int) -> None:
    """The job and everything in its process group end when the launcher itself dies without stopping them
    (``kill -9``, a hang-up): a watcher thread sends the group SIGTERM, then SIGKILL after GRACE_S. (Linux's
    PDEATHSIG alone would end the job process only, leaving what it started running.)"""
    if os.getppid() != parent_pid:  # the launcher died before the watcher started
        _end_group()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        _end_group()

    threading.Thread(target=watch, name="detox-launcher-watch", daemon=True).start()


def _end_group() -> None:
    """SIGTERM to this process's group (the job and what it started), SIGKILL to whatever is left after GRACE_S.
    Only a group the job leads: if setpgid failed the group is the launcher's caller's (a shell pipeline)."""
    own = os.getpgrp() == os.getpid()
    with contextlib.suppress(OSError):
        os.killpg(0, signal.SIGTERM) if own else os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)  # still here: the job handles SIGTERM (detox.train ends its MPI world) or ignores it
    with contextlib.suppress(OSError):
        os.killpg(0, signal.SIGKILL) if own else None
    os._exit(1)
