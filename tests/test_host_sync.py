"""No host sync in the hot loop: reads of tensor values (each one a device sync on CUDA) do not
grow with the class count in an inner step, nor with the batches of an evaluation epoch.

Counted with dream_dist.hostsync.HostReads (aten._local_scalar_dense and Tensor.tolist). On
this CPU every tensor is a host tensor, so the counts bound what the same code syncs on CUDA.
On the code before this change (ba0d2a7), reads per inner step [re-clustering step, next step]:
DREAM+ [98, 78] at 10 classes vs [294, 216] at 40; DREAM+ on DSA [80, 60] vs [320, 240]; IDC
[68, 68] vs [174, 176]; DSA [50, 50] vs [200, 200]. Now every one is [1, 1]. The IDC evaluation
read 7 values in a 1-batch epoch and 37 in an 8-batch one (DSA: 6 / 8); now 5 in either
(4 input checks before training, then 1 per epoch).
"""
from __future__ import annotations

import pytest
import torch

from dream_dist.data.base import ImageSet
from dream_dist.evaluation.protocol import EvalConfig, train_network
from dream_dist.hostsync import HostReads
from dream_dist.methods.dream.config import preset
from dream_dist.methods.dream.engine import Distiller
from dream_dist.methods.dream.shard import ClassShard
from dream_dist.models import build_model

TINY = dict(model="convnet_tiny", init_images=64, batch_real=8, net_images=32, net_batch=16, ipc=1,
            warmup_epochs=0)


def _classes(train, k: int) -> ImageSet:
    """Real digits split into k classes (digit d, image i -> class d*(k/10) + i mod k/10)."""
    labels = train.labels * (k // 10) + torch.arange(len(train)) % (k // 10)
    return ImageSet(train.images, labels, [str(i) for i in range(k)])


def _reads_per_step(train, name: str, k: int) -> list[int]:
    data = _classes(train, k)
    cfg = preset(name, iterations=1, inner_steps=3, tau=2, **TINY).resolved("digits")
    mean, std = data.mean_std()
    real = {c: data.of_class(c) for c in range(k)}
    d = Distiller(cfg, [ClassShard(list(range(k)), real, cfg, mean, std, k, seed=0)], data.counts(),
                  data.channels, data.size, seed=0, progress=False)
    d.initialize()
    counts = []
    for step in range(2):  # step 0 re-clusters (representative selection), step 1 does not
        with HostReads() as reads:
            d.run(until_step=step + 1)
        counts.append(reads.total)
    return counts


@pytest.mark.parametrize("name", ["dream_plus", "dream_plus_dsa", "idc", "dsa"])
def test_inner_step_reads_do_not_grow_with_the_class_count(digits, name):
    at10, at40 = _reads_per_step(digits[0], name, 10), _reads_per_step(digits[0], name, 40)
    assert at10 == at40, f"{name}: host reads per inner step {at10} at 10 classes vs {at40} at 40"
    assert max(at40) <= 2, f"{name}: {at40} reads per step (one batched read of the step's statistics)"


def _eval_reads(train, n: int, epochs: int, protocol: str) -> int:
    x = train.images[:n].float() / 255
    y = train.labels[:n]
    cfg = EvalConfig.preset(protocol, epochs=epochs, model="convnet_tiny").resolved("digits")
    torch.manual_seed(0)
    net = build_model("convnet_tiny", 1, 10, 28)
    with HostReads() as reads:
        train_network(net, x, y, cfg)
    return reads.total


@pytest.mark.parametrize("protocol", ["idc", "dsa"])
def test_evaluation_training_reads_once_per_epoch_whatever_its_batches(digits, protocol):
    train = digits[0]
    few, many = _eval_reads(train, 64, 1, protocol), _eval_reads(train, 512, 1, protocol)
    assert few == many, f"{protocol}: {few} reads for 1 batch-epoch vs {many} for 8"
    two = _eval_reads(train, 512, 2, protocol)
    assert two - many <= 1, f"{protocol}: an epoch adds {two - many} reads (at most its loss)"
