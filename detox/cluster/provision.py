"""Get every host of an MPI hostfile ready for ``engine=mpi``: ``python -m detox.cluster.provision <hostfile>``.

The original project did this with ``local_script.sh`` / ``remote_script.sh`` (give the PS ssh to every node,
install the environment, prepare the data on each node). Here, run on the PS host from the checkout you train
with, over ssh, for each host of the hostfile (the PS's own address included):

1. reachable: ``ssh <host> true`` (batch mode: a host that asks for a password counts as unreachable);
2. the same Python: ``--python`` (default: this interpreter's path, as ``engine.python``) exists there and has
   this interpreter's version;
3. the same detox: run in ``--workdir`` (default: this directory; mpiexec starts every rank in its own working
   directory), that Python imports ``detox.mpi`` (what every rank runs) and the imported ``detox`` package has the
   same version and the same source (SHA-256 over its ``.py`` files) as this one;
4. data present: each ``--dataset`` is laid out under ``--data-root`` (default: as the config's ``data_root``).

What is missing is installed: a wheel of this checkout, built once (``pip wheel --no-deps``, offline) and copied
with scp, is installed into that Python's environment with ``pip install --no-deps --no-index`` (the
dependencies must be there already: the hosts come from one image); missing data is prepared with
``python -m detox.data prepare`` (which verifies and loads what it lays out). After an install the host is checked
again: the ranks must now import this detox. One line per host, in hostfile order::

    <host> ok: <what was checked>
    <host> fixed: <what was done>
    <host> failed: <what failed>

Exit code 0 if no host failed, 1 otherwise, 2 for bad input (one line, before anything is contacted).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from detox.cluster.hostfile import SHOWN, parse_hostfile

PROG = "detox.cluster.provision"
# ssh never prompts (a prompt would hang a host's check) and gives up on a dead address
SSH_DEFAULTS = ("BatchMode=yes", "ConnectTimeout=10")
PROBE_TAG = "DETOX-PROVISION-PROBE "
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
TIMEOUT_S = 600  # one remote step (a data preparation hashes and copies up to ~200 MB)
# what `mktemp -d /tmp/detox-provision.XXXXXX` prints; anything else is never copied to or removed with rm -rf
REMOTE_TMP = re.compile(r"/tmp/detox-provision\.[A-Za-z0-9]+")

class InputError(Exception):
    """Bad input: one line, exit 2, before any host is contacted."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}; see 'python -m {PROG} --help'\n")


def source_hash(package: Path) -> str:
    """SHA-256 over the package's ``.py`` files (relative path and bytes); the probe runs this very code."""
    digest = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        digest.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


# runs on the host, in the working directory, with the hosts' Python; prints one JSON line. ``source_hash`` is sent
# along as its source text: both sides hash with the same code
PROBE_BODY = r"""
want = json.loads(sys.argv[1])
out = {"python": platform.python_version(), "executable": sys.executable, "prefix": sys.prefix}
try:
    import detox, detox.mpi  # detox.mpi: what every rank runs, with its dependencies (torch, mpi4py)
    pkg = Path(detox.__file__).resolve().parent
    out.update(detox_version=detox.__version__, detox_at=str(pkg), source=source_hash(pkg))
    from detox.data import status
    lines = status(want["data_root"], want["datasets"])  # checks sizes too: a truncated file is "invalid"
    out["data"] = {name: any(x.startswith(name + ": present") for x in lines) for name in want["datasets"]}
except Exception as err:
    out["error"] = type(err).__name__ + ": " + (str(err).splitlines() or [""])[0]
print(TAG + json.dumps(out), flush=True)
"""


def probe_script() -> str:
    import inspect

    head = f"import hashlib, json, platform, sys\nfrom pathlib import Path\nTAG = {PROBE_TAG!r}\n"
    return head + inspect.getsource(source_hash) + PROBE_BODY


