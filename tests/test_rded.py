"""RDED: crop scoring and selection, stitching layout, relabelling, Ray = in-process, the task."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from dream_dist.formation import decode
from dream_dist.methods.rded import (
    RDEDConfig,
    distill_classes,
    patch_soft_labels,
    relabel,
    score_crops,
    select_crops,
    stitch,
)
from dream_dist.data.prepare import ensure_packed, open_data
from dream_dist.run import compose, main

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


class Brightness(nn.Module):
    """Hand-made observer over K classes: logit_k = a_k · mean brightness of the image.

    With a_0 = 10 and the others 0, the cross entropy of class 0 falls strictly as the crop
    gets brighter, so the most realistic crop for class 0 is, by construction, the brightest.
    """

    def __init__(self, k: int = 3):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(k))
        with torch.no_grad():
            self.a[0] = 10.0

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.a


@pytest.mark.parametrize("canvas", [4, 8])  # 8: crops scored centred on a zero canvas
def test_scoring_picks_the_lowest_loss_crop(canvas):
    # 3 images x 4 crops; crop (i, j) is constant with a known brightness.
    brightness = torch.tensor([[0.1, 0.9, 0.3, 0.2],    # image 0: crop 1 is the brightest
                               [0.5, 0.4, 0.6, 0.0],    # image 1: crop 2
                               [0.05, 0.0, 0.02, 0.7]])  # image 2: crop 3
    crops = brightness.flatten()[:, None, None, None].expand(12, 1, 4, 4).clone()
    obs = Brightness()
    scores = score_crops(obs, crops, label=0, size=canvas)
    assert scores.shape == (12,)
    assert int(scores.argmin()) == 1  # the brightest crop of all has the lowest CE of class 0
    kept, kept_scores = select_crops(crops, scores, crops_per_image=4, keep=2)
    # Best per image: 0.9, 0.6, 0.7; the two best of those, best first: 0.9 then 0.7.
    assert kept[:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.7])
    assert kept_scores[0] < kept_scores[1]
    # For class 1 (logit fixed at 0 while class 0's grows) brightness is the LEAST realistic.
    kept1, _ = select_crops(crops, score_crops(obs, crops, label=1, size=canvas), 4, 1)
    assert kept1[0, 0, 0, 0].item() == pytest.approx(0.0)


def test_stitching_layout_f2():
    # n = 3 images, f = 2: 12 constant patches whose value is their rank i (best first).
    n, f, s = 3, 2, 5
    patches = torch.arange(n * f * f, dtype=torch.float32)[:, None, None, None].expand(-1, 2, s, s)
    images = stitch(patches.clone(), f)
    assert images.shape == (n, 2, f * s, f * s)
    for t in range(n):
        for slot in range(f * f):
            r, c = divmod(slot, f)  # slots row-major: 0 top-left, 1 top-right, 2 bottom-left
            block = images[t, :, r * s:(r + 1) * s, c * s:(c + 1) * s]
            assert torch.all(block == slot * n + t), (t, slot)  # patch i -> image i mod n, slot i div n
    # formation.decode reads the same row-major slots back (what patch-level labels use).
    parts = decode(images, f)
    assert parts[1 * f * f + 3].unique().tolist() == [3 * n + 1]
    assert torch.equal(stitch(patches, 1), patches)


def test_soft_labels_shapes_and_sums():
    torch.manual_seed(0)
    images = torch.randn(6, 1, 8, 8)
    obs = Brightness(k=4)
    img = relabel(obs, images, factor=2, level="image")
    patch = relabel(obs, images, factor=2, level="patch")
    per_patch = patch_soft_labels(obs, images, factor=2)
    assert img.shape == (6, 4) and patch.shape == (6, 4) and per_patch.shape == (24, 4)
    for t in (img, patch, per_patch):
        assert torch.allclose(t.sum(1), torch.ones(len(t)), atol=1e-6) and (t >= 0).all()
    assert torch.allclose(patch, per_patch.view(6, 4, 4).mean(1))
    assert not torch.allclose(img, patch)  # the two levels differ on non-uniform images
    sharp = relabel(obs, images, 2, "image", temperature=0.1)
    assert sharp.max(1).values.mean() > img.max(1).values.mean()  # lower T, peakier labels
    with pytest.raises(ValueError, match="relabel level"):
        relabel(obs, images, 2, "pixel")


def test_config_is_validated():
    with pytest.raises(ValueError, match="relabel"):
        RDEDConfig(relabel="region")
    with pytest.raises(ValueError, match="min_scale"):
        RDEDConfig(min_scale=0.0)
    with pytest.raises(ValueError, match="rded.ipc=40 .* 160 .* only 144"):
        RDEDConfig(ipc=40).check_counts({3: 144}, factor=2)


@pytest.mark.parametrize("name", ["rded_digits", "rded_mnist_cpu", "rded_tiny_cpu"])
def test_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.task == "rded" and cfg.kd.temperature == 20.0 and cfg.rded.crops_per_image == 5
    assert cfg.rded.resolved_factor(64 if name == "rded_tiny_cpu" else 28) == (
        2 if name == "rded_tiny_cpu" else 1)


@pytest.fixture(scope="module")
def packed_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("rded_packed")
    return ensure_packed(compose([f"pack.out={out}", "progress=false"]))




def test_ray_tasks_give_the_same_set(packed_digits, local_ray):
    """The class fan-out (dream_dist.distributed.fanout, rded.workers > 0) gives the in-process set."""
    from dream_dist.distributed.fanout import map_classes
    from dream_dist.methods import METHODS
    from dream_dist.methods.rded import RDEDPrep
    from dream_dist.models import build_model

    cfg = compose([f"dataset.packed={packed_digits}", "progress=false", "task=rded", "seed=3",
                   "dataset.classes=[0,3,5,7,9]", "rded.ipc=2", "rded.factor=2", "rded.images_per_class=40"])
    data = open_data(cfg)
    torch.manual_seed(0)
    obs = build_model("convnet_tiny", 1, 10, 28).eval()
    classes = [0, 3, 5, 7, 9]
    local = distill_classes(data.reader.load_class, classes, obs, data.mean, data.std, cfg.rded, 2, seed=3,
                            progress=False)
    parts, _ = map_classes(METHODS["rded"], cfg, RDEDPrep(obs, {}, 2, data.mean, data.std), data, workers=2)
    assert sorted(parts) == classes
    assert local[0].shape == (10, 1, 28, 28) and local[1].tolist() == [0, 0, 3, 3, 5, 5, 7, 7, 9, 9]
    assert torch.equal(local[0], torch.cat([parts[c][0] for c in classes]))
    assert torch.equal(local[2], torch.stack([parts[c][1] for c in classes]))
    other = distill_classes(data.reader.load_class, classes, obs, data.mean, data.std, cfg.rded, 2, seed=4,
                            progress=False)
    assert not torch.equal(local[0], other[0])  # the seed matters


def test_rded_end_to_end_on_digits(tmp_path, packed_digits):
    from dream_dist.artifact import load_distilled

    out = tmp_path / "run"
    main([f"out_dir={out}", f"dataset.packed={packed_digits}", "progress=false",
          "experiment=rded_digits", "observer.width=16", "observer.epochs=8",
          "kd.width=16", "kd.epochs=40", "kd.runs=1", "rded.baseline=false",
          "rded.images_per_class=60"])
    for f in ("distilled.pt", "distilled.png", "results.json", "observer.pt", "rded.json"):
        assert (out / f).exists(), f
    assert any((out / "tb" / "distill").iterdir()) and any((out / "tb" / "rded" / "run0").iterdir())
    res = json.loads((out / "results.json").read_text())
    row = res["rows"][0]
    assert row["soft_labels"] is True and row["method"] == "rded (KD)"
    assert row["mean"] > 60.0, row  # chance is 10 %
    ds = load_distilled(out / "distilled.pt")
    assert len(ds) == 100 and ds.soft_labels.shape == (100, 10)
    assert torch.allclose(ds.soft_labels.sum(1), torch.ones(100), atol=1e-5)
    # each class's soft label mostly agrees with its hard label (a sane observer)
    assert (ds.soft_labels.argmax(1) == ds.labels).float().mean() > 0.8


def test_too_large_ipc_refused_before_compute(tmp_path, packed_digits):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="rded.ipc=40"):
        main([f"out_dir={out}", f"dataset.packed={packed_digits}", "progress=false",
              "task=rded", "rded.ipc=40", "rded.factor=2"])
    assert not (out / "observer.pt").exists()
