"""k-means and nearest-neighbour search: the one place that chooses and calls FAISS.

    from dream_dist.kmeans import kmeans, nearest, nearest_distinct, medoids
    centroids, assign = kmeans(feats, k=128, seed=0)    # DREAM's clustering of one class
    batch = nearest_distinct(feats, centroids)          # representative real batch (k,)
    init = medoids(feats, k=ipc * factor**2)            # cluster-centre initialisation

Inputs may be torch tensors (any device, any float dtype) or numpy arrays; outputs are numpy
(float32 centroids, int64 indices) because they index CPU-side data or come straight from
FAISS. Everything else in dream_dist calls these functions instead of importing faiss, so the
CPU/GPU choice and FAISS's quirks (float32 only, C-contiguous only, chatty warnings) are
handled once.

`gpu`: None (auto) uses FAISS's GPU build when it sees a GPU, False forces the CPU, True
requires a GPU. faiss-cpu and faiss-gpu install the same `faiss` module, so the choice is made
at run time.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

__all__ = ["FlatIndex", "kmeans", "nearest", "nearest_distinct", "medoids", "use_gpu"]

_GPU_MAX_K = 2048  # the largest neighbour count FAISS's GPU indexes return


def use_gpu(gpu: bool | None = None) -> bool:
    """Resolve the `gpu` argument: None -> GPU iff FAISS sees one; True without one raises."""
    # faiss-cpu builds may lack get_num_gpus altogether in old versions; treat that as 0.
    n = getattr(faiss, "get_num_gpus", lambda: 0)()
    if gpu is None:
        return n > 0
    if gpu and n == 0:
        raise RuntimeError(
            "gpu=True but FAISS sees no GPU (is faiss-gpu installed instead of faiss-cpu, and "
            "is CUDA visible?); pass gpu=None to fall back to the CPU"
        )
    return bool(gpu)


def _as_f32(x, name: str) -> np.ndarray:
    """(N, D) contiguous float32 numpy array, as FAISS requires."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        # FAISS would silently return garbage (NaN distances compare false everywhere).
        raise ValueError(f"{name} contains NaN or inf values")
    return x


class FlatIndex:
    """Exact L2 search over the rows of `x` (faiss.IndexFlatL2, on GPU when chosen).

    Build once and search many times when the database is fixed (herding searches the same
    class features once per pick).
    """

    def __init__(self, x, gpu: bool | None = None) -> None:
        xb = _as_f32(x, "x")
        self.n, self.d = xb.shape
        self.cpu_index = faiss.IndexFlatL2(self.d)
        self.cpu_index.add(xb)
        self.index = self.cpu_index
        if use_gpu(gpu):
            self.index = faiss.index_cpu_to_all_gpus(self.cpu_index)

    def search(self, queries, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances float32 (Q, n), indices int64 (Q, n)), nearest first."""
        q = _as_f32(queries, "queries")
        if q.shape[1] != self.d:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.d}")
        if not 1 <= n <= self.n:
            raise ValueError(f"n must be in [1, {self.n}] (the number of rows searched), got {n}")
        # FAISS's GPU search returns at most 2048 neighbours; deeper searches (the widening
        # search of nearest_distinct on a big class) run on the CPU copy.
        index = self.cpu_index if n > _GPU_MAX_K else self.index
        dist, idx = index.search(q, n)
        return dist, idx.astype(np.int64, copy=False)


def kmeans(
    x, k: int, niter: int = 20, seed: int = 0, gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the rows of x (N, D) -> (centroids float32 (k, D), assignment int64 (N,)).

    Deterministic for a fixed seed (FAISS seeds its random initial centroids and any
    subsampling from `seed`; the assignment step is an exact search).
    """
    xs = _as_f32(x, "x")
    n, d = xs.shape
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(
            f"cannot make k={k} clusters from {n} points: k must be <= the number of points "
            f"(lower the cluster count or the samples per cluster)"
        )
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(niter),
        seed=int(seed),
        gpu=use_gpu(gpu),
        verbose=False,
        # DREAM clusters ~hundreds of samples of one class into 128 clusters, far below FAISS's
        # default 39 points per centroid; the warning it prints then is expected, not a problem.
        min_points_per_centroid=1,
        # Above k*256 points FAISS trains on a seeded subsample (deterministic, and what
        # keeps clustering a big class cheap); the default is kept for that reason.
        max_points_per_centroid=256,
    )
    km.train(xs)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    # Assign with our own exact index rather than km.index so the GPU/CPU choice is one code
    # path and the assignment of all N points (not only a training subsample) is returned.
    _, assign = FlatIndex(centroids, gpu=gpu).search(xs, 1)
    return centroids, assign[:, 0]


