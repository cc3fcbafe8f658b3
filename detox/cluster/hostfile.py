"""Open MPI hostfiles: what ``python -m detox.cluster.ec2 hosts`` writes and ``engine=mpi`` consumes.

Format (Open MPI's): one host per line, ``<host> slots=<n>``; ``#`` starts a comment; blank lines are ignored.
The first host runs rank 0 (the PS), because Open MPI fills slots in file order. A bare ``<host>`` line (the
original project's ``hosts_address``) counts as one slot here: that is how the original ran, one rank per
instance (Open MPI itself may give a bare host one slot per core). Parsing is ASCII, as Open MPI's: lines end at a
line feed only, fields are separated by spaces, tabs, vertical tabs or form feeds, ``slots`` are ASCII
digits (1 to ``MAX_SLOTS``), and a host is a DNS name or an IPv4/IPv6 address; a no-break space or a Unicode digit is
refused rather than read as Python would read it, and so is what Open MPI refuses only once mpiexec has started (a
carriage return or another control character, a repeated key, ``max_slots`` below ``slots``, a host on two lines
where one gives ``slots=``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
import tempfile
from pathlib import Path

# keys Open MPI accepts after the host name; only ``slots`` decides how many ranks a host takes by default
SLOT_KEYS = ("slots", "max_slots", "max-slots")
# far above any real host's cores; a typo like slots=99999999999 is refused rather than handed to Open MPI
MAX_SLOTS = 4096
SLOTS = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() would take '٣' or '²'
# one host name label (letters, digits, '_', '-', not first or last): hosts end up as arguments of ssh, scp and
# mpiexec, where a leading '-' (e.g. '-F/tmp/config' or '-oProxyCommand') would be read as an option
LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
BLANKS = " \t\v\f"  # the separators Open MPI reads; str.split() would also split at a no-break space
SHOWN = 80  # characters of a line or value an error message repeats: the message stays one short line


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
        # what parse_hostfile (engine=mpi, provision) reads back: a host like '-F/tmp/x' or 'h:1' was written, and
        # refused only when the run started
        if not isinstance(host, str) or not is_host(host):
            raise ValueError(f"host {_clip(str(host))}: not a host name or address")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SLOTS:
            raise ValueError(f"host {host}: slots={n!r} must be an integer >= 1 and at most {MAX_SLOTS}")
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


def _clip(text: str) -> str:
    """``text`` as an error shows it: its repr, cut to ``SHOWN`` characters."""
    return repr(text[:SHOWN]) + ("…" if len(text) > SHOWN else "")


def is_host(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address or a DNS host name (ASCII labels of at most 63, 253 in all)."""
    if ":" in host:
        return _is_ip(host, ipaddress.IPv6Address)
    if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: meant as an IPv4 address (10.0.0.256 is not one)
        return _is_ip(host, ipaddress.IPv4Address)
    return len(host) <= 253 and all(LABEL.fullmatch(label) for label in host.split("."))


def _is_ip(host: str, kind: type) -> bool:
    try:
        kind(host)
    except ValueError:
        return False
    return "%" not in host  # a scope id (fe80::1%eth0) is no address Open MPI or scp take


def _slot_count(key: str, value: str) -> int:
    digits = value.lstrip("0")  # bounded before int(): a 100,000-digit value is refused, not converted
    if not SLOTS.fullmatch(value) or not digits or len(digits) > len(str(MAX_SLOTS)) or int(digits) > MAX_SLOTS:
        raise ValueError(f"{key}={_clip(value)} must be an integer >= 1 and at most {MAX_SLOTS} (ASCII digits)")
    return int(value)


def _parse_line(text: str) -> tuple[str, int, bool]:
    """(host, slots, whether slots= was given) of one line without its comment."""
    # Open MPI reads ASCII: a no-break space or a Unicode digit would mean something else to it than to Python
    odd = next((c for c in text if not c.isascii()), None)
    if odd is not None:
        # a byte that is not UTF-8 reaches here as a lone surrogate (parse_hostfile's surrogateescape): name the byte
        what = (f"byte 0x{ord(odd) - 0xDC00:02x}" if 0xDC80 <= ord(odd) <= 0xDCFF
                else f"character {odd!r} (U+{ord(odd):04X})")
        raise ValueError(f"non-ASCII {what}; hostfiles are ASCII, fields separated by spaces or tabs")
    # prterun (Open MPI 5) refuses a line with a carriage return or another control character after mpiexec has
    # started: refused here, before any work
    control = next((c for c in text if (c < " " and c not in BLANKS) or c == "\x7f"), None)
    if control is not None:
        what = "a carriage return (CRLF line ends: save the file with LF ends)" if control == "\r" else \
            f"the control character {control!r}"
        raise ValueError(f"{what}; Open MPI refuses it")
    host, *options = re.split(f"[{BLANKS}]+", text.strip(BLANKS))
    if "=" in host:
        raise ValueError("the line must start with a host name")
    if not is_host(host):
        raise ValueError(f"{_clip(host)} is not a host name or an IP address (a host name is letters, digits, '_', "
                         f"'-', dot-separated, no label starting or ending with '-'; or an IPv4 or IPv6 address)")
    counts: dict[str, int] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in SLOT_KEYS:
            raise ValueError(f"unknown option {_clip(option)} (expected slots=<n>)")
        name = key.replace("-", "_")
        if name in counts:  # Open MPI refuses a repeated key; which one would count is not ours to guess
            raise ValueError(f"{name} given twice")
        counts[name] = _slot_count(key, value)
    slots = counts.get("slots", 1)
    if counts.get("max_slots", slots) < slots:
        raise ValueError(f"max_slots={counts['max_slots']} is below slots={slots} (Open MPI refuses it)")
    return host, slots, "slots" in counts


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` in file order; a ``ValueError`` naming the line for anything malformed."""
    try:
        # Open MPI reads bytes: a comment in Latin-1 is fine for it, so undecodable bytes are kept (surrogateescape)
        # and refused only outside comments, by _parse_line
        content = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")  # no newline translation
    except OSError as err:  # unreadable (permissions, a folder, an I/O error): a ValueError like any bad hostfile,
        raise ValueError(f"cannot read it: {err.strerror or err}") from None  # not a traceback from its callers
    entries = []
    explicit: dict[str, int] = {}  # host -> first line that lists it, where a line of it gives slots=
    listed: dict[str, int] = {}
    # lines end at "\n" only, as Open MPI reads them (str.splitlines also ends them at \r, \f, \x1c, ...)
    for number, line in enumerate(content.split("\n"), start=1):
        text = line.split("#", 1)[0].strip(BLANKS)  # ASCII blanks only: a no-break space is refused, not dropped
        if not text:
            continue
        try:
            host, slots, given = _parse_line(text)
            first = listed.setdefault(host, number)
            if given:
                explicit.setdefault(host, number)
            if first != number and host in explicit:
                raise ValueError(f"{host} is also on line {first}, and one of its lines gives slots=: Open MPI "
                                 f"refuses that; give the host once, with its total slots")
        except ValueError as err:
            raise ValueError(f"line {number} {_clip(line.strip(BLANKS))}: {err}") from None
        entries.append((host, slots))
    if not entries:
        raise ValueError("no hosts in the file")
    return entries
