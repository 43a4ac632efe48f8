"""Class shards on Ray Train workers (one module-scoped local Ray for the whole file)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from dream_dist.run import compose, main  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_ray_workers_equal_one_process(local_ray, tmp_path):
    args = [f"out_dir={tmp_path}/run", f"pack.out={tmp_path}/packed", "progress=false",
            "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=3",
            "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
            "distill.overrides.init_images=256", "distill.checkpoint_every=2", "distill.baseline=false",
            "eval.width=8", "eval.epochs=1", "eval.runs=1"]
    main(args)  # the in-process reference: one shard, one process
    from dream_dist import load_distilled
    from dream_dist.distributed import distill_on_ray

    ref = load_distilled(tmp_path / "run" / "distilled.pt").stored
    images, labels, result = distill_on_ray(compose(args), num_workers=2, storage=tmp_path / "ray")
    assert torch.equal(labels, ref.labels)
    torch.testing.assert_close(images, ref.images, rtol=1e-5, atol=1e-5)
    # Rank 0 owns 5 of the 10 digit classes and opened only their 5 shards.
    assert result.metrics["classes"] == 5 and result.metrics["opened_shards"] == 5
    assert result.metrics["step"] == 3
