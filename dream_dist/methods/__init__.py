"""Every method behind one interface (dream_dist.methods.base.Method), by task name.

    from dream_dist.methods import METHODS
    METHODS["distill"]   # DREAM+ / DREAM / IDC / DC / DSA / DM (sharded: a shared network)
    METHODS["rded"]      # RDED (per class)
    METHODS["ddoq"]      # DDOQ (per class)
    METHODS["coreset"]   # random / herding / k-center (per class)

Adding a method: a module here with its config dataclass and a Method subclass, one line
below, its config section in dream_dist.tasks.RunConfig and conf/ (docs/architecture.md).
"""
from __future__ import annotations

from dream_dist.methods.base import Method, SynthSet
from dream_dist.methods.coreset import CoresetMethod
from dream_dist.methods.ddoq import DDOQMethod
from dream_dist.methods.dream.method import DreamMethod
from dream_dist.methods.rded import RDEDMethod

METHODS: dict[str, Method] = {m.task: m for m in (DreamMethod(), RDEDMethod(), DDOQMethod(), CoresetMethod())}

__all__ = ["METHODS", "Method", "SynthSet"]
