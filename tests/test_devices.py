"""One GPU per worker, and work where its resources are (CPU proxies of the GPU path).

No GPU here: FAISS's GPU calls are replaced by recorders (the CPU index stands in for the GPU
copy, so results can be compared), Ray is given fake GPUs (`ray.init(num_gpus=2)` works on a
CPU machine: Ray then sets CUDA_VISIBLE_DEVICES per task), and the checks go through the
code's own selection functions (dream_dist.devices, kmeans.gpu_for, tune.concurrency).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dream_dist import kmeans
from dream_dist.config import ConfigError
from dream_dist.devices import gpu_index, is_cuda, task_device, task_resources
from dream_dist.distributed.train import bucketed_allreduce
from dream_dist.distributed.tune import TuneConfig, check_trial_devices, concurrency
from dream_dist.tasks import compose

CUDA_HERE = torch.cuda.is_available()


def test_a_task_reserves_a_gpu_exactly_when_it_computes_on_one():
    assert task_resources("cpu", 3) == {"num_cpus": 3, "num_gpus": 0}
    assert task_resources("cuda", None) == {"num_cpus": 1, "num_gpus": 1}
    assert task_resources("cuda:3", 2) == {"num_cpus": 2, "num_gpus": 1}
    assert is_cuda("cuda:1") and is_cuda(torch.device("cuda", 0)) and not is_cuda("cpu")


def test_a_driver_device_index_maps_to_the_tasks_own_gpu():
    # Ray shows a task only the GPU it reserved: index 0, whatever cuda:N the driver named.
    assert task_device("cuda:3", gpus=1) == "cuda:0" and task_device("cuda", gpus=1) == "cuda:0"
    assert task_device("cpu", gpus=0) == "cpu" and task_device("cpu", gpus=4) == "cpu"
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        task_device("cuda:1", gpus=0)  # never a silent CPU fallback
    assert gpu_index("cpu") is None and gpu_index("cuda:2") == 2


class FakeGpuFaiss:
    """Records FAISS's GPU calls; the 'GPU' index is the CPU index itself."""

    def __init__(self, monkeypatch, gpus: int = 2):
        import faiss

        self.resources, self.copies, self.kmeans_gpu = 0, [], []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", self._resources, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self._to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self._all_gpus, raising=False)
        real = faiss.Kmeans

        def recording_kmeans(*a, **kw):
            self.kmeans_gpu.append(kw.get("gpu"))
            return real(*a, **kw)

        monkeypatch.setattr(faiss, "Kmeans", recording_kmeans)
        monkeypatch.setattr(kmeans, "_RESOURCES", {})

    def _resources(self):
        self.resources += 1
        return object()

    def _to_gpu(self, res, device, index):
        self.copies.append(device)
        return index

    @staticmethod
    def _all_gpus(*a, **kw):
        raise AssertionError("index_cpu_to_all_gpus spreads over every visible GPU")


@pytest.fixture
def feats(digits):
    x = digits[0].of_class(3)[:120].float().reshape(120, -1) / 255
    return x.numpy()


def test_faiss_runs_on_the_configured_gpu_only_with_one_reused_resource(monkeypatch, feats):
    want = kmeans.kmeans(feats, 8, seed=1)  # the CPU result, before FAISS is faked
    fake = FakeGpuFaiss(monkeypatch, gpus=2)
    gpu = kmeans.gpu_for("cuda:1")
    assert gpu == 1
    for _ in range(3):
        cents, assign = kmeans.kmeans(feats, 8, seed=1, gpu=gpu)
        kmeans.nearest_distinct(feats, cents, 2, gpu=gpu)
    np.testing.assert_array_equal(cents, want[0])
    np.testing.assert_array_equal(assign, want[1])
    assert fake.copies and set(fake.copies) == {1}  # GPU 1, never another
    assert fake.resources == 1  # one StandardGpuResources per GPU per process, reused
    assert set(fake.kmeans_gpu) == {False}  # never Kmeans(gpu=True): all GPUs


def test_a_cpu_device_never_clusters_on_a_gpu_even_with_faiss_gpu(monkeypatch, feats):
    fake = FakeGpuFaiss(monkeypatch, gpus=4)
    assert kmeans.gpu_for("cpu") is None
    kmeans.medoids(feats, 6, gpu=kmeans.gpu_for("cpu"))
    kmeans.minibatch_kmeans(feats, 4, batch_size=32, niter=3, gpu=kmeans.gpu_for("cpu"))
    assert fake.copies == [] and fake.resources == 0


