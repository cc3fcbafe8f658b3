"""An EC2 cluster for ``engine=mpi``: ``python -m detox.cluster.ec2 launch|status|hosts|terminate [key=value ...]``.

Configured by ``conf/cluster/ec2.yaml`` (Hydra: any key can be overridden on the command line). Every instance is
tagged ``detox-cluster=<name>`` and ``detox-role=ps|worker``; each command acts on exactly the instances carrying
its cluster's tag, so several clusters (and unrelated instances) can share an account and region.

Every setting is checked before the first AWS call (one line, exit 2). A cluster name is 1-64 characters from
``A-Z a-z 0-9 . _ -``, starting with a letter or digit: EC2 tag filters read ``*`` and ``?`` as wildcards, so a
name like ``exp*`` would select other clusters. As a second guard every command keeps only the instances and spot
requests whose tag equals the name exactly (``owned``), whatever the server-side filter returned.

* ``launch``: one PS instance and ``workers.count`` worker instances (spot or on-demand), then waits until they
  run. A cluster that already has live instances is reported, not launched twice; of two launches of one name
  started at the same time, the one whose PS started later takes back what it started (exit 1).
* ``status``: one line per instance: id, role, state, type, private IP, public IP.
* ``hosts``: the MPI hostfile (PS private IP first, one slot; each worker ``workers.slots``) at ``hostfile``.
* ``terminate``: terminates the cluster's instances and cancels its open spot requests.

The client is created with only ``region_name``: credentials, profiles and ``AWS_ENDPOINT_URL`` resolve through
boto3's standard chain, so the same commands run against a local moto server.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
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
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detox.cluster.hostfile import hostfile_problem, write_hostfile

PROG = "detox.cluster.ec2"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "cluster"
TAG_CLUSTER, TAG_ROLE = "detox-cluster", "detox-role"
OWN_TAGS = ("Name", TAG_CLUSTER, TAG_ROLE)  # the tags launch puts on every instance, besides the user's `tags`
MAX_TAGS = 50  # EC2's limit per resource: more fails as TagLimitExceeded, after the listing calls
ROLES = ("ps", "worker")
# states of an instance that still exists (and may bill); shutting-down/terminated ones are gone
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
ALL_STATES = [*LIVE_STATES, "shutting-down", "terminated"]
MARKETS = ("spot", "on-demand")
# EC2's limits per call: TerminateInstances takes up to 1000 instance ids (and terminates none if the call fails),
# and a describe call at most 200 filter values, all its filters together (FilterLimitExceeded); a cluster may have
# 1001 instances
MAX_IDS, MAX_FILTER_VALUES = 1000, 200
# spot_price: far above any instance type's on-demand price; the bounds keep the price a short decimal string
# ('1e999999999' would otherwise become a billion-digit MaxPrice)
MAX_SPOT_PRICE, SPOT_DECIMALS = Decimal(10000), 8
# ClientError codes that mean "these credentials are not accepted", not "the request was wrong"
AUTH_CODES = ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
              "ExpiredToken", "RequestExpired", "OptInRequired")
USAGE = f"usage: python -m {PROG} {{launch,status,hosts,terminate}} [key=value ...]  (keys: conf/cluster/ec2.yaml)"
# cluster names: no EC2 filter wildcard (* ?), escape (\\), space or non-ASCII; 64 keeps the Name tag
# (<name>-worker) far below EC2's 256-character limit on tag values
NAME_MAX = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = (f"must be 1-{NAME_MAX} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
             f"(commands match the detox-cluster tag exactly; no wildcards)")
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


def owned(resources: Iterable[dict], name: str, untagged: bool = False) -> list[dict]:
    """The instances or spot requests whose ``detox-cluster`` tag equals ``name`` exactly.

    EC2's tag filters match patterns (``*``, ``?``), so what a filter returns is only a candidate list; everything
    that is listed, terminated or cancelled goes through here. ``untagged``: also keep resources without the tag
    (spot requests found through one of the cluster's own instances); one tagged for another cluster never passes.
    """
    keep = {name, None} if untagged else {name}
    return [r for r in resources if _tag(r, TAG_CLUSTER) in keep]


def cluster_instances(ec2: Any, name: str, states: list[str] = LIVE_STATES) -> list[dict]:
    """The instances tagged exactly ``detox-cluster=<name>`` in ``states``: PS first, then workers by launch index."""
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]},
        {"Name": "instance-state-name", "Values": states},
    ])
    found = owned((i for page in pages for r in page["Reservations"] for i in r["Instances"]), name)
    order = {role: k for k, role in enumerate(ROLES)}
    return sorted(found, key=lambda i: (order.get(_tag(i, TAG_ROLE), len(ROLES)), i.get("AmiLaunchIndex", 0),
                                        i["InstanceId"]))


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    """``items`` in slices of at most ``size``: EC2 refuses longer id lists and filters (``MAX_IDS``, ...)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _terminate(ec2: Any, ids: list[str]) -> None:
    for batch in _batches(ids, MAX_IDS):
        ec2.terminate_instances(InstanceIds=batch)


def _cancel_requests(ec2: Any, request_ids: list[str]) -> None:
    for batch in _batches(request_ids, MAX_IDS):
        ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=batch)


