"""Networks (``network`` option -> constructor) and the flat-parameter view the PS works on.

Every constructor is ``fn(input_shape, num_classes, **params) -> nn.Module`` with ``input_shape`` = (C, H, W).
The CIFAR networks (ResNet-18/34/50, VGG-11/13 with batch norm, DenseNet-121) are the original DETOX code's
(hwang595/DETOX, src/model_ops: the kuangliu CIFAR ResNet and DenseNet, W. Yang's CIFAR VGG): a 3x3 stride-1 stem
without max-pool, VGG's 512 -> classes head, the same parameters in the same flat order, the same forward pass, and
the same initialisation (``original_init``, ``vgg_init``). ResNet reuses torchvision's blocks (the same layers as
the original's); DenseNet is written out, because torchvision's concatenates a layer's new features after its
input and the original's before (``tests/test_fidelity_audit.py`` checks each against a port of the original).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def fc(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)) -> nn.Module:
    """A multilayer perceptron on the flattened input."""
    dims = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet as in the original DETOX code (conv 20 -> conv 50 -> fc 500), for >= 16x16 inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        def side(s: int) -> int:  # two (5x5 valid conv, 2x2 pool) stages
            return ((s - 4) // 2 - 4) // 2

        flat = 50 * side(h) * side(w)
        self.fc1 = nn.Linear(flat, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(self.fc1(x.flatten(1)))  # the original has no non-linearity between fc1 and fc2


@torch.no_grad()
def original_init(net: nn.Module) -> nn.Module:
    """The initialisation the original's ResNet and DenseNet got: their code sets none, so PyTorch's defaults of
    the version its README tested (1.0.1) — convolutions and linear layers Kaiming-uniform with a = sqrt(5) and a
    bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (unchanged since), BatchNorm gamma ~ U(0, 1) and beta = 0 (PyTorch
    1.2 made gamma 1). Drawn module by module in registration order."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return net


@torch.no_grad()
def vgg_init(net: nn.Module) -> nn.Module:
    """model_ops/vgg.py ``VGG._initialize_weights``: conv weights N(0, 2 / (k * k * out_channels)) and bias 0,
    BatchNorm gamma 1 and beta 0, linear weights N(0, 0.01^2) and bias 0, in module order."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.01)
            m.bias.zero_()
    return net


def _cifar_resnet(block_name: str, layers: Sequence[int]) -> Callable[..., nn.Module]:
    """torchvision's ResNet builder (BasicBlock or Bottleneck, blocks per stage) with the CIFAR stem: a 3x3
    stride-1 first conv and no max-pool, so 32x32 inputs keep their resolution into the first stage."""
    def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
        from torchvision.models import resnet as tv  # torchvision costs ~2 s to import: only when used

        net = tv.ResNet(getattr(tv, block_name), list(layers), num_classes=num_classes)
        net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        return original_init(net)  # torchvision's builder re-draws its convs (Kaiming normal); the original did not

    return build


resnet18 = _cifar_resnet("BasicBlock", (2, 2, 2, 2))
resnet34 = _cifar_resnet("BasicBlock", (3, 4, 6, 3))
resnet50 = _cifar_resnet("Bottleneck", (3, 4, 6, 3))


def _cifar_vgg(table: str) -> Callable[..., nn.Module]:
    """VGG with batch norm from torchvision's layer table (``"A"`` = VGG-11, ``"B"`` = VGG-13, the original's
    ``cfg`` tables) and the 512 -> classes CIFAR head and initialisation of the original's model_ops/vgg.py (no
    4096-wide fully connected layers)."""
    def build(input_shape: Sequence[int], num_classes: int) -> nn.Module:
        from torchvision.models.vgg import cfgs as vgg_cfgs

        layers: list[nn.Module] = []
        c = input_shape[0]
        for v in vgg_cfgs[table]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        return vgg_init(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)))

    return build


vgg11 = _cifar_vgg("A")
vgg13 = _cifar_vgg("B")


class _DenseLayer(nn.Module):
    """model_ops/densenet.py ``Bottleneck``: BN-ReLU-conv 1x1 (4 x growth) and BN-ReLU-conv 3x3 (growth), the new
    features concatenated *before* the input (torchvision's DenseNet puts them after)."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([out, x], 1)


class _Transition(nn.Module):
    """model_ops/densenet.py ``Transition``: BN-ReLU-conv 1x1, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    """model_ops/densenet.py ``DenseNet`` (reduction 0.5, a 3x3 stem of 2 x growth channels, final BN-ReLU, global
    average pooling, linear head) with torchvision's attribute names (``features.conv0``, ``features.denseblock1``,
    ..., ``features.norm5``, ``classifier``); parameters in the original's order."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, blocks: Sequence[int], growth: int) -> None:
        super().__init__()
        planes = 2 * growth
        parts: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(input_shape[0], planes, kernel_size=3, padding=1, bias=False))]
        for i, n in enumerate(blocks, start=1):
            layers = []
            for j in range(n):
                layers.append((f"denselayer{j + 1}", _DenseLayer(planes, growth)))
                planes += growth
            parts.append((f"denseblock{i}", nn.Sequential(OrderedDict(layers))))
            if i < len(blocks):
                out = int(math.floor(planes * 0.5))
                parts.append((f"transition{i}", _Transition(planes, out)))
                planes = out
        parts.append(("norm5", nn.BatchNorm2d(planes)))
        self.features = nn.Sequential(OrderedDict(parts))
        self.classifier = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)  # the original's avg_pool2d(4) on 4x4 maps
        return self.classifier(out.flatten(1))


def densenet121(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The original's DenseNet121(): growth 32, blocks 6-12-24-16, 64 initial features, one 3x3 stride-1 stem
    conv (no stem batch norm, ReLU or max-pool)."""
    return original_init(DenseNet(input_shape, num_classes, (6, 12, 24, 16), 32))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "fc": fc, "lenet": LeNet, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "vgg11": vgg11,
    "vgg13": vgg13, "densenet121": densenet121,
}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int, params: dict) -> nn.Module:
    """Construct a network with weights drawn from ``seed`` (identical on every rank)."""
    torch.manual_seed(seed)
    return MODELS[name](tuple(input_shape), num_classes, **params)


def bind_flat(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Make every parameter and its ``.grad`` a view into one flat vector; return (w_d, g_d).

    The PS updates ``w_d`` in place and a backward pass accumulates straight into ``g_d``, so a gradient
    reaches the (P, d) matrix with one copy and weights never need re-packing.
    """
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    ref = params[0]
    w_d = torch.empty(d, dtype=ref.dtype, device=ref.device)
    g_d = torch.zeros_like(w_d)
    off = 0
    for p in params:
        k = p.numel()
        w_d[off : off + k].copy_(p.detach().reshape(-1))
        p.data = w_d[off : off + k].view_as(p)
        p.grad = g_d[off : off + k].view_as(p)
        off += k
    return w_d, g_d


def gradient(model: nn.Module, g_d: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward/backward on one batch; the gradient lands in ``g_d``. Returns the batch loss."""
    g_d.zero_()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach())


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Recompute BatchNorm running statistics from fixed training batches (cumulative average).

    The PS holds only the weights; running statistics are not gradients and would differ between engines,
    so the evaluator derives them from the current weights before each evaluation.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
