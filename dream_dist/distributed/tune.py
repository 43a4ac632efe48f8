"""task=tune: Ray Tune sweeps over DREAM+'s knobs, every trial visible in one TensorBoard.

    dream-dist task=tune experiment=tune_digits        # tiny sweep on digits (a few minutes on a CPU)
    dream-dist task=tune dataset=mnist experiment=mnist_cpu tune.num_samples=16 tune.workers_per_trial=2
    tensorboard --logdir outputs/tune/digits/tb        # HParams tab: sampled values against quick accuracy

Searched: the clustering interval τ (`tau`), the cluster count k (`clusters`; the real batch is
then k x samples_per_cluster), `samples_per_cluster`, λ_g / λ_f (`lambda_grad`, `lambda_feat`) and
the image lr (`lr_img`, choices given per IPC). A trial is one distillation with its sampled
values merged into distill.overrides. Every tune.report_every inner steps it measures its
synthetic set with a quick evaluation (distill.quick_eval_epochs epochs, one run) and reports
`quick_acc` to Tune, which ASHA uses to stop the trials that fall behind; the last report is
the quick evaluation of the finished set.

tune.workers_per_trial = 0 runs the trial's class shards inside the trial process; N >= 1 makes
the trial a driver of `dream_dist.distributed.train.distill_on_ray` with N Ray Train workers.

Writes into out_dir: tune_results.csv / tune_results.json (one row per trial), best.yaml (an
experiment file for the best trial: `dream-dist experiment_file=<out_dir>/best.yaml`),
tune_curves.png (quick accuracy against step, per trial), tb/trial_<id>/ (scalars, image grids,
HParams summary per trial) and ray/<tune.name>/ (Tune's own results).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dream_dist.distributed import ensure_ray
from dream_dist.errors import ConfigError

SEARCHABLE = ("tau", "samples_per_cluster", "clusters", "lambda_grad", "lambda_feat")
"""Searched DistillConfig knobs besides lr_img (clusters is k; it sets batch_real = k x samples_per_cluster)."""
INT_PARAMS = ("tau", "samples_per_cluster", "clusters")
METRICS = {"quick_acc": "max"}
"""Reported metrics ASHA and the best-trial choice may use, with their direction."""
TB_METRIC = "eval/quick_acc"
"""The TensorBoard scalar the HParams view shows against the hparams."""


@dataclass
class TuneConfig:
    """A sweep. Each search entry is a list of choices, [loguniform, low, high] (a log-uniform
    range; integers for tau, samples_per_cluster, clusters), or null / [] = not searched (the
    preset's value). Always lists, so a YAML or CLI override can swap choices for a range."""

    num_samples: int = 8
    """Trials sampled from the search space."""
    tau: Any = field(default_factory=lambda: [5, 10, 20])
    """Re-clustering interval τ in inner steps."""
    samples_per_cluster: Any = field(default_factory=lambda: [1, 2])
    """Real samples taken nearest each k-means centre."""
    clusters: Any = None
    """k, clusters per class; the trial's batch_real = k x samples_per_cluster (null: batch_real
    stays the preset's, and samples_per_cluster must divide it)."""
    lambda_grad: Any = field(default_factory=lambda: ["loguniform", 0.1, 10.0])
    """λ_g, weight of the gradient term of bidirectional matching."""
    lambda_feat: Any = field(default_factory=lambda: ["loguniform", 0.1, 10.0])
    """λ_f, weight of the feature term of bidirectional matching."""
    lr_img: dict | None = None
    """Image lr choices per IPC, {ipc: [lr, ...]}; the run's IPC picks its list (absent: not searched)."""
    max_t: int | None = None
    """ASHA's horizon in inner steps (null = the whole schedule, iterations x inner_steps)."""
    grace_period: int | None = None
    """Inner steps before ASHA may stop a trial (null = report_every)."""
    reduction_factor: float = 2.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    metric: str = "quick_acc"
    """What ASHA and the best-trial choice look at: quick_acc (quick-evaluation accuracy, max)."""
    report_every: int = 10
    """Inner steps between quick evaluations reported to Tune (plus one at the end)."""
    cpus_per_trial: float = 1.0
    """CPUs of a trial (in-process: its torch threads; with workers: its driver and quick evals)."""
    gpus_per_trial: float = 0.0
    """GPUs of the trial's own process (in-process: distillation with device=cuda and quick evals
    with eval.device=cuda; with workers: its quick evals, as the workers get 1 GPU each)."""
    workers_per_trial: int = 0
    """0: the class shards run inside the trial; N >= 1: the trial runs distill_on_ray with N
    Ray Train workers of 1 CPU (1 GPU each when device=cuda)."""
    max_concurrent_trials: int = 0
    """Trials running at once (0 = as many as the resources allow)."""
    name: str = "tune"
    """Experiment name of Tune's results under <out_dir>/ray/."""

    def __post_init__(self) -> None:
        from dream_dist.config import ConfigError

        for name in SEARCHABLE:
            setattr(self, name, _check_space(name, getattr(self, name), name in INT_PARAMS))
        lr = {}
        for ipc, values in dict(self.lr_img or {}).items():
            try:
                ipc = int(ipc)
            except (TypeError, ValueError):
                raise ConfigError(f"tune.lr_img: keys are IPC values (ints), got {ipc!r}") from None
            if not isinstance(values, (list, tuple)) or not values or \
                    not all(isinstance(v, (int, float)) and v > 0 for v in values):
                raise ConfigError(f"tune.lr_img.{ipc}: expected a non-empty list of positive lrs, got {values!r}")
            lr[ipc] = [float(v) for v in values]
        self.lr_img = lr
        for name in ("num_samples", "report_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_t", "grace_period"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"tune.{name} must be a positive integer or null, got {v!r}")
        if self.max_t is not None and self.grace_period is not None and self.grace_period > self.max_t:
            raise ConfigError(f"tune.grace_period ({self.grace_period}) must be <= tune.max_t ({self.max_t})")
        if not self.reduction_factor > 1:
            raise ConfigError(f"tune.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.metric not in METRICS:
            raise ConfigError(f"tune.metric: unknown {self.metric!r}; known: {', '.join(METRICS)}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("tune.cpus_per_trial must be > 0 and tune.gpus_per_trial >= 0")
        if self.workers_per_trial < 0 or self.max_concurrent_trials < 0:
            raise ConfigError("tune.workers_per_trial and tune.max_concurrent_trials must be >= 0")
        if not self.name or "/" in self.name:
            raise ConfigError(f"tune.name must be a plain directory name, got {self.name!r}")


def _check_space(name: str, spec: Any, integer: bool) -> Any:
    """Normalise one search entry: None, a list of choices, or [loguniform, low, high]."""
    from dream_dist.config import ConfigError

    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        return None
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"tune.{name}: expected a list of choices, [loguniform, low, high] or null, got {spec!r}")
    if spec[0] == "loguniform":
        lo_hi = list(spec[1:])
        if not (len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi) and 0 < lo_hi[0] < lo_hi[1]):
            raise ConfigError(f"tune.{name}: a range is [loguniform, low, high] with 0 < low < high, got {list(spec)!r}")
        if integer and not all(float(v).is_integer() for v in lo_hi):
            raise ConfigError(f"tune.{name}: the bounds of an integer knob must be integers, got {list(spec)!r}")
        return ["loguniform", *(int(v) if integer else float(v) for v in lo_hi)]
    kind = int if integer else (int, float)
    if not all(isinstance(v, kind) and not isinstance(v, bool) and v >= (1 if integer else 0) for v in spec):
        want = "positive integers" if integer else "numbers >= 0"
        raise ConfigError(f"tune.{name}: choices must be {want} (or [loguniform, low, high]), got {list(spec)!r}")
    return [int(v) if integer else float(v) for v in spec]


# ---------------------------------------------------------------------------- search space


def search_space(tcfg: TuneConfig, ipc: int) -> tuple[dict, dict, dict]:
    """(Tune param_space, the values to validate per knob, the searched specs by name)."""
    from ray import tune

    space, extremes = {}, {}
    specs = {n: getattr(tcfg, n) for n in SEARCHABLE}
    if ipc in tcfg.lr_img:
        specs["lr_img"] = tcfg.lr_img[ipc]
    for name, spec in specs.items():
        if spec is None:
            continue
        if spec[0] != "loguniform":
            space[name] = tune.choice(spec)
            extremes[name] = spec
        else:
            lo, hi = spec[1:]
            # lograndint's upper bound is exclusive; +1 makes [lo, hi] inclusive as documented.
            space[name] = tune.lograndint(lo, hi + 1) if name in INT_PARAMS else tune.loguniform(lo, hi)
            extremes[name] = [lo, hi]
    return space, extremes, {n: s for n, s in specs.items() if s is not None}


def trial_overrides(overrides: dict, sampled: dict, samples_per_cluster: int) -> dict:
    """distill.overrides of a trial: the base run's, with the sampled values merged in.
    `samples_per_cluster` is the base's value, used when the trial does not sample it."""
    out = dict(overrides)
    for k in ("tau", "samples_per_cluster", "lambda_grad", "lambda_feat", "lr_img"):
        if k in sampled:
            out[k] = _plain(sampled[k])
    if "clusters" in sampled:
        out["batch_real"] = int(sampled["clusters"]) * int(out.get("samples_per_cluster", samples_per_cluster))
    return out


def _plain(v: Any) -> Any:
    """numpy scalars (what Tune samples) as Python numbers, for YAML, JSON and TensorBoard."""
    return v.item() if hasattr(v, "item") else v


def check_combinations(cfg, method, extremes: dict, counts: list[int], samples_per_cluster: int) -> None:
    """Every combination of the choices (and range ends) must give a valid config for this
    dataset: a bad combination fails here, before any trial starts."""
    names = list(extremes)
    for combo in itertools.product(*(extremes[n] for n in names)):
        sampled = dict(zip(names, combo))
        try:
            method.check_overrides(cfg, trial_overrides(cfg.distill.overrides, sampled, samples_per_cluster), counts)
        except ValueError as e:
            raise ConfigError(f"tune: the sampled values {sampled} make an invalid run: {e}") from None


# ---------------------------------------------------------------------------- one trial


def trial_config(base, overrides: dict, out_dir: Path, report_every: int):
    """The RunConfig of a trial: the base run with the trial's overrides, checkpoints at reports."""
    distill = dataclasses.replace(base.distill, overrides=overrides, resume=False, checkpoint_every=report_every,
                                  quick_eval_every=0, snapshot_steps=[])
    return dataclasses.replace(base, distill=distill, out_dir=str(out_dir), progress=False)


def _hp_summary(**plugin_data):
    """A Summary holding HParams plugin data (experiment / session_start_info / session_end_info),
    built from tensorboard's TensorFlow-free protos."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (field_name, message), = plugin_data.items()
    tag = {"experiment": metadata.EXPERIMENT_TAG, "session_start_info": metadata.SESSION_START_INFO_TAG,
           "session_end_info": metadata.SESSION_END_INFO_TAG}[field_name]
    smd = metadata.create_summary_metadata(HParamsPluginData(**{field_name: message}))
    return Summary(value=[Summary.Value(tag=tag, metadata=smd, tensor=metadata.NULL_TENSOR)])


def hparams_experiment(specs: dict, description: str):
    """The HParams experiment for the log root: every searched knob with its domain (the
    choices, or the range's interval) and the metric, the quick accuracy."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    infos = []
    for name, spec in specs.items():
        info = api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64)
        if spec[0] == "loguniform":
            info.domain_interval.CopyFrom(api_pb2.Interval(min_value=spec[1], max_value=spec[2]))
        else:
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(number_value=v)
                                                                       for v in spec]))
        infos.append(info)
    metric = api_pb2.MetricInfo(name=api_pb2.MetricName(tag=TB_METRIC), display_name="quick accuracy %")
    return _hp_summary(experiment=api_pb2.Experiment(description=description, time_created_secs=time.time(),
                                                     hparam_infos=infos, metric_infos=[metric]))


