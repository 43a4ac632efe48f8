"""The observer (teacher): a classifier trained on the real data that RDED scores crops with,
relabels with, and distils into students by KD; DDOQ uses it for soft labels too.

    dream-dist task=train_observer                           # digits -> outputs/train_observer/digits/observer.pt
    dream-dist task=train_observer dataset=mnist observer.epochs=2 observer.width=64

    from dream_dist.evaluation.observer import load_observer, soft_labels
    net = load_observer("observer.pt", classes=train.classes)        # refuses a class-order mismatch
    probs = soft_labels(net, normalize(images, mean, std), temperature=1.0)   # (N, K), rows sum to 1

Checkpoint format: a plain dict, so it loads with `torch.load(..., weights_only=True)` and a
downloaded checkpoint can never run code:

    {"format": "dream_dist.observer", "state_dict": {...}, "classes": [names in index order],
     "model": "convnet", "width": 64 | None, "channels": 1, "image_size": 28,
     "mean": [...], "std": [...], "metrics": {...}}

Why the class order is checked: an observer whose output k means a different class than the
dataset's label k still "works" — it silently scores every crop against the wrong class and
produces garbage soft labels. That is the most reported failure of the public RDED code, so
`load_observer` compares names index by index and refuses on the first difference. A bare user
state dict carries no class names: it is refused unless the names are given in a file.
"""
from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dream_dist.data.base import ImageSet, StreamedSet
from dream_dist.errors import CheckpointError, DataError, DataNotFoundError
from dream_dist.models import MODELS, build_model

__all__ = [
    "FORMAT",
    "ObserverConfig",
    "get_observer",
    "load_observer",
    "read_classes_file",
    "save_observer",
    "soft_labels",
    "train_observer",
]

FORMAT = "dream_dist.observer"


@dataclass
class ObserverConfig:
    """The observer: trained here on the real train split, or loaded from a checkpoint."""

    model: str = "convnet"
    """Registered model name (dream_dist.models.MODELS) of an observer trained here, and of a
    bare user state dict (our own checkpoints name their model themselves)."""
    width: int | None = None
    """Channel width; None keeps the model's default (128 for ConvNet)."""
    epochs: int = 5
    """Training epochs over the (subsampled) real train split."""
    lr: float = 0.01
    """SGD learning rate (momentum 0.9, weight decay 5e-4, as the coreset feature net)."""
    batch_size: int = 256
    """Training mini-batch size."""
    max_images: int | None = None
    """Train on a seeded class-balanced subsample of at most this many images (None = all)."""
    path: str | None = None
    """Checkpoint to load instead of training: ours (observer.pt) or a bare torch state dict
    (then `classes_file` is required). Loaded with weights_only=True."""
    classes_file: str | None = None
    """Text file with the observer's class names, one per line in output-index order; needed
    for a bare state dict, and checked against the checkpoint's own names when both exist."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}; known: "
                             f"{', '.join(sorted(MODELS))}")
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"width must be a positive int or None, got {self.width!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")
        if self.classes_file is not None and self.path is None:
            raise ValueError("classes_file is only used with observer.path (a checkpoint "
                             "to load); an observer trained here takes the dataset's classes")


def train_observer(train: ImageSet | StreamedSet, mean, std, cfg: ObserverConfig, seed: int = 0,
                   progress: bool = True, device: str = "cpu") -> nn.Module:
    """Train an observer on `train` (uint8) with cross entropy; returns it in eval mode.

    The same trainer as the coreset feature network (SGD, momentum 0.9, wd 5e-4, no
    augmentation, optional class-balanced subsample), with the observer's own settings.
    `train` may be a StreamedSet (OpenedData.train_stream): batches read from the shards.
    """
    from dream_dist.training import train_feature_net

    if len(train) == 0:
        raise ValueError("cannot train an observer on an empty train set")
    return train_feature_net(train, mean, std, model=cfg.model, width=cfg.width,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             max_images=cfg.max_images, seed=seed, progress=progress,
                             device=device)


def save_observer(path: str | Path, model: nn.Module, classes: Sequence[str], *, model_name: str,
                  width: int | None, channels: int, image_size: int, mean, std,
                  metrics: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint dict (see the module docstring) atomically; returns its path."""
    from dream_dist.artifact import atomic_save

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(sorted(MODELS))}")
    state = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": [str(c) for c in classes],
        "model": model_name,
        "width": width,
        "channels": int(channels),
        "image_size": int(image_size),
        "mean": [float(v) for v in torch.as_tensor(mean).flatten().tolist()],
        "std": [float(v) for v in torch.as_tensor(std).flatten().tolist()],
        "metrics": {str(k): (float(v) if isinstance(v, (int, float)) else str(v))
                    for k, v in (metrics or {}).items()},
    }
    path = Path(path)
    atomic_save(state, path)
    return path


