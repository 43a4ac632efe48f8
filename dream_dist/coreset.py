"""Coreset baselines of the paper's Table I: random, herding and k-center selection.

    from dream_dist.coreset import train_feature_net, extract_features, build_coreset
    net = train_feature_net(train, mean, std, epochs=1, max_images=10_000)
    feats = extract_features(net, train.images, mean, std)
    coreset = build_coreset("herding", train, ipc=10, features=feats)   # an ImageSet

Herding and k-center select in the feature space of a ConvNet trained on the real data, as
the DC code does; random needs no features. Selection is per class and returns real images,
so a coreset is evaluated exactly like a distilled set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet, normalize
from dream_dist.errors import DataError
from dream_dist.kmeans import FlatIndex
from dream_dist.models import build_model
from dream_dist.seeding import derive_seed, generator

__all__ = ["METHODS", "select", "extract_features", "train_feature_net", "build_coreset"]

METHODS = ("random", "herding", "kcenter")


def _random(n: int, ipc: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=generator(seed))[:ipc]


def _herding(feats: Tensor, ipc: int) -> Tensor:
    """Welling's herding: each pick brings the mean of the picked features nearest the class mean.

    At step t (t picks made) the ideal next feature is target = (t+1)·μ − Σ picked, and the
    pick is the unpicked sample nearest the target. Among the t+1 nearest samples at least one
    is unpicked, so one search of depth t+1 always finds it.
    """
    f = feats.double()  # the running sums are differences of large numbers: keep float64
    mu = f.mean(0)
    index = FlatIndex(feats)
    picked: list[int] = []
    total = torch.zeros_like(mu)
    taken = torch.zeros(len(f), dtype=torch.bool)
    for t in range(ipc):
        target = (t + 1) * mu - total
        _, idx = index.search(target[None].float(), min(t + 1, len(f)))
        s = next(int(i) for i in idx[0] if not taken[int(i)])
        picked.append(s)
        taken[s] = True
        total += f[s]
    return torch.tensor(picked, dtype=torch.long)


def _kcenter(feats: Tensor, ipc: int) -> Tensor:
    """Greedy k-center: start at the sample nearest the class mean, then repeatedly add the
    sample farthest from its nearest centre (Gonzalez; a 2-approximation of the optimal
    covering radius).

    The distance to the nearest centre is kept per sample and lowered by one (N, D) pass per
    new centre, so memory stays O(N) beyond the features themselves.
    """
    f = feats.float()
    first = int(((f - f.mean(0)) ** 2).sum(1).argmin())
    picked = [first]
    d_min = ((f - f[first]) ** 2).sum(1)
    d_min[first] = -1.0  # picked samples can never be re-picked, even among duplicates
    for _ in range(ipc - 1):
        s = int(d_min.argmax())
        picked.append(s)
        d_min = torch.minimum(d_min, ((f - f[s]) ** 2).sum(1))
        d_min[picked] = -1.0
    return torch.tensor(picked, dtype=torch.long)


def select(method: str, features: Tensor, ipc: int, seed: int = 0) -> Tensor:
    """Indices LongTensor (ipc,) into `features` (N, D) of ONE class, in selection order.

    'random': uniform without replacement, reproducible from `seed`;
    'herding': Welling's herding on the features (deterministic; seed unused);
    'kcenter': greedy k-center from the sample nearest the mean (deterministic; seed unused).
    """
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; choose one of {', '.join(METHODS)}")
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if ipc > n:
        raise DataError(f"cannot select ipc={ipc} samples from a class of only {n}")
    if method == "random":
        return _random(n, ipc, seed)
    if features.shape[1] == 0:
        raise ValueError(f"{method} needs features (N, D) with D >= 1; got D = 0")
    feats = features.detach().cpu()
    return _herding(feats, ipc) if method == "herding" else _kcenter(feats, ipc)


@torch.no_grad()
def extract_features(
    model: nn.Module, images: Tensor, mean, std, batch_size: int = 512
) -> Tensor:
    """model.embed of uint8 images (N, C, H, W) -> float32 CPU tensor (N, feature_dim).

    Batched, and normalised batch by batch, so memory stays bounded for any N. The model runs
    in eval mode (BatchNorm uses its running statistics) and its mode is restored afterwards.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # inference_mode: the same numbers as no_grad, 1.17x faster on the clustering pass
        # (benchmarks/cluster_features.py); nothing here needs autograd.
        with torch.inference_mode():
            out = [model.embed(normalize(chunk.to(device), mean, std)).float().cpu()
                   for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, getattr(model, "feature_dim", 0))
    return torch.cat(out)


