"""dream_dist on Ray: the one place that imports Ray.

- `train`: sharded methods (classes interact through a shared network, e.g. DREAM+) on Ray
  Train workers, one class shard each, driven through the method's stepper interface;
- `fanout`: class-independent methods (RDED, DDOQ, coresets) as Ray tasks over class groups;
- `evaluate`: the evaluation run loop's executor: every run an independent Ray task;
- `tune`: Ray Tune sweeps over a sharded method's knobs.

Nothing here imports a concrete method: the pipeline hands the method object in.
"""
from __future__ import annotations

import os


def ensure_ray() -> None:
    """Join the running Ray cluster, else start Ray on this machine; nothing when Ray is up.

    Plain `ray.init()` joins the cluster of RAY_ADDRESS or of `ray start` on this node (what
    `ray submit` and `ray job submit` give) and starts a local Ray otherwise. We do not pass
    address="auto": it fails when there is no cluster, and on a shared machine it can attach
    to any Ray process it finds (someone else's test instance).
    """
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False, runtime_env=runtime_env())


def runtime_env() -> dict:
    """The job's runtime_env: determinism.ENV in every worker's environment.

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when a process first initialises CUDA, so a Ray
    worker needs it in its environment from the start (determinism.configure inside the task
    is too late once CUDA is up). A value the driver has exported wins over the default.
    """
    from dream_dist import determinism

    env = {k: os.environ.get(k, v) for k, v in determinism.ENV.items()}
    # Where object storage is and where its shards are cached (never credentials: nodes have their own).
    env.update({k: os.environ[k] for k in ("DREAM_DIST_S3_ENDPOINT", "AWS_ENDPOINT_URL", "DREAM_DIST_SHARD_CACHE")
                if os.environ.get(k)})
    return {"env_vars": env}
