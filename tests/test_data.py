"""Data sets and per-unit batch streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg

from detox.data import DataUnavailable, UnitSampler, load_data


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


def test_unit_sampler_drops_incomplete_batch() -> None:
    s = UnitSampler(25, 10, 0, 0)
    assert s.per_epoch == 2 and len(s.indices(1)) == 10
    with pytest.raises(ValueError, match="batch_size=30 exceeds the 25"):
        UnitSampler(25, 30, 0, 0)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_absent_torchvision_data_fails_with_where_to_put_it(name: str, data_root: Path) -> None:
    cfg = make_cfg([f"dataset={name}", "dataset.download=false"])
    with pytest.raises(DataUnavailable) as info:
        load_data(cfg.dataset)
    msg = str(info.value)
    assert "\n" not in msg and f"dataset={name}" in msg and str(data_root) in msg and "download" in msg


def test_fashion_mnist_without_debian_files_says_apt(tmp_path: Path, data_root: Path) -> None:
    cfg = make_cfg(["dataset=fashion_mnist", "dataset.download=false", f"dataset.source={tmp_path / 'none'}"])
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_data(cfg.dataset)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_debian_package(data_root: Path) -> None:
    d = load_data(make_cfg(["dataset=fashion_mnist"]).dataset)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert (data_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