def _balanced_subsample(labels: Tensor, max_images: int, num_classes: int, seed: int) -> Tensor:
    """Seeded subset of at most max_images indices with (nearly) equal counts per class."""
    g = generator(seed, 1)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    quota = max(1, max_images // max(1, sum(len(p) > 0 for p in per_class)))
    idx = torch.cat([p[:quota] for p in per_class])
    return idx[torch.randperm(len(idx), generator=g)][:max_images]


def train_feature_net(
    train: ImageSet,
    mean,
    std,
    model: str = "convnet",
    width: int | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 0.01,
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> nn.Module:
    """Train the network in whose feature space herding and k-center select (DC trains a
    ConvNet on the real data): plain SGD (momentum 0.9, wd 5e-4), cross entropy, no
    augmentation. `max_images` trains on a seeded class-balanced subsample to bound CPU time.
    Returns the network in eval mode.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    idx = torch.arange(len(train))
    if max_images is not None and max_images < len(train):
        idx = _balanced_subsample(train.labels, max_images, train.num_classes, seed)
    # Fork the global RNG so building the net does not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, train.channels, train.num_classes, train.size, width=width)
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = generator(seed, 2)
    bar = tqdm(total=epochs * ((len(idx) + batch_size - 1) // batch_size),
               disable=None if progress else True,
               desc=f"feature net ({model})", leave=False)
    for _ in range(epochs):
        for b in idx[torch.randperm(len(idx), generator=g)].split(batch_size):
            # Normalise per batch: a float copy of the whole set would be 4x its uint8 size.
            x = normalize(train.images[b].to(device), mean, std)
            loss = F.cross_entropy(net(x), train.labels[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return net.eval()


def random_indices(n: int, ipc: int, seed: int, c: int) -> Tensor:
    """Positions within class `c` (of `n` images) that build_coreset("random", ...) picks, from
    the count alone: a driver can take them from the shards without loading the class."""
    return select("random", torch.empty(n, 0), ipc, seed=derive_seed(seed, 0, c))


def build_coreset(
    method: str, train: ImageSet, ipc: int, seed: int = 0, features: Tensor | None = None
) -> ImageSet:
    """The coreset of `ipc` real images per class, class-major, labels = class ids.

    `features` (len(train), D) are needed for herding and k-center (see extract_features);
    random ignores them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "random":
        if features is None:
            raise ValueError(f"{method} selects in a feature space: pass features "
                             f"(e.g. extract_features(train_feature_net(train, ...), ...))")
        if features.dim() != 2 or features.shape[0] != len(train):
            raise ValueError(f"features must be ({len(train)}, D) to match the train set, got "
                             f"{tuple(features.shape)}")
    chosen = []
    for c in range(train.num_classes):
        idx_c = torch.nonzero(train.labels == c).flatten()
        feats_c = features[idx_c] if method != "random" else torch.empty(len(idx_c), 0)
        try:
            # Each class draws from its own stream of `seed` (dream_dist.seeding).
            local = select(method, feats_c, ipc, seed=derive_seed(seed, 0, c))
        except ValueError as e:
            raise DataError(f"class {c} ({train.classes[c]!r}): {e}") from None
        chosen.append(idx_c[local])
    return train.subset(torch.cat(chosen))
