"""Sharded methods on Ray Train workers: one class shard per worker.

    from dream_dist.distributed.train import distill_on_ray
    from dream_dist.methods import METHODS
    images, labels, result = distill_on_ray(run_cfg, METHODS["distill"], num_workers=2)

Each Ray Train worker owns one class shard (classes balanced by image count), reads only its
classes' packed shards through a `ClassCache` within its memory budget, and runs the method's
`stepper` (for DREAM+/IDC/DC/DSA/DM, the same `Distiller` loop as a single process). The
network's updates are data-parallel: the float64 per-class gradient sums are all-reduced with
torch.distributed (gloo on CPU, NCCL on GPU; the process group is set up by Ray Train's
TorchTrainer). Nothing here knows a concrete method: the pipeline hands the method object in.

Checkpoints go through `ray.train.report` every `distill.checkpoint_every` steps: each worker
writes its own classes (rank<r>.pt) into the same checkpoint directory, and a restarted worker
group (Ray's FailureConfig) merges them, so any worker count can resume.

From the CLI: `dream-dist distill.workers=2` (the pipeline dispatches here).
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dream_dist.distributed import ensure_ray
from dream_dist.errors import CheckpointError, ConfigError

RUN_NAME = "distill"  # the Ray Train run under <storage>: what a resumed run restores


def _load_merged(ckpt_dir: str, load=None) -> dict:
    """Merge the per-rank checkpoint files into one state (every class)."""
    files = sorted(Path(ckpt_dir).glob("rank*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds no rank*.pt files")
    if load is None:
        from dream_dist.artifact import load_plain as load

    states = [load(f) for f in files]  # weights_only: a planted pickle never runs
    merged = dict(states[0])
    merged["classes"] = {c: s for st in states for c, s in st["classes"].items()}
    merged["worker_environments"] = [st["worker_environment"] for st in states if "worker_environment" in st]
    merged.pop("worker_environment", None)
    return merged


def bucketed_allreduce(buffers: list[torch.Tensor], all_reduce, stats: dict | None = None) -> None:
    """Sum `buffers` across workers in place with ONE `all_reduce` call per (dtype, device):
    they are flattened into one bucket, reduced, and copied back.

    One call instead of one per tensor (a network has a dozen parameter tensors) saves the
    per-call latency of NCCL/gloo. stats: adds "bytes", "calls" and "seconds"; the timer waits
    for the device (torch.cuda.synchronize) so it measures the reduction, not its enqueue."""
    t0 = time.perf_counter()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault((b.dtype, b.device), []).append(b)
    for (_, device), group in groups.items():
        flat = torch.cat([b.reshape(-1) for b in group]) if len(group) > 1 else group[0].reshape(-1)
        all_reduce(flat)
        if len(group) > 1 or flat.data_ptr() != group[0].data_ptr():
            for b, part in zip(group, flat.split([b.numel() for b in group])):
                b.copy_(part.view_as(b))
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0) + flat.numel() * flat.element_size()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if stats is not None:
        stats["calls"] = stats.get("calls", 0) + 1
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0


def train_loop_per_worker(config: dict) -> None:
    """The loop each Ray Train worker runs (one class shard per worker)."""
    import ray.train
    import torch.distributed as dist

    from dream_dist.data.prepare import balance_classes, reader_for
    from dream_dist.data.shards import ClassCache

    cfg, method, prep, root = config["cfg"], config["method"], config["prep"], config["packed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads_per_worker", 1))
    device = "cpu"
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():  # an error, never a silent CPU fallback
            raise ConfigError(f"device: {cfg.device!r} requested but Ray worker {rank} has no CUDA device")
        # This worker's own GPU (Ray Train may show a node's workers all of its GPUs): torch,
        # the engine and FAISS (kmeans.gpu_for) all use this one index and no other.
        device = str(ray.train.torch.get_device())
        torch.cuda.set_device(torch.device(device))
    from dream_dist import determinism
    from dream_dist.devices import describe

    determinism.configure(device, cfg.deterministic)

    reader = reader_for(cfg, root, "train")  # a URL: this worker fetches its own classes' shards only
    counts_all = reader.index["counts"]
    classes = cfg.dataset.classes or list(range(len(counts_all)))
    mine = balance_classes(counts_all, world, classes)[rank]
    cache = ClassCache(reader, config["budget_mb"] * 2**20, cfg.distill.cache_policy)

    comm = {"bytes": 0, "seconds": 0.0, "calls": 0}

    def allreduce(buffers: list[torch.Tensor]) -> None:
        bucketed_allreduce(buffers, dist.all_reduce, comm)  # SUM of float64 per-class contributions

    log = None
    if rank == 0 and config.get("log_dir"):
        # Rank 0 logs the step scalars (the network-side ones are global after the all-reduce).
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["log_dir"])

        def log(step: int, metrics: dict) -> None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)

    d = method.stepper(cfg, prep, mine, cache, counts_all, device, allreduce=allreduce, log=log,
                       progress=cfg.progress and rank == 0)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            d.load_state_dict(_load_merged(ckpt_dir, d.load_checkpoint))
    else:
        d.initialize()
    resumed_from = d.global_step  # 0 for a fresh start; the checkpoint's step after a restart

    total = d.total_steps
    every = cfg.distill.checkpoint_every
    while d.global_step < total:
        d.run(until_step=min(total, (d.global_step // every + 1) * every))
        with tempfile.TemporaryDirectory() as tmp:
            # Each rank's device record rides in its checkpoint part: the driver lists them all.
            torch.save({**d.state_dict(), "worker_environment": {"rank": rank, **describe(device)}},
                       os.path.join(tmp, f"rank{rank:04d}.pt"))
            last = d.history[-1] if d.history else {}
            ray.train.report({"step": d.global_step, "loss": last.get("loss/total", 0.0),
                              "classes": len(mine), "opened_shards": len(reader.opened),
                              "bytes_read": cache.bytes_read, "min_bytes": cache.min_bytes,
                              # object storage: what this rank's shard cache downloaded
                              "fetched_bytes": reader.fetched["bytes"], "fetch_requests": reader.fetched["requests"],
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


def packed_root(root) -> str:
    """What workers open: an object-storage URL as it is, a directory as an absolute path."""
    from dream_dist.data import storage

    return str(root) if storage.is_url(root) else str(Path(root).resolve())


def distill_on_ray(cfg, method, num_workers: int, max_failures: int = 0, storage: str | Path | None = None,
                   after_report=None, log_dir: str | Path | None = None, packed: str | Path | None = None,
                   prep=None, data=None, merge: bool = True):
    """Distil cfg's dataset with the sharded `method` on `num_workers` Ray Train workers.

    Joins the running cluster when there is one (RAY_ADDRESS or `ray start` on this node),
    else starts Ray locally.
    max_failures: worker-group restarts from the last checkpoint (Ray's FailureConfig).
    after_report(rank, step): called in each worker after each checkpoint report (fault drills).
    log_dir: rank 0 writes the per-step scalars there (TensorBoard).
    packed / prep / data: what the caller has already (else opened and prepared here).
    Returns (stored images, labels, ray.train.Result) of the method's first set; with
    merge=False, (None, None, result): the caller merges the checkpoint itself (once).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dream_dist.data.prepare import open_data

    if data is None:
        import dataclasses

        if packed is not None:
            cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, packed=str(packed)))
        data = open_data(cfg, method.memory_budget_mb(cfg))
    if prep is None:
        prep = method.prepare(cfg, data, Path(cfg.out_dir))
    ensure_ray()
    storage_fs = None
    if cfg.sync_to:  # out_dir on object storage: checkpoints go there directly, seen by every node
        from dream_dist.data import storage as store

        url = store.join(cfg.sync_to, "ray")
        storage_fs, storage = store.pyarrow_filesystem(url)
        fs, path = store.filesystem(url)
        if fs.exists(f"{path}/{RUN_NAME}") and not cfg.distill.resume:
            print(f"distill.resume=false: a fresh run; replacing the earlier Ray run state in {url}/{RUN_NAME}")
            fs.rm(f"{path}/{RUN_NAME}", recursive=True)
    else:
        storage = Path(storage or Path(cfg.out_dir) / "ray").resolve()
        earlier = storage / RUN_NAME
        if earlier.exists() and not cfg.distill.resume:
            # Ray Train restores from any earlier run under the same storage and name. As in process,
            # a run without distill.resume starts fresh and replaces that state (its sets are files
            # of their own); with distill.resume=true it continues, refused if it does not match.
            print(f"distill.resume=false: a fresh run; replacing the earlier Ray run state in {earlier}")
            shutil.rmtree(earlier)
    use_gpu = cfg.device.startswith("cuda")
    budget = method.memory_budget_mb(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "method": method, "prep": method.remote_prep(cfg, prep),
                           "packed": packed_root(data.root), "after_report": after_report,
                           "budget_mb": budget if budget is not None else cfg.distill.memory_budget_mb,
                           "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
                           "threads_per_worker": cfg.threads or 1},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     # A worker runs cfg.threads torch threads: reserve them.
                                     resources_per_worker={"CPU": cfg.threads or 1}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage), storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if not merge:
        return None, None, result
    sets = merged_sets(result.checkpoint, cfg, method, prep, data)
    return sets[0].images, sets[0].labels, result