def _spot_requests(ec2: Any, filters: list[dict]) -> list[dict]:
    """Every page of ``describe_spot_instance_requests``: EC2 pages its answer (up to 1000 requests a page), and a
    request on a later page must be cancelled too, or it can start an instance after `terminate`."""
    found: list[dict] = []
    token: str | None = None
    while True:
        page = ec2.describe_spot_instance_requests(Filters=filters, **({"NextToken": token} if token else {}))
        found += page["SpotInstanceRequests"]
        token = page.get("NextToken")
        if not token:
            return found


def _line(instance: dict) -> str:
    return "  ".join([
        f"{instance['InstanceId']:<19}", f"{_tag(instance, TAG_ROLE) or '-':<6}", f"{instance['State']['Name']:<13}",
        f"{instance.get('InstanceType', '-'):<12}", f"{instance.get('PrivateIpAddress') or '-':<15}",
        instance.get("PublicIpAddress") or "-",
    ])


def _print_instances(instances: list[dict]) -> None:
    for instance in instances:
        print(_line(instance))


# ------------------------------------------------------------------------------------------------ settings

# every key of conf/cluster/ec2.yaml; a key added with `+key=...` is refused rather than silently ignored
GROUPS: dict[str, tuple[str, ...]] = {"ps": ("instance_type",), "workers": ("count", "instance_type", "slots"),
                                      "wait": ("delay", "max_attempts")}
KEYS = ("command", "name", "region", "availability_zone", "ami", *GROUPS, "market", "spot_price", "key_name",
        "security_groups", "subnet_id", "tags", "ssh_user", "hostfile")
# (low, high) of every integer key; the highs only catch typos (EC2's default quotas stop far below)
INT_RANGES = {"workers.count": (1, 1000), "workers.slots": (1, 1024), "wait.delay": (1, 3600),
              "wait.max_attempts": (1, 10000)}
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
ZONE_RE = re.compile(r"[a-z]{2}(-[a-z0-9]+)+[a-z]")
INSTANCE_TYPE_RE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+")
AMI_RE = re.compile(r"ami-[0-9a-z]{1,40}")
SUBNET_RE = re.compile(r"subnet-[0-9a-z]{1,40}")
SG_ID_RE = re.compile(r"sg-[0-9a-z]{1,40}")
SSH_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
PRINTABLE_RE = re.compile(r"[ -~]+")  # printable ASCII: key pair and security group names


