"""Datasets (``dataset`` option -> loader) as in-memory tensors, and the per-unit batch streams.

Every loader is ``fn(cfg_dataset) -> Data`` with images as float32 (N, C, H, W), standardised per channel
with training-set statistics. Batches are drawn by index, statelessly from (seed, unit, step): any rank can
produce any unit's batch for any step, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detox.attacks import TAG_DATA, rng_for


class DataUnavailable(RuntimeError):
    """The data set's files are missing and cannot be fetched; the message says where to put them."""


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: str) -> Data:
        return Data(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)),
                    num_classes=self.num_classes)


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3)
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp(min=1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def _images(x: np.ndarray | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(np.asarray(x)).float().div_(255.0)
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.permute(0, 3, 1, 2).contiguous() if channels_last else t


def _finish(train_x, train_y, test_x, test_y, num_classes: int) -> Data:
    train_x, test_x = _standardise(train_x, test_x)
    return Data(train_x.contiguous(), torch.as_tensor(np.asarray(train_y), dtype=torch.long),
                test_x.contiguous(), torch.as_tensor(np.asarray(test_y), dtype=torch.long), num_classes)


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


def _torchvision(cls_name: str, folder: str, num_classes: int, channels_last: bool) -> Callable[..., Data]:
    def load(cfg) -> Data:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root = _root(cfg)
        try:
            train = cls(str(root), train=True, download=bool(cfg.download))
            test = cls(str(root), train=False, download=bool(cfg.download))
        except Exception as err:  # torchvision raises RuntimeError / URLError offline
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataUnavailable(
                f"dataset={cfg.name}: files not found under {root / folder} and not downloadable ({why}); "
                f"download them once on a machine with internet (torchvision.datasets.{cls_name}"
                f"(root='{root}', download=True)) and copy {root / folder} here, or set dataset.root"
            ) from None
        return _finish(_images(train.data, channels_last), train.targets,
                       _images(test.data, channels_last), test.targets, num_classes)

    load.__name__ = folder.lower()
    return load


_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")


def fashion_mnist(cfg) -> Data:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (gunzipped once into the torchvision layout)."""
    raw = _root(cfg) / "FashionMNIST" / "raw"
    source = Path(str(cfg.source))
    missing = [n for n in _FASHION_FILES if not (raw / n).exists()]
    if missing and all((source / f"{n}.gz").exists() for n in missing):
        raw.mkdir(parents=True, exist_ok=True)
        for n in missing:  # torchvision checks the raw files; links to the .gz fail its checksum
            # a private temporary name and an atomic rename: MPI ranks may unpack at the same time
            part = raw / f"{n}.{os.getpid()}.part"
            with gzip.open(source / f"{n}.gz", "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, raw / n)
    elif missing and not cfg.download:
        raise DataUnavailable(
            f"dataset=fashion_mnist: {len(missing)} IDX files missing under {raw} and none at {source}; "
            f"run 'apt-get install dataset-fashion-mnist', or put the files in {raw}, or set dataset.source"
        )
    return _torchvision("FashionMNIST", "FashionMNIST", 10, False)(cfg)


DATASETS: dict[str, Callable[..., Data]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "mnist": _torchvision("MNIST", "MNIST", 10, False),
    "cifar10": _torchvision("CIFAR10", "cifar-10-batches-py", 10, True),
    "cifar100": _torchvision("CIFAR100", "cifar-100-python", 100, True),
    "synthetic": synthetic,
}


def load_data(cfg) -> Data:
    return DATASETS[cfg.name](cfg)


class UnitSampler:
    """Batches of one unit (group, or worker in ``baseline``): its own shuffle of the full training set.

    Epoch e uses the permutation drawn from (seed, unit, e); step t takes the (t mod B)-th batch of epoch
    t // B, where B = n_train // batch_size (the incomplete last batch is dropped).
    """

    def __init__(self, n_train: int, batch_size: int, seed: int, unit: int) -> None:
        if batch_size > n_train:
            raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training samples")
        self.n_train, self.batch_size, self.seed, self.unit = n_train, batch_size, seed, unit
        self.per_epoch = n_train // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = rng_for(self.seed, TAG_DATA, self.unit, epoch).permutation(self.n_train)
        return torch.from_numpy(self._perm[i * self.batch_size : (i + 1) * self.batch_size])