def test_the_engine_clusters_on_its_shards_device(monkeypatch, digits):
    from dream_dist.methods.dream.config import preset
    from dream_dist.methods.dream.engine import Distiller
    from dream_dist.methods.dream.shard import ClassShard

    fake = FakeGpuFaiss(monkeypatch, gpus=2)
    train = digits[0]
    cfg = preset("dream_plus", iterations=1, inner_steps=1, model="convnet_tiny", init_images=64, batch_real=8,
                 net_images=32, net_batch=16, ipc=1).resolved("digits")
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(10)}
    shard = ClassShard(list(range(10)), real, cfg, mean, std, 10, seed=0)
    assert shard.faiss_gpu is None  # device cpu
    d = Distiller(cfg, [shard], train.counts(), train.channels, train.size, seed=0, progress=False)
    d.initialize()
    d.run()
    assert fake.copies == [] and fake.resources == 0


def test_faiss_without_gpus_falls_back_to_its_cpu_build_for_a_cuda_device(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    assert kmeans.gpu_for("cuda:0") is None  # faiss-cpu on a GPU machine: the CPU index
    with pytest.raises(RuntimeError, match="FAISS sees 0 GPU"):
        kmeans.use_gpu(1)


def test_allreduce_is_one_call_per_dtype_with_the_same_sums():
    calls = []

    def all_reduce(t):  # two identical workers: the sum doubles every value
        calls.append(t.numel())
        t.mul_(2)

    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((8, 3, 3, 3), (8,), (16, 8, 3, 3), (10, 64))]
    full = torch.randn(4, 1, 28, 28, generator=g)
    want = [b * 2 for b in bufs] + [full * 2]
    stats: dict = {}
    bucketed_allreduce([*bufs, full], all_reduce, stats)
    assert len(calls) == 2  # one bucket of float64 gradients, one of the float32 batch
    for got, exp in zip([*bufs, full], want):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    assert stats["calls"] == 1 and stats["bytes"] == sum(b.numel() * 8 for b in bufs) + full.numel() * 4
    one = torch.ones(5, dtype=torch.float64)
    bucketed_allreduce([one], all_reduce)
    assert one.tolist() == [2.0] * 5  # a single tensor is reduced in place


def test_tune_counts_gpus_in_its_concurrency_and_reserves_them():
    t = TuneConfig(workers_per_trial=2, cpus_per_trial=1)
    # 2 workers x (1 CPU, 1 GPU) + the trial's bundle: 16 CPUs hold 5 trials, 4 GPUs only 2.
    assert concurrency(t, "cuda", 1, cluster={"CPU": 16, "GPU": 4}) == 2
    assert concurrency(t, "cpu", 1, cluster={"CPU": 16, "GPU": 4}) == 5
    assert concurrency(t, "cpu", 2, cluster={"CPU": 16}) == 3  # workers of 2 threads: 2 CPUs each
    assert concurrency(TuneConfig(), "cuda", 1, cluster={"CPU": 16, "GPU": 4}) is None  # Tune counts it
    for over, msg in ((["device=cuda"], "distils in the trial"),
                      (["tune.workers_per_trial=2", "eval.device=cuda"], "quick-evaluates")):
        cfg = compose(["task=tune", "experiment=tune_digits", *over])
        with pytest.raises(ConfigError, match=f"gpus_per_trial must be > 0: a trial {msg}"):
            check_trial_devices(cfg)
    # eval.device follows device: trials on GPU workers quick-evaluate on a GPU of their own.
    with pytest.raises(ConfigError, match="quick-evaluates"):
        check_trial_devices(compose(["task=tune", "experiment=tune_digits", "device=cuda", "tune.workers_per_trial=2"]))
    check_trial_devices(compose(["task=tune", "experiment=tune_digits", "device=cuda", "tune.workers_per_trial=2",
                                 "tune.gpus_per_trial=1"]))
    check_trial_devices(compose(["task=tune", "experiment=tune_digits", "device=cuda", "tune.workers_per_trial=2",
                                 "eval.device=cpu"]))


