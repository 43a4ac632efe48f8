"""Class shards on Ray Train workers (one module-scoped local Ray for the whole file)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from dream_dist.run import compose, main

# The fault-injection hook below is shipped to the workers by value (this test module is
# not importable on a worker).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = ["progress=false", "distill.overrides.width=8", "distill.overrides.iterations=1",
        "distill.overrides.inner_steps=3", "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
        "distill.overrides.init_images=256", "distill.checkpoint_every=2", "distill.baseline=false",
        "eval.width=8", "eval.epochs=1", "eval.runs=1"]




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process reference run: one shard, one process."""
    tmp = tmp_path_factory.mktemp("ref")
    args = [f"out_dir={tmp}/run", f"pack.out={tmp}/packed", *TINY]
    main(args)
    from dream_dist import load_distilled

    return args, load_distilled(tmp / "run" / "distilled.pt").stored


def test_two_ray_workers_equal_one_process(local_ray, reference, tmp_path):
    from dream_dist.distributed.train import distill_on_ray
    from dream_dist.methods import METHODS

    args, ref = reference
    images, labels, result = distill_on_ray(compose(args), METHODS["distill"], num_workers=2, storage=tmp_path / "ray")
    assert torch.equal(labels, ref.labels)
    torch.testing.assert_close(images, ref.images, rtol=1e-5, atol=1e-5)
    # Rank 0 owns 5 of the 10 digit classes and opened only their 5 shards.
    assert result.metrics["classes"] == 5 and result.metrics["opened_shards"] == 5
    assert result.metrics["step"] == 3


class KillOnce:
    """Kill (SIGKILL) the worker process of `rank` right after its report at `step`, once."""

    def __init__(self, marker: Path, rank: int, step: int):
        self.marker, self.rank, self.step = str(marker), rank, step

    def __call__(self, rank: int, step: int) -> None:
        if rank == self.rank and step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_recovers_to_the_same_set(local_ray, tmp_path):
    """Rank 1 is SIGKILLed after its step-3 report; Ray's FailureConfig restarts the worker
    group from the last registered checkpoint and the run ends with exactly the uninterrupted
    synthetic set. Ray registers a report asynchronously, so under load the last registered
    checkpoint can lag the kill by more than one step (CI saw step 1): any checkpoint counts,
    a restart from scratch does not."""
    from dream_dist import load_distilled
    from dream_dist.distributed.train import distill_on_ray
    from dream_dist.methods import METHODS

    args = [f"pack.out={tmp_path}/packed", *TINY, "distill.overrides.inner_steps=4", "distill.checkpoint_every=1"]
    main([f"out_dir={tmp_path}/ref", *args])  # the uninterrupted in-process reference
    ref = load_distilled(tmp_path / "ref" / "distilled.pt").stored
    marker = tmp_path / "killed"
    images, labels, result = distill_on_ray(compose(args), METHODS["distill"], num_workers=2, max_failures=1,
                                            storage=tmp_path / "ray", after_report=KillOnce(marker, 1, 3))
    assert marker.exists(), "the fault was not injected"
    assert int(marker.read_text()) > 0
    assert result.metrics["step"] == 4
    # Restarted from a checkpoint (step 1, 2 or 3), not from scratch.
    assert result.metrics["resumed_from"] in (1, 2, 3)
    torch.testing.assert_close(images, ref.images, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, ref.labels)


def test_an_earlier_ray_run_in_the_same_storage_is_refused_or_replaced(local_ray, reference, tmp_path):
    """Ray Train restores from any earlier run under the same storage and name. An earlier run
    on other classes: distill.resume=true is refused with the reason (not a KeyError deep in a
    worker), and a run without it starts fresh and gives the uninterrupted set."""
    from dream_dist.distributed.train import distill_on_ray
    from dream_dist.methods import METHODS

    args, ref = reference
    storage = tmp_path / "ray"
    distill_on_ray(compose([*args, "dataset.classes=[0,1,2,3]"]), METHODS["distill"], num_workers=2, storage=storage)
    with pytest.raises(Exception, match="other classes"):
        distill_on_ray(compose([*args, "distill.resume=true"]), METHODS["distill"], num_workers=2, storage=storage)
    images, labels, result = distill_on_ray(compose(args), METHODS["distill"], num_workers=2, storage=storage)
    assert result.metrics["resumed_from"] == 0
    assert torch.equal(labels, ref.labels)
    torch.testing.assert_close(images, ref.images, rtol=1e-5, atol=1e-5)


def test_cli_dispatches_to_ray_workers(local_ray, reference, tmp_path):
    """`distill.workers=2` runs the CLI's distill task on Ray: same set, same outputs."""
    from dream_dist import load_distilled

    args, ref = reference
    out = tmp_path / "run"
    summary = main([*args, f"out_dir={out}", "distill.workers=2"])
    assert summary["metrics"]["workers"] == 2
    # results.json records every worker's device, not only the driver's (both on the CPU here).
    envs = json.loads((out / "results.json").read_text())["metrics"]["worker_environments"]
    assert [e["rank"] for e in envs] == [0, 1] and all(e["device"] == "cpu" and e["gpu"] is None for e in envs)
    assert (out / "tb" / "dream_plus" / "run0").is_dir()  # evaluation logs (Ray tasks write the same layout)
    got = load_distilled(out / "distilled.pt").stored
    torch.testing.assert_close(got.images, ref.images, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "results.json").read_text())["rows"][0]["method"] == "dream_plus"
    # Rank 0's step scalars reached TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb" / "distill"))
    acc.Reload()
    assert "loss/total" in acc.Tags()["scalars"]
    assert len(acc.Scalars("loss/total")) == 3
