"""The one interface every method implements, and what it hands back.

A method is a small object with a task name. The pipeline (`dream_dist.pipeline`) does the
rest the same way for all of them: open the data, `prepare`, run the method (in this process
or on Ray), save each set, evaluate it and the baseline, print the table, write results.json.

Two kinds, by how classes relate:

- class-independent (`sharded = False`: RDED, DDOQ, coresets): `distill_group` turns a group
  of classes into per-class parts, reading only those classes. The pipeline calls it once
  over all classes in process, or once per class group as Ray tasks (`workers > 0`); the parts
  are the same either way (every random draw is keyed by (seed, class)). `assemble` joins them.
- sharded (`sharded = True`: the DREAM/IDC/DC/DSA/DM engine): classes share a network, so a
  worker owns a class shard for the whole run. `run_in_process` runs every shard here;
  on Ray, each Train worker builds its `stepper` and the driver turns the merged state into
  sets with `sets_from_state`.

Methods never import Ray; the Ray package never imports a concrete method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from dream_dist.artifact import SynthSet  # noqa: F401  (what methods return)


ImagesOf = Callable[[int], Tensor]
"""class id -> its uint8 train images (N, C, H, W)."""


class Method:
    """Base of every method. Subclasses set `task` and override what their kind needs."""

    task: str = ""
    """The task name on the command line (task=<name>), also the config section's owner."""
    sharded: bool = False
    """True: classes interact (a shared network); a Ray worker owns a class shard."""

    # ---- both kinds
    def workers(self, cfg) -> int:
        """Ray workers (sharded) or Ray tasks (per class) the run asks for; 0 = in process."""
        return 0

    def memory_budget_mb(self, cfg) -> float | None:
        """The class cache's budget (None: the run's distill.memory_budget_mb)."""
        return None

    def prepare(self, cfg, data, out: Path) -> Any:
        """Checks before any compute (a bad config or dataset fails here), then what every class
        needs (a resolved config, an observer, an encoder, a feature network). Picklable."""
        raise NotImplementedError

    def evaluator(self, cfg, prep, data):
        """The evaluation protocol of this method's sets: an object with
        job(set: SynthSet, name, log_dir) -> EvalJob and title() -> str."""
        raise NotImplementedError

    def baseline(self, cfg, prep, data) -> SynthSet | None:
        """The random real coreset of the same IPC (labelled as the method's sets are), or None."""
        return None

    def title(self, cfg, prep, data, metrics: dict) -> str:
        """The table's title line."""
        return f"{cfg.dataset.name}: {self.task}"

    def timing(self, metrics: dict) -> str:
        """The table's time line (before the evaluations' times)."""
        return f"distill {metrics['distill_seconds']:.1f} s"

    def remote_prep(self, cfg, prep) -> Any:
        """`prep` as Ray workers and tasks receive it (e.g. models moved to the CPU)."""
        return prep

    def prep_to(self, prep, device: str) -> Any:
        """`prep` with its models on `device`, inside a Ray task that computes there (its own
        GPU). The default moves every torch module field of a dataclass prep."""
        import dataclasses

        from torch import nn

        if not dataclasses.is_dataclass(prep):
            return prep
        moved = {f.name: getattr(prep, f.name).to(device) for f in dataclasses.fields(prep)
                 if isinstance(getattr(prep, f.name), nn.Module)}
        return dataclasses.replace(prep, **moved) if moved else prep

    def driver_models(self, cfg) -> list[str]:
        """Models this method trains or runs on the driver at cfg.device (an observer, a feature
        net, an autoencoder), even when its classes go to Ray workers. With device=cuda they
        need a GPU on the driver: the run is refused up front on a CPU driver."""
        return []

    def summary(self, cfg, prep) -> dict:
        """Extra keys of results.json (the method's resolved settings)."""
        return {}

    # ---- class-independent methods
    def distill_group(self, cfg, prep, classes: list[int], images_of: ImagesOf, progress: bool = False
                      ) -> dict[int, Any]:
        """Per-class parts of `classes`, reading only them through `images_of`."""
        raise NotImplementedError

    def assemble(self, cfg, prep, data, parts: dict[int, Any], out: Path) -> tuple[list[SynthSet], dict]:
        """The sets from all classes' parts (class order: data.classes), and run metrics."""
        raise NotImplementedError

    # ---- sharded methods
    def run_in_process(self, cfg, prep, data, out: Path) -> tuple[list[SynthSet], dict]:
        """Every class shard in this process (progress, checkpoints, TensorBoard)."""
        raise NotImplementedError

    def stepper(self, cfg, prep, classes: list[int], cache, counts_all: list[int], device: str,
                allreduce=None, log=None, progress: bool = False):
        """One worker's engine over `classes`: an object with initialize(), run(until_step),
        state_dict(), load_state_dict(state), global_step, total_steps, history, timing."""
        raise NotImplementedError

    @staticmethod
    def load_checkpoint(path) -> dict:
        """Read one worker's checkpoint file without running code from it."""
        from dream_dist.artifact import load_plain

        return load_plain(path)

    def sets_from_state(self, cfg, prep, state: dict, mean, std) -> list[SynthSet]:
        """The sets of a merged worker state (every class)."""
        raise NotImplementedError
