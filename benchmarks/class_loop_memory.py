"""RSS of one fan-out task's class loop, class by class (issue 21, "bounded memory").

    python benchmarks/class_loop_memory.py ddoq --classes 60            # the stress run's DDOQ settings
    python benchmarks/class_loop_memory.py ddoq --classes 60 --no-release   # as before the fix
    python benchmarks/class_loop_memory.py rded --classes 60

Runs the body of one Ray task (dream_dist.distributed.fanout._group_task: a PackedReader, then
the method's distill_group over its classes) in this process on the first N classes of a pack
(default: the stress pack of benchmarks/scale_stress.py) and prints the RSS before every 10th
class, then the peak. DDOQ uses the stress run's settings (identity latents, IPC 1, 10 k-means
iterations); RDED an untrained ConvNet-tiny observer (its training is not the loop), IPC 1 and
`rded.images_per_class` 50 as the stress run. `--no-release` turns off
dream_dist.memory.release_free_memory, the fix: a DDOQ loop then grows by about 40 MB a class.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dream_dist.memory import peak_rss_mb, rss_mb  # noqa: E402

SETTINGS = {
    "ddoq": ["task=ddoq", "ddoq.ipc=1", "ddoq.encoder=identity", "ddoq.kmeans_iterations=10"],
    "rded": ["task=rded", "rded.ipc=1", "rded.images_per_class=50"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(SETTINGS))
    p.add_argument("--classes", type=int, default=60)
    p.add_argument("--packed", default=str(REPO / "outputs" / "scale_stress" / "packed_1000"))
    p.add_argument("--root", default=str(REPO / "outputs" / "scale_stress" / "src"))
    p.add_argument("--no-release", action="store_true", help="disable release_free_memory (the loop before the fix)")
    args = p.parse_args()

    import dream_dist.methods.coreset
    import dream_dist.methods.ddoq
    import dream_dist.methods.rded
    from dream_dist.data.prepare import open_data
    from dream_dist.data.shards import PackedReader
    from dream_dist.distributed.fanout import _group_task
    from dream_dist.methods import METHODS
    from dream_dist.models import build_model
    from dream_dist.tasks import compose

    if args.no_release:
        for m in (dream_dist.methods.ddoq, dream_dist.methods.rded, dream_dist.methods.coreset):
            m.release_free_memory = lambda *a, **k: False
    torch.set_num_threads(1)
    out = REPO / "outputs" / "class_loop_memory"
    cfg = compose(["dataset=imagefolder", f"dataset.root={args.root}", f"dataset.packed={args.packed}",
                   f"dataset.classes=[{','.join(map(str, range(args.classes)))}]", "progress=false", "threads=1",
                   f"out_dir={out}", *SETTINGS[args.method]])
    out.mkdir(parents=True, exist_ok=True)
    method, data = METHODS[cfg.task], open_data(cfg)
    if cfg.task == "rded":
        from dream_dist.methods.rded import RDEDPrep

        observer = build_model("convnet_tiny", data.channels, len(data.names), data.image_size).eval()
        prep = RDEDPrep(observer, {}, cfg.rded.resolved_factor(data.image_size), data.mean, data.std)
    else:
        prep = method.prepare(cfg, data, out)
    rss, load = {}, PackedReader.load_class

    def load_class(self, c):
        if c % 10 == 0:
            rss[int(c)] = round(rss_mb())
        return load(self, c)

    PackedReader.load_class = load_class
    t0 = time.perf_counter()
    _group_task(method, cfg, method.remote_prep(cfg, prep), str(data.root), data.classes, 1)
    rss[args.classes] = round(rss_mb())
    print(json.dumps({"method": args.method, "classes": args.classes, "release": not args.no_release,
                      "seconds": round(time.perf_counter() - t0, 1), "rss_mb_before_class": rss,
                      "peak_mb": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
