"""The exported distilled set: one tensor file, a PNG grid, and ImageFolder/WebDataset copies.

    path = save_distilled(out / "distilled.pt", images, labels, factor, classes, mean, std,
                          config, metrics)                 # also writes out/distilled.png
    ds = dream_dist.load_distilled(path)                   # torch Dataset of DECODED images
    loader = DataLoader(ds, batch_size=64, shuffle=True)   # any training script
    export_imagefolder(ds, out / "imagefolder")            # <class>/<idx>.png, uint8
    export_webdataset(ds, out / "packed")                  # readable by load_dataset('packed')

The file stores what the distillation engine keeps: float32 images NORMALISED with the
dataset's mean/std, under IDC multi-formation (each stored image holds factor² parts that
`dream_dist.formation.decode` upsamples to full size). It holds only tensors, lists, dicts,
numbers and strings, so `torch.load(..., weights_only=True)` reads it without running any
pickled code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dream_dist.data.base import ImageSet, denormalize
from dream_dist.formation import decode, decode_labels

FORMAT = "dream_dist.distilled"
VERSION = 1

def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path



def load_plain(path: str | Path) -> Any:
    """torch.load of a file WITHOUT running any code from it (weights_only=True: tensors,
    numbers, strings, lists and dicts only); anything else is a CheckpointError naming it."""
    from dream_dist.errors import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "not ours"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: not a checkpoint that loads without running code "
                              f"(torch.load weights_only=True: {first})") from None


@dataclass
class SynthSet:
    """One set a method produced, as the pipeline saves and evaluates it."""

    name: str
    """Row label in the table, and the evaluation's file stem."""
    images: Tensor
    """Normalised float (N, C, H, W) as stored (before multi-formation decoding), class-major."""
    labels: Tensor
    ipc: int
    factor: int = 1
    soft_labels: Tensor | None = None
    weights: Tensor | None = None
    published: str | None = None
    """Key of dream_dist.published for this row (None: no published figure applies)."""
    save_as: str | None = "distilled.pt"
    """File name of the artifact in out_dir (None: only a PNG grid)."""
    config: dict = field(default_factory=dict)
    """Stored in the artifact next to the run's config."""
    label: str = ""
    """The table's method column (default: name)."""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


# Decoding / quantising in chunks bounds peak float memory for large (ImageNet-sized) sets.
_CHUNK = 256


class Stored(NamedTuple):
    """The tensors exactly as stored in the file (before multi-formation decoding)."""

    images: Tensor  # float32 (N, C, H, W), normalised
    labels: Tensor  # int64 (N,)
    soft_labels: Tensor | None  # float32 (N, K)
    weights: Tensor | None  # float32 (N,)


# ---------------------------------------------------------------------------- validation


def _as_floats(values: Any, name: str, channels: int) -> list[float]:
    vals = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    if len(vals) != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {len(vals)}")
    return [float(v) for v in vals]


def _validate(
    images: Tensor,
    labels: Tensor,
    factor: Any,
    classes: Sequence[str],
    mean: Any,
    std: Any,
    soft_labels: Tensor | None,
    weights: Tensor | None,
) -> tuple[Stored, int, list[str], list[float], list[float]]:
    """Check shapes and types; return canonical (cpu, float32/int64, contiguous) copies."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W) of normalised images, got {what}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty: a distilled set needs at least one image")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the multi-formation factor {factor}")
    images = images.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values: refusing to export a diverged set")
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer tensor of shape ({n},) (one per stored image), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.detach().to("cpu", torch.int64).contiguous()
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(f"classes must be a non-empty list of class names, got {classes!r}")
    classes = [str(x) for x in classes]
    k = len(classes)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {k} classes, got [{int(labels.min())}, {int(labels.max())}]")
    mean, std = _as_floats(mean, "mean", c), _as_floats(std, "std", c)
    if soft_labels is not None:
        if not isinstance(soft_labels, Tensor) or soft_labels.shape != (n, k):
            got = tuple(soft_labels.shape) if isinstance(soft_labels, Tensor) else type(soft_labels).__name__
            raise ValueError(f"soft_labels must have shape (N, K) = ({n}, {k}), got {got}")
        soft_labels = soft_labels.detach().to("cpu", torch.float32).contiguous()
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (n,):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weights must have shape ({n},) (one per stored image), got {got}")
        weights = weights.detach().to("cpu", torch.float32).contiguous()
    return Stored(images, labels, soft_labels, weights), factor, classes, mean, std


def _plain(obj: Any, where: str) -> Any:
    """`obj` as nested dicts/lists of str/int/float/bool/None/tensors.

    Why: the file must load with weights_only=True, which refuses arbitrary classes. Hydra
    DictConfigs, dataclasses, Paths, tuples and numpy scalars are converted; anything else
    is an error naming where it sits, rather than a file that later fails to load.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, str):  # str subclasses (torch's TorchVersion) pickle as their class
        return str(obj)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), where)
    try:  # Hydra / OmegaConf configs: store the RESOLVED values, not interpolation strings
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return _plain(OmegaConf.to_container(obj, resolve=True), where)
    except ImportError:
        pass
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: dict key {key!r} must be a str or int")
            out[key] = _plain(value, f"{where}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where} has type {type(obj).__name__}, which cannot be stored loadably with weights_only=True; "
        "convert it to str/int/float/bool/list/dict/tensor"
    )


