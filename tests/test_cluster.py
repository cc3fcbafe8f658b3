"""Cluster tooling: the EC2 CLI against moto (in-process and a local moto server), hostfiles, Hydra launchers.

No real AWS call anywhere: every test either runs inside ``moto.mock_aws`` or points ``AWS_ENDPOINT_URL`` at a moto
server on 127.0.0.1, with dummy credentials and empty AWS config files.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import ROOT, make_cfg
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from moto import mock_aws
from moto.server import ThreadedMotoServer
from omegaconf import DictConfig

from detox.cluster import ec2 as cluster
from detox.cluster.hostfile import parse_hostfile, write_hostfile
from detox.config import ConfigError, validate

REGION = "us-west-2"
CLUSTER_CONF = ROOT / "conf" / "cluster"


def ec2_cfg(*overrides: str) -> DictConfig:
    """The cluster CLI's config, composed as ``python -m detox.cluster.ec2`` composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CLUSTER_CONF)):
        return compose("ec2", overrides=[f"region={REGION}", "wait.delay=1", "wait.max_attempts=5", *overrides])


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy credentials; no user profile, config file or instance metadata can leak in."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_CONFIG_FILE": str(empty),
           "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def moto_ec2(aws_env: dict[str, str]) -> Iterator[object]:
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def an_ami(ec2) -> str:
    return ec2.describe_images()["Images"][0]["ImageId"]


