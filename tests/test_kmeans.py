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
    _, a = kmeans(x, 10)
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


# ---------------------------------------------------------------------------- mini-batch k-means


def uneven_blobs(sizes=(30, 50, 70), d=8, seed=0):
    rng = np.random.RandomState(seed)
    centres = np.eye(len(sizes), d) * 20.0
    x = np.concatenate([c + rng.randn(n, d) for c, n in zip(centres, sizes)]).astype(np.float32)
    return x, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_minibatch_kmeans_centroids_are_blob_means_and_masses_blob_sizes(init):
    from dream_dist.kmeans import cluster_masses, minibatch_kmeans

    x, truth = uneven_blobs()
    c, assign = minibatch_kmeans(x, 3, batch_size=16, niter=40, seed=1, init=init)
    assert c.shape == (3, 8) and c.dtype == np.float32 and assign.dtype == np.int64
    masses = cluster_masses(assign, 3)
    for b, size in enumerate((30, 50, 70)):
        (j,) = set(assign[truth == b].tolist())  # the whole blob lands in one cluster
        assert masses[j] == size
        np.testing.assert_allclose(c[j], x[truth == b].mean(0), atol=1e-4)
    assert masses.sum() == len(x)


def test_minibatch_kmeans_deterministic_and_close_to_lloyd():
    from dream_dist.kmeans import minibatch_kmeans

    g = torch.Generator().manual_seed(0)
    means = torch.randn(12, 16, generator=g) * 4
    x = (means.repeat_interleave(50, 0) + torch.randn(600, 16, generator=g)).numpy()
    c1, a1 = minibatch_kmeans(x, 12, batch_size=64, niter=60, seed=5)
    c2, a2 = minibatch_kmeans(torch.from_numpy(x).double(), 12, batch_size=64, niter=60, seed=5)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    c3, _ = minibatch_kmeans(x, 12, batch_size=64, niter=60, seed=6)
    assert not np.array_equal(c1, c3)

    def inertia(c, a):
        return float(((x - c[a]) ** 2).sum(1).mean())

    # Each point is assigned to its nearest final centroid, and the distortion is within 10%
    # of FAISS's full-batch Lloyd k-means on the same data.
    np.testing.assert_array_equal(a1, ((x[:, None] - c1[None]) ** 2).sum(2).argmin(1))
    ck, ak = kmeans(x, 12, niter=50, seed=5)
    assert inertia(c1, a1) <= 1.1 * inertia(ck, ak)


def test_minibatch_kmeans_and_masses_reject_bad_input():
    from dream_dist.kmeans import cluster_masses, minibatch_kmeans

    x = np.random.RandomState(0).randn(10, 4)
    with pytest.raises(ValueError, match="k=11 clusters from 10 points"):
        minibatch_kmeans(x, 11)
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_kmeans(x, 2, batch_size=0)
    with pytest.raises(ValueError, match="unknown init"):
        minibatch_kmeans(x, 2, init="forgy")
    # Duplicated rows: k-means++ still returns k distinct initial rows, masses still sum to N.
    _, a = minibatch_kmeans(np.zeros((6, 3)), 4, niter=3)
    assert cluster_masses(a, 4).sum() == 6
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        cluster_masses(np.array([0, 2]), 2)