@dataclass
class Ssh:
    """How to reach a host: the ssh program (a wrapper script works), login, key and ``-o`` options."""

    program: str = "ssh"
    user: str | None = None
    identity: str | None = None
    options: list[str] = field(default_factory=list)

    def _common(self) -> list[str]:
        args = ["-i", self.identity] if self.identity else []
        for opt in [*SSH_DEFAULTS, *self.options]:
            args += ["-o", opt]
        return args

    def target(self, host: str) -> str:
        return f"{self.user}@{host}" if self.user else host

    def remote_path(self, host: str, path: str) -> str:
        """scp's ``[user@]host:path``; scp splits it at the first ':' outside brackets, so an IPv6 address
        (``fe80::1``, ``::1``) goes in brackets, or the copy would go to host ``fe80`` or a local file."""
        return f"{self.target(f'[{host}]' if ':' in host else host)}:{path}"

    def run(self, host: str, command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        cmd = [self.program, *self._common(), self.target(host), command]
        # errors="replace": a host's output is not ours to trust as UTF-8 (a Latin-1 motd or error message); a
        # strict decode raised out of the thread pool and lost every host's line
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)

    def copy(self, local: Path, host: str, remote: str) -> subprocess.CompletedProcess:
        # scp runs the same ssh program (-S), so a wrapper's options hold for the copy too
        cmd = ["scp", "-q", "-S", self.program, *self._common(), str(local), self.remote_path(host, remote)]
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)


@dataclass
class Want:
    """What every host must match: this machine's Python and detox, and the data sets asked for."""

    python: str
    python_version: str
    detox_version: str
    source: str
    workdir: str
    data_root: str
    datasets: list[str]
    data_from: str | None


class Wheel:
    """A wheel of this checkout, built on first use only, once for all hosts (threads share it)."""

    def __init__(self, checkout: Path, into: Path) -> None:
        self.checkout, self.into = checkout, into
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._error: str | None = None

    def get(self) -> Path:
        with self._lock:
            if self._path is None and self._error is None:
                try:
                    self._path = build_wheel(self.checkout, self.into)
                except RuntimeError as err:
                    self._error = str(err)
            if self._error:
                raise RuntimeError(self._error)
            return self._path


