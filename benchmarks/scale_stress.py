"""ImageNet-shaped stress set: streaming pack at 250 / 500 / 1000 classes (issue 12).

    python benchmarks/scale_stress.py --phase generate            # 1000 classes x 300 JPEGs, mixed sizes
    python benchmarks/scale_stress.py --phase pack                # the table below
    python benchmarks/scale_stress.py --phase pack --classes 250 500 --per-class 60   # smaller

The set: `--classes` folders of `--per-class` JPEGs of class-dependent patterns (a colour
and a stripe frequency per class, a disc whose place varies per image), each of a random
size between 48 and 160 px, ImageNet's shape (not its content). It is written once under
--root (default outputs/scale_stress/src).

Each row packs the first N classes to 64 px (shorter side + centre crop, PNG) in a fresh
subprocess, so its peak RSS is its own:
- `stream, 1 worker`: dream_dist.data.stream.pack_files in process;
- `stream, 2 workers`: the same with classes fanned out to 2 Ray tasks (driver RSS, and the
  largest Ray worker process RSS, sampled every 0.2 s with psutil);
- `in-memory (before)`: the previous path, the whole split decoded into one tensor and then
  written by shards.pack: the baseline, measured in the same run (smallest N only, and any N
  whose decoded pixels stay under --baseline-max-gb).
Target: the streaming rows' peak RSS flat as N grows. Results:
docs/results/scale_stress.{md,json} and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown, save  # noqa: E402

SIZE = 64


def generate(root: Path, classes: int, per_class: int) -> None:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    for c in tqdm(range(classes), desc="generate", unit="class"):
        d = root / f"n{c:08d}"
        if d.is_dir() and len(list(d.iterdir())) == per_class:
            continue
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        freq = 1 + c % 17
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(48, 161, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            stripes = (np.sin(xx * freq * np.pi / w) * 60).astype(np.int16)
            img = np.clip(colour[None, None, :] + stripes[..., None], 0, 255).astype(np.uint8)
            cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(6, 20))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255 - colour
            Image.fromarray(img).save(d / f"n{c:08d}_{i:05d}.JPEG", quality=90)


class RaySampler(threading.Thread):
    """Largest RSS of any Ray worker process, sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.stop = 0.0, False

    def run(self):
        import psutil

        while not self.stop:
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                # Ray workers retitle themselves "ray::<task>" (setproctitle).
                if ("default_worker.py" in cmd or cmd.startswith("ray::")) and p.info.get("memory_info"):
                    self.peak_mb = max(self.peak_mb, p.info["memory_info"].rss / 2**20)
            time.sleep(0.2)


def pack_one(args) -> None:
    """One row, in this (fresh) process: prints a JSON line."""
    from dream_dist.data.stream import FileSource, imagefolder_source, pack_files
    from dream_dist.distributed.tasks import ray_mapper

    full = imagefolder_source(args.root, "train")
    src = FileSource("stress", full.classes[: args.n], full.files[: args.n])
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    images = sum(len(f) for f in src.files)
    sampler = None
    t0 = time.perf_counter()
    if args.mode == "memory":
        from dream_dist.data.shards import pack
        from dream_dist.data.stream import decode_source

        pack(decode_source(src, size=SIZE), out, "train", source="stress", progress=False)
    else:
        if args.workers > 1:
            import ray

            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            sampler = RaySampler()
            sampler.start()
            t0 = time.perf_counter()  # Ray's start-up is not packing
        pack_files(src, out, "train", size=SIZE, progress=False,
                   mapper=ray_mapper(args.workers) if args.workers > 1 else None)
    wall = time.perf_counter() - t0
    if sampler is not None:
        sampler.stop = True
        sampler.join()
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"classes": args.n, "images": images, "mode": args.mode, "workers": args.workers,
                      "wall_s": wall, "images_per_s": images / wall,
                      "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ray_worker_peak_mb": sampler.peak_mb if sampler else None}))


def pack_table(args) -> None:
    rows = []
    decoded_gb = lambda n: n * args.per_class * 3 * SIZE * SIZE / 2**30  # noqa: E731
    plan = [(n, "stream", 1) for n in args.classes] + [(n, "stream", 2) for n in args.classes]
    plan += [(n, "memory", 1) for n in args.classes if n == min(args.classes) or decoded_gb(n) <= args.baseline_max_gb]
    for n, mode, workers in plan:
        cmd = [sys.executable, __file__, "--phase", "pack-one", "--root", str(args.root), "--n", str(n),
               "--mode", mode, "--workers", str(workers), "--out", str(REPO / "outputs" / "scale_stress" / "packed")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(r, flush=True)
        rows.append({"classes": n, "images": r["images"],
                     "pack": ("stream" if mode == "stream" else "in-memory (before)") + f", {workers} worker{'s' if workers > 1 else ''}",
                     "wall s": f"{r['wall_s']:.0f}", "images/s": f"{r['images_per_s']:.0f}",
                     "driver peak RSS MB": f"{r['driver_peak_mb']:.0f}",
                     "Ray worker peak RSS MB": f"{r['ray_worker_peak_mb']:.0f}" if r["ray_worker_peak_mb"] else "-"})
    text = (f"Streaming pack of a generated ImageNet-shaped set ({args.per_class} JPEGs per class, 48-160 px, "
            f"packed to {SIZE} px, PNG). Each row is a fresh process.\n\n" + markdown(rows, list(rows[0])))
    save("scale_stress", {"rows": rows, "per_class": args.per_class}, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["generate", "pack", "pack-one"], default="pack")
    ap.add_argument("--root", type=Path, default=REPO / "outputs" / "scale_stress" / "src")
    ap.add_argument("--classes", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--baseline-max-gb", type=float, default=2.0)
    ap.add_argument("--n", type=int)
    ap.add_argument("--mode", choices=["stream", "memory"], default="stream")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.phase == "generate":
        generate(args.root, max(args.classes), args.per_class)
    elif args.phase == "pack-one":
        pack_one(args)
    else:
        pack_table(args)


if __name__ == "__main__":
    main()
