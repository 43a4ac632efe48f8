"""Distilled sets from anywhere, for task=evaluate.

    s = load_set("outputs/distill/mnist/distilled.pt", "auto", mean, std, classes)
    s = load_set("downloads/mnist_ipc10.pt", "tensors", mean, std, classes)   # other tools' files

Four kinds of input (`kind=auto` tells them apart by their look):
- `distilled`: dream_dist's distilled.pt (save_distilled): stored images, factor, soft labels
  and weights, and the producing run's config (its evaluation protocol);
- `imagefolder`: a directory of class folders of images (export_imagefolder writes
  <iii>_<class>/...); folders map onto the dataset's classes by name when the names match
  (an `<iii>_` prefix is ignored), else in sorted order;
- `webdataset`: a directory of class-grouped shards with index-train.json (export_webdataset,
  task=pack);
- `tensors`: a plain torch file (read with weights_only=True, so no code runs) holding images
  and labels: a dict with images/labels (or x/y, image_syn/label_syn), DC's {'data':
  [[images, labels]]}, or an (images, labels) pair. uint8 images are pixels; float images are
  taken as normalised with the dataset's statistics when any value lies outside [0, 1]
  (what DC/DSA/DM/IDC save), else as pixels in [0, 1] (`normalized` overrides the guess).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dream_dist.artifact import SynthSet
from dream_dist.data.base import normalize
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

KINDS = ("auto", "distilled", "imagefolder", "webdataset", "tensors")
PROTOCOLS = ("dc", "dsa", "dm", "idc", "kd")


@dataclass
class EvaluateConfig:
    """task=evaluate: a distilled set from any source under a protocol, on one or more
    architectures."""

    set: str | None = None
    """The set: a distilled.pt, an ImageFolder directory, a WebDataset (packed) directory, or a
    torch file of image and label tensors."""
    kind: str = "auto"
    """auto (from the path's look), distilled, imagefolder, webdataset or tensors."""
    protocol: str | None = None
    """None: the producing run's own evaluation (a distilled.pt records it), else the run's
    `eval` section; or dc, dsa, dm, idc (the published protocols) or kd (RDED's, with the
    run's observer settings)."""
    models: list[str] = field(default_factory=lambda: ["convnet"])
    """Architectures, one table row each, e.g. [convnet, resnet10, resnet18] (DREAM+ Table IV)."""
    factor: int | None = None
    """Multi-formation factor of a tensors file (None = 1; a distilled.pt records its own)."""
    normalized: bool | None = None
    """Float images of a tensors file: True = normalised, False = pixels in [0, 1], None = guess."""
    workers: int = 0
    """0 = the runs in this process; N >= 1 = every run a Ray task (same accuracies)."""

    def __post_init__(self) -> None:
        from dream_dist.models import MODELS

        if self.kind not in KINDS:
            raise ConfigError(f"evaluate.kind: unknown {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ConfigError(f"evaluate.protocol: unknown {self.protocol!r}; choose one of "
                              f"{', '.join(PROTOCOLS)} or null")
        if not self.models:
            raise ConfigError("evaluate.models: give at least one architecture")
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ConfigError(f"evaluate.models: unknown {bad}; known: {', '.join(sorted(MODELS))}")
        if self.factor is not None and self.factor < 1:
            raise ConfigError(f"evaluate.factor must be >= 1 or null, got {self.factor}")
        if self.workers < 0:
            raise ConfigError(f"evaluate.workers must be >= 0, got {self.workers}")


@dataclass
class LoadedSet:
    """A set read for evaluation: the set itself and where it came from."""

    set: SynthSet
    """Images normalised with the evaluation dataset's statistics, as stored (before decoding)."""
    kind: str
    source: dict | None = None
    """The producing run's config and metrics (a distilled.pt), else None."""


def detect_kind(path: Path) -> str:
    if path.is_file():
        try:
            from dream_dist.artifact import FORMAT

            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported as the user's file problem
            raise DataError(f"evaluate.set: {path} cannot be read safely by torch.load(weights_only=True): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return "distilled" if isinstance(state, dict) and state.get("format") == FORMAT else "tensors"
    if path.is_dir():
        if (path / "index-train.json").exists():
            return "webdataset"
        if any(p.is_dir() for p in path.iterdir()):
            return "imagefolder"
    raise DataError(f"evaluate.set: {path} is neither a file nor a directory of class folders or shards")


def _ipc(labels: Tensor) -> int:
    return int(torch.bincount(labels).max()) if labels.numel() else 0


def _renormalize(images: Tensor, src_mean, src_std, mean, std) -> Tensor:
    """Images normalised with (src_mean, src_std) -> normalised with (mean, std)."""
    if [float(v) for v in src_mean] == [float(v) for v in mean] and [float(v) for v in src_std] == \
            [float(v) for v in std]:
        return images
    view = (1, -1, 1, 1)
    pix = images * torch.tensor(src_std).view(view) + torch.tensor(src_mean).view(view)
    return (pix - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)


def _class_map(found: list[str], classes: list[str], where: Path) -> Tensor:
    """Folder class i -> dataset class id: by name when every name matches, else by position."""
    strip = [re.sub(r"^\d+_", "", f) for f in found]
    for names in (found, strip):
        if all(n in classes for n in names):
            return torch.tensor([classes.index(n) for n in names])
    if len(found) > len(classes):
        raise DataError(f"evaluate.set: {where} has {len(found)} class folders but the dataset has "
                        f"{len(classes)} classes")
    return torch.arange(len(found))


def _tensors(state: Any, path: Path) -> tuple[Tensor, Tensor]:
    def pair(x):
        return x if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, Tensor) for t in x) else None

    if isinstance(state, dict):
        for ik, lk in (("images", "labels"), ("x", "y"), ("image_syn", "label_syn")):
            if isinstance(state.get(ik), Tensor) and isinstance(state.get(lk), Tensor):
                return state[ik], state[lk]
        data = state.get("data")
        if isinstance(data, (list, tuple)) and data and pair(data[0]):  # DC/DSA/DM: data = [[x, y], ...]
            return data[0][0], data[0][1]
    elif pair(state):
        return state[0], state[1]
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise DataError(f"evaluate.set: {path} holds no image and label tensors (found {keys}); expected a dict "
                    f"with images/labels, x/y or image_syn/label_syn, DC's data=[[x, y]], or an (x, y) pair")


