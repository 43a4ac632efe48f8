"""Image grids as PNG files, in plain torch + PIL (torchvision is not usable here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def grid(images: torch.Tensor, nrow: int, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] or uint8 -> uint8 (H', W', 3) mosaic, `nrow` per row."""
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    n, _, h, w = x.shape
    cols = max(1, min(nrow, n))
    rows = (n + cols - 1) // cols
    out = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return out.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, upscale: int | None = None) -> Path:
    """Save a grid PNG; small images are upscaled (nearest) so they are visible."""
    from PIL import Image

    if upscale is None:
        upscale = max(1, 64 // images.shape[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(images, nrow, upscale=upscale)).save(path)
    return path
