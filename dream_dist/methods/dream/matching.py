"""Matching distances and the matching loss of one class (gradient, feature or both).

Distances (D in the DREAM+ paper), between two tensors of the same shape:
- 'cos' (DC/DSA): per output channel 1 − cos(a, b), summed over channels. Conv tensors
  (out, in, kh, kw) are reshaped to (out, in·kh·kw); a 1-D tensor is one channel.
- 'mse' (IDC on CIFAR/SVHN/TinyImageNet): sum of squared differences.
- 'l1'  (IDC on MNIST/FashionMNIST): sum of absolute differences.

`match_loss` computes gradient matching, feature matching or bidirectional matching (both,
from the SAME forward pass of each batch, as DREAM+ prescribes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dream_dist.determinism import cross_entropy

DISTANCES = ("cos", "mse", "l1")
LOSSES = ("gradient", "feature", "bidirectional")


def distance(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """D(a, b) for one layer's gradients (or one feature vector)."""
    if a.shape != b.shape:
        raise ValueError(f"distance: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    if metric == "mse":
        return (a - b).pow(2).sum()
    if metric == "l1":
        return (a - b).abs().sum()
    if metric == "cos":
        a2 = a.reshape(a.shape[0], -1) if a.dim() > 1 else a.reshape(1, -1)
        b2 = b.reshape(b.shape[0], -1) if b.dim() > 1 else b.reshape(1, -1)
        # The 1e-6 guards against all-zero gradients, as in the public DC code.
        cos = (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + 1e-6)
        return (1 - cos).sum()
    raise ValueError(f"unknown distance {metric!r}; choose one of {', '.join(DISTANCES)}")


def matched_parameters(net: nn.Module, include_fc: bool) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose gradients are matched: weights of conv (and optionally linear)
    layers. Biases and normalisation parameters are skipped, as in the DC/DREAM code."""
    out = []
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d) or (include_fc and isinstance(mod, nn.Linear)):
            out.append((f"{mod_name}.weight", mod.weight))
    if not out:
        raise ValueError("the network has no conv/linear weights to match")
    return out


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    if targets.dtype == torch.long:
        return cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()


def match_loss(
    net: nn.Module,
    real: Tensor,
    y_real: Tensor,
    syn: Tensor,
    y_syn: Tensor,
    loss: str = "bidirectional",
    metric: str = "mse",
    lambda_grad: float = 1.0,
    lambda_feat: float = 1.0,
    include_fc: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Matching loss of one class; differentiable w.r.t. `syn`.

    Returns (loss, parts) where parts has 'grad' and/or 'feat' distances, detached 0-d
    tensors on the loss's device (for logs: the caller reads them once per step, since every
    read of a CUDA value is a device sync).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    want_grad = loss in ("gradient", "bidirectional")
    want_feat = loss in ("feature", "bidirectional")
    # One forward pass per batch serves both terms (embed, then the classifier head).
    # Feature-only matching needs no graph through the real batch.
    with torch.set_grad_enabled(want_grad):
        emb_r = net.embed(real)
    emb_s = net.embed(syn)
    total = syn.new_zeros(())
    parts: dict[str, Tensor] = {}
    if want_grad:
        params = [p for _, p in matched_parameters(net, include_fc)]
        g_real = torch.autograd.grad(_soft_ce(net.classifier(emb_r), y_real), params, retain_graph=want_feat)
        g_syn = torch.autograd.grad(_soft_ce(net.classifier(emb_s), y_syn), params, create_graph=True)
        d = sum(distance(gr.detach(), gs, metric) for gr, gs in zip(g_real, g_syn))
        total = total + lambda_grad * d
        parts["grad"] = d.detach()
    if want_feat:
        d = distance(emb_r.detach().mean(0), emb_s.mean(0), metric)
        total = total + lambda_feat * d
        parts["feat"] = d.detach()
    return total, parts
