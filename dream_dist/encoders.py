"""Encoder/decoder pairs for DDOQ's latent spaces, registered by name.

    from dream_dist.encoders import build_encoder, train_autoencoder, save_autoencoder
    enc = build_encoder("identity", channels=1, im_size=28, mean=mean, std=std)   # pixel space
    ae = train_autoencoder(train, mean, std, AutoencoderConfig(epochs=5), seed=0)
    save_autoencoder(ae, "outputs/ae.pt")
    enc = build_encoder("autoencoder", 1, 28, mean, std, path="outputs/ae.pt")
    enc = build_encoder("diffusers_vae", 3, 64, mean, std, path="/models/sd-vae", subfolder=None)
    z = enc.encode(x)          # x: normalised float (N, C, H, W) -> latent (N, ...)
    x_hat = enc.decode(z)      # latent -> normalised float (N, C, H, W)

Every encoder works on images NORMALISED with the dataset's mean/std (what the rest of
dream_dist passes around) and decodes back into that space, so DDOQ never needs to know
which one it has. Three are built in:
- "identity": the latent is the image itself (DDOQ in pixel space);
- "autoencoder": a small convolutional autoencoder in plain torch, trained here on the
  dataset (`train_autoencoder`) and stored as a plain state-dict file read with
  `torch.load(..., weights_only=True)`;
- "diffusers_vae": a diffusers `AutoencoderKL` (e.g. Stable Diffusion's VAE, the latent
  space the DDOQ paper clusters in) loaded from a LOCAL directory with
  `local_files_only=True`: nothing is ever downloaded. diffusers is an optional extra
  (`pip install 'dream_dist[diffusers]'`), imported only when this encoder is built.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet, StreamedSet, denormalize, normalize, read_batches
from dream_dist.errors import CheckpointError, DataNotFoundError
from dream_dist.seeding import generator

__all__ = [
    "ENCODERS",
    "AutoencoderConfig",
    "ConvAutoencoder",
    "Encoder",
    "build_encoder",
    "encoder_options",
    "load_autoencoder",
    "reconstruction_error",
    "register_encoder",
    "save_autoencoder",
    "train_autoencoder",
]

AE_FORMAT = "dream_dist.autoencoder"


class Encoder(nn.Module):
    """An encoder/decoder pair between normalised images (N, C, H, W) and latents (N, ...)."""

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError


EncoderFactory = Callable[..., Encoder]
ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering a factory `f(channels, im_size, mean, std, path=None, device="cpu",
    *, <options>) -> Encoder` under `name`. Options are keyword-only, so configs can be
    checked against them before any compute (`encoder_options`)."""

    def deco(fn: EncoderFactory) -> EncoderFactory:
        if name in ENCODERS:
            raise ValueError(f"encoder name {name!r} is already registered")
        ENCODERS[name] = fn
        return fn

    return deco


def encoder_options(name: str) -> set[str]:
    """The keyword options encoder `name` accepts (its factory's keyword-only parameters)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    params = inspect.signature(ENCODERS[name]).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_encoder(name: str, channels: int, im_size: int, mean, std, path: str | Path | None = None,
                  device: str = "cpu", **options: Any) -> Encoder:
    """Build the registered encoder `name` for (channels, im_size) images normalised with
    mean/std, in eval mode on `device`. Unknown options are refused, naming the allowed ones."""
    allowed = encoder_options(name)
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(f"encoder {name!r}: unknown option(s) {bad}; allowed: "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    enc = ENCODERS[name](channels, im_size, mean, std, path=path, device=device, **options)
    return enc.to(device).eval()


# ---------------------------------------------------------------------------- identity


class Identity(Encoder):
    """Pixel space: DDOQ's k-means runs on the normalised pixels themselves."""

    def encode(self, x: Tensor) -> Tensor:
        return x.clone()

    def decode(self, z: Tensor) -> Tensor:
        return z.clone()


@register_encoder("identity")
def _identity(channels: int, im_size: int, mean, std, path=None, device: str = "cpu") -> Encoder:
    if path is not None:
        raise ValueError(f"encoder 'identity' takes no path (got {path!r})")
    return Identity()


# ---------------------------------------------------------------------------- autoencoder


@dataclass
class AutoencoderConfig:
    """The autoencoder DDOQ trains on the dataset when no encoder file is given."""

    width: int = 32
    """Channels of the first conv stage (doubled at each further downsampling stage)."""
    latent_channels: int = 4
    """Channels of the latent map; the latent is (latent_channels, H/2^downsample, W/2^downsample)."""
    downsample: int = 2
    """Stride-2 stages: 2 maps 28 px to a 7x7 latent (196 numbers for 784 pixels at 4 channels)."""
    epochs: int = 10
    """Training epochs over the (sub)sampled training images."""
    batch_size: int = 128
    """Mini-batch size."""
    lr: float = 1e-3
    """Adam learning rate."""
    max_images: int | None = 20000
    """Seeded random subsample the autoencoder trains on (None = all training images)."""

    def __post_init__(self) -> None:
        for name in ("width", "latent_channels", "downsample", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"autoencoder.{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"autoencoder.lr must be a finite number > 0, got {self.lr}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"autoencoder.max_images must be >= 1 or None, got {self.max_images}")