def merged_state(checkpoint, method) -> dict:
    """Every rank's part of a Ray checkpoint (a ray.train.Checkpoint or its directory), merged."""
    if isinstance(checkpoint, (str, Path)):
        return _load_merged(str(checkpoint), method.load_checkpoint)
    with checkpoint.as_directory() as ckpt_dir:
        return _load_merged(ckpt_dir, method.load_checkpoint)


def merged_sets(checkpoint, cfg, method, prep, data):
    """The method's sets from a Ray checkpoint (a ray.train.Checkpoint or its directory)."""
    return method.sets_from_state(cfg, prep, merged_state(checkpoint, method), data.mean, data.std)


def run_sharded(cfg, method, prep, data, out: Path, workers: int):
    """The pipeline's Ray path for a sharded method -> (sets, metrics)."""
    start = time.perf_counter()
    _, _, result = distill_on_ray(cfg, method, workers, max_failures=cfg.distill.max_failures,
                                  storage=out / "ray", log_dir=out / "tb" / "distill", prep=prep, data=data,
                                  merge=False)
    state = merged_state(result.checkpoint, method)  # merged once
    sets = method.sets_from_state(cfg, prep, state, data.mean, data.std)
    metrics = {"distill_seconds": time.perf_counter() - start, "startup_seconds": 0.0,
               "steps": result.metrics["step"], "peak_rss_mb_rank0": result.metrics.get("peak_rss_mb"),
               "bytes_read_rank0": result.metrics.get("bytes_read"),
               "min_bytes_rank0": result.metrics.get("min_bytes"),
               "fetched_bytes_rank0": result.metrics.get("fetched_bytes"),
               "fetch_requests_rank0": result.metrics.get("fetch_requests"),
               # rank 0's own time in the steps (distill_seconds above includes Ray's start-up)
               "steps_seconds_rank0": result.metrics.get("distill_seconds"),
               # every rank's host, device and GPU (dream_dist.devices.describe), by rank
               "worker_environments": state.get("worker_environments", [])}
    return sets, metrics
