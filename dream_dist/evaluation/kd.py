"""RDED's evaluation protocol: train fresh students by online knowledge distillation (KD)
from the observer, and test them on the real test split.

    from dream_dist.evaluation.kd import KDConfig, evaluate_kd
    cfg = KDConfig(epochs=300, runs=5, patch_factor=2)
    result = evaluate_kd(images, labels, observer, test, mean, std, cfg, log_dir="runs/x")
    print(result)                 # 93.10 ± 0.40 (5 runs, last epoch, soft labels)

Per training step (the public RDED validation code, in plain torch):
- augment every image on its own: patch shuffling (the f×f grid of a stitched image, rows and
  columns permuted), random resized crop (area in [1/f, 1] by default), horizontal flip;
- CutMix the batch (RDED mixes every batch: prob 1, beta 1);
- the teacher labels THE SAME augmented batch (online KD: a new soft label for every crop,
  which is RDED's region-level relabelling), and the student minimises
  KL(softmax(teacher/T) || softmax(student/T)) · T², T = 20;
- AdamW lr 1e-3, weight decay 0.01 on conv/linear weights only (not biases or norm
  parameters), cosine schedule to 0 over the epochs.
Differences from the public code, on purpose: the reported accuracy is the LAST epoch's (the
public code reports the best test epoch — model selection on the test set, docs/evaluation.md);
the cosine schedule reaches 0 (the public lambda stops at half the initial lr); the loss is
scaled by T² (the public code omits it; with AdamW this changes nothing but the logged value).
Results carry soft_labels=True: they are not comparable with hard-label protocols.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dream_dist.augment import cutmix
from dream_dist.data.base import ImageSet
from dream_dist.evaluation.loop import EvalJob, run_jobs, tb_dir
from dream_dist.evaluation.protocol import (
    EvalResult,
    _check_set,
    _lr_factor,
    decode_set,
    epoch_batches,
    test_accuracy,
)
from dream_dist.models import MODELS, NORMS, build_model
from dream_dist.seeding import derive_seed

__all__ = [
    "KDConfig",
    "augment",
    "evaluate_kd",
    "kd_job",
    "KDRunner",
    "kd_loss",
    "random_resized_crop",
    "shuffle_patches",
    "train_student",
]


@dataclass
class KDConfig:
    """How students are trained by online KD from the observer. Defaults: RDED's protocol."""

    model: str = "convnet"
    """Registered student model (dream_dist.models.MODELS)."""
    width: int | None = None
    """Student channel width; None keeps the model's default."""
    norm: str | None = None
    """'instance' | 'batch' | 'none'; None keeps the model's default."""
    epochs: int = 300
    """Training epochs over the distilled set."""
    lr: float = 1e-3
    """AdamW learning rate (betas 0.9, 0.999)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, on weights of dim > 1 only."""
    batch_size: int | None = None
    """Mini-batch size; None = the public code's rule: 10 / 50 / 100 for up to 1 / 10 / more
    images per class, doubled for 100+ classes, never above the set's size."""
    temperature: float = 20.0
    """KD temperature T of both softmaxes (RDED uses 20 with CutMix)."""
    cutmix_prob: float = 1.0
    """Probability that a batch is CutMix-ed (RDED: every batch)."""
    cutmix_beta: float = 1.0
    """Beta(beta, beta) distribution of the CutMix area ratio."""
    rrc_min_scale: float | None = None
    """Smallest area fraction of the random resized crop; None = 1 / patch_factor (RDED)."""
    rrc_max_scale: float = 1.0
    """Largest area fraction of the random resized crop."""
    flip: bool = True
    """Random horizontal flip (p = 0.5)."""
    patch_factor: int | None = None
    """Patch-shuffle grid f (f×f patches); None = 1 (off) standalone, and the stitching
    factor of the set when task=rded fills it in."""
    runs: int = 5
    """Independent students (seed + i) averaged in the result."""
    seed: int = 0
    """Run i uses seed + i for the student's init and all its training randomness."""
    test_batch_size: int = 1024
    """Batch size of the test pass (memory only)."""
    device: str = "cpu"
    """Torch device of student and teacher."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}; known: "
                             f"{', '.join(sorted(MODELS))}")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"norm: unknown {self.norm!r}; allowed: {', '.join(NORMS)}")
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"width must be a positive int or None, got {self.width!r}")
        for name in ("epochs", "runs", "test_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {self.batch_size!r}")
        if self.patch_factor is not None and (not isinstance(self.patch_factor, int)
                                              or self.patch_factor < 1):
            raise ValueError(f"patch_factor must be a positive int or None, got {self.patch_factor!r}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.cutmix_prob <= 1:
            raise ValueError(f"cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.cutmix_beta <= 0:
            raise ValueError(f"cutmix_beta must be > 0, got {self.cutmix_beta}")
        lo = self.rrc_min_scale
        if lo is not None and not 0 < lo <= self.rrc_max_scale:
            raise ValueError(f"rrc_min_scale must be in (0, rrc_max_scale], got {lo}")
        if not 0 < self.rrc_max_scale <= 1:
            raise ValueError(f"rrc_max_scale must be in (0, 1], got {self.rrc_max_scale}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {self.device!r}: {e}") from None


# ---------------------------------------------------------------------------- augmentation


def random_resized_crop(x: Tensor, out_size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> Tensor:
    """An independent random resized crop of every image of x (N, C, H, W) -> (N, C, s, s).

    As torchvision's RandomResizedCrop: area fraction uniform in `scale`, log aspect ratio
    uniform in `ratio`, up to 10 tries for a box that fits, else the whole image; the box is
    resampled bilinearly to out_size (one vectorised grid_sample, no antialiasing).
    """
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    n, tries = x.shape[0], 10
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                          generator=generator)
    # Box sides as fractions of the image side (images are square, so area = w·h).
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1)  # first try that fits (0 when none does)
    pick = torch.arange(n)
    w, h = w[pick, first], h[pick, first]
    none_fit = ~fits.any(1)
    w[none_fit], h[none_fit] = 1.0, 1.0
    u = torch.rand(n, 2, generator=generator)
    x0, y0 = u[:, 0] * (1 - w), u[:, 1] * (1 - h)
    # Affine map from output coords in [-1, 1] to the box inside the input's [-1, 1].
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def shuffle_patches(x: Tensor, factor: int, generator: torch.Generator | None = None) -> Tensor:
    """Per image, permute its `factor` column strips, then its `factor` row strips (RDED's
    ShufflePatches), so a stitched image's patches change places. factor 1: unchanged."""
    if factor == 1:
        return x
    n, _, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"patch shuffling needs the image size {h}x{w} divisible by {factor}")
    out = x
    for dim, size in ((3, w), (2, h)):
        side = size // factor
        perm = torch.rand(n, factor, generator=generator).argsort(1)  # (N, f) strip order
        idx = (perm[:, :, None] * side + torch.arange(side)).reshape(n, size).to(x.device)
        shape = [n, 1, 1, 1]
        shape[dim] = size
        out = out.gather(dim, idx.view(shape).expand_as(out))
    return out


