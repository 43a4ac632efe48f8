"""GPU path check: the one prepared script to run on a GPU machine (issue 25).

    python benchmarks/gpu_check.py --device cuda                      # everything (~10 min on one H100)
    python benchmarks/gpu_check.py --device cuda --skip accuracy      # the correctness checks only
    python benchmarks/gpu_check.py --device cpu --quick               # dry run here (what the test runs)

Needs torch and the MNIST files (`--data DIR`, default $DREAM_DIST_DATA or ../shared/data:
DIR/mnist/*-ubyte[.gz]). Ray, Hydra and webdataset are not used. FAISS is optional: without
it the clustering checks and DREAM+ are skipped (IDC still runs); with faiss-cpu they run with
CPU k-means; with a GPU build (faiss-gpu-cu12) the FAISS GPU check runs too.

Checks, each one row of the table (status pass / FAIL / skip):
  env          torch, CUDA, device, FAISS (GPUs it sees), the packages that are absent;
  step_equal   one inner step (IDC, and DREAM+ with FAISS) on --device against the same step on
               the CPU, from the same initial set and the same CPU-drawn randomness: the largest
               pixel difference as a share of the step's largest update (<= 1 %);
  bit_stable   two DREAM+ (or IDC) runs of 3 steps on --device, deterministic kernels on
               (determinism.configure): the sets are bit-identical;
  no_atomics   the ops of one distillation step and one DSA evaluation epoch on --device: none
               without a deterministic CUDA kernel (determinism.nondeterministic);
  host_reads   host reads (device syncs) per inner step at 10 and at 40 classes (HostReads),
               and the step time at each: equal reads, so the step does not wait per class;
  faiss_gpu    k-means and exact search on FAISS's GPU against its CPU, same data and seed:
               centroid objective within 1 %, >= 99.9 % of neighbours equal, and the speed-up;
  accuracy     MNIST time to accuracy at the public DREAM+ code's setting (IPC 10, f = 2,
               ConvNet-3, 1 x 100 inner steps, DREAM+; then one IDC-protocol evaluation, 1000
               epochs): accuracy and minutes, against the CPU run of
               docs/results/time_to_accuracy_mnist.json. --quick shrinks it to seconds.

Writes gpu_check.json and gpu_check.md to --out (default $OUT when set, else
outputs/gpu_check/), prints the table, and exits 1 when a check fails. `--record NAME` also
writes docs/results/NAME.{md,json} (with date, machine and command).

On the lent device (torch 2.x, CUDA 13, no FAISS) carry a faiss-cpu wheel, e.g.
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_27_x86_64 -d .whl faiss-cpu==1.15.1
and start the command with the device README's `pip install --target /tmp/site .whl/*.whl`.
faiss-gpu-cu12 needs CUDA 12 runtime wheels (too large to carry): its check runs on the
cluster's GPU nodes (launch/cluster-aws-gpu.yaml installs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, command, machine, markdown, save  # noqa: E402

from dream_dist import determinism, kmeans  # noqa: E402
from dream_dist.data import load_dataset  # noqa: E402
from dream_dist.data.base import ImageSet  # noqa: E402
from dream_dist.evaluation.protocol import EvalConfig, evaluate, train_network  # noqa: E402
from dream_dist.hostsync import HostReads  # noqa: E402
from dream_dist.methods.dream.config import preset  # noqa: E402
from dream_dist.methods.dream.engine import Distiller  # noqa: E402
from dream_dist.methods.dream.shard import ClassShard  # noqa: E402
from dream_dist.models import build_model  # noqa: E402

# Small enough for seconds per check, large enough to run every kernel of the real step.
SMALL = dict(init_images=200, batch_real=32, net_images=64, net_batch=32, ipc=2, warmup_epochs=0)
STEP_TOL = 0.01  # device-vs-CPU difference, as a share of the step's largest pixel update
CPU_REFERENCE = RESULTS / "time_to_accuracy_mnist.json"


def have_faiss() -> bool:
    return kmeans.faiss is not None


def row(check: str, status: str, figure: str, baseline: str = "", detail: str = "", **data) -> dict:
    return {"check": check, "status": status, "figure": figure, "baseline (same run)": baseline,
            "detail": detail, "data": data}


def distiller(data: ImageSet, cfg, device: str, seed: int = 0) -> Distiller:
    mean, std = data.mean_std()
    real = {c: data.of_class(c) for c in range(data.num_classes)}
    shard = ClassShard(list(range(data.num_classes)), real, cfg, mean, std, data.num_classes, seed=seed,
                       device=device)
    return Distiller(cfg, [shard], data.counts(), data.channels, data.size, seed=seed, device=device,
                     progress=False)


def subset(train: ImageSet, per_class: int) -> ImageSet:
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:per_class] for c in range(train.num_classes)])
    return ImageSet(train.images[idx], train.labels[idx], list(train.classes))


def split_classes(data: ImageSet, k: int) -> ImageSet:
    """The images of `data` relabelled into k classes (k a multiple of its class count)."""
    m = k // data.num_classes
    labels = data.labels * m + torch.arange(len(data)) % m
    return ImageSet(data.images, labels, [str(i) for i in range(k)])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ checks

def check_env(args) -> dict:
    absent = []
    for mod in ("faiss", "ray", "hydra", "webdataset"):
        try:
            __import__(mod)
        except ImportError:
            absent.append(mod)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    gpus = kmeans._num_gpus() if have_faiss() else 0
    figure = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}"
    status = "FAIL" if args.device.startswith("cuda") and not cuda else "pass"
    return row("env", status, figure, detail=f"FAISS GPUs {gpus}; absent: {', '.join(absent) or 'none'}",
               cuda=cuda, device_name=name, faiss_gpus=gpus, absent=absent)


def check_step_equal(args, data: ImageSet) -> dict:
    methods = ["idc"] + (["dream_plus"] if have_faiss() else [])
    figures, worst = [], 0.0
    for name in methods:
        # init="real": the same real images start both runs (no device-dependent init training).
        cfg = preset(name, iterations=1, inner_steps=2, tau=1, init="real", **SMALL).resolved("mnist")
        sets = {}
        for dev in ("cpu", args.device):
            torch.manual_seed(0)
            d = distiller(data, cfg, dev)
            d.initialize()
            start = d.synthetic()[0].detach().cpu().clone()
            d.run(until_step=1)
            sets[dev] = (start, d.synthetic()[0].detach().cpu())
        start, cpu = sets["cpu"]
        dev = sets[args.device][1]
        update = (cpu - start).abs().max().item()
        diff = (dev - cpu).abs().max().item()
        share = diff / max(update, 1e-12)
        worst = max(worst, share)
        figures.append(f"{name}: max abs(dev - cpu) {diff:.2e} = {100 * share:.3f} % of the update {update:.2e}")
    return row("step_equal", "pass" if worst <= STEP_TOL else "FAIL", f"{100 * worst:.3f} % of the update",
               baseline="the same step on the CPU", detail="; ".join(figures), worst_share=worst)


def check_bit_stable(args, data: ImageSet) -> dict:
    name = "dream_plus" if have_faiss() else "idc"
    cfg = preset(name, iterations=1, inner_steps=3, tau=2, match_strategy="color_crop_scale_rotate",
                 **({**SMALL, "warmup_epochs": 1, "init_epochs": 1} if name == "dream_plus" else SMALL)
                 ).resolved("mnist")
    set_by = args.deterministic  # determinism.configure ran in main(), before any CUDA work
    sets = []
    for _ in range(2):
        d = distiller(data, cfg, args.device)
        d.initialize()
        d.run()
        sets.append(d.synthetic()[0].detach().cpu())
    equal = torch.equal(sets[0], sets[1])
    diff = (sets[0] - sets[1]).abs().max().item()
    return row("bit_stable", "pass" if equal else "FAIL", "bit-identical" if equal else f"max diff {diff:.2e}",
               baseline="run 1 vs run 2", detail=f"{name}, 3 steps, deterministic settings {set_by}")


def check_no_atomics(args, data: ImageSet) -> dict:
    name = "dream_plus" if have_faiss() else "idc"
    cfg = preset(name, iterations=1, inner_steps=1, tau=1, match_strategy="color_crop_scale_rotate_cutout",
                 **SMALL).resolved("mnist")
    d = distiller(data, cfg, args.device)
    d.initialize()
    step = determinism.trace_ops(d.run, until_step=1)
    ecfg = EvalConfig.preset("dsa", epochs=1, device=args.device).resolved("mnist")
    x = data.images[:256].float() / 255
    net = build_model("convnet", data.channels, data.num_classes, data.size)
    epoch = determinism.trace_ops(train_network, net, x, data.labels[:256], ecfg)
    bad = {**determinism.nondeterministic(step), **determinism.nondeterministic(epoch)}
    return row("no_atomics", "FAIL" if bad else "pass", f"{len(bad)} ops without a deterministic kernel",
               detail=f"{name} step: {sum(step.values())} ops; DSA eval epoch: {sum(epoch.values())} ops"
                      + (f"; flagged {bad}" if bad else ""), flagged=bad)


def check_host_reads(args, data: ImageSet) -> dict:
    name = "dream_plus" if have_faiss() else "idc"
    out = {}
    for k in (10, 40):
        cfg = preset(name, iterations=1, inner_steps=4, tau=2, **{**SMALL, "ipc": 1, "batch_real": 8}).resolved("mnist")
        d = distiller(split_classes(data, k), cfg, args.device)
        d.initialize()
        reads, times = [], []
        for step in range(4):
            sync(args.device)
            t0 = time.perf_counter()
            with HostReads() as r:
                d.run(until_step=step + 1)
            sync(args.device)
            times.append(time.perf_counter() - t0)
            reads.append(r.total)
        out[k] = (reads, times)
    (r10, t10), (r40, t40) = out[10], out[40]
    ok = r10 == r40 and max(r40) <= 2
    per10, per40 = sum(t10[1:]) / 3, sum(t40[1:]) / 3  # step 0 also compiles/allocates
    return row("host_reads", "pass" if ok else "FAIL", f"reads per step {r40} at 40 classes",
               baseline=f"{r10} at 10 classes",
               detail=f"{name}; step time {per10 * 1e3:.0f} ms at 10 classes, {per40 * 1e3:.0f} ms at 40 "
                      f"({per40 / per10:.2f}x for 4x the classes)", reads={10: r10, 40: r40},
               seconds={10: t10, 40: t40})


def check_faiss_gpu(args) -> dict:
    if not have_faiss():
        return row("faiss_gpu", "skip", "FAISS absent", detail="install faiss-cpu or faiss-gpu-cu12")
    gpu = kmeans.gpu_for(args.device)
    if gpu is None:
        why = ("CPU-only FAISS build" if args.device.startswith("cuda") else f"device {args.device}")
        return row("faiss_gpu", "skip", why, detail="runs where faiss-gpu-cu12 sees the GPU")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 128, generator=g) + 4 * torch.randn(64, 128, generator=g).repeat(313, 1)[:20000]
    q = torch.randn(2000, 128, generator=g)
    res = {}
    for where in (None, gpu):
        t0 = time.perf_counter()
        cents, assign = kmeans.kmeans(x, 64, niter=20, seed=0, gpu=where)
        t_km = time.perf_counter() - t0
        t0 = time.perf_counter()
        nn = kmeans.nearest(x, q, n=1, gpu=where)
        t_nn = time.perf_counter() - t0
        obj = ((x - torch.from_numpy(cents)[torch.from_numpy(assign)]) ** 2).sum().item()
        res[where] = (obj, nn, t_km, t_nn)
    (o_c, n_c, k_c, s_c), (o_g, n_g, k_g, s_g) = res[None], res[gpu]
    agree = float((n_c == n_g).mean())
    rel = abs(o_g - o_c) / o_c
    ok = rel <= 0.01 and agree >= 0.999
    return row("faiss_gpu", "pass" if ok else "FAIL", f"objective within {100 * rel:.3f} %, neighbours {100 * agree:.2f} % equal",
               baseline="FAISS CPU, same data and seed",
               detail=f"k-means {k_c / k_g:.1f}x faster, search {s_c / s_g:.1f}x faster on GPU {gpu}")


def check_accuracy(args) -> dict:
    if not have_faiss():
        return row("accuracy", "skip", "FAISS absent", detail="DREAM+ clusters with FAISS")
    root = Path(args.data) / "mnist"
    train, test = load_dataset("mnist", "train", root=root), load_dataset("mnist", "test", root=root)
    if args.quick:
        train, test = subset(train, 100), subset(test, 50)
        cfg = preset("dream_plus", iterations=1, inner_steps=2, tau=1, **{**SMALL, "ipc": 1}).resolved("mnist")
        ecfg = EvalConfig.preset("idc", runs=1, epochs=2, device=args.device)
    else:
        cfg = preset("dream_plus", ipc=10, iterations=1, inner_steps=100).resolved("mnist")
        ecfg = EvalConfig.preset("idc", runs=1, seed=1, device=args.device)
    t0 = time.perf_counter()
    d = distiller(train, cfg, args.device, seed=1)
    d.initialize()
    d.run()
    imgs, labels = d.synthetic()
    sync(args.device)
    t_distill = time.perf_counter() - t0
    mean, std = train.mean_std()
    res = evaluate(imgs, labels, test, mean, std, ecfg, factor=cfg.factor, dataset="mnist", progress=not args.quiet)
    t_total = time.perf_counter() - t0
    base = ""
    if CPU_REFERENCE.exists():
        ref = json.loads(CPU_REFERENCE.read_text())["runs"].get("dream_plus_s1", {})
        snap, ev = ref.get("distill", {}).get("snapshots", {}).get("100"), ref.get("evals", {}).get("100")
        if snap and ev:
            cpu_min = (snap["wall_seconds"] + ev["seconds"]) / 60
            base = (f"CPU ({ref['distill']['machine']}): {ev['mean']:.1f} % in {cpu_min:.1f} min "
                    f"({cpu_min / (t_total / 60):.0f}x)" if not args.quick else
                    f"CPU full run: {ev['mean']:.1f} % in {cpu_min:.1f} min (quick run: not comparable)")
    target = 0.0 if args.quick else 98.0
    return row("accuracy", "pass" if res.mean >= target else "FAIL",
               f"{res.mean:.2f} % in {t_total / 60:.1f} min (distill {t_distill / 60:.1f}, eval {res.seconds / 60:.1f})",
               baseline=base, detail=f"DREAM+ MNIST IPC {cfg.ipc}, {cfg.iterations} x {cfg.inner_steps} steps, "
                                     f"IDC protocol {ecfg.epochs} epochs" + (" (quick)" if args.quick else ""),
               accuracy=res.mean, minutes=t_total / 60, distill_minutes=t_distill / 60)


CHECKS = ("env", "step_equal", "bit_stable", "no_atomics", "host_reads", "faiss_gpu", "accuracy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=os.environ.get("DREAM_DIST_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--quick", action="store_true", help="seconds, not minutes: a dry run of every check")
    ap.add_argument("--skip", nargs="*", default=[], choices=CHECKS)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu_check"))
    ap.add_argument("--record", default=None, help="also write docs/results/RECORD.{md,json}")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (use --device cpu for a dry run)")
    mnist = Path(args.data) / "mnist"
    if not mnist.exists():
        ap.error(f"no MNIST at {mnist}: pass --data DIR (DIR/mnist holds the idx files) or set DREAM_DIST_DATA")
    # As a run does (cfg.deterministic): before any CUDA work, so cuBLAS sees its workspace setting.
    args.deterministic = determinism.configure(args.device)
    train = load_dataset("mnist", "train", root=mnist)
    small = subset(train, 40)  # 400 real images: every check's data except the accuracy run

    runs = {"env": lambda: check_env(args), "step_equal": lambda: check_step_equal(args, small),
            "bit_stable": lambda: check_bit_stable(args, small), "no_atomics": lambda: check_no_atomics(args, small),
            "host_reads": lambda: check_host_reads(args, small), "faiss_gpu": lambda: check_faiss_gpu(args),
            "accuracy": lambda: check_accuracy(args)}
    rows = []
    for name in CHECKS:
        if name in args.skip:
            rows.append(row(name, "skip", "--skip"))
            continue
        t0 = time.perf_counter()
        try:
            r = runs[name]()
        except Exception as e:  # one broken check must not hide the others' results
            r = row(name, "FAIL", f"{type(e).__name__}: {e}"[:200], traceback=traceback.format_exc()[-3000:])
            print(r["data"]["traceback"], file=sys.stderr)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(r)
        if not args.quiet:
            print(f"[{r['status']:>4}] {name}: {r['figure']} ({r['seconds']:.1f} s)", flush=True)

    cols = ["check", "status", "figure", "baseline (same run)", "detail", "seconds"]
    text = (f"GPU path check on {args.device}{' (quick)' if args.quick else ''}; "
            f"{time.perf_counter() - T_START:.0f} s in all.\n\n" + markdown(rows, cols))
    payload = {"device": args.device, "quick": args.quick, "machine": machine(), "command": command(),
               "checks": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "gpu_check.md").write_text(f"machine: {machine()}  \ncommand: `{command()}`\n\n{text}\n")
    if args.record:
        save(args.record, payload, text)
    else:
        print("\n" + text)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
