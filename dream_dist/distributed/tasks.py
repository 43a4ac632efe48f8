"""A plain function over many inputs as Ray tasks, results as they finish.

    mapper = ray_mapper(workers=4)
    for key, result in mapper(fn, {key: args, ...}):   # at most 4 tasks running at once
        ...

What the data layer's parallel pack takes (`dream_dist.data.stream.pack_files(mapper=...)`),
so the data layer stays free of Ray. Joins the running cluster, else starts Ray here.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from dream_dist.distributed import ensure_ray


def ray_mapper(workers: int, num_cpus: float = 1) -> Callable[[Callable, dict], Iterator[tuple[Any, Any]]]:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def mapper(fn: Callable, items: dict) -> Iterator[tuple[Any, Any]]:
        import ray

        ensure_ray()
        task = ray.remote(num_cpus=num_cpus)(fn)
        pending, running = list(items), {}
        while pending or running:
            while pending and len(running) < workers:
                key = pending.pop(0)
                running[task.remote(*items[key])] = key
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                yield running.pop(ref), ray.get(ref)

    return mapper
