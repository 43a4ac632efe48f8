"""Evaluation runs as parallel Ray tasks: the run loop's Ray executor.

    from dream_dist.evaluation.protocol import EvalConfig
    from dream_dist.distributed.evaluate import evaluate_on_ray
    cfgs = [EvalConfig.preset("idc", model="convnet"), EvalConfig.preset("idc", model="resnet10")]
    results = evaluate_on_ray(images, labels, test, mean, std, cfgs, factor=2, num_cpus=1)
    print(results["convnet"], results["resnet10"])      # same numbers as evaluate(), seed for seed

Any list of `EvalJob`s (hard-label protocols, KD, cross-architecture tables) runs through
`ray_executor`: one Ray task per (job, run). Each job's runner (its decoded set, test split and
config) goes into the object store once and every task of it reads it from there; run i
trains with seed cfg.seed + i exactly as in process, so the accuracies are the same.

Joins the running cluster when there is one, else starts Ray on this machine (`ensure_ray`).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from dream_dist.data.base import ImageSet
from dream_dist.distributed import ensure_ray
from dream_dist.evaluation.loop import EvalJob, EvalResult, Executor, Outcome, run_jobs
from dream_dist.evaluation.protocol import EvalConfig, _check_args, hard_label_job


def on_task_device(runner):
    """`runner` computing on this Ray task's own device: a runner whose config names cuda:N
    (a GPU of the driver's machine) gets cuda:0, the one GPU the task reserved."""
    from dream_dist.devices import task_device

    cfg = getattr(runner, "cfg", None)
    if cfg is None or not hasattr(cfg, "device"):
        return runner
    device = task_device(cfg.device)
    if device == str(cfg.device):
        return runner
    runner = copy.copy(runner)
    runner.cfg = dataclasses.replace(cfg, device=device)
    return runner


def _run_task(runner, run: int, threads: int, deterministic: bool = True) -> Outcome:
    """One evaluation run inside a Ray worker, on the task's own device."""
    from dream_dist import determinism

    # Ray workers otherwise use torch's default thread count, oversubscribing the node.
    torch.set_num_threads(threads)
    runner = on_task_device(runner)
    determinism.configure(runner.cfg.device if hasattr(runner, "cfg") else "cpu", deterministic)
    return runner(run, None)


def ray_executor(num_cpus: float = 1, num_gpus: float = 0) -> Executor:
    """An executor for `dream_dist.evaluation.loop.run_jobs`: every run a Ray task with these
    resources (Ray schedules as many at once as fit)."""
    if num_cpus <= 0 or num_gpus < 0:
        raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")

    def execute(jobs: list[EvalJob], progress: bool) -> dict[tuple[str, int], Outcome]:
        import ray
        from tqdm.auto import tqdm

        ensure_ray()
        task = ray.remote(_run_task).options(num_cpus=num_cpus, num_gpus=num_gpus)
        threads = max(1, int(num_cpus))
        pending = {}
        for job in jobs:
            ref = ray.put(job.runner)  # once per job; every run's task reads it
            for run in range(job.runs):
                pending[task.remote(ref, run, threads)] = (job.name, run)
        outcomes: dict[tuple[str, int], Outcome] = {}
        bar = tqdm(total=len(pending), desc="eval runs (Ray tasks)", disable=None if progress else True,
                   dynamic_ncols=True)
        try:
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                key = pending[done[0]]
                outcomes[key] = ray.get(done[0])
                bar.update(1)
                bar.set_postfix_str(f"{key[0]} run {key[1]}: {outcomes[key][0]:.2f}%", refresh=False)
        finally:
            bar.close()
        return outcomes

    return execute


def _names(cfgs: list[EvalConfig]) -> list[str]:
    """Result keys: the model name, suffixed where two configs share a model."""
    return [c.model if sum(o.model == c.model for o in cfgs) == 1 else f"{c.model}_{i}" for i, c in enumerate(cfgs)]


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

    images/labels/factor/soft_labels/weights: as in `dream_dist.evaluation.protocol.evaluate`.
    cfgs: one EvalConfig per architecture (or protocol); names: their result keys (default:
        the model names, suffixed with the index where two share a model).
    num_cpus, num_gpus: resources of each task.
    log_dir: <log_dir>/<name>.json per config and TensorBoard runs <log_dir>/tb/<name>/run<i>.
    Returns {name: EvalResult}, the same accuracies as `evaluate` for the same seeds.
    """
    if not cfgs:
        raise ValueError("cfgs is empty: give at least one EvalConfig")
    names = list(names) if names is not None else _names(cfgs)
    if len(names) != len(cfgs) or len(set(names)) != len(names):
        raise ValueError(f"names must be unique, one per config; got {names} for {len(cfgs)} configs")
    _check_args(images, labels, test, factor, soft_labels, weights)
    executor = ray_executor(num_cpus, num_gpus)
    jobs = [hard_label_job(images, labels, test, mean, std, cfg, factor, soft_labels, weights, name, log_dir,
                           dataset, checked=True) for name, cfg in zip(names, cfgs)]
    return run_jobs(jobs, executor, log_dir, progress)
