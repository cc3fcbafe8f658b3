"""An EC2 cluster for ``engine=mpi``: ``python -m detox.cluster.ec2 launch|status|hosts|terminate [key=value ...]``.

Configured by ``conf/cluster/ec2.yaml`` (Hydra: any key can be overridden on the command line). Every instance is
tagged ``detox-cluster=<name>`` and ``detox-role=ps|worker``; each command acts on exactly the instances carrying
its cluster's tag, so several clusters (and unrelated instances) can share an account and region.

* ``launch``: one PS instance and ``workers.count`` worker instances (spot or on-demand), then waits until they
  run. A cluster that already has live instances is reported, not launched twice.
* ``status``: one line per instance: id, role, state, type, private IP, public IP.
* ``hosts``: the MPI hostfile (PS private IP first, one slot; each worker ``workers.slots``) at ``hostfile``.
* ``terminate``: terminates the cluster's instances and cancels its open spot requests.

The client is created with only ``region_name``: credentials, profiles and ``AWS_ENDPOINT_URL`` resolve through
boto3's standard chain, so the same commands run against a local moto server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import hydra
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    WaiterError,
)
from omegaconf import DictConfig

from detox.cluster.hostfile import write_hostfile

PROG = "detox.cluster.ec2"
TAG_CLUSTER, TAG_ROLE = "detox-cluster", "detox-role"
ROLES = ("ps", "worker")
# states of an instance that still exists (and may bill); shutting-down/terminated ones are gone
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
ALL_STATES = [*LIVE_STATES, "shutting-down", "terminated"]
MARKETS = ("spot", "on-demand")
# ClientError codes that mean "these credentials are not accepted", not "the request was wrong"
AUTH_CODES = ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
              "ExpiredToken", "RequestExpired", "OptInRequired")
USAGE = f"usage: python -m {PROG} {{launch,status,hosts,terminate}} [key=value ...]  (keys: conf/cluster/ec2.yaml)"
NO_CREDENTIALS = ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, run 'aws configure', "
                  "or name a profile with AWS_PROFILE)")


class ClusterError(Exception):
    """A problem the user fixes from the message alone: printed as one line, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ queries


def _tag(instance: dict, key: str) -> str | None:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def cluster_instances(ec2: Any, name: str, states: list[str] = LIVE_STATES) -> list[dict]:
    """The instances tagged ``detox-cluster=<name>`` in ``states``: PS first, then workers by launch index, id."""
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]},
        {"Name": "instance-state-name", "Values": states},
    ])
    found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    order = {role: k for k, role in enumerate(ROLES)}
    return sorted(found, key=lambda i: (order.get(_tag(i, TAG_ROLE), len(ROLES)), i.get("AmiLaunchIndex", 0),
                                        i["InstanceId"]))


def _line(instance: dict) -> str:
    return "  ".join([
        f"{instance['InstanceId']:<19}", f"{_tag(instance, TAG_ROLE) or '-':<6}", f"{instance['State']['Name']:<13}",
        f"{instance.get('InstanceType', '-'):<12}", f"{instance.get('PrivateIpAddress') or '-':<15}",
        instance.get("PublicIpAddress") or "-",
    ])


def _print_instances(instances: list[dict]) -> None:
    for instance in instances:
        print(_line(instance))


# ------------------------------------------------------------------------------------------------ launch


def _check_launch_config(cfg: DictConfig) -> None:
    if not cfg.ami:
        raise ClusterError("ami=null: launch needs an AMI with this repository installed, e.g. "
                           "ami=ami-0123456789abcdef0 (build one from a configured instance; AMIs are per region)", 2)
    if cfg.market not in MARKETS:
        raise ClusterError(f"market={cfg.market!r}: choose from {', '.join(MARKETS)}", 2)
    count = cfg.workers.count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ClusterError(f"workers.count={count!r}: must be an integer >= 1", 2)


def _check_ami(ec2: Any, cfg: DictConfig) -> None:
    """Fail before anything is started (moto, unlike EC2, would start instances from any AMI id)."""
    try:
        images = ec2.describe_images(ImageIds=[str(cfg.ami)])["Images"]
    except ClientError as err:
        if not err.response["Error"]["Code"].startswith("InvalidAMIID"):
            raise
        images = []
    if not images:
        raise _unknown_ami(cfg)


def _unknown_ami(cfg: DictConfig) -> ClusterError:
    return ClusterError(f"ami={cfg.ami}: no such image in region {cfg.region} (AMIs are per region: copy the image "
                        f"there or set region=...)", 2)


