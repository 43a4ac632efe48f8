"""DDOQ: dataset distillation by optimal quantisation in a latent space (task=ddoq).

    dream-dist task=ddoq                                        # digits, autoencoder latent, IPC 10
    dream-dist experiment=ddoq_digits ddoq.encoder=identity     # pixel-space quantisation
    dream-dist experiment=ddoq_mnist_cpu ddoq.soft_labels=true  # MNIST, observer soft labels
    dream-dist task=ddoq ddoq.encoder=diffusers_vae ddoq.encoder_path=/models/sd-vae \\
        '+ddoq.encoder_options={subfolder: null, image_size: 64}'

    from dream_dist.methods.ddoq import DDOQConfig, distill
    res = distill(train, encoder, mean, std, DDOQConfig(ipc=10), seed=0)
    res.images, res.labels, res.weights          # decoded centroids + their cluster masses

Per class c (Tan & Slade, "Dataset Distillation as Pushforward Optimal Quantization",
arXiv 2501.07681), and what dream_dist does at each step:
1. encode the class's real images with an encoder: z = E(x)                     [paper]
2. mini-batch k-means of the latents with k = IPC (`dream_dist.kmeans.minibatch_kmeans`,
   k-means++ init, per-sample learning rate 1/count, i.e. CLVQ a mini-batch at a time) [paper]
3. the weight of centroid j is its cluster mass: how many of the class's latents lie in its
   Voronoi cell (`cluster_masses`); the weights of a class sum to its size          [paper]
4. decode the centroids, x_j = D(z_j), and train on them with the weights as per-sample
   loss weights (`dream_dist.evaluation.protocol`, weighted mean of the loss), optionally with the
   observer's soft labels softmax(observer(x_j) / T) as targets                     [paper]

Assumptions and differences (no public code exists; these are dream_dist's choices):
- the paper's encoder/decoder is a pretrained latent-diffusion model (Stable Diffusion's VAE,
  with diffusion denoising when decoding, as in D4M). Here the decoder is the autoencoder's
  own decoder, with no diffusion step: `diffusers_vae` loads an AutoencoderKL from a local
  directory and decodes directly; `autoencoder` is a small conv AE trained on the dataset
  (no pretrained model is available offline); `identity` quantises pixels;
- the masses are counted exactly, by assigning every latent to its final centroid after
  one last full-batch centroid update (`final_mean`), instead of being estimated online
  during the mini-batch passes; both estimate the same Voronoi masses;
- weights are stored as raw masses (summing to the class size). The evaluation rescales all
  weights to mean 1, so each class's total weight is proportional to its size: the set
  approximates the empirical measure of the whole training split. `weighting=sqrt` (damped
  weights) and `uniform` (D4M: plain k-means, no weights) are offered as ablations;
- decoded images are clamped to the valid pixel range (an AE can overshoot it);
- the evaluation is dream_dist's protocol (ConvNet, SGD, DSA; eval=...) with the weights,
  not the paper's ImageNet recipe (ResNet-18, soft labels from a pretrained ResNet-18 with
  the SRe2L/RDED training schedule).

Outputs in cfg.out_dir: distilled.pt (with `weights` and, with soft labels, `soft_labels`),
distilled.png (one row per class), weights.png, autoencoder.pt + autoencoder.png (when one is
trained), results.json and TensorBoard logs (tb/ddoq: autoencoder loss, per-class distortion,
weight histogram, image grid; tb/<eval name>/run<i>: evaluation runs).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet, StreamedSet, denormalize, normalize
from dream_dist.encoders import ENCODERS, AutoencoderConfig, Encoder, encoder_options
from dream_dist.errors import ConfigError, DataError
from dream_dist.methods.base import Method, SynthSet
from dream_dist.kmeans import KMEANS_INITS, cluster_masses, gpu_for, minibatch_kmeans
from dream_dist.memory import release_free_memory
from dream_dist.seeding import CLUSTER, derive_seed

__all__ = [
    "WEIGHTINGS",
    "DDOQConfig",
    "DDOQResult",
    "Quantized",
    "class_seed",
    "class_weights",
    "decode_latents",
    "distill",
    "distill_class",
    "encode_images",
    "quantize",
    "DDOQMethod",
]

WEIGHTINGS = ("mass", "sqrt", "uniform")


def _error(msg: str) -> ValueError:
    return ConfigError(msg)


@dataclass
class DDOQConfig:
    """DDOQ: per-class k-means (k = IPC) in an encoder's latent space, weights = cluster masses."""

    ipc: int = 10
    """Images per class: the number of centroids of each class's k-means."""
    encoder: str = "autoencoder"
    """Latent space (dream_dist.encoders.ENCODERS): 'identity' (pixels), 'autoencoder' (trained
    here unless encoder_path is given), 'diffusers_vae' (local AutoencoderKL; optional extra)."""
    encoder_path: str | None = None
    """autoencoder: a file from save_autoencoder (None = train one and save it in out_dir);
    diffusers_vae: the local directory of the AutoencoderKL (required)."""
    encoder_options: dict = field(default_factory=dict)
    """Keyword options of the encoder's factory, e.g. {subfolder: vae, image_size: 64}."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """Architecture and training of the autoencoder trained when encoder_path is empty."""
    kmeans_batch_size: int = 1024
    """Latents per mini-batch k-means step (the whole class when it is smaller)."""
    kmeans_iterations: int = 100
    """Mini-batch k-means steps per class."""
    kmeans_init: str = "kmeans++"
    """Initial centroids: 'kmeans++' or 'random' (k distinct latents)."""
    weighting: str = "mass"
    """Training weights from the cluster masses: 'mass' (DDOQ), 'sqrt' (damped, ablation),
    'uniform' (D4M-like, ablation). Always rescaled to sum to the class size."""
    soft_labels: bool = False
    """Train on the observer's soft labels softmax(observer(x) / temperature) instead of classes."""
    temperature: float = 1.0
    """Softmax temperature of the soft labels."""
    observer_path: str | None = None
    """Observer checkpoint for the soft labels; None = the run's `observer` settings (its path,
    or an observer trained on the train split and saved as out_dir/observer.pt)."""
    batch_size: int = 256
    """Images per encoder/decoder forward pass (memory only; no effect on the result)."""
    baseline: bool = True
    """Also evaluate a random real coreset of the same IPC (with the same kind of labels)."""
    workers: int = 0
    """0 = every class in this process; N = the classes fan out to N Ray tasks (same set)."""

    def __post_init__(self) -> None:
        for name in ("ipc", "kmeans_batch_size", "kmeans_iterations", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _error(f"ddoq.{name} must be a positive int, got {value!r}")
        if self.encoder not in ENCODERS:
            raise _error(f"ddoq.encoder: unknown {self.encoder!r}; known: {', '.join(sorted(ENCODERS))}")
        bad = sorted(set(self.encoder_options) - encoder_options(self.encoder))
        if bad:
            raise _error(f"ddoq.encoder_options: {bad} not accepted by encoder {self.encoder!r}; "
                         f"allowed: {', '.join(sorted(encoder_options(self.encoder))) or 'none'}")
        if self.encoder == "diffusers_vae" and self.encoder_path is None:
            raise _error("ddoq.encoder_path: diffusers_vae needs the local directory of an AutoencoderKL")
        if self.encoder == "identity" and self.encoder_path is not None:
            raise _error("ddoq.encoder_path: the identity encoder takes no path")
        if self.kmeans_init not in KMEANS_INITS:
            raise _error(f"ddoq.kmeans_init: unknown {self.kmeans_init!r}; choose {', '.join(KMEANS_INITS)}")
        if self.weighting not in WEIGHTINGS:
            raise _error(f"ddoq.weighting: unknown {self.weighting!r}; choose {', '.join(WEIGHTINGS)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise _error(f"ddoq.temperature must be a finite number > 0, got {self.temperature}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise _error(f"ddoq.workers must be an int >= 0, got {self.workers!r}")
        if self.observer_path is not None and not self.soft_labels:
            raise _error("ddoq.observer_path is only used with ddoq.soft_labels=true")


# ---------------------------------------------------------------------------- pure functions


@torch.no_grad()
def encode_images(encoder: Encoder, images: Tensor, mean, std, batch_size: int = 256,
                  device: str = "cpu") -> Tensor:
    """uint8 images (N, C, H, W) -> float32 CPU latents (N, ...), batch by batch."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    out = [encoder.encode(normalize(x.to(device), mean, std)).float().cpu()
           for x in images.split(batch_size)]
    if not out:
        raise ValueError("no images to encode")
    return torch.cat(out)


@torch.no_grad()
def decode_latents(encoder: Encoder, latents: Tensor, mean, std, batch_size: int = 256,
                   device: str = "cpu") -> Tensor:
    """Latents (k, ...) -> normalised float32 CPU images, clamped to the pixel range [0, 1]
    (in normalised units) that real images occupy."""
    x = torch.cat([encoder.decode(z.to(device)).float().cpu() for z in latents.split(batch_size)])
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return torch.maximum(torch.minimum(x, (1 - m) / s), -m / s)


class Quantized(NamedTuple):
    """The optimal quantiser of one class's latents."""

    centroids: Tensor  # float32 (k, *latent_shape)
    masses: Tensor  # int64 (k,): latents in each centroid's cell; sums to N
    assignment: Tensor  # int64 (N,)
    distortion: float  # mean squared distance of a latent to its centroid (per latent, not per dim)


def quantize(latents: Tensor, k: int, batch_size: int = 1024, niter: int = 100, seed: int = 0,
             init: str = "kmeans++", gpu: int | None = None) -> Quantized:
    """Mini-batch k-means of latents (N, ...) flattened to (N, D); centroids keep the latent shape."""
    flat = latents.reshape(len(latents), -1).float()
    cents, assign = minibatch_kmeans(flat, k, batch_size=batch_size, niter=niter, seed=seed,
                                     init=init, gpu=gpu)
    c = torch.from_numpy(cents)
    a = torch.from_numpy(assign)
    distortion = float(((flat - c[a]) ** 2).sum(1).mean())
    masses = torch.from_numpy(cluster_masses(assign, k))
    return Quantized(c.reshape(k, *latents.shape[1:]), masses, a, distortion)


def class_weights(masses: Tensor, weighting: str = "mass") -> Tensor:
    """Training weights float32 (k,) from cluster masses, rescaled to sum to the class size."""
    m = masses.double()
    if weighting == "mass":
        w = m
    elif weighting == "sqrt":
        w = m.sqrt()
    elif weighting == "uniform":
        w = torch.ones_like(m)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    return (w * (m.sum() / w.sum())).float()


def class_seed(seed: int, c: int) -> int:
    """The k-means seed of class c: its own stream, whatever the order classes are visited in."""
    return derive_seed(seed, CLUSTER, c) % 2**31


class DDOQResult(NamedTuple):
    images: Tensor  # float32 (C·ipc, C, H, W), normalised, class-major
    labels: Tensor  # int64 (C·ipc,)
    weights: Tensor  # float32 (C·ipc,): training weights (weighting applied)
    masses: Tensor  # int64 (C·ipc,): raw cluster masses
    distortion: dict  # class id -> mean squared latent distance to the centroid
    latent_shape: tuple


def distill_class(encoder: Encoder, images: Tensor, mean, std, cfg: DDOQConfig, seed: int = 0,
                  device: str = "cpu") -> tuple[Tensor, Quantized]:
    """One class: uint8 images -> (decoded centroids, normalised float (ipc, C, H, W), Quantized)."""
    if cfg.ipc > len(images):
        raise DataError(f"ipc={cfg.ipc} centroids need at least as many images; the class has {len(images)}")
    z = encode_images(encoder, images, mean, std, cfg.batch_size, device)
    q = quantize(z, cfg.ipc, cfg.kmeans_batch_size, cfg.kmeans_iterations, seed, cfg.kmeans_init,
                 gpu=gpu_for(device))  # FAISS on the encoder's GPU, never on another
    return decode_latents(encoder, q.centroids, mean, std, cfg.batch_size, device), q


def distill(train: ImageSet, encoder: Encoder, mean, std, cfg: DDOQConfig, seed: int = 0,
            classes: list[int] | None = None, device: str = "cpu", progress: bool = True) -> DDOQResult:
    """DDOQ over `classes` (default all) of `train`: IPC decoded centroids per class + weights."""
    classes = list(range(train.num_classes)) if classes is None else list(classes)
    imgs, labels, weights, masses, distortion = [], [], [], [], {}
    shape: tuple = ()
    for c in tqdm(classes, desc="ddoq classes", disable=None if progress else True, leave=False):
        try:
            dec, q = distill_class(encoder, train.of_class(c), mean, std, cfg, class_seed(seed, c), device)
        except ValueError as e:
            raise DataError(f"class {c} ({train.classes[c]!r}): {e}") from None
        release_free_memory()  # as in DDOQMethod.distill_group: flat memory over the classes
        imgs.append(dec)
        labels.append(torch.full((cfg.ipc,), c, dtype=torch.int64))
        weights.append(class_weights(q.masses, cfg.weighting))
        masses.append(q.masses)
        distortion[c] = q.distortion
        shape = tuple(q.centroids.shape[1:])
    return DDOQResult(torch.cat(imgs), torch.cat(labels), torch.cat(weights), torch.cat(masses),
                      distortion, shape)


# ---------------------------------------------------------------------------- the task


def prepare_encoder(cfg, train: ImageSet | StreamedSet, mean, std, out: Path, writer=None) -> tuple[Encoder, dict]:
    """The run's encoder: built from ddoq.encoder/encoder_path, or (autoencoder without a path)
    trained on the train split (an ImageSet, or a StreamedSet read batch by batch) and saved
    as out/autoencoder.pt with a reconstruction PNG."""
    from dream_dist.encoders import build_encoder, save_autoencoder, train_autoencoder

    d = cfg.ddoq
    start = time.perf_counter()
    info: dict[str, Any] = {"encoder": d.encoder}
    if d.encoder == "autoencoder" and d.encoder_path is None:
        ae = train_autoencoder(train, mean, std, d.autoencoder, seed=cfg.seed, progress=cfg.progress,
                               device=cfg.device)
        info["path"] = str(save_autoencoder(ae, out / "autoencoder.pt"))
        info["train_losses"] = list(ae.losses)
        if writer is not None:
            for epoch, loss in enumerate(ae.losses):
                writer.add_scalar("autoencoder/loss", loss, epoch)
        enc: Encoder = ae
    else:
        enc = build_encoder(d.encoder, train.channels, train.size, mean, std, path=d.encoder_path,
                            device=cfg.device, **dict(d.encoder_options))
        info["path"] = d.encoder_path
    info["seconds"] = time.perf_counter() - start
    if d.encoder != "identity":
        from dream_dist.encoders import reconstruction_error
        from dream_dist.viz import save_grid

        # Is the latent space any good? (real, reconstruction) pairs, 8 pairs of one class per row.
        idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:8] for c in range(train.num_classes)])
        real = train.batch(idx[:80])
        with torch.no_grad():
            x = normalize(real.to(cfg.device), mean, std)
            rec = decode_latents(enc, enc.encode(x), mean, std, d.batch_size, cfg.device)
        pair = torch.stack([real.float() / 255, denormalize(rec, mean, std)], 1).flatten(0, 1)
        save_grid(pair, out / f"{d.encoder}.png", nrow=16)
        info["reconstruction_mse"] = reconstruction_error(enc, real, mean, std)
    return enc, info


