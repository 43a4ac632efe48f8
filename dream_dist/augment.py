"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) and CutMix.

Siamese use in a matching step — ONE draw, applied to the real and the synthetic batch, which
may have different sizes:

    dsa = DSA()                                   # strategy 'color_crop_cutout_flip_scale_rotate'
    p = dsa.sample(n=1, size=32, generator=g)     # per_sample=False: one draw for everyone
    loss = match(net(dsa.apply(real, p)), net(dsa.apply(syn, p)))

Training an evaluation network — an independent draw per image:

    x = dsa(x, generator=g)

Every operation is built from differentiable tensor ops (arithmetic, indexing, gather), so
gradients reach the synthetic images through the augmentation; scale and rotate resample with
`affine_warp`, grid_sample's bilinear sampling written as gathers, whose backward has a
deterministic CUDA kernel (grid_sample's has none: dream_dist.determinism). Magnitudes and
sampling follow the public DSA code's `ParamDiffAug`/`DiffAugment`, so results are comparable
with the published numbers. Draws that are read on the host (the group choice, CutMix's box)
come from CPU generators (dream_dist.seeding.generator) and are read without scalar reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dream_dist.seeding import host_ints, host_values

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
MODES = ("S", "M", "I")
# Groups that IDC's DiffAug applies on every call instead of drawing them ("I" mode).
_IDC_ALWAYS_FIRST = ("flip", "color")


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
    mode: 'S' picks ONE group uniformly per draw (the public DSA default), 'M' applies all
        groups in order, 'I' follows IDC's DiffAug (Kim et al. 2022, augment.py): flip and
        colour on every call, then ONE of the remaining geometric groups (crop, scale,
        rotate), then cutout on every call — each only when the strategy names it.
    align_corners: of the affine grid of scale/rotate. True as the public DSA code; IDC's
        DiffAug calls affine_grid/grid_sample with torch's default (False). None = False in
        mode 'I', True otherwise.
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
        align_corners: bool | None = None,
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
        self.align_corners = (mode != "I") if align_corners is None else bool(align_corners)
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

    @classmethod
    def idc(cls, strategy: str) -> "DSA":
        """IDC's DiffAug with the given strategy (e.g. 'color_crop_cutout')."""
        return cls(strategy=strategy, mode="I")

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        size: int | tuple[int, int],
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        per_sample: bool = False,
        groups: tuple[str, ...] | None = None,
    ) -> DSAParams:
        """Draw parameters for n images of `size` (int or (H, W)).

        per_sample=False draws ONE value per operation (leading dim 1), shared by any batch
        it is applied to; per_sample=True draws one per image (leading dim n). Randomness
        comes only from `generator` when given (else torch's global RNG), on the generator's
        device; the values are then moved to `device`. groups: the groups to draw values for,
        when the caller chose them already (`choose_groups`), e.g. one choice shared by the
        parts of a batch that are augmented separately.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        h, w = _size2(size)
        m = n if per_sample else 1
        if groups is None:
            groups = self.choose_groups(generator)
        else:
            unknown = [g for g in groups if g not in GROUPS]
            if unknown:
                raise ValueError(f"unknown DSA group(s) {unknown}; allowed: {', '.join(GROUPS)}")
        vals = self._draw(groups, m, h, w, generator)
        params = DSAParams(groups=tuple(groups), size=(h, w), **vals)
        return params.to(device) if device is not None else params

    def choose_groups(self, generator: torch.Generator | None = None) -> tuple[str, ...]:
        """The groups one call applies, drawn as the mode says (the only draw that is shared
        by every image of a call, even per_sample)."""
        gdev = generator.device if generator is not None else torch.device("cpu")

        def randint(low: int, high: int) -> int:
            # A CPU draw, read without a scalar read (host_ints refuses a device tensor).
            return host_ints(torch.randint(low, high, (1,), generator=generator, device=gdev))[0]

        if not self.groups:
            groups: tuple[str, ...] = ()
        elif self.mode == "S":
            # One group per draw, shared by all images even when per_sample: as DiffAugment.
            groups = (self.groups[randint(0, len(self.groups))],)
        elif self.mode == "I":
            # IDC's DiffAug: the geometric op is chosen once per call, even per_sample.
            first = tuple(g for g in _IDC_ALWAYS_FIRST if g in self.groups)
            rest = tuple(g for g in self.groups if g not in _IDC_ALWAYS_FIRST and g != "cutout")
            pick = (rest[randint(0, len(rest))],) if rest else ()
            groups = first + pick + (("cutout",) if "cutout" in self.groups else ())
        else:
            groups = self.groups
        return groups

    def _draw(self, groups: tuple[str, ...], m: int, h: int, w: int,
              generator: torch.Generator | None) -> dict[str, Tensor]:
        gdev = generator.device if generator is not None else torch.device("cpu")

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=gdev)

        def randint(low: int, high: int, *shape: int) -> Tensor:
            return torch.randint(low, high, shape, generator=generator, device=gdev)

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
        return vals

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

    def _affine(self, x: Tensor, theta: Tensor) -> Tensor:
        # align_corners=True as in the public DSA code (an identity theta then samples exactly
        # at pixel centres); IDC's DiffAug uses torch's default, False.
        return affine_warp(x, theta, self.align_corners)

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


def affine_warp(x: Tensor, theta: Tensor, align_corners: bool) -> Tensor:
    """F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners), 'bilinear', 'zeros',
    align_corners) for x (N, C, H, W) and theta (1 or N, 2, 3), without grid_sample.

    Each output pixel is the weighted sum of its 4 source neighbours, read with `gather` from
    x (weights and indices as grid_sample computes them; an out-of-image neighbour weighs 0).
    Differentiable w.r.t. x only (theta is a drawn constant here): the backward of gather is a
    scatter-add, which use_deterministic_algorithms makes deterministic on CUDA, whereas
    grid_sampler_2d_backward accumulates with atomics and has no deterministic kernel. Values
    and gradients equal grid_sample's within 1e-6 (tests/test_determinism.py).
    """
    n, c, h, w = x.shape
    m = theta.shape[0]
    if m not in (1, n):
        raise ValueError(f"theta holds {m} transforms for a batch of {n}")
    with torch.no_grad():
        grid = F.affine_grid(theta.detach().to(x.device, x.dtype), [m, c, h, w], align_corners=align_corners)
        gx, gy = grid[..., 0].reshape(m, h * w), grid[..., 1].reshape(m, h * w)
        # grid_sample's unnormalisation of [-1, 1] to pixel positions, (g + 1)·s − 0.5 with
        # s = (size − 1)/2 or size/2: exact in float64, rounded once (as the fused multiply-add
        # of torch's vectorised CPU kernel rounds it).
        if align_corners:
            ix, iy = ((gx + 1).double() * ((w - 1) / 2)), ((gy + 1).double() * ((h - 1) / 2))
        else:
            ix, iy = (gx + 1).double() * (w / 2) - 0.5, (gy + 1).double() * (h / 2) - 0.5
        ix, iy = ix.to(x.dtype), iy.to(x.dtype)
        x0, y0 = ix.floor(), iy.floor()
        # Distances to the west / north neighbour and their complements, as grid_sample's
        # CPU kernel forms them (its CUDA kernel uses x0 + 1 - ix: the same within rounding).
        fx, fy = ix - x0, iy - y0
        ex, sy = 1 - fx, 1 - fy
        corners = []
        for dy, dx, wgt in ((0, 0, sy * ex), (0, 1, sy * fx), (1, 0, fy * ex), (1, 1, fy * fx)):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
            idx = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()
            corners.append((idx, torch.where(inside, wgt, torch.zeros_like(wgt))))
    flat = x.reshape(n, c, h * w)
    out = None
    for idx, wgt in corners:  # nw, ne, sw, se: grid_sample's order of summation
        v = flat.gather(2, idx[:, None, :].expand(n, c, h * w)) * wgt[:, None, :]
        out = v if out is None else out + v
    return out.reshape(n, c, h, w)


def remove_groups(strategy: str, *groups: str) -> str:
    """`strategy` without the named groups, as IDC's remove_aug ('' when nothing is left)."""
    return "_".join(g for g in strategy.split("_") if g and g not in groups)


