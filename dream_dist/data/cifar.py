"""CIFAR-10 / CIFAR-100 from the python pickle batches (`cifar-10-batches-py` layout).

CIFAR-10: data_batch_1..5, test_batch, batches.meta (label_names).
CIFAR-100: train, test, meta (fine_label_names); we use the fine labels.
Each batch is a pickled dict with b'data' (N, 3072) uint8 in CHW order.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from dream_dist.data.base import ImageSet
from dream_dist.errors import DataError, DataNotFoundError


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataNotFoundError(f"CIFAR batch {path} not found")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: not a readable CIFAR pickle batch ({e})") from e


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d[key]


def _names(meta: dict, key: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, key)]


def _stack(root: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        data = np.asarray(_get(d, "data"), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{root / name}: data has shape {data.shape}, expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(_get(d, label_key), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: Path, split: str) -> ImageSet:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    x, y = _stack(root, files, "labels")
    classes = _names(_unpickle(root / "batches.meta"), "label_names")
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes)


def load_cifar100(root: Path, split: str) -> ImageSet:
    x, y = _stack(root, ["train" if split == "train" else "test"], "fine_labels")
    classes = _names(_unpickle(root / "meta"), "fine_label_names")
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes)
