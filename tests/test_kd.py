"""RDED's KD evaluation protocol: augmentations, the KD loss, and students on real digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dream_dist.config import ConfigError
from dream_dist.methods.coreset import build_coreset
from dream_dist.data import normalize
from dream_dist.evaluation.kd import (
    KDConfig,
    augment,
    evaluate_kd,
    kd_loss,
    random_resized_crop,
    shuffle_patches,
)
from dream_dist.evaluation.observer import ObserverConfig, train_observer
from dream_dist.run import compose


def _quadrants(values, s=4):
    """(N, 1, 2s, 2s) images whose 4 quadrants are constant, row-major values."""
    out = torch.zeros(len(values), 1, 2 * s, 2 * s)
    for i, v in enumerate(values):
        for q in range(4):
            r, c = divmod(q, 2)
            out[i, :, r * s:(r + 1) * s, c * s:(c + 1) * s] = v[q]
    return out


def test_patch_shuffling_permutes_whole_patches():
    x = _quadrants([[1.0, 2.0, 3.0, 4.0]] * 64)
    y = shuffle_patches(x, 2, torch.Generator().manual_seed(0))
    seen = set()
    for img in y:
        blocks = [img[0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] for r in (0, 1) for c in (0, 1)]
        assert all(b.unique().numel() == 1 for b in blocks)  # patches move whole
        vals = tuple(int(b[0, 0]) for b in blocks)
        assert sorted(vals) == [1, 2, 3, 4]
        seen.add(vals)
    # columns swap and rows swap independently: 4 arrangements, all of them drawn
    assert seen == {(1, 2, 3, 4), (2, 1, 4, 3), (3, 4, 1, 2), (4, 3, 2, 1)}
    assert torch.equal(shuffle_patches(x, 1), x)
    with pytest.raises(ValueError, match="divisible"):
        shuffle_patches(torch.zeros(1, 1, 9, 9), 2)


def test_random_resized_crop():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(5, 1, 1, 1)
    full = random_resized_crop(x, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, x, atol=1e-4)  # area 1, square: the image itself
    g = torch.Generator().manual_seed(0)
    small = random_resized_crop(x, 4, scale=(0.1, 0.3), ratio=(1.0, 1.0), generator=g)
    assert small.shape == (5, 1, 4, 4)
    assert small.min() >= 0 and small.max() <= 63
    # a crop of <= 30 % of the area spans far less than the image's 0..63 range
    assert ((small.amax(dim=(1, 2, 3)) - small.amin(dim=(1, 2, 3))) < 50).all()
    a = random_resized_crop(x, 4, (0.1, 0.3), generator=torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 4, (0.1, 0.3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_augment_shape_and_flip():
    x = torch.randn(8, 3, 16, 16)
    cfg = KDConfig(patch_factor=2, rrc_min_scale=1.0, flip=True)
    y = augment(x, cfg, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    cfg1 = KDConfig(patch_factor=1, rrc_min_scale=1.0, flip=False)
    assert torch.allclose(augment(x, cfg1, torch.Generator().manual_seed(0)), x, atol=1e-4)


def test_kd_loss():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert kd_loss(t, t, 20.0).abs() < 1e-4  # x T² = 400 magnifies float32 rounding
    p = F.softmax(t / 4, 1)
    manual = (p * (p.log() - F.log_softmax(s / 4, 1))).sum(1).mean() * 16
    assert torch.allclose(kd_loss(s, t, 4.0), manual, atol=1e-5)


@pytest.fixture(scope="module")
def observer(digits):
    train, _ = digits
    mean, std = train.mean_std()
    return train_observer(train, mean, std, ObserverConfig(width=16, epochs=8), progress=False)


def test_kd_student_beats_chance_on_digits(digits, observer):
    train, test = digits
    mean, std = train.mean_std()
    core = build_coreset("random", train, 5, seed=0)
    cfg = KDConfig(width=16, epochs=100, runs=1)  # 50 images = 1 step per epoch
    res = evaluate_kd(normalize(core.images, mean, std), core.labels, observer, test, mean, std,
                      cfg, progress=False)
    assert res.soft_labels and "soft labels" in str(res) and res.num_images == 50
    assert res.mean > 60.0, res  # chance is 10 %


class _AlwaysThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 3] = 100.0
        return logits + self.w


def test_targets_come_from_the_teacher_not_the_labels(digits):
    # A teacher that says "3" for everything: a KD student learns "3", whatever the labels.
    train, test = digits
    mean, std = train.mean_std()
    core = build_coreset("random", train, 5, seed=0)
    res = evaluate_kd(normalize(core.images, mean, std), core.labels, _AlwaysThree(), test, mean,
                      std, KDConfig(model="convnet_tiny", epochs=10, runs=1), progress=False)
    share_of_3 = 100.0 * (test.labels == 3).float().mean().item()
    assert res.mean == pytest.approx(share_of_3, abs=0.01)


def test_observer_class_count_must_match(digits, observer):
    train, test = digits
    mean, std = train.mean_std()
    small = test.subset(torch.arange(5))
    small.classes = small.classes[:9]
    with pytest.raises(ValueError, match="observer has 10 outputs but the test set has 9"):
        evaluate_kd(normalize(train.images[:4], mean, std), torch.zeros(4, dtype=torch.long),
                    observer, small, mean, std, KDConfig(epochs=1, runs=1), progress=False)


@pytest.mark.parametrize("override,msg", [
    ("kd.temperature=0", "kd.*temperature must be > 0"),
    ("kd.rrc_min_scale=0", "kd.*rrc_min_scale"),
    ("kd.patch_factor=0", "kd.*patch_factor"),
])
def test_bad_kd_config_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose(["task=rded", override])
