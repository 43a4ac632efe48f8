"""Class-independent methods on Ray: groups of classes as Ray tasks.

    parts = map_classes(method, cfg, prep, data, workers=4)   # {class: the method's part}

RDED, DDOQ and the coresets treat every class on its own, so the classes are split into
`workers` groups of near-equal image counts and each group is one Ray task that reads only
its classes' packed shards and calls the method's `distill_group`. Every random draw of those
methods is keyed by (seed, class), so the parts equal the in-process ones. The task's
resources follow `threads` (CPUs) and the device (a GPU when cfg.device is CUDA).
"""
from __future__ import annotations

from typing import Any

from dream_dist.distributed import ensure_ray


def _group_task(method, cfg, prep, root: str, classes: list[int], threads: int) -> dict[int, Any]:
    """One Ray task: the method on its classes, read from the shards."""
    import torch

    from dream_dist.data.shards import PackedReader

    torch.set_num_threads(threads)
    reader = PackedReader(root, "train", on_corrupt=cfg.dataset.on_corrupt)
    return method.distill_group(cfg, prep, classes, reader.load_class, False)


def map_classes(method, cfg, prep, data, workers: int) -> dict[int, Any]:
    """The method's parts of every class of `data`, from min(workers, classes) Ray tasks."""
    import ray
    from tqdm.auto import tqdm

    from dream_dist.data.prepare import balance_classes

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ensure_ray()
    groups = balance_classes(data.counts_all, min(workers, len(data.classes)), data.classes)
    threads = cfg.threads or 1
    gpus = 1 if str(cfg.device).startswith("cuda") else 0
    task = ray.remote(_group_task).options(num_cpus=threads, num_gpus=gpus)
    prep_ref = ray.put(method.remote_prep(cfg, prep))  # once; every task reads it
    refs = [task.remote(method, cfg, prep_ref, str(data.root), g, threads) for g in groups]
    parts: dict[int, Any] = {}
    with tqdm(total=len(refs), desc=f"{method.task} class groups (Ray tasks)",
              disable=None if cfg.progress else True) as bar:
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            parts.update(ray.get(done[0]))
            bar.update(1)
    return parts
