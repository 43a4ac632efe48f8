"""DSA and CutMix: siamese sharing, differentiability, exact op semantics, reproducibility."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dream_dist.augment import DEFAULT_STRATEGY, DSA, GROUPS, DSAParams, cutmix

SIZE = 28


@pytest.fixture(scope="module")
def digits28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [0, 1], upsampled to 28 px, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


@pytest.fixture(scope="module")
def rgb(digits28) -> torch.Tensor:
    """8 digits made 3-channel with different per-channel values, so colour ops matter."""
    x = digits28[0][:8]
    return torch.cat([x, 0.5 * x + 0.2, 1.0 - x], dim=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def color_params(brightness: float = 0.0, saturation: float = 1.0,
                 contrast: float = 1.0) -> DSAParams:
    return DSAParams(groups=("color",), size=(SIZE, SIZE),
                     brightness=torch.tensor([brightness]),
                     saturation=torch.tensor([saturation]),
                     contrast=torch.tensor([contrast]))


# ---------------------------------------------------------------- (a) siamese sharing


@pytest.mark.parametrize("strategy,mode", [(g, "S") for g in GROUPS] + [(DEFAULT_STRATEGY, "M")])
def test_shared_draw_gives_identical_transform_on_any_batch(rgb, strategy, mode) -> None:
    dsa = DSA(strategy=strategy, mode=mode)
    for seed in range(5):
        p = dsa.sample(1, SIZE, generator=gen(seed))
        full = dsa.apply(rgb, p)
        torch.testing.assert_close(dsa.apply(rgb[:1], p), full[:1])
        torch.testing.assert_close(dsa.apply(rgb[3:6], p), full[3:6])


def test_shared_draw_is_the_same_transform_for_every_image() -> None:
    # a batch of copies of one image stays a batch of identical images
    x = torch.rand(1, 3, SIZE, SIZE).expand(5, -1, -1, -1).contiguous()
    dsa = DSA(mode="M")
    out = dsa.apply(x, dsa.sample(5, SIZE, generator=gen(1)))
    assert torch.equal(out, out[:1].expand_as(out))


def test_per_sample_draws_differ_and_refuse_other_batch_sizes(rgb) -> None:
    dsa = DSA(mode="M")
    p = dsa.sample(8, SIZE, generator=gen(0), per_sample=True)
    assert p.rotate.shape == (8,) and p.crop.shape == (8, 2)
    assert len(set(p.rotate.tolist())) == 8
    with pytest.raises(ValueError, match="drawn for 8 images"):
        dsa.apply(rgb[:3], p)


# ---------------------------------------------------------------- (b) gradients


@pytest.mark.parametrize("group", list(GROUPS))
def test_gradients_reach_the_synthetic_images(rgb, group) -> None:
    dsa = DSA(strategy=group)
    syn = rgb.clone().requires_grad_(True)
    # force a non-trivial flip so the gradient path through the mirror branch is used
    p = dsa.sample(1, SIZE, generator=gen(3))
    if group == "flip":
        p.flip = torch.tensor([True])
    out = dsa.apply(syn, p)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    assert syn.grad is not None
    assert torch.isfinite(syn.grad).all()
    assert syn.grad.abs().sum() > 0


def test_gradients_through_the_full_default_chain(rgb) -> None:
    dsa = DSA(mode="M")
    syn = rgb.clone().requires_grad_(True)
    dsa(syn, generator=gen(0)).square().mean().backward()
    assert syn.grad.abs().sum() > 0


# ---------------------------------------------------------------- (c) exact semantics


def test_flip_mirrors_exactly(rgb) -> None:
    dsa = DSA(strategy="flip")
    yes = DSAParams(groups=("flip",), size=(SIZE, SIZE), flip=torch.tensor([True]))
    no = DSAParams(groups=("flip",), size=(SIZE, SIZE), flip=torch.tensor([False]))
    assert torch.equal(dsa.apply(rgb, yes), torch.flip(rgb, dims=[3]))
    assert torch.equal(dsa.apply(rgb, no), rgb)


def test_brightness_adds_the_offset(rgb) -> None:
    out = DSA(strategy="color").apply(rgb, color_params(brightness=0.3))
    torch.testing.assert_close(out, rgb + 0.3, rtol=0, atol=1e-6)


def test_saturation_zero_gives_the_channel_mean(rgb) -> None:
    out = DSA(strategy="color").apply(rgb, color_params(saturation=0.0))
    mean = rgb.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, mean.expand_as(rgb), rtol=0, atol=1e-6)
    s2 = DSA(strategy="color").apply(rgb, color_params(saturation=2.0))
    torch.testing.assert_close(s2 - mean, 2 * (rgb - mean), rtol=0, atol=1e-5)


@pytest.mark.parametrize("c", [0.5, 1.3])
def test_contrast_scales_deviation_from_image_mean(rgb, c) -> None:
    out = DSA(strategy="color").apply(rgb, color_params(contrast=c))
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out - mean, c * (rgb - mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), mean.flatten(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dy,dx", [(2, -3), (-4, 4), (0, 1)])
def test_crop_translates_content_by_whole_pixels(digits28, dy, dx) -> None:
    x = digits28[0][:4]
    p = DSAParams(groups=("crop",), size=(SIZE, SIZE), crop=torch.tensor([[dy, dx]]))
    out = DSA(strategy="crop").apply(x, p)
    h = w = SIZE
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    assert torch.equal(out[..., yd, xd], x[..., ys, xs])
    # the uncovered border is zero-filled
    covered = torch.zeros(h, w, dtype=torch.bool)
    covered[yd, xd] = True
    assert (out[..., ~covered] == 0).all()


def test_rotate_zero_and_scale_one_are_identity(rgb) -> None:
    rot = DSAParams(groups=("rotate",), size=(SIZE, SIZE), rotate=torch.tensor([0.0]))
    sc = DSAParams(groups=("scale",), size=(SIZE, SIZE), scale=torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(DSA(strategy="rotate").apply(rgb, rot), rgb, rtol=0, atol=1e-5)
    torch.testing.assert_close(DSA(strategy="scale").apply(rgb, sc), rgb, rtol=0, atol=1e-5)


def test_rotate_90_is_an_anticlockwise_quarter_turn(rgb) -> None:
    p = DSAParams(groups=("rotate",), size=(SIZE, SIZE), rotate=torch.tensor([90.0]))
    out = DSA(strategy="rotate").apply(rgb, p)
    torch.testing.assert_close(out, torch.rot90(rgb, 1, dims=(2, 3)), rtol=0, atol=1e-5)


def test_scale_two_shrinks_content_around_the_centre() -> None:
    # sampling grid x2 → the content occupies the central half; the border is zero
    x = torch.ones(1, 1, 29, 29)
    p = DSAParams(groups=("scale",), size=(29, 29), scale=torch.tensor([[2.0, 2.0]]))
    out = DSA(strategy="scale").apply(x, p)
    assert torch.allclose(out[..., 8:21, 8:21], torch.ones(1)), out[0, 0, 14]
    assert (out[..., :6, :] == 0).all() and (out[..., :, 23:] == 0).all()


@pytest.mark.parametrize("size", [28, 32])
def test_cutout_zeroes_a_square_of_half_the_side(size) -> None:
    side = int(0.5 * size + 0.5)
    x = torch.ones(2, 3, size, size)
    dsa = DSA(strategy="cutout")
    cy, cx = 13, 15
    p = DSAParams(groups=("cutout",), size=(size, size), cutout=torch.tensor([[cy, cx]]))
    out = dsa.apply(x, p)
    zero = out[0, 0] == 0
    assert (out == 0).sum(dim=(1, 2, 3)).tolist() == [3 * side * side] * 2
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    assert rows.tolist() == list(range(cy - side // 2, cy - side // 2 + side))
    assert cols.tolist() == list(range(cx - side // 2, cx - side // 2 + side))
    assert (zero == (out[0] == 0)).all()  # same box in every channel
    # at a corner the box is clipped by the border
    corner = DSAParams(groups=("cutout",), size=(size, size), cutout=torch.tensor([[0, 0]]))
    k = side - side // 2
    assert (dsa.apply(x, corner)[0, 0] == 0).sum() == k * k


def test_sampled_magnitudes_match_the_public_ranges() -> None:
    dsa = DSA(mode="M")
    p = dsa.sample(4000, 32, generator=gen(0), per_sample=True)
    assert p.groups == tuple(GROUPS)
    assert -0.5 <= p.brightness.min() and p.brightness.max() < 0.5
    assert 0.0 <= p.saturation.min() and p.saturation.max() < 2.0
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert 0.4 < p.flip.float().mean() < 0.6
    assert p.crop.min() == -4 and p.crop.max() == 4  # int(32 * 0.125 + 0.5)
    assert 1 / 1.2 - 1e-6 <= p.scale.min() and p.scale.max() <= 1.2 + 1e-6
    assert -15 <= p.rotate.min() and p.rotate.max() <= 15 and p.rotate.abs().max() > 14
    assert p.cutout.min() == 0 and p.cutout.max() == 32  # even side: centre in [0, 32]


def test_mode_s_picks_one_group_uniformly() -> None:
    dsa = DSA()
    g = gen(0)
    picks = [dsa.sample(1, SIZE, generator=g).groups for _ in range(600)]
    assert all(len(p) == 1 for p in picks)
    counts = {name: sum(p == (name,) for p in picks) for name in GROUPS}
    assert all(60 < c < 140 for c in counts.values()), counts


def test_strategy_and_mode_validation(rgb) -> None:
    with pytest.raises(ValueError, match="allowed groups: color, crop, cutout, flip"):
        DSA(strategy="color_jitter")
    with pytest.raises(ValueError, match="mode"):
        DSA(mode="X")
    assert torch.equal(DSA(strategy="none")(rgb), rgb)
    with pytest.raises(ValueError, match="needs a value for 'contrast'"):
        DSAParams(groups=("color",), size=(SIZE, SIZE), brightness=torch.zeros(1),
                  saturation=torch.ones(1))
    p = DSA(strategy="crop").sample(1, 32)
    with pytest.raises(ValueError, match="drawn for 32x32"):
        DSA(strategy="crop").apply(rgb, p)


# ---------------------------------------------------------------- (d) reproducibility


def test_seeded_generator_reproduces_and_leaves_global_rng_alone(rgb) -> None:
    dsa = DSA(mode="M")
    state = torch.get_rng_state()
    a = dsa(rgb, generator=gen(7))
    b = dsa(rgb, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, dsa(rgb, generator=gen(8)))
    pa, pb = DSA().sample(1, SIZE, generator=gen(3)), DSA().sample(1, SIZE, generator=gen(3))
    assert pa.groups == pb.groups
    torch.manual_seed(0)
    c = dsa(rgb)
    torch.manual_seed(0)
    assert torch.equal(c, dsa(rgb))


# ---------------------------------------------------------------- (e) CutMix


def test_cutmix_mixes_targets_by_the_pasted_area(digits28) -> None:
    x, y = digits28
    n, k = 16, 10
    # image i is the constant i, so each pixel tells which image it came from
    imgs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, SIZE, SIZE)
    targets = F.one_hot(y[:n], k).float()
    seen_mix = False
    for seed in range(10):
        out, t = cutmix(imgs, targets, beta=1.0, prob=1.0, generator=gen(seed))
        torch.testing.assert_close(t.sum(1), torch.ones(n))
        assert (t >= 0).all()
        for i in range(n):
            src = out[i, 0].unique()
            pasted = (out[i, 0] != i).float().mean().item()
            if len(src) == 2:
                seen_mix = True
                j = int(src[src != i].item())
                expect = targets[i] * (1 - pasted) + targets[j] * pasted
                torch.testing.assert_close(t[i], expect, rtol=0, atol=1e-6)
    assert seen_mix


def test_cutmix_probability_gradients_and_reproducibility(digits28) -> None:
    x = digits28[0][:8].clone().requires_grad_(True)
    targets = F.one_hot(digits28[1][:8], 10).float()
    out, t = cutmix(x, targets, prob=0.0)
    assert out is x and t is targets
    a, ta = cutmix(x, targets, prob=1.0, generator=gen(5))
    b, tb = cutmix(x, targets, prob=1.0, generator=gen(5))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    a.sum().backward()
    # every pixel of the output comes from exactly one input pixel: total gradient = numel
    assert x.grad.sum().item() == pytest.approx(a.numel())
    applied = sum(
        not torch.equal(cutmix(x, targets, generator=gen(s))[0], x) for s in range(200)
    )
    assert 70 < applied < 130  # p = 0.5 (a degenerate empty box is rare)
    with pytest.raises(ValueError, match="soft targets"):
        cutmix(x, digits28[1][:8])