def _show(value: Any) -> str:
    """A value as the user would type it back (null, true, 'text'); long strings cut so the error stays one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and len(value) > 100:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return repr(value).replace("\n", "\\n")


def _bad(key: str, value: Any, allowed: str) -> ClusterError:
    return ClusterError(f"{key}={_show(value)}: {allowed}", 2)


def _string(key: str, value: Any, pattern: re.Pattern, allowed: str, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # Hydra reads name=123 as a number
        raise _bad(key, value, f"{allowed}; Hydra read a number: quote it, e.g. '{key}=\"123\"'")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _bad(key, value, allowed)


def check_name(name: Any) -> str:
    """``name`` if it is a valid cluster name, else a ``ClusterError`` (exit 2) saying what is allowed."""
    _string("name", name, NAME_RE, NAME_RULE, nullable=False)
    if len(name) > NAME_MAX:
        raise _bad("name", name, NAME_RULE)
    return name


def _integer(key: str, value: Any) -> None:
    low, high = INT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(key, value, f"must be an integer from {low} to {high}")


def spot_price(value: Any) -> str | None:
    """The spot max price as EC2 wants it (a plain decimal string), or None; a ``ClusterError`` if not a price."""
    if value is None:
        return None
    allowed = (f"must be null or a price in USD per instance-hour > 0 and at most {MAX_SPOT_PRICE}, with at most "
               f"{SPOT_DECIMALS} decimals, e.g. 0.15")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad("spot_price", value, allowed)
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise _bad("spot_price", value, allowed) from None
    if not price.is_finite() or not 0 < price <= MAX_SPOT_PRICE:
        raise _bad("spot_price", value, allowed)
    # decimals counted from the digits as given (normalize() would round 1e-999999999 to 0 in the default context);
    # trailing zeros do not count: 0.1500000000 is 0.15
    _, digits, exponent = price.as_tuple()
    zeros = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if -(int(exponent) + zeros) > SPOT_DECIMALS:  # 1e-999999999 became a billion-digit string
        raise _bad("spot_price", value, allowed)
    return format(price, "f")  # 1e-05 -> 0.00001: EC2 does not read exponents


def _check_tags(tags: Any) -> None:
    if tags is None:
        return
    if not isinstance(tags, dict):
        raise _bad("tags", tags, "must be null or a mapping, e.g. 'tags={project: detox, owner: me}'")
    if len(tags) > MAX_TAGS - len(OWN_TAGS):
        raise ClusterError(f"tags: {len(tags)} tags given; detox adds {len(OWN_TAGS)} ({', '.join(OWN_TAGS)}) and "
                           f"EC2 allows {MAX_TAGS} per instance, so at most {MAX_TAGS - len(OWN_TAGS)}", 2)
    for key, value in tags.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or key.lower().startswith("aws:"):
            raise _bad("tags", {key: value}, "tag keys are 1-128 characters and may not start with 'aws:'")
        if key in OWN_TAGS:  # launch sets these itself (the cluster's name and role); a user value would be dropped
            raise _bad("tags", {key: value}, f"{', '.join(OWN_TAGS)} are set by detox (cluster name and role); "
                                             f"use another key")
        if isinstance(value, (dict, list)) or value is None or len(str(value)) > 256:
            raise _bad(f"tags.{key}", value, "must be a text, number or boolean of at most 256 characters")


def _check_security_groups(groups: Any) -> None:
    if groups is None:
        return
    if not isinstance(groups, list):  # a bare string would be iterated character by character
        raise _bad("security_groups", groups, "must be a list of ids (sg-...) or names, e.g. security_groups=[sg-0abc]")
    for group in groups:
        if not isinstance(group, str) or not (SG_ID_RE.fullmatch(group) if group.startswith("sg-")
                                              else PRINTABLE_RE.fullmatch(group) and len(group) <= 255):
            raise _bad("security_groups", group, "each entry must be a group id (e.g. sg-0123456789abcdef0) or "
                                                 "a group name (1-255 printable ASCII characters)")


def _check_hostfile(value: Any, command: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _bad("hostfile", value, "must be a file path, e.g. hostfile=hosts_address")
    if command != "hosts":  # only `hosts` writes it; the others print it in hints
        return
    if value.endswith(("/", "\\")):
        raise _bad("hostfile", value, "names a folder; name a file in it, e.g. hostfile=" + value + "hosts_address")
    problem = hostfile_problem(Path(value).expanduser())
    if problem:
        raise _bad("hostfile", value, problem)


def check_config(cfg: DictConfig, command: str) -> None:
    """Refuse any bad setting with one line (a ``ClusterError``, exit 2), before the first AWS call."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ClusterError(f"{_first_line(err)}", 2) from None
    assert isinstance(c, dict)
    for key in c:
        if key not in KEYS:
            raise ClusterError(f"{key}: no such setting; the settings are {', '.join(KEYS)} (conf/cluster/ec2.yaml)",
                               2)
    missing = [k for k in KEYS if k not in c and k != "command"]
    if missing:
        raise ClusterError(f"{missing[0]}: missing; it cannot be deleted (conf/cluster/ec2.yaml)", 2)
    for group, subkeys in GROUPS.items():
        if not isinstance(c[group], dict) or set(c[group]) != set(subkeys):
            raise _bad(group, c[group], f"must be a group of {', '.join(f'{group}.{k}' for k in subkeys)}; "
                                        f"set one with e.g. {group}.{subkeys[0]}=...")
    check_name(c["name"])
    _string("region", c["region"], REGION_RE, "must be null (boto3's default region) or a region, e.g. us-west-2")
    _string("availability_zone", c["availability_zone"], ZONE_RE, "must be null or a zone, e.g. us-west-2b")
    if c["availability_zone"] and c["region"] and not c["availability_zone"].startswith(c["region"]):
        raise _bad("availability_zone", c["availability_zone"], f"is not a zone of region={c['region']}")
    _string("ami", c["ami"], AMI_RE, "must be null or an image id, e.g. ami-0123456789abcdef0")
    if command == "launch" and c["ami"] is None:
        raise ClusterError("ami=null: launch needs an AMI with this repository installed, e.g. "
                           "ami=ami-0123456789abcdef0 (build one from a configured instance; AMIs are per region)", 2)
    for key in ("ps.instance_type", "workers.instance_type"):
        group, sub = key.split(".")
        _string(key, c[group][sub], INSTANCE_TYPE_RE, "must be an instance type, e.g. m5.2xlarge", nullable=False)
    for key in INT_RANGES:
        group, sub = key.split(".")
        _integer(key, c[group][sub])
    if c["market"] not in MARKETS:
        raise _bad("market", c["market"], f"choose from {', '.join(MARKETS)}")
    spot_price(c["spot_price"])
    _string("key_name", c["key_name"], PRINTABLE_RE, "must be null or a key pair name (printable ASCII)")
    if c["key_name"] is not None and len(c["key_name"]) > 255:
        raise _bad("key_name", c["key_name"], "must be at most 255 characters")
    _check_security_groups(c["security_groups"])
    _string("subnet_id", c["subnet_id"], SUBNET_RE, "must be null or a subnet id, e.g. subnet-0123456789abcdef0")
    _check_tags(c["tags"])
    _string("ssh_user", c["ssh_user"], SSH_USER_RE, "must be a login name, e.g. ubuntu", nullable=False)
    _check_hostfile(c["hostfile"], command)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    """``conf/cluster/ec2.yaml`` with the command line's overrides; a bad override is a one-line ``ClusterError``."""
    parser = OverridesParser.create()
    for override in overrides:  # one by one, so that the error names the override Hydra cannot read
        try:
            parser.parse_overrides([override])
        except HydraException as err:
            raise ClusterError(f"{override!r}: not a key=value setting ({_first_line(err)}); quote values with "
                               f"spaces or brackets, e.g. 'tags={{owner: me}}'", 2) from None
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("ec2", overrides=[*overrides, f"command={command}"])
    except (HydraException, OmegaConfBaseException) as err:
        unknown = re.match(r"Could not override '([^']+)'", str(err))
        if unknown:
            raise ClusterError(f"{unknown.group(1)}: no such setting; the settings are {', '.join(KEYS)} and "
                               f"{', '.join(f'{g}.{k}' for g, ks in GROUPS.items() for k in ks)} "
                               f"(conf/cluster/ec2.yaml)", 2) from None
        raise ClusterError(_first_line(err), 2) from None


