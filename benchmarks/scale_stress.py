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

    python benchmarks/scale_stress.py --phase run --classes 1000   # methods on the packed stress set

The run phase packs the first N classes (train: every image; "test": the first
--test-per-class images of each class, the same pictures: a stress set has no held-out
split, so its accuracies mean nothing) and runs, each in a fresh process through the one
pipeline (dream_dist.tasks.main):
- DREAM+ (a few inner steps of a small CPU preset, IPC 1, cluster pool 64) in process with a
  large memory budget, then on 2 Ray Train workers with distill.memory_budget_mb at a quarter
  of the decoded training data: wall time, driver peak RSS, largest Ray worker RSS, shard bytes
  read by rank 0, and whether the two sets are equal;
- RDED and DDOQ (identity latent space) with their classes fanned out to 2 Ray tasks.
Results: docs/results/scale_stress_run.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import re
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
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(48, 161, 2))
            Image.fromarray(stress_image(rng, colour, 1 + c % 17, h, w)).save(d / f"n{c:08d}_{i:05d}.JPEG", quality=90)


def stress_image(rng, colour, freq: int, h: int, w: int):
    """One h x w picture of a class: its colour, stripes of its frequency, a disc placed at random."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    stripes = (np.sin(xx * freq * np.pi / w) * 60).astype(np.int16)
    img = np.clip(colour[None, None, :] + stripes[..., None], 0, 255).astype(np.uint8)
    cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(6, 20))
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255 - colour
    return img


class RaySampler(threading.Thread):
    """Largest RSS of any Ray worker process (sampled every 0.2 s from /proc)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.stop, self.peak_cmd = 0.0, False, None

    def run(self):
        # /proc directly (Linux): no psutil dependency.
        while not self.stop:
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    # Ray workers retitle themselves "ray::<task>" (setproctitle).
                    if "default_worker.py" in cmd or cmd.startswith("ray::"):
                        for line in (proc / "status").read_text().splitlines():
                            if line.startswith("VmRSS:") and int(line.split()[1]) / 1024 > self.peak_mb:
                                self.peak_mb, self.peak_cmd = int(line.split()[1]) / 1024, cmd[:120]
                except OSError:
                    continue  # the process ended meanwhile
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


def _pack_for_runs(args, n: int) -> Path:
    from dream_dist.data.stream import FileSource, imagefolder_source, pack_files

    out = REPO / "outputs" / "scale_stress" / f"packed_{n}"
    full = imagefolder_source(args.root, "train")
    train = FileSource("stress", full.classes[:n], full.files[:n])
    test = FileSource("stress", full.classes[:n], [f[: args.test_per_class] for f in full.files[:n]])
    index = pack_files(train, out, "train", size=SIZE, progress=True)
    pack_files(test, out, "test", size=SIZE, mean_std=(index["mean"], index["std"]), progress=True)
    return out


RUNS = {
    "dream_plus in process": ["task=distill", "distill.workers=0"],
    "dream_plus 2 Ray workers, all cached": ["task=distill", "distill.workers=2"],
    "dream_plus 2 Ray workers, budget 1/4, lru (before)": ["task=distill", "distill.workers=2",
                                                           "distill.memory_budget_mb={quarter}", "distill.cache_policy=lru"],
    "dream_plus 2 Ray workers, budget 1/4": ["task=distill", "distill.workers=2", "distill.memory_budget_mb={quarter}"],
    "rded 2 Ray tasks": ["task=rded", "rded.workers=2", "rded.ipc=1", "rded.images_per_class=50",
                         "observer.model=convnet_tiny", "observer.epochs=1", "kd.model=convnet_tiny", "kd.epochs=1",
                         "kd.runs=1", "rded.baseline=false"],
    "ddoq 2 Ray tasks": ["task=ddoq", "ddoq.workers=2", "ddoq.ipc=1", "ddoq.encoder=identity",
                         "ddoq.kmeans_iterations=10", "ddoq.baseline=false"],
}
DREAM = ["distill.method=dream_plus", "distill.overrides.ipc=1", "distill.overrides.factor=1",
         "distill.overrides.width=16", "distill.overrides.iterations=1", "distill.overrides.inner_steps=3",
         "distill.overrides.batch_real=16", "distill.overrides.net_images=64", "distill.overrides.init_images=2000",
         "distill.overrides.cluster_pool=64", "distill.overrides.tau=2", "distill.baseline=false"]


