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

The data path (pack, memory, shard reads) comes from the 1000-class stress set
(benchmarks/scale_stress.py, docs/results/scale_stress*.json) when those results exist:
- MEASURED there: pack images/s with 1 and 2 workers, peak RSS per pack process at 250 / 500 /
  1000 classes, per-worker RSS and shard bytes read of DREAM+ on 2 Ray workers with a quarter
  memory budget;
- MEASURED here: the seconds to decode one stress-set JPEG (48-160 px) and one 500 x 375 JPEG
  (ImageNet's most common size) to 64 px, with and without pack.jpeg_draft, so the stress
  throughput converts to ImageNet's larger files: per image = (stress per-image time -
  stress decode) + ImageNet decode;
- ASSUMED: the 2-worker pack efficiency holds at more workers, 1,281,167 training images.
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


def stress_images(n: int, seed: int = 1) -> list:
    """n pictures like the stress set's (random sizes 48-160 px)."""
    import numpy as np
    from scale_stress import stress_image

    rng = np.random.default_rng(seed)
    return [stress_image(rng, rng.integers(0, 256, 3), 1 + i % 17, *(int(v) for v in rng.integers(48, 161, 2)))
            for i in range(n)]


def imagenet_like(n: int, seed: int = 0) -> tuple[list, str]:
    """n 500 x 375 pictures (ImageNet's most common size) with a photo's texture: mosaics of
    8 x 6 TinyImageNet photos (64 px, native detail) when the shared data is there, else the
    stress pattern at that size (smoother: a JPEG of it decodes faster than a photo)."""
    import numpy as np
    from PIL import Image
    from scale_stress import stress_image

    from dream_dist.data import default_root

    rng = np.random.default_rng(seed)
    root = default_root("tinyimagenet")
    files = sorted((root / "train").glob("*/images/*.JPEG")) if root is not None and (root / "train").is_dir() else []
    if len(files) < 48:
        return [stress_image(rng, rng.integers(0, 256, 3), 1 + i % 17, 375, 500) for i in range(n)], "stress pattern"
    out = []
    for _ in range(n):
        tiles = [np.asarray(Image.open(files[j]).convert("RGB")) for j in rng.choice(len(files), 48, replace=False)]
        rows = [np.concatenate(tiles[r * 8:(r + 1) * 8], axis=1) for r in range(6)]
        out.append(np.ascontiguousarray(np.concatenate(rows, axis=0)[:375, :500]))
    return out, "mosaics of TinyImageNet photos"


def decode_seconds(images: list, jpeg_draft: bool) -> tuple[float, float]:
    """(mean seconds, mean KB): each picture saved as a JPEG (quality 90), then decoded to 64 px,
    shorter side + centre crop, one thread: the pack's per-image decode."""
    import tempfile

    from PIL import Image
    from scale_stress import SIZE

    from dream_dist.data.folder import decode_image

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(images):
            p = Path(tmp) / f"{i}.JPEG"
            Image.fromarray(img).save(p, quality=90)
            paths.append(p)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        decode_image(paths[0], size=SIZE, resize="shorter", jpeg_draft=jpeg_draft)  # warm PIL's plugins
        t0 = time.perf_counter()
        for p in paths:
            decode_image(p, size=SIZE, resize="shorter", jpeg_draft=jpeg_draft)
        return (time.perf_counter() - t0) / len(paths), kb


def _num(v) -> float | None:
    return None if v in (None, "", "-") else float(str(v).split()[0])