# ------------------------------------------------------------------------------------------------ launch


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
            "Name": f"{cfg.name}-{role}", TAG_CLUSTER: str(cfg.name), TAG_ROLE: role}  # OWN_TAGS: no user key
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    resources = ["instance", "volume"] + (["spot-instances-request"] if cfg.market == "spot" else [])
    # MinCount = MaxCount: all of a role's instances or none, never a partial cluster
    args: dict[str, Any] = {
        "ImageId": str(cfg.ami), "InstanceType": str(group.instance_type), "MinCount": count, "MaxCount": count,
        "TagSpecifications": [{"ResourceType": r, "Tags": tag_list} for r in resources],
    }
    if cfg.market == "spot":
        options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        price = spot_price(cfg.spot_price)
        if price is not None:
            options["MaxPrice"] = price
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
    _check_ami(ec2, cfg)
    started: list[str] = []
    replies: list[dict] = []  # the PS's reservation first: it places this launch among concurrent ones
    try:
        for role in ROLES:
            args = run_instances_args(cfg, role)
            reply = ec2.run_instances(**args)
            replies.append(reply)
            started += [i["InstanceId"] for i in reply["Instances"]]
            print(f"requested {len(reply['Instances'])} {cfg.market} {role} instance(s) ({args['InstanceType']})")
    except Exception:
        # the workers failed after the PS started (capacity, spot price, limits): leave no half cluster billing
        if started:
            print(f"launch failed: terminating the {len(started)} instance(s) already started: {' '.join(started)}",
                  file=sys.stderr)
            try:
                _terminate(ec2, started)
            except Exception:  # report the launch failure, not the clean-up's; `terminate` can finish the job
                print(f"could not terminate them; run: python -m {PROG} terminate name={cfg.name}", file=sys.stderr)
        raise
    _yield_to_earlier_launch(ec2, cfg, replies)
    print(f"waiting until {len(started)} instance(s) run ...")
    try:
        ec2.get_waiter("instance_running").wait(
            InstanceIds=started, WaiterConfig={"Delay": cfg.wait.delay, "MaxAttempts": cfg.wait.max_attempts})
    except WaiterError:
        _take_back_if_ended(ec2, cfg, replies)
        raise  # still pending: the instances may yet run (see `status`)
    _yield_to_earlier_launch(ec2, cfg, replies)  # again: a rival not yet listed a moment ago is listed now
    instances = cluster_instances(ec2, cfg.name)
    _print_instances(instances)
    ps = next((i for i in instances if _tag(i, TAG_ROLE) == "ps"), None)
    if ps is not None and ps.get("PublicIpAddress"):
        print(f"next: python -m {PROG} hosts name={cfg.name} workers.slots={cfg.workers.slots}, copy {cfg.hostfile} "
              f"to the PS ({cfg.ssh_user}@{ps['PublicIpAddress']}) and run detox there")
    return 0


