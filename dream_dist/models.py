"""Networks used for distillation and evaluation, in plain torch, with one registry by name.

    from dream_dist.models import build_model
    net = build_model("convnet", channels=1, num_classes=10, im_size=28)
    logits = net(x)            # (N, num_classes)
    feats = net.embed(x)       # (N, net.feature_dim): the feature used for clustering/matching

Every model exposes the same small surface, so methods never need to know which one they got:
`embed(x)`, `classifier` (the final nn.Linear), `forward(x) = classifier(embed(x))` and
`feature_dim`. Weights keep torch's default initialisation because the reference DC/IDC/DREAM
code does; a "better" init would silently change the published numbers.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

NORMS = ("instance", "batch", "none")


class ModelFactory(Protocol):
    """Signature every registered model factory has."""

    def __call__(
        self,
        channels: int,
        num_classes: int,
        im_size: int,
        width: int | None = None,
        norm: str | None = None,
    ) -> nn.Module: ...


MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under `name` in `MODELS`."""

    def deco(fn: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    im_size: int,
    width: int | None = None,
    norm: str | None = None,
) -> nn.Module:
    """Build the registered model `name`.

    width / norm: None keeps the model's own default (e.g. 128 and 'instance' for ConvNet).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    for arg, value in (("channels", channels), ("num_classes", num_classes), ("im_size", im_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int or None, got {width!r}")
    return MODELS[name](channels=channels, num_classes=num_classes, im_size=im_size, width=width,
                        norm=norm)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name: 'instance' | 'batch' | 'none'.

    'instance' is GroupNorm with one group per channel, as in the DC/IDC code: unlike
    nn.InstanceNorm2d it has a learnable affine by default and no running statistics, so a
    network behaves the same in train and eval mode (matching relies on that).
    """
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


# --------------------------------------------------------------------------- ConvNet


def convnet_depth(im_size: int) -> int:
    """Default ConvNet depth: 3 up to 32 px (MNIST, CIFAR), 4 above (TinyImageNet's 64 px)."""
    return 3 if im_size <= 32 else 4


class ConvNet(nn.Module):
    """ConvNet-D of DC/IDC/DREAM: D x [conv3x3 -> norm -> ReLU -> AvgPool2d(2)] -> Linear."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        im_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ConvNet depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        in_ch, size = channels, im_size
        for d in range(depth):
            # 28-px inputs get padding 3 on the first conv so every later map has the 32-px
            # sizes (28 + 6 - 2 = 32): MNIST and CIFAR then share one architecture.
            pad = 3 if (d == 0 and im_size == 28) else 1
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=pad),
                make_norm(norm, width),
                # Not in-place: matching differentiates through these activations (double
                # backward, torch.func), where in-place ops are a source of subtle errors.
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            size = (size + 2 * pad - 2) // 2
            if size < 1:
                raise ValueError(
                    f"ConvNet depth {depth} is too deep for {im_size}-px input (the feature map "
                    f"vanishes after block {d + 1}); use a smaller depth or larger images"
                )
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.depth = depth
        self.feature_dim: int = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened output of the last block, (N, feature_dim)."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def _convnet(depth: int | None, default_width: int) -> ModelFactory:
    def factory(channels: int, num_classes: int, im_size: int, width: int | None = None,
                norm: str | None = None) -> nn.Module:
        return ConvNet(channels, num_classes, im_size,
                       width=width or default_width,
                       depth=depth or convnet_depth(im_size),
                       norm=norm or "instance")

    return factory


register_model("convnet")(_convnet(None, 128))
register_model("convnet3")(_convnet(3, 128))
register_model("convnet4")(_convnet(4, 128))
# Width 8: a few thousand parameters, so tests of whole pipelines run in seconds on a CPU.
register_model("convnet_tiny")(_convnet(None, 8))


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3 with a (projected when needed) identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                make_norm(norm, planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (conv3x3 stride-1 stem, no max-pool) as in the DC/IDC code.

    The small stem keeps 28/32/64-px inputs at usable resolution; global average pooling
    (instead of the reference's fixed 4x4 pool) makes the head independent of the input size.
    It is a mean over (H, W), not nn.AdaptiveAvgPool2d: the same values (torch itself turns a
    1x1 adaptive pool into this mean), stated so that no pooling kernel without a
    deterministic CUDA backward can be picked (dream_dist.determinism).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_blocks: tuple[int, int, int, int],
        width: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, width)
        stages: list[nn.Module] = []
        in_planes = width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, norm))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.feature_dim: int = in_planes
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Pooled, flattened output of the last stage, (N, feature_dim)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.layers(out).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def _resnet(num_blocks: tuple[int, int, int, int], default_norm: str,
            default_width: int) -> ModelFactory:
    def factory(channels: int, num_classes: int, im_size: int, width: int | None = None,
                norm: str | None = None) -> nn.Module:
        # im_size is not needed: the stem and the global pool accept any size >= 8 px.
        if im_size < 8:
            raise ValueError(f"ResNet needs images of at least 8 px (3 stride-2 stages), "
                             f"got {im_size}")
        return ResNet(channels, num_classes, num_blocks, width=width or default_width,
                      norm=norm or default_norm)

    return factory


register_model("resnet10")(_resnet((1, 1, 1, 1), "batch", 64))
register_model("resnet18")(_resnet((2, 2, 2, 2), "batch", 64))
register_model("resnet10_in")(_resnet((1, 1, 1, 1), "instance", 64))
register_model("resnet18_in")(_resnet((2, 2, 2, 2), "instance", 64))
register_model("resnet_tiny")(_resnet((1, 1, 1, 1), "batch", 8))
