"""An adversarial audit of ``detox.cluster`` (ec2, hostfile, provision): each test broke the code before its fix.

No real AWS call: moto in-process (``moto_ec2``: dummy credentials, empty AWS config files) or a fake EC2 client
that answers as EC2 does at its documented limits. No real ssh: fake ssh/scp programs that log their arguments.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from test_cluster import an_ami, aws_env, moto_ec2  # noqa: F401 (fixtures)
from test_ec2_security import NoAws, ec2_cfg, one_error_line

from detox.cluster import ec2 as cluster
from detox.cluster.hostfile import MAX_SLOTS, parse_hostfile, write_hostfile
from detox.cluster.provision import Ssh, install_wheel, main

# ------------------------------------------------------------------------------------------------ ec2: launch


class TerminateMidLaunch:
    """An EC2 client on which ``terminate name=<name>`` runs between the PS's and the workers' ``run_instances``,
    as when a user terminates a cluster whose launch is still in flight."""

    def __init__(self, client: Any, name: str) -> None:
        self.client, self.name, self.calls = client, name, 0

    def run_instances(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 2:
            assert cluster.run("terminate", ec2_cfg(f"name={self.name}"), self.client) == 0
        return self.client.run_instances(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_terminate_during_a_launch_leaves_no_instance_running(moto_ec2: Any,  # noqa: F811
                                                               capsys: pytest.CaptureFixture) -> None:
    """`terminate` took the PS; the launch then started the workers, its wait failed on the terminated PS, and it
    exited saying "raise wait.max_attempts" with the workers running (and billing) though `terminate` had said the
    cluster was gone. Now the launch sees an instance of its own ended and takes back all it started."""
    cfg = ec2_cfg("name=mid", f"ami={an_ami(moto_ec2)}", "workers.count=2", "market=on-demand")
    assert cluster.run("launch", cfg, TerminateMidLaunch(moto_ec2, "mid")) == 1
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("detox.cluster.ec2: error: cluster 'mid': 1 instance(s) ended while launching ("), err
    assert "terminated the 3 instance(s) this launch started: " in err
    assert cluster.cluster_instances(moto_ec2, "mid") == []  # nothing pending, running, stopping or stopped
    assert len(cluster.cluster_instances(moto_ec2, "mid", cluster.ALL_STATES)) == 3


# ------------------------------------------------------------------------------------------------ ec2: terminate


def client_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, operation)


class LimitedEc2:
    """A spot cluster of ``n`` instances, each with its own spot request, behind EC2's documented limits: at most
    200 filter values per describe call (FilterLimitExceeded), 1000 ids per TerminateInstances (which then
    terminates none). ``page`` requests a page in describe_spot_instance_requests' answers (NextToken)."""

    def __init__(self, name: str, n: int, page: int = 1000, extra_tagged: int = 0) -> None:
        self.instances = [{"InstanceId": f"i-{k:05d}", "SpotInstanceRequestId": f"sir-{k:05d}",
                           "State": {"Name": "running"}, "AmiLaunchIndex": k,
                           "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": name},
                                    {"Key": cluster.TAG_ROLE, "Value": "ps" if k == 0 else "worker"}]}
                          for k in range(n)]
        # requests tagged with the cluster's name: those of its instances and `extra_tagged` not yet fulfilled
        self.tagged = [{"SpotInstanceRequestId": f"sir-{k:05d}", "State": "open" if k >= n else "active",
                        "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": name}]} for k in range(n + extra_tagged)]
        self.page, self.terminated, self.cancelled = page, set(), set()

    def get_paginator(self, operation: str) -> Any:
        assert operation == "describe_instances"
        pages = [{"Reservations": [{"ReservationId": "r-1", "Instances": self.instances}]}]
        return type("Paginator", (), {"paginate": lambda _self, **_: pages})()

    def describe_spot_instance_requests(self, Filters: list[dict], NextToken: str | None = None) -> dict:  # noqa: N803
        if sum(len(f["Values"]) for f in Filters) > 200:
            raise client_error("FilterLimitExceeded", "DescribeSpotInstanceRequests")
        by_id = next((set(f["Values"]) for f in Filters if f["Name"] == "spot-instance-request-id"), None)
        found = [r for r in self.tagged if by_id is None or r["SpotInstanceRequestId"] in by_id]
        start = int(NextToken or 0)
        answer: dict = {"SpotInstanceRequests": found[start:start + self.page]}
        if start + self.page < len(found):
            answer["NextToken"] = str(start + self.page)
        return answer

    def cancel_spot_instance_requests(self, SpotInstanceRequestIds: list[str]) -> None:  # noqa: N803
        if len(SpotInstanceRequestIds) > 1000:
            raise client_error("InvalidParameterValue", "CancelSpotInstanceRequests")
        self.cancelled |= set(SpotInstanceRequestIds)

    def terminate_instances(self, InstanceIds: list[str]) -> None:  # noqa: N803
        if len(InstanceIds) > 1000:
            raise client_error("InvalidParameterValue", "TerminateInstances")
        self.terminated |= set(InstanceIds)


