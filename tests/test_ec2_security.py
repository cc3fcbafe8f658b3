"""The EC2 CLI acts on one cluster only, and refuses bad settings before any AWS call (issue #10, items 1 and 11).

Clusters named ``exp1``, ``exp2``, ``ab`` and ``exp`` run side by side on a local moto server: ``exp`` is a prefix
of two others and ``exp*``, ``ex?2``, ``*`` (EC2 filter wildcards) match several of them. No real AWS call
anywhere: dummy credentials, empty AWS config files, ``AWS_ENDPOINT_URL`` at 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from hydra import compose, initialize_config_dir
from moto.server import ThreadedMotoServer
from omegaconf import DictConfig

from detox.cluster import ec2 as cluster
from detox.cluster.hostfile import parse_hostfile, write_hostfile

REGION = "us-west-2"
CLUSTERS = ("exp1", "exp2", "ab", "exp")
PATTERNS = ("exp*", "*", "ex?2", "exp?", "?b")  # each matches other clusters (or none) in an EC2 filter
LIVE = ["pending", "running"]


def ec2_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(cluster.CONF_DIR)):
        return compose("ec2", overrides=[f"region={REGION}", "wait.delay=1", "wait.max_attempts=5", *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials; no user profile, config file or instance metadata can leak in."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def server(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh moto server; the CLI's own client finds it through AWS_ENDPOINT_URL."""
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        url = f"http://127.0.0.1:{port}"
        requests.post(f"{url}/moto-api/reset", timeout=30).raise_for_status()
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield boto3.client("ec2", region_name=REGION)
    finally:
        moto.stop()


@pytest.fixture
def four(server: Any, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """Clusters exp1, exp2, ab, exp (a PS and a worker each) and one open spot request tagged with each name."""
    ami = server.describe_images()["Images"][0]["ImageId"]
    for name in CLUSTERS:
        assert cluster.run("launch", ec2_cfg(f"name={name}", f"ami={ami}", "workers.count=1",
                                             "market=on-demand")) == 0
    spot = {}
    for name in CLUSTERS:
        reply = server.request_spot_instances(
            SpotPrice="0.1", InstanceCount=1, LaunchSpecification={"ImageId": ami, "InstanceType": "c5.xlarge"},
            TagSpecifications=[{"ResourceType": "spot-instances-request",
                                "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": name}]}])
        spot[name] = reply["SpotInstanceRequests"][0]["SpotInstanceRequestId"]
    capsys.readouterr()
    before = by_cluster(server)
    assert {name: len(ids) for name, ids in before.items() if name} == dict.fromkeys(CLUSTERS, 2)
    return {"ec2": server, "ami": ami, "spot": spot, "before": before}


def by_cluster(ec2: Any) -> dict[str | None, set[str]]:
    """Live instance ids by exact ``detox-cluster`` tag value (None: untagged)."""
    out: dict[str | None, set[str]] = {}
    for r in ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": LIVE}])["Reservations"]:
        for i in r["Instances"]:
            out.setdefault(cluster._tag(i, cluster.TAG_CLUSTER), set()).add(i["InstanceId"])
    return out


def open_requests(ec2: Any) -> set[str]:
    return {r["SpotInstanceRequestId"] for r in ec2.describe_spot_instance_requests(
        Filters=[{"Name": "state", "Values": ["open", "active"]}])["SpotInstanceRequests"]}


