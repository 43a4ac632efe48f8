"""k-means and nearest-neighbour search: the one place that chooses and calls FAISS.

    from dream_dist.kmeans import kmeans, nearest, nearest_distinct, medoids
    centroids, assign = kmeans(feats, k=128, seed=0)    # DREAM's clustering of one class
    batch = nearest_distinct(feats, centroids)          # representative real batch (k,)
    init = medoids(feats, k=ipc * factor**2)            # cluster-centre initialisation
    cents, assign = minibatch_kmeans(latents, k=10, batch_size=1024, niter=100, seed=0)  # DDOQ
    weights = cluster_masses(assign, k=10)              # points per cluster

Inputs may be torch tensors (any device, any float dtype) or numpy arrays; outputs are numpy
(float32 centroids, int64 indices) because they index CPU-side data or come straight from
FAISS. Everything else in dream_dist calls these functions instead of importing faiss, so the
CPU/GPU choice and FAISS's quirks (float32 only, C-contiguous only, chatty warnings) are
handled once.

`gpu`: None (the default) runs on the CPU, an int on that GPU only (FAISS must see it).
Callers pass `gpu_for(device)`: the GPU of the torch device they compute on, or None for a CPU
device or a CPU-only FAISS build (faiss-cpu and faiss-gpu install the same `faiss` module).
FAISS never picks GPUs by itself here: no `index_cpu_to_all_gpus`, no `Kmeans(gpu=True)`, which
spread over every visible GPU (on a node whose Ray workers share CUDA_VISIBLE_DEVICES, every
worker on every GPU). One `StandardGpuResources` per GPU per process, built once and reused.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import faiss
except ImportError:  # the engine still imports (and runs random selection) without FAISS
    faiss = None

__all__ = [
    "FlatIndex",
    "cluster_masses",
    "kmeans",
    "medoids",
    "minibatch_kmeans",
    "nearest",
    "nearest_distinct",
    "gpu_for",
    "use_gpu",
]

KMEANS_INITS = ("kmeans++", "random")

_GPU_MAX_K = 2048  # the largest neighbour count FAISS's GPU indexes return


def _faiss():
    """The faiss module, or an ImportError naming the packages that provide it."""
    if faiss is None:
        raise ImportError("dream_dist.kmeans needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 on a "
                          "CUDA 12 machine, never both)")
    return faiss


def _num_gpus() -> int:
    if faiss is None:
        return 0
    # faiss-cpu builds may lack get_num_gpus altogether in old versions; treat that as 0.
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def gpu_for(device) -> int | None:
    """The FAISS GPU for a torch device: its index when the device is CUDA and this FAISS build
    sees GPUs, else None (the CPU). A CPU device never clusters on a GPU."""
    from dream_dist.devices import gpu_index

    index = gpu_index(device)
    return index if index is not None and _num_gpus() > 0 else None


def use_gpu(gpu: int | bool | None = None) -> int | None:
    """Resolve the `gpu` argument to a GPU index, or None for the CPU.

    None / False: the CPU. An int: that GPU, which FAISS must see (True means GPU 0)."""
    if gpu is None or gpu is False:
        return None
    index = 0 if gpu is True else int(gpu)
    n = _num_gpus()
    if not 0 <= index < n:
        raise RuntimeError(
            f"gpu={gpu!r} but FAISS sees {n} GPU(s) (is faiss-gpu installed instead of faiss-cpu, "
            f"and is CUDA visible?); pass gpu=None for the CPU"
        )
    return index


_RESOURCES: dict[int, object] = {}


def gpu_resources(index: int):
    """This process's one faiss.StandardGpuResources of GPU `index` (temporary memory, streams),
    built on first use and reused by every index and clustering after."""
    if index not in _RESOURCES:
        _RESOURCES[index] = faiss.StandardGpuResources()
    return _RESOURCES[index]


def _on_gpu(cpu_index, index: int | None):
    """`cpu_index` itself (CPU), or its copy on GPU `index` alone."""
    if index is None:
        return cpu_index
    return faiss.index_cpu_to_gpu(gpu_resources(index), index, cpu_index)


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

    def __init__(self, x, gpu: int | None = None) -> None:
        xb = _as_f32(x, "x")
        self.n, self.d = xb.shape
        self.cpu_index = _faiss().IndexFlatL2(self.d)
        self.cpu_index.add(xb)
        self.index = _on_gpu(self.cpu_index, use_gpu(gpu))

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
    x, k: int, niter: int = 20, seed: int = 0, gpu: int | None = None
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
    km = _faiss().Kmeans(
        d,
        int(k),
        niter=int(niter),
        seed=int(seed),
        gpu=False,  # the search index is set below, on the one GPU asked for (or the CPU)
        verbose=False,
        # DREAM clusters ~hundreds of samples of one class into 128 clusters, far below FAISS's
        # default 39 points per centroid; the warning it prints then is expected, not a problem.
        min_points_per_centroid=1,
        # Above k*256 points FAISS trains on a seeded subsample (deterministic, and what
        # keeps clustering a big class cheap); the default is kept for that reason.
        max_points_per_centroid=256,
    )
    device = use_gpu(gpu)
    if device is not None:
        km.index = _on_gpu(km.index, device)  # what Kmeans.train searches with
    km.train(xs)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    # Assign with our own exact index rather than km.index so the GPU/CPU choice is one code
    # path and the assignment of all N points (not only a training subsample) is returned.
    _, assign = FlatIndex(centroids, gpu=gpu).search(xs, 1)
    return centroids, assign[:, 0]


def _check_k(k, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(
            f"cannot make k={k} clusters from {n} points: k must be <= the number of points"
        )


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k distinct rows chosen by k-means++ (D² sampling), in float64.

    Distances to the nearest chosen centre are kept per row and lowered by one (N, D) pass per
    new centre, so this is O(N·k·D) time and O(N) extra memory.
    """
    n = x.shape[0]
    x64 = x.astype(np.float64, copy=False)
    chosen = [int(rng.integers(n))]
    d_min = ((x64 - x64[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        d = d_min.copy()
        d[chosen] = 0.0
        total = d.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=d / total))
        else:  # fewer distinct rows than k: any unused row (a duplicate) will do
            free = np.setdiff1d(np.arange(n), chosen)
            nxt = int(free[rng.integers(len(free))])
        chosen.append(nxt)
        d_min = np.minimum(d_min, ((x64 - x64[nxt]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def minibatch_kmeans(
    x,
    k: int,
    batch_size: int = 1024,
    niter: int = 100,
    seed: int = 0,
    init: str = "kmeans++",
    final_mean: bool = True,
    gpu: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mini-batch k-means (Sculley 2010) of the rows of x (N, D) -> (centroids float32 (k, D),
    assignment int64 (N,) of every row to its nearest final centroid).

    Each of `niter` steps draws `batch_size` distinct rows (seeded), assigns them to their
    nearest centroid with an exact FAISS search, and moves every centroid to the running mean
    of all rows ever assigned to it: c_j <- c_j + (s_j - m_j·c_j) / v_j, where the batch gave
    centroid j m_j rows summing to s_j and v_j counts all rows it has received. This is the
    per-sample learning rate 1/v_j of competitive-learning vector quantisation (CLVQ), the
    algorithm DDOQ uses, applied a mini-batch at a time. Centroids that receive no row stay
    where they were initialised (on a data row, so never far from the data).

    init: 'kmeans++' (D² sampling over all rows) or 'random' (k distinct random rows).
    final_mean: finish with one full pass that moves each centroid to the exact mean of the
        rows assigned to it, and assign again (so centroids, assignment and masses agree).
    Deterministic for a fixed seed: all randomness comes from numpy's Generator(seed) and the
    searches are exact; updates accumulate in float64.
    """
    xs = _as_f32(x, "x")
    n = xs.shape[0]
    _check_k(k, n)
    k = int(k)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(niter, (int, np.integer)) or niter < 1:
        raise ValueError(f"niter must be a positive int, got {niter!r}")
    if init not in KMEANS_INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(KMEANS_INITS)}")
    rng = np.random.default_rng(int(seed))
    if init == "kmeans++":
        start = _kmeans_pp(xs, k, rng)
    else:
        start = rng.choice(n, size=k, replace=False)
    cents = xs[start].astype(np.float64)
    counts = np.zeros(k, dtype=np.float64)
    b = min(int(batch_size), n)
    for _ in range(int(niter)):
        rows = xs[rng.choice(n, size=b, replace=False)] if b < n else xs
        _, a = FlatIndex(cents, gpu=gpu).search(rows, 1)
        a = a[:, 0]
        m = np.bincount(a, minlength=k).astype(np.float64)
        s = _cluster_sums(rows, a, k)
        hit = m > 0
        counts[hit] += m[hit]
        # Running mean over everything received so far: the 1/v_j learning rate.
        cents[hit] += (s[hit] - m[hit, None] * cents[hit]) / counts[hit, None]
    centroids = np.ascontiguousarray(cents, dtype=np.float32)
    _, assign = FlatIndex(centroids, gpu=gpu).search(xs, 1)
    assign = assign[:, 0]
    if final_mean:
        # One Lloyd step over all rows: each centroid becomes the exact mean of its Voronoi
        # cell (the fixed-point condition of an optimal quantiser; it never raises the
        # distortion), then every row is assigned again so masses match the final centroids.
        m = np.bincount(assign, minlength=k)
        sums = _cluster_sums(xs, assign, k)
        hit = m > 0
        cents = centroids.astype(np.float64)
        cents[hit] = sums[hit] / m[hit, None]
        centroids = np.ascontiguousarray(cents, dtype=np.float32)
        _, a = FlatIndex(centroids, gpu=gpu).search(xs, 1)
        assign = a[:, 0]
    return centroids, assign


def _cluster_sums(rows: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """float64 (k, D): the sum of the rows assigned to each cluster."""
    # A sort-and-reduce instead of np.add.at, which is an order of magnitude slower.
    order = np.argsort(assign, kind="stable")
    a, r = assign[order], rows[order].astype(np.float64)
    sums = np.zeros((k, rows.shape[1]), dtype=np.float64)
    if len(a):
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        sums[a[starts]] = np.add.reduceat(r, starts, axis=0)
    return sums


def cluster_masses(assignment, k: int) -> np.ndarray:
    """Rows per cluster, int64 (k,), from an assignment (N,) with values in [0, k).

    DDOQ's weights: the mass each centroid carries of the class's empirical distribution
    (they sum to N, the class size).
    """
    a = np.asarray(assignment.detach().cpu() if isinstance(assignment, torch.Tensor) else assignment)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"assignment must be a 1-D integer array, got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= k):
        raise ValueError(f"assignment values must lie in [0, {k}), got [{a.min()}, {a.max()}]")
    return np.bincount(a, minlength=int(k)).astype(np.int64)


def nearest(x, queries, n: int = 1, gpu: int | None = None) -> np.ndarray:
    """Indices int64 (Q, n) of the n nearest rows of x for each query, nearest first."""
    return FlatIndex(x, gpu=gpu).search(queries, n)[1]


def nearest_distinct(x, centroids, per_centroid: int = 1, gpu: int | None = None) -> np.ndarray:
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


def medoids(x, k: int, niter: int = 20, seed: int = 0, gpu: int | None = None) -> np.ndarray:
    """Indices int64 (k,) of the distinct rows of x nearest the k k-means centroids.

    DREAM's cluster-centre initialisation and the real samples standing for each cluster.
    """
    centroids, _ = kmeans(x, k, niter=niter, seed=seed, gpu=gpu)
    return nearest_distinct(x, centroids, per_centroid=1, gpu=gpu)