# ---------------------------------------------------------------------------- save / load


def save_distilled(
    path: str | Path,
    images: Tensor,
    labels: Tensor,
    factor: int,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    soft_labels: Tensor | None = None,
    weights: Tensor | None = None,
    grid_classes: int = 100,
) -> Path:
    """Write the distilled set to ONE file (atomically) plus a PNG grid `<stem>.png` beside it.

    images: float (N, C, H, W), normalised with mean/std, as the engine stores them.
    labels: int (N,) class of each stored image. factor: IDC multi-formation factor.
    soft_labels: optional (N, K) targets (e.g. RDED relabelling); weights: optional (N,).
    config: the full resolved run config; metrics: results (accuracy, timings, ...).
    grid_classes: the grid shows one row per class for the first `grid_classes` classes
        only, so an ImageNet-1K export does not produce a 1000-row, ~600 MB bitmap.
    Returns the path of the tensor file.
    """
    from dream_dist.viz import save_grid

    path = Path(path)
    if path.suffix.lower() == ".png":
        raise ValueError(f"{path}: the tensor file must not end in .png (the grid is written as <stem>.png)")
    stored, factor, classes, mean, std = _validate(images, labels, factor, classes, mean, std, soft_labels, weights)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "images": stored.images,
        "labels": stored.labels,
        "factor": factor,
        "classes": classes,
        "mean": mean,
        "std": std,
        "config": _plain(config, "config"),
        "metrics": _plain(metrics, "metrics"),
        "soft_labels": stored.soft_labels,
        "weights": stored.weights,
    }
    atomic_save(state, path)
    rows = _grid_rows(stored.images, stored.labels, min(len(classes), max(1, grid_classes)), mean, std)
    save_grid(rows[0], path.with_suffix(".png"), nrow=rows[1])
    return path


def _grid_rows(images: Tensor, labels: Tensor, num_rows: int, mean, std) -> tuple[Tensor, int]:
    """Denormalised images laid out one class per row, short rows padded with white, so
    row r of the grid is always class r even when classes have different counts."""
    counts = torch.bincount(labels, minlength=num_rows)[:num_rows]
    nrow = max(1, int(counts.max()))
    c, h, w = images.shape[1:]
    cells = torch.ones(num_rows, nrow, c, h, w)
    for r in range(num_rows):
        x = images[labels == r]
        cells[r, : len(x)] = denormalize(x, mean, std)
    return cells.flatten(0, 1), nrow


