"""A signal handler's exception (Ctrl-C, submitit's requeue on USR2) stays itself when it lands inside a compiled
kernel's call: CPython turns it into a SystemError there (numba runs Python while boxing the arrays a kernel
returns), which once made a preempted Slurm job a failed one (CI, tests/test_slurm.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_job

import detox.kernels as K
from detox.engines import ENGINES
from detox.errors import signalled


def _kernel_calls_until(raise_: Callable[[], BaseException], tries: int = 400) -> BaseException:
    """Call the strict vote's compiled step (it returns arrays) back to back while a timer's handler raises
    ``raise_()``; return the first exception that came out as a SystemError (the handler ran inside the call),
    else the last one."""
    x = np.random.default_rng(0).standard_normal((45, 20_000)).astype(np.float32)
    x[1::3] = x[2::3] = x[0::3]
    rows, byz = x.view(np.int32), np.zeros(45, dtype=bool)
    K._strict_step_serial(rows, 3, 2, 0, byz)  # compiled (or loaded) before the timer runs

    def handler(signum: int, frame: object) -> None:
        raise raise_()

    previous = signal.signal(signal.SIGALRM, handler)
    out: BaseException | None = None
    try:
        for i in range(tries):
            try:
                signal.setitimer(signal.ITIMER_REAL, 1e-4 * (1 + i % 20))
                while True:
                    K._strict_step_serial(rows, 3, 2, 0, byz)
            except BaseException as err:  # noqa: BLE001 - what the handler raised, however it came out
                out = err
                if isinstance(err, SystemError):
                    return err
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert out is not None
    return out


class Requeued(SystemExit):
    """submitit's requeue ends the job with sys.exit(-1) from its USR2 handler."""


def test_a_handler_exception_inside_a_kernel_call_is_found_inside_the_systemerror() -> None:
    raised: list[BaseException] = []

    def requeue() -> BaseException:
        raised.append(Requeued(-1))
        return raised[-1]

    err = _kernel_calls_until(requeue)
    # the case this guards (numba 0.60-0.68 box arrays through Python); a numba that stops wrapping needs nothing
    assert not isinstance(err, SystemError) or "returned a result with an exception set" in str(err)
    assert signalled(err) is raised[-1]


def test_signalled_leaves_every_other_exception_as_it_is() -> None:
    plain = ValueError("x")
    assert signalled(plain) is plain
    other = SystemError("something else")
    other.__cause__ = KeyboardInterrupt()
    assert signalled(other) is other  # not CPython's wrapping of a handler's exception
    bare = SystemError("f returned a result with an exception set")
    assert signalled(bare) is bare  # no cause to give back
    looped = SystemError("f returned a result with an exception set")
    looped.__cause__ = looped
    assert signalled(looped) is looped  # ends


@pytest.mark.parametrize("multirun", [True, False])
@pytest.mark.parametrize("kind", [Requeued, KeyboardInterrupt])
def test_a_job_interrupted_inside_a_kernel_call_is_not_recorded_as_failed(kind: type[BaseException], multirun: bool,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's engine is interrupted while it runs a kernel: the handler's own exception leaves detox.train (so
    submitit requeues, Ctrl-C stops the sweep), and no summary says the job failed."""
    def engine(cfg, plan, out_dir):  # noqa: ANN001, ANN202 - the engines' signature
        raise _kernel_calls_until(lambda: kind(-1) if kind is Requeued else kind())

    monkeypatch.setitem(ENGINES, "local", engine)
    with pytest.raises(kind):
        run_job(TINY, tmp_path / "job", multirun=multirun)
    summary = tmp_path / "job" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "failed"


def test_a_handler_error_inside_a_kernel_call_is_recorded_as_itself(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's handler raises an error when it cannot requeue ("timed-out too many times"): the sweep records
    that error, not CPython's SystemError around it."""
    def engine(cfg, plan, out_dir):  # noqa: ANN001, ANN202
        raise _kernel_calls_until(lambda: RuntimeError("Job not requeued because: timed-out too many times."))

    monkeypatch.setitem(ENGINES, "local", engine)
    summary = run_job(TINY, tmp_path / "job", multirun=True)
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: Job not requeued because: timed-out too many times."
    assert json.loads((tmp_path / "job" / "summary.json").read_text())["error"] == summary["error"]


@pytest.mark.parametrize("requeued", [False, True])
@pytest.mark.parametrize("inside_a_kernel", [False, True])
def test_a_submitit_handler_error_is_not_swallowed_by_an_except_exception_on_its_way(
        inside_a_kernel: bool, requeued: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under submitit the USR2 handler's error (it cannot requeue) ends the job even where the signal lands in an
    ``except Exception`` (logging's emit swallows errors so): the job is recorded failed with that error, and the
    handler is submitit's again afterwards. Its requeue (sys.exit) leaves detox.train as itself."""
    message = "Job not requeued because: timed-out too many times."
    calls: list[int] = []

    def submitits_handler(signum: int, frame: object) -> None:
        calls.append(signum)
        if requeued:
            raise Requeued(-1)
        raise RuntimeError(message)

    def usr2_now() -> BaseException:
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(1000):  # the handler runs at the next bytecode boundaries, raising
            pass
        return AssertionError("the USR2 handler did not run")

    def engine(cfg, plan, out_dir):  # noqa: ANN001, ANN202
        assert signal.getsignal(signal.SIGUSR2) is not submitits_handler  # wrapped while the job trains
        if inside_a_kernel:  # the USR2 handler runs inside the compiled call: CPython's SystemError around it
            raise _kernel_calls_until(usr2_now)
        try:  # as logging.Handler.emit does: an error inside is reported and dropped
            raise usr2_now()
        except Exception:
            pass
        return {"status": "completed"}

    monkeypatch.setitem(ENGINES, "local", engine)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    usr2, cont = signal.signal(signal.SIGUSR2, submitits_handler), signal.getsignal(signal.SIGCONT)
    try:
        with pytest.raises(Requeued) if requeued else contextlib.nullcontext():
            summary = run_job(TINY, tmp_path / "job", multirun=True)
        assert signal.getsignal(signal.SIGUSR2) is submitits_handler
    finally:
        signal.signal(signal.SIGUSR2, usr2)
        signal.signal(signal.SIGCONT, cont)
    assert calls and set(calls) == {signal.SIGUSR2}
    if requeued:
        assert not (tmp_path / "job" / "summary.json").exists()
    else:
        assert summary["status"] == "failed" and summary["error"] == f"RuntimeError: {message}", summary


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "local_parallel-sweep"])
def test_ctrl_c_is_one_line_and_dies_of_sigint(sweep: bool, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the command) printed Python's traceback (~30 lines for a run, ~40 for a local_parallel
    sweep); now one line saying what a rerun does, and the process still dies of SIGINT (a shell loop stops)."""
    import signal
    import subprocess
    import sys
    import time

    where = ["-m", f"hydra.sweep.dir={tmp_path}", "hydra/launcher=local_parallel", "seed=0,1"] if sweep else \
        [f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "detox.train", *where, "max_steps=1000000", "eval_freq=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("metrics.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines() == [
        "detox: interrupted (Ctrl-C); the same command again skips finished jobs and resumes an interrupted run from "
        "its last checkpoint (checkpoint.every), or starts it over"], err[-2000:]