def run_instances_args(cfg: DictConfig, role: str) -> dict[str, Any]:
    """The ``run_instances`` arguments for the PS (``role='ps'``) or the workers."""
    group = cfg.ps if role == "ps" else cfg.workers
    count = 1 if role == "ps" else int(cfg.workers.count)
    tags = {**{str(k): str(v) for k, v in (cfg.tags or {}).items()},
            "Name": f"{cfg.name}-{role}", TAG_CLUSTER: str(cfg.name), TAG_ROLE: role}  # ours win over user tags
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    resources = ["instance", "volume"] + (["spot-instances-request"] if cfg.market == "spot" else [])
    # MinCount = MaxCount: all of a role's instances or none, never a partial cluster
    args: dict[str, Any] = {
        "ImageId": str(cfg.ami), "InstanceType": str(group.instance_type), "MinCount": count, "MaxCount": count,
        "TagSpecifications": [{"ResourceType": r, "Tags": tag_list} for r in resources],
    }
    if cfg.market == "spot":
        options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if cfg.spot_price is not None:
            options["MaxPrice"] = str(cfg.spot_price)
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    if cfg.key_name:
        args["KeyName"] = str(cfg.key_name)
    groups = [str(g) for g in cfg.security_groups or []]
    if groups:  # ids work everywhere, names only in the default VPC: accept both
        ids = [g for g in groups if g.startswith("sg-")]
        names = [g for g in groups if not g.startswith("sg-")]
        if ids:
            args["SecurityGroupIds"] = ids
        if names:
            args["SecurityGroups"] = names
    if cfg.subnet_id:
        args["SubnetId"] = str(cfg.subnet_id)
    if cfg.availability_zone:
        args["Placement"] = {"AvailabilityZone": str(cfg.availability_zone)}
    return args


def launch(cfg: DictConfig, ec2: Any) -> int:
    existing = cluster_instances(ec2, cfg.name)
    if existing:
        print(f"cluster {cfg.name!r} already has {len(existing)} instance(s) in {cfg.region}; not launching more "
              f"(terminate it first to start over):")
        _print_instances(existing)
        return 0
    _check_launch_config(cfg)
    _check_ami(ec2, cfg)
    started: list[str] = []
    try:
        for role in ROLES:
            args = run_instances_args(cfg, role)
            reply = ec2.run_instances(**args)
            started += [i["InstanceId"] for i in reply["Instances"]]
            print(f"requested {len(reply['Instances'])} {cfg.market} {role} instance(s) ({args['InstanceType']})")
    except Exception:
        # the workers failed after the PS started (capacity, spot price, limits): leave no half cluster billing
        if started:
            print(f"launch failed: terminating the {len(started)} instance(s) already started: {' '.join(started)}",
                  file=sys.stderr)
            try:
                ec2.terminate_instances(InstanceIds=started)
            except Exception:  # report the launch failure, not the clean-up's; `terminate` can finish the job
                print(f"could not terminate them; run: python -m {PROG} terminate name={cfg.name}", file=sys.stderr)
        raise
    print(f"waiting until {len(started)} instance(s) run ...")
    ec2.get_waiter("instance_running").wait(
        InstanceIds=started, WaiterConfig={"Delay": cfg.wait.delay, "MaxAttempts": cfg.wait.max_attempts})
    instances = cluster_instances(ec2, cfg.name)
    _print_instances(instances)
    ps = next((i for i in instances if _tag(i, TAG_ROLE) == "ps"), None)
    if ps is not None and ps.get("PublicIpAddress"):
        print(f"next: python -m {PROG} hosts name={cfg.name} workers.slots={cfg.workers.slots}, copy {cfg.hostfile} "
              f"to the PS ({cfg.ssh_user}@{ps['PublicIpAddress']}) and run detox there")
    return 0


# ------------------------------------------------------------------------------------------------ others


def status(cfg: DictConfig, ec2: Any) -> int:
    instances = cluster_instances(ec2, cfg.name, ALL_STATES)
    if not instances:
        print(f"cluster {cfg.name!r}: no instances in {cfg.region}")
    _print_instances(instances)
    return 0


def hosts(cfg: DictConfig, ec2: Any) -> int:
    """Write the hostfile: the PS's private IP first with one slot, then each worker with ``workers.slots``."""
    live = cluster_instances(ec2, cfg.name)
    if not live:
        raise ClusterError(f"cluster {cfg.name!r}: no instances in {cfg.region}; launch it first")
    waiting = [i["InstanceId"] for i in live if i["State"]["Name"] != "running"]
    if waiting:
        raise ClusterError(f"cluster {cfg.name!r}: {len(waiting)} instance(s) not running yet ({', '.join(waiting)}); "
                           f"try again when `status` shows them running")
    ps = [i for i in live if _tag(i, TAG_ROLE) == "ps"]
    workers = [i for i in live if _tag(i, TAG_ROLE) == "worker"]
    if len(ps) != 1 or not workers:
        raise ClusterError(f"cluster {cfg.name!r}: needs exactly one PS and at least one worker instance, found "
                           f"{len(ps)} PS and {len(workers)} worker(s)")
    slots = cfg.workers.slots
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ClusterError(f"workers.slots={slots!r}: must be an integer >= 1", 2)
    ips = [i.get("PrivateIpAddress") for i in ps + workers]
    if not all(ips):
        raise ClusterError(f"cluster {cfg.name!r}: an instance has no private IP yet; try again")
    path = write_hostfile(Path(str(cfg.hostfile)).expanduser(), ips, [1] + [slots] * len(workers))
    ranks = len(workers) * slots
    print(f"wrote {path}: PS {ips[0]} + {len(workers)} worker host(s) x {slots} slot(s) = {ranks} worker ranks")
    print(f"on the PS: python -m detox.train engine=mpi engine.hostfile={path.name} workers={ranks}")
    return 0


