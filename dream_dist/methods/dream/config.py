"""DistillConfig: the switches of a distillation run, and the named presets.

Every method is a composition of four independent switches, so the DREAM+ paper's
ablation (Table III) is a matter of flipping one:

    base       dc | dsa | dm | idc   what is matched and how the network is trained
    selection  random | representative            how the real batch is chosen
    loss       gradient | feature | bidirectional  what is matched
    init       real | noise | cluster             how synthetic images start

Presets (`PRESETS`) hold the settings of the public code (IDC: snu-mllab/Efficient-Dataset-
Condensation; DREAM/DREAM+: Yanqing0327/DREAM; DC/DSA/DM: VICO-UoE/DatasetCondensation).
Every None field resolves, once the dataset is known, to that code's value for the dataset
(`resolved`); docs/fidelity.md lists each setting with the file it comes from.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from dream_dist.methods.dream.matching import DISTANCES, LOSSES
from dream_dist.errors import ConfigError, DataError
from dream_dist.formation import TILE_MODES

BASES = ("dc", "dsa", "dm", "idc")
SELECTIONS = ("random", "representative")
INITS = ("real", "noise", "cluster")
NET_UPDATES = ("real", "syn", "none")
AUG_MODES = ("idc", "dsa")
# Image side the IDC code's tune_lr_img scales against: 28 only for MNIST, 32 otherwise.
LR_BASE_SIZE = {"mnist": 28}
# The size tune_lr_img sees: the DREAM code never sets args.size for TinyImageNet, so its
# default 224 scales the lr (x49 at IPC 10); its published TinyImageNet lrs assume that.
LR_SIZE = {"tinyimagenet": 224}
KNOWN_SIZES = {"mnist": 28, "fashion_mnist": 28, "digits": 28, "cifar10": 32, "cifar100": 32,
               "tinyimagenet": 64}


def tune_lr_img_scale(dataset: str, ipc: int, size: int) -> float:
    """IDC's tune_lr_img: the image lr is multiplied by ipc/10 × (size/base)², with base 28 for
    'mnist' and 32 for everything else (so FashionMNIST at 28 px gets × 0.766); TinyImageNet
    scales with 224, as the DREAM code's unset args.size does (docs/fidelity.md)."""
    base = LR_BASE_SIZE.get(dataset, 32)
    size = LR_SIZE.get(dataset, size)
    return ipc / 10 * (size / base) ** 2


