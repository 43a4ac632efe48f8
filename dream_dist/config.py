"""Typed run configuration, validated before any compute starts.

Hydra composes YAML from `conf/`; `build(RunConfig, mapping)` turns the composed mapping
into these dataclasses. Unknown keys and bad values raise `ConfigError` with the offending
path, so a typo such as `coreset.ipcs=10` fails at once instead of after an hour.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from dream_dist.ddoq import DDOQConfig
from dream_dist.errors import ConfigError
from dream_dist.evaluate import EvalConfig
from dream_dist.kd import KDConfig
from dream_dist.observer import ObserverConfig
from dream_dist.rded import RDEDConfig
from dream_dist.tune import TuneConfig


@dataclass
class DataConfig:
    name: str = "digits"
    """Source name: digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder, tinyimagenet."""
    root: str | None = None
    """Directory of the source; None = $DREAM_DIST_DATA/<default dir> (digits needs none)."""
    packed: str | None = None
    """Directory of packed shards to read (written by task=pack); None = read the source."""
    classes: list[int] | None = None
    """Restrict to these class ids (None = all)."""
    on_corrupt: str = "error"
    """A corrupt sample (an undecodable source image, or a bad sample in a packed shard): error
    (stop, naming it) or skip (leave it out; the count and keys are logged)."""

    def __post_init__(self) -> None:
        from dream_dist.data import SOURCES, _register_builtin

        _register_builtin()
        if self.name not in SOURCES:
            raise ConfigError(f"dataset.name: unknown dataset {self.name!r}; known: {', '.join(sorted(SOURCES))}")
        if self.on_corrupt not in ("error", "skip"):
            raise ConfigError(f"dataset.on_corrupt: unknown {self.on_corrupt!r}; choose one of error, skip")


@dataclass
class PackConfig:
    out: str | None = None
    """Where the shards and index files go; None = outputs/packed/<dataset.name>."""
    encoding: str = "png"
    """Sample encoding: png (smaller) or npy (faster to write)."""
    max_per_shard: int = 2000
    """Samples per tar shard; each shard holds one class (also the most images an image-file
    source holds decoded at once while packing)."""
    size: int | None = None
    """Image-file sources (imagefolder, tinyimagenet, imagenet): resize to size x size while
    packing (None = keep; mixed sizes then fail with a hint)."""
    resize: str = "shorter"
    """How `size` is reached: shorter (shorter side to size, centre crop) or square (stretch)."""
    workers: int = 0
    """Image-file sources: 0 = pack in this process; N = classes fan out to N Ray tasks at a
    time (same bytes; `pack.out` must be storage every node sees)."""

    def __post_init__(self) -> None:
        if self.encoding not in ("png", "npy"):
            raise ConfigError(f"pack.encoding must be png or npy, got {self.encoding!r}")
        if self.max_per_shard < 1:
            raise ConfigError("pack.max_per_shard must be >= 1")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"pack.size must be >= 1 or null, got {self.size}")
        if self.resize not in ("shorter", "square"):
            raise ConfigError(f"pack.resize: unknown {self.resize!r}; choose one of shorter, square")
        if self.workers < 0:
            raise ConfigError(f"pack.workers must be >= 0, got {self.workers}")


@dataclass
class CoresetConfig:
    methods: list[str] = field(default_factory=lambda: ["random", "herding", "kcenter"])
    """Coreset selections to build and evaluate."""
    ipc: int = 10
    """Images per class."""
    feature_model: str = "convnet"
    """Network whose embedding herding and k-center work in (trained on real data first)."""
    feature_width: int | None = None
    """Width of that network (None = the model's default)."""
    feature_epochs: int = 1
    """Epochs of training of the feature network on real data."""
    feature_max_images: int | None = 10000
    """Class-balanced subsample used to train the feature network (None = all)."""

    def __post_init__(self) -> None:
        from dream_dist.coreset import METHODS

        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"coreset.methods: unknown {bad}; known: {sorted(METHODS)}")
        if self.ipc < 1:
            raise ConfigError(f"coreset.ipc must be >= 1, got {self.ipc}")
        if self.feature_epochs < 0:
            raise ConfigError("coreset.feature_epochs must be >= 0")


