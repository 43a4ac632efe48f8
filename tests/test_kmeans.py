"""dream_dist.kmeans: FAISS k-means, exact nearest neighbours and distinct representatives."""
import numpy as np
import pytest
import torch

from dream_dist.kmeans import kmeans, medoids, nearest, nearest_distinct


def blobs(n_per=50, d=8, seed=0):
    rng = np.random.RandomState(seed)
    centres = np.eye(3, d) * 20.0
    x = np.concatenate([c + rng.randn(n_per, d) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(3), n_per), centres


def test_kmeans_recovers_separated_blobs():
    x, truth, centres = blobs()
    c, assign = kmeans(x, 3, seed=0)
    assert c.shape == (3, 8) and c.dtype == np.float32
    assert assign.shape == (150,) and assign.dtype == np.int64
    # Each blob maps to exactly one cluster, and each centroid lies on a true centre.
    for b in range(3):
        assert len(set(assign[truth == b].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    d = np.linalg.norm(c[:, None] - centres[None], axis=2).min(1)
    assert (d < 1.0).all()


def test_kmeans_deterministic_and_accepts_torch():
    x = torch.randn(300, 16, dtype=torch.float64)
    c1, a1 = kmeans(x, 20, seed=3)
    c2, a2 = kmeans(x.numpy(), 20, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)


def test_kmeans_k_equal_n_and_too_large():
    x = np.random.RandomState(0).randn(10, 4)
    c, a = kmeans(x, 10)
    assert sorted(a.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="k=11 clusters from 10 points"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="positive"):
        kmeans(x, 0)


def test_kmeans_rejects_nan():
    x = np.ones((5, 2))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(x, 2)


def test_nearest_is_exact_nn():
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(500, 32, generator=g), torch.randn(40, 32, generator=g)
    idx = nearest(x, q, n=3)
    assert idx.shape == (40, 3) and idx.dtype == np.int64
    d = torch.cdist(q, x)
    np.testing.assert_array_equal(idx[:, 0], d.argmin(1).numpy())
    np.testing.assert_array_equal(idx, d.topk(3, largest=False).indices.numpy())
    with pytest.raises(ValueError, match="n must be in"):
        nearest(x, q, n=501)


def test_nearest_distinct_no_collision_gives_plain_nearest():
    x, _, _ = blobs()
    centroids = kmeans(x, 3)[0]
    idx = nearest_distinct(x, centroids)
    np.testing.assert_array_equal(idx, nearest(x, centroids)[:, 0])


def test_nearest_distinct_never_repeats():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=g)
    # All centroids at the same point: plain nearest would return one sample 10 times.
    cents = torch.zeros(10, 4)
    idx = nearest_distinct(x, cents, per_centroid=3)
    assert idx.shape == (30,) and len(set(idx.tolist())) == 30
    # Together they are exactly the 30 samples nearest the shared point.
    assert set(idx.tolist()) == set(x.norm(dim=1).argsort()[:30].tolist())
    # Widening the search: every sample is needed.
    idx = nearest_distinct(x, torch.zeros(20, 4), per_centroid=3)
    assert sorted(idx.tolist()) == list(range(60))
    with pytest.raises(ValueError, match="distinct samples"):
        nearest_distinct(x, torch.zeros(21, 4), per_centroid=3)


def test_nearest_distinct_collision_goes_to_closer_centroid():
    x = np.array([[0.0], [1.0], [10.0]], dtype=np.float32)
    # Both centroids' nearest sample is x[0]; the closer centroid (0.1) keeps it.
    idx = nearest_distinct(x, np.array([[0.4], [0.1]], dtype=np.float32))
    assert idx.tolist() == [1, 0]


def test_medoids_are_distinct_rows():
    x = torch.randn(200, 6)
    m = medoids(x, 25, seed=0)
    assert m.shape == (25,) and m.dtype == np.int64
    assert len(set(m.tolist())) == 25 and m.min() >= 0 and m.max() < 200
    np.testing.assert_array_equal(m, medoids(x, 25, seed=0))
    with pytest.raises(ValueError, match="k=201"):
        medoids(x, 201)
