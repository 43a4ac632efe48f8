"""Fidelity to the public IDC / DREAM+ code (docs/fidelity.md): the image space and its lr,
the clamp, IDC's DiffAug, CutMix in the network's training, DREAM+'s warm-up and the
evaluation presets — each on small tensors or the digits."""
from __future__ import annotations

import pytest
import torch

from dream_dist.augment import DSA, dc_augment
from dream_dist.methods.dream.config import preset, tune_lr_img_scale
from dream_dist.methods.dream.engine import Distiller, balance_classes
from dream_dist.methods.dream.shard import ClassShard
from dream_dist.evaluation.protocol import EvalConfig

TINY = dict(model="convnet_tiny", init_images=256, batch_real=16, net_images=64, net_batch=32)


@pytest.fixture(scope="module")
def train(digits):
    return digits[0]


def make(train, cfg, layout, **kw) -> Distiller:
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(train.num_classes)}
    shards = [ClassShard(cl, real, cfg, mean, std, train.num_classes, seed=0) for cl in layout]
    return Distiller(cfg, shards, train.counts(), train.channels, train.size, seed=0, progress=False, **kw)


# ---------------------------------------------------------------- image space and lr

@pytest.mark.parametrize("dataset,ipc,size,lr", [
    ("mnist", 10, 28, 1e-4),            # L1: 1e-4 × 10/10 × (28/28)²
    ("fashion_mnist", 10, 28, 0.766e-4),  # base 32 for everything but 'mnist': × (28/32)²
    ("cifar10", 50, 32, 2.5e-2),        # MSE: 5e-3 × 50/10 × (32/32)²
])
def test_tune_lr_img_values(dataset, ipc, size, lr):
    cfg = preset("idc", ipc=ipc).resolved(dataset, size)
    assert cfg.pixel_space
    assert cfg.lr_img * cfg.lr_img_scale == pytest.approx(lr, rel=2e-3)
    assert tune_lr_img_scale(dataset, ipc, size) == pytest.approx(cfg.lr_img_scale)
    # The DC/DSA/DM code optimises normalised images with its lr as is.
    assert preset("dsa", ipc=ipc).resolved(dataset, size).lr_img_scale == 1.0
    assert not preset("dsa", ipc=ipc).resolved(dataset, size).pixel_space


def test_pixel_space_step_equals_the_reference(train):
    """One image update: the images are pixels, the network sees (x − mean)/std, and SGD
    moves the pixels by lr_img × tune factor × ∂L/∂pixel — as the IDC code's optimizer on
    synset.data."""
    cfg = preset("idc", ipc=1, factor=1, **TINY).resolved("mnist", 28)
    mean, std = train.mean_std()
    shard = ClassShard([3], {3: train.of_class(3)}, cfg, mean, std, 10)
    shard.init_synthetic()
    x0 = shard.syn[3].detach().clone()
    assert 0 <= x0.min() and x0.max() <= 1  # a real image, as pixels
    torch.testing.assert_close(shard.synthetic()[0], (x0 - mean[0]) / std[0])
    w = torch.randn_like(x0)
    loss = (shard.to_net(shard.syn[3]) * w).sum()  # ∂L/∂pixel = w / std, by hand
    (g,) = torch.autograd.grad(loss, [shard.syn[3]])
    torch.testing.assert_close(g, w / std[0])
    shard.syn[3].grad = g
    shard.opt[3].step()
    lr = 1e-4  # MNIST IPC... here IPC 1: × 1/10
    torch.testing.assert_close(shard.syn[3].detach(), x0 - lr * 0.1 * w / std[0])