@pytest.mark.skipif(CUDA_HERE, reason="checks the refusals of a CPU driver")
def test_a_cpu_driver_refuses_only_the_gpu_work_it_would_do_itself():
    # RDED's observer trains and runs on the driver: refused up front, in one line.
    with pytest.raises(ConfigError, match=r"device: 'cuda' with rded.workers=1: the observer") as e:
        compose(["task=rded", "experiment=rded_digits", "device=cuda", "rded.workers=1"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="feature net"):
        compose(["task=coreset", "experiment=coreset", "device=cuda", "coreset.workers=2",
                 "coreset.methods=[random,herding]"])
    # In-process evaluation on the driver: refused, also when the distillation is on Ray.
    with pytest.raises(ConfigError, match="eval.device: 'cuda' requested but CUDA is not available"):
        compose(["experiment=digits", "eval.device=cuda"])
    # What runs on Ray workers alone is accepted: DREAM's shards, random coresets, evaluation tasks.
    compose(["experiment=digits", "device=cuda", "eval.device=cuda", "distill.workers=2"])
    compose(["task=coreset", "experiment=coreset", "device=cuda", "coreset.workers=2", "coreset.methods=[random]"])
    compose(["task=evaluate", "evaluate.workers=2", "device=cuda", "eval.device=cuda"])
    with pytest.raises(ConfigError, match="eval.device"):
        compose(["task=evaluate", "evaluate.workers=0", "eval.device=cuda"])


@pytest.fixture(scope="module")
def ray_with_fake_gpus():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_tasks_get_their_own_gpu_from_the_reservation(ray_with_fake_gpus, packed_digits, tmp_path):
    ray = ray_with_fake_gpus

    def _probe(device):  # nested: pickled by value (the test module is not importable on workers)
        import os

        import ray

        from dream_dist.devices import task_device

        ids = ray.get_gpu_ids()
        return ids, os.environ.get("CUDA_VISIBLE_DEVICES", ""), task_device(device, gpus=len(ids))

    probe = ray.remote(_probe)
    on_gpu = [probe.options(**task_resources("cuda:1", 1)).remote("cuda:1") for _ in range(2)]
    results = ray.get(on_gpu)
    for ids, visible, device in results:
        assert len(ids) == 1 and visible == str(ids[0]) and device == "cuda:0"
    ids, visible, device = ray.get(probe.options(**task_resources("cpu", 1)).remote("cpu"))
    assert ids == [] and device == "cpu"
    # The class fan-out reserves a GPU per task for device=cuda and then refuses to run without
    # CUDA in the task (here: Ray's GPUs are fake), rather than computing on the CPU.
    from dream_dist.data.prepare import open_data
    from dream_dist.distributed.fanout import map_classes
    from dream_dist.methods import METHODS

    cfg = compose([f"dataset.packed={packed_digits}", "progress=false", "task=coreset", "coreset.ipc=2",
                   "coreset.methods=[random]", f"out_dir={tmp_path}"])
    data = open_data(cfg)
    method = METHODS["coreset"]
    prep = method.prepare(cfg, data, tmp_path)
    import dataclasses

    gpu_cfg = dataclasses.replace(cfg, device="cuda", coreset=dataclasses.replace(cfg.coreset, workers=2)) \
        if not CUDA_HERE else None
    if gpu_cfg is not None:
        with pytest.raises(Exception, match="sees no CUDA device"):
            map_classes(method, gpu_cfg, prep, data, workers=2)


@pytest.fixture(scope="module")
def packed_digits(tmp_path_factory):
    from dream_dist.data.prepare import ensure_packed

    out = tmp_path_factory.mktemp("packed")
    return ensure_packed(compose([f"pack.out={out}", "progress=false"]))


def test_ray_workers_get_the_cublas_setting_before_cuda_starts(tmp_path):
    """ensure_ray gives every worker determinism.ENV (cuBLAS reads it at CUDA init, in the worker).

    A fresh driver process (ensure_ray only starts Ray when none is up), without the variable:
    a task and an actor both see the default; a value the driver exported wins.
    """
    pytest.importorskip("ray")
    import subprocess
    import sys

    code = (
        "import os, ray\n"
        "from dream_dist.distributed import ensure_ray\n"
        "ensure_ray()\n"
        "probe = ray.remote(num_cpus=0)(lambda: os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
        "@ray.remote(num_cpus=0)\n"
        "class A:\n"
        "    def env(self):\n"
        "        return os.environ.get('CUBLAS_WORKSPACE_CONFIG')\n"
        "print('ENV', ray.get(probe.remote()), ray.get(A.remote().env.remote()))\n"
        "ray.shutdown()\n")
    base = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "RAY_ADDRESS")}
    base.update(RAY_ADDRESS="local", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    for exported, expected in ((None, ":4096:8"), (":16:8", ":16:8")):
        env = dict(base, **({"CUBLAS_WORKSPACE_CONFIG": exported} if exported else {}))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ENV "))
        assert line.split() == ["ENV", expected, expected]