def _launch_key(instance: dict, reservation: str) -> tuple[Any, str]:
    """A launch's place among concurrent launches of one name: its PS's launch time, then its reservation id."""
    return instance["LaunchTime"], reservation


def _earlier_launch(ec2: Any, name: str, ps_reply: dict) -> str | None:
    """The reservation of another live PS of cluster ``name`` that was launched before ours, or None.

    Every launch of one name runs this after requesting its instances and all order the PSes alike, so of two
    launches that passed the "no instances yet" check together exactly one keeps its instances. Launch time comes
    first: a launch that did not list its rival started first, and so still wins when the rival lists it."""
    ours = _launch_key(ps_reply["Instances"][0], ps_reply["ReservationId"])
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [name]},
        {"Name": f"tag:{TAG_ROLE}", "Values": ["ps"]},
        {"Name": "instance-state-name", "Values": LIVE_STATES},
    ])
    rivals = [_launch_key(i, r["ReservationId"]) for page in pages for r in page["Reservations"]
              for i in owned(r["Instances"], name)
              if _tag(i, TAG_ROLE) == "ps" and r["ReservationId"] != ps_reply["ReservationId"]]
    first = min(rivals, default=None)
    return first[1] if first is not None and first < ours else None


def _take_back(ec2: Any, replies: list[dict]) -> str:
    """Cancel the spot requests and terminate the instances of ``replies`` (this launch's); says what was done."""
    instances = [i for reply in replies for i in reply["Instances"]]
    ids = [i["InstanceId"] for i in instances]
    requests = sorted({i["SpotInstanceRequestId"] for i in instances if i.get("SpotInstanceRequestId")})
    if requests:  # first, so that no request of ours starts a replacement after the terminate
        _cancel_requests(ec2, requests)
    _terminate(ec2, ids)
    return (f"terminated the {len(ids)} instance(s) this launch started: {' '.join(ids)}"
            + (f" and cancelled spot request(s) {' '.join(requests)}" if requests else ""))


