"""dream_dist."""
from __future__ import annotations

from typing import Any

__all__ = ["DistilledSet", "load_distilled"]

# Re-exported lazily (PEP 562): `import dream_dist` stays cheap, and a training script that
# only needs `dream_dist.load_distilled(path)` imports just the export module on first use.
_LAZY = {"load_distilled": "dream_dist.artifact", "DistilledSet": "dream_dist.artifact"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dream_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
