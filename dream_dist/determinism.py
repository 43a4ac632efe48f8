"""Determinism on CUDA: the settings, the ops that have no deterministic CUDA kernel, a tracer
that finds them, and deterministic formulations of the ones dream_dist needs.

    from dream_dist import determinism
    determinism.configure(cfg.device, cfg.deterministic)   # once, before any CUDA work
    ops = determinism.trace_ops(step)                        # Counter of aten op packets run
    assert not determinism.nondeterministic(ops)             # none without a deterministic kernel
    loss = determinism.cross_entropy(logits, labels)         # == F.cross_entropy, without nll_loss

Why: the claims "K shards = 1 shard" and "a resumed run is bit-stable" need bit-identical
kernels. On CPU the kernels used here are deterministic for a fixed thread count
(docs/reproducibility.md). On CUDA some kernels accumulate with atomicAdd, whose order
varies from run to run; `torch.use_deterministic_algorithms(True)` makes them raise instead.
dream_dist therefore never calls them: multi-formation decoding (formation.decode), the DSA
affine warp (augment.DSA._affine) and cross entropy are written with ops that have
deterministic kernels, on CPU and CUDA alike (one code path, same values within 1e-6).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["NONDETERMINISTIC_CUDA_OPS", "CONDITIONS", "ENV", "OpTrace", "configure", "cross_entropy",
           "nondeterministic", "trace_ops"]

# The aten op packets (the name a TorchDispatchMode sees, `str(func.overloadpacket)`, without
# the overload) that raise under torch.use_deterministic_algorithms(True) on CUDA in the pinned
# torch (2.13): the list "The following normally-nondeterministic operations will throw a
# RuntimeError when mode=True" of the docstring of torch.use_deterministic_algorithms
# (torch/__init__.py), each user-level entry mapped to the aten op that carries its
# alertNotDeterministic call. Entries that raise only for some arguments (noted) have their
# condition in CONDITIONS, which the tracer checks on each call.
# Left out: Tensor.resize_ on quantized tensors (aten.resize_ is everywhere; dream_dist has no
# quantized tensors). The ops that mode=True switches to a deterministic kernel instead
# (gather/scatter_add/index_put/index_add/index_select backward, conv, bmm ...) are not here.
NONDETERMINISTIC_CUDA_OPS: frozenset[str] = frozenset({
    # nn.AvgPool3d, AdaptiveAvgPool2d/3d, AdaptiveMaxPool2d, FractionalMaxPool2d/3d: backward
    "aten.avg_pool3d_backward",
    "aten._adaptive_avg_pool2d_backward",
    "aten._adaptive_avg_pool3d_backward",
    "aten.adaptive_max_pool2d_backward",
    "aten.fractional_max_pool2d_backward",
    "aten.fractional_max_pool3d_backward",
    # nn.MaxUnpool1d/2d/3d (forward; MaxUnpool1d runs max_unpool2d)
    "aten.max_unpool2d",
    "aten.max_unpool3d",
    # F.interpolate linear/bilinear/bicubic/trilinear (and their antialias kernels): backward
    "aten.upsample_linear1d_backward",
    "aten.upsample_bilinear2d_backward",
    "aten.upsample_bicubic2d_backward",
    "aten.upsample_trilinear3d_backward",
    "aten._upsample_bilinear2d_aa_backward",
    "aten._upsample_bicubic2d_aa_backward",
    # nn.ReflectionPad1d/2d/3d: backward
    "aten.reflection_pad1d_backward",
    "aten.reflection_pad2d_backward",
    "aten.reflection_pad3d_backward",
    # nn.NLLLoss (so F.cross_entropy): forward with a reduction, and backward
    "aten.nll_loss_forward",
    "aten.nll_loss_backward",
    "aten.nll_loss2d_forward",
    "aten.nll_loss2d_backward",
    # nn.CTCLoss: backward
    "aten._ctc_loss_backward",
    # nn.EmbeddingBag(mode='max'): backward (the dense backward)
    "aten._embedding_bag_dense_backward",
    # Tensor.put_ (accumulate=False; accumulate=True on CUDA)
    "aten.put_",
    "aten.put",
    # torch.histc; torch.bincount with weights
    "aten.histc",
    "aten.bincount",
    # torch.median with indices (its .dim overloads)
    "aten.median",
    # F.grid_sample: backward (the cuDNN kernel grid_sample may pick included)
    "aten.grid_sampler_2d_backward",
    "aten.grid_sampler_3d_backward",
    "aten.cudnn_grid_sampler_backward",
    # torch.cumsum of floating/complex tensors
    "aten.cumsum",
    "aten.cumsum_",
    # Tensor.scatter_reduce(reduce='prod')
    "aten.scatter_reduce",
    "aten.scatter_reduce_",
})

# Environment a process needs BEFORE it initialises CUDA for deterministic cuBLAS.
# Ray workers and tasks get it through distributed.runtime_env(), which ensure_ray passes to ray.init.
ENV: dict[str, str] = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def configure(device: str | torch.device, enabled: bool = True) -> dict[str, Any]:
    """Set torch up for deterministic kernels on `device`; return what was set.

    CUDA with enabled: deterministic algorithms (an op without a deterministic kernel raises),
    cuDNN deterministic and not benchmarking, no TF32 in matmul or cuDNN, and
    CUBLAS_WORKSPACE_CONFIG=:4096:8 (unless already set). cuBLAS reads that variable when it
    first creates a handle, so it only takes effect when set before the process's first CUDA
    work: set it in the environment of a process (ENV for Ray) rather than relying on this
    call; a warning says when CUDA was already initialised here without it.
    CUDA with enabled=False: torch's defaults are left as they are (nothing set).
    CPU (or any other device): nothing needs to change (the CPU kernels used are deterministic
    for a fixed thread count); nothing is set.

    Safe to call anywhere and idempotent. The returned dict (empty when nothing was set) is
    for the run's record.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not enabled:
        return {}
    set_: dict[str, Any] = {}
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn("determinism.configure: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG "
                          "was set; cuBLAS may not see it. Set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the "
                          "environment before starting the process.", RuntimeWarning, stacklevel=2)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ENV["CUBLAS_WORKSPACE_CONFIG"])
    set_["CUBLAS_WORKSPACE_CONFIG"] = os.environ["CUBLAS_WORKSPACE_CONFIG"]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    set_.update({
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    })
    return set_


