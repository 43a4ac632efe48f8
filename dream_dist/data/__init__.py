"""Data sources, registered by name in one place.

    from dream_dist.data import load_dataset
    train = load_dataset("mnist", split="train", root="../shared/data/mnist")

Every source returns an `ImageSet` (uint8 images, int64 labels, class names). `packed`
reads the class-grouped WebDataset shards written by `dream_dist.data.shards.pack`, and can
load only some classes: that is what a class-shard worker calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dream_dist.data.base import ImageSet, denormalize, normalize
from dream_dist.errors import DataNotFoundError

__all__ = ["ImageSet", "SOURCES", "load_dataset", "normalize", "denormalize", "register_source"]

# name -> loader(root: Path | None, split: str, **options) -> ImageSet
SOURCES: dict[str, Callable[..., ImageSet]] = {}

# Where each source looks when no root is given, relative to DREAM_DIST_DATA (see
# `default_root`). Digits ship inside scikit-learn and need no root.
_DEFAULT_DIRS = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "tinyimagenet": "tiny-imagenet-200-sub100",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}


def register_source(name: str):
    def deco(fn):
        SOURCES[name] = fn
        return fn

    return deco


def default_root(name: str) -> Path | None:
    """The directory a source reads when the user gives none: $DREAM_DIST_DATA/<dir>."""
    import os

    if name not in _DEFAULT_DIRS:
        return None
    base = Path(os.environ.get("DREAM_DIST_DATA", "../shared/data"))
    return base / _DEFAULT_DIRS[name]


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, **options) -> ImageSet:
    """Load dataset `name` ('digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100',
    'imagefolder', 'tinyimagenet', 'packed', 'webdataset') for `split` ('train' or 'test'; TinyImageNet's
    'val' is its test split)."""
    _register_builtin()
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SOURCES))}")
    if split not in ("train", "test", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    import dream_dist.data.storage as storage

    if root is not None and (storage.is_url(root) or name == "webdataset"):
        # Object storage (packed shards on s3://...) or WebDataset shard URLs: no local directory.
        return SOURCES[name](str(root), split, **options)
    path = Path(root) if root is not None else default_root(name)
    if path is not None and not path.exists():
        raise DataNotFoundError(
            f"dataset {name!r}: directory {path} does not exist (pass root=... or set DREAM_DIST_DATA)"
        )
    return SOURCES[name](path, split, **options)


def _register_builtin() -> None:
    # Imported lazily so `import dream_dist.data` stays cheap (PIL, sklearn load on demand).
    # The loaders do not register themselves: they never import this package back.
    if "digits" in SOURCES:
        return
    from dream_dist.data import cifar, digits, folder, idx, ingest, shards, stream

    builtin = {"digits": digits.load_digits, "mnist": idx.load_mnist, "fashion_mnist": idx.load_fashion,
               "cifar10": cifar.load_cifar10, "cifar100": cifar.load_cifar100, "imagefolder": folder.load_imagefolder,
               "tinyimagenet": folder.load_tinyimagenet, "packed": shards.load_packed, "imagenet": stream.load_imagenet, "webdataset": ingest.load_webdataset}
    for name, fn in builtin.items():
        SOURCES.setdefault(name, fn)
