"""engine=mpi across several hosts, for real: three network namespaces (PS, w1, w2) with their own addresses,
hostnames and sshd, joined by a bridge (tests/netns_cluster.py). Open MPI starts its daemons over ssh and its TCP
traffic is pinned to the namespaces' veth subnet; the run must match engine=local step by step, each rank must run
on the host the hostfile gives it, and each worker host's veth must have carried its ranks' gradients.

Needs root (namespaces, sshd); installs Debian's openssh-server when it is missing. One machine: the hosts share
the filesystem (the venv and the repository are at the same paths everywhere, as on an AMI-built cluster).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_job
from netns_cluster import NetnsCluster, netns_cluster  # noqa: F401 (the fixture)
from test_mpi import SMALL, assert_same_trajectory

from detox.cluster.hostfile import write_hostfile

pytestmark = [pytest.mark.mpi, pytest.mark.slow]  # about a minute: 7 ranks import torch on 2 cores

JOB = [*SMALL, "approach=baseline", "mode=coord-median", "err_mode=rev_grad"]  # 6 workers, 8 steps
SLOTS = {"ps": 1, "w1": 3, "w2": 3}  # rank 0 on the PS's host, workers 1-3 on w1, 4-6 on w2


def test_mpi_over_three_namespaced_hosts_matches_local(netns_cluster: NetnsCluster, tmp_path: Path) -> None:  # noqa: F811
    cluster = netns_cluster
    hosts = {h.name.removeprefix("detox-"): h for h in cluster.hosts}
    hostfile = write_hostfile(tmp_path / "hosts_address", [hosts[n].address for n in SLOTS], list(SLOTS.values()))
    local = run_job(JOB, tmp_path / "local")
    before = {n: cluster.tx_rx_bytes(h) for n, h in hosts.items()}
    # the job is started on the PS host as a user would, over ssh: cd to the checkout, the venv's Python
    out = tmp_path / "mpi"
    cmd = [sys.executable, "-m", "detox.train", *JOB, "engine=mpi", f"engine.hostfile={hostfile}",
           cluster.mpi_launcher_args(), f"hydra.run.dir={out}"]
    got = cluster.ssh(hosts["ps"], f"cd {shlex.quote(str(ROOT))} && {shlex.join(cmd)}", check=False, timeout=300)
    after = {n: cluster.tx_rx_bytes(h) for n, h in hosts.items()}
    log = (out / "mpi.log").read_text() if (out / "mpi.log").exists() else ""
    assert got.returncode == 0, (got.stdout[-2000:], got.stderr[-2000:], log[-3000:])
    mpi = json.loads((out / "summary.json").read_text())
    assert local["status"] == mpi["status"] == "completed"
    assert_same_trajectory(tmp_path / "local", out)

    # where every rank ran, as each rank reported it (its own UTS namespace's hostname)
    ranks = {int(r): h for r, h in re.findall(r"detox\.mpi: rank (\d+) of 7 runs on host (\S+)", log)}
    assert ranks == {0: "detox-ps", 1: "detox-w1", 2: "detox-w1", 3: "detox-w1",
                     4: "detox-w2", 5: "detox-w2", 6: "detox-w2"}, log[-3000:]

    # the gradients crossed the veths: each worker host sent at least its 3 ranks' float32 gradients of every
    # step and received the weights of every step; the PS received all six ranks' gradients
    d = sum(t.numel() for t in torch.load(out / "model.pt").values())  # fc: parameters only, no buffers
    steps = read_metrics(out)[-1]["step"]  # steps 1..8 each moved one gradient per rank
    per_rank = 4 * d * steps
    sent = {n: after[n][0] - before[n][0] for n in hosts}
    received = {n: after[n][1] - before[n][1] for n in hosts}
    for n in ("w1", "w2"):
        assert sent[n] >= 3 * per_rank, (n, sent, per_rank)
        assert received[n] >= per_rank, (n, received, per_rank)
    assert received["ps"] >= 6 * per_rank, (received, per_rank)
    print(f"\nd={d} steps={steps} gradient bytes per rank={per_rank}; veth bytes sent {sent}, received {received}")