def session_start(hparams: dict):
    """A trial's HParams session: its sampled values (the metric comes from its eval/quick_acc)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

    info = SessionStartInfo(start_time_secs=time.time())
    for k, v in hparams.items():
        info.hparams[k].number_value = float(_plain(v))
    return _hp_summary(session_start_info=info)


def session_end():
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

    return _hp_summary(session_end_info=SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()))


class _ReportHook:
    """distill_on_ray's after_report hook: once every rank has persisted a checkpoint, rank 0
    hands its path to the trial driver and waits until the driver has evaluated and reported it
    (so ASHA sees the quick accuracy before the workers move on)."""

    def __init__(self, ready, ack):
        self.ready, self.ack = ready, ack

    def __call__(self, rank: int, step: int) -> None:
        import ray.train
        import torch.distributed as dist

        dist.barrier()  # every rank's part of this checkpoint is uploaded
        if rank == 0:
            self.ready.put((step, ray.train.get_checkpoint().path))
            self.ack.get()


def distill_trial(config: dict, base, method, tcfg: TuneConfig, out: str, total: int, spc: int) -> None:
    """A Tune function trainable: one distillation, quick accuracy reported every report_every steps."""
    import torch
    from ray import tune

    from dream_dist.artifact import save_distilled
    from dream_dist.data.prepare import open_data
    from dream_dist.evaluation.tensorboard import TensorBoardLogger, quick_eval

    trial_id = tune.get_context().get_trial_id()
    out = Path(out)
    trial_dir = out / "trials" / trial_id
    cfg = trial_config(base, trial_overrides(base.distill.overrides, config, spc), trial_dir, tcfg.report_every)
    if tcfg.gpus_per_trial:
        # The trial's reserved GPU is its only visible one (cuda:0), whatever cuda:N the driver named.
        from dream_dist.devices import task_device

        cfg = dataclasses.replace(
            cfg, device=cfg.device if tcfg.workers_per_trial else task_device(cfg.device),
            eval=dataclasses.replace(cfg.eval, device=task_device(cfg.eval.device)))
    torch.set_num_threads(max(1, int(tcfg.cpus_per_trial)))
    data = open_data(cfg, method.memory_budget_mb(cfg))
    p = method.prepare(cfg, data, trial_dir)
    tb = TensorBoardLogger(out / "tb" / f"trial_{trial_id}", data.mean, data.std, cfg.distill.grid_every, p.dcfg.ipc)
    # This run is one HParams session: its sampled values; its eval/quick_acc is the metric.
    writer = tb.writer._get_file_writer()
    writer.add_summary(session_start(config))

    def report(step: int, images: torch.Tensor, labels: torch.Tensor, factor: int, ipc: int) -> None:
        acc = quick_eval(cfg.eval, cfg.distill.quick_eval_epochs, data.test(), data.mean, data.std, images, labels,
                         factor, cfg.dataset.kind)
        tb.scalars(step, {TB_METRIC: acc})
        tb.grid(step, images)
        if step >= total:
            # Written before the last report: Tune may end the trial's process right after it.
            save_distilled(trial_dir / "distilled.pt", images, labels, factor, data.names, data.mean, data.std,
                           config={"overrides": cfg.distill.overrides}, metrics={"quick_acc": acc})
            writer.add_summary(session_end())
        tb.writer.flush()  # ASHA may stop the trial at this report: nothing may stay buffered
        tune.report({"quick_acc": acc, "step": step})

    if tcfg.workers_per_trial == 0:
        d = method.stepper(cfg, p, data.classes, data.cache, data.counts_all, cfg.device, log=tb.scalars)
        d.initialize()
        while d.global_step < total:
            d.run(until_step=min(total, (d.global_step // tcfg.report_every + 1) * tcfg.report_every))
            report(d.global_step, *d.synthetic(), d.cfg.factor, d.cfg.ipc)
    else:
        _trial_on_workers(cfg, method, p, data, tcfg, trial_dir, out / "tb" / f"trial_{trial_id}", report)
    tb.close()


def _trial_on_workers(cfg, method, p, data, tcfg: TuneConfig, trial_dir: Path, tb_dir: Path, report) -> None:
    """The trial as a driver: distill_on_ray in a thread, each checkpoint quick-evaluated here."""
    import queue

    from ray.util.queue import Queue

    from dream_dist.distributed.train import distill_on_ray, merged_sets

    ready, ack = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    failure: list[Exception] = []

    def fit() -> None:
        try:
            distill_on_ray(cfg, method, tcfg.workers_per_trial, storage=trial_dir / "ray",
                           after_report=_ReportHook(ready, ack), log_dir=tb_dir, prep=p, data=data)
        except Exception as e:  # noqa: BLE001 -- any failure is re-raised in the trial's main thread
            failure.append(e)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    while True:
        try:
            step, path = ready.get(timeout=1.0)
        except queue.Empty:
            if not thread.is_alive():
                break
            continue
        s = merged_sets(path, cfg, method, p, data)[0]
        report(step, s.images, s.labels, s.factor, s.ipc)
        ack.put(True)  # after the report: a trial ASHA stops ends here, its workers with it
    thread.join()
    if failure:
        raise failure[0]


# ---------------------------------------------------------------------------- the sweep


def resources(tcfg: TuneConfig):
    """The trial's placement group. Ray Train (V2, Ray >= 2.43) reserves the placement group of
    its own workers, so a trial with workers reserves only its driver bundle here; the workers'
    1-CPU bundles are counted by `concurrency` instead (reserving them here too would hold every
    worker CPU twice, and a small cluster would never start the workers)."""
    from ray import tune

    bundle = {"CPU": tcfg.cpus_per_trial}
    if tcfg.gpus_per_trial:
        bundle["GPU"] = tcfg.gpus_per_trial
    return tune.PlacementGroupFactory([bundle])


def trial_demand(tcfg: TuneConfig, device: str = "cpu", threads: int | None = None) -> dict[str, float]:
    """Everything one trial holds at once: its own bundle (driver and quick evaluations) plus,
    with workers, its Ray Train workers (threads CPUs each, and one GPU each when device=cuda)."""
    from dream_dist.devices import task_resources

    worker = task_resources(device, threads)
    n = tcfg.workers_per_trial
    return {"CPU": tcfg.cpus_per_trial + n * worker["num_cpus"],
            "GPU": tcfg.gpus_per_trial + n * worker["num_gpus"]}


def concurrency(tcfg: TuneConfig, device: str = "cpu", threads: int | None = None,
                cluster: dict | None = None) -> int | None:
    """max_concurrent_trials for Tune: the configured one, or (trials with workers) as many as the
    cluster's CPUs AND GPUs hold driver + workers for, since Tune sees only the driver bundle.
    cluster: the cluster's resources (default ray.cluster_resources())."""
    if tcfg.max_concurrent_trials:
        return tcfg.max_concurrent_trials
    if tcfg.workers_per_trial == 0:
        return None
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    need = trial_demand(tcfg, device, threads)
    fits = [cluster.get(r, 0) // amount for r, amount in need.items() if amount > 0]
    return max(1, int(min(fits)))


def check_trial_devices(cfg) -> None:
    """A trial's own process computes on a GPU when it distils in process with device=cuda or
    quick-evaluates with eval.device=cuda: it must then reserve one (tune.gpus_per_trial)."""
    tcfg = cfg.tune
    uses = []
    if cfg.device.startswith("cuda") and not tcfg.workers_per_trial:
        uses.append(f"distils in the trial with device={cfg.device}")
    if str(cfg.eval.device).startswith("cuda"):
        uses.append(f"quick-evaluates with eval.device={cfg.eval.device}")
    if uses and not tcfg.gpus_per_trial:
        raise ConfigError(f"tune.gpus_per_trial must be > 0: a trial {' and '.join(uses)} (it would get no GPU)")


def run_tune(cfg, method) -> dict:
    """Run the sweep of cfg.tune over cfg's distillation with the sharded `method` (the pipeline
    hands it in); write the table, best.yaml and plots."""
    import ray  # noqa: F401  (fail early when Ray is missing)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from dream_dist.data.prepare import ensure_packed, open_data

    tcfg = cfg.tune
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_trial_devices(cfg)
    # Pack once here: trials run in other processes (and other working directories), so they
    # get absolute paths and never pack concurrently.
    packed = ensure_packed(cfg).resolve()
    base = dataclasses.replace(cfg, out_dir=str(out), progress=False,
                               dataset=dataclasses.replace(cfg.dataset, packed=str(packed)))
    data = open_data(base, method.memory_budget_mb(base))
    p = method.prepare(base, data, out)  # the base run is valid for this dataset, before any compute
    total = p.dcfg.iterations * p.dcfg.inner_steps
    max_t = tcfg.max_t or total
    if max_t > total:
        raise ConfigError(f"tune.max_t ({max_t}) exceeds the schedule's {total} inner steps")
    grace = tcfg.grace_period or min(tcfg.report_every, max_t)
    if grace > max_t:
        raise ConfigError(f"tune.grace_period ({grace}) must be <= max_t ({max_t})")
    space, extremes, specs = search_space(tcfg, p.dcfg.ipc)
    if not space:
        raise ConfigError("tune: nothing to search (every search entry is null)")
    check_combinations(base, method, extremes, [data.counts_all[c] for c in data.classes], p.dcfg.samples_per_cluster)
    if "lr_img" not in space and tcfg.lr_img:
        print(f"tune: no lr_img choices for IPC {p.dcfg.ipc} (given for {sorted(tcfg.lr_img)}); lr_img not searched")

    # The log root holds the HParams experiment once; each trial's run is one of its sessions.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as root:
        root._get_file_writer().add_summary(hparams_experiment(
            specs, f"{cfg.distill.method} on {cfg.dataset.name}: {tcfg.num_samples} trials, quick accuracy "
                   f"({cfg.distill.quick_eval_epochs} epochs) every {tcfg.report_every} of {total} inner steps"))

    ensure_ray()
    trainable = tune.with_resources(
        tune.with_parameters(distill_trial, base=base, method=method, tcfg=tcfg, out=str(out), total=total,
                             spc=p.dcfg.samples_per_cluster),
        resources(tcfg))
    mode = METRICS[tcfg.metric]
    scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace,
                              reduction_factor=tcfg.reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=tcfg.metric, mode=mode, scheduler=scheduler,
                                    num_samples=tcfg.num_samples, max_concurrent_trials=concurrency(tcfg, cfg.device, cfg.threads),
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed)),
        run_config=tune.RunConfig(name=tcfg.name, storage_path=str(out / "ray"), verbose=1),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    rows, curves = collect(grid, total, list(space), out)
    if not any(r["status"] == "ok" for r in rows):
        raise RuntimeError(f"every trial failed; first error: {grid.errors[0] if grid.errors else 'unknown'}")
    best = pick_best(rows, tcfg.metric, mode)
    best_overrides = trial_overrides(cfg.distill.overrides, best["hparams"], p.dcfg.samples_per_cluster)
    command = f"dream-dist experiment_file={out / 'best.yaml'}"
    write_best_yaml(out / "best.yaml", cfg, best, best_overrides, total, command)
    summary = {"metric": tcfg.metric, "mode": mode, "total_steps": total, "seconds": time.perf_counter() - start,
               "scheduler": {"name": "ASHA", "time_attr": "step", "max_t": max_t, "grace_period": grace,
                             "reduction_factor": tcfg.reduction_factor},
               "tune": dataclasses.asdict(tcfg), "best": {**best, "overrides": best_overrides},
               "best_yaml": str(out / "best.yaml"), "command": command, "trials": rows}
    write_table(out, rows, list(space))
    (out / "tune_results.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_curves(curves, best["trial_id"], {r["trial_id"] for r in rows if r["stopped_early"]},
                out / "tune_curves.png", tcfg.metric)
    print_trials(rows, list(space), f"{cfg.dataset.name}: {cfg.distill.method} sweep, {len(rows)} trials, "
                                    f"ASHA on {tcfg.metric} every {tcfg.report_every} of {total} inner steps")
    print(f"best: trial {best['trial_id']} ({tcfg.metric} {best['metric']:.2f} at step {best['step']})\n"
          f"run it:      {command}\n"
          f"table:       {out / 'tune_results.csv'}   curves: {out / 'tune_curves.png'}\n"
          f"TensorBoard: tensorboard --logdir {out / 'tb'}   (HParams tab: the sweep)")
    return summary


