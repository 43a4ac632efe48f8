"""The one pipeline every method's task runs through.

    open data -> method.prepare -> run the method (in process, or on Ray with workers > 0)
      -> save each set (distilled.pt + PNG grid) -> evaluate the sets and the baseline
      -> table + results.json (+ TensorBoard, written by the evaluations and the method)

    from dream_dist.pipeline import run_method
    summary = run_method(cfg, METHODS["rded"])

What differs between methods lives behind `dream_dist.methods.base.Method`; where the work
runs is the Ray package's business (`dream_dist.distributed`), chosen here by `workers`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from dream_dist.data.prepare import open_data


def print_table(rows: list[dict], title: str, timing: str = "") -> None:
    """The accuracy table. Wall times go on a line of their own after it, so the table itself
    is the same on every run of the same command on the same machine."""
    w = max([12] + [len(str(r["method"])) + 2 for r in rows])
    print(f"\n{title}")
    print(f"{'method':<{w}}{'IPC':>5}  {'accuracy %':>16}  {'published':>9}")
    for r in rows:
        pub = f"{r['published']:.1f}" if r.get("published") is not None else "-"
        acc = f"{r['mean']:.2f} ± {r['std']:.2f}"
        print(f"{r['method']:<{w}}{r['ipc']:>5}  {acc:>16}  {pub:>9}")
    times = ", ".join(f"{r['method']} {r['seconds']:.0f} s" for r in rows if r.get("seconds") is not None)
    print(f"time: {timing + '; ' if timing else ''}evaluation {times}\n")


def is_subset(cfg, data) -> str:
    """A marker for the title when the data is a subset of the dataset the published numbers
    belong to (the 100-per-class TinyImageNet subset): no published figure is shown then."""
    if cfg.dataset.kind == "tinyimagenet" and min(data.counts_all[c] for c in data.classes) < 500:
        return " [subset: fewer than TinyImageNet's 500 images per class; published numbers not comparable]"
    return ""


def pack_mapper(cfg):
    """Where an image-file source's classes are packed: Ray tasks with pack.workers > 0."""
    if not cfg.pack.workers:
        return None
    from dream_dist.distributed.tasks import ray_mapper

    return ray_mapper(cfg.pack.workers)


def eval_executor(cfg, workers: int, device: str = "cpu"):
    """Where the evaluation runs go: Ray tasks when the method ran on Ray, else this process."""
    if not workers:
        return None
    from dream_dist.distributed.evaluate import ray_executor

    from dream_dist.devices import task_resources

    return ray_executor(**task_resources(device, cfg.threads))


def run_method(cfg, method) -> dict:
    """Run `method` on cfg's dataset end to end; returns the summary written to results.json."""
    from dream_dist.artifact import save_distilled
    from dream_dist.environment import environment
    from dream_dist.evaluation.loop import run_jobs
    from dream_dist.published import published

    out = Path(cfg.out_dir)
    data = open_data(cfg, method.memory_budget_mb(cfg), pack_mapper(cfg))
    prep = method.prepare(cfg, data, out)  # before any compute: a bad config or dataset fails here
    workers = method.workers(cfg)
    start = time.perf_counter()
    worker_envs = None  # each Ray worker's host, device and GPU (run_sharded's come in its metrics)
    if method.sharded:
        if workers:
            from dream_dist.distributed.train import run_sharded

            sets, metrics = run_sharded(cfg, method, prep, data, out, workers)
        else:
            sets, metrics = method.run_in_process(cfg, prep, data, out)
    else:
        if workers:
            from dream_dist.distributed.fanout import map_classes

            parts, worker_envs = map_classes(method, cfg, prep, data, workers)
        else:
            parts = method.distill_group(cfg, prep, data.classes, data.class_images, cfg.progress)
        sets, metrics = method.assemble(cfg, prep, data, parts, out)
    metrics = {"distill_seconds": time.perf_counter() - start, **metrics, "workers": workers,
               # the driver's; with workers, worker_environments holds each worker's device and GPU
               "environment": environment(cfg.device)}
    if worker_envs is not None:
        metrics["worker_environments"] = worker_envs

    paths = []
    for s in sets:
        if s.save_as is not None:
            paths.append(save_distilled(out / s.save_as, s.images, s.labels, s.factor, data.names, data.mean,
                                        data.std, config={"run": dataclasses.asdict(cfg), **s.config},
                                        metrics=metrics, soft_labels=s.soft_labels, weights=s.weights))

    evaluator = method.evaluator(cfg, prep, data)
    base = method.baseline(cfg, prep, data)
    evaluated = sets + ([base] if base is not None else [])
    executor = eval_executor(cfg, workers, getattr(evaluator.cfg, "device", "cpu"))
    results = run_jobs([evaluator.job(s, log_dir=out) for s in evaluated], executor, out, cfg.progress)
    subset = is_subset(cfg, data)
    rows = [{"method": s.label, "ipc": s.ipc, **results[s.name].to_dict(),
             "published": published(cfg.dataset.kind, s.published, s.ipc) if s.published and not subset else None}
            for s in evaluated]
    where = f"{workers} Ray workers" if workers else "in-process"
    print_table(rows, f"{method.title(cfg, prep, data, metrics)}{subset} ({where}); {evaluator.title()}",
                timing=method.timing(metrics))
    summary = {"dataset": cfg.dataset.name, **method.summary(cfg, prep), "metrics": metrics, "rows": rows,
               "environment": metrics["environment"]}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    sets_line = ", ".join(f"{p} (grid {p.with_suffix('.png').name})" for p in paths)
    print(f"distilled set{'s' if len(paths) > 1 else ''}: {sets_line}\n"
          f"TensorBoard:   tensorboard --logdir {out / 'tb'}\nresults:       {out / 'results.json'}")
    return summary


