"""Shared test fixtures.

The real datasets are found through ONE setting: the environment variable
DREAM_DIST_DATA (default: ../shared/data relative to the repository root). Tests that need
a dataset that is absent skip with the reason, except under CI=true, where a missing
dataset is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DREAM_DIST_DATA", REPO.parent / "shared" / "data"))


def need_dataset(name: str) -> Path:
    """Path of shared dataset `name`, or skip (fail under CI=true) when it is missing."""
    path = DATA_ROOT / name
    if not path.exists():
        msg = f"dataset {name!r} not found at {path} (set DREAM_DIST_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return need_dataset("mnist")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return need_dataset("fashion_mnist")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return need_dataset("tiny-imagenet-200-sub100")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as (train, test) ImageSets, upsampled to 28 px."""
    from dream_dist.data import load_dataset

    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance per test module (Ray's testing advice: start once, share).

    address="local" starts a fresh instance: never a cluster that someone else started on
    this machine with `ray start`.
    """
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Tests use tiny models, where one thread is as fast as two and immune to oversubscription
# when the 2-core machine is shared (torch's 2 threads under load ran 10x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA, which is absent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on 127.0.0.1 (moto's server mode) for the whole session,
    with dummy credentials and DREAM_DIST_S3_ENDPOINT pointing at it. Yields a function that
    creates a fresh bucket and returns its s3:// URL. Ray workers started afterwards inherit
    the environment."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import itertools

    import boto3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in [*env, "DREAM_DIST_S3_ENDPOINT"]}
    os.environ.update(env)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["DREAM_DIST_S3_ENDPOINT"] = endpoint
    client = boto3.client("s3", endpoint_url=endpoint)
    counter = itertools.count()

    def bucket(name: str = "dd") -> str:
        b = f"{name}-{next(counter)}"
        client.create_bucket(Bucket=b)
        return f"s3://{b}"

    bucket.endpoint = endpoint
    bucket.client = client
    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
