"""WebDataset ingest and object storage on the 1000-class stress set (issue 24).

    python benchmarks/ingest_stress.py --per-class 100            # everything: generate, shards, table
    python benchmarks/ingest_stress.py --per-class 100 --skip-runs # the pack rows only

The set is scale_stress.py's generated ImageNet-shaped JPEGs (1000 classes, 48-160 px), written
again as shuffled WebDataset shards of about 240 per 1000 classes (`<stem>.jpeg` + `<stem>.cls`,
keys = file stems; about `per-class * 1000 / 240` samples a shard), and for 250 and 500 classes
with the same shard size. Each row runs in a fresh process (its own peak RSS):

- folder pack: dream_dist.data.stream.pack_files of the same images (the baseline, same run);
- WebDataset ingest (dream_dist.data.ingest) at 250 / 500 / 1000 classes with 1 worker, and at
  1000 with 2 Ray workers (the largest Ray worker's RSS sampled from /proc);
- DREAM+ at the stress preset (scale_stress.DREAM) on 2 Ray workers, reading the ingested shards
  from the local directory, then from a loopback S3 server (moto, in this process) through the
  shard cache: rank 0's step time, its bytes downloaded vs the least it needed (the payload of
  the distinct samples its steps used, ClassCache.min_bytes), and its requests per step.
Results: docs/results/ingest_stress.{md,json}.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown, save  # noqa: E402
from scale_stress import DREAM, SIZE, RaySampler, generate  # noqa: E402

BASE = Path(os.environ.get("INGEST_STRESS_DIR", REPO / "outputs" / "ingest_stress"))


def write_shards(root: Path, n: int, out: Path, shards: int, split: str, per_class: int | None = None) -> None:
    """The first `n` classes of the generated set as `shards` shuffled tars in `out`."""
    from dream_dist.data.folder import imagefolder_source

    if out.exists() and len(list(out.glob("*.tar"))) == shards:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    src = imagefolder_source(root, "train")
    items = [(p, c) for c in range(n) for p in src.files[c][:per_class]]
    random.Random(n).shuffle(items)
    for k in range(shards):
        with tarfile.open(out / f"{split}-{k:05d}.tar", "w") as tar:
            for p, c in items[k::shards]:
                for name, data in ((f"{p.stem}.jpeg", p.read_bytes()), (f"{p.stem}.cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def pack_one(args) -> None:
    """One pack row in this fresh process: prints a JSON line."""
    from dream_dist.data import ingest
    from dream_dist.data.folder import FileSource, imagefolder_source
    from dream_dist.data.stream import pack_files
    from dream_dist.distributed.tasks import ray_mapper

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sampler, mapper = None, None
    if args.workers > 1:
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        sampler = RaySampler()
        sampler.start()
        mapper = ray_mapper(args.workers)
    t0 = time.perf_counter()
    if args.mode == "folder":
        full = imagefolder_source(args.root, "train")
        src = FileSource("stress", full.classes[: args.n], full.files[: args.n])
        index = pack_files(src, out, "train", size=SIZE, progress=False, mapper=mapper)
    else:
        urls = ingest.expand_urls(str(args.wds))
        index = ingest.ingest(urls, str(out), "train", ingest.settings_of("auto", "cls", SIZE, "shorter", True),
                              class_names=[f"n{c:08d}" for c in range(args.n)], progress=False, mapper=mapper)
    wall = time.perf_counter() - t0
    if sampler is not None:
        sampler.stop = True
        sampler.join()
    print(json.dumps({"mode": args.mode, "classes": args.n, "workers": args.workers, "images": sum(index["counts"]),
                      "wall_s": wall, "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ray_worker_peak_mb": sampler.peak_mb if sampler else None,
                      "shards_sha": _digest(out, index)}))


def _digest(out: Path, index: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in range(index["num_classes"]):
        for e in index["shards"][str(c)]:
            h.update((out / e["file"]).read_bytes())
    return h.hexdigest()[:16]


def run_one(args) -> None:
    """One DREAM+ row in this fresh process (2 Ray workers): prints a JSON line."""
    from dream_dist.tasks import main as run_main

    sampler = RaySampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = run_main(["dataset=imagefolder", f"dataset.root={args.root}", f"dataset.packed={args.packed}",
                        f"dataset.shard_cache_dir={BASE / 'cache'}", f"out_dir={args.run_dir}",
                        "progress=false", "threads=1", "eval=cpu", "eval.width=16", "eval.epochs=1", "eval.runs=1",
                        "task=distill", "distill.workers=2", *DREAM])
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    m = summary.get("metrics", {})
    print(json.dumps({"wall_s": wall, "steps": m.get("steps"), "step_s": m["steps_seconds_rank0"] / m["steps"],
                      "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ray_worker_peak_mb": sampler.peak_mb or None,
                      "bytes_read": m.get("bytes_read_rank0"), "min_bytes": m.get("min_bytes_rank0"),
                      "fetched_bytes": m.get("fetched_bytes_rank0"), "fetch_requests": m.get("fetch_requests_rank0")}))


def child(args_list: list[str], env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"{args_list} failed:\n{res.stderr[-4000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(r, flush=True)
    return r


def table(args) -> None:
    top = max(args.classes)
    generate(args.root, top, args.per_class)
    per_shard = args.per_class * top / 240
    for n in args.classes:
        write_shards(args.root, n, BASE / f"wds_{n}", max(1, round(n * args.per_class / per_shard)), "train")
    rows, raw = [], {}

    def pack_row(label, mode, n, workers):
        r = child(["--phase", "pack-one", "--mode", mode, "--n", str(n), "--workers", str(workers),
                   "--root", str(args.root), "--wds", str(BASE / f"wds_{n}"), "--out", str(BASE / f"packed_{mode}_{n}")])
        raw[label] = r
        return r

    folder = pack_row("folder pack, 1 worker", "folder", top, 1)
    folder2 = pack_row("folder pack, 2 workers", "folder", top, 2)
    for n in args.classes:
        pack_row(f"WebDataset ingest {n} classes, 1 worker", "ingest", n, 1)
    pack_row(f"WebDataset ingest {top} classes, 2 workers", "ingest", top, 2)
    for label, r in raw.items():
        base = folder2 if "2 workers" in label else folder
        rows.append({"run": label, "images": r["images"], "wall s": f"{r['wall_s']:.0f}",
                     "images/s": f"{r['images'] / r['wall_s']:.0f}",
                     "vs folder pack (same workers)": f"{(r['images'] / r['wall_s']) / (base['images'] / base['wall_s']):.2f}x"
                     if r["classes"] == top else "-",
                     "peak RSS MB driver / worker": f"{r['driver_peak_mb']:.0f} / "
                     + (f"{r['ray_worker_peak_mb']:.0f}" if r.get("ray_worker_peak_mb") else "-"),
                     "bytes read / needed": "-", "requests per step": "-"})
    same = len({r["shards_sha"] for k, r in raw.items() if r["classes"] == top}) == 1
    rss = [raw[f"WebDataset ingest {n} classes, 1 worker"]["driver_peak_mb"] for n in args.classes]
    notes = {f"packed bytes identical (folder 1/2 workers, ingest 1/2 workers, {top} classes)": same,
             f"ingest driver peak RSS max/min over {'/'.join(map(str, args.classes))} classes": max(rss) / min(rss)}

    if not args.skip_runs:
        from moto.server import ThreadedMotoServer

        from dream_dist.data import ingest, storage

        packed = BASE / f"packed_ingest_{top}"
        test = BASE / "wds_test"
        write_shards(args.root, top, test, 10, "test", per_class=10)
        train_index = json.loads((packed / "index-train.json").read_text())
        ingest.ingest(ingest.expand_urls(str(test)), str(packed), "test",
                      ingest.settings_of("auto", "cls", SIZE, "shorter", True),
                      class_names=train_index["classes"], mean_std=(train_index["mean"], train_index["std"]),
                      progress=False)
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(env)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ["DREAM_DIST_S3_ENDPOINT"] = env["DREAM_DIST_S3_ENDPOINT"] = f"http://{host}:{port}"
        import boto3

        boto3.client("s3", endpoint_url=env["DREAM_DIST_S3_ENDPOINT"]).create_bucket(Bucket="bench")
        n_up = storage.upload_tree(packed, "s3://bench/packed")
        print(f"uploaded {n_up} files to s3://bench/packed", flush=True)
        runs = {}
        for label, where in (("DREAM+ 2 Ray workers, packed shards local", str(packed)),
                             ("DREAM+ 2 Ray workers, packed shards on S3 (loopback)", "s3://bench/packed")):
            shutil.rmtree(BASE / "cache", ignore_errors=True)
            run_dir = BASE / ("run_s3" if where.startswith("s3") else "run_local")
            shutil.rmtree(run_dir, ignore_errors=True)
            runs[label] = child(["--phase", "run-one", "--root", str(args.root), "--packed", where,
                                 "--run-dir", str(run_dir)], env)
            raw[label] = runs[label]
        server.stop()
        local = runs["DREAM+ 2 Ray workers, packed shards local"]
        for label, r in runs.items():
            remote = "S3" in label
            rows.append({"run": label, "images": train_index and sum(train_index["counts"]),
                         "wall s": f"{r['wall_s']:.0f}", "images/s": "-",
                         "vs folder pack (same workers)": f"step {r['step_s']:.1f} s = {r['step_s'] / local['step_s']:.2f}x local",
                         "peak RSS MB driver / worker": f"{r['driver_peak_mb']:.0f} / {r['ray_worker_peak_mb']:.0f}",
                         "bytes read / needed": (f"{r['fetched_bytes'] / 2**20:.0f} MB / {r['min_bytes'] / 2**20:.0f} MB"
                                                 f" = {r['fetched_bytes'] / r['min_bytes']:.2f}") if remote else
                         f"{r['bytes_read'] / 2**20:.0f} MB / {r['min_bytes'] / 2**20:.0f} MB (local reads)",
                         "requests per step": f"{r['fetch_requests'] / r['steps']:.0f}" if remote else "-"})
        import torch

        a = torch.load(BASE / "run_local" / "distilled.pt", weights_only=True)["images"]
        b = torch.load(BASE / "run_s3" / "distilled.pt", weights_only=True)["images"]
        notes["DREAM+ set from S3 == set from local shards"] = bool(torch.equal(a, b))
    text = (f"The {top}-class stress set ({args.per_class} JPEGs per class, 48-160 px, packed to {SIZE} px PNG) as "
            f"shuffled WebDataset shards of about {per_shard:.0f} samples (240 shards at {top} classes). Each row is "
            f"a fresh process. Rank 0's figures for the DREAM+ rows (stress preset, 3 steps); bytes needed = the "
            f"payload of the distinct samples its steps used (ClassCache.min_bytes).\n\n"
            + markdown(rows, list(rows[0])) + "\n\n" + "\n".join(f"- {k}: {v if not isinstance(v, float) else f'{v:.3f}'}"
                                                             for k, v in notes.items()) + "\n")
    save("ingest_stress", {"rows": rows, "raw": raw, "notes": notes, "per_class": args.per_class}, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["table", "pack-one", "run-one"], default="table")
    ap.add_argument("--root", type=Path, default=REPO / "outputs" / "scale_stress" / "src")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--skip-runs", action="store_true")
    ap.add_argument("--mode", choices=["folder", "ingest"])
    ap.add_argument("--n", type=int)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--wds", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--packed")
    ap.add_argument("--run-dir", type=Path)
    args = ap.parse_args()
    {"table": table, "pack-one": pack_one, "run-one": run_one}[args.phase](args)


if __name__ == "__main__":
    main()
