"""Exported distilled sets: save/load round trip, decoding, grids and ImageFolder/WebDataset
exports, on "distilled" sets made of real scikit-learn digits images."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dream_dist
from dream_dist.data import load_dataset, normalize
from dream_dist.artifact import (
    FORMAT,
    DistilledSet,
    export_imagefolder,
    export_webdataset,
    load_distilled,
    save_distilled,
)
from dream_dist.formation import decode

IPC = 2


@pytest.fixture(scope="module")
def real():
    """Digits train split, its mean/std, and IPC real images per class in SHUFFLED order
    (so exports must group by class themselves)."""
    train = load_dataset("digits", "train")
    mean, std = train.mean_std()
    pick = torch.cat([torch.nonzero(train.labels == c).flatten()[:IPC] for c in range(10)])
    pick = pick[torch.randperm(len(pick), generator=torch.Generator().manual_seed(1))]
    sub = train.subset(pick)
    return sub, mean, std


def _save(tmp_path: Path, real, factor: int, **kw) -> Path:
    sub, mean, std = real
    config = {"method": "dream", "ipc": IPC, "lr": 5e-3, "sizes": (28, 28), "out": tmp_path,
              "model": {"depth": 3, "norm": "instance"}, "seed": np.int64(0)}
    metrics = {"acc_mean": 0.91, "acc_std": 0.01, "runs": [0.9, 0.92], "curve": torch.arange(3.0)}
    kw.setdefault("classes", [f"digit {c}" for c in range(10)])
    return save_distilled(tmp_path / "distilled.pt", normalize(sub.images, mean, std), sub.labels,
                          factor, mean=mean, std=std, config=config, metrics=metrics, **kw)


def test_factor2_round_trip_decodes_and_repeats_labels(tmp_path: Path, real) -> None:
    sub, mean, std = real
    path = _save(tmp_path, real, factor=2)
    stored = normalize(sub.images, mean, std)

    raw = torch.load(path, weights_only=True)  # what any third-party script can do safely
    assert raw["format"] == FORMAT and raw["factor"] == 2
    ds = dream_dist.load_distilled(path)
    assert isinstance(ds, DistilledSet)
    n = len(sub)
    assert len(ds) == n * 4
    assert torch.equal(ds.stored.images, stored) and torch.equal(ds.stored.labels, sub.labels)
    want = decode(stored, 2)
    # item-by-item (lazy, one stored image decoded at a time) equals the batch decode
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(got, want)
    assert torch.equal(ds.images, want)
    assert ds.labels.tolist() == [y for y in sub.labels.tolist() for _ in range(4)]
    assert [ds[i][1] for i in range(8)] == ds.labels[:8].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.classes == [f"digit {c}" for c in range(10)]
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
    assert ds.config["sizes"] == [28, 28] and ds.config["out"] == str(tmp_path)
    assert ds.config["model"] == {"depth": 3, "norm": "instance"} and ds.config["seed"] == 0
    assert ds.metrics["runs"] == [0.9, 0.92] and torch.equal(ds.metrics["curve"], torch.arange(3.0))
    assert ds.soft_labels is None and ds.weights is None

    flat = load_distilled(path, decoded=False)
    assert len(flat) == n and torch.equal(flat.images, stored)
    assert torch.equal(flat.uint8(), ds.uint8())  # uint8() is always the decoded images

    # grid: one row per class, IPC per row; 28-px images are upscaled x2 by save_grid
    grid = path.with_suffix(".png")
    with Image.open(grid) as im:
        assert im.size == (IPC * (56 + 2) + 2, 10 * (56 + 2) + 2)


def test_factor1_soft_labels_weights_and_dataloader(tmp_path: Path, real) -> None:
    sub, mean, std = real
    n = len(sub)
    soft = torch.softmax(torch.randn(n, 10), dim=1)
    weights = torch.rand(n)
    path = _save(tmp_path, real, factor=1, soft_labels=soft, weights=weights)
    ds = load_distilled(path)
    assert len(ds) == n
    assert torch.equal(ds.uint8(), sub.images)  # normalise -> denormalise -> quantise is lossless
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, soft[3]) and torch.equal(ds.weights, weights)

    ds2 = load_distilled(_save(tmp_path / "f2", real, factor=2, soft_labels=soft, weights=weights))
    assert torch.equal(ds2.soft_labels, soft.repeat_interleave(4, 0))
    assert torch.equal(ds2.weights, weights.repeat_interleave(4))
    seen = 0
    for xb, yb in DataLoader(ds2, batch_size=64, shuffle=True):
        assert xb.shape[1:] == (1, 28, 28) and yb.shape[1:] == (10,)
        seen += len(xb)
    assert seen == n * 4


def test_dataloader_hard_labels(tmp_path: Path, real) -> None:
    ds = dream_dist.load_distilled(_save(tmp_path, real, factor=2))
    labels = torch.cat([yb for _, yb in DataLoader(ds, batch_size=64, shuffle=True)])
    assert labels.dtype == torch.int64
    assert torch.equal(labels.sort().values, ds.labels.sort().values)


def _class_sorted(ds: DistilledSet) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(ds.labels, stable=True).indices
    return ds.uint8()[order], ds.labels[order]


def test_imagefolder_export_reads_back(tmp_path: Path, real) -> None:
    ds = load_distilled(_save(tmp_path, real, factor=2))
    out = export_imagefolder(ds, tmp_path / "folder")
    back = load_dataset("imagefolder", split="train", root=out, mode="L")
    assert back.classes == [f"{c:03d}_digit_{c}" for c in range(10)]
    want_x, want_y = _class_sorted(ds)
    assert torch.equal(back.labels, want_y)
    assert torch.equal(back.images, want_x)
    with Image.open(next((out / "000_digit_0").iterdir())) as im:
        assert im.mode == "L"
    with pytest.raises(FileExistsError, match="not empty"):
        export_imagefolder(ds, out)


def test_imagefolder_export_rgb(tmp_path: Path, real) -> None:
    sub, mean, std = real
    rgb = torch.cat([sub.images, sub.images // 2, 255 - sub.images], dim=1)
    path = save_distilled(tmp_path / "rgb.pt", normalize(rgb, [0.5] * 3, [0.25] * 3), sub.labels, 1,
                          [str(c) for c in range(10)], [0.5] * 3, [0.25] * 3, {}, {})
    ds = load_distilled(path)
    back = load_dataset("imagefolder", split="train", root=export_imagefolder(ds, tmp_path / "f"))
    assert torch.equal(back.images, _class_sorted(ds)[0])
    assert torch.equal(back.images, rgb[torch.sort(sub.labels, stable=True).indices])


def test_webdataset_export_reads_back(tmp_path: Path, real) -> None:
    ds = load_distilled(_save(tmp_path, real, factor=2))
    index = export_webdataset(ds, tmp_path / "packed")
    assert index.name == "index-train.json"
    back = load_dataset("packed", "train", root=tmp_path / "packed")
    want_x, want_y = _class_sorted(ds)
    assert back.classes == ds.classes
    assert torch.equal(back.labels, want_y) and torch.equal(back.images, want_x)
    from dream_dist.data.shards import PackedReader

    assert PackedReader(tmp_path / "packed").mean_std == (ds.mean, ds.std)


def test_not_a_distilled_set(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"images": torch.zeros(1, 1, 4, 4), "labels": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a dream_dist distilled set .*format tag None"):
        load_distilled(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a dream_dist distilled set"):
        load_distilled(text)
    with pytest.raises(FileNotFoundError):
        load_distilled(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": torch.zeros(3, dtype=torch.long)}, r"labels must be an integer tensor of shape \(20,\)"),
        ({"labels": torch.full((20,), 10)}, r"labels must lie in \[0, 10\)"),
        ({"soft_labels": torch.zeros(20, 7)}, r"soft_labels must have shape \(N, K\) = \(20, 10\)"),
        ({"weights": torch.ones(19)}, r"weights must have shape \(20,\)"),
        ({"factor": 3}, "not divisible by the multi-formation factor 3"),
        ({"images": torch.zeros(20, 1, 28, 28, dtype=torch.uint8)}, "images must be a float tensor"),
        ({"mean": [0.1, 0.2]}, "mean must have one value per channel"),
        ({"images": torch.full((20, 1, 28, 28), float("nan"))}, "NaN"),
        ({"path": "x.png"}, "must not end in .png"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path: Path, real, change: dict, message: str) -> None:
    sub, mean, std = real
    args = dict(path=tmp_path / "d.pt", images=normalize(sub.images, mean, std), labels=sub.labels,
                factor=2, classes=[str(c) for c in range(10)], mean=mean, std=std, config={}, metrics={})
    args.update(change)
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError, match=message):
        save_distilled(**args)


def test_unstorable_config_is_refused(tmp_path: Path, real) -> None:
    sub, mean, std = real
    with pytest.raises(TypeError, match=r"config.model.act has type object"):
        save_distilled(tmp_path / "d.pt", normalize(sub.images, mean, std), sub.labels, 1,
                       [str(c) for c in range(10)], mean, std, {"model": {"act": object()}}, {})
    assert not (tmp_path / "d.pt").exists()


def test_import_dream_dist_is_lazy() -> None:
    code = ("import sys, dream_dist; assert 'dream_dist.artifact' not in sys.modules; "
            "assert 'torch' not in sys.modules; assert 'load_distilled' in dir(dream_dist)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
