"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) and CutMix.

Siamese use in a matching step — ONE draw, applied to the real and the synthetic batch, which
may have different sizes:

    dsa = DSA()                                   # strategy 'color_crop_cutout_flip_scale_rotate'
    p = dsa.sample(n=1, size=32, generator=g)     # per_sample=False: one draw for everyone
    loss = match(net(dsa.apply(real, p)), net(dsa.apply(syn, p)))

Training an evaluation network — an independent draw per image:

    x = dsa(x, generator=g)

Every operation is built from differentiable tensor ops (arithmetic, indexing, grid_sample),
so gradients reach the synthetic images through the augmentation. Magnitudes and sampling
follow the public DSA code's `ParamDiffAug`/`DiffAugment`, so results are comparable with the
published numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Group name -> its operations, applied in this order (the public code's AUGMENT_FNS).
GROUPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("S", "M")


@dataclass
class DSAParams:
    """One draw of DSA parameters.

    Every value tensor has a leading dimension of 1 (one draw shared by any batch: the
    siamese case) or n (one draw per image). Only the operations of `groups` are needed;
    the others stay None.

    groups: the augmentation groups to apply, in order (one group in mode 'S').
    size: (H, W) the draw was made for; crop shifts and cutout centres are in pixels of it.
    brightness: (n,) additive offset.
    saturation: (n,) factor on the deviation from the per-pixel channel mean.
    contrast: (n,) factor on the deviation from the per-image mean.
    flip: (n,) bool, True = mirror horizontally.
    crop: (n, 2) int64 (dy, dx): content moves dy pixels down and dx right, zero fill.
    scale: (n, 2) (sx, sy): affine sampling-grid scale; >1 shrinks the content.
    rotate: (n,) angle in degrees, positive = anticlockwise (as the public code).
    cutout: (n, 2) int64 (cy, cx): centre of the zeroed box.
    """

    groups: tuple[str, ...]
    size: tuple[int, int]
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    flip: Tensor | None = None
    crop: Tensor | None = None
    scale: Tensor | None = None
    rotate: Tensor | None = None
    cutout: Tensor | None = None

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown DSA group(s) {unknown}; allowed: {', '.join(GROUPS)}")
        for g in self.groups:
            for op in GROUPS[g]:
                if getattr(self, op) is None:
                    raise ValueError(f"DSAParams: group {g!r} needs a value for {op!r}, got None")

    def to(self, device: torch.device | str | None) -> "DSAParams":
        """Copy with every value tensor on `device`."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, Tensor):
                kw[k] = v.to(device)
        return DSAParams(**kw)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class DSA:
    """Differentiable siamese augmentation with the public code's magnitudes.

    brightness: width of the additive offset range: x + (r - 0.5) * brightness (±0.5).
    saturation: upper factor: mean_c + (x - mean_c) * r * saturation (×[0, 2]).
    contrast: lower factor: mean + (x - mean) * (r + contrast) (×[0.5, 1.5]).
    flip_prob: probability of a horizontal flip.
    crop_ratio: maximum translation as a fraction of the size, rounded to whole pixels.
    scale_ratio: sx, sy uniform in [1/scale_ratio, scale_ratio].
    rotate_deg: angle uniform in ±rotate_deg degrees.
    cutout_ratio: side of the zeroed box as a fraction of the size.
    strategy: groups joined by '_' (color, crop, cutout, flip, scale, rotate); '' or 'none'
        applies nothing.
    mode: 'S' picks ONE group uniformly per draw (the public default), 'M' applies all groups
        in order.
    """

    def __init__(
        self,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        flip_prob: float = 0.5,
        crop_ratio: float = 0.125,
        scale_ratio: float = 1.2,
        rotate_deg: float = 15.0,
        cutout_ratio: float = 0.5,
        strategy: str = DEFAULT_STRATEGY,
        mode: str = "S",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"DSA mode must be one of {MODES}, got {mode!r}")
        if scale_ratio < 1.0:
            raise ValueError(f"scale_ratio must be >= 1 (range [1/r, r]), got {scale_ratio}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        for name, v in (("crop_ratio", crop_ratio), ("cutout_ratio", cutout_ratio)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast
        self.flip_prob = flip_prob
        self.crop_ratio = crop_ratio
        self.scale_ratio = scale_ratio
        self.rotate_deg = rotate_deg
        self.cutout_ratio = cutout_ratio
        self.strategy = strategy
        self.mode = mode
        self.groups = self.parse_strategy(strategy)

    @staticmethod
    def parse_strategy(strategy: str) -> tuple[str, ...]:
        """Split 'color_crop_...' into validated group names."""
        if strategy.lower() in ("", "none"):
            return ()
        groups = tuple(strategy.split("_"))
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(
                f"unknown DSA group(s) {unknown} in strategy {strategy!r}; allowed groups: "
                f"{', '.join(GROUPS)} joined by '_' (or 'none')"
            )
        return groups

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        size: int | tuple[int, int],
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        per_sample: bool = False,
    ) -> DSAParams:
        """Draw parameters for n images of `size` (int or (H, W)).

        per_sample=False draws ONE value per operation (leading dim 1), shared by any batch
        it is applied to; per_sample=True draws one per image (leading dim n). Randomness
        comes only from `generator` when given (else torch's global RNG), on the generator's
        device; the values are then moved to `device`.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        h, w = _size2(size)
        m = n if per_sample else 1
        gdev = generator.device if generator is not None else torch.device("cpu")

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=gdev)

        def randint(low: int, high: int, *shape: int) -> Tensor:
            return torch.randint(low, high, shape, generator=generator, device=gdev)

        if not self.groups:
            groups: tuple[str, ...] = ()
        elif self.mode == "S":
            # One group per draw, shared by all images even when per_sample: as DiffAugment.
            groups = (self.groups[int(randint(0, len(self.groups), 1).item())],)
        else:
            groups = self.groups

        vals: dict[str, Tensor] = {}
        for g in groups:
            if g == "color":
                vals["brightness"] = (rand(m) - 0.5) * self.brightness
                vals["saturation"] = rand(m) * self.saturation
                vals["contrast"] = rand(m) + self.contrast
            elif g == "flip":
                vals["flip"] = rand(m) < self.flip_prob
            elif g == "crop":
                sh, sw = int(h * self.crop_ratio + 0.5), int(w * self.crop_ratio + 0.5)
                vals["crop"] = torch.stack([randint(-sh, sh + 1, m), randint(-sw, sw + 1, m)], 1)
            elif g == "scale":
                lo = 1.0 / self.scale_ratio
                vals["scale"] = rand(m, 2) * (self.scale_ratio - lo) + lo
            elif g == "rotate":
                vals["rotate"] = (rand(m) - 0.5) * 2 * self.rotate_deg
            elif g == "cutout":
                ch, cw = self._cutout_side(h, w)
                # Centre range as in the public code: one extra position for even sides, so
                # the box can reach both borders symmetrically.
                vals["cutout"] = torch.stack(
                    [randint(0, h + (1 - ch % 2), m), randint(0, w + (1 - cw % 2), m)], 1
                )
        params = DSAParams(groups=groups, size=(h, w), **vals)
        return params.to(device) if device is not None else params

    # ------------------------------------------------------------------ applying

    def __call__(
        self,
        x: Tensor,
        params: DSAParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Augment x (N, C, H, W); with no params, draw an independent one per image."""
        if params is None:
            params = self.sample(x.shape[0], (x.shape[-2], x.shape[-1]), device=x.device,
                                 generator=generator, per_sample=True)
        return self.apply(x, params)

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply the operations of `params.groups` to x (N, C, H, W), differentiably."""
        if x.dim() != 4:
            raise ValueError(f"DSA expects images (N, C, H, W), got shape {tuple(x.shape)}")
        n = x.shape[0]
        hw = (x.shape[-2], x.shape[-1])
        for g in params.groups:
            for op in GROUPS[g]:
                v = getattr(params, op)
                if v.shape[0] not in (1, n):
                    raise ValueError(
                        f"DSA parameter {op!r} was drawn for {v.shape[0]} images and cannot "
                        f"apply to a batch of {n}; draw with per_sample=False to share one draw"
                    )
                if op in ("crop", "cutout") and hw != tuple(params.size):
                    raise ValueError(
                        f"DSA {op!r} was drawn for {params.size[0]}x{params.size[1]} images "
                        f"(pixel offsets), got {hw[0]}x{hw[1]}"
                    )
                x = getattr(self, f"_{op}")(x, v.to(x.device))
        return x

    # Each op: x (N, C, H, W), v with leading dim 1 or N.

    @staticmethod
    def _brightness(x: Tensor, v: Tensor) -> Tensor:
        return x + v.to(x.dtype).view(-1, 1, 1, 1)

    @staticmethod
    def _saturation(x: Tensor, v: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return mean + (x - mean) * v.to(x.dtype).view(-1, 1, 1, 1)

    @staticmethod
    def _contrast(x: Tensor, v: Tensor) -> Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + (x - mean) * v.to(x.dtype).view(-1, 1, 1, 1)

    @staticmethod
    def _flip(x: Tensor, v: Tensor) -> Tensor:
        return torch.where(v.bool().view(-1, 1, 1, 1), x.flip(3), x)

    @staticmethod
    def _crop(x: Tensor, v: Tensor) -> Tensor:
        # Integer translation with zero fill, as the public rand_crop: gather from a 1-px
        # zero-padded copy, clamping out-of-range indices onto the zero border. Indexing is
        # differentiable w.r.t. x (its backward is a scatter-add).
        n, _, h, w = x.shape
        shift = v.long().expand(n, 2)
        xp = F.pad(x, (1, 1, 1, 1))
        dev = x.device
        rows = (torch.arange(h, device=dev)[None, :] - shift[:, :1] + 1).clamp(0, h + 1)
        cols = (torch.arange(w, device=dev)[None, :] - shift[:, 1:] + 1).clamp(0, w + 1)
        b = torch.arange(n, device=dev)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _affine(x: Tensor, theta: Tensor) -> Tensor:
        # align_corners=True as in the public code: then an identity theta samples exactly at
        # pixel centres, so scale 1 / rotation 0 reproduce the input.
        theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x: Tensor, v: Tensor) -> Tensor:
        sx, sy = v[:, 0], v[:, 1]
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x: Tensor, v: Tensor) -> Tensor:
        a = v * (math.pi / 180.0)
        c, s, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
        return self._affine(x, theta)

    def _cutout_side(self, h: int, w: int) -> tuple[int, int]:
        return int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)

    def _cutout(self, x: Tensor, v: Tensor) -> Tensor:
        n, _, h, w = x.shape
        ch, cw = self._cutout_side(h, w)
        centre = v.long().expand(n, 2)
        top, left = centre[:, :1] - ch // 2, centre[:, 1:] - cw // 2  # (N, 1) each
        r = torch.arange(h, device=x.device)[None, :]
        c = torch.arange(w, device=x.device)[None, :]
        in_r = (r >= top) & (r < top + ch)  # (N, H)
        in_c = (c >= left) & (c < left + cw)  # (N, W)
        keep = ~(in_r[:, :, None] & in_c[:, None, :])  # box clipped at the borders
        return x * keep[:, None].to(x.dtype)