def run_one(args) -> None:
    """One method run on the packed stress set, in this (fresh) process: prints a JSON line."""
    from dream_dist.tasks import main as run_main

    quarter = args.decoded_mb / 4
    overrides = [o.format(quarter=quarter) for o in RUNS[args.what]]
    if "task=distill" in overrides:
        overrides += DREAM
    sampler = RaySampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = run_main(["dataset=imagefolder", f"dataset.root={args.root}", f"dataset.packed={args.out}",
                        f"out_dir={args.run_dir}",
                        "progress=false", "threads=1", "eval=cpu", "eval.width=16", "eval.epochs=1", "eval.runs=1",
                        *overrides])
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    m = summary.get("metrics", {})
    print(json.dumps({"what": args.what, "wall_s": wall,
                      "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ray_worker_peak_mb": sampler.peak_mb or None, "ray_worker_peak_process": sampler.peak_cmd,
                      "steps": m.get("steps"),
                      "distill_s": m.get("steps_seconds_rank0") or m.get("distill_seconds"),
                      # rank 0 on Ray, the one process otherwise
                      "bytes_read": m.get("bytes_read_rank0", m.get("bytes_read")),
                      "min_bytes": m.get("min_bytes_rank0", m.get("min_bytes"))}))


def run_table(args) -> None:
    import torch

    n = max(args.classes)
    packed = _pack_for_runs(args, n)
    index = json.loads((packed / "index-train.json").read_text())
    decoded_mb = sum(index["counts"]) * index["channels"] * index["image_size"] ** 2 / 2**20
    results, sets = {}, {}
    runs = REPO / "outputs" / "scale_stress" / "runs"
    saved = runs / "results.json"  # every finished run, so a failed or --only run keeps the others
    if args.only and saved.exists():  # rerun these; keep the other rows (and their run directories)
        results = json.loads(saved.read_text())
    for what in RUNS:
        run_dir = runs / re.sub(r"[^A-Za-z0-9_.-]+", "_", what.replace("/", "-"))
        if args.only and what not in args.only:
            if what in results and what.startswith("dream_plus"):
                sets[what] = torch.load(run_dir / "distilled.pt", weights_only=True)["images"]
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # every run fresh
        cmd = [sys.executable, __file__, "--phase", "run-one", "--what", what, "--out", str(packed),
               "--root", str(args.root),
               "--run-dir", str(run_dir), "--decoded-mb", str(decoded_mb)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(r, flush=True)
        results[what] = {"run": what, **r}
        saved.write_text(json.dumps(results, indent=1))
        if what.startswith("dream_plus"):
            sets[what] = torch.load(run_dir / "distilled.pt", weights_only=True)["images"]
    ref = sets.get("dream_plus in process")
    step = lambda r: r["distill_s"] / r["steps"] if r.get("steps") and r.get("distill_s") else None  # noqa: E731
    cached = results.get("dream_plus 2 Ray workers, all cached")
    rows = []
    for what in RUNS:
        if what not in results:
            continue
        r = results[what]
        steps = r.get("steps") or 0
        per = lambda b: b / steps / 2**20 if steps and b else None  # noqa: E731
        read, least = per(r.get("bytes_read")), per(r.get("min_bytes"))
        vs = step(r) / step(cached) if cached and step(r) and what.startswith("dream_plus 2") else None
        rows.append({"run": what, "wall s": f"{r['wall_s']:.0f}",
                     "step s": f"{step(r):.1f}" if step(r) else "-",
                     "step / all-cached step": f"{vs:.2f}" if vs else "-",
                     "shard MB read per step": f"{read:.0f}" if read else "-",
                     "minimum MB per step": f"{least:.0f}" if least else "-",
                     "ratio": f"{read / least:.2f}" if read and least else "-",
                     "driver peak MB": f"{r['driver_peak_mb']:.0f}",
                     "worker peak MB": f"{r['ray_worker_peak_mb']:.0f}" if r.get("ray_worker_peak_mb") else "-",
                     "set == in-process": (str(torch.equal(sets[what], ref)) if what in sets and ref is not None
                                           else "-")})
    text = (f"Methods on the packed stress set: {n} classes, {sum(index['counts'])} images at {SIZE} px "
            f"(decoded {decoded_mb:.0f} MB; \"budget 1/4\" is a quarter of it per worker, about half of each "
            f"worker's classes). Reads are rank 0's (the one process in process), start-up included, "
            f"divided by the 3 steps; the minimum is the distinct samples of the non-resident classes each "
            f"step used plus each resident class once (ClassCache.min_bytes).\n\n" + markdown(rows, list(rows[0])))
    save("scale_stress_run", {"rows": rows, "results": list(results.values()), "decoded_mb": decoded_mb}, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["generate", "pack", "pack-one", "run", "run-one"], default="pack")
    ap.add_argument("--root", type=Path, default=REPO / "outputs" / "scale_stress" / "src")
    ap.add_argument("--classes", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--baseline-max-gb", type=float, default=2.0)
    ap.add_argument("--n", type=int)
    ap.add_argument("--mode", choices=["stream", "memory"], default="stream")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--test-per-class", type=int, default=10)
    ap.add_argument("--what", choices=list(RUNS))
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="run phase: rerun these rows, keep the others")
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--decoded-mb", type=float)
    args = ap.parse_args()
    if args.phase == "generate":
        generate(args.root, max(args.classes), args.per_class)
    elif args.phase == "pack-one":
        pack_one(args)
    elif args.phase == "run":
        run_table(args)
    elif args.phase == "run-one":
        run_one(args)
    else:
        pack_table(args)


if __name__ == "__main__":
    main()
