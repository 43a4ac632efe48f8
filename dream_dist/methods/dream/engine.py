"""The distillation loop over class shards, single-device and free of Ray.

    shards = [ClassShard(classes_k, real_k, cfg, mean, std, K) for k in ...]
    d = Distiller(cfg, shards, class_counts, num_classes, channels, size, model kwargs...)
    d.run()

One process may hold every shard (run one after another, gradients summed), or a worker
may hold one shard and pass `allreduce` to sum the network's gradients across workers
(torch.distributed). Either way each outer iteration is:

    images clamped to [0, 1] (pixel space)
    net = fresh network (seeded by the iteration), warmed up on real data (DREAM+), or at
          iteration 0 the network trained for the cluster initialisation
    for step in inner steps:
        every shard: per class, select a real batch (re-cluster every τ) and update its images
        net_steps times: every shard adds its share of the network gradient; allreduce; SGD

Checkpoints hold everything needed to continue bit-for-bit: per-class synthetic images and
optimizer state, selection state, the network and its optimizer, and the counters. All
randomness is keyed by counters (dream_dist.seeding), so nothing else is needed.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dream_dist.augment import cutmix_draw
from dream_dist.methods.dream.config import DistillConfig
from dream_dist.methods.dream.shard import BatchPlan, ClassShard
from dream_dist.artifact import atomic_save, load_plain
from dream_dist.data.prepare import balance_classes  # noqa: F401  (re-exported)
from dream_dist.errors import CheckpointError
from dream_dist.models import build_model
from dream_dist.seeding import INIT_NET, NET_INIT, NET_MIX, WARMUP, derive_seed, generator

AllReduce = Callable[[list[torch.Tensor]], None]


def host_metrics(metrics: dict) -> dict[str, float]:
    """A step's metrics as Python floats, with ONE read per device for all tensor values.

    The shards keep per-class losses and MMDs as 0-d tensors on their device: reading each
    one would sync a CUDA device once per class. Stacking them and reading the stack syncs once
    per step (and is the point where the step's queued kernels are waited for)."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    groups: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            groups.setdefault(v.device, []).append(k)
    for keys in groups.values():
        values = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}


class GradAccumulator:
    """Sums per-class gradient contributions in float64, then writes float32 .grad.

    Why: k-means is chaotic, so a 1e-9 difference in the network (from summing class
    gradients in another order when classes are split differently) changes which medoids
    are chosen. Float64 sums of float32 terms are (almost always) exact up to the final
    rounding, so the network — and the synthetic set — no longer depends on the sharding.
    """

    def __init__(self, net: nn.Module):
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.buffers = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    def collect(self) -> None:
        for p, b in zip(self.params, self.buffers):
            if p.grad is not None:
                b.add_(p.grad)
                p.grad = None

    def apply(self) -> None:
        for p, b in zip(self.params, self.buffers):
            p.grad = b.to(p.dtype)


CHECKPOINT_FORMAT = "dream_dist.distill.checkpoint"
CHECKPOINT_VERSION = 2
"""Version 2: pixel-space synthetic images (issue 9). A version-1 checkpoint holds normalised
images and would resume wrongly, so it is refused."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a Distiller checkpoint WITHOUT running any code from it.

    torch.load(weights_only=True) only rebuilds tensors, numbers, strings, lists and dicts,
    so a pickle that carries code (a file dropped into a shared run directory) is refused
    before anything in it runs. The file must also say it is a dream_dist checkpoint of this
    version; otherwise it is refused with what differs."""
    path = Path(path)
    state = load_plain(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: refused: not a dream_dist distillation checkpoint "
                              f"(format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: refused: checkpoint version {state.get('version')!r}, this dream_dist "
                              f"reads version {CHECKPOINT_VERSION} (start the run afresh)")
    return state


