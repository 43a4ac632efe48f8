"""What a result was computed on: recorded in results.json and distilled.pt.

The same seed and settings give bit-identical sets on one machine with one thread count; a
different thread count (or CPU) changes float summation order, which k-means then amplifies
into different selections. So every result says which it came from.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """Thread count, library versions, CPU model and device of this process."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "device": device,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "faiss": _version("faiss-cpu") or _version("faiss-gpu"),
        "ray": _version("ray"),
        "dream_dist": _version("dream_dist"),
    }
