"""Published top-1 accuracies (%) to compare against (DREAM+ paper, Table I; hard labels,
ConvNet-3, mean of 5). Which runs they compare with: docs/evaluation.md.

PUBLISHED[dataset][method][ipc]. TinyImageNet rows are for the full dataset with ConvNet-4:
results on the 100-images-per-class subset (the default tinyimagenet root) are not comparable:
the pipeline's table marks such a run as a subset and shows no published figure.
"""
from __future__ import annotations

_COLS = ("random", "herding", "kcenter", "dc", "dsa", "dm", "idc", "dream_plus")
_ROWS = {
    "mnist": ("64.9/95.1/97.9", "89.2/93.7/94.9", "89.3/84.4/97.4", "91.7/97.4/98.8",
              "88.7/97.8/99.2", "89.7/97.5/98.6", "94.2/98.4/99.1", "96.1/98.6/99.2"),
    "fashion_mnist": ("51.4/73.8/82.5", "67.0/71.1/71.9", "66.9/54.7/68.3", "70.5/82.3/83.6",
                      "70.6/84.6/88.7", None, "81.0/86.0/86.2", "82.6/87.2/87.6"),
    "cifar10": ("14.4/26.0/43.4", "21.5/31.6/40.4", "21.5/14.7/27.0", "28.3/44.9/53.9",
                "28.8/52.1/60.6", "26.0/48.9/63.0", "50.6/67.5/74.5", "52.5/69.9/75.3"),
    "tinyimagenet": (None, None, None, None, None, "3.9/12.9/24.1", None, "10.5/24.0/29.5"),
}

PUBLISHED: dict[str, dict[str, dict[int, float]]] = {
    ds: {
        m: dict(zip((1, 10, 50), map(float, cell.split("/"))))
        for m, cell in zip(_COLS, cells)
        if cell is not None
    }
    for ds, cells in _ROWS.items()
}


def published(dataset: str, method: str, ipc: int) -> float | None:
    return PUBLISHED.get(dataset, {}).get(method, {}).get(ipc)