def read_classes_file(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"observer.classes_file: {p} does not exist")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"observer.classes_file: {p} lists no class names")
    return names


def _check_class_order(found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Refuse unless `found` equals `expected` index by index, naming the first difference."""
    found, expected = [str(c) for c in found], [str(c) for c in expected]
    for i, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            raise DataError(
                f"{where}: class order mismatch at index {i}: the observer's class {i} is {a!r} "
                f"but the dataset's class {i} is {b!r}. Its outputs would be scored against the "
                f"wrong classes; use an observer trained with the dataset's class index "
                f"(or fix observer.classes_file)")
    if len(found) != len(expected):
        raise DataError(
            f"{where}: the observer has {len(found)} classes but the dataset has {len(expected)} "
            f"(first {min(len(found), len(expected))} agree); class order must match exactly")


class _Renormalize(nn.Module):
    """Maps images normalised with the caller's mean/std to the observer's own statistics."""

    def __init__(self, src_mean, src_std, dst_mean, dst_std) -> None:
        super().__init__()
        view = (1, -1, 1, 1)
        sm, ss = torch.tensor(src_mean).view(view), torch.tensor(src_std).view(view)
        dm, ds = torch.tensor(dst_mean).view(view), torch.tensor(dst_std).view(view)
        # x_dst = ((x_src * ss + sm) - dm) / ds = x_src * scale + shift
        self.register_buffer("scale", ss / ds)
        self.register_buffer("shift", (sm - dm) / ds)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def load_observer(path: str | Path, classes: Sequence[str], device: str = "cpu",
                  classes_file: str | Path | None = None, *, mean=None, std=None,
                  model: str = "convnet", width: int | None = None, channels: int | None = None,
                  image_size: int | None = None) -> nn.Module:
    """Load an observer checkpoint (weights_only=True) and check its class order.

    classes: the dataset's class names in label-index order; any difference in order or
    count raises ValueError naming the first differing index and both names.
    classes_file: the observer's class names, one per line; required for a bare state dict.
    mean/std: the statistics the caller's images are normalised with; when our checkpoint
    was trained with other ones, a fixed rescaling layer is prepended so the caller need not care.
    model/width/channels/image_size: architecture of a bare state dict (our checkpoints carry
    their own); channels/image_size default to what the checkpoint's shapes imply.
    Returns the network in eval mode on `device`.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"observer checkpoint {path} does not exist (set observer.path to a file, or null to train one)")
    try:
        # weights_only: a checkpoint from elsewhere may hold pickled code; never run it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        # torch's message is long; keep the line that names the refused object.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else
                     type(e).__name__)
        raise CheckpointError(
            f"{path}: refused: not loadable with torch.load(weights_only=True) ({first}). "
            f"Observer checkpoints must hold only tensors, lists, dicts, numbers and strings; "
            f"re-save the model's state_dict()") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: expected a dict (our checkpoint or a state dict), got "
            f"{type(state).__name__}")

    file_classes = read_classes_file(classes_file) if classes_file is not None else None
    ours = state.get("format") == FORMAT
    if ours:
        sd, ckpt_classes = state["state_dict"], list(state["classes"])
        if file_classes is not None:
            _check_class_order(file_classes, ckpt_classes, f"{path} vs {classes_file}")
        model, width = state["model"], state["width"]
        channels, image_size = state["channels"], state["image_size"]
        ckpt_mean, ckpt_std = state["mean"], state["std"]
    else:
        sd = state.get("state_dict", state)  # {"state_dict": ...} wrappers are common
        if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: neither a dream_dist observer checkpoint nor a state dict "
                             f"of tensors")
        if file_classes is None:
            raise CheckpointError(
                f"{path}: a bare state dict carries no class names, so its class order cannot "
                f"be checked; refusing. Pass observer.classes_file (one class name per line, in "
                f"the observer's output order)")
        ckpt_classes = file_classes
        ckpt_mean = ckpt_std = None
        if channels is None:
            first_conv = next((v for v in sd.values() if v.dim() == 4), None)
            channels = int(first_conv.shape[1]) if first_conv is not None else None
        if channels is None or image_size is None:
            raise CheckpointError(f"{path}: a bare state dict needs channels and image_size "
                             f"(the dataset's) to rebuild the {model!r} network")
    _check_class_order(ckpt_classes, classes, str(path))

    net = build_model(model, channels, len(ckpt_classes), image_size, width=width)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {model!r} (width {width}, {channels} "
                         f"channels, {image_size} px): {str(e).splitlines()[0]} ...") from None
    same = (mean is None or std is None or ckpt_mean is None
            or (torch.allclose(torch.tensor(ckpt_mean), torch.as_tensor(mean, dtype=torch.float32))
                and torch.allclose(torch.tensor(ckpt_std), torch.as_tensor(std, dtype=torch.float32))))
    if not same:
        net = nn.Sequential(_Renormalize(mean, std, ckpt_mean, ckpt_std), net)
    return net.to(device).eval()


