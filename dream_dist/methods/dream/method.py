"""The DREAM/IDC/DC/DSA/DM engine behind the method interface (task=distill).

    dream-dist                                     # DREAM+ on the embedded digits, in-process
    dream-dist distill.workers=2                   # the same run on 2 Ray Train workers
    dream-dist dataset=mnist experiment=mnist_cpu  # DREAM+ on MNIST, CPU schedule
    dream-dist distill.method=idc distill.overrides.iterations=5

Writes into cfg.out_dir: distilled.pt (+ .png grid), checkpoint.pt, history.json,
results.json and TensorBoard logs under tb/.

`DreamMethod` is a sharded method: classes share the matching network, so a worker owns a
class shard for the whole run. In process, `make_distiller` builds the engine on
distill.shards class shards (resumed or initialised); on Ray, every Train worker builds its
`stepper` over its own classes. The pipeline (dream_dist.pipeline) does the rest.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dream_dist.methods.dream.config import DistillConfig, preset
from dream_dist.errors import CheckpointError
from dream_dist.evaluation.tensorboard import TensorBoardLogger, quick_eval
from dream_dist.methods.base import Method, SynthSet
from dream_dist.methods.dream.engine import Distiller, balance_classes, load_checkpoint
from dream_dist.methods.dream.shard import ClassShard


def resolve(cfg, image_size: int | None = None) -> DistillConfig:
    """The run's DistillConfig with the dataset's defaults filled in (image_size: the packed
    images' side, for IDC's lr scaling; None = the dataset's known size)."""
    return preset(cfg.distill.method, **dict(cfg.distill.overrides)).resolved(cfg.dataset.kind, image_size)


@dataclass
class Prepared:
    """What a distillation run reads before any compute: config, data access, checks done."""

    dcfg: DistillConfig
    reader: object
    """PackedReader of the train split."""
    cache: object
    """ClassCache over `reader` within distill.memory_budget_mb."""
    test: object
    """The test split (ImageSet) of the selected classes."""
    classes: list[int]
    counts_all: list[int]
    """Images per class of ALL classes of the index."""
    mean: list[float]
    std: list[float]

    @property
    def counts(self) -> list[int]:
        """Per-class counts with unselected classes at 0 (what the engine balances on)."""
        return [n if c in self.classes else 0 for c, n in enumerate(self.counts_all)]


def prepare(cfg, data=None) -> Prepared:
    """Resolve the method, pack/open the shards (unless `data` is the opened dataset) and check
    the data, before any compute."""
    from dream_dist.data.prepare import open_data

    data = data if data is not None else open_data(cfg, cfg.distill.memory_budget_mb)
    dcfg = resolve(cfg, data.image_size)
    dcfg.check_data([data.counts_all[c] for c in data.classes])
    return Prepared(dcfg, data.reader, data.cache, data.test(), data.classes, data.counts_all, data.mean, data.std)


def make_distiller(cfg, p: Prepared, out: Path | None, log: Callable[[int, dict], None] | None = None,
                   dcfg: DistillConfig | None = None) -> Distiller:
    """The in-process engine on distill.shards class shards, resumed or initialised."""
    dcfg = dcfg or p.dcfg
    shards = [ClassShard(cl, p.cache, dcfg, p.mean, p.std, len(p.counts_all), seed=cfg.seed,
                         device=cfg.device, counts=p.counts_all)
              for cl in balance_classes(p.counts_all, cfg.distill.shards, p.classes)]
    d = Distiller(dcfg, shards, p.counts, p.reader.index["channels"], p.reader.index["image_size"],
                  seed=cfg.seed, device=cfg.device, out_dir=out, log=log,
                  checkpoint_every=cfg.distill.checkpoint_every,
                  snapshot_steps=cfg.distill.snapshot_steps, progress=cfg.progress)
    if cfg.distill.resume and out is not None and d.checkpoint_path.exists():
        try:
            d.load_state_dict(load_checkpoint(d.checkpoint_path))
        except CheckpointError as e:
            msg = str(e)  # name the file whatever failed (the config check does not know it)
            raise CheckpointError(msg if msg.startswith(str(d.checkpoint_path)) else f"{d.checkpoint_path}: {msg}") from None
        print(f"resumed from {d.checkpoint_path} at step {d.global_step}")
    else:
        d.initialize()
    return d


def _quick(cfg, p: Prepared, images: torch.Tensor, labels: torch.Tensor) -> float:
    return quick_eval(cfg.eval, cfg.distill.quick_eval_epochs, p.test, p.mean, p.std, images, labels,
                      p.dcfg.factor, cfg.dataset.kind)


class DreamMethod(Method):
    """DREAM+/DREAM/IDC/DC/DSA/DM (distill.method picks the preset) behind the method interface."""

    task = "distill"
    sharded = True

    def workers(self, cfg) -> int:
        return cfg.distill.workers

    def memory_budget_mb(self, cfg) -> float:
        return cfg.distill.memory_budget_mb

    def prepare(self, cfg, data, out: Path) -> Prepared:
        return prepare(cfg, data)

    def remote_prep(self, cfg, prep: Prepared) -> Prepared:
        # Workers open their own readers and caches: only the resolved config and statistics travel.
        return dataclasses.replace(prep, reader=None, cache=None, test=None)

    def run_in_process(self, cfg, p: Prepared, data, out: Path):
        tb = TensorBoardLogger(out / "tb" / "distill", p.mean, p.std, cfg.distill.grid_every, p.dcfg.ipc)
        holder: dict = {}

        def log(step: int, metrics: dict) -> None:
            tb.scalars(step, metrics)
            d = holder.get("d")
            if d is None:
                return
            if step and step % cfg.distill.grid_every == 0:
                tb.grid(step, d.synthetic()[0])
            if cfg.distill.quick_eval_every and step and step % cfg.distill.quick_eval_every == 0:
                tb.scalars(step, {"eval/quick_acc": _quick(cfg, p, *d.synthetic())})

        try:
            d = make_distiller(cfg, p, out, log)
            holder["d"] = d
            d.run()
            d.write_history()
            images, labels = d.synthetic()
            tb.grid(d.global_step, images)
        finally:
            tb.close()
        metrics = {"distill_seconds": d.timing["distill"], "startup_seconds": d.timing["startup"],
                   "steps": d.global_step, "bytes_read": getattr(p.cache, "bytes_read", None),
                   "min_bytes": getattr(p.cache, "min_bytes", None),
                   "fetched_bytes": p.cache.reader.fetched["bytes"] if hasattr(p.cache, "reader") else None,
                   "fetch_requests": p.cache.reader.fetched["requests"] if hasattr(p.cache, "reader") else None}
        return [self._set(cfg, p, images, labels)], metrics

    def stepper(self, cfg, p: Prepared, classes: list[int], cache, counts_all: list[int], device: str,
                allreduce=None, log=None, progress: bool = False) -> Distiller:
        selected = cfg.dataset.classes or list(range(len(counts_all)))
        counts = [n if c in selected else 0 for c, n in enumerate(counts_all)]
        shard = ClassShard(classes, cache, p.dcfg, p.mean, p.std, len(counts_all), seed=cfg.seed, device=device,
                           counts=counts_all)
        index = cache.reader.index
        return Distiller(p.dcfg, [shard], counts, index["channels"], index["image_size"], seed=cfg.seed,
                         device=device, allreduce=allreduce, log=log, progress=progress)

    load_checkpoint = staticmethod(load_checkpoint)

    def sets_from_state(self, cfg, p: Prepared, state: dict, mean, std) -> list[SynthSet]:
        """The merged state's stored images (pixel space for the IDC base) normalised, by class."""
        order = sorted(state["classes"])
        images = torch.cat([state["classes"][c]["syn"] for c in order])
        if p.dcfg.pixel_space:
            images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return [self._set(cfg, p, images, torch.tensor(order).repeat_interleave(p.dcfg.ipc))]

    def _set(self, cfg, p: Prepared, images: torch.Tensor, labels: torch.Tensor) -> SynthSet:
        return SynthSet(cfg.distill.method, images, labels, p.dcfg.ipc, p.dcfg.factor, published=cfg.distill.method,
                        config={"distill": dataclasses.asdict(p.dcfg)})

    def evaluator(self, cfg, p: Prepared, data):
        from dream_dist.evaluation.protocol import HardLabelProtocol

        return HardLabelProtocol(cfg.eval, p.test, p.mean, p.std, cfg.dataset.kind)

    def baseline(self, cfg, p: Prepared, data) -> SynthSet | None:
        """A random real coreset of the same IPC. Its picks come from the index counts; only those
        images are read (from the class cache when cached, else per sample from the shards), so the
        driver of a Ray run never loads the training set."""
        if not cfg.distill.baseline:
            return None
        from dream_dist.data import normalize
        from dream_dist.methods.coreset import random_baseline

        images, labels = random_baseline(data, p.dcfg.ipc, cfg.seed)
        return SynthSet("random_coreset", normalize(images, p.mean, p.std), labels, p.dcfg.ipc, label="random coreset",
                        published="random", save_as=None)

    def title(self, cfg, p: Prepared, data, metrics: dict) -> str:
        return f"{cfg.dataset.name}: {cfg.distill.method}, {p.dcfg.iterations}x{p.dcfg.inner_steps} steps"

    def timing(self, metrics: dict) -> str:
        return f"distill {metrics['distill_seconds']:.0f} s + start-up {metrics.get('startup_seconds', 0.0):.0f} s"

    def summary(self, cfg, p: Prepared) -> dict:
        return {"distill": dataclasses.asdict(p.dcfg)}

    def check_overrides(self, cfg, overrides: dict, counts: list[int]) -> None:
        """Raise ValueError when distill.overrides=`overrides` makes an invalid run on these class
        counts (Tune checks every combination of its choices before any trial starts)."""
        preset(cfg.distill.method, **dict(overrides)).resolved(cfg.dataset.kind).check_data(counts)
