"""DDOQ (dream_dist.methods.ddoq): latent k-means per class, cluster masses as weights, task=ddoq."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dream_dist.config import ConfigError
from dream_dist.data import ImageSet, normalize
from dream_dist.methods.ddoq import (
    DDOQConfig,
    class_seed,
    class_weights,
    distill,
    distill_class,
    quantize,
)
from dream_dist.encoders import build_encoder
from dream_dist.kmeans import minibatch_kmeans
from dream_dist.run import compose, conf_dir, main

MEAN, STD = [0.4], [0.2]
EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("ddoq_*.yaml"))


def blob_images(sizes=(12, 20, 28), seed=0):
    """uint8 images made of len(sizes) prototypes (well apart) plus small pixel noise."""
    g = torch.Generator().manual_seed(seed)
    protos = [torch.zeros(1, 8, 8), torch.full((1, 8, 8), 200.0), torch.zeros(1, 8, 8)]
    protos[2][:, :, :4] = 250.0
    x = torch.cat([p + torch.randint(0, 12, (n, 1, 8, 8), generator=g) for p, n in zip(protos, sizes)])
    return x.clamp(0, 255).to(torch.uint8), torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))


def test_toy_blobs_centroids_are_blob_means_weights_blob_sizes():
    images, blob = blob_images()
    enc = build_encoder("identity", 1, 8, MEAN, STD)
    cfg = DDOQConfig(ipc=3, encoder="identity", kmeans_batch_size=8, kmeans_iterations=30)
    decoded, q = distill_class(enc, images, MEAN, STD, cfg, seed=3)
    x = normalize(images, MEAN, STD)
    assert decoded.shape == (3, 1, 8, 8) and q.centroids.shape == (3, 1, 8, 8)
    for b, size in enumerate((12, 20, 28)):
        (j,) = set(q.assignment[blob == b].tolist())  # each blob is exactly one cluster
        assert q.masses[j] == size
        torch.testing.assert_close(decoded[j], x[blob == b].mean(0), atol=1e-5, rtol=0)
    assert q.masses.sum() == len(images) == class_weights(q.masses).sum()
    torch.testing.assert_close(class_weights(q.masses), q.masses.float())


def test_quantize_keeps_the_latent_shape_and_measures_distortion():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 2, 3, 3, generator=g) * 10
    z = centres.repeat_interleave(torch.tensor([5, 6, 7, 8]), 0) + 0.01 * torch.randn(26, 2, 3, 3, generator=g)
    q = quantize(z, 4, batch_size=8, niter=20, seed=0)
    assert q.centroids.shape == (4, 2, 3, 3)
    assert sorted(q.masses.tolist()) == [5, 6, 7, 8]
    assert 0 < q.distortion < 18 * 0.01**2 * 2  # 18 dims of noise with variance 1e-4


def test_weightings_preserve_class_mass():
    m = torch.tensor([1, 4, 16, 79])
    for w in ("mass", "sqrt", "uniform"):
        assert class_weights(m, w).sum().item() == pytest.approx(100)
    torch.testing.assert_close(class_weights(m, "uniform"), torch.full((4,), 25.0))
    m = torch.tensor([1, 4, 16, 81])
    torch.testing.assert_close(class_weights(m, "sqrt"), torch.tensor([1.0, 2, 4, 9]) * 102 / 16)


def test_identity_encoder_equals_pixel_kmeans(digits):
    train, _ = digits
    mean, std = train.mean_std()
    cfg = DDOQConfig(ipc=5, encoder="identity", kmeans_batch_size=32, kmeans_iterations=25)
    res = distill(train, build_encoder("identity", 1, 28, mean, std), mean, std, cfg, seed=7,
                  classes=[2, 5], progress=False)
    assert res.labels.tolist() == [2] * 5 + [5] * 5
    for i, c in enumerate([2, 5]):
        pixels = normalize(train.of_class(c), mean, std).flatten(1)
        cents, assign = minibatch_kmeans(pixels, 5, batch_size=32, niter=25, seed=class_seed(7, c))
        torch.testing.assert_close(res.images[5 * i: 5 * i + 5].flatten(1), torch.from_numpy(cents),
                                   atol=0, rtol=0)
        np.testing.assert_array_equal(res.masses[5 * i: 5 * i + 5].numpy(), np.bincount(assign, minlength=5))
        assert res.weights[5 * i: 5 * i + 5].sum().item() == pytest.approx(len(pixels))


def test_ipc_larger_than_a_class_is_refused():
    images, _ = blob_images((2, 2, 2))
    data = ImageSet(images, torch.zeros(6, dtype=torch.long), ["only"])
    with pytest.raises(ValueError, match="class 0 .*ipc=7"):
        distill(data, build_encoder("identity", 1, 8, MEAN, STD), MEAN, STD, DDOQConfig(ipc=7, encoder="identity"),
                progress=False)


@pytest.mark.parametrize("override,msg", [
    ("ddoq.encoder=vqgan", "ddoq.encoder: unknown 'vqgan'"),
    ("ddoq.encoder=diffusers_vae", "ddoq.encoder_path: diffusers_vae needs"),
    ("+ddoq.encoder_options.subfolder=vae", r"ddoq.encoder_options: \['subfolder'\] not accepted"),
    ("ddoq.weighting=log", "ddoq.weighting: unknown 'log'"),
    ("ddoq.ipc=0", "ddoq.ipc must be a positive int"),
    ("ddoq.kmeans_init=forgy", "ddoq.kmeans_init"),
    ("ddoq.autoencoder.epochs=0", "autoencoder.epochs must be a positive int"),
])
def test_bad_ddoq_config_is_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose(["task=ddoq", override])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_ddoq_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.task == "ddoq" and isinstance(cfg.ddoq, DDOQConfig)


def test_ddoq_end_to_end_on_digits_uses_the_weights(tmp_path):
    from dream_dist import load_distilled
    from dream_dist.evaluation.protocol import evaluate
    from dream_dist.data.prepare import load_packed_splits

    out = tmp_path / "run"
    args = [f"out_dir={out}", f"pack.out={tmp_path}/packed", "progress=false", "task=ddoq",
            "ddoq.autoencoder.width=8", "ddoq.autoencoder.epochs=2", "ddoq.kmeans_batch_size=32",
            "ddoq.kmeans_iterations=20", "ddoq.baseline=false", "eval=cpu", "eval.width=8",
            "eval.epochs=4", "eval.runs=1"]
    main(args)
    for f in ("distilled.pt", "distilled.png", "weights.png", "autoencoder.pt", "autoencoder.png",
              "results.json"):
        assert (out / f).exists(), f
    assert list((out / "tb" / "ddoq").glob("events*"))
    ds = load_distilled(out / "distilled.pt")
    assert ds.stored.images.shape == (100, 1, 28, 28) and ds.factor == 1
    assert ds.labels.tolist() == [c for c in range(10) for _ in range(10)]
    # The weights are the cluster masses: per class they sum to the class size.
    cfg = compose(args)
    train, test, mean, std = load_packed_splits(cfg)
    per_class = ds.weights.view(10, 10).sum(1)
    torch.testing.assert_close(per_class, torch.tensor(train.counts(), dtype=torch.float32))
    assert (ds.weights >= 1).all() and len(set(ds.weights.tolist())) > 1
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["method"] == "ddoq (autoencoder)" and row["soft_labels"] is False
    # The reported accuracy is the weighted training: re-running it with the stored weights
    # reproduces it exactly, and the same run without weights trains to a different loss.
    images, labels = ds.stored.images, ds.stored.labels
    weighted = evaluate(images, labels, test, mean, std, cfg.eval, weights=ds.weights, progress=False)
    plain = evaluate(images, labels, test, mean, std, cfg.eval, progress=False)
    assert weighted.accs == row["accs"] and weighted.final_losses == row["final_losses"]
    assert plain.final_losses != row["final_losses"]


def test_ddoq_with_identity_and_observer_soft_labels(tmp_path, digits):
    from dream_dist import load_distilled
    from dream_dist.evaluation.observer import ObserverConfig, save_observer, train_observer

    train, _ = digits
    mean, std = train.mean_std()
    obs = train_observer(train, mean, std, ObserverConfig(width=8, epochs=2), progress=False)
    obs_path = save_observer(tmp_path / "obs.pt", obs, train.classes, model_name="convnet", width=8,
                             channels=1, image_size=28, mean=mean, std=std)
    out = tmp_path / "run"
    summary = main([f"out_dir={out}", f"pack.out={tmp_path}/packed", "progress=false", "task=ddoq",
                    "ddoq.encoder=identity", "ddoq.ipc=2", "ddoq.kmeans_batch_size=32",
                    "ddoq.kmeans_iterations=10", "ddoq.soft_labels=true", f"ddoq.observer_path={obs_path}",
                    "ddoq.temperature=2.0", "eval=cpu", "eval.width=8", "eval.epochs=3", "eval.runs=1"])
    ds = load_distilled(out / "distilled.pt")
    assert ds.soft_labels.shape == (20, 10)
    torch.testing.assert_close(ds.soft_labels.sum(1), torch.ones(20))
    # Soft labels are the observer's own, and results say they are soft.
    assert [r["soft_labels"] for r in summary["rows"]] == [True, True]
    assert summary["rows"][0]["method"] == "ddoq (identity) soft"
    assert not (out / "autoencoder.pt").exists()