@dataclass
class CutMixDraw:
    """One CutMix draw for a batch of n images: image i gets box (y1:y2, x1:x2) from perm[i]."""

    perm: Tensor
    box: tuple[int, int, int, int]
    """(y1, y2, x1, x2) after clipping at the borders."""
    area: float
    """Fraction of the image the box covers (the pasted label's weight)."""

    def mask(self, h: int, w: int, dtype=torch.float32, device=None) -> Tensor:
        y1, y2, x1, x2 = self.box
        m = torch.zeros(1, 1, h, w, dtype=dtype, device=device)
        m[..., y1:y2, x1:x2] = 1
        return m


def cutmix_draw(n: int, h: int, w: int, beta: float = 1.0, prob: float = 0.5,
                generator: torch.Generator | None = None) -> CutMixDraw | None:
    """Draw CutMix for a batch of n h×w images; None when this batch is not mixed (1 − prob).

    λ ~ Beta(β, β); a box of side sqrt(1 − λ) × (h, w) at a uniform centre, clipped at the
    borders; a uniform permutation gives each image its partner (IDC's rand_bbox and
    random_indices)."""
    if beta <= 0:
        raise ValueError(f"cutmix beta must be > 0, got {beta}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cutmix prob must lie in [0, 1], got {prob}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    # Draws of a CPU generator, read with host_values (no scalar read; refuses device tensors).
    if host_values(torch.rand(1, generator=generator, device=gdev))[0] >= prob:
        return None
    # torch's Beta sampler takes no generator; seed numpy's from the torch stream instead so
    # a seeded generator still makes the whole call reproducible.
    seed = host_ints(torch.randint(0, 2**62, (1,), generator=generator, device=gdev))[0]
    lam = float(np.random.default_rng(seed).beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = host_ints(torch.randint(0, h, (1,), generator=generator, device=gdev))[0]
    cx = host_ints(torch.randint(0, w, (1,), generator=generator, device=gdev))[0]
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(n, generator=generator, device=gdev)
    return CutMixDraw(perm, (y1, y2, x1, x2), (y2 - y1) * (x2 - x1) / (h * w))


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
    n, _, h, w = x.shape
    draw = cutmix_draw(n, h, w, beta, prob, generator)
    if draw is None:
        return x, targets
    perm = draw.perm.to(x.device)
    mask = draw.mask(h, w, x.dtype, x.device)
    # Blend with a mask instead of writing into x in place: keeps the caller's tensor intact
    # and the autograd graph simple.
    mixed = x * (1 - mask) + x[perm] * mask
    return mixed, targets * (1 - draw.area) + targets[perm.to(targets.device)] * draw.area


DC_OPS = ("crop", "scale", "rotate", "noise")


@torch.no_grad()
def dc_augment(x: Tensor, strategy: str = "crop_scale_rotate", generator: torch.Generator | None = None,
               crop: int = 4, scale: float = 0.2, rotate: int = 45, noise: float = 0.001) -> Tensor:
    """The DC code's (non-differentiable) evaluation augmentation, `augment` in its utils.py:
    every image gets ONE op of `strategy`, chosen uniformly per image:

    crop: a window at offset r in [0, 2·crop) of a copy padded by `crop` px with the batch's
        per-channel mean, per axis (the content moves by crop − r); scale: resize each axis by
        a factor in [1 - scale, 1 + scale] (nearest, as F.interpolate's default), centred and
        cropped/zero-padded back to size; rotate: an integer angle in [-rotate, rotate)
        degrees about the centre, filled with the mean of the channel means (the DC code
        rotates with scipy's cubic spline; this uses bilinear sampling, `affine_warp`);
        noise: + noise · N(0, 1).

    The draws are those of a loop over the images (the op choices, then each image's values
    in image order, from `generator`, a CPU one); they are read once per call, and each op
    is applied to all its images at once.
    """
    ops = tuple(op for op in strategy.split("_") if op)
    unknown = [op for op in ops if op not in DC_OPS]
    if unknown:
        raise ValueError(f"unknown DC augmentation op(s) {unknown}; allowed: {', '.join(DC_OPS)}")
    if not ops:
        return x
    n, ch, h, w = x.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    dev = x.device
    choice = host_ints(torch.randint(0, len(ops), (n,), generator=generator, device=gdev))
    # Every image's values, drawn in image order as the DC code's loop draws them.
    sel: dict[str, list[int]] = {op: [] for op in ops}
    draws: dict[str, list[Tensor]] = {op: [] for op in ops}
    for i, k in enumerate(choice):
        op = ops[k]
        sel[op].append(i)
        if op == "crop":
            draws[op].append(torch.randint(0, 2 * crop, (2,), generator=generator, device=gdev))
        elif op == "scale":
            draws[op].append(torch.rand(2, generator=generator, device=gdev))
        elif op == "rotate":
            draws[op].append(torch.randint(-rotate, rotate, (1,), generator=generator, device=gdev))
        else:
            draws[op].append(torch.randn((ch, h, w), generator=generator, device=gdev))
    mean = x.mean(dim=(0, 2, 3))
    out = x.clone()
    for op in ops:
        if not sel[op]:
            continue
        idx = torch.tensor(sel[op], device=dev)
        img = x[idx]
        v = torch.stack(draws[op])
        if op == "crop":
            pad = mean.view(1, ch, 1, 1).expand(len(idx), ch, h + 2 * crop, w + 2 * crop).clone()
            pad[:, :, crop:crop + h, crop:crop + w] = img
            rc = v.to(dev)
            rows = rc[:, :1] + torch.arange(h, device=dev)  # (k, H): window rows in the copy
            cols = rc[:, 1:] + torch.arange(w, device=dev)
            res = _take(pad, rows, cols)
        elif op == "scale":
            u = v * 2 * scale + 1 - scale
            res = _nearest_rescale(img, u[:, 0].mul(h).long(), u[:, 1].mul(w).long())
        elif op == "rotate":
            theta = []
            for angle in host_ints(v):
                a = math.radians(angle)
                theta.append([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
            fill = mean.mean()
            res = affine_warp(img - fill, torch.tensor(theta, dtype=x.dtype), align_corners=False) + fill
        else:  # noise
            res = img + noise * v.to(dev)
        out[idx] = res
    return out


def _take(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x (K, C, H', W') at rows (K, H) x cols (K, W) per image -> (K, C, H, W)."""
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _nearest_index(size: int, new: Tensor, length: int, offset: Tensor) -> tuple[Tensor, Tensor]:
    """Per image, for output positions 0..length-1 of a centred, `new`-long nearest resize of a
    `size`-long axis (cropped/zero-padded back, offset = canvas crop − paste offset): the
    source index and whether it lies inside the resized content."""
    j = offset[:, None] + torch.arange(length)  # position in the resized content
    inside = (j >= 0) & (j < new[:, None])
    # F.interpolate(mode='nearest')'s source index, in float32 as its kernel computes it:
    # min(floor(j · (size / new)), size − 1).
    ratio = torch.tensor(float(size), dtype=torch.float32) / new.float()
    src = (j.float() * ratio[:, None]).floor().long().clamp(0, size - 1)
    return src, inside


def _nearest_rescale(img: Tensor, nh: Tensor, nw: Tensor) -> Tensor:
    """The DC code's scale of img (K, C, H, W) to per-image (nh, nw) (nearest), pasted at the
    centre of a zero canvas of side max(nh, nw, H, W), then the centre H×W cut out."""
    _, _, h, w = img.shape
    side = torch.maximum(torch.maximum(nh, nw), torch.tensor(max(h, w)))
    rows, in_r = _nearest_index(h, nh, h, (side - h) // 2 - (side - nh) // 2)
    cols, in_c = _nearest_index(w, nw, w, (side - w) // 2 - (side - nw) // 2)
    keep = (in_r[:, :, None] & in_c[:, None, :])[:, None].to(img.device)
    res = _take(img, rows.to(img.device), cols.to(img.device))
    return torch.where(keep, res, torch.zeros((), dtype=img.dtype, device=img.device))
