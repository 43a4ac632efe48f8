"""dream_dist.methods.coreset: random / herding / k-center baselines on real digits features."""
import pytest
import torch

from dream_dist.methods.coreset import (METHODS, build_coreset, extract_features, select,
                                train_feature_net)


@pytest.fixture(scope="module")
def feats(digits):
    """(train ImageSet, features of a briefly trained tiny ConvNet)."""
    train, _ = digits
    mean, std = train.mean_std()
    net = train_feature_net(train, mean, std, model="convnet_tiny", epochs=1, seed=0,
                            progress=False)
    return train, extract_features(net, train.images, mean, std, batch_size=300)


def class_feats(feats, c=3):
    train, f = feats
    return f[train.labels == c]


def test_random_is_seeded_and_without_replacement():
    f = torch.randn(50, 4)
    a, b = select("random", f, 10, seed=1), select("random", f, 10, seed=1)
    c = select("random", f, 10, seed=2)
    assert a.dtype == torch.long and a.shape == (10,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50


def test_herding_first_pick_is_nearest_mean_and_tracks_mean(feats):
    f = class_feats(feats)
    mu = f.mean(0)
    sel = select("herding", f, 10)
    assert len(set(sel.tolist())) == 10
    assert int(sel[0]) == int(((f - mu) ** 2).sum(1).argmin())
    gap = lambda s: float((f[s].mean(0) - mu).norm())  # noqa: E731
    random_gaps = [gap(select("random", f, 10, seed=s)) for s in range(5)]
    # Herding matches the class mean far better than random picks of the same size.
    assert gap(sel) < min(random_gaps)
    assert gap(sel) < 0.5 * sum(random_gaps) / 5


def test_herding_with_duplicates_never_repeats():
    f = torch.cat([torch.zeros(5, 3), torch.ones(5, 3)])
    sel = select("herding", f, 10)
    assert sorted(sel.tolist()) == list(range(10))


def test_kcenter_second_pick_is_farthest_and_radius_beats_random(feats):
    f = class_feats(feats)
    sel = select("kcenter", f, 10)
    assert len(set(sel.tolist())) == 10
    assert int(sel[0]) == int(((f - f.mean(0)) ** 2).sum(1).argmin())
    assert int(sel[1]) == int(((f - f[sel[0]]) ** 2).sum(1).argmax())
    radius = lambda s: float(torch.cdist(f, f[s]).min(1).values.max())  # noqa: E731
    for seed in range(5):
        assert radius(sel) <= radius(select("random", f, 10, seed=seed))


def test_select_errors():
    f = torch.randn(5, 2)
    with pytest.raises(ValueError, match="ipc=6 samples from a class of only 5"):
        select("herding", f, 6)
    with pytest.raises(ValueError, match="random, herding, kcenter"):
        select("kmeans", f, 2)
    with pytest.raises(ValueError, match="positive int"):
        select("random", f, 0)


def test_extract_features_batched_and_mode_restored(digits):
    train, _ = digits
    mean, std = train.mean_std()
    net = train_feature_net(train, mean, std, model="convnet_tiny", max_images=100, seed=0,
                            progress=False)
    net.train()
    a = extract_features(net, train.images[:70], mean, std, batch_size=32)
    b = extract_features(net, train.images[:70], mean, std, batch_size=1000)
    assert a.shape == (70, net.feature_dim)
    torch.testing.assert_close(a, b)
    assert net.training


def test_train_feature_net_seeded(digits):
    train, _ = digits
    mean, std = train.mean_std()
    kw = dict(model="convnet_tiny", max_images=100, seed=3, progress=False)
    a, b = train_feature_net(train, mean, std, **kw), train_feature_net(train, mean, std, **kw)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("method", METHODS)
def test_build_coreset(feats, method):
    train, f = feats
    core = build_coreset(method, train, ipc=5, seed=0, features=f)
    assert core.counts() == [5] * 10
    assert core.classes == train.classes
    assert torch.equal(core.labels, torch.arange(10).repeat_interleave(5))
    # Every coreset image is a real training image of its class.
    flat = train.images.flatten(1)
    for img, lab in zip(core.images.flatten(1), core.labels):
        hits = (flat == img).all(1).nonzero().flatten()
        assert len(hits) and (train.labels[hits] == lab).any()
    if method == "random":
        assert torch.equal(core.images, build_coreset("random", train, 5, seed=0).images)
        assert not torch.equal(core.images, build_coreset("random", train, 5, seed=1).images)


def test_build_coreset_errors(feats):
    train, f = feats
    with pytest.raises(ValueError, match="pass features"):
        build_coreset("herding", train, 5)
    with pytest.raises(ValueError, match="to match the train set"):
        build_coreset("kcenter", train, 5, features=f[:10])
    with pytest.raises(ValueError, match="class 0 .*ipc=1000"):
        build_coreset("random", train, 1000)