def collect(grid, total: int, names: list[str], out: Path) -> tuple[list[dict], dict]:
    """One row per trial (hparams, last step, last metric, stopped early, seconds, its curve of
    [step, quick_acc] reports) and the curves by trial id."""
    rows, curves = [], {}
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        df = res.metrics_dataframe
        if df is not None and "step" in df and "quick_acc" in df:
            curves[trial_id] = (df["step"].tolist(), df["quick_acc"].tolist())
        step = int(m.get("step", 0))
        rows.append({"trial_id": trial_id,
                     "hparams": {k: _plain(res.config[k]) for k in names if k in res.config},
                     "step": step, "metric": float(m.get("quick_acc", math.nan)),
                     "finished": step >= total and res.error is None,
                     "stopped_early": res.error is None and step < total,
                     "status": "error" if res.error is not None else "ok",
                     "seconds": float(m.get("time_total_s", 0.0)),
                     "tb": str(out / "tb" / f"trial_{trial_id}"),
                     "curve": [[int(st), float(v)] for st, v in zip(*curves.get(trial_id, ([], [])))]})
    rows.sort(key=lambda r: r["trial_id"])
    return rows, curves


def pick_best(rows: list[dict], metric: str, mode: str) -> dict:
    """The best trial by its last reported metric, among those that ran the whole schedule (a
    trial ASHA stopped was measured earlier, on a less distilled set); all trials if none did."""
    pool = [r for r in rows if r["finished"]] or [r for r in rows if r["status"] == "ok"]
    sign = 1 if mode == "max" else -1
    return max(pool, key=lambda r: sign * r["metric"])


