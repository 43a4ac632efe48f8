"""Class-independent methods on Ray: groups of classes as Ray tasks.

    parts, workers = map_classes(method, cfg, prep, data, workers=4)
    # parts: {class: the method's part}; workers: each task's host, device and GPU

RDED, DDOQ and the coresets treat every class on its own, so the classes are split into
`workers` groups of near-equal image counts and each group is one Ray task that reads only
its classes' packed shards and calls the method's `distill_group`. Every random draw of those
methods is keyed by (seed, class), so the parts equal the in-process ones. The task's
resources follow `threads` (CPUs) and the device (one GPU exactly when cfg.device is CUDA,
dream_dist.devices); the task computes on that GPU (its models are moved there) and reports it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from dream_dist.distributed import ensure_ray


def _group_task(method, cfg, prep, root: str, classes: list[int], threads: int) -> tuple[dict[int, Any], dict]:
    """One Ray task: the method on its classes, read from the shards, on the task's own device."""
    import torch

    from dream_dist import determinism
    from dream_dist.data.prepare import reader_for
    from dream_dist.devices import describe, task_device

    torch.set_num_threads(threads)
    device = task_device(cfg.device)  # cuda:N on the driver is this task's one GPU, cuda:0
    determinism.configure(device, cfg.deterministic)
    if device != cfg.device:
        cfg = dataclasses.replace(cfg, device=device)
    prep = method.prep_to(prep, device)
    reader = reader_for(cfg, root, "train")
    return method.distill_group(cfg, prep, classes, reader.load_class, False), describe(device)


def map_classes(method, cfg, prep, data, workers: int) -> tuple[dict[int, Any], list[dict]]:
    """The method's parts of every class of `data`, from min(workers, classes) Ray tasks, and
    each task's device record (dream_dist.devices.describe), in group order."""
    import ray
    from tqdm.auto import tqdm

    from dream_dist.data.prepare import balance_classes
    from dream_dist.devices import task_resources

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ensure_ray()
    groups = balance_classes(data.counts_all, min(workers, len(data.classes)), data.classes)
    threads = cfg.threads or 1
    task = ray.remote(_group_task).options(**task_resources(cfg.device, threads))
    prep_ref = ray.put(method.remote_prep(cfg, prep))  # once; every task reads it
    refs = [task.remote(method, cfg, prep_ref, str(data.root), g, threads) for g in groups]
    parts: dict[int, Any] = {}
    envs: dict[Any, dict] = {}
    with tqdm(total=len(refs), desc=f"{method.task} class groups (Ray tasks)",
              disable=None if cfg.progress else True) as bar:
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            got, envs[done[0]] = ray.get(done[0])
            parts.update(got)
            bar.update(1)
    return parts, [envs[r] for r in refs]
