"""IDC multi-formation: store IPC images, train on IPC·f² decoded ones.

Each stored H×W image is an f×f mosaic of parts; `decode` cuts the parts out (row-major)
and upsamples each back to H×W, so the same pixel budget yields f² training images (IDC,
Kim et al. 2022). `tile` is the inverse layout, used to pack f² chosen real images (e.g.
cluster medoids) into one stored image at initialisation.

    stored = tile(medoids, factor=2)          # (IPC·4, C, H, W) -> (IPC, C, H, W)
    train_x = decode(stored, factor=2)        # (IPC, C, H, W) -> (IPC·4, C, H, W)
    train_y = decode_labels(labels, factor=2)

Image i's parts are the consecutive rows i·f² … i·f² + f² − 1 of the decoded batch, which
is why labels are repeated with `repeat_interleave`.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(images: Tensor, factor: int, what: str) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if images.dim() != 4:
        raise ValueError(f"{what} expects images (N, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        # IDC's code pads such images with 0.5; we refuse instead so a part never holds
        # padding that the loss would then learn to reproduce.
        raise ValueError(
            f"{what}: image size {h}x{w} is not divisible by factor {factor}; choose a factor "
            f"that divides both sides"
        )


def decode(images: Tensor, factor: int) -> Tensor:
    """(N, C, H, W) stored images -> (N·f², C, H, W): each f×f part upsampled to H×W.

    Parts are in row-major order within each image; factor 1 returns `images` itself.
    Differentiable w.r.t. `images`.
    """
    _check(images, factor, "decode")
    if factor == 1:
        return images
    n, c, h, w = images.shape
    ph, pw = h // factor, w // factor
    parts = (
        images.reshape(n, c, factor, ph, factor, pw)
        .permute(0, 2, 4, 1, 3, 5)  # (N, row, col, C, ph, pw): row-major parts per image
        .reshape(n * factor * factor, c, ph, pw)
    )
    # = F.interpolate(parts, size=(h, w), mode="bilinear", align_corners=False), as two fixed
    # interpolation matrices: its backward is then a matmul, which has a deterministic CUDA
    # kernel (upsample_bilinear2d_backward accumulates with atomics; dream_dist.determinism).
    a_h = upsample_matrix(ph, h, images.dtype, images.device)
    a_w = a_h if pw == ph and w == h else upsample_matrix(pw, w, images.dtype, images.device)
    return torch.matmul(torch.matmul(a_h, parts), a_w.t())


@lru_cache(maxsize=64)
def upsample_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """(out_size, in_size) matrix A with A @ v = 1-D linear interpolation of v, as
    F.interpolate(mode='bilinear', align_corners=False) computes it for size=(out, out):
    source position s = max(scale·(i + 0.5) − 0.5, 0) with scale = in/out, weights 1 − frac(s)
    and frac(s) on floor(s) and its right neighbour (the last row repeats the last pixel).
    In the precision of torch's kernels (float32 for float32: scale rounded to float32, s
    rounded once, as the fused multiply-add that its CPU and CUDA kernels compile to), so the
    weights are torch's. Built once per (sizes, dtype, device), never part of a graph."""
    op = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.tensor(in_size, dtype=op) / out_size
        dst = torch.arange(out_size, dtype=op) + 0.5
        src = (scale.double() * dst.double() - 0.5).to(op).clamp(min=0)
        i0 = src.floor().long().clamp(max=in_size - 1)
        lam = (src - i0.to(op)).clamp(0, 1).double()
        i1 = (i0 + 1).clamp(max=in_size - 1)
        a = torch.zeros(out_size, in_size, dtype=torch.float64)
        rows = torch.arange(out_size)
        a.index_put_((rows, i0), 1 - lam, accumulate=True)
        a.index_put_((rows, i1), lam, accumulate=True)
        return a.to(device=device, dtype=dtype)


def decode_labels(labels: Tensor, factor: int) -> Tensor:
    """Labels of `decode(images, factor)`: each row repeated f² times; (N,) or (N, K)."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    return labels.repeat_interleave(factor * factor, dim=0)


TILE_MODES = ("nearest", "antialias")


def tile(images: Tensor, factor: int, mode: str = "nearest") -> Tensor:
    """(N·f², C, H, W) -> (N, C, H, W): each group of f² consecutive images, downsampled to
    (H/f, W/f), laid out f×f row-major in one image — the layout `decode` reads back.

    mode: 'nearest' (the IDC/DREAM code: F.interpolate's default, keeps strokes sharp) or
    'antialias' (bilinear with antialiasing: smoother, but a blurred start the matching then
    has to undo)."""
    if mode not in TILE_MODES:
        raise ValueError(f"tile mode must be one of {', '.join(TILE_MODES)}, got {mode!r}")
    _check(images, factor, "tile")
    if factor == 1:
        return images
    m, c, h, w = images.shape
    k = factor * factor
    if m % k:
        raise ValueError(f"tile: got {m} images, not a multiple of factor² = {k}")
    ph, pw = h // factor, w // factor
    if mode == "nearest":
        small = F.interpolate(images, size=(ph, pw), mode="nearest")
    else:
        small = F.interpolate(images, size=(ph, pw), mode="bilinear", align_corners=False,
                              antialias=True)
    return (
        small.reshape(m // k, factor, factor, c, ph, pw)
        .permute(0, 3, 1, 4, 2, 5)  # (N, C, row, ph, col, pw)
        .reshape(m // k, c, h, w)
    )