class Distiller:
    def __init__(
        self,
        cfg: DistillConfig,
        shards: list[ClassShard],
        class_counts: list[int],
        channels: int,
        size: int,
        seed: int = 0,
        device: str = "cpu",
        out_dir: str | Path | None = None,
        allreduce: AllReduce | None = None,
        log: Callable[[int, dict], None] | None = None,
        checkpoint_every: int = 0,
        snapshot_steps: list[int] | None = None,
        progress: bool = True,
    ):
        """class_counts: images per class of ALL classes (not only the shards' own).
        log(global_step, scalars): receives the metrics of every step (e.g. TensorBoard).
        checkpoint_every: inner steps between checkpoints (0 = at the end of each iteration).
        snapshot_steps: global inner steps after which the synthetic set is saved to
            <out_dir>/snapshots/step<k>.pt (for accuracy-vs-iteration curves)."""
        self.cfg = cfg
        self.shards = shards
        self.class_counts = list(class_counts)
        self.num_classes = len(class_counts)
        self.channels, self.size = channels, size
        self.seed = seed
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.allreduce = allreduce
        self.log = log
        self.checkpoint_every = checkpoint_every
        self.snapshot_steps = set(snapshot_steps or [])
        self.progress = progress
        self.it, self.step = 0, 0  # the next (iteration, inner step) to run
        self.net: nn.Module | None = None
        self.opt_net: torch.optim.Optimizer | None = None
        self.history: list[dict] = []
        self.timing = {"startup": 0.0, "distill": 0.0, "warmup": 0.0}
        self._keep_init_net = False  # iteration 0 matches on the cluster-init network

    # ------------------------------------------------------------------ networks

    def new_net(self, key: tuple[int, ...]) -> nn.Module:
        """A fresh network; the same key gives the same weights on every worker."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, NET_INIT, *key))
            net = build_model(self.cfg.model, self.channels, self.num_classes, self.size, width=self.cfg.width)
        return net.to(self.device).train()

    def _net_opt(self, net: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.SGD(net.parameters(), lr=cfg.lr_net, momentum=cfg.momentum_net or 0.0,
                               weight_decay=cfg.weight_decay_net or 0.0)

    def _sync_step(self, net: nn.Module, opt: torch.optim.Optimizer,
                   add_grads: Callable[[Callable[[], None]], torch.Tensor | float]) -> torch.Tensor | float:
        """One data-parallel SGD step: every shard adds its classes' gradient, the float64
        sums are all-reduced across workers (when distributed), then the step is taken."""
        opt.zero_grad(set_to_none=True)
        acc = GradAccumulator(net)
        loss = add_grads(acc.collect)
        if self.allreduce is not None:
            self.allreduce(acc.buffers)
        acc.apply()
        opt.step()
        return loss

    def real_step(self, net: nn.Module, opt: torch.optim.Optimizer, batch: int,
                  keys: tuple[int, ...]) -> torch.Tensor | float:
        """One SGD step of the network on a global real mini-batch of `batch` images, with the
        per-sample augmentation and CutMix of the IDC/DREAM code's train_epoch.

        CutMix pairs images across classes, so when it fires the augmented batch is first
        assembled from every shard (each fills its own positions of a zero tensor, then the
        tensors are summed: in one process directly, across workers with the all-reduce)."""
        cfg = self.cfg
        plan = BatchPlan(self.class_counts, batch, self.seed, keys)
        mix = None
        if cfg.net_cutmix:
            mix = cutmix_draw(batch, self.size, self.size, 1.0, cfg.net_cutmix,
                              generator=generator(self.seed, NET_MIX, *keys))
        full = None
        if mix is not None:
            full = torch.zeros(batch, self.channels, self.size, self.size, device=self.device)
            for s in self.shards:
                s.fill_real(plan, full)
            if self.allreduce is not None:
                self.allreduce([full])  # every other position is 0: the sum is exact
        return self._sync_step(net, opt, lambda collect: sum(
            s.real_grad(net, plan, collect, full, mix) for s in self.shards))

    def train_epochs(self, net: nn.Module, opt: torch.optim.Optimizer, epochs: int, key: tuple[int, ...],
                     desc: str) -> None:
        """`epochs` epochs of real-data training (batches of net_batch over every image, or
        over init_images of them when the CPU preset caps it)."""
        cfg = self.cfg
        total = sum(self.class_counts) if cfg.init_images is None else min(cfg.init_images, sum(self.class_counts))
        steps = -(-total // cfg.net_batch)
        bar = tqdm(total=epochs * steps, desc=desc, disable=not self.progress, leave=False)
        for e in range(epochs):
            for j in range(steps):
                b = min(cfg.net_batch, total - j * cfg.net_batch)
                self.real_step(net, opt, b, (*key, e, j))
                bar.update(1)
        bar.close()

    def pretrain_for_init(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The cluster-init network: init_epochs of SGD on real data (all classes)."""
        net = self.new_net((-1,))
        opt = self._net_opt(net)
        self.train_epochs(net, opt, self.cfg.init_epochs, (INIT_NET,), f"init net ({self.cfg.init_epochs} epoch real)")
        return net, opt

    # ------------------------------------------------------------------ main loop

    def _io_begin(self) -> list[tuple[object, int, int]]:
        """Open an accounting period on every distinct class cache of the shards (one per
        step): what was read, and the least that had to be (ClassCache.min_bytes)."""
        marks, seen = [], set()
        for s in self.shards:
            src = s.real
            if id(src) in seen or not hasattr(src, "new_period"):
                continue
            seen.add(id(src))
            src.new_period()
            marks.append((src, src.bytes_read, src.min_bytes))
        return marks

    @staticmethod
    def _io_end(marks: list[tuple[object, int, int]], metrics: dict) -> None:
        if marks:
            metrics["io/read_mb"] = sum(src.bytes_read - r for src, r, _ in marks) / 2**20
            metrics["io/min_mb"] = sum(src.min_bytes - m for src, _, m in marks) / 2**20

    def initialize(self) -> None:
        t0 = time.perf_counter()
        marks = self._io_begin()
        net = opt = None
        if self.cfg.init == "cluster":
            net, opt = self.pretrain_for_init()
        for s in self.shards:
            s.init_synthetic(net)
        if self.cfg.warmup_epochs and net is not None:
            # DREAM+: iteration 0 matches on the network the cluster init trained.
            self.net, self.opt_net, self._keep_init_net = net, opt, True
        self.timing["startup"] = time.perf_counter() - t0
        metrics = {"time/startup": self.timing["startup"]}
        self._io_end(marks, metrics)
        self._emit(0, metrics)
        if 0 in self.snapshot_steps:
            self.save_snapshot(0)

    def run(self, until_step: int | None = None) -> None:
        """Run (or continue) to the end, or until `until_step` global inner steps are done
        (used to simulate an interruption)."""
        cfg = self.cfg
        total = cfg.iterations * cfg.inner_steps
        end = total if until_step is None else min(total, until_step)
        bar = tqdm(total=total, initial=self.global_step, desc=f"distill {cfg.base}", disable=not self.progress,
                   dynamic_ncols=True)
        while self.global_step < end:
            metrics: dict[str, float] = {}
            t0 = time.perf_counter()
            marks = self._io_begin()
            if self.step == 0:
                for s in self.shards:
                    s.clamp_()
            if self.step == 0 or self.net is None:
                if self._keep_init_net and self.it == 0 and self.net is not None:
                    self._keep_init_net = False
                else:
                    self.net = self.new_net((self.it,))
                    self.opt_net = self._net_opt(self.net)
                    if cfg.warmup_epochs:
                        tw = time.perf_counter()
                        self.train_epochs(self.net, self.opt_net, cfg.warmup_epochs, (WARMUP, self.it),
                                          f"warm-up net it {self.it}")
                        metrics["time/warmup"] = time.perf_counter() - tw
                        self.timing["warmup"] += metrics["time/warmup"]
            for s in self.shards:
                for k, v in s.match_step(self.net, self.it, self.step).items():
                    metrics[k] = metrics.get(k, 0.0) + v
            last = self.step == cfg.inner_steps - 1
            # DC skips the network update after the last matching step (it is discarded).
            if cfg.net_update != "none" and not (last and cfg.base in ("dc", "dsa")):
                t1 = time.perf_counter()
                for j in range(cfg.net_steps):
                    metrics["loss/net"] = self._net_update(j)
                metrics["time/net"] = time.perf_counter() - t1
            metrics = host_metrics(metrics)  # the step's one read (and wait) of device values
            metrics["time/step"] = time.perf_counter() - t0
            self._io_end(marks, metrics)
            self.timing["distill"] += metrics["time/step"]
            self.step += 1
            if self.step == cfg.inner_steps:
                self.it, self.step = self.it + 1, 0
            g = self.global_step
            self._emit(g, metrics)
            if g in self.snapshot_steps:
                self.save_snapshot(g)
            if self.out_dir is not None and (
                    self.step == 0 or (self.checkpoint_every and g % self.checkpoint_every == 0)):
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items()
                             if k in ("loss/total", "time/step")}, refresh=False)
        bar.close()

    def _net_update(self, j: int) -> torch.Tensor | float:
        cfg, net = self.cfg, self.net
        keys = (self.it, self.step, j)
        if cfg.net_update == "real":
            # Whole batches until at least net_images images (train_epoch's n_data break).
            return self.real_step(net, self.opt_net, cfg.net_batch, keys)
        n_syn = self.num_classes * cfg.ipc * cfg.factor ** 2
        return self._sync_step(net, self.opt_net, lambda collect: sum(
            s.syn_grad(net, n_syn, keys, collect) for s in self.shards))

    @property
    def total_steps(self) -> int:
        """Inner steps of the whole schedule (iterations x inner_steps)."""
        return self.cfg.iterations * self.cfg.inner_steps

    load_checkpoint = staticmethod(load_checkpoint)

    @property
    def global_step(self) -> int:
        return self.it * self.cfg.inner_steps + self.step

    def _emit(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        if self.log is not None:
            self.log(step, metrics)

    # ------------------------------------------------------------------ state

    def synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored synthetic set of all shards, sorted by class."""
        parts = [s.synthetic() for s in self.shards]
        imgs, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        order = torch.argsort(labels, stable=True)
        return imgs[order], labels[order]

    def state_dict(self) -> dict:
        classes = {}
        for s in self.shards:
            classes.update(s.state_dict())
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "it": self.it, "step": self.step, "classes": classes,
            "net": self.net.state_dict() if self.net is not None and self.step else None,
            "opt_net": self.opt_net.state_dict() if self.opt_net is not None and self.step else None,
            "history": self.history, "timing": self.timing, "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.cfg):
            diff = {k: (v, asdict(self.cfg).get(k)) for k, v in state["config"].items() if asdict(self.cfg).get(k) != v}
            raise CheckpointError(f"checkpoint was written with a different config: {diff}")
        for s in self.shards:
            s.load_state_dict(state["classes"])
        self.it, self.step = state["it"], state["step"]
        self.history, self.timing = state["history"], {**self.timing, **state["timing"]}
        self.net = self.opt_net = None
        if state["net"] is not None:
            self.net = self.new_net((self.it,))
            self.net.load_state_dict(state["net"])
            self.opt_net = self._net_opt(self.net)
            self.opt_net.load_state_dict(state["opt_net"])

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        atomic_save(self.state_dict(), self.checkpoint_path)

    def save_snapshot(self, step: int) -> None:
        if self.out_dir is None:
            return
        imgs, labels = self.synthetic()
        atomic_save({"images": imgs, "labels": labels, "step": step,
                     "distill_seconds": self.timing["distill"], "startup_seconds": self.timing["startup"]},
                    self.out_dir / "snapshots" / f"step{step:06d}.pt")

    def write_history(self) -> None:
        if self.out_dir is not None:
            (self.out_dir / "history.json").write_text(json.dumps(self.history))
