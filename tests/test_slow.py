"""Long checks (minutes on a 2-core CPU): `pytest -m slow`. Not part of CI's run."""
from __future__ import annotations

import pytest
import torch

from dream_dist.data import load_dataset
from dream_dist.evaluation.protocol import EvalConfig, evaluate


@pytest.mark.slow
def test_convnet3_on_full_mnist_reaches_98(mnist_dir):
    """Sanity check of models + protocol: the full training set for 2 epochs, ConvNet-3 w128."""
    torch.set_num_threads(2)
    train, test = load_dataset("mnist", "train", root=mnist_dir), load_dataset("mnist", "test", root=mnist_dir)
    mean, std = train.mean_std()
    from dream_dist.data import normalize

    cfg = EvalConfig(epochs=2, runs=1, batch_size=128, dsa=False, schedule="cosine", lr=0.05)
    res = evaluate(normalize(train.images, mean, std), train.labels, test, mean, std, cfg, progress=False)
    assert res.mean >= 98.0, res
