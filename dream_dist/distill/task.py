"""task=distill: distil a packed dataset on class shards, export, evaluate, report.

    dream-dist                                     # DREAM+ on the embedded digits
    dream-dist dataset=mnist experiment=mnist_cpu  # DREAM+ on MNIST, CPU schedule
    dream-dist distill.method=idc distill.overrides.iterations=5

Writes into cfg.out_dir: distilled.pt (+ .png grid), checkpoint.pt, history.json,
results.json and TensorBoard logs under tb/.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dream_dist.distill.config import preset
from dream_dist.distill.engine import Distiller, balance_classes
from dream_dist.distill.shard import ClassShard


def resolve(cfg):
    """The run's DistillConfig with the dataset's defaults filled in."""
    return preset(cfg.distill.method, **dict(cfg.distill.overrides)).resolved(cfg.dataset.name)


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

    def grid(self, step: int, images: torch.Tensor) -> None:
        from dream_dist.data.base import denormalize
        from dream_dist.viz import grid

        arr = grid(denormalize(images, self.mean, self.std), nrow=self.ipc, upscale=1)
        self.writer.add_image("synthetic", arr, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def run_distill(cfg) -> dict:
    from dream_dist.data import normalize
    from dream_dist.data.shards import ClassCache, PackedReader
    from dream_dist.distill.export import save_distilled
    from dream_dist.evaluate import evaluate
    from dream_dist.published import published
    from dream_dist.run import ensure_packed, print_table

    dcfg = resolve(cfg)
    out = Path(cfg.out_dir)
    root = ensure_packed(cfg)
    reader, test_reader = PackedReader(root, "train"), PackedReader(root, "test")
    classes = cfg.dataset.classes or list(range(len(reader.classes)))
    counts_all = reader.index["counts"]
    counts = [counts_all[c] if c in classes else 0 for c in range(len(counts_all))]
    dcfg.check_data([counts_all[c] for c in classes])  # before any compute
    mean, std = reader.mean_std
    cache = ClassCache(reader, cfg.distill.memory_budget_mb * 2**20)
    shards = [ClassShard(cl, cache, dcfg, mean, std, len(counts_all), seed=cfg.seed, device=cfg.device,
                          counts=counts_all)
              for cl in balance_classes(counts_all, cfg.distill.shards, classes)]
    tb = TensorBoardLogger(out / "tb" / "distill", mean, std, cfg.distill.grid_every, dcfg.ipc)
    test = test_reader.load_classes(cfg.dataset.classes)

    def log(step: int, metrics: dict) -> None:
        tb.scalars(step, metrics)
        if step and step % cfg.distill.grid_every == 0:
            tb.grid(step, d.synthetic()[0])
        if cfg.distill.quick_eval_every and step and step % cfg.distill.quick_eval_every == 0:
            quick = dataclasses.replace(cfg.eval, epochs=cfg.distill.quick_eval_epochs, runs=1)
            imgs, labels = d.synthetic()
            res = evaluate(imgs, labels, test, mean, std, quick, factor=dcfg.factor, progress=False)
            tb.scalars(step, {"eval/quick_acc": res.mean})

    d = Distiller(dcfg, shards, counts, reader.index["channels"], reader.index["image_size"],
                  seed=cfg.seed, device=cfg.device, out_dir=out, log=log,
                  checkpoint_every=cfg.distill.checkpoint_every,
                  snapshot_steps=cfg.distill.snapshot_steps, progress=cfg.progress)
    if cfg.distill.resume and d.checkpoint_path.exists():
        d.load_state_dict(torch.load(d.checkpoint_path, weights_only=False))
        print(f"resumed from {d.checkpoint_path} at step {d.global_step}")
    else:
        d.initialize()
    d.run()
    d.write_history()
    imgs, labels = d.synthetic()
    tb.grid(d.global_step, imgs)
    metrics = {"distill_seconds": d.timing["distill"], "startup_seconds": d.timing["startup"],
               "steps": d.global_step}
    path = save_distilled(out / "distilled.pt", imgs, labels, dcfg.factor, reader.classes, mean, std,
                          config={"run": dataclasses.asdict(cfg), "distill": dataclasses.asdict(dcfg)},
                          metrics=metrics)

    rows = []
    res = evaluate(imgs, labels, test, mean, std, cfg.eval, factor=dcfg.factor, log_dir=out,
                   name=cfg.distill.method, progress=cfg.progress)
    rows.append({"method": cfg.distill.method, "ipc": dcfg.ipc, **res.to_dict(),
                 "published": published(cfg.dataset.name, cfg.distill.method, dcfg.ipc)})
    if cfg.distill.baseline:
        from dream_dist.coreset import build_coreset

        from dream_dist.data.base import ImageSet

        # From the cache the shards already filled, not a second read of the shards.
        train = ImageSet(torch.cat([cache.get(c) for c in classes]),
                         torch.tensor(classes).repeat_interleave(torch.tensor([counts_all[c] for c in classes])),
                         list(reader.classes))
        core = build_coreset("random", train, dcfg.ipc, seed=cfg.seed)
        base = evaluate(normalize(core.images, mean, std), core.labels, test, mean, std, cfg.eval,
                        log_dir=out, name="random_coreset", progress=cfg.progress)
        rows.append({"method": "random coreset", "ipc": dcfg.ipc, **base.to_dict(),
                     "published": published(cfg.dataset.name, "random", dcfg.ipc)})
    for r in rows:
        r["seconds"] = r.pop("seconds", 0.0)
    print_table(rows, f"{cfg.dataset.name}: {cfg.distill.method}, {dcfg.iterations}x{dcfg.inner_steps} steps "
                      f"({metrics['distill_seconds']:.0f} s distill + {metrics['startup_seconds']:.0f} s start-up); "
                      f"eval {cfg.eval.model}, {cfg.eval.epochs} epochs x {cfg.eval.runs} runs, last epoch")
    summary = {"dataset": cfg.dataset.name, "distill": dataclasses.asdict(dcfg), "metrics": metrics, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    tb.close()
    print(f"distilled set: {path} (grid {path.with_suffix('.png')})\n"
          f"TensorBoard:   tensorboard --logdir {out / 'tb'}\nresults:       {out / 'results.json'}")
    return summary
