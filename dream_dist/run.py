"""dream_dist's one entry point: Hydra overrides in, a task run out.

    python -m dream_dist.run                       # default: DREAM+ on the embedded digits
    dream-dist dataset=mnist experiment=mnist_cpu  # DREAM+ on MNIST with the CPU schedule
    dream-dist task=pack dataset=mnist             # class-grouped WebDataset shards
    dream-dist experiment=coreset dataset=fashion_mnist coreset.ipc=1 eval=protocol
    python dream_dist/run.py ...                   # as a plain script (ray submit / job submit)

The config is composed from conf/ (the repository's, or the copy installed inside the
package), turned into typed dataclasses and validated before any compute starts.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch


def conf_dir() -> Path:
    """conf/ of the checkout when run from one, else the copy installed as dream_dist.conf."""
    here = Path(__file__).resolve().parent
    repo_conf = here.parent / "conf"
    if (repo_conf / "config.yaml").exists():
        return repo_conf
    import importlib.resources

    return Path(str(importlib.resources.files("dream_dist.conf")))


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with `overrides` into a validated RunConfig.

    `experiment_file=PATH` uses the experiment YAML at PATH (e.g. a sweep's best.yaml) in place
    of conf/experiment/<name>.yaml; the other overrides still apply on top of it.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from dream_dist.config import RunConfig, build

    overrides = _argv_overrides(list(overrides or []))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return build(RunConfig, OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def _experiment_file(overrides: list[str]) -> list[str]:
    """Turn `experiment_file=PATH` into `experiment=<PATH registered in Hydra's ConfigStore>`."""
    files = [o for o in overrides if o.startswith("experiment_file=")]
    if not files:
        return overrides
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from dream_dist.config import ConfigError

    if len(files) > 1 or any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        raise ConfigError("experiment_file: give one experiment_file=PATH and no experiment=NAME")
    path = Path(files[0].split("=", 1)[1]).expanduser()
    if not path.is_file():
        raise ConfigError(f"experiment_file: no such file {str(path)!r}")
    # A ConfigStore entry is an option of the experiment group like the files in conf/experiment,
    # so Hydra merges it at the same place (its own `defaults:` list included).
    ConfigStore.instance().store(group="experiment", name="_experiment_file", node=OmegaConf.load(path),
                                 package="_global_")
    return [o if o not in files else "experiment=_experiment_file" for o in overrides]


# ---------------------------------------------------------------------------- tasks


def source_fingerprint(name: str, root: str | None) -> str | None:
    """A cheap identity of a file-based source: its files' paths, sizes and mtimes (no pixel
    read). None for sources without a directory (digits), which are checksummed instead."""
    import hashlib

    from dream_dist.data import default_root

    path = Path(root) if root is not None else default_root(name)
    if path is None or not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{name}:{h.hexdigest()}"


def ensure_packed(cfg) -> Path:
    """Packed shards of cfg.dataset: the given `dataset.packed`, or packed now into pack.out.

    A packed copy is reused when its index records the same source: the same file
    fingerprint (paths, sizes, mtimes: no image is read, which matters for big datasets), or
    else the same pixel checksum."""
    from dream_dist.data import load_dataset
    from dream_dist.data.shards import checksum, index_path, pack
    from dream_dist.data.stream import FILE_SOURCES

    if cfg.dataset.packed is not None:
        return Path(cfg.dataset.packed)
    if cfg.dataset.name in FILE_SOURCES:
        return _ensure_packed_files(cfg)
    out = Path(cfg.pack.out)
    fp = source_fingerprint(cfg.dataset.name, cfg.dataset.root)
    idx = {s: index_path(out, s) for s in ("train", "test")}
    if fp is not None and all(p.exists() and json.loads(p.read_text()).get("source_fingerprint") == fp
                              for p in idx.values()):
        return out
    # Image-file sources can leave out undecodable files (dataset.on_corrupt=skip).
    opts = {"on_corrupt": cfg.dataset.on_corrupt} if cfg.dataset.name in ("imagefolder", "tinyimagenet") else {}
    train = load_dataset(cfg.dataset.name, "train", root=cfg.dataset.root, **opts)
    test = load_dataset(cfg.dataset.name, "test", root=cfg.dataset.root, **opts)
    stats = train.mean_std()
    for split, data in (("train", train), ("test", test)):
        p = idx[split]
        if not (p.exists() and json.loads(p.read_text()).get("source_checksum") == checksum(data)):
            pack(data, out, split, source=cfg.dataset.name, encoding=cfg.pack.encoding,
                 max_per_shard=cfg.pack.max_per_shard, mean_std=stats, progress=cfg.progress)
        if fp is not None:
            index = json.loads(p.read_text())
            index["source_fingerprint"] = fp
            tmp = p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(index, indent=2))
            tmp.replace(p)  # atomic: a reader never sees half an index
    return out


def _ensure_packed_files(cfg) -> Path:
    """Image-file sources: streamed class by class (bounded memory, resumable, optionally on
    Ray tasks); a split is reused when its index records the same files and resize."""
    from dream_dist.config import ConfigError
    from dream_dist.data import default_root
    from dream_dist.data.shards import index_path
    from dream_dist.data.stream import FILE_SOURCES, pack_files

    name, p = cfg.dataset.name, cfg.pack
    root = cfg.dataset.root if cfg.dataset.root is not None else default_root(name)
    if root is None:
        raise ConfigError(f"dataset.root: dataset {name!r} needs dataset.root=<directory>")
    out = Path(p.out)
    want = {"size": p.size, "mode": p.resize if p.size is not None else None}
    mean_std = None
    for split in ("train", "test"):
        src = FILE_SOURCES[name](root, split)
        idx = index_path(out, split)
        index = json.loads(idx.read_text()) if idx.exists() else {}
        if not (index.get("source_fingerprint") == src.fingerprint() and index.get("resize") == want
                and index.get("encoding") == p.encoding):
            index = pack_files(src, out, split, size=p.size, resize=p.resize, encoding=p.encoding,
                               max_per_shard=p.max_per_shard, mean_std=mean_std, workers=p.workers,
                               progress=cfg.progress, on_corrupt=cfg.dataset.on_corrupt)
        mean_std = (index["mean"], index["std"])  # the test split records the train statistics
    return out


def run_pack(cfg) -> dict:
    out = ensure_packed(cfg)
    info = {s: json.loads((out / f"index-{s}.json").read_text()) for s in ("train", "test")}
    for s, idx in info.items():
        print(f"{s}: {sum(idx['counts'])} images, {idx['num_classes']} classes, "
              f"{sum(len(v) for v in idx['shards'].values())} shards -> {out}/index-{s}.json")
    return {"packed": str(out)}


def load_packed_splits(cfg):
    """(train, test, mean, std) read from the packed shards."""
    from dream_dist.data.shards import PackedReader

    root = ensure_packed(cfg)
    train_r = PackedReader(root, "train", on_corrupt=cfg.dataset.on_corrupt)
    test_r = PackedReader(root, "test", on_corrupt=cfg.dataset.on_corrupt)
    train = train_r.load_classes(cfg.dataset.classes)
    test = test_r.load_classes(cfg.dataset.classes)
    mean, std = train_r.mean_std
    return train, test, mean, std


def run_coreset(cfg) -> dict:
    """Random / herding / k-center coresets, each measured with the evaluation protocol."""
    from dream_dist.coreset import build_coreset, extract_features, train_feature_net
    from dream_dist.data import normalize
    from dream_dist.evaluate import evaluate
    from dream_dist.published import published
    from dream_dist.viz import save_grid

    out = Path(cfg.out_dir)
    train, test, mean, std = load_packed_splits(cfg)
    features = None
    if any(m != "random" for m in cfg.coreset.methods):
        net = train_feature_net(
            train, mean, std, model=cfg.coreset.feature_model, width=cfg.coreset.feature_width,
            epochs=cfg.coreset.feature_epochs, max_images=cfg.coreset.feature_max_images,
            seed=cfg.seed, progress=cfg.progress, device=cfg.device,
        )
        features = extract_features(net, train.images, mean, std)
    rows = []
    for method in cfg.coreset.methods:
        core = build_coreset(method, train, cfg.coreset.ipc, seed=cfg.seed, features=features)
        save_grid(core.images, out / f"{method}_ipc{cfg.coreset.ipc}.png", nrow=cfg.coreset.ipc)
        res = evaluate(normalize(core.images, mean, std), core.labels, test, mean, std, cfg.eval,
                       log_dir=out, name=f"{method}_ipc{cfg.coreset.ipc}", progress=cfg.progress,
                       dataset=cfg.dataset.name)
        rows.append({"method": method, "ipc": cfg.coreset.ipc, **res.to_dict(),
                     "published": published(cfg.dataset.name, method, cfg.coreset.ipc)})
    print_table(rows, f"{cfg.dataset.name}: coresets, {cfg.eval.model}, "
                      f"{cfg.eval.resolved(cfg.dataset.name).epochs} epochs x {cfg.eval.runs} runs (last epoch)")
    summary = {"dataset": cfg.dataset.name, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out / 'results.json'}   grids: {out}/*.png   TensorBoard: tensorboard --logdir {out / 'tb'}")
    return summary


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


def run_distill(cfg) -> dict:
    from dream_dist.distill.task import run_distill as distill

    return distill(cfg)


def run_ddoq(cfg) -> dict:
    from dream_dist.ddoq import run_ddoq as ddoq

    return ddoq(cfg)


def run_train_observer(cfg) -> dict:
    from dream_dist.rded import run_train_observer as train_observer

    return train_observer(cfg)


def run_rded(cfg) -> dict:
    from dream_dist.rded import run_rded as rded

    return rded(cfg)


def run_tune(cfg) -> dict:
    from dream_dist.tune import run_tune as tune

    return tune(cfg)


TASKS = {"distill": run_distill, "coreset": run_coreset, "pack": run_pack, "ddoq": run_ddoq,
         "train_observer": run_train_observer, "rded": run_rded, "tune": run_tune}


def run(cfg) -> dict:
    """Run one validated RunConfig: threads and seed set, out_dir made, the task's summary returned."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = TASKS[cfg.task](cfg)
    print(f"[{cfg.task}] done in {time.perf_counter() - start:.0f} s")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Programmatic entry: compose the overrides in `argv`, validate, run, return the task's
    summary. Errors are raised (DreamDistError for a user's mistake); `cli` is the command."""
    return run(compose(sys.argv[1:] if argv is None else argv))


# ---------------------------------------------------------------------------- command line
#
# `dream-dist` is Hydra's own command line (hydra.main): --help, --cfg job|hydra|all,
# -m/--multirun over comma-separated values, hydra.run.dir / hydra.sweep.dir, --info,
# shell completion. Before Hydra starts, every job of the (multi)run is composed and
# validated, so a bad value fails at once in one line, even in the last job of a sweep.

HYDRA_FLAGS_WITHOUT_RUN = ("help", "hydra_help", "version", "cfg", "info", "shell_completion")


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _fail(err: BaseException) -> None:
    """One line on stderr and exit status 2, for a mistake the user can fix."""
    from dream_dist.errors import one_line

    msg = one_line(err)
    override = getattr(err, "override", None)  # Hydra's override-syntax errors carry it
    if isinstance(override, str) and override not in msg:
        msg = f"{override}: {msg}"
    # Hydra appends its search path to a missing-option message: not the user's business.
    msg = msg.split(" Config search path:")[0]
    unknown = re.match(r"Could not override '([^']+)'", msg)
    if unknown:
        msg = f"{unknown.group(1)}: unknown key (dream-dist --help lists the groups and keys)"
    print(f"dream-dist: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _is_user_error(err: BaseException) -> bool:
    from dream_dist.errors import DreamDistError

    return isinstance(err, DreamDistError) or type(err).__module__.startswith(("hydra", "omegaconf"))


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


def _jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job: the cartesian product of comma-separated sweeps with -m."""
    if not multirun:
        return [overrides]
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*choices)]


def cli(argv: list[str] | None = None) -> int:
    """The `dream-dist` command (also `python -m dream_dist.run` and `python dream_dist/run.py`).

    Returns 0 on success (its wrapper calls sys.exit(cli())); a user's mistake exits 2 with
    one line; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _argv_overrides(argv)
        args = get_args_parser().parse_args(argv)
        runs = not any(getattr(args, f, None) for f in HYDRA_FLAGS_WITHOUT_RUN)
        if runs and not (args.config_path or args.config_name or args.config_dir):
            for job in _jobs(args.overrides, args.multirun):
                compose(job)
    except Exception as e:  # noqa: BLE001 - sorted into a user's mistake or a bug just below
        if _full_error() or not _is_user_error(e):
            raise
        _fail(e)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dream-dist", *argv]
    try:
        _hydra_entry()
    except SystemExit as e:  # Hydra ends --help / --cfg / --info with sys.exit(0)
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = saved
    return 0


def _task(cfg) -> dict | None:
    """Hydra's task function: one job. Its output directory is Hydra's (hydra.run.dir, or
    hydra.sweep.dir/<job number> under -m), which defaults to out_dir."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dream_dist.config import RunConfig, build

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        values["out_dir"] = HydraConfig.get().runtime.output_dir
        return run(build(RunConfig, values))
    except Exception as e:  # noqa: BLE001
        if _full_error() or not _is_user_error(e):
            raise
        _fail(e)
        return None


def _hydra_entry() -> None:
    import hydra

    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    sys.exit(cli())
