"""Audit of the PS's side of engine=mpi against hostile ranks, beyond tests/test_mpi_rogue.py: the blosc transport
(frames whose header lies, oversized frames, frames of another codec or of NaN), the raw transport at its limits,
reports at the edges of float64, tag mixing, per-rank counts across a checkpoint, engine settings at their edges.

Most of it drives ``decode_gradient`` and ``MPISource._take`` directly with a stand-in for mpi4py's message and
status objects (no MPI world: ``mpi4py.rc.initialize = False``); the ``slow`` test runs real worlds.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, make_cfg, read_metrics, run_job
from omegaconf import OmegaConf

import detox.mpi as dm
from detox.config import ConfigError, validate
from detox.mpi import BLOSC_HEADER, BLOSC_MAX_OVERHEAD, META_BYTES, SINK_BYTES, TAG_BYE, TAG_GRAD, TAG_META
from detox.trainer import _source_problem

blosc = pytest.importorskip("blosc")

D = 1000  # gradient length of the direct tests
G = np.random.default_rng(0).standard_normal(D).astype(np.float32)


def frame(values: np.ndarray = G, **kw) -> bytes:
    return blosc.compress(values.tobytes(), typesize=kw.pop("typesize", 4), cname=kw.pop("cname", "lz4"), **kw)


def lie(packed: bytes, extra: bytes = b"", **fields: int) -> bytes:
    """``packed`` with header fields replaced (version, versionlz, flags, typesize, nbytes, blocksize, cbytes)."""
    names = ("version", "versionlz", "flags", "typesize", "nbytes", "blocksize", "cbytes")
    out = bytearray(packed) + extra
    values = dict(zip(names, BLOSC_HEADER.unpack_from(out), strict=True)) | fields
    BLOSC_HEADER.pack_into(out, 0, *(values[k] for k in names))
    return bytes(out)


def memcpyed(values: np.ndarray = G, extra: int = 0) -> bytes:
    """A stored (not compressed) frame as blosc writes for incompressible data: header + the raw bytes."""
    raw = values.tobytes()
    return BLOSC_HEADER.pack(2, 1, 0x2 | 0x1, 4, len(raw), len(raw), 16 + len(raw) + extra) + raw + bytes(extra)


# ------------------------------------------------------------------------------------ blosc frames (decode_gradient)


@pytest.mark.parametrize("cname", blosc.compressor_list())
@pytest.mark.parametrize("shuffle", [blosc.NOSHUFFLE, blosc.SHUFFLE, blosc.BITSHUFFLE])
def test_every_valid_blosc_frame_decodes_bit_exactly(cname: str, shuffle: int) -> None:
    # a worker may use another codec than engine.codec: the values are what it sent, so they are taken
    row = np.zeros(D, dtype=np.float32)
    assert dm.decode_gradient(frame(cname=cname, shuffle=shuffle), row, "blosc")
    assert row.tobytes() == G.tobytes()


def test_blosc_frames_of_nan_inf_and_stored_bytes_decode() -> None:
    row = np.zeros(D, dtype=np.float32)
    odd = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38] * (D // 6) + [0.0] * (D % 6), dtype=np.float32)
    for packed in (frame(odd), memcpyed(odd), frame(odd, cname="zstd", clevel=9)):
        row[:] = 7
        assert dm.decode_gradient(packed, row, "blosc") and row.tobytes() == odd.tobytes()  # NaN payloads too


def test_a_blosc_frame_longer_than_4d_plus_16_is_oversized() -> None:
    """Before: a valid frame followed by junk, its header's cbytes covering the junk, was taken as a well-formed
    gradient up to the scratch buffer's 64 KiB, though docs/mpi.md bounds a gradient frame at 4d + 16 bytes."""
    row = np.zeros(D, dtype=np.float32)
    packed = frame()
    bound = 4 * D + BLOSC_MAX_OVERHEAD
    assert dm.decode_gradient(lie(packed, bytes(bound - len(packed)), cbytes=bound), row, "blosc")  # at the bound
    for total in (bound + 1, bound + 1000, SINK_BYTES):
        longer = lie(packed, bytes(total - len(packed)), cbytes=total)
        assert blosc.decompress(longer) == G.tobytes()  # blosc itself takes it
        assert not dm.decode_gradient(longer, row, "blosc"), total
    assert dm.decode_gradient(memcpyed(), row, "blosc")  # a stored frame is exactly 4d + 16 bytes
    assert not dm.decode_gradient(memcpyed(extra=1), row, "blosc")