def load_distilled(path: str | Path, decoded: bool = True) -> "DistilledSet":
    """Read a file written by `save_distilled` as a `DistilledSet` (a torch Dataset).

    decoded=True: items are the N·factor² multi-formation-decoded images (what the set is
    meant to train on); decoded=False: the N stored images.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such distilled set")
    try:
        # weights_only: a downloaded set can never execute code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a dream_dist distilled set (cannot be read by torch.load with "
            f"weights_only=True: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path}: not a dream_dist distilled set (format tag {found!r}, expected {FORMAT!r}); "
            "write one with dream_dist.artifact.save_distilled"
        )
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise ValueError(
            f"{path}: distilled-set format version {state.get('version')!r} is newer than this "
            f"dream_dist reads ({VERSION}); upgrade dream_dist"
        )
    return DistilledSet(state, decoded=decoded, path=path)


class DistilledSet(Dataset):
    """A distilled set as a torch Dataset: `(image, label)` items, or `(image, soft_label)`
    when the set has soft labels. Images are normalised float32 (C, H, W).

    Attributes: images, labels, soft_labels, weights (per item: decoded or stored, per
    `decoded`), factor, classes, mean, std, config, metrics, and `stored` (the raw tensors).
    `images` of a decoded set is materialised on first access only: `__getitem__` decodes
    one stored image at a time, so a DataLoader over an ImageNet-sized set never holds all
    N·f² full-size float images at once.
    """

    def __init__(self, state: Mapping[str, Any], decoded: bool = True, path: Path | None = None):
        try:
            stored, factor, classes, mean, std = _validate(
                state["images"], state["labels"], state["factor"], state["classes"],
                state["mean"], state["std"], state.get("soft_labels"), state.get("weights"),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path or 'state'}: invalid distilled set ({type(e).__name__}: {e})") from e
        self.path = path
        self.stored = stored
        self.factor = factor
        self.classes = classes
        self.mean, self.std = mean, std
        self.config: dict = state.get("config") or {}
        self.metrics: dict = state.get("metrics") or {}
        self.decoded = bool(decoded)
        # Each stored image gives f² consecutive decoded items (formation.decode's order).
        self._rep = factor * factor if self.decoded else 1
        f = factor if self.decoded else 1
        self.labels = decode_labels(stored.labels, f)
        self.soft_labels = None if stored.soft_labels is None else decode_labels(stored.soft_labels, f)
        self.weights = None if stored.weights is None else decode_labels(stored.weights, f)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def images(self) -> Tensor:
        """All item images, float32 (len(self), C, H, W), normalised."""
        if self._rep == 1:
            return self.stored.images
        return torch.cat([decode(x, self.factor) for x in self.stored.images.split(_CHUNK)])

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Tensor:
        """Item `i`'s image without materialising `images`."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a distilled set of {n} items")
        i %= n
        if self._rep == 1 or "images" in self.__dict__:  # stored items, or already decoded
            return self.images[i]
        j, part = divmod(i, self._rep)
        return decode(self.stored.images[j : j + 1], self.factor)[part]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | int]:
        i = int(i)
        x = self.image(i)
        if self.soft_labels is not None:
            return x, self.soft_labels[i]
        return x, int(self.labels[i])

    def _uint8_chunks(self) -> Iterator[Tensor]:
        for x in self.stored.images.split(_CHUNK):
            x = decode(x, self.factor)
            yield (denormalize(x, self.mean, self.std) * 255).round_().to(torch.uint8)

    def uint8(self) -> Tensor:
        """The DECODED images (whatever `decoded` is) denormalised and quantised to uint8
        (N·f², C, H, W): the pixels the ImageFolder / WebDataset exports hold."""
        return torch.cat(list(self._uint8_chunks()))

    def __repr__(self) -> str:
        c, h, w = self.stored.images.shape[1:]
        return (
            f"DistilledSet({len(self.stored.images)} stored -> {len(self)} items, {c}x{h}x{w}, "
            f"{self.num_classes} classes, factor {self.factor}, decoded={self.decoded}, "
            f"soft_labels={self.soft_labels is not None})"
        )


# ---------------------------------------------------------------------------- exports


def _safe(name: str) -> str:
    """A class name usable as a folder name on any filesystem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def export_imagefolder(ds: DistilledSet, out_dir: str | Path) -> Path:
    """Write the DECODED images as `<out>/<iii>_<class>/<idx:05d>.png` (uint8; grayscale PNG
    for 1 channel, RGB for 3). The zero-padded class index prefix makes the folders sort in
    class-index order, so `load_dataset('imagefolder', root=out)` (which sorts folder names)
    reads the classes back with the same label ids. Every class gets a folder, even one with
    no images, so the ids of later classes do not shift. Returns `out_dir`.
    """
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        # Stale files from an earlier export would be read back as extra images.
        raise FileExistsError(f"{out} is not empty: export an ImageFolder into a new or empty directory")
    channels = ds.stored.images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"ImageFolder export supports 1- or 3-channel images, got {channels}")
    width = max(3, len(str(ds.num_classes - 1)))
    folders = [out / f"{c:0{width}d}_{_safe(name)}" for c, name in enumerate(ds.classes)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    labels = decode_labels(ds.stored.labels, ds.factor)
    digits = max(5, len(str(len(labels) - 1)))  # file names must sort in item order too
    i = 0
    for chunk in ds._uint8_chunks():
        for img in chunk.numpy():
            arr = img[0] if channels == 1 else img.transpose(1, 2, 0)
            Image.fromarray(arr).save(folders[int(labels[i])] / f"{i:0{digits}d}.png")
            i += 1
    return out


def export_webdataset(ds: DistilledSet, out_dir: str | Path, split: str = "train") -> Path:
    """Write the DECODED uint8 images as class-grouped WebDataset shards + index (see
    `dream_dist.data.shards.pack`), recording the distilled set's own mean/std so a reader
    normalises them exactly as the set was stored. Readable by `PackedReader` and
    `load_dataset('packed', split, root=out_dir)`; returns the index path."""
    from dream_dist.data.shards import index_path, pack

    data = ImageSet(ds.uint8(), decode_labels(ds.stored.labels, ds.factor), list(ds.classes))
    pack(data, out_dir, split, source="distilled", mean_std=(ds.mean, ds.std), progress=False)
    return index_path(out_dir, split)