@torch.no_grad()
def soft_labels(model: nn.Module, images_normalised: Tensor, temperature: float = 1.0,
                batch_size: int = 256) -> Tensor:
    """softmax(model(x) / T) of normalised float images (N, C, H, W) -> float32 CPU (N, K).

    Batched; the model runs in eval mode and its mode is restored afterwards.
    """
    if images_normalised.dim() != 4 or not images_normalised.is_floating_point():
        raise ValueError(f"images must be normalised float (N, C, H, W), got "
                         f"{images_normalised.dtype} {tuple(images_normalised.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(model(x.to(device)).float() / temperature, dim=1).cpu()
               for x in images_normalised.split(batch_size)]
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to label")
    return torch.cat(out)


def get_observer(cfg: ObserverConfig, train: ImageSet | StreamedSet, mean, std, seed: int = 0,
                 save_to: str | Path | None = None, progress: bool = True,
                 device: str = "cpu") -> tuple[nn.Module, dict]:
    """The run's observer: loaded from cfg.path (class order checked against `train`), or
    trained on `train` and saved to `save_to`. Returns (network in eval mode, info dict)."""
    import time

    start = time.perf_counter()
    if cfg.path is not None:
        net = load_observer(cfg.path, train.classes, device=device, classes_file=cfg.classes_file,
                            mean=mean, std=std, model=cfg.model, width=cfg.width,
                            channels=train.channels, image_size=train.size)
        return net, {"source": str(cfg.path), "seconds": time.perf_counter() - start}
    net = train_observer(train, mean, std, cfg, seed=seed, progress=progress, device=device)
    info: dict = {"source": "trained", "seconds": time.perf_counter() - start}
    if save_to is not None:
        info["path"] = str(save_observer(save_to, net, train.classes, model_name=cfg.model,
                                         width=cfg.width, channels=train.channels,
                                         image_size=train.size, mean=mean, std=std))
    return net, info