def test_terminate_a_spot_cluster_larger_than_ecs_per_call_limits(capsys: pytest.CaptureFixture) -> None:
    """workers.count may be 1000. A spot cluster of over 199 workers failed at the linked requests' filter
    (FilterLimitExceeded) before terminating anything, and 1001 instances went in one TerminateInstances."""
    fake = LimitedEc2("big", 1001)
    assert cluster.run("terminate", ec2_cfg("name=big"), fake) == 0, capsys.readouterr().err
    assert fake.terminated == {i["InstanceId"] for i in fake.instances}
    assert fake.cancelled == {r["SpotInstanceRequestId"] for r in fake.tagged}
    assert "terminating 1001 instance(s) of cluster 'big'" in capsys.readouterr().out


def test_terminate_reads_every_page_of_spot_requests() -> None:
    """An open request on the second page of EC2's answer was never cancelled, and could start an instance after
    `terminate` said it was done."""
    fake = LimitedEc2("pg", 3, page=2, extra_tagged=2)
    assert cluster.run("terminate", ec2_cfg("name=pg"), fake) == 0
    assert fake.cancelled == {f"sir-{k:05d}" for k in range(5)}
    assert fake.terminated == {"i-00000", "i-00001", "i-00002"}


# ------------------------------------------------------------------------------------------------ ec2: settings


@pytest.mark.parametrize("price", ["1e999999999", "1e-999999999", "10000.01", "0.000000001", "1e5"])
def test_spot_price_out_of_bounds_is_one_line_before_any_aws_call(price: str, capsys: pytest.CaptureFixture) -> None:
    """'1e999999999' passed and became a billion-digit MaxPrice (1 GB, 3 s) sent with the PS's request."""
    cfg = ec2_cfg("ami=ami-0123456789abcdef0", f"spot_price='{price}'")
    assert cluster.run("launch", cfg, NoAws()) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        f"detox.cluster.ec2: error: spot_price='{price}': must be null or a price in USD per instance-hour > 0 and "
        f"at most 10000, with at most 8 decimals")


def test_spot_prices_within_bounds_pass() -> None:
    for given, sent in [("0.15", "0.15"), ("10000", "10000"), ("0.00000001", "0.00000001"), ("1E+2", "100"),
                        ("0.1500000000000", "0.1500000000000"), (0.15, "0.15")]:
        assert cluster.spot_price(given) == sent


# ------------------------------------------------------------------------------------------------ hostfiles