def _weights_png(weights: Tensor, labels: Tensor, classes: list[str], path: Path) -> None:
    """A heat map of the weights, classes x centroids, values printed in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = labels.unique().tolist()
    grid = torch.stack([weights[labels == c] for c in ids]).numpy()
    fig, ax = plt.subplots(figsize=(0.6 * grid.shape[1] + 2, 0.4 * len(ids) + 1.2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    if grid.size <= 600:
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_yticks(range(len(ids)), [classes[c] for c in ids], fontsize=7)
    ax.set_xlabel("centroid (distilled image)")
    ax.set_title("DDOQ training weights (from the cluster masses)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class DDOQPrep:
    encoder: Encoder
    encoder_info: dict
    observer: Any
    observer_info: dict | None
    mean: list[float]
    std: list[float]


class DDOQMethod(Method):
    """task=ddoq: encode, quantise (k-means per class), decode, weight by cluster mass."""

    task = "ddoq"

    def workers(self, cfg) -> int:
        return cfg.ddoq.workers

    def driver_models(self, cfg) -> list[str]:
        return ([f"the {cfg.ddoq.encoder} encoder"] if cfg.ddoq.encoder != "identity" else []) + \
            (["the observer (soft labels)"] if cfg.ddoq.soft_labels else [])

    def prepare(self, cfg, data, out: Path) -> DDOQPrep:
        d = cfg.ddoq
        small = [(c, data.counts_all[c]) for c in data.classes if data.counts_all[c] < d.ipc]
        if small:  # before any compute
            c, n = small[0]
            raise DataError(f"ddoq.ipc={d.ipc} is larger than class {c} ({data.names[c]!r}), which has "
                            f"only {n} training images")
        from torch.utils.tensorboard import SummaryWriter

        # The train split is read only when something trains on it (autoencoder, observer), and
        # then batch by batch from the shards: the driver never holds it. (An autoencoder trains
        # on it; every encoder but identity shows reconstructions of a few of its images.)
        train = data.train_stream() if d.encoder != "identity" else data.meta()
        with SummaryWriter(str(out / "tb" / "ddoq")) as writer:
            enc, enc_info = prepare_encoder(cfg, train, data.mean, data.std, out, writer)
        observer = obs_info = None
        if d.soft_labels:
            from dream_dist.evaluation.observer import ObserverConfig, get_observer

            ocfg = getattr(cfg, "observer", None) or ObserverConfig()
            if d.observer_path is not None:
                ocfg = dataclasses.replace(ocfg, path=d.observer_path)
            obs_train = data.train_stream() if ocfg.path is None else data.meta()
            observer, obs_info = get_observer(ocfg, obs_train, data.mean, data.std, seed=cfg.seed,
                                              save_to=out / "observer.pt", progress=cfg.progress, device=cfg.device)
        return DDOQPrep(enc, enc_info, observer, obs_info, data.mean, data.std)

    def distill_group(self, cfg, prep: DDOQPrep, classes, images_of, progress: bool = False) -> dict:
        parts = {}
        for c in tqdm(classes, desc="ddoq classes", disable=None if progress else True, leave=False):
            try:
                dec, q = distill_class(prep.encoder, images_of(c), prep.mean, prep.std, cfg.ddoq,
                                       class_seed(cfg.seed, c), cfg.device)
            except ValueError as e:
                raise DataError(f"class {c}: {e}") from None
            parts[c] = (dec, q)
            # The class's temporaries leave free heap that glibc does not reuse for the next
            # class (dream_dist.memory): 20.9 GB at 500 stress classes without this.
            release_free_memory()
        return parts

    def _tag(self, cfg) -> str:
        return "_soft" if cfg.ddoq.soft_labels else ""

    def assemble(self, cfg, prep: DDOQPrep, data, parts: dict, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        from dream_dist.evaluation.observer import soft_labels
        from dream_dist.viz import grid

        d, classes = cfg.ddoq, data.classes
        images = torch.cat([parts[c][0] for c in classes])
        labels = torch.cat([torch.full((d.ipc,), c, dtype=torch.int64) for c in classes])
        weights = torch.cat([class_weights(parts[c][1].masses, d.weighting) for c in classes])
        distortion = {c: parts[c][1].distortion for c in classes}
        shape = tuple(parts[classes[-1]][1].centroids.shape[1:])
        soft = soft_labels(prep.observer, images, d.temperature) if prep.observer is not None else None
        with SummaryWriter(str(out / "tb" / "ddoq")) as writer:
            for c, v in distortion.items():
                writer.add_scalar("ddoq/distortion", v, c)
            writer.add_histogram("ddoq/weights", weights, 0)
            writer.add_image("ddoq/distilled", grid(denormalize(images, prep.mean, prep.std), nrow=d.ipc), 0,
                             dataformats="HWC")
        _weights_png(weights, labels, data.names, out / "weights.png")
        metrics = {"encoder_seconds": prep.encoder_info["seconds"],
                   "encoder": {k: v for k, v in prep.encoder_info.items() if k != "seconds"},
                   "latent_shape": list(shape), "distortion": distortion, "observer": prep.observer_info}
        tag = self._tag(cfg)
        return [SynthSet(f"ddoq_{d.encoder}{tag}", images, labels, d.ipc, soft_labels=soft, weights=weights,
                         label=f"ddoq ({d.encoder}){' soft' if tag else ''}")], metrics

    def evaluator(self, cfg, prep, data):
        from dream_dist.evaluation.protocol import HardLabelProtocol

        return HardLabelProtocol(cfg.eval, data.test(), data.mean, data.std, cfg.dataset.kind)

    def baseline(self, cfg, prep: DDOQPrep, data) -> SynthSet | None:
        if not cfg.ddoq.baseline:
            return None
        from dream_dist.evaluation.observer import soft_labels
        from dream_dist.methods.coreset import random_baseline

        images, labels = random_baseline(data, cfg.ddoq.ipc, cfg.seed)
        x = normalize(images, prep.mean, prep.std)
        soft = soft_labels(prep.observer, x, cfg.ddoq.temperature) if prep.observer is not None else None
        tag = self._tag(cfg)
        return SynthSet(f"random_coreset{tag}", x, labels, cfg.ddoq.ipc, soft_labels=soft,
                        label=f"random coreset{' soft' if tag else ''}", published=None if tag else "random",
                        save_as=None)

    def title(self, cfg, prep, data, metrics: dict) -> str:
        d = cfg.ddoq
        return f"{cfg.dataset.name}: ddoq ({d.encoder}, {d.weighting} weights{', soft labels' if d.soft_labels else ''})"

    def timing(self, metrics: dict) -> str:
        return f"distill {metrics['distill_seconds']:.1f} s + encoder {metrics['encoder_seconds']:.0f} s"

    def summary(self, cfg, prep) -> dict:
        return {"ddoq": dataclasses.asdict(cfg.ddoq)}