def _source_protocol(cfg, loaded, data):
    """The evaluation the producing run used, from a distilled.pt's recorded config; None when
    the set does not record one."""
    from dream_dist.config import build
    from dream_dist.evaluation.kd import KDConfig
    from dream_dist.evaluation.protocol import EvalConfig

    run = (loaded.source or {}).get("config", {}).get("run")
    if not run:
        return None
    if run.get("dataset", {}).get("name") not in (None, cfg.dataset.name):
        from dream_dist.errors import ConfigError

        raise ConfigError(f"evaluate.set: the set was made from dataset {run['dataset']['name']!r}, not "
                          f"{cfg.dataset.name!r}: pass dataset={run['dataset']['name']}")
    if run.get("task") == "rded":
        return "kd", build(KDConfig, run["kd"], "kd.")
    return "hard", build(EvalConfig, run["eval"], "eval.")


def named_protocol(cfg):
    """evaluate.protocol=dc|dsa|dm|idc: the published protocol exactly (epochs, batch,
    augmentation, schedule), with the run's eval.runs, seed and device."""
    from dream_dist.evaluation.protocol import EvalConfig

    return EvalConfig.preset(cfg.evaluate.protocol, runs=cfg.eval.runs, seed=cfg.eval.seed, device=cfg.eval.device)


def evaluate_set(cfg) -> dict:
    """task=evaluate: a distilled set from any source (dream_dist.evaluation.sources) under its
    producing run's protocol or a named one, on every architecture of evaluate.models."""
    from dream_dist.errors import ConfigError
    from dream_dist.evaluation.loop import run_jobs
    from dream_dist.evaluation.protocol import HardLabelProtocol
    from dream_dist.evaluation.sources import load_set

    e = cfg.evaluate
    if e.set is None:
        raise ConfigError("evaluate.set: give the set to evaluate (a distilled.pt, an ImageFolder or WebDataset "
                          "directory, or a .pt of image and label tensors)")
    out = Path(cfg.out_dir)
    data = open_data(cfg, mapper=pack_mapper(cfg))
    loaded = load_set(e.set, e.kind, data.mean, data.std, data.names, e.factor, e.normalized, data.channels,
                 data.image_size)
    s = loaded.set
    found = _source_protocol(cfg, loaded, data) if e.protocol is None else None
    if e.protocol == "kd" or (found and found[0] == "kd"):
        from dream_dist.evaluation.kd import KDProtocol
        from dream_dist.evaluation.observer import get_observer

        kcfg = found[1] if found else cfg.kd
        ocfg = cfg.observer
        obs_path = ((loaded.source or {}).get("metrics", {}).get("observer") or {}).get("path")
        if ocfg.path is None and obs_path:
            ocfg = dataclasses.replace(ocfg, path=obs_path)  # the observer the producing run saved
        device = cfg.device
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # A CPU driver of GPU eval tasks (evaluate.workers > 0): it only holds the observer,
            # which each task moves to its own GPU; training one here would be GPU work.
            if ocfg.path is None:
                raise ConfigError(f"device: {device!r}: the KD observer would be trained on this driver, which "
                                  f"has no CUDA; give observer.path (task=train_observer on a GPU machine)")
            device = "cpu"
        observer, _ = get_observer(ocfg, data.train_stream() if ocfg.path is None else data.meta(), data.mean, data.std,
                                   seed=cfg.seed, save_to=out / "observer.pt", progress=cfg.progress,
                                   device=device)
        protocols = {m: KDProtocol(dataclasses.replace(kcfg, model=m, width=None if m != kcfg.model else kcfg.width,
                                                       norm=None if m != kcfg.model else kcfg.norm),
                                   observer, data.test(), data.mean, data.std) for m in e.models}
        described = "the producing run's KD" if found else "kd"
    else:
        if found:
            ecfg, described = found[1], "the producing run's"
        elif e.protocol is not None:
            ecfg, described = named_protocol(cfg), e.protocol
        else:
            ecfg, described = cfg.eval, "eval"
        protocols = {m: HardLabelProtocol(ecfg if m == ecfg.model else dataclasses.replace(ecfg, model=m, width=None,
                                                                                            norm=None),
                                          data.test(), data.mean, data.std, cfg.dataset.kind) for m in e.models}
    names = {m: f"{s.name}_{m}" for m in e.models}
    jobs = [protocols[m].job(s, name=names[m], log_dir=out) for m in e.models]
    executor = eval_executor(cfg, e.workers, getattr(next(iter(protocols.values())).cfg, "device", "cpu"))
    results = run_jobs(jobs, executor, out, cfg.progress)
    rows = [{"method": m, "ipc": s.ipc, **results[names[m]].to_dict(), "published": None} for m in e.models]
    first = protocols[e.models[0]]
    print_table(rows, f"{cfg.dataset.name}: {s.label} ({loaded.kind}, {len(s.labels)} stored images, factor {s.factor}); "
                      f"{described} protocol: {first.title()}")
    summary = {"dataset": cfg.dataset.name, "set": str(e.set), "kind": loaded.kind, "factor": s.factor,
               "protocol": described, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"results:       {out / 'results.json'}\nTensorBoard:   tensorboard --logdir {out / 'tb'}")
    return summary
