"""A cost model of DREAM+ on ImageNet-1K (64 x 64) with 8 GPU workers, built from measured costs.

    python benchmarks/imagenet_model.py                       # reads docs/results/scaling_tinyimagenet.json
    python benchmarks/imagenet_model.py --gpu-tflops 30 --bus-gbs 20

Inputs:
- MEASURED (benchmarks/scaling.py, this repository): the per-class cost b and the fixed cost a of
  one inner step on this CPU, the model/resolution they were measured with, and the bytes
  all-reduced per step;
- MEASURED here: FLOPs per image of the measured network and of the ImageNet network
  (torch.utils.flop_counter), and this CPU's conv throughput on the measured network, so the
  per-class cost converts to FLOPs;
- ASSUMED (flags, stated in the output): the GPU's sustained throughput on this workload and
  the all-reduce bus bandwidth.

Model of one inner step on K workers owning C/K classes each:
    t(K) = a_gpu + b_gpu * C / K + comm(K),   comm(K) = syncs * 2 (K-1)/K * P * 8 B / bus
(float64 gradient sums, ring all-reduce), efficiency(K) = t(1) / (K t(K)).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown, save  # noqa: E402

from dream_dist.models import build_model  # noqa: E402


def flops_per_image(model: str, channels: int, classes: int, size: int, width: int | None) -> float:
    """Forward+backward FLOPs per image (batch 2, divided by 2)."""
    net = build_model(model, channels, classes, size, width=width)
    x, y = torch.randn(2, channels, size, size), torch.randint(0, classes, (2,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(net(x), y).backward()
    return fc.get_total_flops() / 2


def cpu_gflops(model: str, channels: int, classes: int, size: int, width: int | None, batch: int = 64) -> float:
    net = build_model(model, channels, classes, size, width=width)
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, classes, (batch,))
    F.cross_entropy(net(x), y).backward()
    t0 = time.perf_counter()
    for _ in range(3):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
    return 3 * batch * flops_per_image(model, channels, classes, size, width) / (time.perf_counter() - t0) / 1e9


def activation_bytes(model: str, size: int, batch: int) -> float:
    """Bytes of every module output in one forward at `batch` (x3: double backward keeps the
    graph of the first backward alive), a proxy for the matching step's working set."""
    net = build_model(model, 3, 1000, size)
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    hs = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.randn(1, 3, size, size))
    for h in hs:
        h.remove()
    return 3 * total[0] * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scaling", default=str(RESULTS / "scaling_tinyimagenet.json"))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--classes", type=int, default=1000)
    # ImageNet-1K at 64 x 64 (the downsampled ImageNet of DM/TESLA-style work) with ConvNet-4:
    # our ResNets have the CIFAR stem (stride 1, no max-pool), wrong for 224 px.
    ap.add_argument("--model", default="convnet4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--batch-real", type=int, default=128)
    ap.add_argument("--images-per-class", type=int, default=1300)
    ap.add_argument("--net-syncs", type=int, default=4, help="network SGD steps per inner step (500 real / 128)")
    ap.add_argument("--gpu-tflops", type=float, default=30.0, help="ASSUMED sustained GPU throughput")
    ap.add_argument("--bus-gbs", type=float, default=100.0, help="ASSUMED all-reduce bus bandwidth, GB/s (NVLink)")
    ap.add_argument("--slow-bus-gbs", type=float, default=10.0, help="ASSUMED bandwidth of a PCIe/Ethernet setup")
    ap.add_argument("--cache-gb", type=float, default=16.0, help="ClassCache budget per worker")
    ap.add_argument("--name", default="imagenet_model")
    args = ap.parse_args()

    torch.set_num_threads(1)
    meas = json.loads(Path(args.scaling).read_text())
    margs = meas["args"]
    width, msize = margs["width"], 64
    # Per class-step, the measured work is (real batch + IPC f² decoded synthetic) images through
    # the matching passes; the same holds on ImageNet with its own batch sizes.
    m_imgs = margs["batch_real"] + 1 * 2 ** 2
    i_imgs = args.batch_real + args.ipc * args.factor ** 2
    f_meas = flops_per_image("convnet", 3, 200, msize, width)
    f_inet = flops_per_image(args.model, 3, args.classes, args.size, None)
    gflops = cpu_gflops("convnet", 3, 200, msize, width)
    # Measured per-class seconds -> FLOPs at this CPU's measured throughput -> ImageNet FLOPs.
    b_flops = meas["per_class_s"] * gflops * 1e9 * (f_inet * i_imgs) / (f_meas * m_imgs)
    b_gpu = b_flops / (args.gpu_tflops * 1e12)
    a_gpu = max(meas["fixed_s"], 0.0) * gflops / (args.gpu_tflops * 1e3) * (f_inet / f_meas)
    params = sum(p.numel() for p in build_model(args.model, 3, args.classes, args.size).parameters())

    def step_time(k: int, bus_gbs: float = args.bus_gbs) -> tuple[float, float]:
        comm = args.net_syncs * 2 * (k - 1) / k * params * 8 / (bus_gbs * 1e9)
        return a_gpu + b_gpu * math.ceil(args.classes / k) + comm, comm

    t1, _ = step_time(1)
    rows = []
    for k in sorted({1, 2, 4, args.workers}):
        t, comm = step_time(k)
        cpw = math.ceil(args.classes / k)
        syn = cpw * args.ipc * 3 * args.size ** 2 * 4 * 2  # images + SGD momentum
        real = min(cpw * args.images_per_class * 3 * args.size ** 2, args.cache_gb * 2**30)
        act = activation_bytes(args.model, args.size, i_imgs)
        rows.append({"workers": k, "classes_per_worker": cpw, "step_s": f"{t:.2f}",
                     "comm_s": f"{comm:.3f}", "efficiency": f"{t1 / (k * t):.2f}",
                     "efficiency_slow_bus": f"{t1 / (k * step_time(k, args.slow_bus_gbs)[0]):.2f}",
                     "MB_moved_per_step": f"{args.net_syncs * 2 * (k - 1) / k * params * 8 / 2**20:.0f}",
                     "synthetic_GB": f"{syn / 2**30:.2f}", "real_cache_GB": f"{real / 2**30:.1f}",
                     "activations_GB": f"{act / 2**30:.1f}",
                     "hours_1200x100": f"{t * 120000 / 3600:.0f}"})
    table = markdown(rows, list(rows[0]))
    table += (
        f"\n\nMeasured inputs: per-class cost {meas['per_class_s'] * 1e3:.2f} ms and fixed cost "
        f"{meas['fixed_s']:.3f} s per inner step (ConvNet-4 w{width}, 64 px, real batch {margs['batch_real']}, "
        f"from `{meas['command']}` on {meas['machine']}); this CPU runs that network at {gflops:.1f} GFLOP/s; "
        f"forward+backward FLOPs per image: measured setting {f_meas / 1e9:.3f} GFLOP, {args.model} at "
        f"{args.size} px {f_inet / 1e9:.2f} GFLOP; {args.model} has {params / 1e6:.1f} M parameters.  \n"
        f"ASSUMED: {args.gpu_tflops:.0f} TFLOP/s sustained per GPU on the matching passes, {args.bus_gbs:.0f} GB/s "
        f"all-reduce bus bandwidth ({args.slow_bus_gbs:.0f} GB/s for efficiency_slow_bus), {args.net_syncs} network all-reduces (float64) per inner step, "
        f"{args.cache_gb:.0f} GB ClassCache per worker (classes beyond it stream from their shards).")
    save(args.name, {"rows": rows, "args": vars(args), "inputs": {
        "per_class_s": meas["per_class_s"], "fixed_s": meas["fixed_s"], "cpu_gflops": gflops,
        "flops_per_image_measured": f_meas, "flops_per_image_imagenet": f_inet, "params": params}}, table)


if __name__ == "__main__":
    main()
