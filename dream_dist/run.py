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

import os
import re
import sys

from dream_dist.tasks import _argv_overrides, compose, conf_dir, main, run  # noqa: F401  (the programmatic API)


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

    from dream_dist.config import build
    from dream_dist.tasks import RunConfig

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        from dream_dist.data import storage

        if storage.is_url(values.get("out_dir") or ""):  # hydra.run.dir is its local staging dir
            values["sync_to"] = values["out_dir"].rstrip("/")
        values["out_dir"] = HydraConfig.get().runtime.output_dir
        return run(build(RunConfig, values))
    except Exception as e:  # noqa: BLE001
        if _full_error() or not _is_user_error(e):
            raise
        _fail(e)
        return None


def _hydra_entry() -> None:
    import hydra

    from dream_dist.tasks import register_resolvers

    register_resolvers()

    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    sys.exit(cli())