def augment(x: Tensor, cfg: KDConfig, generator: torch.Generator | None = None) -> Tensor:
    """RDED's per-image training augmentation: patch shuffle -> random resized crop -> flip."""
    f = cfg.patch_factor or 1
    x = shuffle_patches(x, f, generator)
    lo = cfg.rrc_min_scale if cfg.rrc_min_scale is not None else 1.0 / f
    x = random_resized_crop(x, x.shape[-1], (lo, cfg.rrc_max_scale), generator=generator)
    if cfg.flip:
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) · T², averaged over the batch.

    T² keeps the gradient's size independent of T (Hinton et al.), so the loss stays
    comparable across temperatures."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)


def _batch_size(cfg: KDConfig, n: int, k: int) -> int:
    if cfg.batch_size is not None:
        return min(cfg.batch_size, n)
    per_class = n / max(1, k)
    b = 10 if per_class <= 1 else 50 if per_class <= 10 else 100
    return min(b * (2 if k >= 100 else 1), n)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only conv/linear weights, as the public code: decaying norm scales and biases
    # pulls them toward 0 and hurts small students.
    decay = [p for name, p in model.named_parameters() if "weight" in name and p.dim() > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_student(student: nn.Module, teacher: nn.Module, images: Tensor, num_classes: int,
                  cfg: KDConfig, generator: torch.Generator | None = None,
                  progress: Any = None) -> list[float]:
    """Train `student` in place by online KD from `teacher` on normalised images; return the
    per-epoch mean KD loss. `progress`: anything with .update(n), advanced once per epoch."""
    device = torch.device(cfg.device)
    n = images.shape[0]
    images = images.detach().to(device, torch.float32)
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    # CutMix wants targets; the teacher relabels the mixed image, so these are never used.
    dummy = torch.zeros(n, num_classes, device=device)
    bs = _batch_size(cfg, n, num_classes)
    teacher = teacher.to(device).eval()
    student.to(device).train()
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor("cosine", e, cfg.epochs))
    losses: list[float] = []
    for _ in range(cfg.epochs):
        total = 0.0
        for b in epoch_batches(n, bs, g):
            x = augment(images[b.to(device)], cfg, g)
            if cfg.cutmix_prob > 0:
                x, _ = cutmix(x, dummy[: len(b)], beta=cfg.cutmix_beta, prob=cfg.cutmix_prob,
                              generator=g)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(student(x), t_logits, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = total + loss.detach() * len(b)  # on the device: read once per epoch
        sched.step()
        losses.append(float(total) / n)
        if progress is not None:
            progress.update(1)
    return losses


def evaluate_kd(
    images: Tensor,
    labels: Tensor,
    observer: nn.Module,
    test: ImageSet,
    mean,
    std,
    cfg: KDConfig,
    factor: int = 1,
    log_dir: str | Path | None = None,
    name: str = "kd",
    progress: bool = True,
    executor: Any = None,
) -> EvalResult:
    """cfg.runs fresh students trained by online KD from `observer` on the set, tested on `test`.

    images: normalised float (N, C, H, W) as stored; labels: (N,) class ids (checked, and
    kept with the result: the targets themselves come from the observer).
    factor: IDC multi-formation factor of the stored images (decoded first when > 1); RDED's
    stitched images are plain images (factor 1) — their patch grid is cfg.patch_factor.
    log_dir: writes <log_dir>/<name>.json and TensorBoard runs <log_dir>/tb/<name>/run<i>.
    """
    _check_set(images, labels, test)
    with torch.no_grad():  # one probe image: the observer must predict the test's classes
        observer_out = observer.eval()(images[:1].to(next(observer.parameters()).device)).shape[-1]
    if observer_out != test.num_classes:
        raise ValueError(f"the observer has {observer_out} outputs but the test set has "
                         f"{test.num_classes} classes")
    return run_jobs([kd_job(images, labels, observer, test, mean, std, cfg, factor, name, log_dir)],
                    executor, log_dir, progress)[name]


class KDRunner:
    """One KD run: a fresh student (seed cfg.seed + run) taught by the observer (picklable)."""

    def __init__(self, images: Tensor, observer: nn.Module, test: ImageSet, mean, std, cfg: KDConfig,
                 log_dir: str | Path | None, name: str):
        self.images, self.observer, self.test = images, observer, test
        self.mean, self.std, self.cfg, self.log_dir, self.name = list(mean), list(std), cfg, log_dir, name

    def __call__(self, run: int, progress: Any = None) -> tuple[float, list[float], list]:
        cfg, test = self.cfg, self.test
        seed = cfg.seed + run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = build_model(cfg.model, self.images.shape[1], test.num_classes, self.images.shape[-1],
                                  width=cfg.width, norm=cfg.norm)
        g = torch.Generator().manual_seed(derive_seed(seed, 1))
        losses = train_student(student, self.observer, self.images, test.num_classes, cfg, g, progress)
        acc = test_accuracy(student, test, self.mean, self.std, cfg.test_batch_size)
        tb = tb_dir(self.log_dir, self.name, run)
        if tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(tb) as writer:
                for epoch, loss in enumerate(losses):
                    writer.add_scalar("train/kd_loss", loss, epoch)
                writer.add_scalar("test/acc", acc, cfg.epochs)
        return acc, losses, [(cfg.epochs, acc)]


def kd_job(images: Tensor, labels: Tensor, observer: nn.Module, test: ImageSet, mean, std, cfg: KDConfig,
           factor: int = 1, name: str = "kd", log_dir: str | Path | None = None) -> EvalJob:
    """The KD evaluation of one stored set as a job of the run loop (see `evaluate_kd`)."""
    images, labels, _ = decode_set(images, labels, factor)
    config = {**dataclasses.asdict(cfg), "factor": factor, "protocol": "kd"}
    return EvalJob(name, cfg.runs, KDRunner(images, observer, test, mean, std, cfg, log_dir, name), config, True,
                   images.shape[0], cfg.epochs)


class KDProtocol:
    """RDED's evaluation as a protocol object: `job(set)` for the run loop, `title()`."""

    def __init__(self, cfg: KDConfig, observer: nn.Module, test: ImageSet, mean, std):
        self.cfg, self.observer, self.test, self.mean, self.std = cfg, observer, test, list(mean), list(std)

    def job(self, s, name: str | None = None, log_dir: str | Path | None = None) -> EvalJob:
        _check_set(s.images, s.labels, self.test)
        return kd_job(s.images, s.labels, self.observer, self.test, self.mean, self.std, self.cfg, s.factor,
                      name or s.name, log_dir)

    def title(self) -> str:
        c = self.cfg
        return f"KD eval {c.model}, {c.epochs} epochs x {c.runs} runs, last epoch, soft labels"
