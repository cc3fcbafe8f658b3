"""Data sets and per-unit batch streams."""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import fake_svhn, make_cfg

from detox import data
from detox.data import IDX_FILES, SPECS, DataUnavailable, UnitSampler, load_data, prepare


def test_digits_split_is_fixed_and_standardised() -> None:
    a, b = load_data(make_cfg().dataset), load_data(make_cfg().dataset)
    assert a.shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train_y) + len(a.test_y) == 1797 and len(a.test_y) == 359
    # stratified: every class keeps its share in the test split
    assert torch.bincount(a.test_y).min() >= 17
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert abs(float(a.train_x.mean())) < 1e-4 and float(a.train_x.std()) == pytest.approx(1.0, abs=1e-3)


def test_synthetic_has_any_shape() -> None:
    d = load_data(make_cfg(["dataset=synthetic", "dataset.shape=[3,5,7]", "dataset.num_classes=4",
                            "dataset.train_size=40", "dataset.test_size=10"]).dataset)
    assert d.train_x.shape == (40, 3, 5, 7) and d.test_x.shape == (10, 3, 5, 7)
    assert int(d.train_y.max()) < 4


def test_unit_sampler_is_a_per_unit_shuffle_of_each_epoch() -> None:
    s0, s0_again, s1 = UnitSampler(100, 10, 7, 0), UnitSampler(100, 10, 7, 0), UnitSampler(100, 10, 7, 1)
    epoch0 = np.concatenate([s0.indices(t).numpy() for t in range(10)])
    assert sorted(epoch0) == list(range(100))  # every sample once per epoch
    assert torch.equal(s0_again.indices(13), s0.indices(13))  # stateless in the step: resumable, any rank
    assert not torch.equal(s1.indices(0), UnitSampler(100, 10, 7, 0).indices(0))  # units differ
    assert not torch.equal(s0.indices(10), s0.indices(0))  # epochs reshuffle


@pytest.mark.parametrize("how", ["crop-flip-reflect", "crop-flip"])
def test_augmentation_is_the_originals_torchvision_pipeline(how: str) -> None:
    """The original (src/util.py) augments raw [0, 1] images with torchvision before normalising: CIFAR reflect-pads
    4 pixels, RandomCrop(32), RandomHorizontalFlip; SVHN RandomCrop(32, padding=4) (zero fill) and the flip. Ours
    works on standardised images: for the same offsets and flips both give the same standardised batch."""
    import torchvision.transforms.functional as tf

    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)).float() / 255
    mean, std = raw.mean(dim=(0, 2, 3), keepdim=True), raw.std(dim=(0, 2, 3), keepdim=True)
    x = (raw - mean) / std
    out = data.AUGMENTS[how](x, np.random.default_rng(5), (-mean / std)[0])
    rng = np.random.default_rng(5)  # the same draws, in crop_flip's order: tops, lefts, flips
    top, left, flip = rng.integers(0, 9, 6), rng.integers(0, 9, 6), rng.random(6) < 0.5
    assert flip.any() and not flip.all()
    for i in range(6):
        img = tf.pad(raw[i], [4], padding_mode="reflect" if how == "crop-flip-reflect" else "constant")
        img = tf.crop(img, int(top[i]), int(left[i]), 32, 32)
        img = tf.hflip(img) if flip[i] else img
        torch.testing.assert_close(out[i], ((img - mean) / std)[0], rtol=0, atol=1e-6)


def test_augmented_batches_are_drawn_from_seed_unit_step() -> None:
    d = load_data(make_cfg(["dataset=synthetic", "dataset.shape=[3,12,12]", "dataset.train_size=64"]).dataset)
    s, again = UnitSampler(64, 16, 3, 1, "crop-flip"), UnitSampler(64, 16, 3, 1, "crop-flip")
    x, y = s.batch(d, 5)
    x2, y2 = again.batch(d, 5)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # any rank, a resumed run: the same images
    plain_x, plain_y = UnitSampler(64, 16, 3, 1).batch(d, 5)
    assert torch.equal(y, plain_y) and x.shape == plain_x.shape and not torch.equal(x, plain_x)
    assert not torch.equal(x, UnitSampler(64, 16, 3, 2, "crop-flip").batch(d, 5)[0])  # units draw their own