def test_images_are_clamped_at_every_outer_iteration(train):
    cfg = preset("idc", iterations=2, inner_steps=1, lr_img=1e-12, **TINY).resolved("digits")
    d = make(train, cfg, [list(range(10))])
    d.initialize()
    s = d.shards[0]
    with torch.no_grad():
        for c in s.classes:
            s.syn[c][:, :, :2] = 3.0
            s.syn[c][:, :, -2:] = -1.0
    d.run(until_step=1)  # iteration 0 starts with a clamp; a 1e-12 lr cannot undo it
    for c in s.classes:
        assert s.syn[c].max() <= 1 + 1e-6 and s.syn[c].min() >= -1e-6
    with torch.no_grad():
        s.syn[0][0, 0, 0, 0] = 5.0
    d.run(until_step=1)
    assert s.syn[0][0, 0, 0, 0] == 5.0  # no clamp inside an iteration
    d.run()  # the next iteration starts with one
    assert s.syn[0].max() <= 1 + 1e-6


def test_nearest_tiles_as_the_reference(train):
    cfg = preset("idc", ipc=1, **TINY).resolved("digits")
    assert cfg.tile_mode == "nearest" and cfg.factor == 2
    d = make(train, cfg, [[5]])
    d.initialize()
    stored = d.shards[0].syn[5].detach()
    # Nearest downsampling keeps real pixel values: every value is some k/255.
    k = stored * 255
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- augmentation

