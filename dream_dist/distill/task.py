"""task=distill: distil a packed dataset on class shards, export, evaluate, report.

    dream-dist                                     # DREAM+ on the embedded digits, in-process
    dream-dist distill.workers=2                   # the same run on 2 Ray Train workers
    dream-dist dataset=mnist experiment=mnist_cpu  # DREAM+ on MNIST, CPU schedule
    dream-dist distill.method=idc distill.overrides.iterations=5

Writes into cfg.out_dir: distilled.pt (+ .png grid), checkpoint.pt, history.json,
results.json and TensorBoard logs under tb/.

The pieces are separate so other drivers (Ray Tune trials, benchmarks) build the same run:
`prepare` reads and checks the data before any compute, `make_distiller` builds the engine
on class shards, `quick_eval` measures a synthetic set cheaply, `finish` exports and
evaluates.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dream_dist.distill.config import DistillConfig, preset
from dream_dist.distill.engine import Distiller, balance_classes
from dream_dist.distill.shard import ClassShard


def resolve(cfg, image_size: int | None = None) -> DistillConfig:
    """The run's DistillConfig with the dataset's defaults filled in (image_size: the packed
    images' side, for IDC's lr scaling; None = the dataset's known size)."""
    return preset(cfg.distill.method, **dict(cfg.distill.overrides)).resolved(cfg.dataset.name, image_size)


class TensorBoardLogger:
    """Scalars every step, image grids every `grid_every` steps, quick evaluations."""

    def __init__(self, log_dir: Path, mean, std, grid_every: int, ipc: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.mean, self.std = mean, std
        self.grid_every, self.ipc = grid_every, ipc

    def scalars(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def grid(self, step: int, images: torch.Tensor, tag: str = "synthetic") -> None:
        from dream_dist.data.base import denormalize
        from dream_dist.viz import grid

        arr = grid(denormalize(images, self.mean, self.std), nrow=self.ipc, upscale=1)
        self.writer.add_image(tag, arr, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


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


def prepare(cfg) -> Prepared:
    """Resolve the method, pack/open the shards and check the data, before any compute."""
    from dream_dist.data.shards import ClassCache, PackedReader
    from dream_dist.run import ensure_packed

    dcfg = resolve(cfg)
    root = ensure_packed(cfg)
    reader = PackedReader(root, "train", on_corrupt=cfg.dataset.on_corrupt)
    test_reader = PackedReader(root, "test", on_corrupt=cfg.dataset.on_corrupt)
    dcfg = resolve(cfg, reader.index["image_size"])
    classes = list(cfg.dataset.classes or range(len(reader.classes)))
    counts_all = list(reader.index["counts"])
    dcfg.check_data([counts_all[c] for c in classes])
    mean, std = reader.mean_std
    cache = ClassCache(reader, cfg.distill.memory_budget_mb * 2**20)
    test = test_reader.load_classes(cfg.dataset.classes)
    return Prepared(dcfg, reader, cache, test, classes, counts_all, list(mean), list(std))


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
        from dream_dist.distill.engine import CheckpointError, load_checkpoint

        try:
            d.load_state_dict(load_checkpoint(d.checkpoint_path))
        except CheckpointError as e:
            msg = str(e)  # name the file whatever failed (the config check does not know it)
            raise CheckpointError(msg if msg.startswith(str(d.checkpoint_path)) else f"{d.checkpoint_path}: {msg}") from None
        print(f"resumed from {d.checkpoint_path} at step {d.global_step}")
    else:
        d.initialize()
    return d


def quick_eval(cfg, p: Prepared, images: torch.Tensor, labels: torch.Tensor, factor: int) -> float:
    """One short evaluation run (distill.quick_eval_epochs epochs) of a synthetic set."""
    from dream_dist.evaluate import evaluate

    quick = dataclasses.replace(cfg.eval, epochs=cfg.distill.quick_eval_epochs, runs=1, curve_every=0)
    return evaluate(images, labels, p.test, p.mean, p.std, quick, factor=factor, progress=False,
                    dataset=cfg.dataset.name).mean


def _distill_in_process(cfg, p: Prepared, out: Path, tb: TensorBoardLogger):
    holder: dict = {}

    def log(step: int, metrics: dict) -> None:
        tb.scalars(step, metrics)
        d = holder.get("d")
        if d is None:
            return
        if step and step % cfg.distill.grid_every == 0:
            tb.grid(step, d.synthetic()[0])
        if cfg.distill.quick_eval_every and step and step % cfg.distill.quick_eval_every == 0:
            tb.scalars(step, {"eval/quick_acc": quick_eval(cfg, p, *d.synthetic(), p.dcfg.factor)})

    d = make_distiller(cfg, p, out, log)
    holder["d"] = d
    d.run()
    d.write_history()
    images, labels = d.synthetic()
    metrics = {"distill_seconds": d.timing["distill"], "startup_seconds": d.timing["startup"],
               "steps": d.global_step, "workers": 0}
    return images, labels, metrics


def _distill_on_ray(cfg, p: Prepared, out: Path):
    from dream_dist.distributed import distill_on_ray

    start = time.perf_counter()
    images, labels, result = distill_on_ray(cfg, cfg.distill.workers, max_failures=cfg.distill.max_failures,
                                            storage=out / "ray", log_dir=out / "tb" / "distill",
                                            packed=p.reader.root)
    metrics = {"distill_seconds": time.perf_counter() - start, "startup_seconds": 0.0,
               "steps": result.metrics["step"], "workers": cfg.distill.workers}
    return images, labels, metrics


def run_distill(cfg) -> dict:
    out = Path(cfg.out_dir)
    p = prepare(cfg)  # before any compute: a bad config or dataset fails here
    tb = TensorBoardLogger(out / "tb" / "distill", p.mean, p.std, cfg.distill.grid_every, p.dcfg.ipc)
    try:
        if cfg.distill.workers:
            images, labels, metrics = _distill_on_ray(cfg, p, out)
        else:
            images, labels, metrics = _distill_in_process(cfg, p, out, tb)
        tb.grid(metrics["steps"], images)
        return finish(cfg, p, images, labels, metrics, out)
    finally:
        tb.close()


def finish(cfg, p: Prepared, images: torch.Tensor, labels: torch.Tensor, metrics: dict, out: Path) -> dict:
    """Export the synthetic set, evaluate it (and the random-coreset baseline), write results.json."""
    from dream_dist.data import normalize
    from dream_dist.distill.export import save_distilled
    from dream_dist.evaluate import evaluate
    from dream_dist.published import published
    from dream_dist.run import print_table

    from dream_dist.environment import environment

    dcfg = p.dcfg
    metrics = {**metrics, "environment": environment(cfg.device)}
    path = save_distilled(out / "distilled.pt", images, labels, dcfg.factor, p.reader.classes, p.mean, p.std,
                          config={"run": dataclasses.asdict(cfg), "distill": dataclasses.asdict(dcfg)},
                          metrics=metrics)
    def measure(imgs: torch.Tensor, labs: torch.Tensor, factor: int, name: str):
        if not cfg.distill.workers:
            return evaluate(imgs, labs, p.test, p.mean, p.std, cfg.eval, factor=factor, log_dir=out,
                            name=name, progress=cfg.progress, dataset=cfg.dataset.name)
        # A Ray run evaluates on Ray too: the runs are independent tasks scheduled over the cluster.
        from dream_dist.ray_eval import evaluate_on_ray

        gpus = 1 if cfg.eval.device.startswith("cuda") else 0
        return evaluate_on_ray(imgs, labs, p.test, p.mean, p.std, [cfg.eval], factor=factor, num_gpus=gpus,
                               log_dir=out, names=[name], progress=cfg.progress, dataset=cfg.dataset.name)[name]

    rows = []
    res = measure(images, labels, dcfg.factor, cfg.distill.method)
    rows.append({"method": cfg.distill.method, "ipc": dcfg.ipc, **res.to_dict(),
                 "published": published(cfg.dataset.name, cfg.distill.method, dcfg.ipc)})
    if cfg.distill.baseline:
        from dream_dist.coreset import random_indices

        # The random coreset's picks come from the index counts; only those images are read
        # (from the class cache when cached, else per sample from the shards), so the driver
        # of a Ray run never loads the training set.
        classes = sorted(p.classes)
        picks = [random_indices(p.counts_all[c], dcfg.ipc, cfg.seed, c) for c in classes]
        core_images = torch.cat([p.cache.take(c, i) for c, i in zip(classes, picks)])
        core_labels = torch.tensor(classes).repeat_interleave(torch.tensor([len(i) for i in picks]))
        base = measure(normalize(core_images, p.mean, p.std), core_labels, 1, "random_coreset")
        rows.append({"method": "random coreset", "ipc": dcfg.ipc, **base.to_dict(),
                     "published": published(cfg.dataset.name, "random", dcfg.ipc)})
    where = f"{metrics['workers']} Ray workers" if metrics.get("workers") else "in-process"
    print_table(rows, f"{cfg.dataset.name}: {cfg.distill.method}, {dcfg.iterations}x{dcfg.inner_steps} steps "
                      f"({where}); eval {cfg.eval.model}, {cfg.eval.resolved(cfg.dataset.name).epochs} epochs "
                      f"x {cfg.eval.runs} runs, last epoch",
                timing=f"distill {metrics['distill_seconds']:.0f} s + start-up {metrics['startup_seconds']:.0f} s")
    summary = {"dataset": cfg.dataset.name, "distill": dataclasses.asdict(dcfg), "metrics": metrics, "rows": rows,
               "environment": metrics["environment"]}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"distilled set: {path} (grid {path.with_suffix('.png')})\n"
          f"TensorBoard:   tensorboard --logdir {out / 'tb'}\nresults:       {out / 'results.json'}")
    return summary
