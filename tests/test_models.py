"""Model registry: shapes on every supported input, ConvNet facts, errors, and that models learn."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dream_dist.models import MODELS, ConvNet, build_model, register_model

INPUTS = [(1, 28), (3, 32), (3, 64)]


@pytest.fixture(scope="module")
def digits28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1], upsampled to 28 px, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,im_size", INPUTS)
def test_every_model_builds_and_runs(name: str, channels: int, im_size: int) -> None:
    net = build_model(name, channels=channels, num_classes=7, im_size=im_size)
    x = torch.randn(2, channels, im_size, im_size)
    feats = net.embed(x)
    logits = net(x)
    assert isinstance(net.feature_dim, int)
    assert feats.shape == (2, net.feature_dim)
    assert logits.shape == (2, 7)
    assert isinstance(net.classifier, nn.Linear)
    assert net.classifier.in_features == net.feature_dim
    # forward is exactly classifier(embed): methods rely on that to reuse one forward pass.
    net.eval()
    torch.testing.assert_close(net(x), net.classifier(net.embed(x)))


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_convnet3_on_28px_matches_32px_sizes() -> None:
    net = build_model("convnet3", channels=1, num_classes=10, im_size=28)
    assert net.feature_dim == 128 * 4 * 4 == 2048
    convs = _convs(net)
    assert len(convs) == 3
    assert convs[0].padding == (3, 3)
    assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in convs[1:])
    assert all(c.out_channels == 128 for c in convs)
    # the 32-px ConvNet has the same feature size, with padding 1 everywhere
    net32 = build_model("convnet3", channels=3, num_classes=10, im_size=32)
    assert net32.feature_dim == 2048
    assert all(c.padding == (1, 1) for c in _convs(net32))


def test_convnet_depth_follows_image_size() -> None:
    for im_size, depth in [(28, 3), (32, 3), (64, 4)]:
        net = build_model("convnet", channels=3, num_classes=10, im_size=im_size)
        assert isinstance(net, ConvNet)
        assert net.depth == depth
        assert len(_convs(net)) == depth
        assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == depth
        assert net.feature_dim == 128 * 4 * 4


def test_convnet_instance_norm_is_groupnorm_per_channel() -> None:
    net = build_model("convnet", channels=3, num_classes=10, im_size=32)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    for m in norms:
        assert m.num_groups == m.num_channels == 128
        assert m.affine
    # block order: conv -> norm -> ReLU -> avgpool
    kinds = [type(m) for m in net.features]
    assert kinds[:4] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d]


def test_norm_and_width_overrides() -> None:
    bn = build_model("convnet", 3, 10, 32, norm="batch", width=16)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 3
    assert bn.feature_dim == 16 * 4 * 4
    plain = build_model("convnet", 3, 10, 32, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    assert build_model("convnet_tiny", 1, 10, 28).feature_dim == 8 * 4 * 4
    r_in = build_model("resnet10_in", 3, 10, 32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in r_in.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in r_in.modules())
    r_bn = build_model("resnet18", 3, 10, 32)
    assert not any(isinstance(m, nn.GroupNorm) for m in r_bn.modules())
    # ResNet-18 has twice the blocks of ResNet-10
    n10 = len(_convs(build_model("resnet10", 3, 10, 32)))
    n18 = len(_convs(build_model("resnet18", 3, 10, 32)))
    assert (n10, n18) == (1 + 4 * 2 + 3, 1 + 8 * 2 + 3)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        build_model("vgg11", 3, 10, 32)
    msg = str(err.value)
    assert "vgg11" in msg
    for name in MODELS:
        assert name in msg


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="allowed: instance, batch, none"):
        build_model("convnet", 3, 10, 32, norm="layer")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("convnet", 3, 0, 32)
    with pytest.raises(ValueError, match="too deep"):
        build_model("convnet4", 1, 10, 8)
    with pytest.raises(ValueError, match="already registered"):
        register_model("convnet")(lambda **kw: nn.Identity())


@pytest.mark.parametrize("name", ["convnet_tiny", "resnet_tiny"])
def test_sgd_on_digits_reduces_loss(name: str, digits28) -> None:
    x, y = digits28
    x, y = (x[:256] - 0.5) / 0.5, y[:256]
    net = build_model(name, channels=1, num_classes=10, im_size=28)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        before = F.cross_entropy(net(x), y).item()
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert after < 0.7 * before, (before, after)
