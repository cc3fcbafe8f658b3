"""Several hosts on one machine: network namespaces joined by a bridge, each running its own sshd.

``NetnsCluster`` builds ``ps``, ``w1``, ``w2`` (names configurable), each a network namespace with one veth device
(``eth0``) in a private test subnet (``10.213.<k>.0/24``), its own hostname (a UTS namespace per sshd) and an
sshd that accepts only a key this module generates in a temporary folder. The bridge joining the veths lives in a
namespace of its own, so the machine's own interfaces, routes and addresses are never touched, and traffic can only
go to addresses created here. Everything (sshd processes, namespaces) is removed again by ``close``, also when
the set-up fails half-way.

``ssh_wrapper`` is a script that runs ``ssh`` with the cluster's key and options: Open MPI's ``plm_ssh_agent``
and ``python -m detox.cluster.provision --ssh`` both use it. The filesystem is shared by all namespaces (one
machine), except ``local``: a folder that every host has a copy of its own of at the same path (a bind mount in
the mount namespace of its sshd, backed by ``disk(host)``), as a disk of its own would be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"  # sshd must be started by its absolute path (it re-executes itself)


def unavailable() -> str | None:
    """Why namespaced hosts cannot be built here (a skip reason), or None. As root with apt-get (CI), the Debian
    packages needed (iproute2, openssh-server) are installed first: a failure to install fails the test."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces and sshd need root (CI runs as root: there these tests run)"
    ensure_packages()
    probe = f"detoxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here (no CAP_SYS_ADMIN in this container?): {made.stderr.strip()}"
    return None


def ensure_packages() -> None:
    """Install Debian's iproute2 and openssh-server/-client where a tool is missing."""
    if all(shutil.which(tool) for tool in ("ip", "ssh", "scp", "ssh-keygen", "unshare")) and Path(SSHD).exists():
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError("ip, sshd or ssh is missing and there is no apt-get to install iproute2 and openssh")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "iproute2", "openssh-server", "openssh-client",
           "util-linux"]
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        got = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if got.returncode != 0:
            raise RuntimeError(f"apt-get install iproute2 openssh-server failed: {got.stderr.strip()[-500:]}")