def cutmix(
    x: Tensor,
    targets: Tensor,
    beta: float = 1.0,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al. 2019) on images x (N, C, H, W) with soft targets (N, K).

    With probability `prob` (one draw per batch): λ ~ Beta(β, β), a box of area ≈ (1 − λ)
    at a uniform centre (clipped at the borders) is pasted from a permuted batch, and the
    targets are mixed by the box's ACTUAL area fraction (after clipping and rounding), so the
    labels describe exactly what the image shows. Otherwise the inputs come back unchanged.
    Differentiable w.r.t. x; randomness only from `generator` when given.
    """
    if x.dim() != 4:
        raise ValueError(f"cutmix expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if targets.dim() != 2 or targets.shape[0] != x.shape[0]:
        raise ValueError(
            f"cutmix expects soft targets (N, K) with N={x.shape[0]}, got shape "
            f"{tuple(targets.shape)}; for class ids use F.one_hot(labels, K).float()"
        )
    if beta <= 0:
        raise ValueError(f"cutmix beta must be > 0, got {beta}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cutmix prob must lie in [0, 1], got {prob}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    if torch.rand(1, generator=generator, device=gdev).item() >= prob:
        return x, targets
    # torch's Beta sampler takes no generator; seed numpy's from the torch stream instead so
    # a seeded generator still makes the whole call reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev).item())
    lam = float(np.random.default_rng(seed).beta(beta, beta))
    n, _, h, w = x.shape
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator, device=gdev).item())
    cx = int(torch.randint(0, w, (1,), generator=generator, device=gdev).item())
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(n, generator=generator, device=gdev).to(x.device)
    mask = torch.zeros(1, 1, h, w, dtype=x.dtype, device=x.device)
    mask[..., y1:y2, x1:x2] = 1
    # Blend with a mask instead of writing into x in place: keeps the caller's tensor intact
    # and the autograd graph simple.
    mixed = x * (1 - mask) + x[perm] * mask
    area = (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, targets * (1 - area) + targets[perm.to(targets.device)] * area