def test_cifar_and_svhn_presets_augment_as_the_original() -> None:
    assert make_cfg(["dataset=cifar10"]).dataset.augment == "crop-flip-reflect"
    assert make_cfg(["dataset=cifar100"]).dataset.augment == "crop-flip-reflect"
    assert make_cfg(["dataset=svhn"]).dataset.augment == "crop-flip"
    assert make_cfg(["dataset=fashion_mnist"]).dataset.augment is None and make_cfg().dataset.augment is None


def test_unit_sampler_drops_incomplete_batch() -> None:
    s = UnitSampler(25, 10, 0, 0)
    assert s.per_epoch == 2 and len(s.indices(1)) == 10
    with pytest.raises(ValueError, match="batch_size=30 exceeds the 25"):
        UnitSampler(25, 30, 0, 0)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_absent_torchvision_data_fails_naming_the_prepare_command(name: str, data_root: Path) -> None:
    cfg = make_cfg([f"dataset={name}", "dataset.download=false"])
    with pytest.raises(DataUnavailable) as info:
        load_data(cfg.dataset)
    msg = str(info.value)
    assert "\n" not in msg and f"dataset={name}" in msg and str(data_root) in msg
    assert msg.endswith(f"into a folder and run 'python -m detox.data prepare {name} --from <that folder>'")


