"""Class shards on Ray Train workers: the distributed layer of dream_dist.

    from dream_dist.distributed import distill_on_ray
    images, labels, result = distill_on_ray(run_cfg, num_workers=2)

Each Ray Train worker owns one class shard (classes balanced by image count), reads only
its classes' packed shards through a `ClassCache` within its memory budget, and runs the
same `Distiller` loop as a single process. The network's updates are data-parallel: the
float64 per-class gradient sums are all-reduced with torch.distributed (gloo on CPU, NCCL
on GPU; the process group is set up by Ray Train's TorchTrainer). Nothing here knows a
concrete model or method: it drives the engine through `Distiller`/`ClassShard` only.

Checkpoints go through `ray.train.report` every `distill.checkpoint_every` steps: each
worker writes its own classes (rank<r>.pt) into the same checkpoint directory, and a
restarted worker group (Ray's FailureConfig) merges them, so any worker count can resume.

From the CLI: `dream-dist distill.workers=2` (dream_dist.distill.task dispatches here).
"""
from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from dream_dist.errors import CheckpointError, ConfigError


def _load_merged(ckpt_dir: str) -> dict:
    """Merge the per-rank checkpoint files into one Distiller state."""
    files = sorted(Path(ckpt_dir).glob("rank*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds no rank*.pt files")
    from dream_dist.distill.engine import load_checkpoint

    states = [load_checkpoint(f) for f in files]  # weights_only: a planted pickle never runs
    merged = dict(states[0])
    merged["classes"] = {c: s for st in states for c, s in st["classes"].items()}
    return merged


def merged_synthetic(state: dict, dcfg, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised stored images, labels) of a merged checkpoint, sorted by class. Pixel-space
    images (IDC base) are normalised here, as ClassShard.synthetic does in process."""
    order = sorted(state["classes"])
    images = torch.cat([state["classes"][c]["syn"] for c in order])
    if dcfg.pixel_space:
        images = (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return images, torch.tensor(order).repeat_interleave(dcfg.ipc)


def train_loop_per_worker(config: dict) -> None:
    """The loop each Ray Train worker runs (one class shard per worker)."""
    import ray.train
    import torch.distributed as dist

    from dream_dist.data.shards import ClassCache, PackedReader
    from dream_dist.distill.engine import Distiller, balance_classes
    from dream_dist.distill.shard import ClassShard

    cfg, dcfg, root = config["cfg"], config["dcfg"], config["packed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads_per_worker", 1))
    device = "cpu"
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():  # an error, never a silent CPU fallback
            raise ConfigError(f"device: {cfg.device!r} requested but Ray worker {rank} has no CUDA device")
        device = str(ray.train.torch.get_device())

    reader = PackedReader(root, "train", on_corrupt=cfg.dataset.on_corrupt)
    counts_all = reader.index["counts"]
    classes = cfg.dataset.classes or list(range(len(counts_all)))
    counts = [counts_all[c] if c in classes else 0 for c in range(len(counts_all))]
    mine = balance_classes(counts_all, world, classes)[rank]
    cache = ClassCache(reader, cfg.distill.memory_budget_mb * 2**20)
    mean, std = reader.mean_std
    shard = ClassShard(mine, cache, dcfg, mean, std, len(counts_all), seed=cfg.seed, device=device,
                       counts=counts_all)

    comm = {"bytes": 0, "seconds": 0.0, "calls": 0}

    def allreduce(buffers: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        for b in buffers:
            dist.all_reduce(b)  # SUM of float64 per-class contributions
            comm["bytes"] += b.numel() * b.element_size()
        comm["calls"] += 1
        comm["seconds"] += time.perf_counter() - t0

    log = None
    if rank == 0 and config.get("log_dir"):
        # Rank 0 logs the step scalars (the network-side ones are global after the all-reduce).
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["log_dir"])

        def log(step: int, metrics: dict) -> None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)

    d = Distiller(dcfg, [shard], counts, reader.index["channels"], reader.index["image_size"],
                  seed=cfg.seed, device=device, allreduce=allreduce, log=log,
                  progress=cfg.progress and rank == 0)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            d.load_state_dict(_load_merged(ckpt_dir))
    else:
        d.initialize()
    resumed_from = d.global_step  # 0 for a fresh start; the checkpoint's step after a restart

    total = dcfg.iterations * dcfg.inner_steps
    every = cfg.distill.checkpoint_every
    while d.global_step < total:
        d.run(until_step=min(total, (d.global_step // every + 1) * every))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(d.state_dict(), os.path.join(tmp, f"rank{rank:04d}.pt"))
            last = d.history[-1] if d.history else {}
            ray.train.report({"step": d.global_step, "loss": last.get("loss/total", 0.0),
                              "classes": len(mine), "opened_shards": len(reader.opened),
                              "resumed_from": resumed_from, "distill_seconds": d.timing["distill"],
                              "startup_seconds": d.timing["startup"],
                              # ru_maxrss is in KiB on Linux: the worker process's peak memory.
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "allreduce_bytes": comm["bytes"], "allreduce_calls": comm["calls"],
                              "allreduce_seconds": comm["seconds"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        hook = config.get("after_report")
        if hook is not None:
            hook(rank, d.global_step)
    if log is not None:
        writer.close()


def ensure_ray() -> None:
    """Join the running Ray cluster, else start Ray on this machine; nothing when Ray is up.

    Plain `ray.init()` joins the cluster of RAY_ADDRESS or of `ray start` on this node (what
    `ray submit` and `ray job submit` give) and starts a local Ray otherwise. We do not pass
    address="auto": it fails when there is no cluster, and on a shared machine it can attach
    to any Ray process it finds (someone else's test instance).
    """
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)


def distill_on_ray(cfg, num_workers: int, max_failures: int = 0, storage: str | Path | None = None,
                   after_report=None, log_dir: str | Path | None = None, packed: str | Path | None = None):
    """Distil cfg's dataset on `num_workers` Ray Train workers (one class shard each).

    Joins the running cluster when there is one (RAY_ADDRESS or `ray start` on this node),
    else starts Ray locally.
    max_failures: worker-group restarts from the last checkpoint (Ray's FailureConfig).
    after_report(rank, step): called in each worker after each checkpoint report (fault drills).
    log_dir: rank 0 writes the per-step scalars there (TensorBoard).
    packed: the packed shards when the caller has them already (else packed / checked here).
    Returns (stored images, labels, ray.train.Result).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dream_dist.distill.task import resolve
    from dream_dist.run import ensure_packed

    from dream_dist.data.shards import PackedReader

    root = packed if packed is not None else ensure_packed(cfg)
    reader = PackedReader(root, "train", on_corrupt=cfg.dataset.on_corrupt)
    dcfg = resolve(cfg, reader.index["image_size"])
    ensure_ray()
    storage = Path(storage or Path(cfg.out_dir) / "ray").resolve()
    use_gpu = cfg.device.startswith("cuda")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "dcfg": dcfg, "packed": str(Path(root).resolve()),
                           "after_report": after_report,
                           "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
                           "threads_per_worker": cfg.threads or 1},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     # A worker runs cfg.threads torch threads: reserve them.
                                     resources_per_worker={"CPU": cfg.threads or 1}),
        run_config=RunConfig(name="distill", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt_dir:
        state = _load_merged(ckpt_dir)
    images, labels = merged_synthetic(state, dcfg, *reader.mean_std)
    return images, labels, result