# ---------------------------------------------------------------------------- op tracing


def _float_or_complex(dtype: Any) -> bool:
    return dtype is not None and (dtype.is_floating_point or dtype.is_complex)


# Packets of NONDETERMINISTIC_CUDA_OPS that raise only for some arguments: the condition, on
# the call's arguments by schema name. A traced call that fails it (BatchPlan's bincount of
# class draws, say) is counted but not flagged.
CONDITIONS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "aten.nll_loss_forward": lambda o, a: a.get("reduction") != 0,  # Reduction::None is fine
    "aten.nll_loss2d_forward": lambda o, a: a.get("reduction") != 0,
    "aten._embedding_bag_dense_backward": lambda o, a: a.get("mode") == 2,  # MODE_MAX
    "aten.bincount": lambda o, a: a.get("weights") is not None,
    "aten.median": lambda o, a: o in ("dim", "dim_values"),  # the overloads with indices
    "aten.cumsum": lambda o, a: _float_or_complex(a.get("dtype") or a["self"].dtype),
    "aten.cumsum_": lambda o, a: _float_or_complex(a.get("dtype") or a["self"].dtype),
    "aten.scatter_reduce": lambda o, a: a.get("reduce") == "prod",
    "aten.scatter_reduce_": lambda o, a: a.get("reduce") == "prod",
}


class OpTrace(Counter):
    """Calls per aten op packet, and in `.flagged` those calls that have no deterministic
    CUDA kernel (NONDETERMINISTIC_CUDA_OPS, with CONDITIONS checked on the arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flagged: Counter = Counter()


def trace_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OpTrace:
    """Run fn(*args, **kwargs) and count the aten op packets it dispatched, by name
    ('aten.mm', 'aten.upsample_bilinear2d_backward' ...): a Counter (an OpTrace, whose
    `.flagged` holds the calls that have no deterministic CUDA kernel).

    A TorchDispatchMode sees the ops below autograd, so a `.backward()` or
    `torch.autograd.grad` inside fn shows its backward ops too (the engine carries the mode
    to the thread that runs them). Ops of a CPU run are the ops a CUDA run dispatches, except
    where code picks kernels by device (none in dream_dist)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    trace = OpTrace()

    class _Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func.overloadpacket)
            trace[name] += 1
            if name in NONDETERMINISTIC_CUDA_OPS:
                cond = CONDITIONS.get(name)
                if cond is None:
                    trace.flagged[name] += 1
                else:
                    bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
                    if cond(func._overloadname, {**bound, **kwargs}):
                        trace.flagged[name] += 1
            return func(*args, **kwargs)

    with _Trace():
        fn(*args, **kwargs)
    return trace


def nondeterministic(ops: Counter | Iterable[str]) -> dict[str, int]:
    """The calls of a trace that have no deterministic CUDA kernel: an OpTrace's `.flagged`,
    else (a Counter or names) every op whose packet is in NONDETERMINISTIC_CUDA_OPS."""
    if isinstance(ops, OpTrace):
        return dict(sorted(ops.flagged.items()))
    counts = ops if isinstance(ops, Counter) else Counter(ops)
    return {k: v for k, v in sorted(counts.items()) if k in NONDETERMINISTIC_CUDA_OPS}


# ---------------------------------------------------------------------------- formulations


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (N, K) logits against int64 class ids (N,), as F.cross_entropy.

    F.cross_entropy dispatches to aten::nll_loss, whose CUDA kernel (forward with a reduction,
    and its backward) accumulates with atomics; log_softmax + gather + a plain reduction give
    the same values with deterministic kernels (gather's backward is deterministic under
    use_deterministic_algorithms)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    nll = -torch.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.mean()