def test_decoding_a_blosc_frame_allocates_nothing() -> None:
    """Before: the frame was copied (bytes(buf)) and decompressed into a new bytes object, then copied into the
    row: twice the message's size allocated per gradient on top of the scratch buffer. Now blosc writes the row."""
    d = 1 << 20  # 4 MiB
    values = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    scratch = np.frombuffer(blosc.compress(values.tobytes(), typesize=4, cname="lz4"), dtype=np.uint8).copy()
    row = np.zeros(d, dtype=np.float32)
    tracemalloc.start()
    try:
        ok = dm.decode_gradient(memoryview(scratch), row, "blosc")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ok and np.array_equal(row, values)
    assert peak < 64 << 10, peak


LIES = {
    "typesize 0": dict(typesize=0), "typesize 1": dict(typesize=1), "typesize 8": dict(typesize=8),
    "typesize 255": dict(typesize=255),
    "blocksize 0": dict(blocksize=0), "blocksize 1": dict(blocksize=1), "blocksize 3": dict(blocksize=3),
    "blocksize 4d+1": dict(blocksize=4 * D + 1), "blocksize 2^31": dict(blocksize=2**31),
    "blocksize 2^32-1": dict(blocksize=2**32 - 1),
    "nbytes 0": dict(nbytes=0), "nbytes 4d-4": dict(nbytes=4 * D - 4), "nbytes 4d+4": dict(nbytes=4 * D + 4),
    "nbytes 2^32-1": dict(nbytes=2**32 - 1),
    "cbytes 0": dict(cbytes=0), "cbytes 16": dict(cbytes=16), "cbytes len-1": "short", "cbytes len+1": "long",
    "cbytes 2^32-1": dict(cbytes=2**32 - 1),
    "version 0": dict(version=0), "version 255": dict(version=255), "versionlz 255": dict(versionlz=255),
    "memcpyed flag on a compressed body": "memcpy-flag",
    "codec snappy (not built)": dict(flags=0x61), "codec 7": dict(flags=0xE1),
}


@pytest.mark.parametrize("name", list(LIES))
def test_a_blosc_header_that_lies_is_refused_without_raising(name: str) -> None:
    packed = frame()
    how = LIES[name]
    if how == "short":
        bad = lie(packed, cbytes=len(packed) - 1)
    elif how == "long":
        bad = lie(packed, cbytes=len(packed) + 1)
    elif how == "memcpy-flag":
        bad = lie(packed, flags=BLOSC_HEADER.unpack_from(packed)[2] | 0x2)
    else:
        bad = lie(packed, **how)
    row = np.zeros(D, dtype=np.float32)
    assert dm.decode_gradient(bad, row, "blosc") is False