def terminate(cfg: DictConfig, ec2: Any) -> int:
    """Terminate exactly the cluster's instances; cancel its open spot requests (tagged or linked to them)."""
    instances = cluster_instances(ec2, cfg.name)
    requests = ec2.describe_spot_instance_requests(Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [str(cfg.name)]},
        {"Name": "state", "Values": ["open", "active"]},
    ])["SpotInstanceRequests"]
    linked = sorted({i["SpotInstanceRequestId"] for i in instances if i.get("SpotInstanceRequestId")})
    if linked:  # a filter, not SpotInstanceRequestIds=: an already-gone request must not make this fail
        requests += ec2.describe_spot_instance_requests(Filters=[
            {"Name": "spot-instance-request-id", "Values": linked},
            {"Name": "state", "Values": ["open", "active"]},
        ])["SpotInstanceRequests"]
    request_ids = sorted({r["SpotInstanceRequestId"] for r in requests})
    if request_ids:  # first, so that no open request starts a new instance after the terminate
        ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=request_ids)
        print(f"cancelled {len(request_ids)} spot request(s): {' '.join(request_ids)}")
    ids = [i["InstanceId"] for i in instances]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)
        print(f"terminating {len(ids)} instance(s) of cluster {cfg.name!r}: {' '.join(ids)}")
    elif not request_ids:
        print(f"cluster {cfg.name!r}: nothing to terminate in {cfg.region}")
    return 0


COMMANDS: dict[str, Callable[[DictConfig, Any], int]] = {
    "launch": launch, "status": status, "hosts": hosts, "terminate": terminate,
}


# ------------------------------------------------------------------------------------------------ entry


def _client_error(err: Exception, cfg: DictConfig) -> ClusterError:
    code = err.response.get("Error", {}).get("Code", "")  # type: ignore[attr-defined]
    message = err.response.get("Error", {}).get("Message", str(err))  # type: ignore[attr-defined]
    if code.startswith("InvalidAMIID"):
        return _unknown_ami(cfg)
    if code in AUTH_CODES:
        return ClusterError(f"AWS refused the credentials ({code}: {message})", 2)
    return ClusterError(f"{err.operation_name}: {code}: {message}")  # type: ignore[attr-defined]


def run(command: str, cfg: DictConfig, ec2: Any = None) -> int:
    """Run one command; user-facing failures become one line on stderr and the returned exit code."""
    try:
        if command not in COMMANDS:
            raise ClusterError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}", 2)
        if ec2 is None:
            ec2 = boto3.client("ec2", region_name=cfg.region)
        return COMMANDS[command](cfg, ec2)
    except ClusterError as err:
        problem = err
    except (NoCredentialsError, PartialCredentialsError):
        problem = ClusterError(NO_CREDENTIALS, 2)
    except ProfileNotFound as err:
        problem = ClusterError(f"{err} (check AWS_PROFILE and ~/.aws/config)", 2)
    except NoRegionError:
        problem = ClusterError("region=null: set region=..., e.g. region=us-west-2", 2)
    except EndpointConnectionError as err:
        problem = ClusterError(f"cannot reach the EC2 endpoint {err.kwargs.get('endpoint_url')} "
                               f"(network, region={cfg.region} or AWS_ENDPOINT_URL)")
    except WaiterError as err:
        problem = ClusterError(f"{err}; see `status`, or raise wait.max_attempts")
    except ClientError as err:
        problem = _client_error(err, cfg)
    except BotoCoreError as err:
        problem = ClusterError(str(err))
    print(f"{PROG}: error: {problem}", file=sys.stderr)
    return problem.code


@hydra.main(version_base="1.3", config_path="../../conf/cluster", config_name="ec2")
def _hydra_main(cfg: DictConfig) -> None:
    sys.exit(run(str(cfg.command), cfg))


def main(argv: list[str] | None = None) -> None:
    """``launch|status|hosts|terminate`` first, then Hydra overrides (``name=exp1 workers.count=4``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{PROG}: error: {got}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    # Hydra parses sys.argv: the command becomes the `command` key, the rest stay overrides
    sys.argv = [sys.argv[0], *argv[1:], f"command={argv[0]}"]
    _hydra_main()


if __name__ == "__main__":
    main()
