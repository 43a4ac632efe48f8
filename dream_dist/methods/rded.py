"""RDED (Sun et al., CVPR 2024): distil by choosing and stitching the most realistic crops.

    dream-dist task=rded experiment=rded_digits                 # digits, a few minutes on a CPU
    dream-dist task=rded experiment=rded_mnist_cpu
    dream-dist task=rded observer.path=outputs/train_observer/mnist/observer.pt dataset=mnist
    dream-dist task=rded rded.workers=4                         # classes fan out over Ray tasks

Per class c (docs/methods.md, "RDED"; nothing here looks at other classes):
1. sample up to m (`images_per_class`, 300) real images of c with c's own seed;
2. cut `crops_per_image` (5) square random resized crops (area 0.08–1) of side H/f from each;
3. score every crop by the observer's cross entropy of class c — lower is more realistic.
   A crop of side H/f is scored centred on a zero (= dataset-mean) canvas of full size, as
   the public code does;
4. keep each image's best crop, then the IPC·f² best of those;
5. stitch f² crops into each of IPC full-size images. Layout: crop i of the score-sorted list
   goes to image i mod IPC, into patch slot i div IPC, slots numbered row-major (slot 0 top-left,
   slot 1 top-right, then the next row). So slot 0 of every image holds one of the IPC best
   crops, and quality is spread evenly over the images.
Then the set is relabelled with the observer's soft labels ('image': the observer on the
stitched image; 'patch': the mean of the observer's labels of its f² patches, each upsampled
to full size — equal areas, so this is the area-weighted label, as CutMix labels a pasted box).
The evaluation is online KD from the observer (dream_dist.evaluation.kd), which relabels every augmented
crop again, i.e. region-level labels.

Classes fan out over Ray tasks with `rded.workers > 0` (one task per group of classes,
joins the running cluster, else starts a local Ray); every random draw is keyed by (seed, class)
with dream_dist.seeding.derive_seed, so the set is the same with or without Ray.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dream_dist.data.base import normalize
from dream_dist.methods.base import Method, SynthSet
from dream_dist.errors import DataError
from dream_dist.formation import decode
from dream_dist.memory import release_free_memory
from dream_dist.evaluation.kd import random_resized_crop
from dream_dist.evaluation.observer import soft_labels
from dream_dist.seeding import derive_seed
from dream_dist.determinism import cross_entropy

__all__ = [
    "LEVELS",
    "RDEDConfig",
    "distill_class",
    "distill_classes",
    "patch_soft_labels",
    "random_crops",
    "relabel",
    "RDEDMethod",
    "score_crops",
    "select_crops",
    "stitch",
]

LEVELS = ("patch", "image")
_PURPOSE = 101  # seeding purpose of RDED's draws (dream_dist.seeding uses 1..9)


@dataclass
class RDEDConfig:
    """RDED's selection, stitching and relabelling. Defaults: the paper's / public code's."""

    ipc: int = 10
    """Stitched images per class."""
    factor: int | None = None
    """Stitching factor f: N = f² crops per image. None = 2 for images of 64 px and more
    (TinyImageNet, ImageNet), 1 for smaller ones (MNIST, CIFAR), as the public scripts."""
    images_per_class: int = 300
    """m: real images sampled per class as crop sources (fewer when the class is smaller)."""
    crops_per_image: int = 5
    """Random resized crops scored per image (the public code's --num-crop 5)."""
    min_scale: float = 0.08
    """Smallest crop area as a fraction of the image."""
    max_scale: float = 1.0
    """Largest crop area as a fraction of the image."""
    relabel: str = "patch"
    """Stored soft labels: 'patch' (mean of the patches' labels) or 'image' (whole image)."""
    label_temperature: float = 1.0
    """Temperature of the STORED soft labels (the KD evaluation uses kd.temperature)."""
    batch_size: int = 256
    """Observer batch size when scoring crops (memory only)."""
    workers: int = 0
    """0: classes run in this process; k > 0: k Ray tasks, each owning a group of classes."""
    baseline: bool = True
    """Also KD-evaluate a random real subset of the same IPC with the same observer."""

    def __post_init__(self) -> None:
        for name in ("ipc", "images_per_class", "crops_per_image", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.factor is not None and (not isinstance(self.factor, int) or self.factor < 1):
            raise ValueError(f"factor must be a positive int or None, got {self.factor!r}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"min_scale/max_scale must satisfy 0 < min <= max <= 1, got "
                             f"{self.min_scale}, {self.max_scale}")
        if self.relabel not in LEVELS:
            raise ValueError(f"relabel must be one of {LEVELS}, got {self.relabel!r}")
        if not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be > 0, got {self.label_temperature}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")

    def resolved_factor(self, image_size: int) -> int:
        f = self.factor if self.factor is not None else (2 if image_size >= 64 else 1)
        if image_size % f:
            raise DataError(f"rded.factor {f} does not divide the image size {image_size}")
        return f

    def check_counts(self, counts: dict[int, int], factor: int) -> None:
        """Refuse before any compute when a class cannot give IPC·f² distinct crops."""
        need = self.ipc * factor * factor
        for c, n in counts.items():
            have = min(n, self.images_per_class)
            if have < need:
                raise DataError(
                    f"class {c}: rded.ipc={self.ipc} x factor² {factor * factor} = {need} crops "
                    f"needs {need} source images, but only {have} are available "
                    f"(class size {n}, rded.images_per_class={self.images_per_class})")


# ---------------------------------------------------------------------------- pure steps


def random_crops(images: Tensor, crops_per_image: int, out_size: int,
                 scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """(m, C, H, W) -> (m·n, C, s, s) square crops; rows i·n … i·n + n − 1 come from image i."""
    x = images.repeat_interleave(crops_per_image, dim=0)
    return random_resized_crop(x, out_size, scale, ratio=(1.0, 1.0), generator=generator)


def _to_canvas(crops: Tensor, size: int) -> Tensor:
    """Centre crops of side s on a zero canvas of side `size` (zero = the dataset mean)."""
    s = crops.shape[-1]
    if s == size:
        return crops
    top, left = (size - s) // 2, (size - s) // 2
    return F.pad(crops, (left, size - s - left, top, size - s - top))


@torch.no_grad()
def score_crops(observer: nn.Module, crops: Tensor, label: int, size: int,
                batch_size: int = 256) -> Tensor:
    """Cross entropy of class `label` under the observer for each normalised crop (P,):
    lower = more realistic. Crops smaller than `size` are scored on a zero canvas."""
    device = next(observer.parameters()).device
    observer.eval()
    out = []
    for x in crops.split(batch_size):
        logits = observer(_to_canvas(x, size).to(device)).float()
        target = torch.full((len(x),), int(label), device=device, dtype=torch.long)
        out.append(cross_entropy(logits, target, reduction="none").cpu())
    return torch.cat(out)


def select_crops(crops: Tensor, scores: Tensor, crops_per_image: int, keep: int
                 ) -> tuple[Tensor, Tensor]:
    """Each image's lowest-score crop, then the `keep` lowest of those, best first.
    Ties go to the earlier crop / image (stable), so the choice is reproducible."""
    if scores.shape != (crops.shape[0],) or crops.shape[0] % crops_per_image:
        raise ValueError(f"{crops.shape[0]} crops / {tuple(scores.shape)} scores do not form "
                         f"groups of {crops_per_image} per image")
    m = crops.shape[0] // crops_per_image
    if keep > m:
        raise ValueError(f"cannot keep {keep} crops from {m} images (one crop per image)")
    per_image = scores.view(m, crops_per_image)
    best = per_image.argmin(1)  # argmin returns the first minimum: ties keep the earlier crop
    idx = torch.arange(m) * crops_per_image + best
    order = torch.sort(scores[idx], stable=True).indices[:keep]
    return crops[idx[order]], scores[idx[order]]


def stitch(patches: Tensor, factor: int) -> Tensor:
    """(n·f², C, s, s) patches, best first -> (n, C, f·s, f·s) images: patch i goes to image
    i mod n, slot i div n, slots row-major (the module docstring's layout)."""
    if factor == 1:
        return patches
    k = factor * factor
    if patches.shape[0] % k:
        raise ValueError(f"stitch: {patches.shape[0]} patches is not a multiple of f² = {k}")
    n = patches.shape[0] // k
    c, s = patches.shape[1], patches.shape[-1]
    # (slot_row, slot_col, image, C, s, s) -> (image, C, slot_row, s, slot_col, s)
    grid = patches.reshape(factor, factor, n, c, s, s).permute(2, 3, 0, 4, 1, 5)
    return grid.reshape(n, c, factor * s, factor * s)


def patch_soft_labels(observer: nn.Module, images: Tensor, factor: int,
                      temperature: float = 1.0, batch_size: int = 256) -> Tensor:
    """Soft labels of every patch (N·f², K): row i·f² + p is patch slot p of image i, upsampled
    to full size (dream_dist.formation.decode's order)."""
    return soft_labels(observer, decode(images, factor), temperature, batch_size)


def relabel(observer: nn.Module, images: Tensor, factor: int, level: str = "patch",
            temperature: float = 1.0, batch_size: int = 256) -> Tensor:
    """Stored soft labels (N, K), rows summing to 1: 'image' labels each stitched image as a
    whole; 'patch' averages its f² patches' labels (equal areas -> the area-weighted label)."""
    if level not in LEVELS:
        raise ValueError(f"relabel level must be one of {LEVELS}, got {level!r}")
    if level == "image" or factor == 1:
        return soft_labels(observer, images, temperature, batch_size)
    p = patch_soft_labels(observer, images, factor, temperature, batch_size)
    return p.view(images.shape[0], factor * factor, -1).mean(1)


def distill_class(images: Tensor, label: int, observer: nn.Module, mean, std, cfg: RDEDConfig,
                  factor: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """RDED for ONE class: uint8 real images (n, C, H, W) -> (stitched normalised images
    (IPC, C, H, W), scores of the chosen crops (IPC·f²,), best first)."""
    g = torch.Generator().manual_seed(derive_seed(seed, _PURPOSE, label))
    m = min(cfg.images_per_class, images.shape[0])
    pick = torch.randperm(images.shape[0], generator=g)[:m]
    device = next(observer.parameters()).device
    x = normalize(images[pick].to(device), mean, std)
    size = images.shape[-1]
    crops = random_crops(x, cfg.crops_per_image, size // factor, (cfg.min_scale, cfg.max_scale), g)
    scores = score_crops(observer, crops, label, size, cfg.batch_size)
    chosen, chosen_scores = select_crops(crops.cpu(), scores, cfg.crops_per_image,
                                         cfg.ipc * factor * factor)
    return stitch(chosen, factor), chosen_scores


def distill_classes(images_of, classes: list[int], observer: nn.Module, mean, std, cfg: RDEDConfig,
                    factor: int, seed: int = 0, progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """RDED over `classes` in this process, reading each through images_of(c) -> (images
    (IPC·|classes|, C, H, W) normalised, labels, crop scores (|classes|, IPC·f²)), class-major.
    (task=rded runs the same per-class step through the pipeline, on Ray with rded.workers.)"""
    results = _each_class(images_of, classes, observer, mean, std, cfg, factor, seed, progress)
    images = torch.cat([results[c][0] for c in classes])
    labels = torch.tensor(classes).repeat_interleave(cfg.ipc)
    scores = torch.stack([results[c][1] for c in classes])
    return images, labels, scores


def _each_class(images_of, classes, observer, mean, std, cfg: RDEDConfig, factor: int, seed: int,
                progress: bool) -> dict[int, tuple[Tensor, Tensor]]:
    """{class: (stitched images, crop scores)}: the one per-class loop (library and pipeline)."""
    parts = {}
    for c in tqdm(classes, desc="rded classes", disable=None if progress else True):
        parts[c] = distill_class(images_of(c), c, observer, mean, std, cfg, factor, seed)
        release_free_memory()  # free heap the next class cannot reuse goes back (dream_dist.memory)
    return parts


# ---------------------------------------------------------------------------- the method


@dataclass
class RDEDPrep:
    observer: nn.Module
    observer_info: dict
    factor: int
    mean: list[float]
    std: list[float]


class RDEDMethod(Method):
    """task=rded: observer -> per-class crop selection and stitching -> relabel -> KD evaluation."""

    task = "rded"

    def workers(self, cfg) -> int:
        return cfg.rded.workers

    def driver_models(self, cfg) -> list[str]:
        return ["the observer (trained or loaded, tested, and relabelling the set)"]

    def prepare(self, cfg, data, out: Path) -> RDEDPrep:
        from dream_dist.evaluation.observer import get_observer
        from dream_dist.evaluation.protocol import test_accuracy

        rcfg = cfg.rded
        factor = rcfg.resolved_factor(data.image_size)
        rcfg.check_counts({c: data.counts_all[c] for c in data.classes}, factor)  # before any compute
        # The train split is read only to train an observer, batch by batch from the shards (the
        # driver never holds it); a given observer needs the class names only.
        train = data.train_stream() if cfg.observer.path is None else data.meta()
        observer, info = get_observer(cfg.observer, train, data.mean, data.std, seed=cfg.seed,
                                      save_to=out / "observer.pt", progress=cfg.progress, device=cfg.device)
        info["test_acc"] = test_accuracy(observer, data.test(), data.mean, data.std)
        print(f"observer ({info['source']}): {info['test_acc']:.2f}% test accuracy")
        return RDEDPrep(observer, info, factor, data.mean, data.std)

    def remote_prep(self, cfg, prep: RDEDPrep) -> RDEDPrep:
        return dataclasses.replace(prep, observer=copy.deepcopy(prep.observer).cpu())  # tasks run on CPU workers

    def distill_group(self, cfg, prep: RDEDPrep, classes, images_of, progress: bool = False) -> dict:
        return _each_class(images_of, classes, prep.observer, prep.mean, prep.std, cfg.rded, prep.factor, cfg.seed,
                           progress)

    def assemble(self, cfg, prep: RDEDPrep, data, parts: dict, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        from dream_dist.data.base import denormalize
        from dream_dist.viz import grid

        rcfg, classes = cfg.rded, data.classes
        images = torch.cat([parts[c][0] for c in classes])
        labels = torch.tensor(classes).repeat_interleave(rcfg.ipc)
        scores = torch.stack([parts[c][1] for c in classes])
        soft = relabel(prep.observer, images, prep.factor, rcfg.relabel, rcfg.label_temperature, rcfg.batch_size)
        with SummaryWriter(str(out / "tb" / "distill")) as tb:
            tb.add_image("rded/distilled", grid(denormalize(images, prep.mean, prep.std), nrow=rcfg.ipc),
                         0, dataformats="HWC")
            tb.add_scalar("rded/observer_test_acc", prep.observer_info["test_acc"], 0)
            for i, c in enumerate(classes):
                tb.add_scalar("rded/mean_crop_ce", float(scores[i].mean()), c)
        metrics = {"factor": prep.factor, "observer": prep.observer_info, "mean_crop_ce": float(scores.mean())}
        return [SynthSet("rded", images, labels, rcfg.ipc, soft_labels=soft, label="rded (KD)")], metrics

    def _kd(self, cfg, prep: RDEDPrep):
        return cfg.kd if cfg.kd.patch_factor is not None else dataclasses.replace(cfg.kd, patch_factor=prep.factor)

    def evaluator(self, cfg, prep: RDEDPrep, data):
        from dream_dist.evaluation.kd import KDProtocol

        return KDProtocol(self._kd(cfg, prep), prep.observer, data.test(), data.mean, data.std)

    def baseline(self, cfg, prep: RDEDPrep, data) -> SynthSet | None:
        if not cfg.rded.baseline:
            return None
        from dream_dist.methods.coreset import random_baseline

        images, labels = random_baseline(data, cfg.rded.ipc, cfg.seed)
        return SynthSet("random_kd", normalize(images, prep.mean, prep.std), labels, cfg.rded.ipc,
                        label="random (KD)", save_as=None)

    def title(self, cfg, prep: RDEDPrep, data, metrics: dict) -> str:
        return f"{cfg.dataset.name}: RDED f={prep.factor}"

    def summary(self, cfg, prep: RDEDPrep) -> dict:
        return {"rded": dataclasses.asdict(cfg.rded), "factor": prep.factor}