def load_set(path: str | Path, kind: str, mean, std, classes: list[str], factor: int | None = None,
             normalized: bool | None = None, channels: int | None = None, size: int | None = None) -> LoadedSet:
    """The set at `path` normalised with (mean, std) of the dataset it is evaluated on, whose
    class names are `classes` (an ImageFolder is read with that dataset's `channels`, resized
    to its `size` when it differs)."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"evaluate.set: {path} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    name = path.stem if path.is_file() else path.name
    if kind == "distilled":
        from dream_dist.artifact import load_distilled

        ds = load_distilled(path, decoded=False)
        st = ds.stored
        if len(ds.classes) != len(classes):
            raise DataError(f"evaluate.set: {path} has {len(ds.classes)} classes, the dataset {len(classes)}: "
                            f"pick the dataset the set was distilled from (dataset=...)")
        images = _renormalize(st.images, ds.mean, ds.std, mean, std)
        return LoadedSet(SynthSet(name, images, st.labels, _ipc(st.labels), ds.factor, st.soft_labels, st.weights),
                         kind, {"config": dict(ds.config), "metrics": dict(ds.metrics)})
    if kind == "imagefolder":
        from dream_dist.data import load_dataset

        data = load_dataset("imagefolder", "train", root=path, mode="L" if channels == 1 else "RGB", size=size)
        labels = _class_map(list(data.classes), list(classes), path)[data.labels]
        return LoadedSet(SynthSet(name, normalize(data.images, mean, std), labels, _ipc(labels)), kind)
    if kind == "webdataset":
        from dream_dist.data.shards import PackedReader

        reader = PackedReader(path, "train")
        data = reader.load_classes()
        labels = _class_map(list(reader.classes), list(classes), path)[data.labels]
        return LoadedSet(SynthSet(name, normalize(data.images, mean, std), labels, _ipc(labels)), kind)
    if kind == "tensors":
        from dream_dist.artifact import load_plain

        try:
            x, y = _tensors(load_plain(path), path)
        except Exception as e:  # CheckpointError from load_plain: say it as a data problem
            raise DataError(str(e)) from None
        if x.dim() != 4 or y.shape != (x.shape[0],) or y.is_floating_point():
            raise DataError(f"evaluate.set: {path}: images must be (N, C, H, W) and labels (N,) class ids, got "
                            f"{tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
        if x.dtype == torch.uint8:
            images = normalize(x, mean, std)
        else:
            x = x.float()
            is_norm = normalized if normalized is not None else bool(x.min() < 0 or x.max() > 1)
            view = (1, -1, 1, 1)
            images = x if is_norm else (x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)
        y = y.long()
        if int(y.max()) >= len(classes) or int(y.min()) < 0:
            raise DataError(f"evaluate.set: {path}: labels span {int(y.min())}..{int(y.max())} but the dataset has "
                            f"{len(classes)} classes")
        return LoadedSet(SynthSet(name, images.contiguous(), y, _ipc(y), factor or 1), kind)
    raise ConfigError(f"evaluate.kind: unknown {kind!r}")