def build_wheel(checkout: Path, into: Path) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` (offline) of ``checkout``, built from a copy of its package
    folders, so the build leaves nothing (``build/``, egg-info) in the checkout others work in."""
    if not (checkout / "pyproject.toml").is_file():
        raise RuntimeError(f"detox is not running from a checkout ({checkout} has no pyproject.toml): nothing to "
                           f"build a wheel from")
    src = into / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        if (checkout / name).is_file():
            shutil.copy2(checkout / name, src / name)
    # the packages pyproject.toml's [tool.setuptools.packages.find] includes
    for name in ("detox", "analysis", "hydra_plugins"):
        if (checkout / name).is_dir():
            shutil.copytree(checkout / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    got = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(into / "dist"), str(src)], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    wheels = sorted((into / "dist").glob("detox-*.whl"))
    if got.returncode != 0 or not wheels:
        raise RuntimeError(f"building the wheel failed: {_last_line(got.stderr or got.stdout)}")
    return wheels[0]


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


def probe(ssh: Ssh, host: str, want: Want) -> tuple[dict | None, str | None]:
    """What the host has, or (None, why it could not be asked)."""
    args = json.dumps({"data_root": want.data_root, "datasets": want.datasets})
    # mpiexec starts each rank in its own working directory when the host has it, else in the home directory
    command = (f"cd {shlex.quote(want.workdir)} 2>/dev/null || cd; "
               f"exec {shlex.quote(want.python)} - {shlex.quote(args)}")
    got = ssh.run(host, command, stdin=probe_script())
    if got.returncode == 255:
        return None, f"unreachable over ssh: {_last_line(got.stderr)}"
    if got.returncode == 127:
        return None, f"no Python at {want.python} (the hosts must have this Python at the same path)"
    for line in got.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            try:
                have = json.loads(line[len(PROBE_TAG):])
            except ValueError:
                have = None
            # the host's answer is read, not trusted: a torn or foreign line must fail this host, not the run
            if not isinstance(have, dict) or not isinstance(have.get("python"), str):
                return None, f"{want.python} answered the probe with something else: {line[:SHOWN]!r}"
            return have, None
    return None, f"{want.python} failed (exit {got.returncode}): {_last_line(got.stderr)}"


def problems(have: dict, want: Want) -> tuple[str | None, bool, list[str]]:
    """(a problem no install can fix, whether detox must be installed, data sets to prepare)."""
    if have["python"] != want.python_version:
        return (f"Python {have['python']} at {want.python}, this host runs {want.python_version} (build the hosts "
                f"from one image)"), False, []
    if "error" in have and "source" not in have:
        return None, True, []
    if have["detox_version"] != want.detox_version or have["source"] != want.source:
        return None, True, []
    if "error" in have:  # detox matches but the data check itself failed
        return f"checking the data failed: {have['error']}", False, []
    return None, False, [name for name, present in have["data"].items() if not present]


def provision_host(ssh: Ssh, host: str, want: Want, wheel: Wheel) -> tuple[str, str]:
    """(``ok`` | ``fixed`` | ``failed``, what was checked, done or what failed) for one host."""
    try:
        return _provision_host(ssh, host, want, wheel)
    except subprocess.TimeoutExpired as err:
        return "failed", f"a step took over {TIMEOUT_S} s: {shlex.join(map(str, err.cmd))[:200]}"
    except OSError as err:  # the ssh or scp program itself is missing or not executable
        return "failed", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - one line per host: whatever one host does, the others are reported
        return "failed", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:SHOWN]}"


def _provision_host(ssh: Ssh, host: str, want: Want, wheel: Wheel) -> tuple[str, str]:
    have, why = probe(ssh, host, want)
    if have is None:
        return "failed", why
    fatal, install, prepare = problems(have, want)
    if fatal:
        return "failed", fatal
    done: list[str] = []
    if install:
        before = have.get("error") or f"detox {have['detox_version']} with other sources at {have['detox_at']}"
        try:
            wheel_path = wheel.get()
        except RuntimeError as err:
            return "failed", f"{before}; {err}"
        failed = install_wheel(ssh, host, want, wheel_path)
        if failed:
            return "failed", f"{before}; installing {wheel_path.name} failed: {failed}"
        done.append(f"installed {wheel_path.name} into {have['prefix']} (was: {before})")
        have, why = probe(ssh, host, want)
        if have is None:
            return "failed", f"after {'; '.join(done)}: {why}"
        fatal, install, prepare = problems(have, want)
        if fatal or install:
            what = fatal or have.get("error") or (f"it still imports detox {have['detox_version']} from "
                                                  f"{have['detox_at']} with other sources (a checkout in "
                                                  f"{want.workdir} shadows the installed one: update it)")
            return "failed", f"after {'; '.join(done)}: {what}"
    for name in prepare:
        cmd = [want.python, "-m", "detox.data", "prepare", name, "--root", want.data_root]
        if want.data_from:
            cmd += ["--from", want.data_from]
        got = ssh.run(host, f"cd {shlex.quote(want.workdir)} 2>/dev/null || cd; {shlex.join(cmd)}")
        if got.returncode != 0:
            return "failed", "; ".join([*done, f"preparing {name} failed: {_last_line(got.stderr or got.stdout)}"])
        # no second look needed: prepare exits 0 only after the files verified and loaded through torchvision
        done.append(f"prepared {name} under {want.data_root}")
    if done:
        return "fixed", "; ".join(done)
    data = f", data present: {', '.join(want.datasets)}" if want.datasets else ""
    return "ok", (f"Python {have['python']}, detox {have['detox_version']} (source {want.source[:12]}) at "
                  f"{have['detox_at']}{data}")


def install_wheel(ssh: Ssh, host: str, want: Want, wheel: Path) -> str | None:
    """Copy the wheel to a fresh folder on the host and pip-install it offline; None, or what failed."""
    got = ssh.run(host, "mktemp -d /tmp/detox-provision.XXXXXX")
    if got.returncode != 0:
        return f"mktemp: {_last_line(got.stderr)}"
    # the last line: a host's shell startup files may print first (a banner, a 'conda activate' note), and the whole
    # output was taken as the folder (the copy failed, and `rm -rf` was given the host's text)
    remote_dir = _last_line(got.stdout)
    if not REMOTE_TMP.fullmatch(remote_dir):
        return f"mktemp printed {remote_dir[:SHOWN]!r}, not a /tmp/detox-provision.* folder"
    try:
        got = ssh.copy(wheel, host, f"{remote_dir}/{wheel.name}")
        if got.returncode != 0:
            return f"scp: {_last_line(got.stderr)}"
        pip = [want.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
               f"{remote_dir}/{wheel.name}"]
        got = ssh.run(host, shlex.join(pip))
        return None if got.returncode == 0 else f"pip: {_last_line(got.stderr or got.stdout)}"
    finally:
        ssh.run(host, f"rm -rf {shlex.quote(remote_dir)}")


def distinct_hosts(entries: list[tuple[str, int]]) -> list[str]:
    """Each host once, in order of first appearance: a host listed twice (``h1 slots=1`` / ``h1 slots=4``) is one
    machine, and provisioning it twice at once would run two pip installs into one environment."""
    first: dict[str, str] = {}
    for host, _ in entries:
        first.setdefault(_host_key(host), host)
    return list(first.values())


def _host_key(host: str) -> str:
    """One spelling per machine: DNS names ignore case, and an address has one canonical form (FE80:0::1)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from detox.data import SPECS  # the data sets 'python -m detox.data prepare' knows

    datasets = list(SPECS)
    parser = _OneLineParser(prog=f"python -m {PROG}",
                            description="Check every host of an MPI hostfile over ssh (reachable, same Python, same "
                                        "detox, data present), install what is missing, print one line per host.")
    parser.add_argument("hostfile", help="Open MPI hostfile (what 'python -m detox.cluster.ec2 hosts' writes)")
    parser.add_argument("--user", "-l", help="login on the hosts (default: ssh's: your name or ~/.ssh/config)")
    parser.add_argument("--identity", "-i", metavar="FILE", help="private key for ssh and scp")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION",
                        help="an ssh option, e.g. -o StrictHostKeyChecking=accept-new (repeatable)")
    parser.add_argument("--ssh", default="ssh", metavar="PROGRAM",
                        help="ssh program or wrapper script (scp uses it too, with -S)")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python on the hosts (default: this one's path, as engine.python)")
    parser.add_argument("--workdir", default=str(Path.cwd()),
                        help="where the ranks start (default: this directory, as mpiexec does)")
    parser.add_argument("--dataset", action="append", default=[], choices=datasets, metavar="NAME",
                        help=f"a data set that must be prepared on every host (repeatable): {', '.join(datasets)}")
    parser.add_argument("--data-root", help="data root on the hosts (default: $DETOX_DATA or ~/.cache/detox/data "
                                            "as here, i.e. the config's data_root)")
    parser.add_argument("--data-from", metavar="PATH", help="folder on the hosts with the release files (passed "
                                                            "to 'python -m detox.data prepare --from')")
    parser.add_argument("--jobs", type=int, default=8, help="hosts handled at once (default 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    try:
        path = Path(args.hostfile).expanduser()
        if path.is_dir():  # "no such file" said the wrong thing
            raise InputError(f"{args.hostfile}: is a folder, not a hostfile")
        if not path.is_file():
            raise InputError(f"{args.hostfile}: no such file")
        try:
            hosts = distinct_hosts(parse_hostfile(path))
        except ValueError as err:  # parse_hostfile's, an unreadable file's included
            raise InputError(f"{args.hostfile}: {err}") from None
        if args.jobs < 1:
            raise InputError(f"--jobs={args.jobs}: must be >= 1")
        if args.user is not None and not USER.fullmatch(args.user):  # user@host is one ssh argument: no options
            raise InputError(f"--user={args.user!r}: not a login name (letters, digits, '.', '_', '-', not first)")
        if args.identity and not Path(args.identity).expanduser().is_file():
            raise InputError(f"--identity {args.identity}: no such file")
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    import detox
    from detox.data import default_root

    package = Path(detox.__file__).resolve().parent
    data_root = str(Path(args.data_root).expanduser()) if args.data_root else str(default_root().resolve())
    want = Want(python=args.python, python_version=platform.python_version(), detox_version=detox.__version__,
                source=source_hash(package), workdir=args.workdir, data_root=data_root,
                datasets=list(dict.fromkeys(args.dataset)), data_from=args.data_from)
    ssh = Ssh(args.ssh, args.user, args.identity and str(Path(args.identity).expanduser()), args.options)
    with tempfile.TemporaryDirectory(prefix="detox-provision-") as tmp:
        wheel = Wheel(package.parent, Path(tmp))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda h: provision_host(ssh, h, want, wheel), hosts))
    for host, (state, what) in zip(hosts, results, strict=True):
        out(f"{host} {state}: {what}")
    return 1 if any(state == "failed" for state, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
