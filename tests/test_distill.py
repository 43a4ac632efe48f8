"""The distillation engine: shard and resume equivalence, and each switch as specified."""
from __future__ import annotations

import pytest
import torch

from dream_dist import kmeans
from dream_dist.training import extract_features
from dream_dist.methods.dream.config import DistillConfig, preset
from dream_dist.methods.dream.engine import Distiller, balance_classes, load_checkpoint
from dream_dist.methods.dream.shard import ClassShard

TINY = dict(model="convnet_tiny", init_images=256, batch_real=16, net_images=64, net_batch=32)


def make(train, cfg: DistillConfig, layout: list[list[int]], **kw) -> Distiller:
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(train.num_classes)}
    shards = [ClassShard(cl, real, cfg, mean, std, train.num_classes, seed=0) for cl in layout]
    return Distiller(cfg, shards, train.counts(), train.channels, train.size, seed=0, progress=False, **kw)


@pytest.fixture(scope="module")
def train(digits):
    return digits[0]


def test_two_shards_equal_one_shard(train):
    cfg = preset("dream_plus", iterations=2, inner_steps=3, tau=2, **TINY).resolved("digits")
    one = make(train, cfg, [list(range(10))])
    two = make(train, cfg, balance_classes(train.counts(), 2))
    for d in (one, two):
        d.initialize()
        d.run()
    a, la = one.synthetic()
    b, lb = two.synthetic()
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The run did change the images (not a no-op).
    init = make(train, cfg, [list(range(10))])
    init.initialize()
    assert (init.synthetic()[0] - a).abs().max() > 1e-4


