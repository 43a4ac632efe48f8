"""Matching distances against hand-computed values, and the loss variants."""
from __future__ import annotations

import math

import pytest
import torch

from dream_dist.methods.dream.matching import distance, match_loss, matched_parameters
from dream_dist.models import build_model


def test_mse_and_l1_are_sums():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [5.0, 1.0]])
    assert distance(a, b, "mse").item() == pytest.approx(1 + 0 + 4 + 9)
    assert distance(a, b, "l1").item() == pytest.approx(1 + 0 + 2 + 3)


def test_cos_is_per_output_channel():
    # Conv grads (out=2, in=1, 1, 2): channel 0 parallel (cos 1), channel 1 orthogonal (cos 0).
    a = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    b = torch.tensor([[[[2.0, 0.0]]], [[[0.0, 3.0]]]])
    assert distance(a, b, "cos").item() == pytest.approx((1 - 1) + (1 - 0), abs=1e-5)
    # Opposite vectors: 1 - (-1) = 2.
    assert distance(torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]]), "cos").item() == pytest.approx(2, abs=1e-5)
    # A 1-D tensor is one channel: cos of [1,0] and [1,1] is 1/sqrt(2).
    assert distance(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), "cos").item() == \
        pytest.approx(1 - 1 / math.sqrt(2), abs=1e-5)


def test_unknown_distance_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown distance 'l3'"):
        distance(torch.zeros(2), torch.zeros(2), "l3")
    with pytest.raises(ValueError, match="shapes differ"):
        distance(torch.zeros(2), torch.zeros(3), "mse")


def test_matched_parameters_skip_bias_norm_and_optionally_fc():
    net = build_model("convnet_tiny", 1, 10, 28)
    names = [n for n, _ in matched_parameters(net, include_fc=False)]
    assert names and all("weight" in n for n in names)
    assert not any("norm" in n or "classifier" in n for n in names)
    with_fc = [n for n, _ in matched_parameters(net, include_fc=True)]
    assert len(with_fc) == len(names) + 1 and with_fc[-1].startswith("classifier")


def test_bidirectional_is_weighted_sum_of_its_parts(digits):
    train, _ = digits
    torch.manual_seed(0)
    net = build_model("convnet_tiny", 1, 10, 28)
    real = train.of_class(3)[:16].float() / 255
    syn = real[:4].clone().requires_grad_(True)
    y_r, y_s = torch.full((16,), 3), torch.full((4,), 3)
    _, g = match_loss(net, real, y_r, syn, y_s, "gradient", "mse")
    _, f = match_loss(net, real, y_r, syn, y_s, "feature", "mse")
    loss, parts = match_loss(net, real, y_r, syn, y_s, "bidirectional", "mse", lambda_grad=2.0, lambda_feat=0.5)
    # The parts stay 0-d tensors on the loss's device (read once per step by the engine).
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in (*g.values(), *f.values(), *parts.values()))
    g, f, parts = ({k: float(v) for k, v in d.items()} for d in (g, f, parts))
    assert parts["grad"] == pytest.approx(g["grad"], rel=1e-5) and parts["feat"] == pytest.approx(f["feat"], rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * g["grad"] + 0.5 * f["feat"], rel=1e-5)
    # Feature term by hand: squared distance of the mean embeddings.
    with torch.no_grad():
        want = (net.embed(real).mean(0) - net.embed(syn).mean(0)).pow(2).sum().item()
    assert f["feat"] == pytest.approx(want, rel=1e-5)
    # The loss reaches the synthetic images and leaves the network's .grad alone.
    (gs,) = torch.autograd.grad(loss, [syn])
    assert gs.abs().sum() > 0 and all(p.grad is None for p in net.parameters())