@dataclass
class DistillRunConfig:
    method: str = "dream_plus"
    """Preset name (dream_dist.distill.config.PRESETS): dream_plus, dream, idc, dc, dsa, dm,
    dream_plus_dc, dream_plus_dsa, dream_plus_dm, idc_representative, idc_bidirectional,
    idc_cluster_init."""
    overrides: dict = field(default_factory=dict)
    """Fields of DistillConfig that differ from the preset (e.g. iterations, inner_steps, width)."""
    shards: int = 1
    """Class shards run in this process (the unit a Ray worker owns); the result is the same
    for any count."""
    resume: bool = False
    """Continue from <out_dir>/checkpoint.pt when it exists."""
    checkpoint_every: int = 10
    """Inner steps between checkpoints (and at every outer iteration's end)."""
    quick_eval_every: int = 0
    """Inner steps between quick evaluations logged to TensorBoard (0 = off)."""
    quick_eval_epochs: int = 100
    """Epochs of the quick evaluation (1 run, else the eval config)."""
    grid_every: int = 10
    """Inner steps between synthetic image grids in TensorBoard."""
    snapshot_steps: list[int] = field(default_factory=list)
    """Global inner steps after which the synthetic set is saved for later evaluation."""
    baseline: bool = True
    """Also evaluate a random real coreset of the same IPC, for the comparison table."""
    memory_budget_mb: float = 4096
    """Decoded real images kept in memory (MB); a class over the budget is not cached: a step
    reads only its batch's samples from the shards (whole-class clustering streams the class)."""
    workers: int = 0
    """0 = run the class shards in this process; N >= 1 = one class shard on each of N Ray Train
    workers (joins the running cluster when there is one, else starts Ray locally). Same result."""
    max_failures: int = 1
    """Ray runs: worker-group restarts from the last checkpoint allowed after a worker dies."""

    def __post_init__(self) -> None:
        from dream_dist.distill.config import preset

        from dream_dist.distill.config import PRESETS, DistillConfig

        if self.method not in PRESETS:
            raise ConfigError(f"distill.method: unknown {self.method!r}; choose one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(DistillConfig)}
        bad = sorted(set(self.overrides) - fields)
        if bad:
            raise ConfigError(f"distill.overrides: unknown key(s) {bad}; allowed: {', '.join(sorted(fields))}")
        try:
            preset(self.method, **dict(self.overrides))
        except (TypeError, ValueError) as e:
            # DistillConfig names its fields distill.<field>; on the command line they are
            # distill.overrides.<field>.
            raise ConfigError(re.sub(r"^distill\.", "distill.overrides.", str(e))) from None
        for name in ("shards", "checkpoint_every", "quick_eval_epochs", "grid_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be >= 1")
        if not self.memory_budget_mb > 0:
            raise ConfigError(f"distill.memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.quick_eval_every < 0:
            raise ConfigError("distill.quick_eval_every must be >= 0")
        if self.workers < 0 or self.max_failures < 0:
            raise ConfigError("distill.workers and distill.max_failures must be >= 0")


@dataclass
class RunConfig:
    task: str = "distill"
    """What to run: distill, coreset, pack, train_observer, rded, ddoq, tune."""
    seed: int = 0
    """Seed of everything random in the run."""
    out_dir: str | None = None
    """Run directory (results JSON, TensorBoard logs in tb/, images); None = outputs/<task>/<dataset.name>."""
    device: str = "cpu"
    """torch device for the compute (cpu, cuda, cuda:1 ...)."""
    threads: int | None = None
    """torch intra-op threads (None = torch's default)."""
    progress: bool = True
    """Show progress bars."""
    dataset: DataConfig = field(default_factory=DataConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillRunConfig = field(default_factory=DistillRunConfig)
    ddoq: DDOQConfig = field(default_factory=DDOQConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    rded: RDEDConfig = field(default_factory=RDEDConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    """task=tune: the Ray Tune sweep (search space, ASHA, resources per trial)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task: unknown {self.task!r}; known: {', '.join(TASKS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1")
        # In-process compute on an absent GPU is an error, not a silent CPU fallback. Ray runs
        # are exempt: their driver may be a CPU head node whose workers hold the GPUs.
        on_ray = self.task == "tune" or (self.task == "distill" and self.distill.workers > 0) or \
            (self.task == "rded" and self.rded.workers > 0)
        for key, device in (("device", self.device), ("eval.device", self.eval.device), ("kd.device", self.kd.device)):
            if str(device).startswith("cuda") and not on_ray:
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError(f"{key}: {device!r} requested but CUDA is not available here "
                                      f"(torch {torch.__version__}); use device=cpu or a CUDA machine")
        if self.out_dir is None:
            self.out_dir = f"outputs/{self.task}/{self.dataset.name}"
        if self.pack.out is None:
            self.pack.out = f"outputs/packed/{self.dataset.name}"


TASKS = ("distill", "coreset", "pack", "ddoq", "train_observer", "rded", "tune")


def build(cls: type, values: Mapping[str, Any] | None, path: str = "") -> Any:
    """Construct dataclass `cls` from a (possibly nested) mapping, rejecting unknown keys."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{path or cls.__name__}: unknown key(s) {unknown}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = build(hint, value, f"{path}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(_keyed(str(e), path, names)) from None


def _keyed(msg: str, path: str, names: set[str]) -> str:
    """`msg` led by its full key path: a message that starts with a field name of the section
    gets the section's path ('epochs must be ...' in eval -> 'eval.epochs must be ...');
    others get the section ('eval: ...')."""
    if not path or msg.startswith(path):
        return msg
    head = re.match(r"[A-Za-z_]\w*", msg)
    if head and head.group(0) in names:
        return path + msg
    return f"{path.rstrip('.')}: {msg}"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
