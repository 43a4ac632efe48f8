"""Cheaper clustering rounds? The feature pass of whole-class clustering, measured (issue 9, item 5).

    python benchmarks/cluster_features.py                  # MNIST class 3 (~6,100 images), 1 thread

A DREAM+ clustering round embeds every image of every class with the matching network
(ConvNet-3 w128) and runs k-means (128 centres) on the features. The forward pass is the
cost. Each row is one way to do that pass, timed on the same images in the same run, with
the fp32 `torch.no_grad` pass (dream_dist's) as the baseline:
- `inference_mode`: exact (same numbers), less autograd bookkeeping;
- `channels_last`: the same maths in another memory layout (rounding differs);
- `bf16 autocast`: this CPU's AVX512-BF16 path (rounding differs more);
- `pool N`: cluster a seeded random pool of N images of the class instead of all of them
  (`distill.overrides.cluster_pool=N`), the cost falls with N; its accuracy effect needs a
  distillation + evaluation (docs/benchmarks.md, "Time to accuracy").
For the approximate passes, `same picks` is the fraction of the 128 selected real images
(FAISS k-means, fixed seed, then the nearest image to each centre) that equal the fp32
selection. The network is randomly initialised (timing does not depend on training).
Results: docs/results/cluster_features.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, save  # noqa: E402

from dream_dist import kmeans  # noqa: E402
from dream_dist.data import load_dataset, normalize  # noqa: E402
from dream_dist.models import build_model  # noqa: E402


def embed(net, x: torch.Tensor, mode: str, batch: int = 256) -> torch.Tensor:
    ctx = torch.inference_mode() if mode != "no_grad" else torch.no_grad()
    with ctx:
        if mode == "bf16 autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.cat([net.embed(c).float() for c in x.split(batch)])
        if mode == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            try:
                return torch.cat([net.embed(c.contiguous(memory_format=torch.channels_last)).contiguous()
                                  for c in x.split(batch)])
            finally:
                net.to(memory_format=torch.contiguous_format)
        return torch.cat([net.embed(c) for c in x.split(batch)])


def picks(feats: torch.Tensor, k: int = 128) -> set[int]:
    cent, _ = kmeans.kmeans(feats, k, niter=20, seed=1)
    return set(kmeans.nearest_distinct(feats, cent, 1).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--cls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pools", type=int, nargs="+", default=[2000, 1000])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = load_dataset(args.dataset, "train")
    mean, std = train.mean_std()
    x = normalize(train.of_class(args.cls), mean, std)
    torch.manual_seed(0)
    net = build_model("convnet", train.channels, train.num_classes, train.size, width=128).eval()

    times: dict[str, list[float]] = {}
    outs: dict[str, torch.Tensor] = {}
    modes = ["no_grad", "inference_mode", "channels_last", "bf16 autocast"]
    for _ in range(2):  # interleaved repeats: a loaded machine slows every row alike
        for m in modes:
            t0 = time.perf_counter()
            outs[m] = embed(net, x, m)
            times.setdefault(m, []).append(time.perf_counter() - t0)
    base_t = min(times["no_grad"])
    base_picks = picks(outs["no_grad"])
    rows = []
    for m in modes:
        t = min(times[m])
        same = len(picks(outs[m]) & base_picks) / len(base_picks)
        rel = float((outs[m] - outs["no_grad"]).norm() / outs["no_grad"].norm())
        rows.append({"feature pass": m, "images": len(x), "images/s": f"{len(x) / t:.0f}",
                     "speed-up vs no_grad fp32": f"{base_t / t:.2f}x", "rel. feature error": f"{rel:.1e}",
                     "same picks": f"{same:.2f}"})
    for n in args.pools:
        sub = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
        t0 = time.perf_counter()
        embed(net, sub, "no_grad")
        t = time.perf_counter() - t0
        rows.append({"feature pass": f"pool {n} (no_grad fp32)", "images": n, "images/s": f"{n / t:.0f}",
                     "speed-up vs no_grad fp32": f"{base_t / t:.2f}x", "rel. feature error": "-",
                     "same picks": "other images"})
    save("cluster_features", {"rows": rows, "threads": args.threads},
         f"Feature pass of one clustering round, {args.dataset} class {args.cls}, ConvNet-3 w128, "
         f"{args.threads} thread(s); baseline = dream_dist's no_grad fp32 pass, same run.\n\n"
         + markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
