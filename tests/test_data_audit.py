"""Hostile review of detox.data: verified reads at training time, bad data roots and paths, full disks, killed
prepares, renamed or duplicated release files, and the sampler's arguments and determinism."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_svhn, make_cfg
from test_data import DEBIAN, debian_fashion_mnist, fake_mnist, one_line, patch_cifar10

from detox import data
from detox.data import DataUnavailable, UnitSampler, load_data, prepare

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def prepared_mnist(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake MNIST release prepared into ``data_root``; its raw folder."""
    fake_mnist(tmp_path / "src", monkeypatch)
    prepare("mnist", tmp_path / "src")
    return data_root / "MNIST" / "raw"


def load_error(overrides: list[str]) -> str:
    with pytest.raises(DataUnavailable) as info:
        load_data(make_cfg(overrides).dataset)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_damaged_idx_file_is_refused_at_load_not_trained_on(tmp_path: Path, data_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's MNIST classes check only that the raw files exist: a label file of the right size with other
    bytes was loaded and trained on (every label 0 here), a truncated one failed with torchvision's own words."""
    raw = prepared_mnist(tmp_path, data_root, monkeypatch)
    labels = raw / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(good[:8] + bytes(len(good) - 8))
    msg = load_error(["dataset=mnist", "dataset.download=false"])
    assert msg.startswith(f"dataset=mnist: {labels} is not the release's train-labels-idx1-ubyte (md5 "), msg
    assert msg.endswith("run 'python -m detox.data prepare mnist --from <that folder>'")
    labels.write_bytes(good[:-3])
    assert load_error(["dataset=mnist", "dataset.download=false"]).startswith(
        f"dataset=mnist: {labels} is {len(good) - 3:,} bytes, the release's is {len(good):,} (truncated or damaged)")
    labels.write_bytes(good)  # the release's bytes again: loads, the labels as written
    d = load_data(make_cfg(["dataset=mnist", "dataset.download=false"]).dataset)
    assert d.train_y.tolist() == list(good[8:]) and d.train_x.shape == (20, 1, 28, 28)


def test_a_stale_processed_cache_is_not_what_loads(tmp_path: Path, data_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision prefers a legacy MNIST/processed/{training,test}.pt to the raw files: 100 black images labelled
    0 there were trained on (test accuracy 1.0), and prepare's load check counted them as "ready"."""
    raw = prepared_mnist(tmp_path, data_root, monkeypatch)
    processed = raw.parent / "processed"
    processed.mkdir()
    for f, n in (("training.pt", 100), ("test.pt", 50)):
        torch.save((torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)), processed / f)
    d = load_data(make_cfg(["dataset=mnist", "dataset.download=false"]).dataset)
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert prepare("mnist", tmp_path / "src")[1].startswith("mnist: ready: 20 training / 20 test images load")


def test_training_on_a_corrupt_fashion_mnist_is_one_line(tmp_path: Path) -> None:
    """The whole path a user takes: python -m detox.train on a data root whose label file was overwritten in
    place. It used to train (and report an accuracy) on the garbage."""
    debian_fashion_mnist()
    root = tmp_path / "root"
    prepare("fashion_mnist", root=root)
    labels = root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    with open(labels, "r+b") as f:
        f.seek(8)
        f.write(bytes(60000))
    got = subprocess.run([sys.executable, "-m", "detox.train", "dataset=fashion_mnist", f"data_root={root}",
                          "workers=9", "worker_fail=1", "max_steps=1", "eval_freq=1", "save=false", "network=fc",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 2 and "completed" not in got.stdout + got.stderr, got.stdout + got.stderr
    line = one_line(got.stderr)
    assert line.startswith(f"detox: error: dataset=fashion_mnist: {labels} is not the release's "), line
    assert line.endswith(f"run 'python -m detox.data prepare fashion_mnist --root {root}'")


def test_first_use_of_fashion_mnist_in_a_bad_data_root_is_one_line(tmp_path: Path) -> None:
    """The loader unpacks Debian's files on first use; a data root that is a file, or holds a file where the
    FashionMNIST folder goes, raised NotADirectoryError (a traceback) there."""
    debian_fashion_mnist()
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    msg = load_error(["dataset=fashion_mnist", f"data_root={plain}"])
    assert msg == (f"dataset=fashion_mnist: the data root {plain} is not a folder (data_root must name a folder)")
    blocked = tmp_path / "root"
    blocked.mkdir()
    (blocked / "FashionMNIST").write_text("in the way")
    msg = load_error(["dataset=fashion_mnist", f"data_root={blocked}"])
    assert msg.startswith(f"dataset=fashion_mnist: cannot write {blocked / 'FashionMNIST' / 'raw'} (Not a directory)")
    assert plain.read_text() == "not a folder" and (blocked / "FashionMNIST").read_text() == "in the way"


def test_a_full_disk_is_not_blamed_on_the_source(tmp_path: Path) -> None:
    """Writing the unpacked file failed (here: a 1 MB file size limit, as a full disk or a quota) and the message
    said Debian's intact .gz was "unreadable or truncated" and told the user to replace it."""
    debian_fashion_mnist()
    root = tmp_path / "root"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    got = subprocess.run([sys.executable, "-m", "detox.data", "prepare", "fashion_mnist", "--root", str(root)],
                         capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    line = one_line(got.stderr)
    assert got.returncode == 2 and "unreadable" not in line and str(DEBIAN) not in line, line
    assert line.startswith(f"detox.data: error: fashion_mnist: cannot write {root / 'FashionMNIST' / 'raw'}/."), line
    assert "(File too large); free space there or name a folder you can write with --root" in line
    assert list((root / "FashionMNIST" / "raw").iterdir()) == []  # no part file


def test_a_data_root_blocked_by_a_file_is_one_line(tmp_path: Path, data_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """raw.mkdir under a file (or a read-only root) escaped from prepare as a traceback."""
    fake_mnist(tmp_path / "src", monkeypatch)
    (data_root / "MNIST").write_text("in the way")
    assert data.main(["prepare", "mnist", "--from", str(tmp_path / "src")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"detox.data: error: mnist: cannot write {data_root / 'MNIST' / 'raw'} (Not a directory)")
    assert (data_root / "MNIST").read_text() == "in the way"


def test_svhn_into_a_root_blocked_by_a_file_is_one_line(tmp_path: Path, data_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SVHN's and CIFAR's preparations had no handling of OS errors at all: a file named svhn in the root (or a
    read-only or full root) was a FileExistsError traceback."""
    fake_svhn(tmp_path / "src", monkeypatch)
    (data_root / "svhn").write_text("in the way")
    with pytest.raises(DataUnavailable, match=rf"^svhn: cannot write {data_root / 'svhn'} \(File exists\); name a "
                                              rf"folder you can write with --root or \$DETOX_DATA$"):
        prepare("svhn", tmp_path / "src")
    assert (data_root / "svhn").read_text() == "in the way"


def test_empty_or_control_character_paths_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """--root "" meant the current folder: the data set was laid out wherever the command ran (the repository,
    say). A newline in a path split every message that names it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DETOX_DATA", raising=False)
    for argv, says in [
        (["prepare", "mnist", "--root", ""], "mnist: --root='' is empty (it would mean the current folder); "
                                             "name a folder, e.g. --root ~/data"),
        (["prepare", "mnist", "--root", " "], "mnist: --root=' ' is empty"),
        (["prepare", "mnist", "--from", "", "--root", str(tmp_path / "r")], "mnist: --from='' is empty"),
        (["status", "--root", ""], "status: --root='' is empty"),
        (["prepare", "mnist", "--root", "a\nb"], "mnist: --root='a\\nb' holds a control character"),
    ]:
        assert data.main(argv) == 2, argv
        assert one_line(capsys.readouterr().err).startswith(f"detox.data: error: {says}"), argv
    monkeypatch.setenv("DETOX_DATA", "")
    assert data.main(["status"]) == 2
    assert one_line(capsys.readouterr().err) == ("detox.data: error: status: $DETOX_DATA='' is empty (it would mean "
                                                 "the current folder); set it to a folder or unset it (default "
                                                 "~/.cache/detox/data)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written where the command ran


def test_suggested_commands_can_be_pasted_for_paths_with_spaces(tmp_path: Path, data_root: Path) -> None:
    root = tmp_path / "my data"
    with pytest.raises(DataUnavailable) as info:
        prepare("mnist", root=root)
    assert str(info.value).endswith(f"'python -m detox.data prepare mnist --from <that folder> --root '{root}''")
    assert data.prepare_command("svhn", root, "/x/it's") == (
        f"python -m detox.data prepare svhn --from '/x/it'\"'\"'s' --root '{root}'")


def test_renamed_and_duplicated_idx_files_are_judged_by_their_contents(tmp_path: Path, data_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A release .gz that lost its suffix was refused as "not the release's", an unpacked file still named .gz as
    "unreadable", and a torn unpacked copy beside the good .gz hid the good one."""
    src = tmp_path / "src"
    blobs = fake_mnist(src, monkeypatch)
    (src / "train-images-idx3-ubyte.gz").rename(src / "train-images-idx3-ubyte")  # gzip bytes, no suffix
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(blobs["t10k-images-idx3-ubyte"])  # plain bytes, .gz name
    (src / "train-labels-idx1-ubyte").write_bytes(blobs["train-labels-idx1-ubyte"][:-4])  # torn, beside the .gz
    lines = prepare("mnist", src)
    assert lines[0].startswith("mnist: verified 4 IDX file(s)"), lines
    raw = data_root / "MNIST" / "raw"
    assert all((raw / n).read_bytes() == blobs[n] for n in MNIST_NAMES)
    (src / "train-labels-idx1-ubyte.gz").unlink()  # the torn one alone: refused, naming it
    (raw / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataUnavailable, match=r"train-labels-idx1-ubyte is not the release's train-labels-idx1-ubyte"
                                              r" \(contents: md5 \(not computed: wrong size\), 24 bytes; expected"):
        prepare("mnist", src)


def test_a_wrong_sized_plain_file_is_refused_before_it_is_copied(tmp_path: Path, data_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncompressed source of the wrong size (another file under the release's name: could be gigabytes) was
    copied into the data root in full before being refused."""
    src = tmp_path / "src"
    fake_mnist(src, monkeypatch)
    (src / "train-images-idx3-ubyte.gz").unlink()
    (src / "train-images-idx3-ubyte").write_bytes(bytes(3 << 20))

    def no_copy(*args: object, **kwargs: object) -> tuple[str, int]:
        raise AssertionError("copied a file whose size already said it is not the release's")

    monkeypatch.setattr(data, "_copy_hashing", no_copy)
    with pytest.raises(DataUnavailable, match=r"\(contents: md5 \(not computed: wrong size\), 3,145,728 bytes"):
        prepare("mnist", src)


def test_a_killed_prepare_leaves_no_leftovers_after_the_next(tmp_path: Path, data_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 skips every cleanup: its part files and temporary folders (hundreds of MB) stayed for good. The
    next prepare (holding the lock every writer holds) removes them, and only them."""
    raw = data_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    stale = [raw / ".train-images-idx3-ubyte.999999.part", raw / ".t10k-labels-idx1-ubyte.12.part"]
    keep = [raw / "notes.part", raw / ".train-images-idx3-ubyte.bak.part", raw / ".other.12.part"]
    for p in stale + keep:
        p.write_bytes(b"x")
    fake_mnist(tmp_path / "src", monkeypatch)
    prepare("mnist", tmp_path / "src")
    assert sorted(p.name for p in raw.iterdir()) == sorted([*MNIST_NAMES, *(p.name for p in keep)])

    archive = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    cls = patch_cifar10(monkeypatch, archive)
    tmp = data_root / f".{cls.base_folder}.4242.tmp"
    (tmp / cls.base_folder).mkdir(parents=True)
    (tmp / cls.base_folder / "data_batch_1").write_bytes(b"half")
    prepare("cifar10", archive.parent)
    assert not tmp.exists() and (data_root / cls.base_folder).is_dir()


def test_kill_9_during_prepare_leaves_a_complete_set_or_a_missing_one(tmp_path: Path) -> None:
    """A real kill -9 while Fashion-MNIST is being unpacked: status never says "present" for a torn set, training
    refuses it, and the next prepare finishes the job and leaves only the 4 files."""
    debian_fashion_mnist()
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    child = subprocess.Popen([sys.executable, "-m", "detox.data", "prepare", "fashion_mnist", "--root", str(root)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (raw.is_dir() and list(raw.glob(".*.part"))) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not list(raw.glob(".*.part")):
        pytest.skip("the prepare finished before it could be killed mid-file")
    assert data.status(root, ["fashion_mnist"])[0].startswith("fashion_mnist: missing: ")
    with pytest.raises(DataUnavailable):  # nothing half-written loads (the Debian source is not looked at here)
        load_data(make_cfg(["dataset=fashion_mnist", f"data_root={root}", "dataset.download=false",
                            f"dataset.source={tmp_path / 'none'}"]).dataset)
    assert prepare("fashion_mnist", root=root)[1].startswith("fashion_mnist: ready: 60000 training / 10000 test")
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_NAMES)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_unit_sampler_refuses_a_batch_size_that_is_not_a_positive_integer(bad: object) -> None:
    """0 failed later as ZeroDivisionError, -1 as numpy's ValueError about seeds, 2.5 as a TypeError at the first
    slice, True ran as a batch of 1."""
    with pytest.raises(ValueError, match=rf"^batch_size={bad!r}: must be an integer >= 1$"):
        UnitSampler(100, bad, 0, 0)  # type: ignore[arg-type]
    assert len(UnitSampler(100, np.int64(8), 0, 0).indices(3)) == 8  # numpy integers are integers


DRAW = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from conftest import fake_svhn, make_cfg
from detox.data import UnitSampler, load_data
d = load_data(make_cfg(["dataset=synthetic", "dataset.shape=[3,9,7]", "dataset.train_size=50"]).dataset)
h = hashlib.sha256()
for unit in range(3):
    s = UnitSampler(50, 7, 11, unit, "crop-flip-reflect")
    for step in {steps}:
        x, y = s.batch(d, step)
        h.update(x.numpy().tobytes() + y.numpy().tobytes())
print(h.hexdigest())
"""


def test_batches_are_the_same_in_any_process_and_step_order() -> None:
    """Held: same seed, same batches, in fresh processes with other hash seeds, and when steps are asked for out
    of order (a resumed run starts mid-epoch; a rank may serve several units)."""
    tests = str(Path(__file__).parent)
    forward, shuffled = [0, 1, 6, 7, 8, 29, 30, 100], [100, 7, 0, 30, 8, 1, 29, 6]
    digests = []
    for steps, hash_seed in ((forward, "1"), (forward, "2")):
        got = subprocess.run([sys.executable, "-c", DRAW.format(tests=tests, steps=steps)], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert got.returncode == 0, got.stderr
        digests.append(got.stdout.strip())
    assert digests[0] == digests[1]
    d = load_data(make_cfg(["dataset=synthetic", "dataset.shape=[3,9,7]", "dataset.train_size=50"]).dataset)
    for unit in range(3):
        a, b = UnitSampler(50, 7, 11, unit, "crop-flip-reflect"), UnitSampler(50, 7, 11, unit, "crop-flip-reflect")
        seen = {t: a.batch(d, t) for t in forward}
        for t in shuffled:
            x, y = b.batch(d, t)
            assert torch.equal(x, seen[t][0]) and torch.equal(y, seen[t][1])


def test_status_and_prepare_leave_a_garbage_root_as_it_was(tmp_path: Path, data_root: Path) -> None:
    """Held: folders where files go, files where folders go, a dangling link, a link loop: status says missing
    (one line each) and changes nothing."""
    (data_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").mkdir(parents=True)
    (data_root / "MNIST").write_text("x")
    (data_root / "cifar-10-batches-py").symlink_to(data_root / "nowhere")
    (data_root / "svhn").symlink_to(data_root / "svhn")
    before = sorted(str(p) for p in data_root.rglob("*"))
    lines = data.status(data_root)
    assert [line.split(":")[1] for line in lines] == [" missing"] * 5, lines
    assert sorted(str(p) for p in data_root.rglob("*")) == before


def test_status_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """'python -m detox.data status | head -1': the reader leaves after one line and print raised BrokenPipeError,
    a traceback after the line the user asked for."""
    child = subprocess.Popen([sys.executable, "-m", "detox.data", "status", "--root", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before it prints: the import alone takes far longer than this
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0 and err == "", err


def test_status_checks_the_md5_training_checks(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """status checked IDX files by size only: a label file with one byte changed was "present", and the run then
    refused it (training checks the md5). Now status says invalid, naming the file."""
    blobs = fake_mnist(tmp_path / "src", monkeypatch)
    prepare("mnist", tmp_path / "src")
    raw = data_root / "MNIST" / "raw"
    assert data.status(names=["mnist"]) == [f"mnist: present in {raw}"]
    labels = bytearray(blobs["train-labels-idx1-ubyte"])
    labels[-1] ^= 1
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    assert data.main(["status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "mnist:" in x and "fashion" not in x)
    assert line.startswith(f"detox.data: mnist: invalid: train-labels-idx1-ubyte ({len(labels)} bytes) fails the "
                           f"release's md5 (damaged, or another data set's file) in {raw}; "), line
    with pytest.raises(DataUnavailable, match="train-labels-idx1-ubyte"):
        load_data(make_cfg(["dataset=mnist", "dataset.download=false"]).dataset)  # what a run says of the file
