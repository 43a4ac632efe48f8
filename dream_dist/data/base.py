"""The in-memory image set every source returns and every method consumes.

Images stay uint8 (N, C, H, W) until they reach a network: that is 4x less memory than
float32, and it is how the packed shards store them. `normalize` turns them into the float
tensors networks see. A `StreamedSet` stands in for an ImageSet where a trainer reads the
training split batch by batch from the shards instead of holding it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    images: uint8 tensor (N, C, H, W).
    labels: int64 tensor (N,), values index into `classes`.
    classes: class names; `classes[i]` is the name of label i. The order is the dataset's
        conventional class index (e.g. wnids.txt for TinyImageNet).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageSet.labels must have shape ({self.images.shape[0]},), "
                f"got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}), got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        """Side length in pixels (images are square)."""
        return self.images.shape[-1]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The samples at `index`, keeping the full class list."""
        return ImageSet(self.images[index], self.labels[index], list(self.classes))

    def of_class(self, c: int) -> torch.Tensor:
        """uint8 images of class `c`."""
        return self.images[self.labels == c]

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images at `index` (what a training loop reads; see StreamedSet)."""
        return self.images[index]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of pixel values scaled to [0, 1]."""
        # Accumulate in float64 over chunks so ImageNet-sized sets do not need a float copy.
        n = 0
        s = torch.zeros(self.channels, dtype=torch.float64)
        ss = torch.zeros(self.channels, dtype=torch.float64)
        for chunk in self.images.split(4096):
            x = chunk.double().div_(255.0)
            s += x.sum(dim=(0, 2, 3))
            ss += x.pow(2).sum(dim=(0, 2, 3))
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s / n
        std = (ss / n - mean.pow(2)).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()


class StreamedSet:
    """A labelled image set whose pixels stay on disk: labels in memory, images read per batch.

    What the trainers (dream_dist.training.train_feature_net, the observer, the DDOQ
    autoencoder) take instead of an ImageSet when the training split is larger than a
    process should hold: they only ask for `labels`, `len`, the shape and `batch(index)`.
    Sample i is the i-th sample of the ImageSet that loading the classes whole would give
    (PackedReader.load_classes: the classes in `order`, each in its own sample order), so a
    seeded loop over `batch(index)` reads exactly the pixels it would have indexed in memory,
    in the same memory layout, and trains to the same weights.

    read: (class id, positions within that class (n,)) -> uint8 (n, C, H, W), e.g.
        PackedReader.read_samples (only those samples' bytes are read).
    """

    def __init__(self, read, order: list[int], counts: list[int], classes: list[str], channels: int,
                 size: int) -> None:
        if len(order) != len(counts):
            raise ValueError(f"{len(order)} classes but {len(counts)} counts")
        self._read = read
        self.order = [int(c) for c in order]
        self.classes = list(classes)
        self._shape = (int(channels), int(size), int(size))
        n = torch.tensor([int(k) for k in counts], dtype=torch.int64)
        self.labels = torch.repeat_interleave(torch.tensor(self.order, dtype=torch.int64), n)
        self._starts = torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self._shape[0]

    @property
    def size(self) -> int:
        return self._shape[-1]

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images (len(index), C, H, W) of samples `index`, read class by class."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        where = torch.searchsorted(self._starts, index, right=True) - 1  # position in `order`
        out = torch.empty((len(index), *self._shape), dtype=torch.uint8)
        for p in where.unique().tolist():
            rows = torch.nonzero(where == p).flatten()
            out[rows] = self._read(self.order[p], index[rows] - self._starts[p])
        return out


def read_batches(data, batches):
    """(index, uint8 images) for each index tensor of `batches`, in order: what a training loop
    iterates over. A StreamedSet's next batch is read in a background thread while the caller
    trains on this one (at 64 px RGB, reading 256 samples by offset costs about a fifth of a
    ConvNet-tiny step on one core), so at most two batches are held. The pixels are those of
    `data.batch(index)` either way."""
    if not isinstance(data, StreamedSet):
        for b in batches:
            yield b, data.batch(b)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        it = iter(batches)
        b = next(it, None)
        pending = pool.submit(data.batch, b) if b is not None else None
        while pending is not None:
            following = next(it, None)
            ahead = pool.submit(data.batch, following) if following is not None else None
            yield b, pending.result()
            b, pending = following, ahead


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised with per-channel mean/std (in [0, 1] units)."""
    x = images.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of `normalize`, clamped to [0, 1] floats (for image grids)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)
