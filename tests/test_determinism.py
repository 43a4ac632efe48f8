"""Determinism on CUDA (docs/reproducibility.md, "On CUDA"): every deterministic formulation
equals the op it replaces, and no step of distillation or evaluation runs an op that has no
deterministic CUDA kernel (traced on CPU: the same ops dispatch on CUDA)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dream_dist import determinism
from dream_dist.augment import DSA, affine_warp, cutmix_draw, dc_augment
from dream_dist.determinism import NONDETERMINISTIC_CUDA_OPS, cross_entropy, nondeterministic, trace_ops
from dream_dist.formation import decode
from dream_dist.methods.dream.config import preset
from dream_dist.methods.dream.engine import Distiller
from dream_dist.methods.dream.shard import ClassShard
from dream_dist.models import build_model
from dream_dist.seeding import host_ints

TINY = dict(model="convnet_tiny", init_images=256, batch_real=16, net_images=64, net_batch=32)
TOL = dict(rtol=0, atol=1e-6)


def assert_grad_close(g, ref):
    """Gradients within 1e-6 of their scale: a pixel's gradient sums up to f² (decode) or ~4
    (warp) products, in another order than the replaced kernel's, so its float32 rounding is
    relative to the gradient's size, not absolute."""
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the replaced ops, as they were

def ref_decode(images, f):
    n, c, h, w = images.shape
    parts = images.reshape(n, c, f, h // f, f, w // f).permute(0, 2, 4, 1, 3, 5).reshape(n * f * f, c, h // f, w // f)
    return F.interpolate(parts, size=(h, w), mode="bilinear", align_corners=False)


def ref_warp(x, theta, align_corners):
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


@torch.no_grad()
def ref_dc_augment(x, strategy="crop_scale_rotate", generator=None, crop=4, scale=0.2, rotate=45, noise=0.001):
    """augment.dc_augment before it was vectorised: a loop over images, reading each draw."""
    ops = [op for op in strategy.split("_") if op]
    n, ch, h, w = x.shape
    mean, out = x.mean(dim=(0, 2, 3)), x.clone()
    for i, k in enumerate(torch.randint(0, len(ops), (n,), generator=generator).tolist()):
        op, img = ops[k], x[i]
        if op == "crop":
            pad = mean.view(ch, 1, 1).expand(ch, h + 2 * crop, w + 2 * crop).clone()
            pad[:, crop:crop + h, crop:crop + w] = img
            r, c = (int(v) for v in torch.randint(0, 2 * crop, (2,), generator=generator))
            out[i] = pad[:, r:r + h, c:c + w]
        elif op == "scale":
            u = torch.rand(2, generator=generator) * 2 * scale + 1 - scale
            nh, nw = int(u[0] * h), int(u[1] * w)
            tmp = F.interpolate(img[None], size=(nh, nw))[0]
            side = max(nh, nw, h, w)
            canvas = torch.zeros(ch, side, side)
            r, c = (side - nh) // 2, (side - nw) // 2
            canvas[:, r:r + nh, c:c + nw] = tmp
            r, c = (side - h) // 2, (side - w) // 2
            out[i] = canvas[:, r:r + h, c:c + w]
        elif op == "rotate":
            a = math.radians(int(torch.randint(-rotate, rotate, (1,), generator=generator)))
            theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])[None]
            fill = float(mean.mean())
            grid = F.affine_grid(theta, [1, ch, h, w], align_corners=False)
            out[i] = F.grid_sample((img - fill)[None], grid, align_corners=False)[0] + fill
        else:
            out[i] = img + noise * torch.randn(img.shape, generator=generator)
    return out


def random_thetas(n: int, g: torch.Generator) -> torch.Tensor:
    """Scale (x [1/1.2, 1.2] per axis) then rotate (±15°) thetas, as DSA draws them."""
    s = torch.rand(n, 2, generator=g) * (1.2 - 1 / 1.2) + 1 / 1.2
    a = (torch.rand(n, generator=g) - 0.5) * 2 * math.radians(15)
    rot = torch.stack([torch.stack([a.cos(), -a.sin()], 1), torch.stack([a.sin(), a.cos()], 1)], 1)
    lin = rot @ torch.diag_embed(s)
    return torch.cat([lin, torch.zeros(n, 2, 1)], 2)


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_decode_equals_bilinear_interpolate(size, factor):
    size -= size % factor  # factor 3: 27, 30 and 63 px
    x = torch.rand(3, 2, size, size, requires_grad=True)
    w = torch.randn(3 * factor**2, 2, size, size)
    out, ref = decode(x, factor), ref_decode(x, factor)
    torch.testing.assert_close(out, ref, **TOL)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert_grad_close(g, g_ref)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("size", [28, 32])
