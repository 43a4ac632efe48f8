"""Evaluation protocol (docs/evaluation.md): train fresh networks on a distilled set, test on real data.

    from dream_dist.evaluation.protocol import EvalConfig, evaluate
    cfg = EvalConfig.preset("idc", model="convnet", runs=5)
    result = evaluate(syn_images, syn_labels, test, mean, std, cfg, factor=2, log_dir="runs/x")
    print(result)          # 98.41 ± 0.12 (5 runs, last epoch)

What "accuracy" means here, and why:
- every run trains a FRESH network (seed cfg.seed + run) from scratch on the given set;
- the reported accuracy of a run is its LAST epoch's test accuracy, so no model selection
  on the test set is possible (the optional test curve, `curve_every`, is a diagnostic and
  never picks the number; some public code reports the best epoch, which inflates it);
- mean ± sample std (ddof=1) over cfg.runs runs;
- results trained with soft labels carry `soft_labels=True` and say so when printed, since
  they are not comparable with hard-label results.

`evaluate_run` is one run on its own, so a distributed layer can send runs to parallel
workers (they are independent) and combine them with `EvalResult.from_runs`.
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

from dream_dist.augment import DEFAULT_STRATEGY, DSA, cutmix, dc_augment, remove_groups
from dream_dist.data.base import ImageSet, normalize
from dream_dist.errors import DataError
from dream_dist.evaluation.loop import EvalJob, EvalResult, run_jobs, tb_dir
from dream_dist.formation import decode, decode_labels
from dream_dist.models import MODELS, NORMS, build_model
from dream_dist.seeding import derive_seed

__all__ = [
    "SCHEDULES",
    "EvalConfig",
    "EvalResult",
    "train_network",
    "test_accuracy",
    "evaluate_run",
    "decode_set",
    "epoch_batches",
    "evaluate",
    "hard_label_job",
    "HardLabelRunner",
]

SCHEDULES = ("dc", "idc", "cosine")
AUG_MODES = ("dsa", "idc", "dc")
PROTOCOLS = ("dc", "dsa", "dm", "idc")
# Datasets whose digits a horizontal flip would corrupt: the IDC code drops flip for MNIST
# (and SVHN); dream_dist treats its embedded digits the same way.
NO_FLIP = ("mnist", "digits", "svhn")


@dataclass
class EvalConfig:
    """How networks are trained on a distilled set to measure it. Defaults: DC's protocol."""

    model: str = "convnet"
    """Registered model name (dream_dist.models.MODELS), e.g. 'convnet', 'resnet10'."""
    width: int | None = None
    """Channel width; None keeps the model's default (128 for ConvNet)."""
    norm: str | None = None
    """'instance' | 'batch' | 'none'; None keeps the model's default."""
    protocol: str | None = None
    """The published protocol whose per-dataset values fill the None fields below when the
    dataset is known (`resolved`): 'idc' (IDC/DREAM/DREAM+), 'dc', 'dsa', 'dm'; None = the
    generic defaults (DSA, 1000 epochs, no CutMix)."""
    epochs: int | None = 1000
    """Training epochs over the (decoded) distilled set; None = the protocol's (dc: 300, or
    1000 when it augments, i.e. on MNIST)."""
    lr: float = 0.01
    """Initial SGD learning rate (0 is allowed: it leaves the network untrained)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    batch_size: int = 256
    """Mini-batch size; distilled sets up to this size train full-batch."""
    schedule: str = "dc"
    """'dc': lr x0.1 from epochs//2; 'idc': lr x0.2 at 2/3 and again at 5/6 of the epochs;
    'cosine': cosine annealing to 0 over the epochs."""
    dsa: bool | None = True
    """Augment every training batch (per-sample parameters) with `aug_mode`; None = the
    protocol's (dc: only on MNIST)."""
    aug_mode: str = "dsa"
    """'dsa': DSA, one of the strategy's groups per batch; 'idc': IDC's DiffAug (flip and
    colour always, one of crop/scale/rotate, then cutout); 'dc': the DC code's augment (one
    of crop/scale/rotate per image)."""
    aug_strategy: str | None = None
    """Groups of aug_mode joined by '_'; None = the protocol's for the dataset (idc: flip +
    colour + crop/scale/rotate, cutout dropped under CutMix, flip dropped for MNIST, and
    'color_crop_scale_rotate' on MNIST with f > 1; dc: 'crop_scale_rotate'; else DSA's)."""
    cutmix_prob: float | None = 0.0
    """Probability that a batch is CutMix-ed; None = the protocol's (idc: 0.5, 0 on MNIST
    with f > 1)."""
    cutmix_beta: float = 1.0
    """Beta(beta, beta) distribution of the CutMix area ratio."""
    runs: int = 5
    """Independent runs (fresh networks) averaged in the result."""
    seed: int = 0
    """Run i uses seed + i for the network init and all training randomness."""
    test_batch_size: int = 1024
    """Batch size of the test pass (memory only; no effect on the result)."""
    device: str = "cpu"
    """Torch device to train and test on, e.g. 'cpu', 'cuda', 'cuda:1'."""
    curve_every: int = 100
    """Also test every this many epochs, for the TensorBoard curve `test/acc_curve` and the
    result's `curves` (a diagnostic: the reported accuracy stays the last epoch's); 0 = off."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}; known models: "
                             f"{', '.join(sorted(MODELS))}")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"norm: unknown {self.norm!r}; allowed: {', '.join(NORMS)} or None")
        if self.width is not None and self.width < 1:
            raise ValueError(f"width must be >= 1 or None, got {self.width}")
        for name in ("epochs", "batch_size", "runs", "test_batch_size"):
            value = getattr(self, name)
            if value is None and name == "epochs":
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.curve_every, int) or self.curve_every < 0:
            raise ValueError(f"curve_every must be an int >= 0, got {self.curve_every!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: unknown {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.aug_mode not in AUG_MODES:
            raise ValueError(f"aug_mode: unknown {self.aug_mode!r}; choose one of {', '.join(AUG_MODES)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown {self.schedule!r}; choose one of "
                             f"{', '.join(SCHEDULES)}")
        if self.cutmix_prob is not None and not 0 <= self.cutmix_prob <= 1:
            raise ValueError(f"cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.cutmix_beta <= 0:
            raise ValueError(f"cutmix_beta must be > 0, got {self.cutmix_beta}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {self.device!r}: {e}") from None

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> "EvalConfig":
        """The published protocol of `method`, with overrides; dataset-dependent fields stay
        None until `resolved(dataset, factor)`.

        'idc' / 'dream' / 'dream_plus' (IDC's test code): batch 64, lr x0.2 at 2/3 and 5/6,
        IDC DiffAug + CutMix (beta 1, p 0.5). 'dc' (DC code): no augmentation and 300 epochs,
        except MNIST (DC augment crop/scale/rotate, 1000 epochs), lr x0.1 at the half, batch
        256. 'dsa', 'dm': DSA, 1000 epochs, lr x0.1 at the half, batch 256. All: SGD lr 0.01,
        momentum 0.9, wd 5e-4.
        """
        idc = dict(protocol="idc", schedule="idc", batch_size=64, aug_mode="idc", dsa=True,
                   aug_strategy=None, cutmix_prob=None)
        presets = {
            "dc": dict(protocol="dc", schedule="dc", dsa=None, epochs=None, aug_strategy=None),
            "dsa": dict(protocol="dsa", schedule="dc"),
            "dm": dict(protocol="dm", schedule="dc"),
            "idc": idc,
            "dream": idc,
            "dream_plus": idc,
        }
        if method not in presets:
            raise ValueError(f"no evaluation preset for {method!r}; presets: "
                             f"{', '.join(presets)}")
        return cls(**{**presets[method], **overrides})

    def resolved(self, dataset: str | None = None, factor: int = 1) -> "EvalConfig":
        """A copy with every None field set to the protocol's value for `dataset` (None =
        unknown: no dataset-specific rule) and the set's multi-formation `factor`."""
        r = dataclasses.replace(self)
        mnist_mf = dataset in ("mnist", "digits") and factor > 1
        if r.protocol == "idc":
            if r.cutmix_prob is None:
                # misc/reproduce.py: MNIST with multi-formation evaluates without CutMix.
                r.cutmix_prob = 0.0 if mnist_mf else 0.5
            if r.aug_strategy is None:
                if mnist_mf:
                    r.aug_strategy = "color_crop_scale_rotate"
                else:
                    drop = (("cutout",) if r.cutmix_prob > 0 else ()) + (("flip",) if dataset in NO_FLIP else ())
                    r.aug_strategy = remove_groups(DEFAULT_STRATEGY, *drop)
        elif r.protocol == "dc":
            if r.dsa is None:
                r.dsa = dataset == "mnist"
                if r.dsa:
                    r.aug_mode = "dc"
            if r.aug_strategy is None and r.aug_mode == "dc":
                r.aug_strategy = "crop_scale_rotate"
            if r.epochs is None:
                r.epochs = 1000 if r.dsa else 300
        if r.dsa is None:
            r.dsa = True
        if r.epochs is None:
            r.epochs = 1000
        if r.cutmix_prob is None:
            r.cutmix_prob = 0.0
        if r.aug_strategy is None:
            r.aug_strategy = "crop_scale_rotate" if r.aug_mode == "dc" else DEFAULT_STRATEGY
        return r

    @property
    def is_resolved(self) -> bool:
        return None not in (self.epochs, self.dsa, self.cutmix_prob, self.aug_strategy)

    def augmenter(self):
        """x, generator -> augmented x for one training batch (None = no augmentation)."""
        if not self.dsa:
            return None
        if self.aug_mode == "dc":
            strategy = self.aug_strategy
            return lambda x, g: dc_augment(x, strategy, generator=g)
        aug = DSA.idc(self.aug_strategy) if self.aug_mode == "idc" else DSA(strategy=self.aug_strategy)
        return lambda x, g: aug(x, generator=g)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the initial lr during `epoch` (0-based)."""
    if schedule == "dc":
        half = epochs // 2
        return 0.1 if half > 0 and epoch >= half else 1.0
    if schedule == "idc":
        milestones = [m for m in (2 * epochs // 3, 5 * epochs // 6) if m > 0]
        return 0.2 ** sum(epoch >= m for m in milestones)
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))  # cosine


def _num_outputs(model: nn.Module) -> int:
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise TypeError("the model must expose its final nn.Linear as `.classifier` "
                        "(every dream_dist.models model does)")
    return classifier.out_features


def _soft_targets(targets: Tensor, n: int, k: int) -> Tensor:
    """Hard labels (N,) -> one-hot (N, K); soft targets (N, K) are checked and passed through."""
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.shape[0] != n:
            raise ValueError(f"labels have {targets.shape[0]} entries for {n} images")
        if n and (targets.min() < 0 or targets.max() >= k):
            raise ValueError(f"labels must lie in [0, {k}), got [{int(targets.min())}, "
                             f"{int(targets.max())}]")
        return F.one_hot(targets.long(), k).float()
    if targets.dim() == 2 and targets.is_floating_point():
        if targets.shape != (n, k):
            raise ValueError(f"soft targets must be ({n}, {k}) (images x classes), got "
                             f"{tuple(targets.shape)}")
        if not torch.isfinite(targets).all() or (targets < 0).any():
            raise ValueError("soft targets must be finite and non-negative")
        if n and not torch.allclose(targets.sum(1), torch.ones(n, dtype=targets.dtype,
                                                               device=targets.device), atol=1e-3):
            raise ValueError("soft targets must be probabilities (rows summing to 1); "
                             "pass softmax(logits / T), not logits")
        return targets.float()
    raise ValueError("targets must be integer labels (N,) or float soft targets (N, K), got "
                     f"{targets.dtype} {tuple(targets.shape)}")


def _normalised_weights(weights: Tensor | None, n: int) -> Tensor | None:
    """Per-sample weights rescaled to mean 1 (None stays None).

    With mean-1 weights, a batch's mean of w_i·loss_i is an unbiased estimate of the weighted
    mean Σ w_i·loss_i / Σ w_i over the whole set, and equals it exactly when training is
    full-batch (the usual case for a distilled set).
    """
    if weights is None:
        return None
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) (one per image), got "
                         f"{tuple(weights.shape)}")
    w = weights.detach().float()
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.mean()


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's shuffled index batches. A last batch of one is folded into the previous
    one: a batch of one breaks BatchNorm in train mode."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def train_network(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    cfg: EvalConfig,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Any = None,
    on_epoch: Any = None,
) -> list[float]:
    """Train `model` in place on normalised float images (N, C, H, W); return per-epoch losses.

    targets: hard labels (N,) long or soft targets (N, K) float; both train with the
    soft-target cross entropy -Σ_k t_k log p_k (hard labels become one-hot).
    weights: optional (N,) per-sample weights (DDOQ's cluster masses); the loss is their
    weighted mean. Under CutMix a mixed sample keeps the weight of the image it was pasted into.
    generator: CPU generator driving shuffling, DSA and CutMix (default: seeded from cfg.seed).
    progress: anything with `.update(n)` (a tqdm bar), advanced once per epoch.
    on_epoch(epoch, model): called after every epoch (1-based), e.g. for a test curve.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W) (normalised), got {images.dtype} "
                         f"{tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty image set")
    device = torch.device(cfg.device)
    soft = _soft_targets(targets, n, _num_outputs(model)).to(device)
    w = _normalised_weights(weights, n)
    w = w.to(device) if w is not None else None
    images = images.detach().to(device, torch.float32)
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    if not cfg.is_resolved:
        cfg = cfg.resolved()
    augment = cfg.augmenter()

    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: _lr_factor(cfg.schedule, e, cfg.epochs))
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        total = 0.0
        for b in epoch_batches(n, cfg.batch_size, g):
            b = b.to(device)
            x, t = images[b], soft[b]
            if augment is not None:
                # IDC's train_epoch augments under no_grad; nothing here needs its graph.
                with torch.no_grad():
                    x = augment(x, g)
            if cfg.cutmix_prob > 0:
                x, t = cutmix(x, t, beta=cfg.cutmix_beta, prob=cfg.cutmix_prob, generator=g)
            per_sample = -(t * F.log_softmax(model(x), dim=1)).sum(1)
            loss = per_sample.mean() if w is None else (per_sample * w[b]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = total + loss.detach() * len(b)  # on the device: read once per epoch
        sched.step()
        losses.append(float(total) / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        if progress is not None:
            progress.update(1)
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return losses


@torch.no_grad()
def test_accuracy(model: nn.Module, test: ImageSet, mean, std, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent on `test` (uint8), normalised batch by batch so no float copy
    of the whole test set is ever made. The model's train/eval mode is restored afterwards."""
    if len(test) == 0:
        raise ValueError("the test set is empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for xb, yb in zip(test.images.split(batch_size), test.labels.split(batch_size)):
            pred = model(normalize(xb.to(device), mean, std)).argmax(1)
            correct = correct + (pred == yb.to(device)).sum()  # read once, after the loop
    finally:
        model.train(was_training)
    return 100.0 * int(correct) / len(test)


# Its name starts with "test": without this, pytest collects it as a test wherever it is imported.
test_accuracy.__test__ = False  # type: ignore[attr-defined]


def _check_set(images: Tensor, labels: Tensor, test: ImageSet) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W), already normalised; got "
                         f"{images.dtype} {tuple(images.shape)} (normalise uint8 images with "
                         f"dream_dist.data.normalize)")
    if images.shape[0] == 0:
        raise ValueError("cannot evaluate an empty image set")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be integer class ids of shape ({images.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if tuple(images.shape[1:]) != (test.channels, test.size, test.size):
        raise DataError(f"images are {tuple(images.shape[1:])} but the test set is "
                         f"{(test.channels, test.size, test.size)} (C, H, W)")


def evaluate_run(
    images: Tensor,
    targets: Tensor,
    test: ImageSet,
    mean,
    std,
    cfg: EvalConfig,
    run: int = 0,
    weights: Tensor | None = None,
    log_dir: str | Path | None = None,
    progress: Any = None,
    curve: list | None = None,
) -> tuple[float, list[float]]:
    """One run: a fresh network (seed cfg.seed + run) trained on decoded images with targets
    ((N,) labels or (N, K) soft targets) -> (last-epoch test accuracy %, per-epoch losses).

    log_dir: a TensorBoard run directory for `train/loss` (per epoch), `test/acc` and, every
        cfg.curve_every epochs, `test/acc_curve`.
    curve: a list that receives (epoch, test accuracy) every cfg.curve_every epochs and at
        the end (a diagnostic; the result is the last epoch's accuracy either way).
    """
    if not cfg.is_resolved:
        cfg = cfg.resolved()
    seed = cfg.seed + run
    points: list = curve if curve is not None else []

    def on_epoch(epoch: int, model: nn.Module) -> None:
        if cfg.curve_every and epoch % cfg.curve_every == 0 and epoch < cfg.epochs:
            points.append((epoch, test_accuracy(model, test, mean, std, cfg.test_batch_size)))

    # Fork so the caller's global RNG is untouched: runs are reproducible whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg.model, images.shape[1], test.num_classes, images.shape[-1],
                            width=cfg.width, norm=cfg.norm)
    # A separate stream for training randomness (init and training must not share draws).
    g = torch.Generator().manual_seed(derive_seed(seed, 1))
    losses = train_network(model, images, targets, cfg, weights=weights, generator=g,
                           progress=progress, on_epoch=on_epoch if cfg.curve_every else None)
    acc = test_accuracy(model, test, mean, std, cfg.test_batch_size)
    points.append((cfg.epochs, acc))
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only when logging

        with SummaryWriter(str(log_dir)) as writer:
            for epoch, loss in enumerate(losses):
                writer.add_scalar("train/loss", loss, epoch)
            for epoch, a in points:
                writer.add_scalar("test/acc_curve", a, epoch)
            writer.add_scalar("test/acc", acc, cfg.epochs)
    return acc, losses


def _check_args(images: Tensor, labels: Tensor, test: ImageSet, factor: int, soft_labels: Tensor | None,
                weights: Tensor | None) -> None:
    _check_set(images, labels, test)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    n = images.shape[0]
    if soft_labels is not None and soft_labels.shape != (n, test.num_classes):
        raise ValueError(f"soft_labels must be ({n}, {test.num_classes}) (images x classes), got "
                         f"{tuple(soft_labels.shape)}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) (one per stored image), got "
                         f"{tuple(weights.shape)}")



def decode_set(images: Tensor, labels: Tensor, factor: int, soft_labels: Tensor | None = None,
               weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(training images, targets, weights) of a stored set after multi-formation decoding.

    Targets are the soft labels when given, else the labels; every decoded image repeats the
    label, soft label and weight of the stored image it came from.
    """
    images = images.detach()
    if factor > 1:
        # decode_labels of 0..N-1 says which stored image each decoded image came from, so soft
        # labels and weights follow exactly the ordering `decode` uses.
        src = decode_labels(torch.arange(images.shape[0]), factor)
        images = decode(images, factor)
        if images.shape[0] != src.shape[0]:
            raise RuntimeError("decode and decode_labels disagree on the decoded count")
        labels = labels[src]
        soft_labels = soft_labels[src] if soft_labels is not None else None
        weights = weights[src] if weights is not None else None
    return images, (soft_labels if soft_labels is not None else labels), weights


def evaluate(
    images: Tensor,
    labels: Tensor,
    test: ImageSet,
    mean,
    std,
    cfg: EvalConfig,
    factor: int = 1,
    soft_labels: Tensor | None = None,
    weights: Tensor | None = None,
    log_dir: str | Path | None = None,
    name: str = "eval",
    progress: bool = True,
    dataset: str | None = None,
    executor: Any = None,
) -> EvalResult:
    """Evaluate a distilled set: cfg.runs fresh networks trained on it, tested on `test`.

    images: normalised float (N, C, H, W) as stored; labels: (N,) class ids.
    factor: IDC multi-formation factor; > 1 decodes every stored image into factor² training
        images first, repeating its label, soft label and weight.
    soft_labels: optional (N, K) probabilities used as training targets instead of labels.
    weights: optional (N,) per-image loss weights (DDOQ's cluster masses).
    log_dir: writes <log_dir>/<name>.json and TensorBoard runs <log_dir>/tb/<name>/run<i>.
    progress: a tqdm bar over runs x epochs (shown when stderr is a terminal).
    dataset: the dataset's name, for the protocol's per-dataset settings (cfg.resolved).
    executor: where the runs go (dream_dist.evaluation.loop; None = here, one after the other).
    """
    _check_args(images, labels, test, factor, soft_labels, weights)
    return run_jobs([hard_label_job(images, labels, test, mean, std, cfg, factor, soft_labels, weights, name,
                                    log_dir, dataset, checked=True)],
                    executor, log_dir, progress)[name]


class HardLabelRunner:
    """One run of the hard-label protocol on a decoded set (picklable: Ray tasks get it)."""

    def __init__(self, images: Tensor, targets: Tensor, weights: Tensor | None, test: ImageSet, mean, std,
                 cfg: "EvalConfig", log_dir: str | Path | None, name: str):
        self.images, self.targets, self.weights, self.test = images, targets, weights, test
        self.mean, self.std, self.cfg, self.log_dir, self.name = list(mean), list(std), cfg, log_dir, name

    def __call__(self, run: int, progress: Any = None) -> tuple[float, list[float], list]:
        curve: list = []
        acc, losses = evaluate_run(self.images, self.targets, self.test, self.mean, self.std, self.cfg, run=run,
                                   weights=self.weights, log_dir=tb_dir(self.log_dir, self.name, run),
                                   progress=progress, curve=curve)
        return acc, losses, curve


def hard_label_job(images: Tensor, labels: Tensor, test: ImageSet, mean, std, cfg: "EvalConfig", factor: int = 1,
                   soft_labels: Tensor | None = None, weights: Tensor | None = None, name: str = "eval",
                   log_dir: str | Path | None = None, dataset: str | None = None, checked: bool = False) -> EvalJob:
    """The evaluation of one stored set under `cfg` as a job of the run loop (see `evaluate`)."""
    if not checked:
        _check_args(images, labels, test, factor, soft_labels, weights)
    images, targets, weights = decode_set(images, labels, factor, soft_labels, weights)
    cfg = cfg.resolved(dataset, factor)
    config = {**dataclasses.asdict(cfg), "factor": factor, "dataset": dataset}
    runner = HardLabelRunner(images, targets, weights, test, mean, std, cfg, log_dir, name)
    return EvalJob(name, cfg.runs, runner, config, soft_labels is not None, images.shape[0], cfg.epochs)


class HardLabelProtocol:
    """A method's hard-label evaluation (labels, or soft labels / weights when a set has them):
    `job(set)` for the run loop, `title()` for the table. `set` is anything with images, labels,
    factor, soft_labels, weights and name (dream_dist.methods.base.SynthSet)."""

    def __init__(self, cfg: EvalConfig, test: ImageSet, mean, std, dataset: str | None = None):
        self.cfg, self.test, self.mean, self.std, self.dataset = cfg, test, list(mean), list(std), dataset

    def job(self, s, name: str | None = None, log_dir: str | Path | None = None) -> EvalJob:
        return hard_label_job(s.images, s.labels, self.test, self.mean, self.std, self.cfg, s.factor,
                              s.soft_labels, s.weights, name or s.name, log_dir, self.dataset)

    def title(self) -> str:
        c = self.cfg.resolved(self.dataset)
        return f"eval {c.model}, {c.epochs} epochs x {c.runs} runs, last epoch"
