"""A Hydra launcher for local parallel sweeps that survive a dead job (``hydra/launcher=local_parallel``).

Each job runs in its own forked child process, at most ``n_jobs`` at once, through the same pieces as Hydra's
basic launcher (``load_sweep_config``, ``run_job``): job folders, ``.hydra/`` and callbacks behave as with it. A
child that dies (a signal, a non-zero exit, an exception out of the task) is recorded as a failed job: its
``summary.json`` says so when the job could not write one, Hydra's ``on_job_end`` callbacks see it, and the other
jobs run. Hydra finds the class through the shim ``hydra_plugins.detox_launcher`` (launchers must live there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import pickle
import signal
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
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from detox.results import JobBusy, base_summary, job_lock, lock_held, write_json

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
        failed = FailedJobReturn(overrides=ret.overrides, cfg=ret.cfg, hydra_cfg=ret.hydra_cfg,
                                 working_dir=ret.working_dir, task_name=ret.task_name, status=JobStatus.FAILED)
        failed.return_value = err
        if job.result is None:  # the child died before its own on_job_end: callbacks still see every job end
            self._on_job_end(job.config, failed)
        return failed

    def _on_job_end(self, config: DictConfig, ret: JobReturn) -> None:
        assert self.hydra_context is not None
        with _hydra_config(config):
            try:
                self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
            except Exception:  # a callback's bug must not take the other jobs down
                log.exception("on_job_end callback failed for %s", ret.hydra_cfg.hydra.runtime.output_dir)

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


# ------------------------------------------------------------------------------------------------------ helpers


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


def _summary_status(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


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