def remove_stale() -> None:
    """Namespaces a killed test run left behind (``dx<pid>-*`` of a pid that is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        pid = name[2:].split("-", 1)[0] if name.startswith("dx") and "-" in name else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str  # the hostname its processes see
    netns: str
    address: str
    sshd: subprocess.Popen | None = None


@dataclass
class NetnsCluster:
    names: tuple[str, ...] = ("ps", "w1", "w2")
    subnet: int = 213  # 10.213.<k>.0/24
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="detox-netns-")))
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = f"dx{os.getpid()}"
        self.bridge_ns = f"{tag}-br"
        self.cidr = f"10.213.{self.subnet}.0/24"
        self.key = self.tmp / "id_ed25519"
        self.ssh_wrapper = self.tmp / "ssh"
        self.local = self.tmp / "host-local"  # each host's own folder at this path (see disk())
        self._made: list[str] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------------------- set-up

    def _build(self, tag: str) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            host = Host(name=f"detox-{name}", netns=f"{tag}-{name}", address=f"10.213.{self.subnet}.{i + 1}")
            _ip("netns", "add", host.netns)
            self._made.append(host.netns)
            self.hosts.append(host)
            # the pair is created inside the bridge's namespace and its far end moved straight into the host's:
            # the machine's own namespace never sees either end
            _ip("-n", self.bridge_ns, "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            _ip("-n", self.bridge_ns, "link", "set", f"v-{name}", "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.tmp / "host_key")], check=True)
        (self.tmp / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        self.ssh_wrapper.write_text(
            "#!/bin/sh\n# ssh with the test cluster's key; no host-key bookkeeping (the hosts are throwaway)\n"
            f"exec ssh -i {self.key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=10 \"$@\"\n")
        self.ssh_wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        self.local.mkdir()
        for host in self.hosts:
            self.disk(host).mkdir(parents=True)
        for host in self.hosts:
            self._start_sshd(host)
        for host in self.hosts:
            self._wait_ssh(host)

    def _start_sshd(self, host: Host) -> None:
        conf = self.tmp / f"sshd_{host.name}.conf"
        conf.write_text("\n".join([
            f"ListenAddress {host.address}", "Port 22", f"HostKey {self.tmp / 'host_key'}",
            f"AuthorizedKeysFile {self.tmp / 'authorized_keys'}", f"PidFile {self.tmp / f'sshd_{host.name}.pid'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PrintMotd no", "Subsystem sftp internal-sftp", ""]))
        log = open(self.tmp / f"sshd_{host.name}.log", "w")  # noqa: SIM115 (lives as long as the daemon)
        # a UTS namespace of its own: every host has its own hostname, as separate machines do; a mount namespace
        # of its own (private propagation, unshare's default): its disk() appears at `local` for it alone
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount", "sh", "-c",
             f'hostname "$1" && mount --bind "$3" "$4" && exec {SSHD} -D -e -f "$2"', "sh", host.name, str(conf),
             str(self.disk(host)), str(self.local)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ssh(self, host: Host, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            got = self.ssh(host, "hostname", check=False, netns=self.hosts[0].netns)
            if got.returncode == 0 and got.stdout.strip() == host.name:
                return
            if time.monotonic() > deadline or host.sshd.poll() is not None:
                log = (self.tmp / f"sshd_{host.name}.log").read_text()
                raise RuntimeError(f"sshd on {host.name} ({host.address}) not reachable: {got.stderr.strip()} "
                                   f"{log[-500:]}")
            time.sleep(0.2)

    # ---------------------------------------------------------------------------------------------- use

    def mpi_launcher_args(self) -> str:
        """``engine.launcher_args``: ssh with the cluster's key; every Open MPI TCP path on the test subnet only."""
        args = ["--oversubscribe", "--mca", "plm_ssh_agent", str(self.ssh_wrapper),
                "--mca", "btl_tcp_if_include", self.cidr, "--mca", "oob_tcp_if_include", self.cidr]
        return "engine.launcher_args=[" + ",".join(args) + "]"

    def disk(self, host: Host) -> Path:
        """What ``host`` sees at ``self.local``, as seen from this machine."""
        return self.tmp / "disks" / host.name

    def in_ns(self, host: Host, cmd: list[str]) -> list[str]:
        """``cmd`` run inside ``host``'s network namespace (its own addresses, the machine's hostname)."""
        return ["ip", "netns", "exec", host.netns, *cmd]

    def ssh(self, host: Host, command: str, check: bool = True, netns: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """``command`` on ``host`` over ssh, from ``netns`` (default: the PS's namespace)."""
        src = netns or self.hosts[0].netns
        return subprocess.run(["ip", "netns", "exec", src, str(self.ssh_wrapper), host.address, command],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def tx_rx_bytes(self, host: Host) -> tuple[int, int]:
        """Bytes sent and received by ``host``'s ``eth0`` (its only way out: the veth to the bridge)."""
        base = Path("/sys/class/net/eth0/statistics")
        out = subprocess.run(self.in_ns(host, ["cat", str(base / "tx_bytes"), str(base / "rx_bytes")]),
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    def close(self) -> None:
        # every process inside our namespaces: the sshds and whatever a connection left (an Open MPI daemon, a
        # rank, a provisioning step); a login session is a session of its own, so sshd's group would miss them
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for ns in self._made for p in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
                for host in self.hosts:  # reap our own children, or they stay as zombies in /proc
                    if host.sshd is not None:
                        host.sshd.poll()
                time.sleep(0.05)
        for ns in reversed(self._made):  # deleting a namespace deletes its veth end, and with it the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def netns_cluster() -> Iterator[NetnsCluster]:
    """Three namespaced hosts with sshd (``ps``, ``w1``, ``w2``), removed after the module's tests."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    remove_stale()
    cluster = NetnsCluster()
    try:
        yield cluster
    finally:
        cluster.close()
