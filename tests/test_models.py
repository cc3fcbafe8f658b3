"""The networks of the original (issue #14 item 2): each is the standard architecture with the CIFAR stem, its
parameter count is what README.md's table says, and the meta-device count the memory check uses is the real one."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torchvision.models as tvm
from conftest import ROOT, make_cfg
from torch import nn

from detox.config import parameter_count
from detox.models import MODELS

CLASSES = 10
STEM_3X3 = 64 * 3 * 3 * 3  # the CIFAR stem's conv: 3 input channels -> 64, 3x3, no bias


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resnet(tv: nn.Module) -> int:
    # torchvision's ImageNet stem is a 7x7 stride-2 conv then a max-pool (no parameters): the CIFAR stem swaps the
    # conv for a 3x3 one and drops the pool
    return count(tv) - count(tv.conv1) + STEM_3X3


def _vgg(tv: nn.Module) -> int:
    # the same conv/BN feature layers; the CIFAR head is one 512 -> classes layer instead of the 4096-wide classifier
    return count(tv.features) + 512 * CLASSES + CLASSES


def _densenet(tv: nn.Module) -> int:
    # the original's CIFAR DenseNet: one 3x3 conv instead of the 7x7 conv + batch norm (+ ReLU, max-pool) stem
    return count(tv) - count(tv.features.conv0) - count(tv.features.norm0) + STEM_3X3


# network option -> (torchvision's standard architecture at 10 classes, the CIFAR adjustment)
STANDARD: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], int]]] = {
    "resnet18": (tvm.resnet18, _resnet),
    "resnet34": (tvm.resnet34, _resnet),
    "resnet50": (tvm.resnet50, _resnet),
    "vgg11": (tvm.vgg11_bn, _vgg),
    "vgg13": (tvm.vgg13_bn, _vgg),
    "densenet121": (tvm.densenet121, _densenet),
}
# the networks without a torchvision counterpart, at the input shape the README quotes
OWN_SHAPES = {"fc": (1, 8, 8), "lenet": (1, 28, 28)}


def readme_counts() -> dict[str, int]:
    """The README's network table: option -> parameter count (the last column's first number)."""
    rows = re.findall(r"^\| `(\w+)` \| [^|\n]+ \| ([\d,]+)[^|\n]* \|$", (ROOT / "README.md").read_text(), flags=re.M)
    return {name: int(n.replace(",", "")) for name, n in rows if name in MODELS}


def shape_of(name: str) -> tuple[int, ...]:
    return OWN_SHAPES.get(name, (3, 32, 32))


def test_every_network_is_in_the_readme_table() -> None:
    assert sorted(readme_counts()) == sorted(MODELS)
    assert set(STANDARD) | set(OWN_SHAPES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_parameter_count_is_the_standard_architectures(name: str) -> None:
    build, adjust = STANDARD[name]
    with torch.device("meta"):  # counts only: no memory, no initialisation work
        expected = adjust(build(num_classes=CLASSES))
        ours = count(MODELS[name]((3, 32, 32), CLASSES))
    assert ours == expected
    assert readme_counts()[name] == expected


@pytest.mark.parametrize("name", sorted(OWN_SHAPES))
def test_own_networks_match_the_readme(name: str) -> None:
    assert readme_counts()[name] == count(MODELS[name](shape_of(name), CLASSES))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_meta_device_count_is_the_real_count(name: str) -> None:
    """detox.config's memory check counts parameters on the meta device: it must build there and agree."""
    shape = shape_of(name)
    cfg = make_cfg([f"network={name}", "dataset=synthetic", f"dataset.shape=[{','.join(map(str, shape))}]"])
    real = MODELS[name](shape, CLASSES)
    assert parameter_count(cfg, list(shape), CLASSES) == count(real)
    if name in STANDARD:  # and the real network runs on a CIFAR-sized batch (BatchNorm needs 2 samples)
        assert real(torch.randn(2, *shape)).shape == (2, CLASSES)


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "densenet121"])
def test_cifar_stem_keeps_the_resolution(name: str) -> None:
    """No stride-2 stem and no max-pool: the first stage sees 32x32 feature maps (ImageNet's stem makes 8x8)."""
    net = MODELS[name]((3, 32, 32), CLASSES)
    first = net.layer1 if name.startswith("resnet") else net.features.denseblock1
    seen = []
    first.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, 32, 32))
    assert seen == [(32, 32)]
