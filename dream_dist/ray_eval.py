"""Evaluation runs as parallel Ray tasks (DESIGN.md §4: runs are independent, so run them at once).

    from dream_dist.evaluate import EvalConfig
    from dream_dist.ray_eval import evaluate_on_ray
    cfgs = [EvalConfig.preset("idc", model="convnet"), EvalConfig.preset("idc", model="resnet10")]
    results = evaluate_on_ray(images, labels, test, mean, std, cfgs, factor=2, num_cpus=1)
    print(results["convnet"], results["resnet10"])      # same numbers as evaluate(), seed for seed

One Ray task per (architecture, run). Run i of a config trains with seed cfg.seed + i exactly as
`dream_dist.evaluate.evaluate` does (both call `evaluate_run`), so the accuracies are the same
as the sequential evaluation's, only sooner. The (decoded) training set and the test set go
into the object store once and every task reads them from there.

Joins the running cluster when there is one, else starts Ray on this machine (`ensure_ray`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from dream_dist.data.base import ImageSet
from dream_dist.distributed import ensure_ray
from dream_dist.evaluate import EvalConfig, EvalResult, _check_set, decode_set, evaluate_run


def _run_task(images, targets, weights, test, mean, std, cfg: EvalConfig, run: int, threads: int,
              log_dir: str | None) -> tuple[float, list[float], list]:
    """One evaluation run inside a Ray worker."""
    # Ray workers otherwise use torch's default thread count, oversubscribing the node.
    torch.set_num_threads(threads)
    curve: list = []
    acc, losses = evaluate_run(images, targets, test, mean, std, cfg, run=run, weights=weights,
                               log_dir=log_dir, curve=curve)
    return acc, losses, curve


def _names(cfgs: list[EvalConfig]) -> list[str]:
    """Result keys: the model name, suffixed where two configs share a model."""
    names = []
    for i, c in enumerate(cfgs):
        base = c.model if sum(o.model == c.model for o in cfgs) == 1 else f"{c.model}_{i}"
        names.append(base)
    return names


def evaluate_on_ray(
    images: Tensor,
    labels: Tensor,
    test: ImageSet,
    mean,
    std,
    cfgs: list[EvalConfig],
    factor: int = 1,
    soft_labels: Tensor | None = None,
    weights: Tensor | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    log_dir: str | Path | None = None,
    names: list[str] | None = None,
    progress: bool = True,
    dataset: str | None = None,
) -> dict[str, EvalResult]:
    """Evaluate a distilled set under each EvalConfig, one Ray task per (config, run).

    images/labels/factor/soft_labels/weights: as in `dream_dist.evaluate.evaluate`.
    cfgs: one EvalConfig per architecture (or protocol); names: their result keys (default:
        the model names, suffixed with the index where two share a model).
    num_cpus, num_gpus: resources of each task (Ray schedules as many at once as fit).
    log_dir: <log_dir>/<name>.json per config and TensorBoard runs <log_dir>/tb/<name>/run<i>,
        the layout `evaluate` writes.
    Returns {name: EvalResult}, the same accuracies as `evaluate` for the same seeds.
    """
    import ray
    from tqdm.auto import tqdm

    if not cfgs:
        raise ValueError("cfgs is empty: give at least one EvalConfig")
    names = list(names) if names is not None else _names(cfgs)
    if len(names) != len(cfgs) or len(set(names)) != len(names):
        raise ValueError(f"names must be unique, one per config; got {names} for {len(cfgs)} configs")
    _check_set(images, labels, test)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if num_cpus <= 0 or num_gpus < 0:
        raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
    n = images.shape[0]
    if soft_labels is not None and soft_labels.shape != (n, test.num_classes):
        raise ValueError(f"soft_labels must be ({n}, {test.num_classes}), got {tuple(soft_labels.shape)}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")

    cfgs = [c.resolved(dataset, factor) for c in cfgs]
    ensure_ray()
    train_x, targets, w = decode_set(images, labels, factor, soft_labels, weights)
    # Into the object store once; every task gets a reference, not its own copy.
    refs = [ray.put(v) for v in (train_x, targets, w, test, list(mean), list(std))]
    task = ray.remote(_run_task).options(num_cpus=num_cpus, num_gpus=num_gpus)
    threads = max(1, int(num_cpus))
    start = time.perf_counter()
    pending = {}
    for name, cfg in zip(names, cfgs):
        for run in range(cfg.runs):
            tb = str(Path(log_dir).resolve() / "tb" / name / f"run{run}") if log_dir is not None else None
            pending[task.remote(*refs, cfg, run, threads, tb)] = (name, run)
    outcome: dict[tuple[str, int], tuple[float, list[float]]] = {}
    bar = tqdm(total=len(pending), desc="eval runs (Ray tasks)", disable=None if progress else True,
               dynamic_ncols=True)
    try:
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            key = pending[done[0]]
            outcome[key] = ray.get(done[0])
            bar.update(1)
            bar.set_postfix_str(f"{key[0]} run {key[1]}: {outcome[key][0]:.2f}%", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    results = {}
    for name, cfg in zip(names, cfgs):
        accs = [outcome[(name, r)][0] for r in range(cfg.runs)]
        losses = [outcome[(name, r)][1][-1] for r in range(cfg.runs)]
        curves = [outcome[(name, r)][2] for r in range(cfg.runs)]
        res = EvalResult.from_runs(accs, seconds, {**dataclasses.asdict(cfg), "factor": factor, "dataset": dataset},
                                   soft_labels is not None, train_x.shape[0], losses, curves)
        results[name] = res
        if log_dir is not None:
            path = Path(log_dir) / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": name, **res.to_dict()}, indent=2))
    return results
