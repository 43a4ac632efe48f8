"""Which parts of a run depend on the thread count? (issue 11: what changes results)

    python benchmarks/thread_determinism.py

Runs each piece of a DREAM+ step at 1 and at 2 intra-op threads on the same inputs and
compares the results bit for bit, with the time at each thread count (the cost of pinning):
- the no-grad feature pass that clustering uses (ConvNet-3 w128 on one digits class),
- FAISS k-means on those same features (OpenMP threads 1 vs 2),
- the matching gradient with respect to the images (what updates the synthetic set),
- the network's weight gradients (what the network-training steps apply).
The baseline of each row is the same computation at 1 thread, in the same run.
Results: docs/results/thread_determinism.{md,json}; discussion in docs/reproducibility.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, save  # noqa: E402

from dream_dist import kmeans  # noqa: E402
from dream_dist.training import extract_features  # noqa: E402
from dream_dist.data import load_dataset, normalize  # noqa: E402
from dream_dist.models import build_model  # noqa: E402


def at_threads(fn, threads: int, repeat: int = 3):
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    out = fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return out, (time.perf_counter() - t0) / repeat


def compare(name: str, fn) -> dict:
    (a, t1), (b, t2) = at_threads(fn, 1), at_threads(fn, 2)
    a, b = ([a] if torch.is_tensor(a) else a), ([b] if torch.is_tensor(b) else b)
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return {"computation": name, "bit-identical at 1 vs 2 threads": "yes" if same else "no",
            "max abs difference": f"{diff:.1e}", "s at 1 thread": f"{t1:.3f}", "s at 2 threads": f"{t2:.3f}",
            "speed-up of 2 threads": f"{t1 / t2:.2f}x"}


def main() -> None:
    train = load_dataset("digits", "train")
    mean, std = train.mean_std()
    torch.manual_seed(0)
    net = build_model("convnet", 1, 10, 28, width=128)
    x = train.of_class(3)
    feats = extract_features(net, x, mean, std)
    real = normalize(train.images[:128], mean, std)
    y = train.labels[:128]
    syn = torch.rand(40, 1, 28, 28, requires_grad=True)

    def image_grad():
        loss = F.cross_entropy(net(syn), torch.arange(40) % 10)
        return torch.autograd.grad(loss, [syn])[0]

    def weight_grads():
        net.zero_grad()
        F.cross_entropy(net(real), y).backward()
        return [p.grad.clone() for p in net.parameters()]

    rows = [
        compare("feature pass (no grad), 144 images", lambda: extract_features(net, x, mean, std)),
        compare("FAISS k-means, 32 centres, same features", lambda: torch.as_tensor(
            np.asarray(kmeans.kmeans(feats, 32, niter=20, seed=1)[0]))),
        compare("gradient w.r.t. 40 synthetic images", image_grad),
        compare("network weight gradients, batch 128", weight_grads),
    ]
    cols = list(rows[0])
    save("thread_determinism", {"rows": rows}, markdown(rows, cols))


if __name__ == "__main__":
    main()