def live(ec2, **filters: str) -> list[dict]:
    """Non-terminated instances, optionally filtered by tag."""
    flt = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    flt += [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    return [i for r in ec2.describe_instances(Filters=flt)["Reservations"] for i in r["Instances"]]


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ EC2, in-process


def test_life_cycle_in_process(moto_ec2, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ec2 = moto_ec2
    hostfile = tmp_path / "hosts_address"
    cfg = ec2_cfg("name=exp1", f"ami={an_ami(ec2)}", "workers.count=3", "workers.slots=2", "market=on-demand",
                  "availability_zone=us-west-2b", "tags={owner: me}", f"hostfile={hostfile}")

    assert cluster.run("launch", cfg) == 0
    instances = live(ec2, **{"detox-cluster": "exp1"})
    assert len(instances) == 4
    assert sorted(tags(i)["detox-role"] for i in instances) == ["ps", "worker", "worker", "worker"]
    assert all(i["State"]["Name"] == "running" for i in instances)
    assert all(i["Placement"]["AvailabilityZone"] == "us-west-2b" for i in instances)
    assert all(tags(i)["owner"] == "me" and tags(i)["Name"] in ("exp1-ps", "exp1-worker") for i in instances)
    assert all("InstanceLifecycle" not in i for i in instances)  # on-demand
    capsys.readouterr()

    assert cluster.run("status", cfg) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    ps = next(i for i in instances if tags(i)["detox-role"] == "ps")
    assert lines[0].split()[:5] == [ps["InstanceId"], "ps", "running", "m5.2xlarge", ps["PrivateIpAddress"]]

    assert cluster.run("hosts", cfg) == 0
    entries = parse_hostfile(hostfile)
    workers = {i["PrivateIpAddress"] for i in instances if tags(i)["detox-role"] == "worker"}
    assert entries[0] == (ps["PrivateIpAddress"], 1)  # the PS first, one slot
    assert {h for h, _ in entries[1:]} == workers and all(n == 2 for _, n in entries[1:])
    assert "workers=6" in capsys.readouterr().out  # the detox command to run on the PS

    assert cluster.run("terminate", cfg) == 0
    assert live(ec2, **{"detox-cluster": "exp1"}) == []
    capsys.readouterr()
    assert cluster.run("status", cfg) == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()] == ["terminated"] * 4
    assert cluster.run("hosts", cfg) == 1  # nothing left to write


def test_launch_is_idempotent(moto_ec2, capsys: pytest.CaptureFixture) -> None:
    cfg = ec2_cfg("name=twice", f"ami={an_ami(moto_ec2)}", "workers.count=2")
    assert cluster.run("launch", cfg) == 0
    capsys.readouterr()
    assert cluster.run("launch", cfg) == 0
    out = capsys.readouterr().out
    assert "cluster 'twice' already has 3 instance(s)" in out and "not launching" in out
    assert len(live(moto_ec2, **{"detox-cluster": "twice"})) == 3  # not doubled


def test_spot_launch(moto_ec2) -> None:
    requests: list[dict] = []
    moto_ec2.meta.events.register("provide-client-params.ec2.RunInstances",
                                  lambda params, **_: requests.append(dict(params)))
    cfg = ec2_cfg("name=cheap", f"ami={an_ami(moto_ec2)}", "workers.count=2", "market=spot", "spot_price=0.15",
                  "workers.instance_type=c5.xlarge", "key_name=mykey")
    moto_ec2.create_key_pair(KeyName="mykey")
    assert cluster.run("launch", cfg, moto_ec2) == 0
    assert [r["MaxCount"] for r in requests] == [1, 2]
    for r in requests:
        assert r["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
            "MaxPrice": "0.15", "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        assert {s["ResourceType"] for s in r["TagSpecifications"]} == {"instance", "volume", "spot-instances-request"}
        assert r["KeyName"] == "mykey"
    instances = live(moto_ec2, **{"detox-cluster": "cheap"})
    assert len(instances) == 3 and all(i.get("InstanceLifecycle") == "spot" for i in instances)
    assert sorted(i["InstanceType"] for i in instances) == ["c5.xlarge", "c5.xlarge", "m5.2xlarge"]


def test_failed_worker_launch_leaves_no_half_cluster(moto_ec2, capsys: pytest.CaptureFixture) -> None:
    class NoWorkerCapacity:  # EC2 as it answers when the workers' type has no capacity left
        def __getattr__(self, name: str):
            return getattr(moto_ec2, name)

        def run_instances(self, **args):
            if {"Key": "detox-role", "Value": "worker"} in args["TagSpecifications"][0]["Tags"]:
                raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity"}},
                                  "RunInstances")
            return moto_ec2.run_instances(**args)

    cfg = ec2_cfg("name=half", f"ami={an_ami(moto_ec2)}")
    assert cluster.run("launch", cfg, NoWorkerCapacity()) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("launch failed: terminating the 1 instance(s) already started")
    assert err[1:] == ["detox.cluster.ec2: error: RunInstances: InsufficientInstanceCapacity: no capacity"]
    assert live(moto_ec2) == []  # the PS that did start was terminated again


def test_terminate_leaves_other_instances(moto_ec2) -> None:
    ec2 = moto_ec2
    ami = an_ami(ec2)
    untagged = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert cluster.run("launch", ec2_cfg("name=other", f"ami={ami}", "workers.count=1")) == 0
    cfg = ec2_cfg("name=mine", f"ami={ami}", "workers.count=2")
    assert cluster.run("launch", cfg) == 0

    def spot_request(name: str) -> str:  # an open spot request left behind, tagged with a cluster name
        reply = ec2.request_spot_instances(
            SpotPrice="0.1", InstanceCount=1, LaunchSpecification={"ImageId": ami, "InstanceType": "c5.xlarge"},
            TagSpecifications=[{"ResourceType": "spot-instances-request",
                                "Tags": [{"Key": "detox-cluster", "Value": name}]}])
        return reply["SpotInstanceRequests"][0]["SpotInstanceRequestId"]

    mine_request, other_request = spot_request("mine"), spot_request("other")

    assert cluster.run("terminate", cfg) == 0
    assert live(ec2, **{"detox-cluster": "mine"}) == []
    assert {i["InstanceId"] for i in live(ec2)} >= {untagged}
    assert len(live(ec2, **{"detox-cluster": "other"})) == 2
    open_requests = {r["SpotInstanceRequestId"] for r in ec2.describe_spot_instance_requests(
        Filters=[{"Name": "state", "Values": ["open", "active"]}])["SpotInstanceRequests"]}
    assert other_request in open_requests and mine_request not in open_requests
    assert cluster.run("terminate", cfg) == 0  # again: nothing left, still fine


def test_unknown_ami_is_one_line(moto_ec2, capsys: pytest.CaptureFixture) -> None:
    assert cluster.run("launch", ec2_cfg("name=bad", "ami=ami-00000000deadbeef")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == ("detox.cluster.ec2: error: ami=ami-00000000deadbeef: no such image in region us-west-2 "
                    "(AMIs are per region: copy the image there or set region=...)")
    assert live(moto_ec2) == []  # nothing started
    assert cluster.run("launch", ec2_cfg("name=bad")) == 2  # no AMI at all
    assert "ami=null: launch needs an AMI" in one_error_line(capsys.readouterr().err)


def test_missing_credentials_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty))
    proc = subprocess.run([sys.executable, "-m", "detox.cluster.ec2", "status", "name=x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"detox.cluster.ec2: error: {cluster.NO_CREDENTIALS}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aws-empty"]  # no outputs/ or log file from Hydra


# ------------------------------------------------------------------------------------------------ EC2, moto server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_life_cycle_against_moto_server(aws_env: dict[str, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI as a user runs it, with boto3's own endpoint resolution (AWS_ENDPOINT_URL) to a local server."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        ec2 = boto3.client("ec2", region_name=REGION)
        ami = an_ami(ec2)

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "detox.cluster.ec2", *args, f"region={REGION}",
                                   "wait.delay=1"], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                                  text=True, timeout=120)

        bad = cli("launch", "name=srv", "ami=ami-0000000000000000f")
        assert bad.returncode == 2 and "ami=ami-0000000000000000f: no such image" in one_error_line(bad.stderr)

        assert cli("launch", "name=srv", f"ami={ami}", "workers.count=2").returncode == 0
        assert len(live(ec2, **{"detox-cluster": "srv"})) == 3
        again = cli("launch", "name=srv", f"ami={ami}", "workers.count=2")
        assert again.returncode == 0 and "already has 3 instance(s)" in again.stdout
        status = cli("status", "name=srv")
        assert status.returncode == 0 and len(status.stdout.splitlines()) == 3
        assert cli("hosts", "name=srv").returncode == 0
        hostfile = tmp_path / "hosts_address"  # the default name, in the working directory
        entries = parse_hostfile(hostfile)
        assert [n for _, n in entries] == [1, 1, 1]
        ps = live(ec2, **{"detox-role": "ps", "detox-cluster": "srv"})[0]
        assert entries[0][0] == ps["PrivateIpAddress"]
        validate(make_cfg(["engine=mpi", f"engine.hostfile={hostfile}", "workers=2", "worker_fail=0",
                           "approach=baseline", "mode=mean"]))  # engine=mpi accepts it
        assert cli("terminate", "name=srv").returncode == 0
        assert live(ec2, **{"detox-cluster": "srv"}) == []
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ hostfiles