def test_write_hostfile_writes_only_what_parse_hostfile_reads(tmp_path: Path) -> None:
    """'-F/tmp/x' (an ssh option where a host should be), 'h:1' and slots over MAX_SLOTS were written, and only
    refused when a run or provision read the file."""
    path = tmp_path / "hosts"
    for hosts, slots in [(["-F/tmp/x"], [1]), (["h:1"], [1]), (["10.0.0.256"], [1]), (["h"], [MAX_SLOTS + 1])]:
        with pytest.raises(ValueError, match="not a host name or address|at most"):
            write_hostfile(path, hosts, slots)
        assert not path.exists()
    write_hostfile(path, ["10.0.0.1", "fe80::1", "node-1.internal"], [1, MAX_SLOTS, 2])
    assert parse_hostfile(path) == [("10.0.0.1", 1), ("fe80::1", MAX_SLOTS), ("node-1.internal", 2)]


def test_hostfile_comment_may_hold_any_bytes(tmp_path: Path) -> None:
    """Open MPI reads bytes: a Latin-1 comment is fine for it, but was refused as a UnicodeDecodeError naming no
    line. A byte outside comments is refused by line, naming the byte."""
    path = tmp_path / "hosts"
    path.write_bytes(b"# caf\xe9\n10.0.0.1 slots=2\n")
    assert parse_hostfile(path) == [("10.0.0.1", 2)]
    path.write_bytes(b"10.0.0.1\nh\xe9 slots=1\n")
    with pytest.raises(ValueError, match=r"^line 2 .*: non-ASCII byte 0xe9; hostfiles are ASCII"):
        parse_hostfile(path)


# what prterun (Open MPI 5.0.11) refuses after mpiexec has started, each passed parse_hostfile before (the run then
# ended `failed` instead of exit 2 before any work); and what it takes, which must still parse
PRTE_REFUSES = [
    (b"localhost slots=2\r\n", "a carriage return (CRLF line ends"),
    (b"localhost slots=2\x01\n", "the control character '\\x01'"),
    (b"localhost slots=2\x1c\n", "the control character '\\x1c'"),
    (b"localhost slots=2\nlocalhost slots=1\n", "localhost is also on line 1"),
    (b"localhost\nlocalhost slots=1\n", "localhost is also on line 1"),
    (b"localhost slots=2 slots=1\n", "slots given twice"),
    (b"localhost slots=2 max_slots=1\n", "max_slots=1 is below slots=2"),
]
PRTE_TAKES = [
    (b"localhost\nlocalhost\n", [("localhost", 1), ("localhost", 1)]),
    (b"localhost slots=2 # a comment\r\n", [("localhost", 2)]),
    (b"localhost slots=2 max_slots=2\n", [("localhost", 2)]),
    (b"localhost\tslots=2\n", [("localhost", 2)]),
    (b"localhost\x0cslots=2\x0b\n", [("localhost", 2)]),  # prterun's blanks (splitlines ended the line there)
]


# refused though prterun takes it (the last max_slots counts there, checked against slots only when after it)
STRICTER = [(b"localhost max_slots=1 max-slots=2\n", "max_slots given twice")]