def test_affine_warp_equals_grid_sample(align_corners, shared, size):
    g = gen(size + align_corners + 2 * shared)
    x = torch.rand(6, 3, size, size, generator=g).requires_grad_(True)
    theta = random_thetas(1 if shared else 6, g)
    w = torch.randn(6, 3, size, size, generator=g)
    out, ref = affine_warp(x, theta, align_corners), ref_warp(x, theta, align_corners)
    torch.testing.assert_close(out, ref, **TOL)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    (gx_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert_grad_close(gx, gx_ref)


@pytest.mark.parametrize("mode", ["S", "I"])
def test_dsa_scale_and_rotate_equal_grid_sample(mode):
    dsa = DSA(strategy="scale_rotate", mode=mode)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    for op in ("scale", "rotate"):
        p = dsa.sample(4, 32, generator=gen(1), per_sample=True, groups=(op,))
        out = dsa.apply(x, p)
        v = getattr(p, op)
        if op == "scale":
            theta = torch.zeros(4, 2, 3)
            theta[:, 0, 0], theta[:, 1, 1] = v[:, 0], v[:, 1]
        else:
            a = v * (math.pi / 180)
            theta = torch.stack([torch.stack([a.cos(), -a.sin(), 0 * a], 1), torch.stack([a.sin(), a.cos(), 0 * a], 1)], 1)
        ref = ref_warp(x, theta, dsa.align_corners)
        torch.testing.assert_close(out, ref, **TOL)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
        assert_grad_close(gx, gx_ref)


@pytest.mark.parametrize("model", ["resnet_tiny", "resnet10_in"])
def test_resnet_pooling_is_the_spatial_mean(model):
    net = build_model(model, channels=3, num_classes=5, im_size=32)
    x = torch.randn(4, 3, 32, 32)
    feats = net.layers(torch.relu(net.bn1(net.conv1(x))))
    assert torch.equal(net.embed(x), F.adaptive_avg_pool2d(feats, 1).flatten(1))
    # No parameters or buffers were renamed: a state_dict still loads into a fresh model.
    build_model(model, channels=3, num_classes=5, im_size=32).load_state_dict(net.state_dict())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_equals_functional(reduction):
    logits = torch.randn(16, 7, requires_grad=True)
    y = torch.randint(0, 7, (16,))
    out, ref = cross_entropy(logits, y, reduction), F.cross_entropy(logits, y, reduction=reduction)
    torch.testing.assert_close(out, ref, **TOL)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert_grad_close(g, g_ref)


@pytest.mark.parametrize("strategy", ["crop_scale_rotate", "crop", "scale", "rotate", "noise", "crop_scale_rotate_noise"])
def test_dc_augment_equals_the_per_image_loop(strategy):
    x = torch.rand(24, 3, 28, 28, generator=gen(3))
    out = dc_augment(x, strategy, generator=gen(7))
    ref = ref_dc_augment(x, strategy, generator=gen(7))
    torch.testing.assert_close(out, ref, **TOL)
    if "rotate" not in strategy:  # no resampling: the same pixels, moved and filled
        assert torch.equal(out, ref)


def test_host_reads_are_cpu_only_and_exact():
    t = torch.randint(-5, 2**62, (6,), generator=gen(0))
    assert host_ints(t) == [int(v) for v in t]
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            host_ints(t.cuda())
    # CutMix and the DSA group choice read their CPU draws without a scalar read per value.
    ops = trace_ops(lambda: (cutmix_draw(8, 28, 28, prob=1.0, generator=gen(1)),
                             DSA(mode="S").sample(1, 28, generator=gen(2)),
                             DSA.idc("color_crop_cutout").sample(1, 28, generator=gen(2))))
    assert "aten._local_scalar_dense" not in ops


def test_configure_on_cpu_changes_nothing():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    assert determinism.configure("cpu") == {} and determinism.configure("cpu", False) == {}
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert determinism.ENV == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


# ---------------------------------------------------------------- op traces

def test_the_tracer_sees_the_replaced_ops_and_their_backward():
    """The old formulations run exactly the ops the list names: the trace tests below would
    fail on the code before the reformulation."""
    x = torch.rand(2, 3, 28, 28, requires_grad=True)

    def old_step():
        y = ref_warp(ref_decode(x, 2), random_thetas(1, gen(0)), True)
        logits = torch.nn.AdaptiveAvgPool2d(2)(y).flatten(1)
        F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long)).backward()

    found = nondeterministic(trace_ops(old_step))
    assert set(found) >= {"aten.upsample_bilinear2d_backward", "aten.grid_sampler_2d_backward",
                          "aten.nll_loss_forward", "aten.nll_loss_backward",
                          "aten._adaptive_avg_pool2d_backward"}, found
    # A 1x1 adaptive pool (the ResNets' old head) is lowered by torch itself to a mean, so it
    # never reached the kernel; the models now say so explicitly.
    ops = trace_ops(lambda: torch.nn.AdaptiveAvgPool2d(1)(x).sum().backward())
    assert ops["aten.mean"] == 1 and not nondeterministic(ops)
    # A conditional entry is flagged only for the arguments that raise.
    labels = torch.tensor([0, 2, 2])
    assert not nondeterministic(trace_ops(torch.bincount, labels))
    assert nondeterministic(trace_ops(torch.bincount, labels, torch.ones(3))) == {"aten.bincount": 1}
    logits = torch.randn(3, 4)
    assert not nondeterministic(trace_ops(F.cross_entropy, logits, labels, reduction="none"))
    assert nondeterministic(trace_ops(F.cross_entropy, logits, labels)) == {"aten.nll_loss_forward": 1}


