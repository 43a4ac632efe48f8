"""Counter-based random streams: one seeded generator per (seed, purpose, indices...).

Every random choice of a run (network init, real batch of class c at step t, DSA draw...)
takes its own generator keyed by what it is for. Nothing depends on the order in which
classes are visited, which is why K class shards give the same result as one, and why a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (distinct streams for distinct uses).

    SeedSequence spreads the keys, so (seed s, class c) never shares a stream with
    (seed s', class c') as plain `s + c` would. Negative keys map to distinct values.
    """
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded with derive_seed(*keys)."""
    return torch.Generator().manual_seed(derive_seed(*keys))


# Purposes, so that streams for different uses never collide.
NET_INIT, REAL_BATCH, DSA_DRAW, NET_BATCH, NET_AUG, SYN_INIT, CLUSTER, POOL, INIT_NET = range(1, 10)
WARMUP, NET_MIX, SYN_SUBSAMPLE = range(10, 13)


def host_values(t: torch.Tensor) -> list:
    """The values of a CPU tensor (a draw from a CPU generator) as Python numbers, read
    without a per-value scalar read (no aten._local_scalar_dense: on CUDA that would be a
    device sync, and the engine's sync count counts every one). Refuses a device tensor."""
    if t.device.type != "cpu":
        raise ValueError(f"host_values reads CPU tensors only (draws of a CPU generator, "
                         f"dream_dist.seeding.generator); got one on {t.device}")
    return t.reshape(-1).numpy().tolist()  # .numpy() raises on a device tensor: never a silent sync


def host_ints(t: torch.Tensor) -> list[int]:
    """host_values of an integer CPU tensor, as ints."""
    return [int(v) for v in host_values(t)]