def _yield_to_earlier_launch(ec2: Any, cfg: DictConfig, replies: list[dict]) -> None:
    """If a concurrent launch of this name won, take back exactly what this launch started and stop (exit 1)."""
    winner = _earlier_launch(ec2, str(cfg.name), replies[0])
    if winner is None:
        return
    raise ClusterError(f"cluster {cfg.name!r}: a concurrent launch of that name won (its PS, reservation {winner}, "
                       f"started first); {_take_back(ec2, replies)}")


def _take_back_if_ended(ec2: Any, cfg: DictConfig, replies: list[dict]) -> None:
    """After the wait failed: if an instance of this launch has ended (a ``terminate`` of this name ran while it was
    launching, or EC2 took back spot capacity), the cluster can never be whole; without this the rest kept running
    (and billing) while `terminate` had said it was done. Take back all of it and stop (exit 1)."""
    ours = {i["InstanceId"] for reply in replies for i in reply["Instances"]}
    ended = [i["InstanceId"] for i in cluster_instances(ec2, str(cfg.name), ["shutting-down", "terminated"])
             if i["InstanceId"] in ours]
    if ended:
        raise ClusterError(f"cluster {cfg.name!r}: {len(ended)} instance(s) ended while launching ({' '.join(ended)}: "
                           f"a terminate of this name, or spot capacity taken back); {_take_back(ec2, replies)}")


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
    stopped = [i["InstanceId"] for i in live if i["State"]["Name"] in ("stopping", "stopped")]
    if stopped:  # unlike a pending one, a stopped instance never starts by itself: waiting would be forever
        raise ClusterError(f"cluster {cfg.name!r}: {len(stopped)} instance(s) stopped ({', '.join(stopped)}); start "
                           f"them (aws ec2 start-instances --instance-ids {' '.join(stopped)}), or terminate the "
                           f"cluster and launch it again")
    waiting = [i["InstanceId"] for i in live if i["State"]["Name"] != "running"]
    if waiting:
        raise ClusterError(f"cluster {cfg.name!r}: {len(waiting)} instance(s) not running yet ({', '.join(waiting)}); "
                           f"try again when `status` shows them running")
    ps = [i for i in live if _tag(i, TAG_ROLE) == "ps"]
    workers = [i for i in live if _tag(i, TAG_ROLE) == "worker"]
    if len(ps) != 1 or not workers:
        raise ClusterError(f"cluster {cfg.name!r}: needs exactly one PS and at least one worker instance, found "
                           f"{len(ps)} PS and {len(workers)} worker(s)")
    if other := [i["InstanceId"] for i in live if _tag(i, TAG_ROLE) not in ROLES]:  # retagged by hand: not a host
        print(f"warning: cluster {cfg.name!r}: {len(other)} instance(s) without a {TAG_ROLE} tag of "
              f"{' or '.join(ROLES)} left out of the hostfile: {' '.join(other)}", file=sys.stderr)
    slots = int(cfg.workers.slots)
    ips = [i.get("PrivateIpAddress") for i in ps + workers]
    if not all(ips):
        raise ClusterError(f"cluster {cfg.name!r}: an instance has no private IP yet; try again")
    try:  # checked up front too; this catches what changed since (folder removed, permissions)
        path = write_hostfile(Path(str(cfg.hostfile)).expanduser(), ips, [1] + [slots] * len(workers))
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ClusterError(f"hostfile={cfg.hostfile!r}: cannot write it: {reason}", 2) from None
    ranks = len(workers) * slots
    print(f"wrote {path}: PS {ips[0]} + {len(workers)} worker host(s) x {slots} slot(s) = {ranks} worker ranks")
    print(f"on the PS: python -m detox.train engine=mpi engine.hostfile={path.name} workers={ranks}")
    return 0