@dataclass
class DistillConfig:
    """One distillation run. Defaults: DREAM+ over IDC, the paper's MNIST/CIFAR settings."""

    base: str = "idc"
    """dc | dsa | dm | idc (see module docstring)."""
    selection: str = "representative"
    """random: a uniform real batch per class; representative: samples nearest k-means centres."""
    loss: str = "bidirectional"
    """gradient | feature | bidirectional (λ_g·grad + λ_f·feature from one forward pass)."""
    init: str = "cluster"
    """real (random real images), noise, or cluster (k-means medoids after 1 epoch of training)."""
    ipc: int = 10
    """Stored synthetic images per class."""
    factor: int | None = None
    """Multi-formation factor f (IDC: 2, 3 for ImageNet); None = 2 for idc, 1 otherwise."""
    metric: str | None = None
    """Matching distance cos | mse | l1; None = cos for dc/dsa, mse for dm, and for idc l1 on
    (Fashion)MNIST and mse elsewhere (the IDC code's choice)."""
    include_fc: bool | None = None
    """Match the classifier's weight gradients too; None = True for dc/dsa (DC code), False
    otherwise (IDC/DREAM skip FC, bias and norm gradients)."""
    iterations: int = 1200
    """Outer iterations; the network is re-initialised at each."""
    inner_steps: int = 100
    """Matching steps per outer iteration (IDC: 100; DC: its outer loop 1/10/50; DM: 1)."""
    net_update: str | None = None
    """Network training between matching steps: real (IDC), syn (DC/DSA) or none (DM);
    None = the base's own."""
    net_steps: int | None = None
    """Network SGD steps after each matching step; None = ceil(net_images / net_batch) for
    real, the DC inner loop (1/50/10 by IPC) for syn."""
    net_images: int | None = None
    """Real images the network trains on after each matching step (IDC's n_data): whole
    batches until at least this many; None = 500, 2000 on CIFAR, 1000 on TinyImageNet."""
    net_batch: int | None = None
    """Mini-batch of the network's training on real data; None = batch_real (the IDC/DREAM
    code trains it with the matching loader, loader_real), 256 for dc/dsa."""
    lr_img: float | None = None
    """Synthetic-image SGD lr as the public code's argument; None = 5e-3 (mse) / 1e-4 (l1) for
    idc, 0.1 for dc/dsa, 1 for dm. For idc it is in PIXEL units ([0, 1] images) and is then
    multiplied by `lr_img_scale`."""
    lr_img_scale: float | None = None
    """Multiplier of lr_img; None = IDC's tune_lr_img for idc (ipc/10 × (size/base)², base 28
    for MNIST, 32 otherwise), 1 for dc/dsa/dm."""
    pixel_space: bool | None = None
    """Optimise synthetic images as pixels in [0, 1], normalised inside the forward (the IDC /
    DREAM code); False = optimise normalised images (the DC/DSA/DM code). None = True for idc."""
    clamp: bool = True
    """Pixel-space images are clamped to [0, 1] at the start of every outer iteration (IDC)."""
    momentum_img: float = 0.5
    """Synthetic-image SGD momentum."""
    lr_net: float = 0.01
    """Network SGD lr."""
    momentum_net: float | None = None
    """Network SGD momentum; None = 0.9 (IDC/DREAM), 0 for dc/dsa (the DC code's plain SGD)."""
    weight_decay_net: float | None = None
    """Network SGD weight decay; None = 5e-4 (IDC/DREAM), 0 for dc/dsa."""
    batch_real: int | None = None
    """Real images per class per matching step; None = 128 for idc (DREAM's default; 64 on
    TinyImageNet, misc/reproduce.py), 256 for dc/dsa/dm. The idc preset sets IDC's own 64."""
    batch_syn_max: int = 128
    """Decoded synthetic images per class per matching step at most (IDC's batch_syn_max);
    larger classes are subsampled with a seeded draw every step."""
    warmup_epochs: int = 0
    """DREAM+ (condense_improve.py): each outer iteration's fresh network first trains this
    many epochs on real data (augmentation + CutMix); iteration 0 matches on the network
    trained for the cluster initialisation instead. The dream_plus presets set 1."""
    match_aug: str | None = None
    """Augmentation of each matching step (one draw for the real and synthetic batch):
    'idc' = IDC's DiffAug in batch mode (colour, then one geometric op, then cutout),
    'dsa' = DSA (one of its groups per draw). None = idc for idc, dsa for dsa/dm."""
    match_strategy: str | None = None
    """Groups of match_aug; None = 'color_crop_cutout' for idc ('color_crop' on MNIST with
    f > 1, misc/reproduce.py), DSA's 'color_crop_cutout_flip_scale_rotate' otherwise."""
    net_strategy: str | None = None
    """Per-sample IDC DiffAug of the network's real-data training (idc base); None = the match
    strategy without cutout when net_cutmix > 0 (the code's remove_aug), i.e. 'color_crop'."""
    net_cutmix: float | None = None
    """CutMix probability of the network's real-data training (mixup_net='cut', mix_p);
    None = 0.5 for idc, 0 on MNIST with f > 1 (misc/reproduce.py: mixup_net='vanilla')."""
    tile_mode: str = "nearest"
    """Downsampling of the f² real images tiled into one stored image at initialisation:
    'nearest' (the IDC/DREAM code) or 'antialias'."""
    tau: int = 10
    """Re-cluster every tau matching steps (representative selection)."""
    samples_per_cluster: int = 1
    """Real samples taken nearest each centre; k = batch_real / samples_per_cluster."""
    cluster_pool: int | None = None
    """Cluster a random pool of this many images per class instead of the whole class (much
    cheaper on CPU); None = the whole class."""
    kmeans_iters: int = 20
    """Lloyd iterations of each FAISS k-means."""
    lambda_grad: float = 1.0
    """Weight of the gradient term in bidirectional matching."""
    lambda_feat: float = 1.0
    """Weight of the feature term in bidirectional matching."""
    dsa: bool | None = None
    """Siamese DSA augmentation of each matching step's real and synthetic batches;
    None = True for dsa/idc/dm, False for dc."""
    init_epochs: int = 1
    """Epochs of real-data training of the network before cluster init."""
    init_images: int | None = None
    """Train the cluster-init network on a class-balanced subsample of this size (None = all)."""
    model: str = "convnet"
    """Network (dream_dist.models); ConvNet-3 for 28/32 px, ConvNet-4 for 64 px."""
    width: int | None = None
    """Network width; None = the model's default (128)."""
    feature_batch: int = 256
    """Batch size of no-grad feature extraction (memory bound of clustering)."""

    def __post_init__(self) -> None:
        def check(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise ValueError(f"distill.{name}: unknown {value!r}; choose one of {', '.join(allowed)}")

        check("base", self.base, BASES)
        check("selection", self.selection, SELECTIONS)
        check("loss", self.loss, LOSSES)
        check("init", self.init, INITS)
        check("tile_mode", self.tile_mode, TILE_MODES)
        if self.match_aug is not None:
            check("match_aug", self.match_aug, AUG_MODES)
        for name in ("match_strategy", "net_strategy"):
            value = getattr(self, name)
            if value is not None:
                from dream_dist.augment import DSA

                try:
                    DSA.parse_strategy(value)
                except ValueError as e:
                    raise ValueError(f"distill.{name}: {e}") from None
        if self.metric is not None:
            check("metric", self.metric, DISTANCES)
        if self.net_update is not None:
            check("net_update", self.net_update, NET_UPDATES)
        for name in ("ipc", "iterations", "inner_steps", "tau", "batch_syn_max",
                     "samples_per_cluster", "kmeans_iters", "feature_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"distill.{name} must be a positive integer, got {value!r}")
        for name in ("factor", "net_steps", "batch_real", "cluster_pool", "init_images", "width",
                     "net_images", "net_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"distill.{name} must be a positive integer or null, got {value!r}")
        for name in ("init_epochs", "warmup_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lambda_grad", "lambda_feat", "lr_net"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be >= 0")
        for name in ("momentum_net", "weight_decay_net"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be >= 0 or null")
        for name in ("lr_img", "lr_img_scale"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"distill.{name} must be > 0 or null")
        if self.net_cutmix is not None and not 0 <= self.net_cutmix <= 1:
            raise ValueError(f"distill.net_cutmix must lie in [0, 1], got {self.net_cutmix}")
        if self.selection == "representative" and self.batch_real is not None and \
                self.batch_real % self.samples_per_cluster:
            raise ValueError(
                f"distill.batch_real ({self.batch_real}) must be a multiple of samples_per_cluster "
                f"({self.samples_per_cluster}): k = batch_real / samples_per_cluster"
            )
        if self.cluster_pool is not None and self.batch_real is not None and \
                self.cluster_pool < self.batch_real:
            raise ValueError(f"distill.cluster_pool ({self.cluster_pool}) must be >= batch_real ({self.batch_real})")

    # ---- resolved values: the base's defaults, filled in once the dataset is known ----

    def resolved(self, dataset: str, image_size: int | None = None) -> "DistillConfig":
        """A copy with every None replaced by the public code's value for `dataset`.

        image_size: side of the dataset's images (for IDC's lr scaling); None = the known
        size of a built-in dataset, else 32 (give it for folders of other sizes)."""
        r = dataclasses.replace(self)
        idc, dc_like = r.base == "idc", r.base in ("dc", "dsa")
        mnist_like = dataset in ("mnist", "fashion_mnist")
        if r.factor is None:
            r.factor = 2 if idc else 1
        if r.metric is None:
            if dc_like:
                r.metric = "cos"
            elif r.base == "dm":
                r.metric = "mse"
            else:
                r.metric = "l1" if mnist_like else "mse"
        if r.include_fc is None:
            r.include_fc = dc_like
        if r.net_update is None:
            r.net_update = {"idc": "real", "dc": "syn", "dsa": "syn", "dm": "none"}[r.base]
        if r.batch_real is None:
            r.batch_real = (64 if dataset == "tinyimagenet" else 128) if idc else 256
        if r.net_batch is None:
            r.net_batch = r.batch_real if idc else 256
        if r.net_images is None:
            r.net_images = {"cifar10": 2000, "cifar100": 2000, "tinyimagenet": 1000}.get(dataset, 500)
        if r.momentum_net is None:
            r.momentum_net = 0.0 if dc_like else 0.9
        if r.weight_decay_net is None:
            r.weight_decay_net = 0.0 if dc_like else 5e-4
        if r.pixel_space is None:
            r.pixel_space = idc
        if r.lr_img_scale is None:
            size = image_size or KNOWN_SIZES.get(dataset, 32)
            r.lr_img_scale = tune_lr_img_scale(dataset, r.ipc, size) if idc else 1.0
        # misc/reproduce.py: MNIST with multi-formation matches with 'color_crop' and trains
        # networks without CutMix ("cutmix or cutout is not much effective").
        mnist_mf = dataset == "mnist" and r.factor > 1
        if r.match_aug is None:
            r.match_aug = "idc" if idc else "dsa"
        if r.match_strategy is None:
            if r.match_aug == "idc":
                r.match_strategy = "color_crop" if mnist_mf else "color_crop_cutout"
            else:
                from dream_dist.augment import DEFAULT_STRATEGY

                r.match_strategy = DEFAULT_STRATEGY
        if r.net_cutmix is None:
            r.net_cutmix = 0.5 if idc and not mnist_mf else 0.0
        if r.net_strategy is None:
            from dream_dist.augment import remove_groups

            r.net_strategy = remove_groups(r.match_strategy, "cutout") if r.net_cutmix > 0 else r.match_strategy
        if r.net_steps is None:
            if r.net_update == "real":
                r.net_steps = -(-r.net_images // r.net_batch)
            elif r.net_update == "syn":
                r.net_steps = {1: 1, 10: 50, 50: 10}.get(r.ipc, 10)
            else:
                r.net_steps = 0
        if r.lr_img is None:
            r.lr_img = {"idc": 5e-3 if r.metric != "l1" else 1e-4, "dc": 0.1, "dsa": 0.1, "dm": 1.0}[r.base]
            if idc and dataset == "tinyimagenet" and r.ipc == 50:
                r.lr_img = 1e-6  # misc/reproduce.py of the DREAM code
        if r.dsa is None:
            r.dsa = r.base != "dc"
        if r.selection == "representative" and r.batch_real % r.samples_per_cluster:
            raise ValueError(f"distill.batch_real ({r.batch_real}) must be a multiple of "
                             f"samples_per_cluster ({r.samples_per_cluster})")
        return r

    def check_data(self, counts: list[int]) -> None:
        """Reject settings the dataset cannot satisfy, before any compute (resolved config)."""
        small = min(range(len(counts)), key=lambda c: counts[c])
        n = counts[small]
        need = self.ipc * (self.factor or 1) ** 2
        if self.init != "noise" and need > n:
            raise DataError(
                f"distill.overrides.ipc: {self.ipc} images per class x factor² {(self.factor or 1) ** 2} = {need} "
                f"real images needed to initialise, but class {small} has only {n}")
        if self.ipc > n:
            raise DataError(f"distill.overrides.ipc ({self.ipc}) is larger than class {small} ({n} images)")
        if self.selection == "representative":
            pool = n if self.cluster_pool is None else min(n, self.cluster_pool)
            if (self.batch_real or 0) > pool:
                raise DataError(
                    f"distill.overrides.batch_real: k ({self.clusters}) clusters x samples_per_cluster ({self.samples_per_cluster}) "
                    f"= {self.batch_real} exceeds the {pool} images clustered in class {small}")

    @property
    def clusters(self) -> int:
        """k of the representative selection's k-means."""
        return (self.batch_real or 128) // self.samples_per_cluster


# DC/DSA loops by IPC (DC's outer loop = matching steps per iteration); docs/methods.md.
DC_OUTER = {1: 1, 10: 10, 50: 50}

PRESETS: dict[str, dict[str, Any]] = {
    # DREAM+ = IDC + representative selection + bidirectional matching + cluster init.
    # DREAM+ (condense_improve.py) also warms every fresh matching network up for one epoch.
    "dream_plus": dict(base="idc", selection="representative", loss="bidirectional", init="cluster",
                       warmup_epochs=1),
    # DREAM (condense.py): k-means init on the untrained network, no warm-up.
    "dream": dict(base="idc", selection="representative", loss="gradient", init="cluster", init_epochs=0),
    # IDC (its own code): real batch 64 (argument.py), random real init.
    "idc": dict(base="idc", selection="random", loss="gradient", init="real", batch_real=64),
    "dc": dict(base="dc", selection="random", loss="gradient", init="real", iterations=1000),
    "dsa": dict(base="dsa", selection="random", loss="gradient", init="real", iterations=1000),
    "dm": dict(base="dm", selection="random", loss="feature", init="real", iterations=20000, inner_steps=1),
    # DREAM+ on the other bases.
    "dream_plus_dc": dict(base="dc", selection="representative", loss="bidirectional", init="cluster", iterations=1000),
    "dream_plus_dsa": dict(base="dsa", selection="representative", loss="bidirectional", init="cluster", iterations=1000),
    "dream_plus_dm": dict(base="dm", selection="representative", loss="bidirectional", init="cluster",
                          iterations=20000, inner_steps=1),
    # Table III ablations over IDC: one switch each.
    "idc_representative": dict(base="idc", selection="representative", loss="gradient", init="real"),
    "idc_bidirectional": dict(base="idc", selection="random", loss="bidirectional", init="real"),
    "idc_cluster_init": dict(base="idc", selection="random", loss="gradient", init="cluster"),
}


def preset(name: str, **overrides: Any) -> DistillConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    if values["base"] in ("dc", "dsa") and "inner_steps" not in overrides:
        values["inner_steps"] = DC_OUTER.get(overrides.get("ipc", 10), 10)
    return DistillConfig(**{**values, **overrides})


@dataclass
class DistillRunConfig:
    method: str = "dream_plus"
    """Preset name (dream_dist.methods.dream.config.PRESETS): dream_plus, dream, idc, dc, dsa, dm,
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
    cache_policy: str = "resident"
    """Which classes the memory budget holds: "resident" (the first classes that fit stay for
    the whole run; the rest are read per sample) or "lru" (least recently used: thrashes once
    a worker's classes exceed the budget, kept as the benchmark's baseline). Same set either way."""
    workers: int = 0
    """0 = run the class shards in this process; N >= 1 = one class shard on each of N Ray Train
    workers (joins the running cluster when there is one, else starts Ray locally). Same result."""
    max_failures: int = 1
    """Ray runs: worker-group restarts from the last checkpoint allowed after a worker dies."""

    def __post_init__(self) -> None:
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
        if self.cache_policy not in ("resident", "lru"):
            raise ConfigError(f"distill.cache_policy: unknown {self.cache_policy!r}; choose one of resident, lru")
        if self.quick_eval_every < 0:
            raise ConfigError("distill.quick_eval_every must be >= 0")
        if self.workers < 0 or self.max_failures < 0:
            raise ConfigError("distill.workers and distill.max_failures must be >= 0")
