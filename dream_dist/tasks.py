"""The run as a whole: its typed config (every section), the task table, and composing a
config from conf/ with Hydra overrides.

    from dream_dist.tasks import compose, run, main
    cfg = compose(["dataset=mnist", "experiment=mnist_cpu"])     # a validated RunConfig
    summary = run(cfg)                                            # what results.json holds
    summary = main(["task=rded", "experiment=rded_digits"])       # both in one call

The methods' tasks go through the one pipeline (dream_dist.pipeline.run_method); pack,
train_observer, evaluate and tune are the other tasks. dream_dist.run is the command line
on top of this module.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dream_dist import determinism
from dream_dist.config import ConfigError, DataConfig, PackConfig, build
from dream_dist.distributed.tune import TuneConfig
from dream_dist.evaluation.kd import KDConfig
from dream_dist.evaluation.observer import ObserverConfig
from dream_dist.evaluation.protocol import EvalConfig
from dream_dist.evaluation.sources import EvaluateConfig
from dream_dist.methods import METHODS
from dream_dist.methods.coreset import CoresetConfig
from dream_dist.methods.ddoq import DDOQConfig
from dream_dist.methods.dream.config import DistillRunConfig
from dream_dist.methods.rded import RDEDConfig


@dataclass
class RunConfig:
    task: str = "distill"
    """What to run: distill, coreset, rded, ddoq (methods), pack, train_observer, evaluate, tune."""
    seed: int = 0
    """Seed of everything random in the run."""
    out_dir: str | None = None
    """Run directory (results JSON, TensorBoard logs in tb/, images); None = outputs/<task>/<dataset.name>."""
    device: str = "cpu"
    """torch device for the compute (cpu, cuda, cuda:1 ...)."""
    threads: int | None = None
    """torch intra-op threads (None = torch's default)."""
    deterministic: bool = True
    """Deterministic CUDA kernels (no TF32, cuDNN/cuBLAS determinism); ignored on CPU."""
    progress: bool = True
    """Show progress bars."""
    sync_to: str | None = None
    """Object storage (s3://...) the run directory is uploaded to when the task ends, and where
    Ray Train checkpoints go directly. Set by itself from `out_dir=s3://...` (the run then
    writes in a local staging directory); set it by hand to keep a local out_dir and a copy."""
    dataset: DataConfig = field(default_factory=DataConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillRunConfig = field(default_factory=DistillRunConfig)
    ddoq: DDOQConfig = field(default_factory=DDOQConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    rded: RDEDConfig = field(default_factory=RDEDConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """task=evaluate: which distilled set, which protocol and architectures."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """task=tune: the Ray Tune sweep (search space, ASHA, resources per trial)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task: unknown {self.task!r}; known: {', '.join(TASKS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1")
        self._check_driver_devices()
        if self.out_dir is None:
            self.out_dir = f"outputs/{self.task}/{self.dataset.name}"
        if self.pack.out is None:
            self.pack.out = f"outputs/packed/{self.dataset.name}"

    def _check_driver_devices(self) -> None:
        """Compute on an absent GPU is an error, not a silent CPU fallback, wherever it runs on
        this process (the driver). What runs on Ray workers is exempt (a CPU head node may drive
        GPU workers), and only that: a method's driver-side models (RDED's observer, DDOQ's
        autoencoder, the coreset feature net) and an in-process evaluation are not."""
        if not any(str(d).startswith("cuda") for d in (self.device, self.eval.device, self.kd.device)):
            return
        if torch.cuda.is_available():
            return
        method = METHODS.get(self.task)
        workers = method.workers(self) if method is not None else 0
        if self.task == "tune":  # trials are Ray actors with their own resources (tune.gpus_per_trial)
            return
        # Evaluation runs as Ray tasks when the method ran on Ray, and for task=evaluate with workers.
        eval_on_ray = workers > 0 or (self.task == "evaluate" and self.evaluate.workers > 0)
        where = (f"{self.task}.workers={workers}: " if workers else "")
        for key, device, remote in (("device", self.device, workers > 0 or eval_on_ray),
                                    ("eval.device", self.eval.device, eval_on_ray),
                                    ("kd.device", self.kd.device, eval_on_ray)):
            if not str(device).startswith("cuda"):
                continue
            if not remote:
                raise ConfigError(f"{key}: {device!r} requested but CUDA is not available here "
                                  f"(torch {torch.__version__}); use {key}=cpu or a CUDA machine")
            if key == "device" and method is not None and method.driver_models(self):
                raise ConfigError(f"device: {device!r} with {where}{', '.join(method.driver_models(self))} "
                                  f"runs on this driver, which has no CUDA; run the driver on a GPU node "
                                  f"or use device=cpu")




# ---------------------------------------------------------------------------- tasks


def run_pack(cfg) -> dict:
    """task=pack: the class-grouped shards of cfg.dataset, packed or found up to date."""
    from dream_dist.data.prepare import ensure_packed
    from dream_dist.pipeline import pack_mapper

    from dream_dist.data import storage
    from dream_dist.data.shards import index_path

    out = ensure_packed(cfg, pack_mapper(cfg))
    info = {s: json.loads(storage.read_text(str(index_path(out, s)))) for s in ("train", "test")}
    for s, idx in info.items():
        print(f"{s}: {sum(idx['counts'])} images, {idx['num_classes']} classes, "
              f"{sum(len(v) for v in idx['shards'].values())} shards -> {index_path(out, s)}")
    return {"packed": str(out)}


def run_train_observer(cfg) -> dict:
    """task=train_observer: train (or load and check) the observer, save it, report accuracy."""
    import dataclasses

    from dream_dist.data.prepare import open_data
    from dream_dist.evaluation.observer import get_observer
    from dream_dist.evaluation.protocol import test_accuracy

    out = Path(cfg.out_dir)
    data = open_data(cfg)
    net, info = get_observer(cfg.observer, data.train_stream() if cfg.observer.path is None else data.meta(), data.mean,
                             data.std, seed=cfg.seed, save_to=out / "observer.pt", progress=cfg.progress,
                             device=cfg.device)
    info["test_acc"] = test_accuracy(net, data.test(), data.mean, data.std)
    summary = {"dataset": cfg.dataset.name, "observer": dataclasses.asdict(cfg.observer), **info}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"observer {cfg.observer.model}: {info['test_acc']:.2f}% test accuracy "
          f"({info['seconds']:.0f} s) -> {info.get('path', cfg.observer.path)}")
    return summary


def run_evaluate(cfg) -> dict:
    from dream_dist.pipeline import evaluate_set

    return evaluate_set(cfg)


def run_tune(cfg) -> dict:
    from dream_dist.distributed.tune import run_tune as tune

    return tune(cfg, METHODS["distill"])


def _method_task(name: str):
    def task(cfg) -> dict:
        from dream_dist.pipeline import run_method

        return run_method(cfg, METHODS[name])

    task.__name__ = f"run_{name}"
    return task


TASKS = {**{name: _method_task(name) for name in METHODS}, "pack": run_pack, "train_observer": run_train_observer,
         "evaluate": run_evaluate, "tune": run_tune}


def run(cfg) -> dict:
    """Run one validated RunConfig: threads and seed set, out_dir made, the task's summary returned."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    determinism.configure(cfg.device, cfg.deterministic)
    torch.manual_seed(cfg.seed)
    cfg = remote_outputs(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = TASKS[cfg.task](cfg)
    finally:
        if cfg.sync_to:  # what the run wrote, also when it failed part-way: nothing is lost
            from dream_dist.data import storage

            n = storage.upload_tree(cfg.out_dir, cfg.sync_to)
            print(f"[{cfg.task}] {n} file(s) of {cfg.out_dir} uploaded to {cfg.sync_to}")
    print(f"[{cfg.task}] done in {time.perf_counter() - start:.0f} s")
    return result


def remote_outputs(cfg):
    """out_dir=s3://...: the run writes in a local staging directory, uploaded to that URL at
    the end (sync_to); its bucket is checked now, before any work."""
    import dataclasses

    from dream_dist.data import storage

    if storage.is_url(cfg.out_dir):
        from dream_dist.data.prepare import staging_dir

        url = cfg.out_dir.rstrip("/")
        cfg = dataclasses.replace(cfg, out_dir=str(staging_dir(url) / "run"), sync_to=url)
    if cfg.sync_to:
        if not storage.is_url(cfg.sync_to):
            raise ConfigError(f"sync_to: {cfg.sync_to!r} is not an object-storage URL (s3://bucket/prefix)")
        storage.check_bucket(cfg.sync_to)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Programmatic entry: compose the overrides in `argv`, validate, run, return the task's
    summary. Errors are raised (DreamDistError for a user's mistake); dream_dist.run.cli is the
    command."""
    return run(compose(sys.argv[1:] if argv is None else argv))


# ---------------------------------------------------------------------------- composing


def conf_dir() -> Path:
    """The configs shipped inside the package (dream_dist/conf; in a checkout, a link to the
    repository's conf/), wherever the command runs from: `ray submit` copies run.py alone."""
    here = Path(__file__).parent / "conf"
    if (here / "config.yaml").exists():
        return here
    import importlib.resources

    return Path(str(importlib.resources.files("dream_dist.conf")))


def local_dir(path: str) -> str:
    """The `local_dir` resolver of conf/config.yaml (hydra.run.dir): a local path as it is, an
    object-storage out_dir as the local staging directory the run writes in before the upload."""
    from dream_dist.data import storage

    if storage.is_url(path):
        from dream_dist.data.prepare import staging_dir

        return str(staging_dir(str(path).rstrip("/")) / "run")
    return path


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("local_dir"):
        OmegaConf.register_new_resolver("local_dir", local_dir)


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with `overrides` into a validated RunConfig.

    `experiment_file=PATH` uses the experiment YAML at PATH (e.g. a sweep's best.yaml) in place
    of conf/experiment/<name>.yaml; the other overrides still apply on top of it.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    overrides = _argv_overrides(list(overrides or []))
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return build(RunConfig, OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def _code_keys(tree, where: str = "") -> str | None:
    """The first key of `tree` that makes Hydra run code: `hydra` at the top, `_target_` anywhere."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{where}.{k}" if where else str(k)
            if (not where and k == "hydra") or k in ("_target_", "_partial_", "_args_"):
                return key
            found = _code_keys(v, key)
            if found:
                return found
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found = _code_keys(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _experiment_file(overrides: list[str]) -> list[str]:
    """Turn `experiment_file=PATH` into `experiment=<PATH registered in Hydra's ConfigStore>`."""
    files = [o for o in overrides if o.startswith("experiment_file=")]
    if not files:
        return overrides
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if len(files) > 1 or any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        raise ConfigError("experiment_file: give one experiment_file=PATH and no experiment=NAME")
    path = Path(files[0].split("=", 1)[1]).expanduser()
    if not path.is_file():
        raise ConfigError(f"experiment_file: no such file {str(path)!r}")
    node = OmegaConf.load(path)
    # An experiment sets dream_dist's keys only: a `hydra:` block (callbacks) or a `_target_`
    # would make Hydra import and call what the file names, and the file may come from a
    # shared sweep directory.
    found = _code_keys(OmegaConf.to_container(node, resolve=False))
    if found:
        raise ConfigError(f"experiment_file: {path} sets {found}: an experiment file may not name code "
                          f"(hydra settings or _target_)")
    # A ConfigStore entry is an option of the experiment group like the files in conf/experiment,
    # so Hydra merges it at the same place (its own `defaults:` list included).
    ConfigStore.instance().store(group="experiment", name="_experiment_file", node=node, package="_global_")
    return [o if o not in files else "experiment=_experiment_file" for o in overrides]


def _argv_overrides(argv: list[str]) -> list[str]:
    """Rewrite what plain Hydra would refuse or cannot express:
    - `distill.overrides.KEY=V` -> `++distill.overrides.KEY=V` (an open dict: no `+` needed);
    - `experiment_file=PATH` -> an experiment registered in Hydra's ConfigStore (see compose)."""
    out = []
    for a in argv:
        if a.startswith("distill.overrides.") and "=" in a:
            a = "++" + a
        out.append(a)
    return _experiment_file(out)
