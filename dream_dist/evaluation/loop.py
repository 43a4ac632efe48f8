"""The one evaluation run loop: jobs of independent runs in, `EvalResult`s out.

Every evaluation (the hard-label protocols, KD, the cross-architecture table of
task=evaluate, and their Ray fan-out) is a list of `EvalJob`s. A job is one set under one
protocol and architecture; its `runner(run, progress)` trains and tests run `run` (a fresh
network, seed cfg.seed + run) and returns (last-epoch accuracy %, per-epoch losses, curve).
Runs are independent, so an executor may run them anywhere: in this process one after the
other (the default), or as Ray tasks (`dream_dist.distributed.evaluate.ray_executor`). The
results are the same either way, seed for seed; only the wall time differs.

Layout written under log_dir, whoever ran the runs: <log_dir>/<name>.json per job and
TensorBoard runs <log_dir>/tb/<name>/run<i> (written by the runner).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    """Accuracy of networks trained on a distilled set (last epoch of each run)."""

    mean: float
    """Mean test accuracy (%) over the runs."""
    std: float
    """SAMPLE standard deviation (ddof=1) over the runs; 0.0 for a single run."""
    accs: list[float]
    """Last-epoch test accuracy (%) of each run, in run order."""
    seconds: float
    """Wall time of all runs (train + test)."""
    config: dict
    """The EvalConfig as a dict, plus `factor`."""
    soft_labels: bool
    """Trained with soft labels: not comparable with hard-label results."""
    num_images: int = 0
    """Training images per run after multi-formation decoding (stored images x factor²)."""
    final_losses: list[float] = field(default_factory=list)
    """Last-epoch training loss of each run."""
    curves: list[list] = field(default_factory=list)
    """Per run, (epoch, test accuracy) every config curve_every epochs and at the end: a
    diagnostic of the training, not a model selection."""

    @classmethod
    def from_runs(cls, accs: list[float], seconds: float, config: dict, soft_labels: bool,
                  num_images: int = 0, final_losses: list[float] | None = None,
                  curves: list[list] | None = None) -> "EvalResult":
        a = np.asarray(accs, dtype=np.float64)
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        return cls(float(a.mean()), std, [float(v) for v in accs], seconds, config, soft_labels,
                   num_images, list(final_losses or []), [list(map(list, c)) for c in (curves or [])])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        tags = f"{len(self.accs)} run{'s' if len(self.accs) != 1 else ''}, last epoch"
        if self.soft_labels:
            tags += ", soft labels"
        return f"{self.mean:.2f} ± {self.std:.2f} ({tags})"


Outcome = tuple[float, list[float], list]
"""(last-epoch test accuracy %, per-epoch training losses, [(epoch, test accuracy) ...])."""


class Runner(Protocol):
    def __call__(self, run: int, progress: Any = None) -> Outcome: ...


@dataclass
class EvalJob:
    """One set under one protocol/architecture: `runs` independent runs of `runner`."""

    name: str
    """Result key, JSON file stem and TensorBoard directory."""
    runs: int
    runner: Runner
    """Picklable (a Ray task receives it through the object store)."""
    config: dict
    """The protocol's settings as recorded in the result."""
    soft_labels: bool
    num_images: int
    """Training images per run after decoding."""
    epochs: int
    """Per run, for the progress bar."""


Executor = Callable[[list[EvalJob], bool], dict[tuple[str, int], Outcome]]
"""Runs every (job, run) somewhere -> {(job name, run): outcome}."""


def run_in_process(jobs: list[EvalJob], progress: bool = True) -> dict[tuple[str, int], Outcome]:
    """The default executor: the runs one after the other, one bar over all their epochs."""
    outcomes = {}
    bar = tqdm(total=sum(j.runs * j.epochs for j in jobs), desc=jobs[0].name if jobs else "eval",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for job in jobs:
            for run in range(job.runs):
                bar.set_description(f"{job.name} run {run}")
                outcomes[(job.name, run)] = job.runner(run, bar)
                bar.set_description(f"{job.name} run {run}: {outcomes[(job.name, run)][0]:.2f}%")
    finally:
        bar.close()
    return outcomes


def run_jobs(jobs: list[EvalJob], executor: Executor | None = None, log_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, EvalResult]:
    """Run every job's runs with `executor` (None = in this process); {name: EvalResult}, each
    also written to <log_dir>/<name>.json. `seconds` is a job's own wall time in process, the
    whole batch's under a parallel executor (its runs overlap with other jobs')."""
    names = [j.name for j in jobs]
    if not jobs:
        raise ValueError("no evaluation jobs: give at least one")
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation names must be unique, got {names}")
    results: dict[str, EvalResult] = {}
    if executor is None:
        outcomes, seconds = {}, {}
        for job in jobs:
            start = time.perf_counter()
            outcomes.update(run_in_process([job], progress))
            seconds[job.name] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        outcomes = executor(jobs, progress)
        seconds = dict.fromkeys(names, time.perf_counter() - start)
    for job in jobs:
        accs = [outcomes[(job.name, r)][0] for r in range(job.runs)]
        losses = [outcomes[(job.name, r)][1][-1] for r in range(job.runs)]
        curves = [outcomes[(job.name, r)][2] for r in range(job.runs)]
        res = EvalResult.from_runs(accs, seconds[job.name], job.config, job.soft_labels, job.num_images,
                                   losses, curves)
        results[job.name] = res
        if log_dir is not None:
            path = Path(log_dir) / f"{job.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": job.name, **res.to_dict()}, indent=2))
    return results


def tb_dir(log_dir: str | Path | None, name: str, run: int) -> str | None:
    """The TensorBoard directory of one run (absolute: a Ray task may run elsewhere)."""
    return None if log_dir is None else str(Path(log_dir).resolve() / "tb" / name / f"run{run}")
