"""Why did more evaluation training score lower? One distilled set, several protocols, curves.

    python benchmarks/eval_diagnosis.py --snapshot outputs/time_to_accuracy/mnist/dream_plus_s1/step0000.pt \
        --variants idc previous_b64 --epochs 300 --curve-every 25 --threads 1

Issue 9 saw a step-100 f = 2 MNIST set score 82.6 % after 1000 epochs at batch 256 and 72.5 %
at batch 64 under dream_dist's former `idc` preset, while the IDC code's own protocol trains
such a set to ~98 %. The variants differ from the IDC protocol (`idc`: batch 64, IDC DiffAug
color_crop_scale_rotate, no CutMix on MNIST with f > 1) in one setting each:

- previous_b256 / previous_b64: dream_dist's former preset (DSA: one of colour / crop /
  cutout / flip / scale / rotate per batch, CutMix p 0.5), at batch 256 / 64;
- idc_cutmix: the IDC protocol plus CutMix p 0.5 (what the IDC code uses on other datasets);
- idc_flip: the IDC protocol plus flip (the IDC code drops it for MNIST);
- dsa_nocutmix: DSA as before, without CutMix, batch 64.

Each variant is one run with the same seed; the test accuracy every --curve-every epochs is
recorded. Writes docs/results/eval_diagnosis_<name>.{md,json,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown, save  # noqa: E402

from dream_dist.data import load_dataset  # noqa: E402
from dream_dist.evaluation.protocol import EvalConfig, evaluate  # noqa: E402

PREVIOUS = dict(protocol=None, schedule="idc", aug_mode="dsa", aug_strategy=None, cutmix_prob=0.5)
VARIANTS = {
    "idc": {},
    "previous_b256": dict(PREVIOUS, batch_size=256),
    "previous_b64": dict(PREVIOUS, batch_size=64),
    "idc_cutmix": dict(cutmix_prob=0.5),
    "idc_flip": dict(aug_strategy="color_crop_flip_scale_rotate"),
    "dsa_nocutmix": dict(PREVIOUS, batch_size=64, cutmix_prob=0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", required=True, help="a step*.pt written by time_to_accuracy.py")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--variants", nargs="+", default=["idc", "previous_b64"], choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--curve-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    snap = torch.load(args.snapshot, weights_only=True)
    test = load_dataset(args.dataset, "test")
    rows, payload = [], {"snapshot": args.snapshot, "variants": {}}
    for v in args.variants:
        cfg = EvalConfig.preset("idc", runs=1, seed=args.seed, epochs=args.epochs, curve_every=args.curve_every,
                                **VARIANTS[v])
        res = evaluate(snap["images"], snap["labels"], test, snap["mean"], snap["std"], cfg,
                       factor=snap["factor"], dataset=args.dataset, name=v)
        curve = res.curves[0]
        payload["variants"][v] = res.to_dict()
        best = max(a for _, a in curve)
        rows.append({"variant": v, "batch": res.config["batch_size"], "aug": f"{res.config['aug_mode']}:"
                     f"{res.config['aug_strategy']}", "cutmix": res.config["cutmix_prob"],
                     "last epoch %": f"{res.mean:.2f}", "max of curve %": f"{best:.2f}",
                     "curve": " ".join(f"{a:.1f}" for _, a in curve)})
        print(rows[-1], flush=True)
    name = args.name or Path(args.snapshot).parent.name + "_" + Path(args.snapshot).stem
    text = (f"Evaluation diagnosis of `{args.snapshot}` ({args.dataset}, f = {snap['factor']}), "
            f"ConvNet-3 w128, {args.epochs} epochs, 1 run each, test accuracy every {args.curve_every} epochs.\n\n"
            + markdown(rows, list(rows[0])))
    save(f"eval_diagnosis_{name}", payload, text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, r in payload["variants"].items():
        c = r["curves"][0]
        ax.plot([p[0] for p in c], [p[1] for p in c], "o-", ms=3, label=v)
    ax.set(xlabel="epoch", ylabel="test acc %", title=name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"eval_diagnosis_{name}.png", dpi=110)


if __name__ == "__main__":
    main()
