"""The in-memory image set every source returns and every method consumes.

Images stay uint8 (N, C, H, W) until they reach a network: that is 4x less memory than
float32, and it is how the packed shards store them. `normalize` turns them into the float
tensors networks see.
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