def test_idc_diffaug_batch_mode_one_draw_for_real_and_synthetic():
    aug = DSA.idc("color_crop_cutout")
    torch.manual_seed(0)
    real, syn = torch.randn(8, 3, 32, 32), torch.randn(5, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    p = aug.sample(1, 32, generator=g)
    # Colour always, then ONE geometric op (only crop is left), then cutout always.
    assert p.groups == ("color", "crop", "cutout")
    both = aug.apply(torch.cat([real, syn]), p)
    torch.testing.assert_close(both[:8], aug.apply(real, p))
    torch.testing.assert_close(both[8:], aug.apply(syn, p))
    # The full strategy: flip and colour always, one of crop/scale/rotate, cutout.
    full = DSA.idc("color_crop_cutout_flip_scale_rotate")
    seen = set()
    for i in range(40):
        groups = full.sample(1, 32, generator=torch.Generator().manual_seed(i)).groups
        assert groups[:2] == ("flip", "color") and groups[-1] == "cutout" and len(groups) == 4
        seen.add(groups[2])
    assert seen == {"crop", "scale", "rotate"}
    assert not full.align_corners and DSA().align_corners  # IDC: torch's default grid


def test_dc_augment_one_op_per_image():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    out = dc_augment(x, "crop_scale_rotate", generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    # crop: each image is its input shifted by whole pixels in [-3, 4] (the DC code's
    # window offset r in [0, 8) of a 4-px padded copy), the border filled
    # with the batch mean.
    crop = dc_augment(x, "crop", generator=torch.Generator().manual_seed(1))
    fill = x.mean()
    for i in range(16):
        found = False
        for dy in range(-3, 5):
            for dx in range(-3, 5):
                pad = torch.full((1, 36, 36), float(fill))
                pad[:, 4:32, 4:32] = x[i]
                if torch.allclose(crop[i], pad[:, 4 - dy:32 - dy, 4 - dx:32 - dx]):
                    found = True
        assert found
    with pytest.raises(ValueError, match="unknown DC augmentation"):
        dc_augment(x, "flip")


def test_network_training_settings_by_dataset():
    mnist = preset("dream_plus").resolved("mnist", 28)
    assert (mnist.match_strategy, mnist.net_strategy, mnist.net_cutmix) == ("color_crop", "color_crop", 0.0)
    fashion = preset("dream_plus").resolved("fashion_mnist", 28)
    assert (fashion.match_strategy, fashion.net_strategy, fashion.net_cutmix) == ("color_crop_cutout", "color_crop", 0.5)
    cifar = preset("dream_plus").resolved("cifar10", 32)
    assert (cifar.net_images, cifar.batch_real, cifar.net_batch, cifar.net_steps) == (2000, 128, 128, 16)
    idc = preset("idc").resolved("cifar10", 32)
    assert (idc.batch_real, idc.net_batch, idc.warmup_epochs) == (64, 64, 0)
    dc = preset("dc").resolved("mnist", 28)
    assert (dc.momentum_net, dc.weight_decay_net, dc.pixel_space) == (0.0, 0.0, False)
    assert preset("dream").resolved("mnist").init_epochs == 0 and preset("dream").init == "cluster"


def test_cutmix_in_network_training_is_shard_independent(train):
    """CutMix pairs images across classes, so the batch is assembled from every shard: two
    shards still train the network exactly as one does."""
    cfg = preset("idc", iterations=1, inner_steps=2, **TINY).resolved("digits")
    assert cfg.net_cutmix == 0.5
    nets = []
    for layout in ([list(range(10))], balance_classes(train.counts(), 3)):
        d = make(train, cfg, layout)
        d.initialize()
        d.run()
        nets.append(torch.cat([p.detach().flatten() for p in d.net.parameters()]))
    torch.testing.assert_close(nets[0], nets[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DREAM+ warm-up

def test_warmup_runs_before_the_first_matching_step_of_each_iteration(train):
    cfg = preset("dream_plus", iterations=3, inner_steps=2, tau=1, **TINY).resolved("digits")
    assert cfg.warmup_epochs == 1
    d = make(train, cfg, [list(range(10))])
    events = []
    orig_train, orig_match = d.train_epochs, d.shards[0].match_step

    def spy_train(net, opt, epochs, key, desc):
        events.append(("train", key[0], id(net)))
        return orig_train(net, opt, epochs, key, desc)

    def spy_match(net, it, step):
        events.append(("match", it, step, id(net)))
        return orig_match(net, it, step)

    d.train_epochs, d.shards[0].match_step = spy_train, spy_match
    d.initialize()
    init_net = d.net
    d.run()
    kinds = [(e[0], e[1]) if e[0] == "train" else (e[0], e[1], e[2]) for e in events]
    from dream_dist.seeding import INIT_NET, WARMUP

    assert kinds == [("train", INIT_NET), ("match", 0, 0), ("match", 0, 1),
                     ("train", WARMUP), ("match", 1, 0), ("match", 1, 1),
                     ("train", WARMUP), ("match", 2, 0), ("match", 2, 1)]
    # Iteration 0 matches on the cluster-init network; later ones on their warmed-up nets.
    assert events[1][3] == id(init_net)
    assert events[4][3] == events[3][2] != id(init_net)
    assert d.timing["warmup"] > 0 and d.timing["distill"] >= d.timing["warmup"]


# ---------------------------------------------------------------- evaluation presets

def test_eval_preset_idc():
    mnist = EvalConfig.preset("idc").resolved("mnist", factor=2)
    assert (mnist.batch_size, mnist.cutmix_prob, mnist.aug_mode, mnist.aug_strategy) == \
        (64, 0.0, "idc", "color_crop_scale_rotate")
    assert "flip" not in mnist.aug_strategy and mnist.epochs == 1000 and mnist.schedule == "idc"
    mnist1 = EvalConfig.preset("idc").resolved("mnist", factor=1)
    assert (mnist1.cutmix_prob, mnist1.aug_strategy) == (0.5, "color_crop_scale_rotate")
    fashion = EvalConfig.preset("idc").resolved("fashion_mnist", factor=2)
    assert (fashion.cutmix_prob, fashion.aug_strategy) == (0.5, "color_crop_flip_scale_rotate")


def test_eval_preset_dc():
    assert (EvalConfig.preset("dc").resolved("cifar10").epochs, EvalConfig.preset("dc").resolved("cifar10").dsa) == (300, False)
    m = EvalConfig.preset("dc").resolved("mnist")
    assert (m.epochs, m.dsa, m.aug_mode, m.aug_strategy, m.batch_size) == (1000, True, "dc", "crop_scale_rotate", 256)
    d = EvalConfig.preset("dsa").resolved("mnist", 2)
    assert (d.epochs, d.dsa, d.aug_mode, d.cutmix_prob) == (1000, True, "dsa", 0.0)