def test_hostfile_round_trip(tmp_path: Path) -> None:
    path = write_hostfile(tmp_path / "hosts", ["10.0.0.1", "10.0.0.2", "node3"], [1, 4, 4])
    assert path.read_text() == "10.0.0.1 slots=1\n10.0.0.2 slots=4\nnode3 slots=4\n"
    assert parse_hostfile(path) == [("10.0.0.1", 1), ("10.0.0.2", 4), ("node3", 4)]
    path.write_text("# PS first\n\n10.0.0.1 slots=1   # the PS\n  10.0.0.2 slots=2 max_slots=4\n10.0.0.3\n")
    assert parse_hostfile(path) == [("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 1)]  # bare host: one slot
    path.write_text("ip-10-0-0-1.ec2.internal\nfe80::1 slots=2\n::1\nn\nnode_7\n")
    assert parse_hostfile(path) == [("ip-10-0-0-1.ec2.internal", 1), ("fe80::1", 2), ("::1", 1), ("n", 1),
                                    ("node_7", 1)]


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1 slots=1\n10.0.0.2 slots=two\n", "line 2 '10.0.0.2 slots=two': slots='two' must be an integer >= 1"),
    ("10.0.0.1 slots=0\n", "line 1 '10.0.0.1 slots=0': slots='0' must be an integer >= 1"),
    ("10.0.0.1 cores=4\n", "line 1 '10.0.0.1 cores=4': unknown option 'cores=4' (expected slots=<n>)"),
    ("slots=4\n", "line 1 'slots=4': the line must start with a host name"),
    ("# nothing\n\n", "no hosts in the file"),
    # a host is an argument of ssh/scp/mpiexec: anything that could read as an option is refused
    ("-F/tmp/evil slots=1\n", "line 1 '-F/tmp/evil slots=1': '-F/tmp/evil' is not a host name or an IP address"),
    ("-oProxyCommand\n", "line 1 '-oProxyCommand': '-oProxyCommand' is not a host name or an IP address"),
    ("node;rm\n", "line 1 'node;rm': 'node;rm' is not a host name or an IP address"),
    ("node-\n", "line 1 'node-': 'node-' is not a host name or an IP address"),
])
def test_malformed_hostfile(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hostfile(path)
    with pytest.raises(ConfigError, match=re.escape(f"engine.hostfile='{path}': {message}")):
        validate(make_cfg(["engine=mpi", f"engine.hostfile={path}"]))


def test_engine_mpi_checks_hostfile_slots(tmp_path: Path) -> None:
    path = write_hostfile(tmp_path / "hosts", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], [1, 4, 4])
    tight = ["engine=mpi", f"engine.hostfile={path}", "engine.launcher_args=[]"]
    validate(make_cfg([*tight, "workers=8", "worker_fail=1", "approach=baseline"]))  # 9 slots >= 9 ranks
    with pytest.raises(ConfigError, match=re.escape(f"engine.hostfile='{path}': 9 slots on 3 hosts for 10 ranks "
                                                    "(workers=9 + the PS)")):
        validate(make_cfg([*tight, "workers=9", "worker_fail=1"]))
    validate(make_cfg(["engine=mpi", f"engine.hostfile={path}", "workers=9", "worker_fail=1"]))  # oversubscribe
    with pytest.raises(ConfigError, match="no such file"):
        validate(make_cfg(["engine=mpi", f"engine.hostfile={tmp_path / 'missing'}"]))