def terminate(cfg: DictConfig, ec2: Any) -> int:
    """Terminate exactly the cluster's instances; cancel its open spot requests (tagged or linked to them)."""
    instances = cluster_instances(ec2, cfg.name)
    requests = owned(_spot_requests(ec2, [
        {"Name": f"tag:{TAG_CLUSTER}", "Values": [cfg.name]},
        {"Name": "state", "Values": ["open", "active"]},
    ]), cfg.name)
    linked = sorted({i["SpotInstanceRequestId"] for i in instances if i.get("SpotInstanceRequestId")})
    # a filter, not SpotInstanceRequestIds=: an already-gone request must not make this fail; in slices (the limit
    # counts the values of all filters of a call), since a spot cluster of over 200 instances failed here
    # (FilterLimitExceeded) before terminating anything
    states = ["open", "active"]
    for batch in _batches(linked, MAX_FILTER_VALUES - len(states)):
        requests += owned(_spot_requests(ec2, [
            {"Name": "spot-instance-request-id", "Values": batch},
            {"Name": "state", "Values": states},
        ]), cfg.name, untagged=True)
    request_ids = sorted({r["SpotInstanceRequestId"] for r in requests})
    if request_ids:  # first, so that no open request starts a new instance after the terminate
        _cancel_requests(ec2, request_ids)
        print(f"cancelled {len(request_ids)} spot request(s): {' '.join(request_ids)}")
    ids = [i["InstanceId"] for i in instances]
    if ids:  # in slices of 1000: a call with 1001 ids (workers.count=1000 + the PS) terminated none
        _terminate(ec2, ids)
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
        # resolved once: an interpolation (name='${now:%S}') must not change between the check and the calls
        try:
            cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        except OmegaConfBaseException as err:
            raise ClusterError(_first_line(err), 2) from None
        check_config(cfg, command)  # before the client exists: a bad setting never reaches AWS
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


def _multirun(flags: list[str], settings: list[str]) -> bool:
    """Whether Hydra would sweep: ``-m``, ``--multirun`` or an abbreviation (``--multi``, ``-rm``), read by Hydra's
    own parser, or ``hydra.mode=MULTIRUN``. Checked before Hydra starts: it writes the sweep folder first."""
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main uses (hydra-core pinned to 1.3)

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a flag Hydra cannot read: Hydra reports it, once
            multirun = get_args_parser().parse_known_args(flags)[0].multirun
    except SystemExit:
        multirun = False
    return bool(multirun) or any(re.fullmatch(r"\+{0,2}hydra\.mode=['\"]?MULTIRUN['\"]?", s) for s in settings)


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
    command, overrides = argv[0], argv[1:]
    if any(arg.startswith("-") for arg in overrides):  # Hydra's own flags (--cfg job, --info): Hydra runs them
        # Hydra's parser wants its flags before the overrides (key=value, ~key); the command becomes `command`
        settings = [a for a in overrides if not a.startswith("-") and ("=" in a or a.startswith("~"))]
        flags = [a for a in overrides if a not in settings]
        if _multirun(flags, settings):
            print(f"{PROG}: error: -m/--multirun: {command} runs once per call (a sweep would stop after its first "
                  f"job, and write a multirun/ folder); run one command per cluster, e.g. "
                  f"'{command} name=exp1' then '{command} name=exp2'", file=sys.stderr)
            sys.exit(2)
        try:  # the settings as without flags first: Hydra's own refusal of one is several lines and exit 1
            compose_config(command, settings)
        except ClusterError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            sys.exit(err.code)
        sys.argv = [sys.argv[0], *flags, *settings, f"command={command}"]
        _hydra_main()
        return
    try:  # composed here rather than by @hydra.main, whose errors are several lines and exit 1
        cfg = compose_config(command, overrides)
    except ClusterError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(err.code)
    sys.exit(run(command, cfg))


if __name__ == "__main__":
    main()
