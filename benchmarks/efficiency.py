"""DREAM+ against its IDC baseline and the Table III ablations: accuracy vs iterations.

    python benchmarks/efficiency.py --dataset mnist --ipc 10
    python benchmarks/efficiency.py --dataset fashion_mnist --ipc 1 --steps 20

All methods run in the SAME invocation (same machine state, same data, same evaluation),
so the iteration ratio is measured side by side. CPU setting (stated in the output): the
paper's hyperparameters except the step count (1 outer iteration of --steps inner steps
instead of 1200 x 100), a --cluster-pool per class instead of the whole class, the init
network trained on --init-images, and snapshots evaluated with a quick protocol
(ConvNet-3 w--eval-width, --eval-epochs epochs, 1 run); the last snapshot of each method in
--final-methods is also evaluated with the IDC protocol at width 128 (--final-epochs epochs,
--final-runs runs). Writes docs/results/efficiency_<dataset>_ipc<ipc>.{md,json,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown, save  # noqa: E402

from dream_dist.data import load_dataset  # noqa: E402
from dream_dist.methods.dream.config import preset  # noqa: E402
from dream_dist.methods.dream.engine import Distiller  # noqa: E402
from dream_dist.methods.dream.shard import ClassShard  # noqa: E402
from dream_dist.evaluation.protocol import EvalConfig, evaluate  # noqa: E402
from dream_dist.published import published  # noqa: E402

METHODS = ["idc", "dream_plus", "idc_representative", "idc_bidirectional", "idc_cluster_init"]
LABEL = {"idc": "IDC (baseline)", "dream_plus": "DREAM+", "idc_representative": "representative only",
         "idc_bidirectional": "bidirectional only", "idc_cluster_init": "cluster init only"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--snapshots", nargs="+", type=int, default=[0, 5, 10, 20, 40])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--cluster-pool", type=int, default=1024)
    ap.add_argument("--init-images", type=int, default=10000)
    ap.add_argument("--eval-width", type=int, default=32)
    ap.add_argument("--eval-epochs", type=int, default=100)
    ap.add_argument("--final-methods", nargs="*", default=["idc", "dream_plus"])
    ap.add_argument("--final-epochs", type=int, default=300)
    ap.add_argument("--final-runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    snaps = sorted({s for s in args.snapshots if s <= args.steps} | {args.steps})
    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(train.num_classes)}

    runs = {}
    for m in args.methods:
        cfg = preset(m, ipc=args.ipc, iterations=1, inner_steps=args.steps, width=args.width,
                     cluster_pool=args.cluster_pool, init_images=args.init_images).resolved(args.dataset)
        d = Distiller(cfg, [ClassShard(list(range(train.num_classes)), real, cfg, mean, std, train.num_classes)],
                      train.counts(), train.channels, train.size, progress=True)
        d.initialize()
        sets = {}
        for s in snaps:
            d.run(until_step=s)
            sets[s] = d.synthetic()
        hist = [h for h in d.history if "time/step" in h]
        clus = [h.get("time/cluster_features", 0) + h.get("time/kmeans", 0) for h in hist]
        runs[m] = {"cfg": cfg, "sets": sets, "startup": d.timing["startup"], "distill": d.timing["distill"],
                   "step": sum(h["time/step"] for h in hist) / len(hist),
                   "cluster_share": sum(clus) / sum(h["time/step"] for h in hist),
                   "mmd": [(h["step"], h["mmd/selected"], h["mmd/random"]) for h in d.history if "mmd/selected" in h]}
        print(f"{m}: startup {runs[m]['startup']:.0f} s, distill {runs[m]['distill']:.0f} s", flush=True)

    quick = EvalConfig(width=args.eval_width, epochs=args.eval_epochs, runs=1, schedule="idc", cutmix_prob=0.5)
    for m, r in runs.items():
        r["curve"] = {s: evaluate(*r["sets"][s], test, mean, std, quick, factor=r["cfg"].factor,
                                  progress=False).mean for s in snaps}
        print(m, r["curve"], flush=True)
        if m in args.final_methods:
            full = EvalConfig(epochs=args.final_epochs, runs=args.final_runs, schedule="idc", cutmix_prob=0.5)
            r["final"] = evaluate(*r["sets"][args.steps], test, mean, std, full, factor=r["cfg"].factor,
                                  progress=False)

    base = runs.get("idc")
    rows = []
    for m, r in runs.items():
        reach = "-"
        if base is not None and m != "idc":
            target = base["curve"][args.steps]
            hit = next((s for s in snaps if r["curve"][s] >= target), None)
            if hit is None:
                reach = f"not reached in {args.steps}"
            elif hit == 0:
                reach = f"at init (≥ {args.steps}x)"
            else:
                reach = f"{hit} ({args.steps / hit:.0f}x)"
        fin = r.get("final")
        key = m if m in ("idc", "dream_plus") else None
        rows.append({
            "method": LABEL.get(m, m),
            **{f"acc@{s}": f"{r['curve'][s]:.1f}" for s in snaps},
            "steps to IDC@end (ratio)": reach,
            f"final w128 ({args.final_epochs} ep)": f"{fin.mean:.2f} ± {fin.std:.2f}" if fin else "-",
            "paper": published(args.dataset, key, args.ipc) if key else "-",
            "step s": f"{r['step']:.2f}", "clustering share": f"{100 * r['cluster_share']:.0f}%",
            "start-up s": f"{r['startup']:.0f}",
        })
    cols = list(rows[0].keys())
    table = markdown(rows, cols)
    mmd_rows = []
    for m, r in runs.items():
        if r["mmd"]:
            sel = [x[1] for x in r["mmd"]]
            rnd = [x[2] for x in r["mmd"]]
            mmd_rows.append({"method": LABEL.get(m, m), "MMD selected (mean)": f"{sum(sel) / len(sel):.4f}",
                             "MMD random (mean)": f"{sum(rnd) / len(rnd):.4f}",
                             "selected max/min": f"{max(sel) / max(min(sel), 1e-12):.2f}",
                             "random max/min": f"{max(rnd) / max(min(rnd), 1e-12):.2f}"})
    if mmd_rows:
        table += "\n\nMMD (linear kernel, mean embeddings) of the real batch to its class pool, per clustering round:\n\n"
        table += markdown(mmd_rows, list(mmd_rows[0].keys()))
    first = next(iter(runs.values()))["cfg"]
    table += (f"\n\nCPU setting: ConvNet-3 w{args.width}, 1 x {args.steps} inner steps (paper 1200 x 100), "
              f"real batch {first.batch_real}, tau {first.tau}, cluster pool {args.cluster_pool}, init net on "
              f"{args.init_images} images, {first.net_images} real images per network update, metric {first.metric}, "
              f"image lr {first.lr_img}. Curves: quick eval (w{args.eval_width}, {args.eval_epochs} epochs, 1 run, IDC "
              f"schedule + DSA + CutMix), last epoch.")
    name = f"efficiency_{args.dataset}_ipc{args.ipc}"
    plot(runs, snaps, RESULTS / f"{name}.png", f"{args.dataset} IPC {args.ipc}")
    table += f"\n\n![curves]({name}.png)"
    save(name, {"rows": rows, "curves": {m: r["curve"] for m, r in runs.items()},
                "mmd": {m: r["mmd"] for m, r in runs.items()}, "args": vars(args),
                "final": {m: dataclasses.asdict(r["final"]) for m, r in runs.items() if r.get("final")}}, table)


def plot(runs: dict, snaps: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in runs.items():
        axes[0].plot(snaps, [r["curve"][s] for s in snaps], marker="o", label=LABEL.get(m, m))
        if r["mmd"]:
            axes[1].plot([x[0] for x in r["mmd"]], [x[1] for x in r["mmd"]], marker="o", label=f"{LABEL.get(m, m)}: selected")
            axes[1].plot([x[0] for x in r["mmd"]], [x[2] for x in r["mmd"]], ls="--", label=f"{LABEL.get(m, m)}: random")
    axes[0].set(xlabel="inner steps", ylabel="test accuracy % (quick eval)", title=f"{title}: accuracy vs iterations")
    axes[1].set(xlabel="inner steps", ylabel="MMD² to class (linear kernel)", title="real-batch MMD", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