def nearest(x, queries, n: int = 1, gpu: bool | None = None) -> np.ndarray:
    """Indices int64 (Q, n) of the n nearest rows of x for each query, nearest first."""
    return FlatIndex(x, gpu=gpu).search(queries, n)[1]


def nearest_distinct(x, centroids, per_centroid: int = 1, gpu: bool | None = None) -> np.ndarray:
    """For each centroid its `per_centroid` nearest rows of x, no row used twice.

    Returns int64 (k * per_centroid,), centroid-major (centroid 0's picks first, each
    centroid's picks nearest first), ready to index a real batch.

    Greedy over (centroid, sample) pairs in order of increasing distance: a pair is taken when
    its centroid still needs samples and its sample is unused. So a centroid whose nearest
    samples nobody closer wants gets exactly them, and a collision goes to the closer centroid
    (not to whichever centroid happens to come first). When a centroid's searched neighbours
    are all taken, the search widens for the centroids still short.
    """
    xs = _as_f32(x, "x")
    cs = _as_f32(centroids, "centroids")
    n, k = xs.shape[0], cs.shape[0]
    if per_centroid < 1:
        raise ValueError(f"per_centroid must be >= 1, got {per_centroid}")
    if k * per_centroid > n:
        raise ValueError(
            f"{k} centroids x {per_centroid} samples each = {k * per_centroid} distinct samples "
            f"requested from only {n} rows"
        )
    index = FlatIndex(xs, gpu=gpu)
    picks: list[list[int]] = [[] for _ in range(k)]
    used = np.zeros(n, dtype=bool)
    todo = np.arange(k)  # centroids still short of samples
    m = min(n, 2 * per_centroid + 2)  # neighbours searched per centroid this round
    while len(todo):
        dist, idx = index.search(cs[todo], m)
        # Sort all candidate pairs by distance; a stable sort keeps ties in centroid order, so
        # the result is deterministic.
        order = np.argsort(dist, axis=None, kind="stable")
        rows, cols = np.unravel_index(order, dist.shape)
        for r, c in zip(rows.tolist(), cols.tolist()):
            j, s = int(todo[r]), int(idx[r, c])
            if len(picks[j]) < per_centroid and not used[s]:
                picks[j].append(s)
                used[s] = True
        todo = np.array([j for j in todo if len(picks[j]) < per_centroid], dtype=np.int64)
        if len(todo) and m == n:  # cannot happen while k*per_centroid <= n; guard the loop
            raise RuntimeError("nearest_distinct: ran out of samples (internal error)")
        m = min(n, 2 * m)
    return np.array([s for p in picks for s in p], dtype=np.int64)


def medoids(x, k: int, niter: int = 20, seed: int = 0, gpu: bool | None = None) -> np.ndarray:
    """Indices int64 (k,) of the distinct rows of x nearest the k k-means centroids.

    DREAM's cluster-centre initialisation and the real samples standing for each cluster.
    """
    centroids, _ = kmeans(x, k, niter=niter, seed=seed, gpu=gpu)
    return nearest_distinct(x, centroids, per_centroid=1, gpu=gpu)