@pytest.mark.parametrize(("content", "message"), PRTE_REFUSES + STRICTER)
def test_hostfile_open_mpi_refuses_is_refused_by_line(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^line \d ") as err:
        parse_hostfile(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("content", "hosts"), PRTE_TAKES)
def test_hostfile_open_mpi_takes_still_parses(content: bytes, hosts: list, tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(content)
    assert parse_hostfile(path) == hosts


def test_hostfile_checks_agree_with_mpiexec(tmp_path: Path) -> None:
    """The oracle: the wheel's own mpiexec refuses every PRTE_REFUSES file and runs every PRTE_TAKES one."""
    import subprocess

    from omegaconf import OmegaConf

    from detox.mpi import launcher_path

    mpiexec = launcher_path(OmegaConf.create({"engine": {"launcher": None}}))
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    path = tmp_path / "hosts"
    for content, refused in [*((c, True) for c, _ in PRTE_REFUSES), *((c, False) for c, _ in PRTE_TAKES)]:
        path.write_bytes(content)
        run = subprocess.run([mpiexec, "--hostfile", str(path), "-n", "1", "true"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert (run.returncode != 0) == refused, (content, run.returncode, run.stderr[-500:])


def test_provision_folder_or_unreadable_hostfile_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A folder was "no such file"; a file that cannot be read (permissions) was a traceback."""
    printed: list[str] = []
    assert main([str(tmp_path), "--ssh", "/nonexistent/ssh"], out=printed.append) == 2
    assert capsys.readouterr().err == f"detox.cluster.provision: error: {tmp_path}: is a folder, not a hostfile\n"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("10.0.0.1\n")

    def denied(*args: object, **kwargs: object) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main([str(hostfile), "--ssh", "/nonexistent/ssh"], out=printed.append) == 2
    assert capsys.readouterr().err == f"detox.cluster.provision: error: {hostfile}: cannot read it: Permission denied\n"
    assert printed == []


# ------------------------------------------------------------------------------------------------ provision: hosts

FAKE = """#!{python}
# a stand-in for ssh or scp: logs its argv, then writes what the test says (bytes, as a host may) and exits
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
exec({body!r})
"""


def fake_programs(folder: Path, body: str) -> tuple[Path, Path]:
    """``ssh`` and ``scp`` in ``folder`` that run ``body`` (Python, with ``sys`` and ``os``); returns (ssh, log).
    ssh is passed as ``--ssh``; a test that copies puts ``folder`` first on PATH for scp."""
    folder.mkdir()
    log = folder / "calls.jsonl"
    for name in ("ssh", "scp"):
        (folder / name).write_text(FAKE.format(python=sys.executable, log=str(log), body=body))
        (folder / name).chmod(0o755)
    return folder / "ssh", log


def calls(log: Path, program: str) -> list[list[str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [argv[1:] for argv in map(json.loads, lines) if argv[0] == program]


def provision_h1_h2(tmp_path: Path, ssh_body: str) -> list[str]:
    """The lines of ``provision`` over hosts h1 and h2 through a fake ssh running ``ssh_body`` (it fails: exit 1)."""
    ssh, _ = fake_programs(tmp_path / "bin", ssh_body)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h1\nh2\n")
    printed: list[str] = []
    assert main([str(hostfile), "--ssh", str(ssh), "--data-root", str(tmp_path)], out=printed.append) == 1
    return printed


def test_undecodable_host_output_still_gives_one_line_per_host(tmp_path: Path) -> None:
    """A host whose ssh error (or motd, or Python's message) was not UTF-8 raised UnicodeDecodeError out of the
    thread pool: a traceback, and no line for any host."""
    printed = provision_h1_h2(tmp_path, 'sys.stderr.buffer.write(b"ssh: connect to host caf\\xe9: refused\\n")\n'
                                        "sys.exit(255)")
    assert printed == [f"{host} failed: unreachable over ssh: ssh: connect to host caf\ufffd: refused"
                       for host in ("h1", "h2")]


def test_a_torn_probe_answer_fails_that_host_only(tmp_path: Path) -> None:
    """A probe line that was not a JSON object (a torn line, another program's output) raised out of the pool."""
    printed = provision_h1_h2(tmp_path, "host = sys.argv[-2]\n"
                                        "print('DETOX-PROVISION-PROBE ' + ('{torn' if host == 'h1' else '[1]'))")
    assert [line.split(" answered the probe with something else: ")[0] for line in printed] == [
        f"h1 failed: {sys.executable}", f"h2 failed: {sys.executable}"], printed


def a_want() -> Any:
    from detox.cluster.provision import Want

    return Want(python=sys.executable, python_version="3.11.7", detox_version="0.1.0", source="ab" * 32,
                workdir="/", data_root="/data", datasets=[], data_from=None)


def test_install_wheel_reads_mktemps_folder_past_a_banner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose shell startup prints to stdout: the banner and the folder were taken together as the folder,
    the copy went to 'Welcome...\\n/tmp/...', and `rm -rf` was handed the host's text."""
    body = ("if sys.argv[-1].startswith('mktemp'):\n"
            "    print('Welcome to node1')\n"
            "    print(os.environ.get('MKTEMP_SAYS', '/tmp/detox-provision.Ab12Cd'))")
    ssh, log = fake_programs(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", f"{ssh.parent}{os.pathsep}{os.environ['PATH']}")  # the copy runs `scp`
    wheel = tmp_path / "detox-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    assert install_wheel(Ssh(str(ssh)), "node1", a_want(), wheel) is None
    assert [argv[-1] for argv in calls(log, "scp")] == [f"node1:/tmp/detox-provision.Ab12Cd/{wheel.name}"]
    assert [argv[-1] for argv in calls(log, "ssh")][-1] == "rm -rf /tmp/detox-provision.Ab12Cd"

    # anything else is not copied to, and never removed
    log.unlink()
    monkeypatch.setenv("MKTEMP_SAYS", "/home/me")
    failed = install_wheel(Ssh(str(ssh)), "node1", a_want(), wheel)
    assert failed == "mktemp printed '/home/me', not a /tmp/detox-provision.* folder"
    assert calls(log, "scp") == [] and [argv[-1] for argv in calls(log, "ssh")] == ["mktemp -d /tmp/detox-provision"
                                                                                     ".XXXXXX"]


# ------------------------------------------------------------------------------------------------ ec2: the command line


def test_bad_setting_next_to_a_hydra_flag_is_one_line(aws_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """With a Hydra flag (-cn, --config-dir, --cfg) the settings went to Hydra unread, and a bad one came back as
    Hydra's several-line error with exit 1. The endpoint is a closed port: an AWS call would fail otherwise."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PYTHONPATH": str(Path(cluster.__file__).parents[2])}  # this checkout's detox, from any folder
    for args, message in [(["status", "-cn", "ec2", "workers.cont=3"], "workers.cont: no such setting"),
                          (["terminate", "--cfg", "job", "name=é"], "'name=é': not a key=value setting")]:
        proc = subprocess.run([sys.executable, "-m", "detox.cluster.ec2", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert one_error_line(proc.stderr).startswith(f"detox.cluster.ec2: error: {message}"), args


def test_a_name_is_resolved_once_for_the_check_and_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpolated name was resolved again at every use: ``name='x${...}'`` could be checked as one name and
    reach AWS as another. The command now gets the config resolved once, the value that was checked."""
    from omegaconf import OmegaConf

    values = iter(["exp1", "exp2", "exp3", "exp4"])
    OmegaConf.register_new_resolver("audit_next", lambda: next(values), replace=True)
    seen: list[str] = []

    def status(cfg: Any, ec2: Any) -> int:
        seen.extend([cfg.name, cfg.name])
        return 0

    monkeypatch.setitem(cluster.COMMANDS, "status", status)
    assert cluster.run("status", ec2_cfg("name=${audit_next:}"), ec2=NoAws()) == 0
    assert seen == ["exp1", "exp1"]


def test_hosts_says_which_instances_it_leaves_out(moto_ec2: Any, tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture) -> None:
    """An instance of the cluster whose role tag someone changed was left out of the hostfile without a word."""
    cfg = ec2_cfg("name=rt", f"ami={an_ami(moto_ec2)}", "workers.count=2", "market=on-demand",
                  f"hostfile={tmp_path / 'hosts'}")
    assert cluster.run("launch", cfg, moto_ec2) == 0
    worker = next(i["InstanceId"] for i in cluster.cluster_instances(moto_ec2, "rt")
                  if cluster._tag(i, cluster.TAG_ROLE) == "worker")
    moto_ec2.create_tags(Resources=[worker], Tags=[{"Key": cluster.TAG_ROLE, "Value": "spare"}])
    capsys.readouterr()
    assert cluster.run("hosts", cfg, moto_ec2) == 0
    err = capsys.readouterr().err
    assert f"1 instance(s) without a {cluster.TAG_ROLE} tag of ps or worker left out of the hostfile: {worker}" in err
    assert len(parse_hostfile(tmp_path / "hosts")) == 2  # the PS and the other worker