def test_write_hostfile_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 hosts but 1 slot counts"):
        write_hostfile(tmp_path / "h", ["a", "b"], [1])
    with pytest.raises(ValueError, match="slots=0 must be an integer >= 1"):
        write_hostfile(tmp_path / "h", ["a"], [0])


# ------------------------------------------------------------------------------------------------ Hydra launchers


def test_slurm_launcher_config_composes() -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=cpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.detox_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.cpus_per_task, launcher.timeout_min) == ("cpu", 4, 240)
    assert cfg.hydra.callbacks.summary._target_ == "detox.results.SweepSummary"  # summary.jsonl on Slurm too
    slurm = instantiate(launcher)  # the plugin accepts every key (no Slurm needed to construct it)
    assert type(slurm).__name__ == "SlurmLauncher" and slurm.params["partition"] == "cpu"


@pytest.mark.slow
def test_local_parallel_launcher_runs_jobs_in_separate_processes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    pid = "hydra.job_logging.formatters.simple.format='pid=%(process)d %(message)s'"  # which process ran each job
    proc = subprocess.run(
        [sys.executable, "-m", "detox.train", "-m", "hydra/launcher=local_parallel", "seed=0,1", "max_steps=3",
         "eval_freq=3", "workers=9", "worker_fail=1", "threads=1", f"hydra.sweep.dir={sweep}", pid],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Launching 2 jobs locally, 2 at a time" in proc.stdout + proc.stderr
    summaries = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(s["status"], s["seed"]) for s in summaries] == [("completed", 0), ("completed", 1)]
    pids = [set(re.findall(r"pid=(\d+)", (Path(s["dir"]) / "train.log").read_text())) for s in summaries]
    assert all(len(p) == 1 for p in pids), pids
    assert pids[0] != pids[1]  # two job processes (the basic launcher runs both in the driver)