class ConvAutoencoder(Encoder):
    """conv3x3/2 -> GroupNorm -> SiLU stages down to a latent map, mirrored with nearest
    upsampling on the way back. The decoder's output is unbounded: it predicts normalised
    pixels, and the reconstruction loss is the MSE in that space."""

    def __init__(self, channels: int, im_size: int, width: int = 32, latent_channels: int = 4,
                 downsample: int = 2, mean=None, std=None) -> None:
        super().__init__()
        if im_size % (2 ** downsample):
            raise ValueError(f"image size {im_size} is not divisible by 2^downsample = "
                             f"{2 ** downsample}; lower autoencoder.downsample")
        self.channels, self.im_size = channels, im_size
        self.width, self.latent_channels, self.downsample = width, latent_channels, downsample
        # The statistics the inputs were normalised with; checked when the file is reused.
        self.mean = None if mean is None else [float(v) for v in torch.as_tensor(mean).flatten()]
        self.std = None if std is None else [float(v) for v in torch.as_tensor(std).flatten()]
        widths = [width * 2 ** i for i in range(downsample)]
        enc: list[nn.Module] = []
        in_ch = channels
        for w in widths:
            enc += [nn.Conv2d(in_ch, w, 3, stride=2, padding=1), nn.GroupNorm(1, w), nn.SiLU()]
            in_ch = w
        enc.append(nn.Conv2d(in_ch, latent_channels, 1))
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, in_ch, 3, padding=1), nn.SiLU()]
        for w in reversed(widths):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, w, 3, padding=1),
                    nn.GroupNorm(1, w), nn.SiLU()]
            in_ch = w
        dec.append(nn.Conv2d(in_ch, channels, 3, padding=1))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.im_size // 2 ** self.downsample
        return (self.latent_channels, s, s)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def train_autoencoder(train: ImageSet | StreamedSet, mean, std, cfg: AutoencoderConfig | None = None,
                      seed: int = 0, progress: bool = True, device: str = "cpu") -> ConvAutoencoder:
    """Train a ConvAutoencoder on `train` (uint8) with the MSE of normalised pixels, Adam.

    `train`: an ImageSet, or a StreamedSet whose batches are read from the shards (the same
    weights). Returns the model in eval mode; `model.losses` holds the mean training loss per epoch.
    """
    cfg = cfg or AutoencoderConfig()
    if len(train) == 0:
        raise ValueError("cannot train an autoencoder on an empty image set")
    g = generator(seed, 11)
    idx = torch.arange(len(train))
    if cfg.max_images is not None and cfg.max_images < len(train):
        idx = torch.randperm(len(train), generator=g)[: cfg.max_images]
    with torch.random.fork_rng(devices=[]):  # the caller's global stream is left alone
        torch.manual_seed(seed)
        model = ConvAutoencoder(train.channels, train.size, cfg.width, cfg.latent_channels,
                                cfg.downsample, mean, std)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = (len(idx) + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(total=cfg.epochs * steps, desc="autoencoder", disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    losses: list[float] = []
    for _ in range(cfg.epochs):
        total = 0.0
        for b, images in read_batches(train, idx[torch.randperm(len(idx), generator=g)].split(cfg.batch_size)):
            # Normalise per batch: a float copy of the whole set is 4x its uint8 size.
            x = normalize(images.to(device), mean, std)
            loss = F.mse_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        losses.append(total / len(idx))
    bar.close()
    model.losses = losses
    return model.eval()


@torch.no_grad()
def reconstruction_error(enc: Encoder, images: Tensor, mean, std, batch_size: int = 512) -> float:
    """Mean squared error of decode(encode(x)) on uint8 images, in normalised pixel units."""
    device = next(enc.parameters(), torch.empty(0)).device
    total, n = 0.0, 0
    for chunk in images.split(batch_size):
        x = normalize(chunk.to(device), mean, std)
        total += F.mse_loss(enc.decode(enc.encode(x)), x, reduction="sum").item()
        n += x.numel()
    if n == 0:
        raise ValueError("no images to measure the reconstruction error on")
    return total / n


def save_autoencoder(model: ConvAutoencoder, path: str | Path) -> Path:
    """Write the autoencoder as a plain dict (architecture, normalisation, state dict), so
    it loads with weights_only=True and no pickled code ever runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": AE_FORMAT, "version": 1, "channels": model.channels, "im_size": model.im_size,
             "width": model.width, "latent_channels": model.latent_channels,
             "downsample": model.downsample, "mean": model.mean, "std": model.std,
             "losses": [float(v) for v in getattr(model, "losses", [])],
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written file under `path`
    return path


def load_autoencoder(path: str | Path, device: str = "cpu") -> ConvAutoencoder:
    """Read a file written by `save_autoencoder` (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no autoencoder file (train one with "
                                f"dream_dist.encoders.train_autoencoder, or leave ddoq.encoder_path "
                                f"empty to train one in the run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or state.get("format") != AE_FORMAT:
        raise CheckpointError(f"{path}: not a dream_dist autoencoder file (expected format {AE_FORMAT!r})")
    model = ConvAutoencoder(state["channels"], state["im_size"], state["width"],
                            state["latent_channels"], state["downsample"], state["mean"], state["std"])
    model.load_state_dict(state["state_dict"])
    model.losses = list(state.get("losses", []))
    return model.to(device).eval()


@register_encoder("autoencoder")
def _autoencoder(channels: int, im_size: int, mean, std, path=None, device: str = "cpu") -> Encoder:
    if path is None:
        raise ValueError("encoder 'autoencoder' needs the path of a file written by save_autoencoder "
                         "(task=ddoq trains one when ddoq.encoder_path is empty)")
    model = load_autoencoder(path, device)
    if (model.channels, model.im_size) != (channels, im_size):
        raise CheckpointError(f"{path}: the autoencoder is for {model.channels}x{model.im_size}px images, "
                         f"the dataset has {channels}x{im_size}px")
    for name, ours, theirs in (("mean", model.mean, mean), ("std", model.std, std)):
        theirs = [float(v) for v in torch.as_tensor(theirs).flatten()]
        if ours is not None and not torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-3):
            raise CheckpointError(f"{path}: the autoencoder was trained on images normalised with {name} "
                             f"{ours}, the dataset uses {theirs}: retrain it on this dataset")
    return model


# ---------------------------------------------------------------------------- diffusers VAE


class DiffusersVAE(Encoder):
    """A diffusers AutoencoderKL between our normalised images and its scaled latent space.

    encode: denormalise to [0, 1] -> [-1, 1] (what Stable Diffusion's VAE expects), grey
    images repeated to RGB, resized to `image_size` (a multiple of 8: the VAE downsamples 8x),
    latent = mean of the posterior x the VAE's scaling factor (deterministic; no sampling).
    decode: the inverse, with the RGB output averaged back to grey for 1-channel datasets.
    """

    def __init__(self, vae: nn.Module, channels: int, im_size: int, mean, std,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.vae, self.channels, self.im_size = vae, channels, im_size
        self.image_size = image_size or 8 * math.ceil(im_size / 8)
        if self.image_size % 8:
            raise ValueError(f"diffusers_vae image_size must be a multiple of 8, got {self.image_size}")
        self.scale = float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215) or 0.18215)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _resize(self, x: Tensor, size: int) -> Tensor:
        if x.shape[-1] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=size < x.shape[-1])

    def encode(self, x: Tensor) -> Tensor:
        x = denormalize(x, self.mean, self.std) * 2 - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self._resize(x, self.image_size).to(next(self.vae.parameters()).dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.scale

    def decode(self, z: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        y = self.vae.decode((z / self.scale).to(dtype)).sample.float().clamp(-1, 1)
        y = self._resize((y + 1) / 2, self.im_size)
        if self.channels == 1:
            y = y.mean(1, keepdim=True)
        return (y - self.mean) / self.std


@register_encoder("diffusers_vae")
def _diffusers_vae(channels: int, im_size: int, mean, std, path=None, device: str = "cpu", *,
                   subfolder: str | None = None, image_size: int | None = None) -> Encoder:
    """subfolder: 'vae' when `path` is a whole Stable Diffusion pipeline directory.
    image_size: side the images are resized to before encoding (default: im_size rounded up
    to a multiple of 8)."""
    try:
        from diffusers import AutoencoderKL  # optional extra, imported only here
    except ImportError as e:
        raise ImportError(
            "encoder 'diffusers_vae' needs the optional dependency diffusers, which is not "
            "installed: pip install 'dream_dist[diffusers]' (or pip install diffusers), or use "
            "ddoq.encoder=autoencoder / identity"
        ) from e
    if path is None:
        raise ValueError("encoder 'diffusers_vae' needs ddoq.encoder_path: a LOCAL directory holding an "
                         "AutoencoderKL (config.json + weights); nothing is downloaded")
    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"{root}: not a directory; diffusers_vae loads an AutoencoderKL from a "
                                f"local directory only (from_pretrained(..., local_files_only=True))")
    vae = AutoencoderKL.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
    return DiffusersVAE(vae.to(device).eval(), channels, im_size, mean, std, image_size)
