"""Where compute runs, and what a Ray task reserves for it: the one place that decides.

    from dream_dist.devices import is_cuda, task_resources, task_device, gpu_index
    task_resources("cuda:3", threads=4)    # {'num_cpus': 4, 'num_gpus': 1}
    task_device("cuda:3")                  # inside that task: 'cuda:0', its own GPU
    gpu_index("cpu"), gpu_index("cuda:1")  # None, 1 (the GPU FAISS uses)

Rules (each a test in tests/test_devices.py):
- a Ray task or worker reserves one GPU exactly when it computes on one (`task_resources`);
- Ray sets CUDA_VISIBLE_DEVICES to the GPU it reserved, so inside the task that GPU is index 0,
  whatever index `device=cuda:N` named on the driver (`task_device`): N picks a GPU of the
  driver's machine, never of a worker's;
- a CUDA device that a task does not have is an error, never a silent CPU fallback;
- FAISS runs on the GPU of the configured device and on no other (`gpu_index`): a CPU device
  clusters on the CPU even where faiss-gpu sees GPUs.
Ray-free, so the engine and the evaluation keep these rules without Ray installed.
"""
from __future__ import annotations

import os
import socket

import torch

from dream_dist.errors import ConfigError

__all__ = ["describe", "gpu_index", "is_cuda", "task_device", "task_resources", "to_device"]


def is_cuda(device) -> bool:
    """True for 'cuda', 'cuda:N' and torch.device('cuda', N)."""
    return str(device).startswith("cuda")


def gpu_index(device) -> int | None:
    """The GPU index `device` names (None for a CPU device); plain 'cuda' is torch's current
    device (0 unless torch.cuda.set_device was called)."""
    if not is_cuda(device):
        return None
    d = torch.device(device)
    if d.index is not None:
        return d.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def task_resources(device, threads: int | None = 1) -> dict[str, float]:
    """What a Ray task or worker that computes on `device` reserves: its threads as CPUs, and
    one GPU exactly when the device is CUDA."""
    return {"num_cpus": max(1, int(threads or 1)), "num_gpus": 1 if is_cuda(device) else 0}


def task_device(device, gpus: int | None = None) -> str:
    """The device a Ray task computes on for the run's `device`: 'cpu', or 'cuda:0', the one GPU
    the task reserved (Ray makes it the only visible one, index 0).

    gpus: CUDA devices this process sees (default torch.cuda.device_count()); a CUDA device
    with none visible raises ConfigError (the task was scheduled without a GPU)."""
    if not is_cuda(device):
        return "cpu"
    n = torch.cuda.device_count() if gpus is None else gpus
    if n < 1:
        raise ConfigError(f"device: {str(device)!r} requested but this Ray process on "
                          f"{socket.gethostname()} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    return "cuda:0"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for CUDA goes through pinned (page-locked) memory
    with a non-blocking copy, so the host does not wait for the transfer (the caching host
    allocator keeps the pinned block alive until the copy has run)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def describe(device) -> dict:
    """This process's device as results.json records it per worker: host, device, GPU name and
    the CUDA devices it was given."""
    gpu = None
    if is_cuda(device) and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device), "gpu": gpu,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