def write_best_yaml(path: Path, cfg, best: dict, overrides: dict, total: int, command: str) -> None:
    """An experiment file that re-runs the best trial as a full distill run (exact config)."""
    import yaml

    body = {"task": "distill", "seed": cfg.seed,
            "dataset": dataclasses.asdict(cfg.dataset), "pack": {"out": str(Path(cfg.pack.out).resolve())},
            "eval": dataclasses.asdict(cfg.eval),
            "distill": {**dataclasses.asdict(cfg.distill), "overrides": overrides}}
    hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["hparams"].items())
    head = (f"# @package _global_\n"
            f"# Best trial {best['trial_id']} of the Ray Tune sweep in {path.parent}:\n"
            f"#   {hp}\n"
            f"#   quick accuracy {best['metric']:.2f} % after {best['step']} of {total} inner steps.\n"
            f"# Run it (a distill run with exactly this config; CLI overrides still apply):\n"
            f"#   {command}\n")
    path.write_text(head + yaml.safe_dump(json.loads(json.dumps(body)), sort_keys=False))


def write_table(out: Path, rows: list[dict], names: list[str]) -> None:
    with open(out / "tune_results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *names, "step", "quick_acc", "finished", "stopped_early", "status", "seconds"])
        for r in rows:
            w.writerow([r["trial_id"], *(r["hparams"].get(n, "") for n in names), r["step"], f"{r['metric']:.4f}",
                        r["finished"], r["stopped_early"], r["status"], f"{r['seconds']:.1f}"])


def plot_curves(curves: dict, best_id: str, stopped: set, path: Path, metric: str) -> None:
    """Quick accuracy against inner step, one line per trial (dashed: stopped by ASHA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, (steps, accs) in sorted(curves.items()):
        best = trial_id == best_id
        tag = " (best)" if best else " (stopped)" if trial_id in stopped else ""
        ax.plot(steps, accs, marker="o", lw=2.5 if best else 1.2, ls="--" if trial_id in stopped else "-",
                label=f"{trial_id}{tag}")
    ax.set_xlabel("inner step")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Ray Tune sweep: quick accuracy per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_trials(rows: list[dict], names: list[str], title: str) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    print(f"\n{title}")
    print(f"{'trial':<13}" + "".join(f"{n[:12]:>13}" for n in names) + f"{'acc %':>8}{'step':>6}  stopped")
    for r in rows:
        stop = "error" if r["status"] == "error" else ("yes" if r["stopped_early"] else "no")
        print(f"{r['trial_id']:<13}" + "".join(f"{fmt(r['hparams'].get(n, '-')):>13}" for n in names)
              + f"{r['metric']:>8.2f}{r['step']:>6}  {stop}")
    print()