def data_path() -> tuple[str, dict] | None:
    """The ImageNet-1K data path from the stress-set measurements (None when they are absent)."""
    from scale_stress import DREAM

    pack_file, run_file = RESULTS / "scale_stress.json", RESULTS / "scale_stress_run.json"
    if not pack_file.exists() or not run_file.exists():
        return None
    pack, run = json.loads(pack_file.read_text()), json.loads(run_file.read_text())
    stream = {w: sorted((r for r in pack["rows"] if r["pack"].startswith(f"stream, {w} worker")),
                        key=lambda r: r["classes"]) for w in (1, 2)}
    big1, big2 = stream[1][-1], stream[2][-1]
    ips1, ips2 = _num(big1["images/s"]), _num(big2["images/s"])
    eff2 = ips2 / (2 * ips1)
    # The stress rows were packed with the default decode (pack.jpeg_draft on).
    t_stress, kb_stress = decode_seconds(stress_images(200), True)
    inet, inet_kind = imagenet_like(60)
    t_full, kb_inet = decode_seconds(inet, False)
    t_draft, _ = decode_seconds(inet, True)
    rest = max(1 / ips1 - t_stress, 0.0)  # PNG encode, tar write, statistics: the same per 64-px image
    per_image, per_image_draft = rest + t_full, rest + t_draft
    images = 1_281_167
    rows = []
    for k in (1, 2, 16, 64):
        scale = 1 if k == 1 else k * eff2
        rows.append({"pack workers (cores)": k,
                     "images/s, full decode": f"{scale / per_image:.0f}",
                     "hours, full decode": f"{images * per_image / scale / 3600:.2f}",
                     "images/s, jpeg_draft": f"{scale / per_image_draft:.0f}",
                     "hours, jpeg_draft": f"{images * per_image_draft / scale / 3600:.2f}"})
    rss = {w: [_num(r["driver peak RSS MB"]) for r in stream[w]] for w in (1, 2)}
    ray_rss = [_num(r["Ray worker peak RSS MB"]) for r in stream[2]]
    runs = {r["run"]: r for r in run["rows"]}
    inproc = runs["dream_plus in process"]
    ray2 = runs["dream_plus 2 Ray workers, budget 1/4"]
    steps = int(next(o for o in DREAM if "inner_steps=" in o).split("=")[1])
    n = int(inproc["classes"])
    mb_read = _num(ray2["shard MB read (rank 0)"])
    per_class_step_kb = mb_read * 1024 / steps / (n / 2) if mb_read else None
    text = (
        "\n\n**Data path, folded in from the 1000-class stress set** (`benchmarks/scale_stress.py`; "
        "decode costs measured in this run):\n\n" + markdown(rows, list(rows[0])) + "\n\n"
        f"- Pack, measured on the stress set ({big1['classes']} classes, {big1['images']} JPEGs): "
        f"{ips1:.0f} images/s with 1 worker, {ips2:.0f} with 2 (efficiency {eff2:.2f}). Decoding to 64 px "
        f"costs {t_stress * 1e3:.2f} ms for a stress JPEG ({kb_stress:.0f} KB) and {t_full * 1e3:.2f} ms for a "
        f"500 x 375 one ({inet_kind}, {kb_inet:.0f} KB; ImageNet's train JPEGs average ≈ 110 KB) "
        f"({t_draft * 1e3:.2f} ms with `pack.jpeg_draft`, the default: {t_full / t_draft:.1f}x less), "
        f"so an ImageNet image costs {per_image * 1e3:.2f} ms of pack time ({per_image_draft * 1e3:.2f} ms with the "
        f"draft decode; {rest * 1e3:.2f} ms of it PNG encode + write, measured as the stress remainder).\n"
        f"- Pack peak RSS per process is flat in the class count: 1 worker "
        f"{' / '.join(f'{v:.0f}' for v in rss[1])} MB, 2 workers' driver {' / '.join(f'{v:.0f}' for v in rss[2])} MB "
        f"and largest Ray worker {' / '.join(f'{v:.0f}' for v in ray_rss if v)} MB at "
        f"{' / '.join(str(r['classes']) for r in stream[1])} classes: it does not grow with ImageNet's 1000 classes "
        f"or 1.28 M images (the in-memory pack it replaced would hold {images * 3 * 64 * 64 / 2**30:.1f} GB).\n"
        f"- DREAM+ on 2 Ray workers with a quarter memory budget ({n} classes, {steps} inner steps): largest "
        f"Ray worker {ray2['Ray worker peak RSS MB']} MB, driver {ray2['driver peak RSS MB']} MB (in process, one "
        f"worker with every class cached: {inproc['driver peak RSS MB']} MB); rank 0 read {ray2['shard MB read (rank 0)']} MB "
        f"from its shards" + (f", {per_class_step_kb:.0f} KB per class-step including the initialisation's and "
                              f"the clustering rounds' whole-class reads." if per_class_step_kb else "."))
    payload = {"pack_images_per_s": [ips1, ips2], "pack_efficiency_2": eff2, "decode_s_stress": t_stress,
               "decode_s_imagenet": t_full, "decode_s_imagenet_draft": t_draft,
               "pack_s_per_imagenet_image": [per_image, per_image_draft], "pack_rows": rows,
               "pack_rss_mb": rss, "run": {"in_process": inproc, "ray_quarter_budget": ray2,
                                           "kb_per_class_step": per_class_step_kb}}
    return text, payload


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
    data = data_path()
    if data is not None:
        table += data[0]
    save(args.name, {"rows": rows, "args": vars(args), "inputs": {
        "per_class_s": meas["per_class_s"], "fixed_s": meas["fixed_s"], "cpu_gflops": gflops,
        "flops_per_image_measured": f_meas, "flops_per_image_imagenet": f_inet, "params": params},
        "data_path": data[1] if data else None}, table)


if __name__ == "__main__":
    main()
