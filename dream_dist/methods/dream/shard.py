"""ClassShard: everything per-class of a distillation run, for the classes one worker owns.

Per class c the shard holds: access to c's real uint8 images, c's synthetic images and
their optimizer, and c's selection state (the representative batch). Per-class work —
clustering, batch selection, the matching loss and the image update — needs nothing from
other classes. The network's own training is cross-class; a shard contributes the gradient
of ITS classes' share of each global batch (`real_grad`, `syn_grad`), and the caller sums
those over shards (in one process, or with torch.distributed across workers).

All randomness comes from `dream_dist.seeding` streams keyed by (seed, purpose, iteration,
step, class), so the result does not depend on how classes are split into shards.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dream_dist import kmeans
from dream_dist.augment import DSA, CutMixDraw
from dream_dist.training import extract_features
from dream_dist.data.base import normalize
from dream_dist.methods.dream.config import DistillConfig
from dream_dist.methods.dream.matching import match_loss
from dream_dist.errors import CheckpointError, DataError
from dream_dist.formation import decode, tile
from dream_dist.determinism import cross_entropy
from dream_dist.devices import to_device
from dream_dist.seeding import (CLUSTER, DSA_DRAW, NET_AUG, NET_BATCH, POOL, REAL_BATCH,
                                SYN_INIT, SYN_SUBSAMPLE, derive_seed, generator)


FEATURE_CHUNK = 8  # feature batches per chunk of a streamed whole-class pass


class BatchPlan:
    """One global real mini-batch of the network's training, as every shard sees it.

    The class composition is drawn from a stream all shards share, so each shard knows the
    whole batch's layout (class-major: the m_c images of class c sit at offsets[c] ...
    offsets[c] + m_c) without communication; each shard then fills in its own classes."""

    def __init__(self, class_counts: list[int], batch: int, seed: int, keys: tuple[int, ...]):
        g = generator(seed, NET_BATCH, *keys)
        counts = torch.tensor(class_counts, dtype=torch.float)
        # A host-side draw (CPU generator), read with .numpy(): never a device sync.
        self.per_class = torch.bincount(torch.multinomial(counts, batch, replacement=True, generator=g),
                                        minlength=len(class_counts)).numpy().tolist()
        self.offsets = [0]
        for m in self.per_class[:-1]:
            self.offsets.append(self.offsets[-1] + m)
        self.batch, self.keys, self.seed = batch, keys, seed
        self.labels = torch.tensor(range(len(class_counts))).repeat_interleave(torch.tensor(self.per_class))

    def positions(self, c: int) -> slice:
        return slice(self.offsets[c], self.offsets[c] + self.per_class[c])


class RealImages(Protocol):
    """Real uint8 images of a class: a dict {c: tensor} or a `ClassCache`."""

    def get(self, c: int) -> Tensor: ...


def take(real, c: int, idx: Tensor) -> Tensor:
    """Real images `idx` of class `c` from a ClassCache (per-sample reads when the class is
    over the memory budget) or from a plain {class: uint8 tensor} mapping."""
    getter = getattr(real, "take", None)
    x = getter(c, idx) if getter is not None else real.get(c)[idx]
    # One memory layout whatever the source: a channels-last batch takes other conv kernels
    # than a contiguous one (other rounding), which changed the set with the cache (issue 21).
    return x.contiguous()


def stream(real, c: int, idx: Tensor, chunk: int):
    """Real images `idx` of class `c` in chunks of `chunk` samples (a whole-class pass holds
    one chunk; a non-resident class of a ClassCache is read once, per sample)."""
    for part in idx.split(chunk):
        yield take(real, c, part)


class ClassShard:
    def __init__(
        self,
        classes: list[int],
        real: RealImages | Mapping[int, Tensor],
        cfg: DistillConfig,
        mean: list[float],
        std: list[float],
        num_classes: int,
        seed: int = 0,
        device: str = "cpu",
        counts: Mapping[int, int] | None = None,
    ):
        """counts: images per class when known (e.g. from the packed index), so the shard
        need not load every class just to count it; by default counted from `real`."""
        if cfg.factor is None or cfg.metric is None:
            raise ValueError("ClassShard needs a resolved DistillConfig (cfg.resolved(dataset))")
        self.classes = [int(c) for c in classes]
        self.real = real
        self.cfg = cfg
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        self.seed = seed
        self.device = torch.device(device)
        self.faiss_gpu = kmeans.gpu_for(self.device)  # FAISS on this shard's GPU only (None: CPU)
        # Matching augmentation (one draw for the real and the synthetic batch) and the
        # per-sample augmentation of the network's training.
        self.dsa = None
        self.net_aug = None
        if cfg.dsa:
            self.dsa = DSA.idc(cfg.match_strategy) if cfg.match_aug == "idc" else DSA(strategy=cfg.match_strategy)
            self.net_aug = DSA.idc(cfg.net_strategy) if cfg.base == "idc" else DSA()
        self.pixel = bool(cfg.pixel_space)
        self.lr_img = cfg.lr_img * (cfg.lr_img_scale or 1.0)
        self._m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(self.device)
        self._s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(self.device)
        self.syn: dict[int, Tensor] = {}
        self.opt: dict[int, torch.optim.Optimizer] = {}
        self.selected: dict[int, Tensor] = {}
        self.counts = {c: int(counts[c]) if counts is not None else len(self.real.get(c))
                       for c in self.classes}

    # ------------------------------------------------------------------ synthetic set

    def to_net(self, x: Tensor) -> Tensor:
        """Stored synthetic images -> the network's input: pixel-space images are normalised
        here, inside the differentiable forward (IDC); normalised ones pass through."""
        return (x - self._m) / self._s if self.pixel else x

    def init_synthetic(self, net: nn.Module | None = None) -> dict[str, float]:
        """Initialise every class's IPC stored images (each an f×f tile of real images under
        multi-formation): random real images, noise, or k-means medoids of `net`'s features.
        Pixel-space images start in [0, 1] (noise as the IDC code: N(0.5, 0.25²) clamped)."""
        cfg, f = self.cfg, self.cfg.factor
        n = cfg.ipc * f * f
        t0 = time.perf_counter()
        for c in self.classes:
            g = generator(self.seed, SYN_INIT, c)
            if cfg.init == "noise":
                shape = (cfg.ipc, *take(self.real, c, torch.zeros(1, dtype=torch.long)).shape[1:])
                img = torch.randn(shape, generator=g)
                if self.pixel:
                    img = (img / 4 + 0.5).clamp(0, 1)
            else:
                if n > self.counts[c]:
                    raise DataError(f"class {c}: ipc·f² = {n} exceeds its {self.counts[c]} images")
                if cfg.init == "cluster":
                    if net is None:
                        raise ValueError("cluster init needs the trained network")
                    pool = self._pool(c, 0, -1)
                    feats = self.features(net, c, pool)
                    idx = pool[torch.from_numpy(
                        kmeans.medoids(feats, n, niter=cfg.kmeans_iters, seed=derive_seed(self.seed, SYN_INIT, c) % 2**31,
                                       gpu=self.faiss_gpu))]
                else:
                    idx = torch.randperm(self.counts[c], generator=g)[:n]
                real = take(self.real, c, idx)
                chosen = real.float() / 255 if self.pixel else normalize(real, self.mean, self.std)
                img = tile(chosen, f, cfg.tile_mode)
            self.syn[c] = img.to(self.device).requires_grad_(True)
            self.opt[c] = torch.optim.SGD([self.syn[c]], lr=self.lr_img, momentum=cfg.momentum_img)
        return {"time/init_syn": time.perf_counter() - t0}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp pixel-space images to [0, 1] (IDC: at the start of every outer iteration).
        The optimizer's momentum is kept, as in the reference."""
        if self.pixel and self.cfg.clamp:
            for c in self.classes:
                self.syn[c].clamp_(0, 1)

    def synthetic(self) -> tuple[Tensor, Tensor]:
        """(stored images (n·IPC, C, H, W), labels) of this shard, class-major, NORMALISED
        (what evaluation and export take), whatever space they are optimised in."""
        with torch.no_grad():
            imgs = torch.cat([self.to_net(self.syn[c].detach()).cpu() for c in self.classes])
        labels = torch.tensor(self.classes).repeat_interleave(self.cfg.ipc)
        return imgs, labels

    # ------------------------------------------------------------------ selection

    def _pool(self, c: int, it: int, step: int) -> Tensor:
        """Indices clustered for class c: the whole class, or a seeded random pool."""
        n, pool = self.counts[c], self.cfg.cluster_pool
        if pool is None or pool >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=generator(self.seed, POOL, it, step, c))[:pool].sort().values

    def features(self, net: nn.Module, c: int, idx: Tensor) -> Tensor:
        """net's features of class c's images `idx`, streamed in chunks of whole feature
        batches: the same sub-batches as one extract_features call, so bit-equal features,
        while a class the cache does not hold is read once and never held whole."""
        fb = self.cfg.feature_batch
        return torch.cat([extract_features(net, x, self.mean, self.std, fb)
                          for x in stream(self.real, c, idx, fb * FEATURE_CHUNK)])

    @torch.no_grad()
    def select(self, net: nn.Module, c: int, it: int, step: int, out: dict[str, float]) -> Tensor | None:
        """DREAM's representative selection for class c: k-means on the current network's
        features, keeping the sample(s) nearest each centre as c's real batch until the next
        re-clustering. Adds timings and the (linear-kernel) MMD of the selected batch and of a
        random batch of the same size to the pool (the paper's Fig. 2b) into `out`. Returns
        the selected images when the pool was read in one piece (so they are not read again)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        r0, m0 = getattr(self.real, "bytes_read", 0), getattr(self.real, "min_bytes", 0)
        pool = self._pool(c, it, step)
        imgs = None
        if cfg.cluster_pool is not None:  # a pool: its samples only, in one piece
            imgs = take(self.real, c, pool)
            feats = extract_features(net, imgs, self.mean, self.std, cfg.feature_batch)
        else:  # the whole class, streamed once
            feats = self.features(net, c, pool)
        t1 = time.perf_counter()
        # The clustering round's reads, apart from the step's (ClassCache counts; 0 otherwise).
        out["io/cluster_read_mb"] = out.get("io/cluster_read_mb", 0.0) + (getattr(self.real, "bytes_read", 0) - r0) / 2**20
        out["io/cluster_min_mb"] = out.get("io/cluster_min_mb", 0.0) + (getattr(self.real, "min_bytes", 0) - m0) / 2**20
        k = cfg.batch_real // cfg.samples_per_cluster
        if k * cfg.samples_per_cluster > len(pool):
            raise DataError(f"class {c}: {k} clusters x {cfg.samples_per_cluster} samples "
                             f"exceed its {len(pool)} clustered images")
        cent, _ = kmeans.kmeans(feats, k, niter=cfg.kmeans_iters,
                                seed=derive_seed(self.seed, CLUSTER, it, step, c) % 2**31, gpu=self.faiss_gpu)
        picks = torch.from_numpy(kmeans.nearest_distinct(feats, cent, cfg.samples_per_cluster, gpu=self.faiss_gpu))
        self.selected[c] = pool[picks]
        out["time/kmeans"] = out.get("time/kmeans", 0.0) + time.perf_counter() - t1
        out["time/cluster_features"] = out.get("time/cluster_features", 0.0) + t1 - t0
        mu = feats.mean(0)
        n = len(self.classes)
        rnd = torch.randperm(len(pool), generator=generator(self.seed, REAL_BATCH, it, step, c, 1))[: len(picks)]
        # Kept as tensors: the engine reads every statistic of a step at once (one sync).
        out["mmd/selected"] = out.get("mmd/selected", 0.0) + (feats[picks].mean(0) - mu).pow(2).sum() / n
        out["mmd/random"] = out.get("mmd/random", 0.0) + (feats[rnd].mean(0) - mu).pow(2).sum() / n
        return imgs[picks] if imgs is not None else None

    def recluster(self, net: nn.Module, it: int, step: int) -> dict[str, float]:
        """`select` for every class owned; returns the summed timings and the mean MMDs."""
        out: dict[str, float] = {}
        for c in self.classes:
            self.select(net, c, it, step, out)
        return out

    def real_batch(self, c: int, it: int, step: int) -> Tensor:
        """Indices of class c's real batch for this matching step."""
        if self.cfg.selection == "representative":
            return self.selected[c]
        n = self.counts[c]
        b = min(self.cfg.batch_real, n)
        return torch.randperm(n, generator=generator(self.seed, REAL_BATCH, it, step, c))[:b]

    # ------------------------------------------------------------------ matching

    def match_step(self, net: nn.Module, it: int, step: int) -> dict[str, float | Tensor]:
        """One image update per class owned. Returns summed loss parts (0-d device tensors,
        never read here: see engine.host_metrics) and timings (floats)."""
        cfg = self.cfg
        out: dict[str, float] = {}
        cluster = cfg.selection == "representative" and (step % cfg.tau == 0 or not self.selected)
        # Class by class, selection then matching: a batch selected from a pool read in one
        # piece is used as it is, not read again. Not with running statistics (BatchNorm):
        # matching in train mode updates them, and the features must see the step's network.
        interleave = cluster and not any(getattr(m, "track_running_stats", False) for m in net.modules())
        if cluster and not interleave:
            out.update(self.recluster(net, it, step))
        spent = lambda: out.get("time/cluster_features", 0.0) + out.get("time/kmeans", 0.0)  # noqa: E731
        before = spent()
        t0 = time.perf_counter()
        for c in self.classes:
            picked = self.select(net, c, it, step, out) if interleave else None
            if picked is None:
                picked = take(self.real, c, self.real_batch(c, it, step))
            real = normalize(to_device(picked, self.device), self.mean, self.std)  # pinned, async on CUDA
            syn = decode(self.syn[c], cfg.factor)
            if len(syn) > cfg.batch_syn_max:
                keep = torch.randperm(len(syn), generator=generator(self.seed, SYN_SUBSAMPLE, it, step, c))
                syn = syn[keep[: cfg.batch_syn_max].to(self.device)]
            syn = self.to_net(syn)
            if self.dsa is not None:
                # Siamese: one draw, applied to both batches.
                p = self.dsa.sample(1, real.shape[-1], device=self.device,
                                    generator=generator(self.seed, DSA_DRAW, it, step, c))
                real, syn = self.dsa.apply(real, p), self.dsa.apply(syn, p)
            y_real = torch.full((len(real),), c, device=self.device)
            y_syn = torch.full((len(syn),), c, device=self.device)
            loss, parts = match_loss(net, real, y_real, syn, y_syn, cfg.loss, cfg.metric,
                                     cfg.lambda_grad, cfg.lambda_feat, cfg.include_fc)
            # autograd.grad, not backward: the network's .grad must stay untouched.
            (g,) = torch.autograd.grad(loss, [self.syn[c]])
            self.syn[c].grad = g
            self.opt[c].step()
            out["loss/total"] = out.get("loss/total", 0.0) + loss.detach()  # read once per step
            for k, v in parts.items():
                out[f"loss/{k}"] = out.get(f"loss/{k}", 0.0) + v
        out["time/match"] = time.perf_counter() - t0 - (spent() - before)  # selection counted apart
        return out

    # ------------------------------------------------------------------ network training

    @torch.no_grad()
    def real_images(self, plan: BatchPlan, c: int) -> Tensor:
        """Class c's images of the global batch `plan`, normalised and augmented per sample.

        The augmentation's geometric op is drawn once per batch (IDC's DiffAug chooses it
        once per call) from a stream every shard shares; values per image from c's stream."""
        m = plan.per_class[c]
        idx = torch.randint(self.counts[c], (m,), generator=generator(self.seed, NET_BATCH, *plan.keys, c))
        x = normalize(to_device(take(self.real, c, idx), self.device), self.mean, self.std)
        if self.net_aug is not None:
            shared = None
            if self.net_aug.mode == "I":
                shared = self.net_aug.choose_groups(generator(self.seed, NET_AUG, *plan.keys))
            p = self.net_aug.sample(m, x.shape[-1], device=self.device, per_sample=True, groups=shared,
                                    generator=generator(self.seed, NET_AUG, *plan.keys, c))
            x = self.net_aug.apply(x, p)
        return x

    def fill_real(self, plan: BatchPlan, out: Tensor) -> None:
        """Write this shard's classes of the global batch into `out` (B, C, H, W) at their
        positions; the other positions are left as they are (zeros, summed across shards)."""
        for c in self.classes:
            if plan.per_class[c]:
                out[plan.positions(c)] = self.real_images(plan, c)

    def real_grad(self, net: nn.Module, plan: BatchPlan, collect: Callable[[], None],
                  full: Tensor | None = None, mix: CutMixDraw | None = None) -> Tensor | float:
        """Accumulate into net's .grad this shard's share of the gradient of one global real
        mini-batch (mean cross entropy over the whole batch of plan.batch images).

        mix: a CutMix draw over the global batch; then `full` holds the whole augmented batch
        (every shard's classes, see fill_real) so an image can take its box from a partner of
        another shard's class, and the loss mixes the two labels by area (IDC's train_epoch).
        `collect()` is called after each class's backward (see engine.GradAccumulator).
        Returns the summed loss as a 0-d device tensor (0.0 without classes), unread."""
        total = 0.0
        b = plan.batch
        for c in self.classes:
            m = plan.per_class[c]
            if m == 0:
                continue
            pos = plan.positions(c)
            x = full[pos] if full is not None else self.real_images(plan, c)
            y = torch.full((m,), c, device=self.device)
            if mix is None:
                loss = cross_entropy(net(x), y, reduction="sum") / b
            else:
                partner = mix.perm[pos].to(self.device)
                mask = mix.mask(x.shape[-2], x.shape[-1], x.dtype, self.device)
                out = net(x * (1 - mask) + full[partner] * mask)
                y_b = plan.labels[mix.perm[pos]].to(self.device)
                loss = ((1 - mix.area) * cross_entropy(out, y, reduction="sum")
                        + mix.area * cross_entropy(out, y_b, reduction="sum")) / b
            loss.backward()
            collect()
            total = total + loss.detach()
        return total

    def syn_grad(self, net: nn.Module, total_images: int, keys: tuple[int, ...],
                 collect: Callable[[], None]) -> Tensor | float:
        """This shard's share of one full-batch step on the (decoded) synthetic set (DC/DSA
        train the network on synthetic data between matching steps)."""
        total = 0.0
        for c in self.classes:
            x = self.to_net(decode(self.syn[c].detach(), self.cfg.factor))
            if self.net_aug is not None:
                x = self.net_aug(x, generator=generator(self.seed, NET_AUG, *keys, c))
            y = torch.full((len(x),), c, device=self.device)
            loss = cross_entropy(net(x), y, reduction="sum") / total_images
            loss.backward()
            collect()
            total = total + loss.detach()
        return total

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Per-class state, keyed by class, so a run can resume with a different sharding."""
        return {c: {"syn": self.syn[c].detach().cpu().clone(), "opt": self.opt[c].state_dict(),
                    "selected": self.selected.get(c)} for c in self.classes}

    def load_state_dict(self, state: Mapping[int, dict]) -> None:
        missing = [c for c in self.classes if c not in state]
        if missing:
            raise CheckpointError(f"the checkpoint holds no state for classes {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of this shard's "
                                  f"{len(self.classes)}): it was written by a run on other classes")
        for c in self.classes:
            s = state[c]
            self.syn[c] = s["syn"].to(self.device).requires_grad_(True)
            self.opt[c] = torch.optim.SGD([self.syn[c]], lr=self.lr_img, momentum=self.cfg.momentum_img)
            self.opt[c].load_state_dict(s["opt"])
            if s.get("selected") is not None:
                self.selected[c] = s["selected"]