def test_fashion_mnist_unpacks_debian_files_on_first_use(data_root: Path) -> None:
    debian_fashion_mnist()
    d = load_data(make_cfg(["dataset=fashion_mnist"]).dataset)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert (data_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


# --- python -m detox.data prepare ---------------------------------------------------------------------------------

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def debian_fashion_mnist() -> Path:
    """Debian's files, which the CPU-twin sweeps and these tests need: absent, the test fails saying how to fix it."""
    if not all((DEBIAN / f"{n}.gz").is_file() for n in IDX_NAMES):
        pytest.fail(f"Debian's dataset-fashion-mnist is not installed ({DEBIAN}); run "
                    f"'apt-get install -y dataset-fashion-mnist' (.ci/run installs it)")
    return DEBIAN


def prepare_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m detox.data ARGS`` as a user types it."""
    return subprocess.run([sys.executable, "-m", "detox.data", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_prepare_fashion_mnist_from_debian_package(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    debian_fashion_mnist()
    first = prepare_cli("prepare", "fashion_mnist")
    assert first.returncode == 0, first.stderr
    raw = data_root / "FashionMNIST" / "raw"
    assert f"verified 4 IDX file(s) from {DEBIAN}" in first.stdout and str(raw) in first.stdout
    assert "ready: 60000 training / 10000 test images load" in first.stdout
    for name, (want, size) in IDX_FILES["fashion_mnist"].items():  # the release's contents, gunzipped
        assert md5((raw / name).read_bytes()) == want and (raw / name).stat().st_size == size
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES)  # no part files left behind
    assert data.main(["prepare", "fashion_mnist"]) == 0
    assert "already holds the 4 verified IDX files; nothing to do" in capsys.readouterr().out
    assert data.main(["status"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert f"detox.data: fashion_mnist: present in {raw}" in listing
    assert any(line.startswith("detox.data: cifar10: missing: ") and "prepare cifar10 --from" in line
               for line in listing)
    d = load_data(make_cfg(["dataset=fashion_mnist", "dataset.source=/nonexistent"]).dataset)  # prepared: no source
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)


def test_prepare_refuses_a_damaged_fashion_mnist_file(tmp_path: Path, data_root: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for n in IDX_NAMES[:3]:
        (src / f"{n}.gz").symlink_to(debian_fashion_mnist() / f"{n}.gz")
    labels = bytearray(gzip.decompress((DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # one relabelled test image: same size, other md5
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    bad = prepare_cli("prepare", "fashion_mnist", "--from", str(src))
    line = one_line(bad.stderr)
    assert bad.returncode == 2 and line.startswith("detox.data: error: fashion_mnist: ")
    assert f"{src / 't10k-labels-idx1-ubyte.gz'} is not the release's t10k-labels-idx1-ubyte" in line
    assert f"rerun 'python -m detox.data prepare fashion_mnist --from {src}'" in line
    raw = data_root / "FashionMNIST" / "raw"
    assert not (raw / "t10k-labels-idx1-ubyte").exists() and not list(raw.glob(".*part"))

    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels))[:-40])  # a torn download
    with pytest.raises(DataUnavailable, match=r"t10k-labels-idx1-ubyte.gz is unreadable or truncated \(EOFError"):
        prepare("fashion_mnist", src)


def test_prepare_usage_errors_are_one_line_naming_the_command(tmp_path: Path, data_root: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    def error(*argv: str) -> str:
        assert data.main(list(argv)) == 2
        return one_line(capsys.readouterr().err)

    assert error("prepare", "imagenet").startswith(
        "detox.data: error: prepare imagenet: unknown data set; one of fashion_mnist, mnist, cifar10, cifar100, svhn")
    line = error("prepare", "mnist")
    assert f"no train-images-idx3-ubyte under {data_root / 'MNIST' / 'raw'} and no --from given" in line
    assert line.endswith("run 'python -m detox.data prepare mnist --from <that folder>'")
    assert f"--from {tmp_path / 'nowhere'} does not exist" in error("prepare", "cifar10", "--from",
                                                                    str(tmp_path / "nowhere"))
    assert error("prepare", "svhn", "--root", str(tmp_path / "r")).endswith(
        f"prepare svhn --from <that folder> --root {tmp_path / 'r'}'")
    with pytest.raises(SystemExit) as exit_info:
        data.main(["prepare"])
    assert exit_info.value.code == 2
    assert one_line(capsys.readouterr().err) == ("detox.data: error: the following arguments are required: dataset; "
                                                 "see 'python -m detox.data prepare --help'")


def test_load_errors_name_the_prepare_command(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", data_root / "no-debian-package")
    cfg = make_cfg(["dataset=fashion_mnist", "dataset.download=false", f"dataset.source={data_root / 'none'}"])
    with pytest.raises(DataUnavailable) as info:
        load_data(cfg.dataset)
    assert str(info.value).endswith(
        "run 'apt-get install -y dataset-fashion-mnist && python -m detox.data prepare fashion_mnist'")


# fake releases: the same formats at a few images, with torchvision's checksums patched to theirs

def idx_bytes(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    n = len(labels)
    return (struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes(),
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def test_prepare_mnist_from_user_files(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    src, table = tmp_path / "mnist-files", {}
    src.mkdir()
    arrays = {}
    for split, n in (("train", 40), ("t10k", 12)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        arrays[split] = labels
        for kind, blob in zip(("images-idx3", "labels-idx1"), idx_bytes(images, labels), strict=True):
            name = f"{split}-{kind}-ubyte"
            table[name] = (md5(blob), len(blob))
            # the user's copy: gzipped as released, except one file they had already unpacked
            if name == "t10k-labels-idx1-ubyte":
                (src / name).write_bytes(blob)
            else:
                (src / f"{name}.gz").write_bytes(gzip.compress(blob))
    monkeypatch.setitem(IDX_FILES, "mnist", table)
    lines = prepare("mnist", src)
    assert lines[0] == (f"mnist: verified 4 IDX file(s) from {src} (md5 of the contents = the release's) and wrote "
                        f"them to {data_root / 'MNIST' / 'raw'}")
    assert lines[1].startswith("mnist: ready: 40 training / 12 test images load")
    d = load_data(make_cfg(["dataset=mnist", "dataset.download=false"]).dataset)
    assert d.train_x.shape == (40, 1, 28, 28) and d.test_x.shape == (12, 1, 28, 28)
    assert d.train_y.tolist() == arrays["train"].tolist() and d.test_y.tolist() == arrays["t10k"].tolist()

    monkeypatch.setitem(IDX_FILES, "mnist", {**table, "t10k-labels-idx1-ubyte": ("0" * 32, 20)})
    with pytest.raises(DataUnavailable, match=r"t10k-labels-idx1-ubyte is not the release's .*expected md5 0{32}, "
                                              r"20 bytes\); replace it"):
        prepare("mnist", src)


def cifar_archive(path: Path, base: str, label_key: str, meta_name: str, meta_key: str,
                  batches: list[str]) -> tuple[dict[str, str], list[int]]:
    """A CIFAR-format archive (pickled dicts of uint8 rows) with a few images per batch; md5 of each file."""
    rng, md5s, labels = np.random.default_rng(1), {}, []
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            blob = pickle.dumps(obj)
            md5s[name] = md5(blob)
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for name in batches:
            y = rng.integers(0, 10, 6).tolist()
            labels += y
            add(name, {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), label_key: y})
        add(meta_name, {meta_key: [f"class{i}" for i in range(100)]})
        evil = tarfile.TarInfo("../escaped.txt")  # a hostile member: must not land outside the data root
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    return md5s, labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_prepare_cifar_from_release_archive(name: str, tmp_path: Path, data_root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cls = getattr(torchvision.datasets, SPECS[name].torchvision_class)
    train = [f for f, _ in cls.train_list]
    test = [f for f, _ in cls.test_list]
    src = tmp_path / "downloads"
    src.mkdir()
    archive = src / cls.filename
    md5s, labels = cifar_archive(archive, cls.base_folder, "labels" if name == "cifar10" else "fine_labels",
                                 cls.meta["filename"], cls.meta["key"], [*train, *test])
    monkeypatch.setattr(cls, "train_list", [[f, md5s[f]] for f in train])
    monkeypatch.setattr(cls, "test_list", [[f, md5s[f]] for f in test])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})
    real_md5 = cls.tgz_md5

    # torchvision's own checksum of the real archive: the fake one is refused, with the size it should have
    with pytest.raises(DataUnavailable, match=rf"is not the release torchvision knows .*expected md5 {real_md5}, "
                                              rf"1[67]\d,\d{{3}},\d{{3}} bytes\); download it again from"):
        prepare(name, src)
    monkeypatch.setattr(cls, "tgz_md5", md5(archive.read_bytes()))
    (data_root / cls.base_folder).mkdir()
    (data_root / cls.base_folder / train[0]).write_bytes(b"torn")  # an earlier broken copy: set aside, not mixed in
    lines = prepare(name, src)
    dest = data_root / cls.base_folder
    assert lines[0].startswith(f"{name}: verified {archive} (md5 = torchvision's) and extracted it to {dest}")
    assert f"moved to {dest}.invalid" in lines[0]
    assert (dest.parent / f"{cls.base_folder}.invalid" / train[0]).read_bytes() == b"torn"
    assert not (tmp_path / "escaped.txt").exists() and not (data_root.parent / "escaped.txt").exists()
    d = load_data(make_cfg([f"dataset={name}", "dataset.download=false"]).dataset)
    assert d.train_x.shape == (6 * len(train), 3, 32, 32) and d.test_x.shape == (6 * len(test), 3, 32, 32)
    assert d.train_y.tolist() + d.test_y.tolist() == labels
    assert "nothing to do" in prepare(name, src)[0]

    # an extracted folder works as well as the archive
    other = tmp_path / "root2"
    assert prepare(name, dest, root=other)[0].startswith(f"{name}: copied {dest} to {other / cls.base_folder}")


def test_prepare_svhn_from_mat_files(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "svhn-files"
    labels = fake_svhn(src, monkeypatch)
    lines = prepare("svhn", src)
    assert lines == [f"svhn: verified train_32x32.mat, test_32x32.mat from {src} (md5 = torchvision's) and placed "
                     f"them in {data_root / 'svhn'}",
                     f"svhn: ready: 7 training / 5 test images load; use dataset=svhn (data_root={data_root})"]
    loaded = torchvision.datasets.SVHN(str(data_root / "svhn"), split="test")
    assert loaded.data.shape == (5, 3, 32, 32)

    # dataset=svhn reads the prepared files: channels first, labels 1..10 with 10 meaning the digit 0
    d = load_data(make_cfg(["dataset=svhn", "dataset.download=false"]).dataset)
    assert d.shape == (3, 32, 32) and d.num_classes == 10 and len(d.train_y) == 7 and len(d.test_y) == 5
    assert d.train_y.tolist() == [int(y) % 10 for y in labels["train"].ravel()]
    assert d.test_y.tolist() == [int(y) % 10 for y in labels["test"].ravel()]
    assert torch.allclose(d.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # standardised per channel

    (src / "extra_32x32.mat").write_bytes(b"not the extra split")  # optional, but verified when present
    with pytest.raises(DataUnavailable, match=r"extra_32x32.mat is not the release torchvision knows \(19 bytes"):
        prepare("svhn", src, root=tmp_path / "root2")


def test_svhn_missing_names_the_prepare_command(data_root: Path) -> None:
    with pytest.raises(DataUnavailable) as info:
        load_data(make_cfg(["dataset=svhn", "dataset.download=false"]).dataset)
    message = str(info.value)
    assert message.startswith(f"dataset=svhn: no usable files under {data_root / 'svhn'} and no download "
                              "(dataset.download=false); copy train_32x32.mat and test_32x32.mat"), message
    assert "python -m detox.data prepare svhn --from <that folder>" in message


# --- audit findings: corrupt gzip bodies, bad data roots, status by size, concurrent prepares, SVHN copies ------


def fake_mnist(src: Path, monkeypatch: pytest.MonkeyPatch, n: int = 20) -> dict[str, bytes]:
    """The 4 MNIST IDX files, gzipped, at a few images, with the release table patched to theirs; the contents."""
    rng, table, blobs = np.random.default_rng(3), {}, {}
    src.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        labels = rng.integers(0, 10, n)
        images = np.repeat(labels, 28 * 28).reshape(n, 28, 28) * 25  # compressible: deflate uses Huffman codes
        for kind, blob in zip(("images-idx3", "labels-idx1"), idx_bytes(images, labels), strict=True):
            name = f"{split}-{kind}-ubyte"
            blobs[name], table[name] = blob, (md5(blob), len(blob))
            (src / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
    monkeypatch.setitem(IDX_FILES, "mnist", table)
    return blobs


def test_prepare_refuses_a_gzip_with_a_corrupt_body_in_one_line(tmp_path: Path, data_root: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A good gzip header over a damaged deflate stream raises zlib.error, which used to escape as a traceback
    (exit 1) and leave a 0-byte part file behind."""
    src = tmp_path / "src"
    fake_mnist(src, monkeypatch)
    gz = src / "train-labels-idx1-ubyte.gz"
    body = bytearray(gz.read_bytes())
    for i in range(12, len(body) - 8):  # past the 10-byte header, before the CRC and size trailer
        body[i] ^= 0x5A
    gz.write_bytes(bytes(body))
    with pytest.raises(zlib.error):  # the premise: this is what gzip raises for it (not BadGzipFile, not EOFError)
        gzip.decompress(bytes(body))
    assert data.main(["prepare", "mnist", "--from", str(src)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"detox.data: error: mnist: {gz} is unreadable or truncated (zlib.error: Error -3 "), line
    assert line.endswith(f"rerun 'python -m detox.data prepare mnist --from {src}'")
    raw = data_root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte"]  # the good one; no part file


def test_a_failed_unpack_never_leaves_its_part_file(tmp_path: Path, data_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    fake_mnist(src, monkeypatch)

    def dies_half_way(src: Path, dst: Path, gunzip: bool) -> tuple[str, int]:
        dst.write_bytes(b"half")
        raise KeyboardInterrupt  # anything at all: Ctrl-C, a bug, a signal handler's exception

    monkeypatch.setattr(data, "_copy_hashing", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        prepare("mnist", src)
    assert list((data_root / "MNIST" / "raw").iterdir()) == []


def test_a_data_root_that_is_not_a_folder_is_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("a file, not a folder")
    for args, says in [
        (["prepare", "fashion_mnist", "--root", str(plain)], f"fashion_mnist: the data root {plain} is not a folder"),
        (["prepare", "mnist", "--root", str(plain / "sub")], f"mnist: cannot create the data root {plain / 'sub'} "
                                                            f"(Not a directory)"),
        (["prepare", "fashion_mnist", "--root", "/proc/x"], "fashion_mnist: cannot create the data root /proc/x ("),
        (["status", "--root", str(plain)], f"status: the data root {plain} is not a folder"),
    ]:
        got = prepare_cli(*args)
        assert got.returncode == 2 and got.stdout == "", (args, got.stdout)
        assert one_line(got.stderr).startswith(f"detox.data: error: {says}"), (args, got.stderr)
    assert plain.read_text() == "a file, not a folder"


def test_status_says_invalid_for_a_truncated_file(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """status (and provision's probe, which uses it) checked names only: a truncated file was "present"."""
    blobs = fake_mnist(tmp_path / "src", monkeypatch)
    prepare("mnist", tmp_path / "src")
    raw = data_root / "MNIST" / "raw"
    assert data.status(names=["mnist"]) == [f"mnist: present in {raw}"]
    for size in (10, 0):
        (raw / "train-labels-idx1-ubyte").write_bytes(blobs["train-labels-idx1-ubyte"][:size])
        assert data.main(["status"]) == 0
        listing = capsys.readouterr().out.splitlines()
        assert (f"detox.data: mnist: invalid: train-labels-idx1-ubyte is {size} bytes, the release's is 28 "
                f"(truncated or damaged) in {raw}; copy the 4 IDX files") in listing[1], listing
    assert "nothing to do" not in prepare("mnist", tmp_path / "src")[0]  # prepare repairs it
    assert data.status(names=["mnist"]) == [f"mnist: present in {raw}"]


def patch_cifar10(monkeypatch: pytest.MonkeyPatch, archive: Path) -> type:
    """A fake CIFAR-10 release archive, with torchvision's checksums patched to it."""
    cls = torchvision.datasets.CIFAR10
    train, test = [f for f, _ in cls.train_list], [f for f, _ in cls.test_list]
    md5s, _ = cifar_archive(archive, cls.base_folder, "labels", cls.meta["filename"], cls.meta["key"], [*train, *test])
    monkeypatch.setattr(cls, "train_list", [[f, md5s[f]] for f in train])
    monkeypatch.setattr(cls, "test_list", [[f, md5s[f]] for f in test])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})
    monkeypatch.setattr(cls, "tgz_md5", md5(archive.read_bytes()))
    return cls


def _prepare_in_child(barrier: multiprocessing.synchronize.Barrier, source: str, queue: multiprocessing.Queue) -> None:
    barrier.wait()
    try:
        queue.put(prepare("cifar10", source))
    except BaseException as err:  # noqa: BLE001 (reported to the test, whatever it is)
        queue.put([f"{type(err).__name__}: {err}"])


def test_concurrent_prepares_of_one_set_take_turns(tmp_path: Path, data_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two prepares of CIFAR-10 into one root: the second used to set the first's verified folder aside as
    '.invalid' (failed verification) and lay out a copy of its own. Now the second waits for the first's lock and
    finds the set present. Each verification takes half a second here, so without the lock both pass the "already
    there?" check before either has finished."""
    archive = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    cls = patch_cifar10(monkeypatch, archive)
    check = data._check_archive

    def slow_check(*args: object) -> None:
        time.sleep(0.5)
        check(*args)

    monkeypatch.setattr(data, "_check_archive", slow_check)
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched checksums
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_prepare_in_child, args=(barrier, str(archive.parent), queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    firsts = sorted(lines[0] for lines in results)
    dest = data_root / cls.base_folder
    assert firsts[0].startswith(f"cifar10: {dest} already holds the 7 verified files; nothing to do"), results
    assert firsts[1].startswith(f"cifar10: verified {archive}") and "moved to" not in firsts[1], results
    assert sorted(p.name for p in data_root.iterdir()) == [".cifar10.prepare.lock", cls.base_folder]  # no .invalid
    assert data.status(names=["cifar10"]) == [f"cifar10: present in {dest}"]
    (dest / "data_batch_3").write_bytes((dest / "data_batch_3").read_bytes()[:-1])  # no size known: md5 says it
    assert data.status(names=["cifar10"])[0].startswith("cifar10: invalid: data_batch_3 (")


def test_svhn_is_copied_not_linked(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hard link shared the source's inode: truncating the source afterwards corrupted the "verified" file."""
    src = tmp_path / "svhn-files"
    fake_svhn(src, monkeypatch)
    prepare("svhn", src)
    placed = data_root / "svhn" / "train_32x32.mat"
    before = placed.read_bytes()
    with open(src / "train_32x32.mat", "r+b") as f:
        f.truncate(10)
    assert placed.read_bytes() == before and placed.stat().st_nlink == 1
    assert data.status(names=["svhn"]) == [f"svhn: present in {data_root / 'svhn'}"]
    assert sorted(p.name for p in (data_root / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