class NoAws:
    """An EC2 client that fails the test on any use: the settings must be refused before the first call."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an AWS call ({name}) was made for a setting that should have been refused")


# ------------------------------------------------------------------------------------------------ moto server


def test_pattern_names_are_refused_by_every_command(four: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    ec2 = four["ec2"]
    for name in PATTERNS:
        for command in cluster.COMMANDS:
            extra = [f"ami={four['ami']}"] if command == "launch" else []
            assert cluster.run(command, ec2_cfg(f"name={name}", *extra)) == 2, (command, name)
            captured = capsys.readouterr()
            assert captured.out == ""  # nothing listed, nothing launched
            assert one_error_line(captured.err).startswith(f"detox.cluster.ec2: error: name={name!r}: must be 1-64 "
                                                           "characters from A-Z a-z 0-9 . _ -")
    assert by_cluster(ec2) == four["before"]  # every cluster still running, nothing added
    assert set(four["spot"].values()) <= open_requests(ec2)


def test_terminate_acts_on_the_exact_name_only(four: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    ec2, spot, before = four["ec2"], four["spot"], four["before"]
    assert cluster.run("terminate", ec2_cfg("name=exp")) == 0  # a prefix of exp1 and exp2
    out = capsys.readouterr().out
    assert f"cancelled 1 spot request(s): {spot['exp']}" in out
    line = next(line for line in out.splitlines() if line.startswith("terminating"))
    assert line.startswith("terminating 2 instance(s) of cluster 'exp': ")
    assert set(line.split(": ")[1].split()) == before["exp"]
    after = by_cluster(ec2)
    assert "exp" not in after
    assert {k: v for k, v in after.items() if k != "exp"} == {k: v for k, v in before.items() if k != "exp"}
    assert open_requests(ec2) >= {spot["exp1"], spot["exp2"], spot["ab"]}
    assert spot["exp"] not in open_requests(ec2)

    assert cluster.run("terminate", ec2_cfg("name=ab")) == 0
    after = by_cluster(ec2)
    assert "ab" not in after and after["exp1"] == before["exp1"] and after["exp2"] == before["exp2"]
    assert open_requests(ec2) >= {spot["exp1"], spot["exp2"]}


def test_listing_acts_on_the_exact_name_only(four: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    ec2, before = four["ec2"], four["before"]
    assert cluster.run("status", ec2_cfg("name=exp")) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == before["exp"]

    hostfile = tmp_path / "hosts"
    assert cluster.run("hosts", ec2_cfg("name=exp", f"hostfile={hostfile}")) == 0
    ips = {i["PrivateIpAddress"] for r in ec2.describe_instances(InstanceIds=sorted(before["exp"]))["Reservations"]
           for i in r["Instances"]}
    assert {host for host, _ in parse_hostfile(hostfile)} == ips

    capsys.readouterr()
    assert cluster.run("launch", ec2_cfg("name=exp", f"ami={four['ami']}")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cluster 'exp' already has 2 instance(s)")
    assert {line.split()[0] for line in out[1:]} == before["exp"]
    assert by_cluster(ec2) == before


def test_commands_filter_client_side_even_past_the_name_check(four: dict[str, Any],
                                                              capsys: pytest.CaptureFixture) -> None:
    """The second guard: called directly with a pattern name, the server's filter matches exp1, exp2 and exp, and
    every command still keeps only instances and requests whose tag equals the name (here: none)."""
    ec2, before = four["ec2"], four["before"]
    for name in ("exp*", "*", "ex?2"):
        assert cluster.cluster_instances(ec2, name, cluster.ALL_STATES) == []
        cfg = ec2_cfg()
        cfg.name = name  # as a library caller could, past check_config
        assert cluster.COMMANDS["status"](cfg, ec2) == 0
        assert cluster.COMMANDS["terminate"](cfg, ec2) == 0
        assert capsys.readouterr().out.splitlines() == [f"cluster {name!r}: no instances in {REGION}",
                                                        f"cluster {name!r}: nothing to terminate in {REGION}"]
    assert by_cluster(ec2) == before
    assert set(four["spot"].values()) <= open_requests(ec2)


def test_terminate_keeps_another_clusters_linked_request() -> None:
    """A server whose filters match patterns (as EC2's do): only exp's instances and requests are acted on. A spot
    request linked to an exp instance but tagged for another cluster is left alone; an untagged one is cancelled."""
    def instance(iid: str, name: str, role: str, request: str) -> dict:
        return {"InstanceId": iid, "SpotInstanceRequestId": request, "State": {"Name": "running"},
                "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": name}, {"Key": cluster.TAG_ROLE, "Value": role}]}

    instances = [instance("i-exp", "exp", "ps", "sir-a"), instance("i-exp-w", "exp", "worker", "sir-b"),
                 instance("i-exp1", "exp1", "ps", "sir-c")]
    tagged = {"sir-exp": "exp", "sir-exp2": "exp2", "sir-b": "exp1", "sir-c": "exp1"}
    untagged = {"sir-a"}

    class PatternEc2:
        def __init__(self) -> None:
            self.terminated: list[str] = []
            self.cancelled: list[str] = []

        def get_paginator(self, _: str) -> Any:
            pages = [{"Reservations": [{"Instances": instances}]}]
            return type("Paginator", (), {"paginate": lambda _self, **_: pages})()

        def describe_spot_instance_requests(self, Filters: list[dict]) -> dict:  # noqa: N803 (boto3's name)
            by_id = next((f["Values"] for f in Filters if f["Name"] == "spot-instance-request-id"), None)
            ids = by_id if by_id is not None else list(tagged)  # a tag filter that matched every cluster
            return {"SpotInstanceRequests": [
                {"SpotInstanceRequestId": r, "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": tagged[r]}]}
                if r in tagged else {"SpotInstanceRequestId": r} for r in ids if r in tagged or r in untagged]}

        def cancel_spot_instance_requests(self, SpotInstanceRequestIds: list[str]) -> None:  # noqa: N803
            self.cancelled += SpotInstanceRequestIds

        def terminate_instances(self, InstanceIds: list[str]) -> None:  # noqa: N803
            self.terminated += InstanceIds

    fake = PatternEc2()
    assert cluster.run("terminate", ec2_cfg("name=exp"), fake) == 0
    assert fake.terminated == ["i-exp", "i-exp-w"]
    assert fake.cancelled == ["sir-a", "sir-exp"]
    assert cluster.owned([{"Tags": []}, {}], "exp") == []
    assert len(cluster.owned([{"Tags": []}, {}], "exp", untagged=True)) == 2


def test_hosts_says_a_stopped_instance_must_be_started(server: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """It used to say "not running yet ... try again": a stopped instance never starts by itself."""
    ami = server.describe_images()["Images"][0]["ImageId"]
    assert cluster.run("launch", ec2_cfg("name=st", f"ami={ami}", "workers.count=1", "market=on-demand")) == 0
    ps = [i["InstanceId"] for i in cluster.cluster_instances(server, "st") if cluster._tag(i, cluster.TAG_ROLE) == "ps"]
    server.stop_instances(InstanceIds=ps)
    capsys.readouterr()
    assert cluster.run("hosts", ec2_cfg("name=st", f"hostfile={tmp_path / 'hosts'}")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"detox.cluster.ec2: error: cluster 'st': 1 instance(s) stopped ({ps[0]}); start them (aws ec2 "
                    f"start-instances --instance-ids {ps[0]}), or terminate the cluster and launch it again"), line
    assert not (tmp_path / "hosts").exists()


class RaceAfterCheck:
    """An EC2 client that waits at ``describe_images`` (after launch's "no instances yet" check, before its
    ``run_instances``) until the other launch got there too: both pass the check, as two users' launches can."""

    def __init__(self, client: Any, barrier: threading.Barrier) -> None:
        self.client, self.barrier = client, barrier

    def describe_images(self, **kwargs: Any) -> Any:
        self.barrier.wait(timeout=60)
        return self.client.describe_images(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("count", [1, 3])
def test_concurrent_launches_of_one_name_leave_one_cluster(server: Any, count: int,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Two launches of one name that both saw no instances both ran run_instances: a doubled cluster. Now each
    lists the cluster's PSes afterwards; the one whose PS started first (then: lower reservation id) keeps its
    instances, the other terminates exactly the instances it started and exits 1 saying so."""
    ami = server.describe_images()["Images"][0]["ImageId"]
    barrier = threading.Barrier(2)
    clients = [RaceAfterCheck(boto3.client("ec2", region_name=REGION), barrier) for _ in range(2)]
    cfg = ec2_cfg("name=race", f"ami={ami}", f"workers.count={count}", "market=on-demand")
    codes: list[int] = []
    threads = [threading.Thread(target=lambda c=c: codes.append(cluster.run("launch", cfg, c))) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(codes) == [0, 1]
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("detox.cluster.ec2: error: cluster 'race': a concurrent launch of that name won (its PS, "
                          "reservation r-"), err
    assert f"terminated the {1 + count} instance(s) this launch started: " in err
    live = cluster.cluster_instances(server, "race")
    assert [cluster._tag(i, cluster.TAG_ROLE) for i in live] == ["ps"] + ["worker"] * count
    lost = set(err.rsplit(": ", 1)[1].split())
    assert len(lost) == 1 + count and not lost & {i["InstanceId"] for i in live}
    assert {r["ReservationId"] for r in server.describe_instances(InstanceIds=sorted(lost))["Reservations"]
            for i in r["Instances"] if i["State"]["Name"] in ("shutting-down", "terminated")} == {
        r["ReservationId"] for r in server.describe_instances(InstanceIds=sorted(lost))["Reservations"]}


def test_the_losing_launch_cancels_its_own_spot_requests(capsys: pytest.CaptureFixture) -> None:
    """moto starts spot instances without spot requests; against EC2's shape the loser cancels exactly the
    requests of the instances it started (before terminating them), and touches nothing of the winner's."""
    def reply(reservation: str, second: int, *ids: str) -> dict:
        return {"ReservationId": reservation, "Instances": [
            {"InstanceId": i, "LaunchTime": second, "SpotInstanceRequestId": f"sir-{i}",
             "Tags": [{"Key": cluster.TAG_CLUSTER, "Value": "sp"}, {"Key": cluster.TAG_ROLE, "Value": role}]}
            for i, role in zip(ids, ["ps", "worker", "worker"], strict=False)]}

    winner = reply("r-b", 1, "i-wps")  # launched a second earlier, though its reservation id sorts later
    ours = [reply("r-a", 2, "i-ps"), reply("r-a2", 2, "i-w1", "i-w2")]

    class Ec2:
        calls: list[tuple[str, list[str]]] = []

        def get_paginator(self, _: str) -> Any:
            pages = [{"Reservations": [winner, ours[0]]}]
            return type("Paginator", (), {"paginate": lambda _self, **_: pages})()

        def cancel_spot_instance_requests(self, SpotInstanceRequestIds: list[str]) -> None:  # noqa: N803
            self.calls.append(("cancel", SpotInstanceRequestIds))

        def terminate_instances(self, InstanceIds: list[str]) -> None:  # noqa: N803
            self.calls.append(("terminate", InstanceIds))

    with pytest.raises(cluster.ClusterError, match=r"a concurrent launch of that name won \(its PS, reservation r-b"):
        cluster._yield_to_earlier_launch(Ec2(), ec2_cfg("name=sp"), ours)
    assert Ec2.calls == [("cancel", ["sir-i-ps", "sir-i-w1", "sir-i-w2"]), ("terminate", ["i-ps", "i-w1", "i-w2"])]
    assert cluster._earlier_launch(Ec2(), "sp", winner) is None  # the winner, asking the same, keeps its own


def test_47_user_tags_fit_ec2s_limit_with_detoxs_own() -> None:
    cfg = ec2_cfg("ami=ami-0123456789abcdef0", "tags={" + ", ".join(f"k{i}: v" for i in range(47)) + "}")
    cluster.check_config(cfg, "launch")
    for role in cluster.ROLES:
        assert {len(spec["Tags"]) for spec in cluster.run_instances_args(cfg, role)["TagSpecifications"]} == {50}


# ------------------------------------------------------------------------------------------------ bad settings

LONG = "a" * 65
BAD = [  # (command, override, the error line after "detox.cluster.ec2: error: ")
    ("terminate", "name=''", "name='': must be 1-64 characters"),
    ("terminate", "name=null", "name=null: must be 1-64 characters"),
    ("terminate", "name=123", "name=123: must be 1-64 characters"),
    ("terminate", "name=true", "name=true: must be 1-64 characters"),
    ("terminate", "name='exp 1'", "name='exp 1': must be 1-64 characters"),
    ("terminate", "name='exé'", "name='exé': must be 1-64 characters"),
    ("terminate", "name=a/b", "name='a/b': must be 1-64 characters"),
    ("terminate", "name=-x", "name='-x': must be 1-64 characters"),
    ("terminate", f"name={LONG}", f"name={LONG!r}: must be 1-64 characters"),
    ("status", f"name={'b' * 300}", f"name={'b' * 40!r}... (300 characters): must be 1-64 characters"),
    ("launch", "wait.delay=abc", "wait.delay='abc': must be an integer from 1 to 3600"),
    ("launch", "wait.delay=0", "wait.delay=0: must be an integer from 1 to 3600"),
    ("launch", "wait.delay=1.5", "wait.delay=1.5: must be an integer from 1 to 3600"),
    ("launch", "wait.max_attempts=-1", "wait.max_attempts=-1: must be an integer from 1 to 10000"),
    ("launch", "workers.count=0", "workers.count=0: must be an integer from 1 to 1000"),
    ("launch", "workers.count=true", "workers.count=true: must be an integer from 1 to 1000"),
    ("launch", "workers.count=100000", "workers.count=100000: must be an integer from 1 to 1000"),
    ("hosts", "workers.slots=zero", "workers.slots='zero': must be an integer from 1 to 1024"),
    ("launch", "workers=3", "workers=3: must be a group of workers.count, workers.instance_type, workers.slots"),
    ("launch", "market=cheap", "market='cheap': choose from spot, on-demand"),
    ("launch", "spot_price=abc", "spot_price='abc': must be null or a price in USD per instance-hour > 0"),
    ("launch", "spot_price=-0.1", "spot_price=-0.1: must be null or a price in USD per instance-hour > 0"),
    ("launch", "spot_price=nan", "spot_price=nan: must be null or a price in USD per instance-hour > 0"),
    ("launch", "ami=null", "ami=null: launch needs an AMI"),
    ("launch", "ami=foo", "ami='foo': must be null or an image id"),
    ("launch", "workers.instance_type=big", "workers.instance_type='big': must be an instance type"),
    ("status", "region=Mars", "region='Mars': must be null (boto3's default region) or a region"),
    ("launch", "availability_zone=eu-west-1a", "availability_zone='eu-west-1a': is not a zone of region=us-west-2"),
    ("launch", "security_groups=sg-0abc", "security_groups='sg-0abc': must be a list of ids (sg-...) or names"),
    ("launch", "subnet_id=net1", "subnet_id='net1': must be null or a subnet id"),
    ("launch", "tags=[a]", "tags=['a']: must be null or a mapping"),
    ("launch", "tags={a: null}", "tags.a=null: must be a text, number or boolean of at most 256 characters"),
    ("launch", "key_name=[a]", "key_name=['a']: must be null or a key pair name"),
    ("launch", "ssh_user='Root Me'", "ssh_user='Root Me': must be a login name"),
    ("terminate", "+color=red", "color: no such setting; the settings are command, name, region"),
    ("hosts", "hostfile=''", "hostfile='': must be a file path"),
    # EC2 allows 50 tags per instance and detox adds 3: 48 user tags used to fail only at RunInstances
    ("launch", "tags={" + ", ".join(f"k{i}: v" for i in range(48)) + "}",
     "tags: 48 tags given; detox adds 3 (Name, detox-cluster, detox-role) and EC2 allows 50 per instance, so at "
     "most 47"),
    ("launch", "tags={Name: mine}", "tags={'Name': 'mine'}: Name, detox-cluster, detox-role are set by detox"),
    ("launch", "tags={detox-cluster: other}", "tags={'detox-cluster': 'other'}: Name, detox-cluster, detox-role are "
                                              "set by detox"),
    ("launch", "tags={detox-role: worker}", "tags={'detox-role': 'worker'}: Name, detox-cluster, detox-role are"),
    ("launch", f"tags={{{'k' * 129}: v}}", "tags={'kkkkkkkk"),  # key over 128 characters (refused before, too)
    ("launch", f"tags={{k: {'v' * 257}}}", "tags.k='vvvvvvvv"),  # value over 256 characters (refused before, too)
]


@pytest.mark.parametrize(("command", "override", "message"), BAD, ids=[o[:30] for _, o, _ in BAD])
def test_bad_setting_is_one_line_before_any_aws_call(command: str, override: str, message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    extra = ["ami=ami-0123456789abcdef0"] if command == "launch" and not override.startswith("ami=") else []
    assert cluster.run(command, ec2_cfg(*extra, override), NoAws()) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"detox.cluster.ec2: error: {message}")


def test_hostfile_path_is_checked_before_any_aws_call(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for path, message in [(tmp_path, f"is a folder; name a file in it, e.g. {tmp_path / 'hosts_address'}"),
                          (tmp_path / "missing" / "hosts", f"folder '{tmp_path / 'missing'}' does not exist"),
                          (f"{tmp_path}/new/", "names a folder; name a file in it")]:
        assert cluster.run("hosts", ec2_cfg(f"hostfile={path}"), NoAws()) == 2
        assert one_error_line(capsys.readouterr().err).startswith(f"detox.cluster.ec2: error: hostfile="
                                                                  f"{str(path)!r}: {message}")
    assert sorted(tmp_path.iterdir()) == []  # nothing created


def test_cli_refuses_bad_input_with_one_line(aws_env: None, tmp_path: Path) -> None:
    """As a user types it; the endpoint is a closed port, so an AWS call would fail differently (exit 1)."""
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    cases = [
        (["terminate", "name=exp*"], "name='exp*': must be 1-64 characters"),
        (["hosts", f"hostfile={tmp_path}"], f"hostfile={str(tmp_path)!r}: is a folder"),
        (["hosts", f"hostfile={tmp_path}/no/hosts"], f"hostfile='{tmp_path}/no/hosts': folder '{tmp_path}/no' does"),
        (["launch", "ami=ami-0123456789abcdef0", "wait.delay=abc"], "wait.delay='abc': must be an integer"),
        (["status", "workers.cont=3"], "workers.cont: no such setting"),
        (["terminate", "name=é"], "'name=é': not a key=value setting"),
        # a sweep ran only its first job (each job exits) and wrote a multirun/ folder here
        (["terminate", "name=b1,sp", "-m"], "-m/--multirun: terminate runs once per call"),
        (["status", "--multi", "name=b1,sp"], "-m/--multirun: status runs once per call"),
        (["hosts", "hydra.mode=MULTIRUN", "--info"], "-m/--multirun: hosts runs once per call"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "detox.cluster.ec2", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert one_error_line(proc.stderr).startswith(f"detox.cluster.ec2: error: {message}"), args
    assert [p.name for p in tmp_path.iterdir()] == ["aws-empty"]  # aws_env's; no hostfile, no multirun/ folder


# ------------------------------------------------------------------------------------------------ hostfile writes


def test_write_hostfile_refuses_folders_and_missing_parents(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        write_hostfile(tmp_path, ["10.0.0.1"], [1])
    with pytest.raises(ValueError, match="does not exist"):
        write_hostfile(tmp_path / "missing" / "hosts", ["10.0.0.1"], [1])
    assert sorted(tmp_path.iterdir()) == []


def test_write_hostfile_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_hostfile(tmp_path / "hosts", ["10.0.0.1"], [1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable like a plain file, not mkstemp's 0600
    path.chmod(0o600)

    def broken_replace(src: str, dst: str) -> None:  # the disk fills or the process dies before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        write_hostfile(path, ["10.0.0.2", "10.0.0.3"], [1, 2])
    assert path.read_text() == "10.0.0.1 slots=1\n"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]  # no temporary file left behind
    monkeypatch.undo()
    write_hostfile(path, ["10.0.0.2", "10.0.0.3"], [1, 2])
    assert path.read_text() == "10.0.0.2 slots=1\n10.0.0.3 slots=2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a replaced file keeps its mode
