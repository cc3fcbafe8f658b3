"""``python -m detox.cluster.provision``: over ssh against three namespaced hosts (tests/netns_cluster.py).

The hosts share this machine's filesystem except one folder each (``cluster.local``, a bind mount per host): the
Python environment provisioned and the data root live there, so what provision installs or prepares on one host
is on that host only, and a later run can find one host broken and the others fine. The environment is a fresh
venv whose dependencies come from this venv (a folder of links to its site-packages, without detox): as on hosts
built from one image, provision installs detox only, offline. Provision's workdir is a folder without a checkout
(a checkout there would be imported first, as mpiexec starts the ranks in it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import ROOT
from netns_cluster import NetnsCluster, netns_cluster  # noqa: F401 (the fixture)

from detox.cluster import provision as provision_module
from detox.cluster.hostfile import MAX_SLOTS, parse_hostfile
from detox.cluster.provision import Ssh, Want, install_wheel, main, problems, source_hash

SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
FASHION = ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def provision(cluster: NetnsCluster, hostfile: Path, workdir: Path, *extra: str) -> tuple[int, list[str], str]:
    """Run the command from the PS host's namespace, as on the PS; (exit code, stdout lines, stderr)."""
    key_opts = ["-i", str(cluster.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR"]
    cmd = cluster.in_ns(cluster.hosts[0], [
        "env", f"PYTHONPATH={cluster.tmp / 'checkout'}", sys.executable, "-m", "detox.cluster.provision",
        str(hostfile), *key_opts,
        "--python", str(cluster.local / "venv" / "bin" / "python"), "--workdir", str(workdir),
        "--dataset", "fashion_mnist", "--data-root", str(cluster.local / "data"), *extra])
    t0 = time.monotonic()
    got = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    print(f"\nprovision: exit {got.returncode} after {time.monotonic() - t0:.1f} s\n{got.stdout}", end="")
    return got.returncode, got.stdout.splitlines(), got.stderr


def states(lines: list[str]) -> list[tuple[str, str]]:
    return [(line.split()[0], line.split()[1].rstrip(":")) for line in lines]


@pytest.fixture(scope="module")
def hosts(netns_cluster: NetnsCluster) -> NetnsCluster:  # noqa: F811
    """Each host gets an empty venv at the same path (its own copy) and an empty data root; provision runs from a
    snapshot of this checkout (others may edit the working tree while the test runs)."""
    cluster = netns_cluster
    checkout = cluster.tmp / "checkout"
    for name in ("detox", "analysis", "hydra_plugins"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    deps = cluster.tmp / "deps"  # this venv's site-packages without detox: the image's dependencies
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if not entry.name.startswith(("detox", "__editable__", "_detox", "__pycache__")):
            (deps / entry.name).symlink_to(entry)
    template = cluster.local / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(template)], check=True)
    (template / SITE / "image-deps.pth").write_text(f"{deps}\n")  # pip comes from here too
    for host in cluster.hosts:
        shutil.copytree(template, cluster.disk(host) / "venv", symlinks=True)
        (cluster.disk(host) / "data").mkdir()
    shutil.rmtree(template)
    return cluster


@pytest.mark.mpi
@pytest.mark.slow  # about two minutes: each host imports torch, prepares Fashion-MNIST; then an MPI job
def test_provision_installs_prepares_and_reports_each_host(hosts: NetnsCluster, tmp_path: Path) -> None:
    cluster, (ps, w1, w2) = hosts, hosts.hosts
    addresses = [h.address for h in cluster.hosts]
    hostfile = tmp_path / "hosts_address"
    ghost = "10.213.213.99"  # in the subnet, no host: ssh cannot connect
    hostfile.write_text(f"{ps.address} slots=1\n{w1.address} slots=3\n{w2.address} slots=3\n{ghost}\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    for host in cluster.hosts:  # before: nothing of detox in any host's venv
        assert not (cluster.disk(host) / "venv" / SITE / "detox").exists()

    # 1. fresh hosts: detox installed from the wheel and Fashion-MNIST prepared on each; the ghost fails
    code, lines, err = provision(cluster, hostfile, workdir)
    assert code == 1, (lines, err)
    assert states(lines) == [(a, "fixed") for a in addresses] + [(ghost, "failed")], lines
    for line in lines[:3]:
        assert "installed detox-0.1.0-py3-none-any.whl" in line and "No module named 'detox'" in line, line
        assert f"prepared fashion_mnist under {cluster.local / 'data'}" in line, line
    assert "unreachable over ssh" in lines[3], lines
    want = source_hash(cluster.tmp / "checkout" / "detox")  # what provision ran from
    for host in cluster.hosts:  # each host's own copy: installed and prepared there
        pkg = cluster.disk(host) / "venv" / SITE / "detox"
        assert source_hash(pkg) == want
        assert all((cluster.disk(host) / "data" / "FashionMNIST" / "raw" / f).is_file() for f in FASHION)
    assert not list(cluster.local.iterdir())  # on the hosts' own disks only, not on this machine's

    # 2. again, without the ghost: nothing to do
    hostfile.write_text("".join(f"{a} slots=1\n" for a in addresses))
    code, lines, err = provision(cluster, hostfile, workdir)
    assert code == 0, (lines, err)
    assert states(lines) == [(a, "ok") for a in addresses], lines
    assert all(f"source {want[:12]}" in line and "data present: fashion_mnist" in line for line in lines)

    # a Python that is not there is a failure provision cannot fix (the hosts come from one image)
    w1_only = tmp_path / "w1_only"
    w1_only.write_text(f"{w1.address}\n")
    code, lines, err = provision(cluster, w1_only, workdir, "--python", "/opt/nowhere/bin/python")
    assert code == 1 and lines == [f"{w1.address} failed: no Python at /opt/nowhere/bin/python (the hosts must "
                                   f"have this Python at the same path)"], (lines, err)

    # 3. w1 loses its data, w2's detox drifts (one file edited): only they are fixed, each with what it lacked
    shutil.rmtree(cluster.disk(w1) / "data" / "FashionMNIST")
    with open(cluster.disk(w2) / "venv" / SITE / "detox" / "mpi.py", "a") as fh:
        fh.write("# edited on this host\n")
    code, lines, err = provision(cluster, hostfile, workdir)
    assert code == 0, (lines, err)
    assert states(lines) == [(ps.address, "ok"), (w1.address, "fixed"), (w2.address, "fixed")], lines
    assert "prepared fashion_mnist" in lines[1] and "installed" not in lines[1], lines
    assert "installed" in lines[2] and "with other sources" in lines[2] and "prepared" not in lines[2], lines
    assert source_hash(cluster.disk(w2) / "venv" / SITE / "detox") == want

    # 4. the chain's last step: engine=mpi on the provisioned hosts, every rank on the detox provision installed
    # (engine.python) and on its own host's Fashion-MNIST (data_root: the same path, each host's own copy)
    hostfile.write_text(f"{ps.address} slots=1\n{w1.address} slots=2\n{w2.address} slots=2\n")
    run_dir = tmp_path / "run"
    job = ["engine=mpi", "workers=4", "worker_fail=0", "approach=baseline", "mode=mean", "dataset=fashion_mnist",
           "max_steps=3", "eval_freq=3", f"engine.hostfile={hostfile}", f"data_root={cluster.local / 'data'}",
           f"engine.python={cluster.local / 'venv' / 'bin' / 'python'}", cluster.mpi_launcher_args(),
           f"hydra.run.dir={run_dir}"]
    got = cluster.ssh(ps, f"cd {workdir} && {shlex.join([sys.executable, '-m', 'detox.train', *job])}", check=False,
                      timeout=300)
    log = (run_dir / "mpi.log").read_text() if (run_dir / "mpi.log").exists() else ""
    assert got.returncode == 0, (got.stdout[-2000:], got.stderr[-2000:], log[-3000:])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    hosts_of = dict(re.findall(r"detox\.mpi: rank (\d+) of 5 runs on host (\S+)", log))
    assert hosts_of == {"0": "detox-ps", "1": "detox-w1", "2": "detox-w1", "3": "detox-w2", "4": "detox-w2"}, log


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("10.0.0.1 slots=1\n10.0.0.2 slots=two\n", "line 2 '10.0.0.2 slots=two': slots='two' must be an integer"),
        ("# only a comment\n", "no hosts in the file"),
        ("-F/tmp/evil\n", "'-F/tmp/evil' is not a host name or an IP address"),  # would be an ssh option
        # what Open MPI refuses, Python's int() and str.split() took: Unicode digits, a no-break space, ...
        ("localhost slots=\u0663\n", "non-ASCII character '\u0663' (U+0663); hostfiles are ASCII"),
        ("localhost slots=\u00b2\n", "non-ASCII character '\u00b2' (U+00B2); hostfiles are ASCII"),
        ("localhost\u00a0slots=2\n", "line 1 'localhost\\xa0slots=2': non-ASCII character '\\xa0' (U+00A0)"),
        (":::::::\n", "':::::::' is not a host name or an IP address"),
        ("10.0.0.256\n", "'10.0.0.256' is not a host name or an IP address"),
        ("h slots=99999999999999999999999\n", f"slots='99999999999999999999999' must be an integer >= 1 and at most "
                                              f"{MAX_SLOTS} (ASCII digits)"),
        (f"h slots={MAX_SLOTS + 1}\n", f"slots='{MAX_SLOTS + 1}' must be an integer >= 1 and at most {MAX_SLOTS}"),
    ],
    ids=["missing", "malformed", "empty", "option-as-host", "arabic-digit", "superscript", "nbsp", "colons",
         "bad-ipv4", "huge-slots", "over-bound"],
)
def test_provision_bad_hostfile_is_one_line_exit_2(content: str | None, says: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    hostfile = tmp_path / "hosts"
    if content is not None:
        hostfile.write_text(content)
    printed: list[str] = []
    assert main([str(hostfile), "--ssh", "/nonexistent/ssh"], out=printed.append) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("detox.cluster.provision: error: ") and says in err, err
    assert printed == []  # nothing was contacted


def test_provision_bad_flag_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("10.0.0.1\n")
    for args in (["--dataset", "imagenet"], ["--identity", str(tmp_path / "nokey")], ["--jobs", "0"],
                 ["--user", "-oProxyCommand=touch /tmp/pwned"]):
        printed: list[str] = []
        try:  # argparse's refusals exit, the checks after parsing return
            code = main([str(hostfile), "--ssh", "/nonexistent/ssh", *args], out=printed.append)
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and printed == [], (args, err)
        assert err.startswith("detox.cluster.provision: error: "), err


def test_provision_another_python_version_fails_without_installing() -> None:
    want = Want(python="/venv/bin/python", python_version="3.11.7", detox_version="0.1.0", source="ab" * 32,
                workdir="/", data_root="/data", datasets=["mnist"], data_from=None)
    fatal, install, prepare = problems({"python": "3.10.12", "error": "ModuleNotFoundError: detox"}, want)
    assert fatal.startswith("Python 3.10.12 at /venv/bin/python, this host runs 3.11.7") and not install
    # the same Python: a missing detox is installed, other sources are reinstalled, missing data is prepared
    assert problems({"python": "3.11.7", "error": "ModuleNotFoundError: detox"}, want) == (None, True, [])
    have = {"python": "3.11.7", "detox_version": "0.1.0", "source": "cd" * 32, "data": {"mnist": True}}
    assert problems(have, want) == (None, True, [])
    assert problems({**have, "source": "ab" * 32, "data": {"mnist": False}}, want) == (None, False, ["mnist"])


def test_hostfile_error_echoes_at_most_80_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 100,000-character line used to come back twice in full: a 200 KB "one line"."""
    hostfile = tmp_path / "hosts"
    for line in ("a" * 100_000 + " slots=1", "h slots=" + "9" * 100_000, "h " + "x" * 100_000):
        hostfile.write_text(line + "\n")
        assert main([str(hostfile), "--ssh", "/nonexistent/ssh"], out=print) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and len(err) < 600 and f"line 1 {line[:80]!r}…: " in err, err[:700]


def test_hostfile_accepts_what_open_mpi_reads(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(f"# the PS — comments may hold any text\n10.0.0.1\tslots=1\nfe80::1 slots={MAX_SLOTS}\n::1 \t\n"
                    f"node_7.ec2.internal slots=0003 max_slots=8  # ü\n")
    assert parse_hostfile(path) == [("10.0.0.1", 1), ("fe80::1", MAX_SLOTS), ("::1", 1), ("node_7.ec2.internal", 3)]


# ------------------------------------------------------------------------------------------------ fake ssh and scp

FAKE = """#!{python}
# a stand-in for ssh or scp: logs its argv, then acts as FAKE_SSH says
import json, os, subprocess, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
mode = os.environ["FAKE_SSH"]
if mode == "unreachable":
    print("ssh: connect to host port 22: No route to host", file=sys.stderr)
    sys.exit(255)
if mode == "local" and os.path.basename(sys.argv[0]) == "ssh":  # run the remote command here
    sys.exit(subprocess.run(["sh", "-c", sys.argv[-1]]).returncode)
if sys.argv[-1].startswith("mktemp"):  # mode "log": answer what install_wheel needs, do nothing
    print("/tmp/detox-provision.fake")
"""


class Fakes:
    """``ssh`` and ``scp`` stand-ins in a folder put first on PATH; ``calls`` is every argv they were run with."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder.mkdir()
        for name in ("ssh", "scp"):
            (folder / name).write_text(FAKE.format(python=sys.executable))
            (folder / name).chmod(0o755)
        self.ssh, self.log = folder / "ssh", folder / "calls.jsonl"
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_LOG", str(self.log))
        monkeypatch.setenv("FAKE_SSH", "log")

    def calls(self, program: str) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [argv[1:] for argv in map(json.loads, lines) if argv[0] == program]


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    return Fakes(tmp_path / "fakebin", monkeypatch)


def a_want(**changes: object) -> Want:
    want = Want(python=sys.executable, python_version="3.11.7", detox_version="0.1.0", source="ab" * 32,
                workdir="/", data_root="/data", datasets=[], data_from=None)
    return Want(**{**want.__dict__, **changes})


def test_scp_target_brackets_ipv6_addresses(fakes: Fakes, tmp_path: Path) -> None:
    """scp splits ``host:path`` at the first ':' outside brackets: ``fe80::1:/tmp/x`` went to host ``fe80`` and
    ``::1:/tmp/x`` to a local file. ssh takes the bare address."""
    wheel = tmp_path / "detox-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    hosts = ("fe80::1", "::1", "10.0.0.1", "node1")
    for user in (None, "ubuntu"):
        for host in hosts:
            assert install_wheel(Ssh(str(fakes.ssh), user), host, a_want(), wheel) is None
    remote = f"/tmp/detox-provision.fake/{wheel.name}"
    assert [argv[-1] for argv in fakes.calls("scp")] == [
        f"[fe80::1]:{remote}", f"[::1]:{remote}", f"10.0.0.1:{remote}", f"node1:{remote}",
        f"ubuntu@[fe80::1]:{remote}", f"ubuntu@[::1]:{remote}", f"ubuntu@10.0.0.1:{remote}", f"ubuntu@node1:{remote}"]
    assert all(argv[-2] == str(wheel) and argv[:3] == ["-q", "-S", str(fakes.ssh)] for argv in fakes.calls("scp"))
    ssh_targets = [argv[-2] for argv in fakes.calls("ssh")]  # mktemp, pip, rm: three per host
    assert ssh_targets == [t for t in [*hosts, *(f"ubuntu@{h}" for h in hosts)] for _ in range(3)]


def test_a_host_listed_twice_is_provisioned_once(fakes: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two lines for one machine used to mean two provisions of it at once (two pip installs into one env)."""
    monkeypatch.setenv("FAKE_SSH", "unreachable")
    hostfile = tmp_path / "hosts"
    # (a host on two lines with slots= on either is refused: Open MPI refuses it)
    hostfile.write_text("h1\nh1\nfe80::1 slots=2\nH1\nFE80:0::1\nh2\n")
    printed: list[str] = []
    assert main([str(hostfile), "--ssh", str(fakes.ssh), "--data-root", str(tmp_path)], out=printed.append) == 1
    assert [line.split(" failed: ")[0] for line in printed] == ["h1", "fe80::1", "h2"], printed
    assert all("unreachable over ssh: ssh: connect to host port 22: No route to host" in line for line in printed)
    assert sorted(argv[-2] for argv in fakes.calls("ssh")) == ["fe80::1", "h1", "h2"]  # each machine asked once


def test_provision_prepares_a_truncated_data_set_again(fakes: Fakes, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe used to check file names only: a truncated IDX file was "data present". Over a fake ssh that runs
    the remote commands on this machine (its Python and detox are the ones wanted, so nothing is installed)."""
    if not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail("Debian's dataset-fashion-mnist is not installed; run 'apt-get install -y dataset-fashion-mnist'")
    monkeypatch.setenv("FAKE_SSH", "local")

    def no_install(*args: object) -> str:  # never pip-install into this venv, whatever happens
        return "installing is refused in this test"

    monkeypatch.setattr(provision_module, "install_wheel", no_install)
    root, work, hostfile = tmp_path / "data", tmp_path / "work", tmp_path / "hosts"
    work.mkdir()
    hostfile.write_text("localhost\n")
    args = [str(hostfile), "--ssh", str(fakes.ssh), "--python", sys.executable, "--workdir", str(work),
            "--dataset", "fashion_mnist", "--data-root", str(root)]

    def provision_once() -> str:
        printed: list[str] = []
        assert main(args, out=printed.append) == 0, printed
        assert len(printed) == 1
        return printed[0]

    assert provision_once() == f"localhost fixed: prepared fashion_mnist under {root}"
    labels = root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    whole = labels.read_bytes()
    assert provision_once().endswith("data present: fashion_mnist")
    with open(labels, "r+b") as f:
        f.truncate(100)
    assert provision_once() == f"localhost fixed: prepared fashion_mnist under {root}"
    assert labels.read_bytes() == whole
