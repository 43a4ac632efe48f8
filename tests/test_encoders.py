"""dream_dist.encoders: the registry, identity, the trained autoencoder, the optional diffusers VAE."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dream_dist.data import normalize
from dream_dist.encoders import (
    ENCODERS,
    AutoencoderConfig,
    ConvAutoencoder,
    build_encoder,
    load_autoencoder,
    reconstruction_error,
    register_encoder,
    save_autoencoder,
    train_autoencoder,
)

MEAN, STD = [0.2], [0.3]


def test_registry_knows_the_three_and_refuses_bad_names_and_options():
    assert {"identity", "autoencoder", "diffusers_vae"} <= set(ENCODERS)
    with pytest.raises(ValueError, match="unknown encoder 'vqgan'.*identity"):
        build_encoder("vqgan", 1, 28, MEAN, STD)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['scale'\]"):
        build_encoder("identity", 1, 28, MEAN, STD, scale=2)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("identity")(lambda *a, **k: None)


def test_identity_round_trips_exactly():
    enc = build_encoder("identity", 1, 28, MEAN, STD)
    x = torch.randn(5, 1, 28, 28)
    z = enc.encode(x)
    assert z.shape == x.shape and torch.equal(enc.decode(z), x)


@pytest.mark.parametrize("channels,size,downsample,latent", [(1, 28, 2, (4, 7, 7)), (3, 64, 3, (4, 8, 8))])
def test_autoencoder_shapes_round_trip(channels, size, downsample, latent):
    ae = ConvAutoencoder(channels, size, width=8, latent_channels=4, downsample=downsample)
    x = torch.randn(3, channels, size, size)
    z = ae.encode(x)
    assert z.shape == (3, *latent) and tuple(z.shape[1:]) == ae.latent_shape
    assert ae.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="not divisible"):
        ConvAutoencoder(1, 28, downsample=3)


def test_trained_autoencoder_reduces_reconstruction_error_and_reloads(digits, tmp_path):
    train, test = digits
    mean, std = train.mean_std()
    cfg = AutoencoderConfig(width=8, epochs=4, batch_size=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial weights train_autoencoder(seed=0) starts from
        untrained = ConvAutoencoder(1, 28, cfg.width, cfg.latent_channels, cfg.downsample).eval()
    ae = train_autoencoder(train, mean, std, cfg, seed=0, progress=False)
    assert len(ae.losses) == 4 and ae.losses[-1] < ae.losses[0]
    before = reconstruction_error(untrained, test.images, mean, std)
    after = reconstruction_error(ae, test.images, mean, std)  # held-out images
    assert after < 0.5 * before, (before, after)

    path = save_autoencoder(ae, tmp_path / "ae.pt")
    enc = build_encoder("autoencoder", 1, 28, mean, std, path=path)
    x = normalize(test.images[:16], mean, std)
    with torch.no_grad():
        torch.testing.assert_close(enc.decode(enc.encode(x)), ae.decode(ae.encode(x)))
    # The file is for 1x28 px images normalised with the digits' statistics: anything else is refused.
    with pytest.raises(ValueError, match="1x28px images, the dataset has 3x28px"):
        build_encoder("autoencoder", 3, 28, mean, std, path=path)
    with pytest.raises(ValueError, match="normalised with mean"):
        build_encoder("autoencoder", 1, 28, [0.5], std, path=path)
    with pytest.raises(ValueError, match="needs the path"):
        build_encoder("autoencoder", 1, 28, mean, std)


def test_autoencoder_file_never_unpickles_code(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "dream_dist.autoencoder", "payload": ConvAutoencoder(1, 28, width=4)}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_autoencoder(bad)
    with pytest.raises(FileNotFoundError, match="no autoencoder file"):
        load_autoencoder(tmp_path / "missing.pt")


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_diffusers_vae_without_diffusers_gives_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'dream_dist\[diffusers\]'"):
        build_encoder("diffusers_vae", 3, 64, [0.5] * 3, [0.25] * 3, path=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_vae_needs_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directory"):
        build_encoder("diffusers_vae", 3, 64, [0.5] * 3, [0.25] * 3, path=tmp_path / "nope")
