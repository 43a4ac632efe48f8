"""Counting host reads of tensor values: each one is a device sync on CUDA.

    from dream_dist.hostsync import HostReads
    with HostReads() as reads:
        distiller.run(until_step=1)
    reads.total, reads.by_device        # e.g. 3, {'cpu': 3}

A read is `aten._local_scalar_dense` (what .item(), float(t), int(t), bool(t) and `if t:`
dispatch to) or a `Tensor.tolist()` call (which copies without dispatching). On CUDA each read
of a device tensor waits for every kernel queued before it, so the hot loop keeps its
statistics on the device and reads them once per step. On a CPU run every tensor is a host
tensor, so the count is an upper bound of the syncs the same code makes on CUDA: what the
tests check is that it does not grow with the class count. Host-side random draws (CPU
torch.Generators) are read with `.numpy()`, which raises on a CUDA tensor, so they can never
become silent syncs and are not counted.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads"]


class HostReads(TorchDispatchMode):
    """Context manager counting host reads of tensor values, by device type."""

    def __init__(self) -> None:
        super().__init__()
        self.by_device: Counter[str] = Counter()
        self._tolist = None

    @property
    def total(self) -> int:
        return sum(self.by_device.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_device[args[0].device.type] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = torch.Tensor.tolist
        self._tolist = original
        counter = self.by_device

        def tolist(t, *a, **kw):
            counter[t.device.type] += 1
            return original(t, *a, **kw)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
