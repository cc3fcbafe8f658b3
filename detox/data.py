"""Datasets (``dataset`` option -> loader) as in-memory tensors, the per-unit batch streams, and the command that
lays out a data set's files: ``python -m detox.data prepare <dataset>`` (see ``main``).

Every loader is ``fn(cfg_dataset) -> Data`` with images as float32 (N, C, H, W), standardised per channel
with training-set statistics. Batches are drawn by index, statelessly from (seed, unit, step): any rank can
produce any unit's batch for any step, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gzip
import hashlib
import importlib.util
import os
import shlex
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from detox.attacks import TAG_AUGMENT, TAG_DATA, rng_for


class DataUnavailable(RuntimeError):
    """The data set's files are missing and cannot be fetched; the message says where to put them."""


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # (C, 1, 1): what a black pixel (0 before standardising) became; the fill of zero-padding augmentations
    black: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: str) -> Data:
        black = None if self.black is None else self.black.to(device)
        return Data(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)),
                    num_classes=self.num_classes, black=black)


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sets standardised with the training set's per-channel statistics, and the (C, 1, 1) value of black."""
    dims = (0, 2, 3)
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp(min=1e-6)
    return (train_x - mean) / std, (test_x - mean) / std, (-mean / std)[0]


def _images(x: np.ndarray | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(np.asarray(x)).float().div_(255.0)
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous() if channels_last else t


def _finish(train_x, train_y, test_x, test_y, num_classes: int) -> Data:
    train_x, test_x, black = _standardise(train_x, test_x)
    return Data(train_x.contiguous(), torch.as_tensor(np.asarray(train_y), dtype=torch.long),
                test_x.contiguous(), torch.as_tensor(np.asarray(test_y), dtype=torch.long), num_classes, black)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: read its data file directly (importing sklearn.datasets costs ~1.5 s
    in every MPI rank); fall back to ``load_digits`` if the file ever moves."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a seeded shuffle puts round(test_fraction * count) in test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits(cfg) -> Data:
    """scikit-learn's bundled 8x8 digits (1,797 images), split once with a fixed seed."""
    images, target = _digits_arrays()
    x = torch.from_numpy(images).unsqueeze(1) / 16.0
    idx_train, idx_test = stratified_split(target, float(cfg.test_fraction), int(cfg.split_seed))
    return _finish(x[idx_train], target[idx_train], x[idx_test], target[idx_test], 10)


def synthetic(cfg) -> Data:
    """Gaussian classes around random prototype images of any shape (tests and benchmarks)."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    shape = tuple(int(s) for s in cfg.shape)
    protos = torch.randn((cfg.num_classes, *shape), generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(cfg.num_classes, (n,), generator=gen)
        return protos[y] + cfg.noise * torch.randn((n, *shape), generator=gen), y

    (train_x, train_y), (test_x, test_y) = draw(cfg.train_size), draw(cfg.test_size)
    return Data(train_x, train_y, test_x, test_y, int(cfg.num_classes))


def _root(cfg) -> Path:
    return Path(str(cfg.root)).expanduser()


def _torchvision(cls_name: str, folder: str, num_classes: int, channels_last: bool,
                 by_split: bool = False) -> Callable[..., Data]:
    """A loader for a torchvision data set. ``by_split``: the class takes ``split="train"|"test"`` and reads its
    files straight from the folder it is given (SVHN: ``root/svhn/{train,test}_32x32.mat``), labels in ``.labels``;
    otherwise ``train=True|False`` under the data root, labels in ``.targets``."""
    def load(cfg) -> Data:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root = _root(cfg)
        try:
            if by_split:
                train, test = (cls(str(root / folder), split=s, download=bool(cfg.download)) for s in ("train", "test"))
            else:
                train, test = (cls(str(root), train=t, download=bool(cfg.download)) for t in (True, False))
        except Exception as err:  # torchvision raises RuntimeError / URLError offline, others on torn files
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not cfg.download:
                why = "dataset.download=false"
            raise DataUnavailable(
                f"dataset={cfg.name}: no usable files under {root / folder} and no download ({why}); "
                f"{_prepare_hint(str(cfg.name), root)}"
            ) from None
        labels = "labels" if by_split else "targets"
        return _finish(_images(train.data, channels_last), getattr(train, labels),
                       _images(test.data, channels_last), getattr(test, labels), num_classes)

    load.__name__ = folder.lower()
    return load


def _read_idx(name: str, path: Path, md5: str, size: int, root: Path) -> np.ndarray:
    """The IDX file at ``path`` as a uint8 array, if its bytes are the release's (``md5``, ``size``).

    The bytes hashed are the bytes parsed. torchvision's MNIST classes check only that the raw files exist (and
    prefer a legacy ``processed/*.pt`` cache to them), so a damaged or foreign file used to be trained on."""
    hint = _prepare_hint(name, root)
    try:
        got_size = path.stat().st_size  # checked before reading: a wrong file may be of any size
        blob = np.fromfile(path, dtype=np.uint8) if got_size == size else None
    except OSError as err:  # missing, a folder in its place, an I/O error
        raise DataUnavailable(f"dataset={name}: cannot read {path} ({err.strerror or err}); {hint}") from None
    if blob is None or blob.size != size:  # (or it changed between the stat and the read)
        raise DataUnavailable(f"dataset={name}: {path} is {got_size if blob is None else blob.size:,} bytes, the "
                              f"release's is {size:,} (truncated or damaged); {hint}")
    got = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if got != md5:
        raise DataUnavailable(f"dataset={name}: {path} is not the release's {path.name} (md5 {got}, expected "
                              f"{md5}: damaged, or another data set's file); {hint}")
    ndim = int(blob[3])  # header: 2 zero bytes, the type (0x08: uint8), ndim, then ndim big-endian int32 sizes
    dims = [int(d) for d in blob[4 : 4 + 4 * ndim].view(">i4")]
    return blob[4 + 4 * ndim :].reshape(dims)


def _idx_arrays(name: str, root: Path) -> dict[str, np.ndarray]:
    """The 4 verified IDX files of ``name`` under ``root`` by file name (``_read_idx``)."""
    raw = root / SPECS[name].where
    return {f: _read_idx(name, raw / f, md5, size, root) for f, (md5, size) in IDX_FILES[name].items()}


def _idx_loader(name: str) -> Callable[..., Data]:
    """MNIST and Fashion-MNIST: read from ``root/<Class>/raw`` with every file verified (``_read_idx``).
    Fashion-MNIST's missing files are first unpacked from Debian's package (``dataset.source``), as
    ``python -m detox.data prepare fashion_mnist`` does; otherwise torchvision downloads them where it can."""

    def load(cfg) -> Data:
        spec, root = SPECS[name], _root(cfg)
        raw = root / spec.where
        missing = [n for n in IDX_FILES[name] if not (raw / n).is_file()]
        if name == "fashion_mnist" and missing:
            source = Path(str(cfg.source)).expanduser()
            if all(_find_idx(source, n, spec.torchvision_class) is not None for n in missing):
                # a data root that is a file, read-only or full is one line here too, not a traceback; the lock
                # makes MPI ranks that start together unpack once
                who = f"dataset={name}"
                _make_root(who, root, "data_root")
                with _prepare_lock(name, root), _writing(who, root, "data_root"):
                    _prepare_idx(name, source, root, str(source))
                missing = [n for n in IDX_FILES[name] if not (raw / n).is_file()]
        if missing:  # torchvision downloads them where it can, else says why in one line (DataUnavailable)
            _torchvision(spec.torchvision_class, spec.torchvision_class, 10, False)(cfg)
        a = _idx_arrays(name, root)
        return _finish(_images(a["train-images-idx3-ubyte"]), a["train-labels-idx1-ubyte"],
                       _images(a["t10k-images-idx3-ubyte"]), a["t10k-labels-idx1-ubyte"], 10)

    load.__name__ = name
    return load


fashion_mnist = _idx_loader("fashion_mnist")


DATASETS: dict[str, Callable[..., Data]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "mnist": _idx_loader("mnist"),
    "cifar10": _torchvision("CIFAR10", "cifar-10-batches-py", 10, True),
    "cifar100": _torchvision("CIFAR100", "cifar-100-python", 100, True),
    # the .mat files hold (N, 3, 32, 32) after torchvision's transpose; digit 0's label 10 is mapped to 0 there
    "svhn": _torchvision("SVHN", "svhn", 10, False, by_split=True),
    "synthetic": synthetic,
}


def load_data(cfg) -> Data:
    return DATASETS[cfg.name](cfg)


PAD = 4  # the original's augmentation pads 4 pixels on each side, then crops back


def crop_flip(x_bchw: torch.Tensor, rng: np.random.Generator, fill: torch.Tensor | None,
              reflect: bool = False) -> torch.Tensor:
    """The original's training augmentation (``src/util.py``) on a batch: pad ``PAD`` pixels on each side (mirrored
    with ``reflect``, else ``fill`` per channel: black, as torchvision pads before normalising), a random H x W crop
    (offsets uniform in 0..2·PAD, as ``RandomCrop``) and a horizontal flip with probability 1/2, per image."""
    b, c, h, w = x_bchw.shape
    if reflect:
        padded = torch.nn.functional.pad(x_bchw, (PAD,) * 4, mode="reflect")
    else:
        padded = (torch.zeros(c, 1, 1, dtype=x_bchw.dtype, device=x_bchw.device) if fill is None else fill)
        padded = padded.expand(b, c, h + 2 * PAD, w + 2 * PAD).clone()
        padded[..., PAD : PAD + h, PAD : PAD + w] = x_bchw
    top, left = rng.integers(0, 2 * PAD + 1, size=b), rng.integers(0, 2 * PAD + 1, size=b)
    flip = torch.from_numpy(rng.random(b) < 0.5).to(x_bchw.device)
    out = torch.stack([padded[i, :, top[i] : top[i] + h, left[i] : left[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out


# ``dataset.augment`` -> fn(batch, rng, black) -> augmented batch (null: none)
AUGMENTS: dict[str, Callable[[torch.Tensor, np.random.Generator, torch.Tensor | None], torch.Tensor]] = {
    "crop-flip": crop_flip,  # SVHN in the original: zero padding
    "crop-flip-reflect": lambda x, rng, black: crop_flip(x, rng, black, reflect=True),  # CIFAR-10/100
}


class UnitSampler:
    """Batches of one unit (group, or worker in ``baseline``): its own shuffle of the full training set.

    Epoch e uses the permutation drawn from (seed, unit, e); step t takes the (t mod B)-th batch of epoch
    t // B, where B = n_train // batch_size (the incomplete last batch is dropped). With ``augment`` the batch of
    step t is augmented with draws from (seed, unit, t), so every engine and a resumed run see the same images.
    """

    def __init__(self, n_train: int, batch_size: int, seed: int, unit: int, augment: str | None = None) -> None:
        # 0 used to fail later as ZeroDivisionError, a negative size drew batches of the wrong length and 2.5 a
        # TypeError at the first slice: say what is allowed instead
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if batch_size > n_train:
            raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training samples")
        self.n_train, self.batch_size, self.seed, self.unit = n_train, batch_size, seed, unit
        self.augment = AUGMENTS[augment] if augment else None
        self.per_epoch = n_train // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = rng_for(self.seed, TAG_DATA, self.unit, epoch).permutation(self.n_train)
        return torch.from_numpy(self._perm[i * self.batch_size : (i + 1) * self.batch_size])

    def batch(self, data: Data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of this unit's batch at ``step``, augmented where the data set says so."""
        idx = self.indices(step).to(data.train_x.device)
        x = data.train_x[idx]
        if self.augment is not None:
            x = self.augment(x, rng_for(self.seed, TAG_AUGMENT, self.unit, step), data.black)
        return x, data.train_y[idx]


# --- preparing data sets: the original's data_prepare.sh as a command ---------------------------------------------
# ``python -m detox.data prepare <dataset> [--from PATH] [--root DIR]`` lays out the files a machine has (Debian's
# Fashion-MNIST, or release archives a user copied over) where torchvision reads them, after checking them against
# the releases' checksums; every data error names that command. Nothing here downloads anything.

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Spec:
    """How one data set is laid out under the data root and what ``--from`` must hold."""

    kind: str  # "idx" (MNIST family), "cifar" or "svhn": which preparation routine
    torchvision_class: str  # the torchvision.datasets class that reads the layout (and holds the checksums)
    where: str  # the folder under the data root the files go to
    files: str  # what the user puts at --from, for messages
    url: str  # where the release comes from, for messages


SPECS: dict[str, Spec] = {
    "fashion_mnist": Spec("idx", "FashionMNIST", "FashionMNIST/raw",
                          "the 4 IDX files (train-images-idx3-ubyte.gz, ...)",
                          "https://github.com/zalandoresearch/fashion-mnist"),
    "mnist": Spec("idx", "MNIST", "MNIST/raw", "the 4 IDX files (train-images-idx3-ubyte.gz, ...)",
                  "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "cifar10": Spec("cifar", "CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": Spec("cifar", "CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz",
                     "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "svhn": Spec("svhn", "SVHN", "svhn", "train_32x32.mat and test_32x32.mat (extra_32x32.mat optional)",
                 "http://ufldl.stanford.edu/housenumbers/"),
}

# md5 and size of the *uncompressed* IDX files of each release. torchvision records only the checksums of the
# .gz files, and Debian recompressed Fashion-MNIST's (other .gz checksums, same contents): the contents are what
# identifies a release.
IDX_FILES: dict[str, dict[str, tuple[str, int]]] = {
    "mnist": {
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47040016),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60008),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7840016),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10008),
    },
}

# sizes of the archives whose md5 torchvision holds: a wrong size says "truncated download" without hashing
KNOWN_SIZES: dict[str, int] = {
    "c58f30108f718f92721af3b95e74349a": 170498071,  # cifar-10-python.tar.gz
    "eb9058c3a382ffc7106e4002c42a8d85": 169001437,  # cifar-100-python.tar.gz
    "e26dedcc434d2e4c54c9b2d4a06d8373": 182040794,  # train_32x32.mat
    "eb5a983be6a315427106f1b164d9cef3": 64275384,  # test_32x32.mat
    "a93ce644f1a588dc4d68dda5feec44a7": 1329278602,  # extra_32x32.mat
}


def default_root() -> Path:
    """The config's default ``data_root``: ``$DETOX_DATA`` or ``~/.cache/detox/data``."""
    return Path(os.environ.get("DETOX_DATA", "~/.cache/detox/data")).expanduser()


THAT_FOLDER = "<that folder>"  # the placeholder for --from in hints (not a path: never shell-quoted)


def _shell(path: str | Path) -> str:
    """``path`` as the shell needs it typed: a folder like 'My Data' is quoted, so the command can be pasted."""
    return str(path) if str(path) == THAT_FOLDER else shlex.quote(str(path))


def prepare_command(name: str, root: Path | None = None, source: str | None = None) -> str:
    """The command line that prepares ``name`` (``--root`` only where it differs from the default)."""
    cmd = f"python -m detox.data prepare {name}"
    if source is not None:
        cmd += f" --from {_shell(source)}"
    if root is not None and Path(root).expanduser() != default_root():
        cmd += f" --root {_shell(root)}"
    return cmd


def _prepare_hint(name: str, root: Path) -> str:
    """What to run when ``name`` is missing under ``root``: the one command that makes it usable here."""
    if name == "fashion_mnist":
        cmd = prepare_command(name, root)
        if not DEBIAN_FASHION_MNIST.is_dir():
            cmd = f"apt-get install -y dataset-fashion-mnist && {cmd}"
        return f"run '{cmd}'"
    spec = SPECS[name]
    return (f"copy {spec.files} from {spec.url} into a folder and run "
            f"'{prepare_command(name, root, THAT_FOLDER)}'")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _idx_candidates(source: Path, name: str, folder: str) -> list[Path]:
    """The files ``name`` and ``name.gz`` in ``source`` and in ``source/<folder>/raw`` (another data root works
    too), in that order."""
    bases = (source, source / folder / "raw")
    return [c for base in bases for c in (base / name, base / f"{name}.gz") if c.is_file()]


def _find_idx(source: Path, name: str, folder: str) -> Path | None:
    """The first of ``_idx_candidates``, or None."""
    return next(iter(_idx_candidates(source, name, folder)), None)


def _is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with gzip's magic bytes (an IDX file starts with two zero bytes). The contents
    decide, not the name: a release file whose '.gz' was dropped (or one unpacked but still named '.gz') used to
    be refused as "not the release's" or "unreadable"."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _copy_hashing(src: Path, dst: Path, gunzip: bool) -> tuple[str, int]:
    """Copy (gunzipping if asked) ``src`` to ``dst``; the md5 and size of what was written.

    A failed write (disk full, quota) raises OSError naming ``dst``: a write error carries no file name of its
    own, and one without a name used to be reported as the source being "unreadable or truncated"."""
    digest, size = hashlib.md5(usedforsecurity=False), 0
    opener = gzip.open if gunzip else open
    with opener(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):  # a read error is the source's: it propagates as it is
            digest.update(block)
            size += len(block)
            try:
                fout.write(block)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(dst)) from None
        try:
            fout.flush()  # the buffered tail fails here, naming dst, rather than at close
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(dst)) from None
    return digest.hexdigest(), size


def _unpack_verified(name: str, src: Path, dest: Path, md5: str, size: int, retry: str) -> None:
    """Gunzip (or copy) ``src`` to ``dest`` if its contents are the release's (``md5``, ``size``).

    The bytes go to a private part file first, renamed into place once verified (MPI ranks may race here); the
    part file never outlives a failure, whatever the failure."""
    url = SPECS[name].url
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        try:
            gunzip, src_size = _is_gzip(src), src.stat().st_size
            if not gunzip and src_size != size:  # refused before copying (a wrong 10 GB file was copied in full)
                got_md5, got_size = "(not computed: wrong size)", src_size
            else:
                got_md5, got_size = _copy_hashing(src, part, gunzip=gunzip)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:  # zlib.error: a corrupt deflate body
            if isinstance(err, OSError) and err.filename == str(part):
                raise  # the part file cannot be written (read-only, disk full): not the source's fault (_writing)
            kind = "zlib.error" if isinstance(err, zlib.error) else type(err).__name__
            raise DataUnavailable(f"{name}: {src} is unreadable or truncated ({kind}: {err}); replace it with the "
                                  f"release's file from {url} and rerun '{retry}'") from None
        if (got_md5, got_size) != (md5, size):
            raise DataUnavailable(
                f"{name}: {src} is not the release's {dest.name} (contents: md5 {got_md5}, {got_size:,} bytes; "
                f"expected md5 {md5}, {size:,} bytes); replace it with the file from {url} and rerun '{retry}'")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _prepare_idx(name: str, source: Path | None, root: Path, source_arg: str | None) -> str:
    """MNIST-family IDX files (gzipped or not) from ``source`` into ``root/<Class>/raw``, contents verified."""
    spec, expected = SPECS[name], IDX_FILES[name]
    raw, cls_folder = root / spec.where, spec.torchvision_class
    retry = prepare_command(name, root, source_arg)
    kept, unpacked = [], []
    for fname, (md5, size) in expected.items():
        dest = raw / fname
        if dest.is_file() and dest.stat().st_size == size and _md5(dest) == md5:
            kept.append(fname)
            continue
        candidates = _idx_candidates(source, fname, cls_folder) if source is not None else []
        if not candidates:
            where = f"{fname}[.gz] not found at {source}" if source is not None else "no --from given"
            raise DataUnavailable(f"{name}: no {fname} under {raw} and {where}; " + _prepare_hint(name, root))
        raw.mkdir(parents=True, exist_ok=True)
        refusals: list[DataUnavailable] = []
        for src in candidates:  # a torn copy beside a good one (x and x.gz) used to hide the good one
            try:
                _unpack_verified(name, src, dest, md5, size, retry)
                break
            except DataUnavailable as err:
                refusals.append(err)
        else:
            raise refusals[0]
        unpacked.append(fname)
    if not unpacked:
        return f"{name}: {raw} already holds the {len(kept)} verified IDX files; nothing to do"
    return (f"{name}: verified {len(unpacked)} IDX file(s) from {source} (md5 of the contents = the release's) and "
            f"wrote them to {raw}" + (f"; {len(kept)} already there" if kept else ""))


def _bad_files(folder: Path, files: dict[str, str]) -> list[str]:
    """The names in ``files`` that are missing from ``folder`` or fail their md5."""
    return [f for f, md5 in files.items() if not (folder / f).is_file() or _md5(folder / f) != md5]


def _check_archive(path: Path, md5: str, name: str, spec: Spec, retry: str) -> None:
    size, want = path.stat().st_size, KNOWN_SIZES.get(md5)
    got = _md5(path) if want is None or size == want else "(not computed: wrong size)"
    if got != md5:
        raise _not_release(path, size, got, md5, name, spec, retry)


def _not_release(path: Path, size: int, got: str, md5: str, name: str, spec: Spec, retry: str) -> DataUnavailable:
    want = KNOWN_SIZES.get(md5)
    expect = f"md5 {md5}" + (f", {want:,} bytes" if want is not None else "")
    return DataUnavailable(f"{name}: {path} is not the release torchvision knows ({size:,} bytes, md5 {got}; "
                           f"expected {expect}); download it again from {spec.url} and rerun '{retry}'")


def _replace_folder(new: Path, dest: Path) -> str:
    """Move ``new`` to ``dest``; an existing (unverified) ``dest`` is kept aside as ``dest.invalid``."""
    note = ""
    if dest.exists():
        aside = dest.with_name(dest.name + ".invalid")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dest, aside)
        note = f" (the files that were there failed verification: moved to {aside})"
    os.replace(new, dest)
    return note


def _prepare_cifar(name: str, source: Path | None, root: Path, source_arg: str | None) -> str:
    """CIFAR-10/100: the release archive (or its extracted folder) into ``root/<base_folder>``, md5-verified."""
    import tarfile

    import torchvision

    spec = SPECS[name]
    cls = getattr(torchvision.datasets, spec.torchvision_class)
    base, dest = cls.base_folder, root / cls.base_folder
    files = {f: md5 for f, md5 in [*cls.train_list, *cls.test_list]} | {cls.meta["filename"]: cls.meta["md5"]}
    if dest.is_dir() and not _bad_files(dest, files):
        return f"{name}: {dest} already holds the {len(files)} verified files; nothing to do"
    if source is None:
        raise DataUnavailable(f"{name}: no files under {dest} and no --from given; " + _prepare_hint(name, root))
    retry = prepare_command(name, root, source_arg)
    candidates = [source, source / cls.filename, source / base] if source.is_dir() else [source]
    archive = next((p for p in candidates if p.is_file() and p.name == cls.filename), None)
    folder = next((p for p in candidates if p.is_dir() and all((p / f).is_file() for f in files)), None)
    if archive is None and folder is None:
        raise DataUnavailable(f"{name}: {source} is neither {cls.filename} nor a folder holding it or {base}/; "
                              + _prepare_hint(name, root))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{base}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if archive is not None:
            _check_archive(archive, cls.tgz_md5, name, spec, retry)
            with tarfile.open(archive, "r:gz") as tar:
                # only the data folder, and the 'data' filter refuses links, devices and paths leaving tmp
                members = [m for m in tar.getmembers() if m.name == base or m.name.startswith(base + "/")]
                tar.extractall(tmp, members=members, filter="data")
            what = f"verified {archive} (md5 = torchvision's) and extracted it"
        else:
            (tmp / base).mkdir()
            for f in files:
                shutil.copyfile(folder / f, tmp / base / f)
            what = f"copied {folder}"
        if bad := _bad_files(tmp / base, files):
            raise DataUnavailable(f"{name}: {', '.join(bad)} in {archive or folder} missing or failing torchvision's "
                                  f"md5; download {spec.url} again and rerun '{retry}'")
        note = _replace_folder(tmp / base, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{name}: {what} to {dest}; all {len(files)} files match torchvision's md5{note}"


def _prepare_svhn(name: str, source: Path | None, root: Path, source_arg: str | None) -> str:
    """SVHN: the .mat files into ``root/svhn`` (torchvision.datasets.SVHN(root/svhn, split=...)), md5-verified."""
    import torchvision

    spec = SPECS[name]
    splits = getattr(torchvision.datasets, spec.torchvision_class).split_list
    dest = root / spec.where
    need = {splits[s][1]: splits[s][2] for s in ("train", "test")}
    optional = {splits["extra"][1]: splits["extra"][2]}
    if dest.is_dir() and not _bad_files(dest, need):
        return f"{name}: {dest} already holds the verified {' and '.join(need)}; nothing to do"
    if source is None or not source.is_dir():
        got = "no --from given" if source is None else f"--from {source} is not a folder"
        raise DataUnavailable(f"{name}: no files under {dest} and {got}; " + _prepare_hint(name, root))
    retry = prepare_command(name, root, source_arg)
    missing = [f for f in need if not (source / f).is_file()]
    if missing:
        raise DataUnavailable(f"{name}: {', '.join(missing)} not found in {source}; " + _prepare_hint(name, root))
    todo = {**need, **{f: m for f, m in optional.items() if (source / f).is_file()}}
    for f, md5 in todo.items():  # a wrong size is refused before anything is copied
        size, want = (source / f).stat().st_size, KNOWN_SIZES.get(md5)
        if want is not None and size != want:
            raise _not_release(source / f, size, "(not computed: wrong size)", md5, name, spec, retry)
    dest.mkdir(parents=True, exist_ok=True)
    # copies, never hard links: a link would share the source's inode, so truncating or editing the source later
    # would change the verified file. The md5 is of the bytes copied, so what is placed is what was verified.
    parts = {f: dest / f".{f}.{os.getpid()}.part" for f in todo}
    try:
        for f, md5 in todo.items():
            got, size = _copy_hashing(source / f, parts[f], gunzip=False)
            if got != md5:
                raise _not_release(source / f, size, got, md5, name, spec, retry)
        for f, part in parts.items():  # only once every file verified: all of them or none
            os.replace(part, dest / f)
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)
    return f"{name}: verified {', '.join(todo)} from {source} (md5 = torchvision's) and placed them in {dest}"


_PREPARE = {"idx": _prepare_idx, "cifar": _prepare_cifar, "svhn": _prepare_svhn}


def _load_check(name: str, root: Path) -> str:
    """Load the prepared layout as training will (MNIST family: ``_idx_arrays``; the rest through torchvision):
    the proof that it is usable."""
    import torchvision

    if SPECS[name].kind == "idx":  # torchvision would read a stale processed/*.pt cache instead, if one exists
        arrays = _idx_arrays(name, root)
        return (f"{len(arrays['train-labels-idx1-ubyte'])} training / {len(arrays['t10k-labels-idx1-ubyte'])} "
                f"test images load")
    cls = getattr(torchvision.datasets, SPECS[name].torchvision_class)
    if name == "svhn":
        train, test = (cls(str(root / SPECS[name].where), split=s) for s in ("train", "test"))
    else:
        train, test = (cls(str(root), train=t) for t in (True, False))
    return f"{len(train)} training / {len(test)} test images load"


def prepare(name: str, source: str | Path | None = None, root: str | Path | None = None) -> list[str]:
    """Lay out, verify and load-check data set ``name``; the lines saying what was done.

    ``source``: a folder (or archive) holding the release's files; Fashion-MNIST defaults to Debian's package.
    ``root``: the data root (default: as the config, ``$DETOX_DATA`` or ``~/.cache/detox/data``)."""
    if name not in SPECS:
        raise DataUnavailable(f"prepare {name}: unknown data set; one of {', '.join(SPECS)} "
                              f"(digits and synthetic need no preparation), e.g. 'python -m detox.data prepare "
                              f"fashion_mnist'")
    root_path = _root_arg(name, root)
    source_arg = None if source is None else str(source)
    src = _path_arg(name, "--from", source) if source is not None else None
    if src is None and name == "fashion_mnist" and DEBIAN_FASHION_MNIST.is_dir():
        src = DEBIAN_FASHION_MNIST
    if src is not None and not src.exists():
        raise DataUnavailable(f"{name}: --from {src} does not exist; " + _prepare_hint(name, root_path))
    _make_root(name, root_path)
    with _prepare_lock(name, root_path), _writing(name, root_path, "--root or $DETOX_DATA"):
        _remove_leftovers(name, root_path)
        did = _PREPARE[SPECS[name].kind](name, src, root_path, source_arg)
        try:
            loads = _load_check(name, root_path)
        except DataUnavailable:  # _read_idx's own line (a file changed under us since it was verified)
            raise
        except Exception as err:  # the files verified, so this is a torchvision/layout problem worth reporting as is
            retry = prepare_command(name, root_path)
            raise DataUnavailable(f"{name}: verified files under {root_path} do not load through torchvision "
                                  f"({type(err).__name__}: {err}); rerun '{retry}'") from None
    return [did, f"{name}: ready: {loads}; use dataset={name} (data_root={root_path})"]


def _path_arg(name: str, flag: str, value: str | Path) -> Path:
    """``--from``, ``--root`` or ``$DETOX_DATA`` as a path: refused in one line if empty (it would silently mean
    the current folder: ``--root ""`` used to lay the data set out wherever the command ran) or if it holds a
    control character (a newline split every message that names the path)."""
    text = str(value)
    if text.strip() and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return Path(text).expanduser()
    why = "is empty (it would mean the current folder)" if not text.strip() else "holds a control character"
    fix = ("set it to a folder or unset it (default ~/.cache/detox/data)" if flag == "$DETOX_DATA"
           else f"name a folder, e.g. {flag} ~/data")
    raise DataUnavailable(f"{name}: {flag}={text!r} {why}; {fix}")


def _root_arg(name: str, root: str | Path | None) -> Path:
    """The data root from ``--root``, else ``$DETOX_DATA``, else the default; checked by ``_path_arg``."""
    if root is not None:
        return _path_arg(name, "--root", root)
    if "DETOX_DATA" in os.environ:  # the config refuses data_root='' too (detox.schema)
        return _path_arg(name, "$DETOX_DATA", os.environ["DETOX_DATA"])
    return default_root()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _writing(name: str, root: Path, key: str) -> Iterator[None]:
    """An OSError while laying files out under ``root`` as one line (it used to escape as a traceback): a
    read-only or full data root, a file where a folder goes, a source file that cannot be read. ``key``: how the
    user names another root (``--root or $DETOX_DATA``, ``data_root``)."""
    try:
        yield
    except OSError as err:
        path = Path(err.filename) if err.filename else None
        why = err.strerror or type(err).__name__
        if path is not None and path != root and root not in path.parents:
            raise DataUnavailable(f"{name}: cannot read {path} ({why}); check it (or copy it again) and "
                                  f"rerun") from None
        if path is None and err.errno not in _DISK_FULL:
            raise DataUnavailable(f"{name}: laying out the files under {root} failed ({why}); rerun") from None
        full = "free space there or " if err.errno in _DISK_FULL else ""
        raise DataUnavailable(f"{name}: cannot write {path or root} ({why}); {full}name a folder you can write "
                              f"with {key}") from None


def _remove_leftovers(name: str, root: Path) -> None:
    """Delete what a killed (``kill -9``) prepare of ``name`` left behind: its part files ``.<file>.<pid>.part``
    and temporary folders ``.<folder>.<pid>.tmp`` (up to hundreds of MB each, never read by anything; they used
    to pile up). Called holding ``name``'s prepare lock, which every writer of these names holds: none is in use."""
    folder, files = _layout(name, root)
    names = [*files, "extra_32x32.mat"] if name == "svhn" else list(files)
    for path in [p for f in names for p in folder.glob(f".{f}.*.part")]:
        if path.name.split(".")[-2].isdigit():
            path.unlink(missing_ok=True)
    if SPECS[name].kind == "cifar":
        for path in root.glob(f".{folder.name}.*.tmp"):
            if path.name.split(".")[-2].isdigit() and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def _not_a_folder(root: Path, key: str = "--root or $DETOX_DATA") -> str:
    return f"the data root {root} is not a folder ({key} must name a folder)"


def _make_root(name: str, root: Path, key: str = "--root or $DETOX_DATA") -> None:
    """Create the data root (the lock lives in it); one line if it is a file or cannot be created (``/proc/x``).
    ``key``: how the user names the root (the config's ``data_root`` when training)."""
    if root.exists() and not root.is_dir():
        raise DataUnavailable(f"{name}: {_not_a_folder(root, key)}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataUnavailable(f"{name}: cannot create the data root {root} ({err.strerror or err}); name a folder "
                              f"you can write with {key}") from None


@contextlib.contextmanager
def _prepare_lock(name: str, root: Path) -> Iterator[None]:
    """One prepare of ``name`` into ``root`` at a time (an exclusive ``flock`` on ``root/.<name>.prepare.lock``).

    Without it, a second prepare that started before the first finished would find a layout it did not verify
    and set the first's valid result aside as ``.invalid``; with it, the second waits and then finds the data
    present. The lock goes with the open file, so a killed prepare never leaves it held."""
    path = root / f".{name}.prepare.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access: a shared file works
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise DataUnavailable(f"{name}: cannot open the lock file {path} ({err.strerror or err})") from None
        fd = None
    if fd is None:  # a root this user cannot write: the prepare can only find the data there (or fail), not race
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"detox.data: waiting for another 'prepare {name}' into {root} to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _layout(name: str, root: Path) -> tuple[Path, dict[str, tuple[str, int | None]]]:
    """Where ``name``'s prepared files lie and, per file, its md5 and size (None where the release fixes none)."""
    import torchvision

    spec = SPECS[name]
    cls = getattr(torchvision.datasets, spec.torchvision_class)
    if spec.kind == "idx":
        return root / spec.where, dict(IDX_FILES[name])
    if spec.kind == "cifar":
        files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        return root / cls.base_folder, {f: (md5, None) for f, md5 in files}
    splits = [cls.split_list[s] for s in ("train", "test")]  # the .mat files as released: sizes are known
    return root / spec.where, {f: (md5, KNOWN_SIZES.get(md5)) for _, f, md5 in splits}


def _invalid(folder: Path, files: dict[str, tuple[str, int | None]]) -> str | None:
    """The first laid-out file that is not the release's, and why; None if all are.

    Each file by its size where the release fixes one (a stat: truncated or empty files show without reading),
    then by its md5, as training checks it: a file of the right size with damaged bytes was "present" here and
    refused by the run. ~500 MB/s here (MNIST 0.1 s, a CIFAR set 0.4 s), paid only where a set is laid out.
    """
    for f, (md5, size) in files.items():
        got = (folder / f).stat().st_size
        if size is not None and got != size:
            return f"{f} is {got:,} bytes, the release's is {size:,} (truncated or damaged)"
        if _md5(folder / f) != md5:
            return f"{f} ({got:,} bytes) fails the release's md5 (damaged, or another data set's file)"
    return None


def status(root: str | Path | None = None, names: Iterable[str] | None = None) -> list[str]:
    """One line per preparable data set (or per one of ``names``): ``present`` (every file laid out, at the
    release's size or md5, see ``_invalid``), ``invalid`` (a file is not the release's) or ``missing``."""
    root_path = _root_arg("status", root)
    if root_path.exists() and not root_path.is_dir():
        raise DataUnavailable(f"status: {_not_a_folder(root_path)}")
    lines = []
    for name in SPECS if names is None else names:
        folder, files = _layout(name, root_path)
        if not all((folder / f).is_file() for f in files):
            lines.append(f"{name}: missing: {_prepare_hint(name, root_path)}")
        elif why := _invalid(folder, files):
            lines.append(f"{name}: invalid: {why} in {folder}; {_prepare_hint(name, root_path)}")
        else:
            lines.append(f"{name}: present in {folder}")
    return lines


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"detox.data: error: {message}; see 'python -m detox.data prepare --help'\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m detox.data prepare <dataset> [--from PATH] [--root DIR]`` and ``python -m detox.data status``."""
    parser = _OneLineParser(prog="python -m detox.data",
                            description="Lay out data sets where detox (torchvision) reads them, verified.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    prep = sub.add_parser("prepare", help="verify and lay out one data set from files on this machine",
                          description="Verify a data set's release files (md5) and lay them out under the data root "
                                      "where detox and torchvision read them. Nothing is downloaded.")
    prep.add_argument("dataset", help=f"one of {', '.join(SPECS)}")
    prep.add_argument("--from", dest="source", metavar="PATH",
                      help="folder (or archive) with the release's files; fashion_mnist defaults to Debian's "
                           f"dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
    prep.add_argument("--root", metavar="DIR", help="data root (default: $DETOX_DATA or ~/.cache/detox/data, as "
                                                    "the config's data_root)")
    stat = sub.add_parser("status", help="which data sets are laid out under the data root")
    stat.add_argument("--root", metavar="DIR", help="data root (default: $DETOX_DATA or ~/.cache/detox/data)")
    args = parser.parse_args(argv)
    try:
        lines = prepare(args.dataset, args.source, args.root) if args.command == "prepare" else status(args.root)
    except DataUnavailable as err:
        print(f"detox.data: error: {err}", file=sys.stderr)
        return 2
    try:
        for line in lines:
            print(f"detox.data: {line}")
        sys.stdout.flush()
    except BrokenPipeError:  # '... status | head -1': the reader left early; a traceback used to follow
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
    return 0


if __name__ == "__main__":
    sys.exit(main())
