"""Open MPI hostfiles: what ``python -m detox.cluster.ec2 hosts`` writes and ``engine=mpi`` consumes.

Format (Open MPI's): one host per line, ``<host> slots=<n>``; ``#`` starts a comment; blank lines are ignored.
The first host runs rank 0 (the PS), because Open MPI fills slots in file order. A bare ``<host>`` line (the
original project's ``hosts_address``) counts as one slot here: that is how the original ran, one rank per
instance (Open MPI itself may give a bare host one slot per core).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

# keys Open MPI accepts after the host name; only ``slots`` decides how many ranks a host takes by default
SLOT_KEYS = ("slots", "max_slots", "max-slots")
# a host name or an IPv4/IPv6 address: hosts end up as arguments of ssh, scp and mpiexec, where a leading '-'
# (e.g. '-F/tmp/config' or '-oProxyCommand') would be read as an option and run what it names
HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f.]{0,15}){2,8}")


def hostfile_problem(path: str | Path) -> str | None:
    """Why a hostfile cannot be written at ``path`` (one short phrase), or None if it can."""
    path = Path(path)
    if path.is_dir():
        return f"is a folder; name a file in it, e.g. {path / 'hosts_address'}"
    if not path.parent.is_dir():
        return f"folder {str(path.parent)!r} does not exist (create it first)"
    if path.exists() and not path.is_file():
        return "exists and is not a regular file"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"folder {str(path.parent)!r} is not writable"
    return None


def write_hostfile(path: str | Path, hosts: list[str], slots: list[int]) -> Path:
    """Write ``<host> slots=<n>`` lines, in order (the PS's host first), atomically.

    The lines go to a temporary file in the same folder, which then replaces ``path``: a reader (``engine=mpi``,
    or an ``scp`` in flight) sees the old file or the new one, never half of one.
    """
    if len(hosts) != len(slots):
        raise ValueError(f"{len(hosts)} hosts but {len(slots)} slot counts")
    if not hosts:
        raise ValueError("no hosts to write")
    lines = []
    for host, n in zip(hosts, slots, strict=True):
        if not host or any(c.isspace() for c in host) or "=" in host or "#" in host:
            raise ValueError(f"host {host!r}: not a host name or address")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"host {host}: slots={n!r} must be an integer >= 1")
        lines.append(f"{host} slots={n}\n")
    path = Path(path)
    problem = hostfile_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    # keep the mode of a file being replaced; a new one gets rw-r--r-- (mkstemp's own 0600 would hide it)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _parse_line(text: str) -> tuple[str, int]:
    host, *options = text.split()
    if "=" in host:
        raise ValueError("the line must start with a host name")
    if not HOST.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or an IP address (letters, digits, '.', '_', '-', not first "
                         f"or last; IPv6 with ':')")
    slots = 1
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in SLOT_KEYS:
            raise ValueError(f"unknown option {option!r} (expected slots=<n>)")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{key}={value!r} must be an integer >= 1")
        if key == "slots":
            slots = int(value)
    return host, slots


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` in file order; a ``ValueError`` naming the line for anything malformed."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            entries.append(_parse_line(text))
        except ValueError as err:
            raise ValueError(f"line {number} {line.strip()!r}: {err}") from None
    if not entries:
        raise ValueError("no hosts in the file")
    return entries