@pytest.fixture(scope="module")
def train(digits):
    return digits[0]


def distiller(train, cfg, device: str = "cpu") -> Distiller:
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(train.num_classes)}
    shard = ClassShard(list(range(train.num_classes)), real, cfg, mean, std, train.num_classes, seed=0,
                       device=device)
    return Distiller(cfg, [shard], train.counts(), train.channels, train.size, seed=0, device=device,
                     progress=False)


def spy_warps(monkeypatch) -> list[bool]:
    """Record, for every DSA scale/rotate warp, whether its input needed a gradient."""
    seen: list[bool] = []
    orig = DSA._affine

    def spy(self, x, theta):
        seen.append(x.requires_grad)
        return orig(self, x, theta)

    monkeypatch.setattr(DSA, "_affine", spy)
    return seen


@pytest.mark.parametrize("method,overrides", [
    # IDC base: multi-formation decode, IDC DiffAug with scale/rotate (align_corners False),
    # CutMix'd real-data network training, clustering.
    ("dream_plus", dict(match_strategy="color_scale_rotate_cutout")),
    # DSA base: DSA (align_corners True), the network trained on the synthetic set.
    ("dream_plus_dsa", dict(inner_steps=2, ipc=2)),
])
def test_one_distillation_step_runs_no_nondeterministic_op(train, method, overrides, monkeypatch):
    kw = dict(iterations=1, inner_steps=1, tau=1, **TINY)
    cfg = preset(method, **{**kw, **overrides}).resolved("digits")
    d = distiller(train, cfg)
    d.initialize()
    warps = spy_warps(monkeypatch)
    ops = trace_ops(d.run, until_step=1)
    assert any(warps), "the step drew no scale/rotate on a differentiated batch: nothing was tested"
    assert d.global_step == 1 and ops["aten.convolution_backward"] > 0
    assert nondeterministic(ops) == {}


@pytest.mark.parametrize("model,aug_mode,strategy,cutmix", [
    ("convnet_tiny", "dsa", "color_crop_cutout_flip_scale_rotate", 0.0),
    ("convnet_tiny", "idc", "color_crop_scale_rotate", 1.0),
    ("resnet_tiny", "idc", "color_crop_scale_rotate", 1.0),
    ("resnet_tiny", "dc", "crop_scale_rotate", 0.0),
])
def test_one_evaluation_epoch_runs_no_nondeterministic_op(train, model, aug_mode, strategy, cutmix):
    from dream_dist.evaluation.protocol import EvalConfig, decode_set, train_network

    stored = torch.rand(10, 1, 28, 28, generator=gen(0))
    images, labels, _ = decode_set(stored, torch.arange(10), factor=2)
    cfg = EvalConfig(model=model, epochs=1, batch_size=16, aug_mode=aug_mode, aug_strategy=strategy,
                     cutmix_prob=cutmix)
    net = build_model(model, channels=1, num_classes=10, im_size=28)
    ops = trace_ops(train_network, net, images, labels, cfg, generator=gen(1))
    assert ops["aten.convolution_backward"] > 0
    assert nondeterministic(ops) == {}


def test_the_op_list_names_real_aten_ops():
    for name in NONDETERMINISTIC_CUDA_OPS:
        ns, op = name.split(".")
        assert ns == "aten" and hasattr(torch.ops.aten, op), name


@pytest.mark.gpu
def test_distillation_on_cuda_runs_deterministically(train):
    """With deterministic kernels on, an op without one would raise: two short DREAM+ runs
    (decode, scale/rotate, CutMix'd training, clustering) finish and give the same set."""
    keys = ("deterministic", "benchmark", "allow_tf32")
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
              *(getattr(torch.backends.cudnn, k) for k in keys))
    try:
        with warnings.catch_warnings():  # CUDA may be initialised by an earlier test
            warnings.simplefilter("ignore", RuntimeWarning)
            assert determinism.configure("cuda")["use_deterministic_algorithms"] is True
        sets = []
        for _ in range(2):
            cfg = preset("dream_plus", iterations=2, inner_steps=2, tau=1, match_strategy="color_scale_rotate_cutout",
                         **TINY).resolved("digits")
            d = distiller(train, cfg, device="cuda")
            d.initialize()
            d.run()
            sets.append(d.synthetic()[0].cpu())
        assert torch.equal(sets[0], sets[1])
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
        for k, v in zip(keys, before[2:]):
            setattr(torch.backends.cudnn, k, v)