def test_resume_equals_uninterrupted(train, tmp_path):
    cfg = preset("dream_plus", iterations=2, inner_steps=3, tau=2, **TINY).resolved("digits")
    full = make(train, cfg, [list(range(10))])
    full.initialize()
    full.run()
    first = make(train, cfg, [list(range(10))], out_dir=tmp_path, checkpoint_every=1)
    first.initialize()
    first.run(until_step=4)  # stops mid-way through the second outer iteration
    assert first.checkpoint_path.exists() and not list(tmp_path.glob("*.tmp"))
    resumed = make(train, cfg, balance_classes(train.counts(), 2), out_dir=tmp_path)
    resumed.load_state_dict(load_checkpoint(first.checkpoint_path))
    assert resumed.global_step == 4
    resumed.run()
    torch.testing.assert_close(resumed.synthetic()[0], full.synthetic()[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_from_other_config_is_refused(train, tmp_path):
    cfg = preset("idc", iterations=1, inner_steps=1, **TINY).resolved("digits")
    d = make(train, cfg, [list(range(10))], out_dir=tmp_path)
    d.initialize()
    d.run()
    other = make(train, preset("idc", iterations=2, inner_steps=1, **TINY).resolved("digits"), [list(range(10))])
    with pytest.raises(ValueError, match="different config.*iterations"):
        other.load_state_dict(load_checkpoint(d.checkpoint_path))


def test_representative_batch_is_nearest_to_centres(train):
    cfg = preset("dream", iterations=1, inner_steps=1, **TINY).resolved("digits")
    d = make(train, cfg, [[2, 5]])
    d.initialize()
    net = d.new_net((0,))
    shard = d.shards[0]
    stats = shard.recluster(net, 0, 0)
    mean, std = train.mean_std()
    from dream_dist.seeding import CLUSTER, derive_seed

    for c in (2, 5):
        feats = extract_features(net, train.of_class(c), mean, std)
        cent, _ = kmeans.kmeans(feats, 16, niter=cfg.kmeans_iters, seed=derive_seed(0, CLUSTER, 0, 0, c) % 2**31)
        sel = shard.selected[c]
        assert len(sel) == 16 and len(set(sel.tolist())) == 16
        dist = torch.cdist(torch.from_numpy(cent), feats)  # (k, n)
        # Each centre's pick is its nearest sample unless a closer centre claimed that one.
        nearest = dist.argmin(1)
        assert (sel == nearest).float().mean() >= 0.8
        assert (dist[torch.arange(16), sel] <= dist.min(1).values + 1e-4).float().mean() >= 0.8
    # Representative batches sit closer to the class mean than random ones (Fig. 2b).
    assert stats["mmd/selected"] < stats["mmd/random"]


def test_cluster_init_images_are_real_medoids(train):
    cfg = preset("dream_plus", ipc=3, factor=1, iterations=1, inner_steps=1, **TINY).resolved("digits")
    d = make(train, cfg, [[0, 7]])
    net, _ = d.pretrain_for_init()
    d.shards[0].init_synthetic(net)
    mean, std = train.mean_std()
    for c in (0, 7):
        real = train.of_class(c).float() / 255  # idc base: images live in pixel space
        syn = d.shards[0].syn[c].detach()
        # Every initial image IS a real image of the class...
        match = [int(torch.nonzero((real - s).abs().flatten(1).max(1).values < 1e-6)[0]) for s in syn]
        # ...and exactly the medoids of k-means (k = IPC·f²) on the init network's features.
        from dream_dist.seeding import SYN_INIT, derive_seed

        feats = extract_features(net, train.of_class(c), mean, std)
        want = kmeans.medoids(feats, 3, niter=cfg.kmeans_iters, seed=derive_seed(0, SYN_INIT, c) % 2**31)
        assert sorted(match) == sorted(want.tolist())


def test_multiformation_init_tiles_four_real_images(train):
    cfg = preset("idc", ipc=1, iterations=1, inner_steps=1, **TINY).resolved("digits")
    assert cfg.factor == 2
    d = make(train, cfg, [[4]])
    d.initialize()
    syn = d.shards[0].syn[4]
    assert syn.shape == (1, 1, 28, 28)


def test_dm_uses_a_fresh_untrained_network_each_iteration(train):
    cfg = preset("dm", iterations=3, **TINY).resolved("digits")
    assert cfg.net_update == "none" and cfg.inner_steps == 1 and cfg.loss == "feature"
    d = make(train, cfg, [list(range(10))])
    seen = []
    orig = d.new_net

    def spy(key):
        net = orig(key)
        seen.append((key, torch.cat([p.detach().flatten() for p in net.parameters()]).clone(), net))
        return net

    d.new_net = spy
    d.initialize()
    d.run()
    assert [k for k, _, _ in seen] == [(0,), (1,), (2,)]
    w = [v for _, v, _ in seen]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    # No network training in DM: each net still has its initial weights after its iteration.
    for _, v, net in seen:
        assert torch.equal(v, torch.cat([p.detach().flatten() for p in net.parameters()]))


def test_dc_trains_network_on_synthetic_data(train):
    cfg = preset("dc", ipc=1, iterations=1, **TINY).resolved("digits")
    assert cfg.net_update == "syn" and cfg.metric == "cos" and cfg.include_fc and not cfg.dsa
    assert preset("dc", ipc=10).inner_steps == 10 and preset("dc", ipc=10).resolved("x").net_steps == 50


def test_idc_metric_by_dataset():
    assert preset("idc").resolved("mnist").metric == "l1"
    assert preset("idc").resolved("mnist").lr_img == pytest.approx(1e-4)
    assert preset("idc").resolved("cifar10").metric == "mse"
    assert preset("idc").resolved("cifar10").lr_img == pytest.approx(5e-3)


@pytest.mark.parametrize("kw,msg", [
    (dict(tau=0), "tau must be a positive"),
    (dict(samples_per_cluster=3, batch_real=128), "multiple of samples_per_cluster"),
    (dict(selection="best"), "unknown 'best'"),
])
def test_bad_configs_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        preset("dream_plus", **kw)


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match=r"unknown method 'dream\+\+'.*dream_plus"):
        preset("dream++")


def test_config_checked_against_data(train):
    counts = train.counts()  # smallest digits class has 139 train images
    with pytest.raises(ValueError, match="ipc.*exceeds|only"):
        preset("dream_plus", ipc=50).resolved("digits").check_data(counts)
    with pytest.raises(ValueError, match="exceeds the .* images clustered"):
        preset("dream_plus", batch_real=256).resolved("digits").check_data(counts)
    preset("dream_plus", ipc=10, batch_real=128).resolved("digits").check_data(counts)


def test_balance_classes_by_count():
    shards = balance_classes([100, 10, 10, 10, 90, 5], 2)
    loads = [sum([100, 10, 10, 10, 90, 5][c] for c in s) for s in shards]
    assert sorted(c for s in shards for c in s) == list(range(6)) and abs(loads[0] - loads[1]) <= 15
    with pytest.raises(ValueError):
        balance_classes([1, 2], 3)
