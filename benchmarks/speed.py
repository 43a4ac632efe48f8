"""Speed and memory of a DREAM+ inner step in the paper's MNIST setting (issue: speed).

    python benchmarks/speed.py                       # full-class clustering
    python benchmarks/speed.py --cluster-pool 1024   # cluster a 1,024-image pool per class
    python benchmarks/speed.py --profile             # + torch.profiler table of one step

Setting: MNIST IPC 10, f=2, ConvNet-3 w128, real batch 128, tau=10 (k=128 clusters of
1 sample), network trained on 500 real images per inner step, L1 distance. Reports:
- start-up (1-epoch network training on `--init-images` real images + k-means init),
- the average inner step over a full tau-cycle (one clustering round + tau-1 plain steps),
  split into matching / network update / feature extraction / k-means,
- the FLOP count of a plain inner step (torch.utils.flop_counter, double backward included)
  and this machine's throughput on the same network's forward+backward, measured in the
  same run: the "FLOP-bound time" = FLOPs / throughput, and step / FLOP-bound (target ≤ 1.2),
- peak resident memory of the process.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, save  # noqa: E402

from dream_dist.data import load_dataset  # noqa: E402
from dream_dist.data.shards import ClassCache, PackedReader, pack  # noqa: E402
from dream_dist.methods.dream.config import preset  # noqa: E402
from dream_dist.methods.dream.engine import Distiller  # noqa: E402
from dream_dist.methods.dream.shard import ClassShard  # noqa: E402
from dream_dist.models import build_model  # noqa: E402


def conv_throughput(width: int, batch: int = 256, reps: int = 3) -> float:
    """GFLOP/s of ConvNet-3 forward+backward on 28-px inputs (counted, then timed)."""
    net = build_model("convnet", 1, 10, 28, width=width)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()

    with FlopCounterMode(display=False) as fc:
        step()
    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return fc.get_total_flops() * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster-pool", type=int, default=None)
    ap.add_argument("--init-images", type=int, default=None, help="None = one full epoch (60,000)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--packed", default="outputs/packed/mnist")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(args.packed)
    if not (root / "index-train.json").exists():
        pack(load_dataset("mnist", "train"), root, "train", source="mnist", progress=False)
    reader = PackedReader(root, "train")
    cache = ClassCache(reader, 2**30)  # 47 MB of uint8 MNIST fits; kept as uint8, never float
    counts = reader.index["counts"]
    cfg = preset("dream_plus", iterations=1, inner_steps=10, width=args.width, init_images=args.init_images,
                 cluster_pool=args.cluster_pool).resolved("mnist")
    shard = ClassShard(list(range(10)), cache, cfg, *reader.mean_std, 10)
    d = Distiller(cfg, [shard], counts, 1, 28, progress=False)

    t0 = time.perf_counter()
    d.initialize()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    d.run()  # one full tau-cycle: 1 clustering round + 9 plain steps
    steps = [h for h in d.history if "time/step" in h]
    avg_step = (time.perf_counter() - t0) / len(steps)
    cluster = steps[0].get("time/cluster_features", 0) + steps[0].get("time/kmeans", 0)
    plain = sum(h["time/step"] for h in steps[1:]) / (len(steps) - 1)
    # Peak of the distillation itself, read before the FLOP counter and profiler below add
    # their own bookkeeping to the process.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # FLOPs of one plain inner step (selection fixed, so no clustering inside).
    d.it, d.step = 0, 1
    d.net = d.new_net((0,))
    d.opt_net = d._net_opt(d.net)
    with FlopCounterMode(display=False) as fc:
        shard.match_step(d.net, 0, 1)
        for j in range(cfg.net_steps):
            d._net_update(j)
    flops = fc.get_total_flops()
    tput = conv_throughput(args.width)
    bound = flops / (tput * 1e9)

    rows = [
        {"figure": "start-up (init net + k-means init)", "value": f"{startup:.0f} s", "target": "≤ 300 s",
         "public DREAM+ code": "417 s (242 + 175)"},
        {"figure": "average inner step incl. clustering (tau=10)", "value": f"{avg_step:.2f} s",
         "target": "≤ 16 s", "public DREAM+ code": "27.8 s"},
        {"figure": "plain inner step (no clustering)", "value": f"{plain:.2f} s", "target": "-",
         "public DREAM+ code": "12.6 s"},
        {"figure": "clustering round (features + k-means, 10 classes)", "value": f"{cluster:.1f} s",
         "target": "-", "public DREAM+ code": "~150 s (15 s/class)"},
        {"figure": "FLOPs of a plain inner step", "value": f"{flops / 1e12:.3f} TFLOP", "target": "-",
         "public DREAM+ code": "-"},
        {"figure": "measured fwd+bwd throughput (same run)", "value": f"{tput:.1f} GFLOP/s", "target": "-",
         "public DREAM+ code": "-"},
        {"figure": "plain step / FLOP-bound time", "value": f"{plain / bound:.2f}x ({bound:.2f} s bound)",
         "target": "≤ 1.2x", "public DREAM+ code": "-"},
        {"figure": "peak resident memory (start-up + 10 steps)", "value": f"{peak_mb:.0f} MB", "target": "≤ 2048 MB",
         "public DREAM+ code": "8150 MB"},
    ]
    table = markdown(rows, ["figure", "value", "target", "public DREAM+ code"])
    table += (f"\n\nSetting: MNIST IPC 10, f=2, ConvNet-3 w{args.width}, real batch 128, tau 10, 500 real images "
              f"per network update, {args.threads} threads; cluster pool: {args.cluster_pool or 'whole class'}; "
              f"init network trained on {args.init_images or 'all 60,000'} images.")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            shard.match_step(d.net, 0, 2)
            for j in range(cfg.net_steps):
                d._net_update(j)
        prof_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        table += "\n\nProfile of one plain inner step (top 15 ops by self CPU time):\n\n```\n" + prof_table + "\n```"
    name = args.name or f"speed_pool{args.cluster_pool or 'all'}"
    save(name, {"startup_s": startup, "avg_step_s": avg_step, "plain_step_s": plain, "cluster_round_s": cluster,
                "step_flops": flops, "throughput_gflops": tput, "peak_mb": peak_mb, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
