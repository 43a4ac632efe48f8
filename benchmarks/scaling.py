"""Scaling of class-sharded distillation on Ray Train workers (issue: Ray scale-out, item 8).

    python benchmarks/scaling.py                        # TinyImageNet-sub100, 1 vs 2 workers
    python benchmarks/scaling.py --steps 3 --width 8    # a quick smoke run

Setting (a reduced CPU preset of DREAM+ on TinyImageNet-sub100, 200 classes x 100 images, 64 px):
ConvNet-4 of width --width (paper 128), IPC 1 with f=2, real batch --batch-real (paper 128;
the subset has 100 images per class), 1 x --steps inner steps, tau 10, real-image init (the
start-up is not what is measured), one torch thread per worker.

Measured in ONE run, so the ratios are comparable:
- throughput = inner steps per second of distillation time (rank 0's engine time, start-up
  excluded) with 1 worker owning 200 classes and 2 workers owning 100 each;
  scaling efficiency = throughput(2) / (2 x throughput(1)) (target >= 0.8);
- per-worker peak memory (the worker process's max RSS) against classes per worker
  (200, 100, and a 1-worker run on --small-classes classes);
- bytes all-reduced per inner step and the time spent in the all-reduce.
The per-class cost and the fixed per-step cost fitted from these runs feed the ImageNet-1K
model in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, save  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def run(args, workers: int, classes: list[int] | None, tmp: Path) -> dict:
    from dream_dist.distributed.train import distill_on_ray
    from dream_dist.methods import METHODS
    from dream_dist.tasks import compose

    over = [f"dataset={args.dataset}", f"pack.out={args.packed}", f"out_dir={tmp}/k{workers}",
            "progress=false", "threads=1", "distill.method=dream_plus",
            f"++distill.overrides.width={args.width}", "++distill.overrides.ipc=1",
            "++distill.overrides.iterations=1", f"++distill.overrides.inner_steps={args.steps}",
            f"++distill.overrides.batch_real={args.batch_real}", f"++distill.overrides.net_images={args.net_images}",
            "++distill.overrides.init=real", f"distill.checkpoint_every={args.steps}"]
    if classes is not None:
        over.append(f"dataset.classes=[{','.join(map(str, classes))}]")
    cfg = compose(over)
    t0 = time.perf_counter()
    _, _, result = distill_on_ray(cfg, METHODS["distill"], num_workers=workers, storage=tmp / f"ray{workers}_{len(classes or [])}")
    wall = time.perf_counter() - t0
    m = result.metrics
    return {"workers": workers, "classes_per_worker": m["classes"], "steps": m["step"],
            "distill_s": m["distill_seconds"], "wall_s": wall,
            "steps_per_s": m["step"] / m["distill_seconds"], "peak_rss_mb": m["peak_rss_mb"],
            "allreduce_mb_per_step": m["allreduce_bytes"] / m["step"] / 2**20,
            "allreduce_s_per_step": m["allreduce_seconds"] / m["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="tinyimagenet")
    ap.add_argument("--packed", default="outputs/packed/tinyimagenet")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-real", type=int, default=16)
    ap.add_argument("--net-images", type=int, default=256)
    ap.add_argument("--small-classes", type=int, default=50)
    ap.add_argument("--name", default="scaling_tinyimagenet")
    args = ap.parse_args()

    import ray

    from dream_dist.data.prepare import ensure_packed
    from dream_dist.tasks import compose

    ensure_packed(compose([f"dataset={args.dataset}", f"pack.out={args.packed}", "progress=false"]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        rows = [run(args, 1, None, tmp), run(args, 2, None, tmp),
                run(args, 1, list(range(args.small_classes)), tmp)]
    ray.shutdown()
    one, two = rows[0], rows[1]
    eff = two["steps_per_s"] / (2 * one["steps_per_s"])
    # Per-step cost model t(step) = a + b * classes_per_worker from the two 1-worker runs.
    small = rows[2]
    b = (1 / one["steps_per_s"] - 1 / small["steps_per_s"]) / (one["classes_per_worker"] - small["classes_per_worker"])
    a = 1 / one["steps_per_s"] - b * one["classes_per_worker"]
    for r in rows:
        r["efficiency"] = f"{r['steps_per_s'] / (r['workers'] * one['steps_per_s']):.2f}" if r is not small else "-"
        for k in ("distill_s", "wall_s", "steps_per_s", "peak_rss_mb", "allreduce_mb_per_step", "allreduce_s_per_step"):
            r[k] = round(r[k], 3)
    table = markdown(rows, ["workers", "classes_per_worker", "steps", "distill_s", "steps_per_s", "efficiency",
                            "peak_rss_mb", "allreduce_mb_per_step", "allreduce_s_per_step", "wall_s"])
    table += (f"\n\nScaling efficiency at 2 workers: **{eff:.2f}** (target >= 0.80; baseline = the 1-worker run "
              f"of the same invocation).  \nFitted per-step cost: {a:.3f} s fixed + {b * 1000:.2f} ms per class "
              f"(from the 1-worker runs on {one['classes_per_worker']} and {small['classes_per_worker']} classes).")
    save(args.name, {"rows": rows, "efficiency": eff, "fixed_s": a, "per_class_s": b, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
