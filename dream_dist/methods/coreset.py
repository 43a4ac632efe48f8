"""Coreset baselines of the paper's Table I: random, herding and k-center selection.

    from dream_dist.training import train_feature_net, extract_features
    from dream_dist.methods.coreset import build_coreset
    net = train_feature_net(train, mean, std, epochs=1, max_images=10_000)
    feats = extract_features(net, train.images, mean, std)
    coreset = build_coreset("herding", train, ipc=10, features=feats)   # an ImageSet

Herding and k-center select in the feature space of a ConvNet trained on the real data, as
the DC code does; random needs no features. Selection is per class and returns real images,
so a coreset is evaluated exactly like a distilled set.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet
from dream_dist.errors import ConfigError, DataError
from dream_dist.methods.base import Method, SynthSet
from dream_dist.kmeans import FlatIndex
from dream_dist.memory import release_free_memory
from dream_dist.seeding import derive_seed, generator
from dream_dist.training import extract_features, train_feature_net  # noqa: F401  (re-exported)

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


def random_indices(n: int, ipc: int, seed: int, c: int) -> Tensor:
    """Positions within class `c` (of `n` images) that build_coreset("random", ...) picks, from
    the count alone: a driver can take them from the shards without loading the class."""
    return select("random", torch.empty(n, 0), ipc, seed=derive_seed(seed, 0, c))


def random_baseline(data, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """(uint8 images, labels) of the random real coreset of `data`'s classes, the picks of
    build_coreset("random", ...), read through the class cache: only the picked samples of a
    class over the memory budget are read, so a driver never loads the training set."""
    picks = [random_indices(data.counts_all[c], ipc, seed, c) for c in data.classes]
    images = torch.cat([data.cache.take(c, i) for c, i in zip(data.classes, picks)])
    labels = torch.tensor(data.classes).repeat_interleave(torch.tensor([len(i) for i in picks]))
    return images, labels


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


@dataclass
class CoresetConfig:
    methods: list[str] = field(default_factory=lambda: ["random", "herding", "kcenter"])
    """Coreset selections to build and evaluate."""
    ipc: int = 10
    """Images per class."""
    feature_model: str = "convnet"
    """Network whose embedding herding and k-center work in (trained on real data first)."""
    feature_width: int | None = None
    """Width of that network (None = the model's default)."""
    feature_epochs: int = 1
    """Epochs of training of the feature network on real data."""
    feature_max_images: int | None = 10000
    """Class-balanced subsample used to train the feature network (None = all)."""
    workers: int = 0
    """0 = every class in this process; N = the classes fan out to N Ray tasks (same sets)."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"coreset.methods: unknown {bad}; known: {sorted(METHODS)}")
        if self.ipc < 1:
            raise ConfigError(f"coreset.ipc must be >= 1, got {self.ipc}")
        if self.feature_epochs < 0:
            raise ConfigError("coreset.feature_epochs must be >= 0")
        if self.workers < 0:
            raise ConfigError(f"coreset.workers must be >= 0, got {self.workers}")


@dataclass
class CoresetPrep:
    net: Any
    """The feature network (None when only random selection is asked for)."""
    mean: list[float]
    std: list[float]


class CoresetMethod(Method):
    """task=coreset: random / herding / k-center real images per class, each evaluated like a
    distilled set. Per class, so the classes fan out to Ray tasks with coreset.workers > 0."""

    task = "coreset"

    def workers(self, cfg) -> int:
        return cfg.coreset.workers

    def driver_models(self, cfg) -> list[str]:
        return ["the feature net"] if any(m != "random" for m in cfg.coreset.methods) else []

    def prepare(self, cfg, data, out: Path) -> CoresetPrep:
        c = cfg.coreset
        small = [k for k in data.classes if data.counts_all[k] < c.ipc]
        if small:  # before any compute
            k = small[0]
            raise DataError(f"coreset.ipc={c.ipc} is larger than class {k} ({data.names[k]!r}), which has only "
                            f"{data.counts_all[k]} training images")
        net = None
        if any(m != "random" for m in c.methods):
            # Batches read from the shards: the driver never holds the train split.
            net = train_feature_net(data.train_stream(), data.mean, data.std, model=c.feature_model,
                                    width=c.feature_width, epochs=c.feature_epochs, max_images=c.feature_max_images,
                                    seed=cfg.seed, progress=cfg.progress, device=cfg.device)
        return CoresetPrep(net, data.mean, data.std)

    def remote_prep(self, cfg, prep: CoresetPrep) -> CoresetPrep:
        return CoresetPrep(copy.deepcopy(prep.net).cpu() if prep.net is not None else None, prep.mean, prep.std)

    def distill_group(self, cfg, prep: CoresetPrep, classes, images_of, progress: bool = False) -> dict:
        parts = {}
        for c in tqdm(classes, desc="coreset classes", disable=None if progress else True, leave=False):
            x = images_of(c)
            feats = extract_features(prep.net, x, prep.mean, prep.std) if prep.net is not None else None
            picks = {}
            for method in cfg.coreset.methods:
                f = feats if method != "random" else torch.empty(len(x), 0)
                try:
                    # Each class draws from its own stream of `seed` (dream_dist.seeding), as build_coreset.
                    picks[method] = x[select(method, f, cfg.coreset.ipc, seed=derive_seed(cfg.seed, 0, c))]
                except ValueError as e:
                    raise DataError(f"class {c}: {e}") from None
            parts[c] = picks
            del x, feats
            release_free_memory()  # free heap the next class cannot reuse goes back (dream_dist.memory)
        return parts

    def assemble(self, cfg, prep: CoresetPrep, data, parts: dict, out: Path):
        from dream_dist.data.base import normalize

        ipc, sets = cfg.coreset.ipc, []
        for method in cfg.coreset.methods:
            images = torch.cat([parts[c][method] for c in data.classes])
            labels = torch.tensor(data.classes).repeat_interleave(torch.tensor([len(parts[c][method])
                                                                                for c in data.classes]))
            sets.append(SynthSet(f"{method}_ipc{ipc}", normalize(images, prep.mean, prep.std), labels, ipc,
                                 label=method, published=method, save_as=f"{method}_ipc{ipc}.pt"))
        return sets, {}

    def evaluator(self, cfg, prep, data):
        from dream_dist.evaluation.protocol import HardLabelProtocol

        return HardLabelProtocol(cfg.eval, data.test(), data.mean, data.std, cfg.dataset.kind)

    def title(self, cfg, prep, data, metrics: dict) -> str:
        return f"{cfg.dataset.name}: coresets"

    def summary(self, cfg, prep) -> dict:
        import dataclasses

        return {"coreset": dataclasses.asdict(cfg.coreset)}