@pytest.mark.parametrize("buf", [
    b"", b"\x02", frame()[:15], frame()[:16], frame()[:-1], G.tobytes(), G.tobytes() + bytes(16),
    frame(G.astype(np.float64), typesize=8), frame(G.astype(np.float64)), frame(G[: D // 2]), frame(np.zeros(D + 1)),
    frame(G.astype(np.float16), typesize=2), memcpyed()[:-4],
], ids=["empty", "1 byte", "15 bytes", "header only", "truncated", "raw float32", "raw + 16", "float64 frame",
        "float64 bytes typesize 4", "half frame", "d+1 values", "float16 frame", "stored, truncated"])
def test_a_frame_of_the_wrong_content_is_refused(buf: bytes) -> None:
    row = np.zeros(D, dtype=np.float32)
    assert dm.decode_gradient(buf, row, "blosc") is False


FUZZ = """
import struct, sys
import numpy as np, blosc
from detox.mpi import decode_gradient
rng = np.random.default_rng(int(sys.argv[1]))
d = 50_000  # 200 kB: several blocks, so forged block offsets are read
g = rng.standard_normal(d).astype(np.float32)
g[::3] = 0
row = np.zeros(d, np.float32)
frames = [blosc.compress(g.tobytes(), typesize=4, cname=c, shuffle=s)
          for c in blosc.compressor_list() for s in (0, 1, 2)]
ok = 0
for i in range(int(sys.argv[2])):
    p = bytearray(frames[i % len(frames)])
    for _ in range(int(rng.integers(1, 6))):
        pos = int(rng.integers(0, 16 + 4 * 16)) if rng.random() < 0.6 else int(rng.integers(0, len(p)))
        if rng.random() < 0.5:
            p[pos] = int(rng.integers(0, 256))
        else:
            word = int(rng.choice([0, 1, 16, len(p) - 1, len(p), len(p) + 1, 2**31 - 1, 2**32 - 1]))
            p[pos:pos + 4] = struct.pack("<I", word)[: len(p) - pos]
    r = decode_gradient(bytes(p), row, "blosc")
    assert r in (True, False)
    ok += r
# blosc's global state survived: a valid frame still decodes bit-exactly
assert decode_gradient(frames[0], row, "blosc") and row.tobytes() == g.tobytes()
print("fuzzed", ok)
"""


def test_mutated_blosc_frames_never_crash_the_decoder(tmp_path: Path) -> None:
    # in a child: a crash in C (SIGSEGV, SIGFPE) must fail this test, not end pytest
    proc = subprocess.run([sys.executable, "-c", FUZZ, "7", "600"], capture_output=True, text=True, timeout=240,
                          cwd=ROOT)
    assert proc.returncode == 0 and "fuzzed" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_decode_gradient_refuses_a_row_it_cannot_write() -> None:
    with pytest.raises(ValueError):
        dm.decode_gradient(frame(), np.zeros((2, D), dtype=np.float32)[:, 0], "blosc")  # strided


# ------------------------------------------------------------------------------ the PS taking messages (MPISource)


@pytest.fixture(scope="module")
def MPI():  # noqa: N802
    """mpi4py's MPI module without MPI_Init: its constants only (the driver never initialises MPI either)."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    return MPI


class _Sink:
    def Get_size(self) -> int:  # noqa: N802
        return SINK_BYTES


class _Done:
    def Test(self) -> bool:  # noqa: N802
        return True


class _Msg:
    """A probed message of ``n`` bytes: its receive checks what the PS posts and writes at most that buffer."""

    def __init__(self, MPI, data: bytes, n: int | None = None) -> None:  # noqa: N803
        self.MPI, self.data, self.n, self.posted = MPI, data, len(data) if n is None else n, None

    def Irecv(self, spec):  # noqa: N802
        buf, count, dtype = spec
        self.posted = (count, dtype)
        if dtype is self.MPI.BYTE:  # received whole: never into a smaller buffer (that would truncate)
            assert count == self.n <= memoryview(buf).nbytes, (count, self.n)
            memoryview(buf).cast("B")[: self.n] = self.data
        else:  # discarded: poured over SINK_BYTES, covering the whole message
            assert isinstance(dtype, _Sink) and count * SINK_BYTES >= self.n
        return _Done()


class _Status:
    src = tag = n = 0

    def Get_source(self) -> int:  # noqa: N802
        return self.src

    def Get_tag(self) -> int:  # noqa: N802
        return self.tag

    def Get_elements(self, datatype) -> int:  # noqa: N802, ANN001
        return self.n


def make_source(MPI, monkeypatch: pytest.MonkeyPatch, d: int = D, workers: int = 3,  # noqa: N803
                compress: str | None = None) -> dm.MPISource:
    s = types.SimpleNamespace(
        cfg=OmegaConf.create({"engine": {"timeout": 30.0, "compress": compress}, "err_mode": {"name": "none"}}),
        plan=types.SimpleNamespace(workers=workers, unit_size=1, units=workers), w_d=torch.zeros(d))
    monkeypatch.setattr(dm, "zero_extent_type", lambda nbytes: _Sink())
    src = dm.MPISource(s, types.SimpleNamespace(Set_errhandler=lambda handler: None))
    src.status = _Status()
    src._deadline = time.monotonic() + 60
    return src


def new_round(src: dm.MPISource, started_s_ago: float = 10.0) -> dm._Round:
    everyone = set(range(1, src.P + 1))
    return dm._Round(0, time.perf_counter() - started_s_ago, {TAG_GRAD: set(everyone), TAG_META: set(everyone)},
                     np.zeros(src.P, dtype=bool), np.full((src.P, 2), np.nan), np.zeros(src.P, dtype=bool))


def deliver(src: dm.MPISource, rnd: dm._Round, rank: int, tag: int, data: bytes, n: int | None = None) -> _Msg:
    msg = _Msg(src.MPI, data, n)
    src.status.src, src.status.tag, src.status.n = rank, tag, msg.n
    src._take(msg, rnd)
    return msg


@pytest.mark.parametrize(("what", "size", "ok"), [
    ("exact", 4 * D, True), ("limit + 1", 4 * D + 1, False), ("limit - 1", 4 * D - 1, False), ("0 bytes", 0, False),
    ("16 bytes (a report)", META_BYTES, False), ("scratch", SINK_BYTES, False), ("scratch + 1", SINK_BYTES + 1, False),
    ("2^31", 2**31, False), ("2^33", 2**33, False),
])
def test_raw_gradient_at_its_limits(MPI, monkeypatch: pytest.MonkeyPatch,  # noqa: N803
                                    what: str, size: int, ok: bool) -> None:
    src = make_source(MPI, monkeypatch)
    rnd = new_round(src)
    data = (G.tobytes() + bytes(size))[:size] if size <= SINK_BYTES else b""
    msg = deliver(src, rnd, 2, TAG_GRAD, data, n=size)
    assert 2 not in rnd.need[TAG_GRAD]  # owed once: answered, well-formed or not
    if ok:
        assert np.array_equal(src.grads_np[1], G) and not src.malformed_by_rank and not rnd.malformed_p.any()
    else:
        assert np.isnan(src.grads_np[1]).all() and rnd.malformed_p.tolist() == [False, True, False]
        assert dict(src.malformed_by_rank) == {2: 1} and src.malformed_rows == 1
        assert (msg.posted[1] is MPI.BYTE) == (size <= SINK_BYTES)  # larger: discarded, never truncated


@pytest.mark.parametrize(("what", "ok"), [
    ("valid", True), ("another codec", True), ("stored at the bound", True), ("bound + 1", False),
    ("bound + 1, stored", False), ("64 KiB of junk after a frame", False), ("raw float32", False),
    ("2^33 bytes", False),
])
def test_blosc_gradient_through_the_ps(MPI, monkeypatch: pytest.MonkeyPatch, what: str, ok: bool) -> None:  # noqa: N803
    src = make_source(MPI, monkeypatch, compress="blosc")
    rnd = new_round(src)
    packed, bound = frame(), 4 * D + BLOSC_MAX_OVERHEAD
    data, n = {
        "valid": (packed, None), "another codec": (frame(cname="zstd", shuffle=blosc.BITSHUFFLE), None),
        "stored at the bound": (memcpyed(), None),
        "bound + 1": (lie(packed, bytes(bound + 1 - len(packed)), cbytes=bound + 1), None),
        "bound + 1, stored": (memcpyed(extra=1), None),
        "64 KiB of junk after a frame": (lie(packed, bytes(SINK_BYTES - len(packed)), cbytes=SINK_BYTES), None),
        "raw float32": (G.tobytes(), None), "2^33 bytes": (b"", 2**33),
    }[what]
    deliver(src, rnd, 3, TAG_GRAD, data, n)
    if ok:
        assert src.grads_np[2].tobytes() == G.tobytes() and not src.malformed_by_rank
    else:
        assert np.isnan(src.grads_np[2]).all() and dict(src.malformed_by_rank) == {3: 1} and rnd.malformed_p[2]


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(("loss", "secs", "ok"), [
    (0.5, 0.1, True), (np.nan, 0.1, True), (np.inf, 0.1, True), (-0.0, 0.0, True), (F32_MAX, 0.1, True),
    (5e-324, 5e-324, True), (0.5, -0.0, True),
    (-np.inf, 0.1, False), (-1.0, 0.1, False), (-5e-324, 0.1, False), (1e308, 0.1, False),
    (np.nextafter(F32_MAX, np.inf), 0.1, False), (0.5, np.nan, False), (0.5, -1.0, False), (0.5, np.inf, False),
    (0.5, 1e308, False), (0.5, 60.0, False), (0.5, -np.inf, False),
])
def test_report_values_at_the_edges(MPI, monkeypatch: pytest.MonkeyPatch,  # noqa: N803
                                    loss: float, secs: float, ok: bool) -> None:
    src = make_source(MPI, monkeypatch)
    rnd = new_round(src, started_s_ago=10.0)  # 60 s cannot have been spent computing in a 10 s round
    deliver(src, rnd, 1, TAG_META, struct.pack("<dd", loss, secs))
    assert bool(rnd.reported_p[0]) == ok and 1 not in rnd.need[TAG_META]
    assert dict(src.malformed_by_rank) == ({} if ok else {1: 1}) and bool(src.rogue_p[0]) == (not ok)
    if ok:
        np.testing.assert_array_equal(rnd.meta_p[0], [loss, secs])


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24, 4 * D, SINK_BYTES + 1, 2**32 + 16])
def test_report_of_the_wrong_size_is_malformed(MPI, monkeypatch: pytest.MonkeyPatch, size: int) -> None:  # noqa: N803
    src = make_source(MPI, monkeypatch)
    rnd = new_round(src)
    deliver(src, rnd, 3, TAG_META, bytes(size) if size <= SINK_BYTES else b"", n=size)
    assert not rnd.reported_p.any() and dict(src.malformed_by_rank) == {3: 1} and 3 not in rnd.need[TAG_META]
    assert not src.malformed_rows  # a bad report is not a bad gradient row


def test_tags_and_sources_mixed(MPI, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: N803
    """Each rank owes one gradient and one report per step, in any order; everything else is counted against the
    rank that sent it and changes nothing the PS took from the others."""
    src = make_source(MPI, monkeypatch)
    rnd = new_round(src)
    good = struct.pack("<dd", 0.5, 0.01)
    deliver(src, rnd, 1, TAG_META, good)  # report first, then the gradient: fine
    deliver(src, rnd, 1, TAG_GRAD, G.tobytes())
    deliver(src, rnd, 1, TAG_META, struct.pack("<dd", 9.0, 0.01))  # a second report: extra, not taken
    deliver(src, rnd, 2, TAG_BYE, b"")  # a stop acknowledgement during a step
    deliver(src, rnd, 2, 99, bytes(100))  # a stray tag
    deliver(src, rnd, 2, TAG_META, G.tobytes())  # its gradient on the report's tag
    deliver(src, rnd, 2, TAG_GRAD, (-G).tobytes())  # its gradient is still owed, and taken
    deliver(src, rnd, 3, TAG_GRAD, G.tobytes())
    deliver(src, rnd, 3, TAG_GRAD, (2 * G).tobytes())  # an extra gradient: does not overwrite the first
    deliver(src, rnd, 3, 0, b"")  # tag 0
    assert dict(src.malformed_by_rank) == {1: 1, 2: 3, 3: 2}
    assert src.rogue_p.tolist() == [True, True, True] and src.malformed_rows == 0  # no gradient row was malformed
    assert np.array_equal(src.grads_np, np.stack([G, -G, G])) and not rnd.malformed_p.any()
    np.testing.assert_array_equal(rnd.meta_p[0], [0.5, 0.01])  # the first report stands
    assert rnd.missing() == [3]  # only rank 3's report is still owed


def test_stop_exchange_counts_everything_but_one_empty_acknowledgement(MPI, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: N803
    src = make_source(MPI, monkeypatch)
    rnd = dm._Round(-1, time.perf_counter(), {TAG_BYE: {1, 2, 3}}, np.zeros(3, dtype=bool), np.full((3, 2), np.nan),
                    np.zeros(3, dtype=bool))
    deliver(src, rnd, 1, TAG_BYE, b"")
    deliver(src, rnd, 2, TAG_BYE, b"x")  # not empty: counted, but it is its acknowledgement
    deliver(src, rnd, 3, TAG_GRAD, G.tobytes())  # a gradient at the stop
    deliver(src, rnd, 3, TAG_BYE, b"", n=2**33)  # a 8 GiB acknowledgement: discarded
    deliver(src, rnd, 1, TAG_BYE, b"")  # a second acknowledgement
    assert dict(src.malformed_by_rank) == {1: 1, 2: 1, 3: 2} and rnd.missing() == []


def test_per_rank_counts_survive_a_checkpoint(MPI, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: N803
    """What the PS learnt (a lying report of rank 2, a garbage gradient of rank 3) goes into the checkpoint; the
    trainer's check accepts it; a fresh PS restored from it distrusts the same ranks and counts on from there."""
    src = make_source(MPI, monkeypatch)
    rnd = new_round(src)
    deliver(src, rnd, 2, TAG_META, struct.pack("<dd", 1e300, 1e300))
    deliver(src, rnd, 3, TAG_GRAD, b"garbage")
    state = src.checkpoint_state()
    assert state == {"malformed_by_rank": {"2": 1, "3": 1}, "malformed_rows": 1}
    cfg = make_cfg(["engine=mpi", "workers=3", "worker_fail=0", "mode=mean"])
    assert _source_problem(cfg, state, 1) is None
    resumed = make_source(MPI, monkeypatch)
    resumed.restore_state(state)
    assert resumed.rogue_p.tolist() == [False, True, True] and resumed.malformed_rows == 1
    rnd = new_round(resumed)
    deliver(resumed, rnd, 2, TAG_META, struct.pack("<dd", 0.5, 0.01))  # plausible now, but rank 2 is not trusted
    deliver(resumed, rnd, 3, TAG_GRAD, b"")
    assert rnd.reported_p[1] and resumed.rogue_p[1]  # taken as its report, left out by gradients()' trusted mask
    assert resumed.checkpoint_state() == {"malformed_by_rank": {"2": 1, "3": 2}, "malformed_rows": 2}


# ------------------------------------------------------------------------------------ engine settings at their edges

BAD_ENGINE = [
    "engine.timeout=0", "engine.timeout=-1", "engine.timeout=nan", "engine.timeout=inf", "engine.timeout=-inf",
    "engine.timeout=1e400", "engine.timeout=abc", "engine.timeout=true", "engine.timeout=null", "engine.timeout=[5]",
    "engine.clevel=10", "engine.clevel=-1", "engine.clevel=5.5", "engine.clevel=nan", "engine.clevel=abc",
    "engine.compress=lz4", "engine.compress=BLOSC", "engine.compress=''",
    "engine.codec=snappy", "engine.codec=foo", "engine.codec=LZ4", "engine.codec=''",
    "engine.threads_per_rank=0", "engine.job_timeout=0", "engine.job_timeout=inf", "engine.job_timeout=nan",
    # taken before: 1e308 turned every per-exchange deadline off, 0.5 (or 5e-324) failed every run's first exchange
    "engine.timeout=1e308", "engine.timeout=0.5", "engine.timeout=5e-324", "engine.timeout=604801",
]


@pytest.mark.parametrize("override", BAD_ENGINE)
def test_engine_settings_at_their_edges_are_refused_in_one_line(override: str) -> None:
    cfg = make_cfg(["engine=mpi", "workers=3", "worker_fail=0", "mode=mean", "engine.compress=blosc", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and override.split("=")[0] in text


@pytest.mark.parametrize("content", ["", "# only a comment\n", "localhost slots=0\n", "localhost slots=abc\n",
                                     "-x slots=4\n", "$(touch /tmp/x) slots=4\n", "host\x00 slots=4\n",
                                     b"\xff\xfe slots=4\n", "localhost slots=4 junk\n"])
def test_odd_hostfiles_are_refused_in_one_line(content: str | bytes, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = make_cfg(["engine=mpi", "workers=3", "worker_fail=0", "mode=mean", f"engine.hostfile={hosts}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(str(err.value).splitlines()) == 1 and "engine.hostfile" in str(err.value)


def test_a_bad_engine_setting_exits_2_before_mpiexec(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = cli(["engine=mpi", "workers=3", "worker_fail=0", "mode=mean", "engine.timeout=nan",
                f"hydra.run.dir={run}"], cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if "engine.timeout" in x]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert not (run / "mpi.log").exists()  # mpiexec never started


# ------------------------------------------------------------------------------------ real worlds (slow)

JOB = ["workers=6", "worker_fail=0", "group_size=3", "mode=mean", "threads=1", "save_model=true"]


@pytest.mark.slow
@pytest.mark.mpi
def test_blosc_world_with_rogues_resumes_with_its_counts(tmp_path: Path) -> None:
    """engine.compress=blosc, one rogue per group of 3 (rank 1: a 'bad_blosc' frame every step, a gradient row;
    rank 5: a lying report from step 3, no row). The driver is killed (-9) once a checkpoint exists and the rerun
    resumes: its per-rank counts, its malformed_messages and its trajectory are the uninterrupted run's, which is
    engine=local's step by step."""
    from test_mpi import assert_same_trajectory
    from test_mpi_rogue import kill_at_first_checkpoint

    steps = 200
    job = [*JOB, f"max_steps={steps}", "eval_freq=20", "checkpoint.every=20"]
    mpi = [*job, "engine=mpi", "engine.compress=blosc",
           "engine.faults=[{rank: 1, kind: bad_blosc}, {rank: 5, kind: lying_meta, step: 3}]"]
    run_job(job, tmp_path / "local")
    full = run_job(mpi, tmp_path / "full")
    assert full["status"] == "completed", full.get("error")
    # one per step from each fault's first step on (an implausible report is counted each time, trusted never)
    assert full["malformed_by_rank"] == {"1": steps, "5": steps - 3}
    assert full["malformed_messages"] == 2 * steps - 3
    assert_same_trajectory(tmp_path / "local", tmp_path / "full")
    run = tmp_path / "run"
    kill_at_first_checkpoint(mpi, run, 240)
    assert not (run / "summary.json").exists()
    resumed = run_job(mpi, run)
    assert resumed["status"] == "completed", resumed.get("error")
    assert resumed["malformed_by_rank"] == full["malformed_by_rank"]
    assert resumed["malformed_messages"] == full["malformed_messages"]
    assert_same_trajectory(tmp_path / "full", run)
    assert read_metrics(run)[-1]["step"] == steps
