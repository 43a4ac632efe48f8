"""Bounded memory in every method (issue 21), on a real RGB pack (TinyImageNet-subset classes,
64 px): a per-class loop holds as much after N classes as after N/2, and a driver that trains
an observer, an autoencoder or a feature net peaks at the same RSS for N classes as for N/2,
because it reads the training split batch by batch and never holds it. Every measurement runs
in a fresh process, so nothing an earlier test allocated counts.

Before the fix a DDOQ class loop grew by one set of the class's temporaries per class (glibc's
heap kept them as free holes it never reused; dream_dist.memory): about 13 MB a class here,
40 MB on the stress classes. The drivers loaded the whole split (`OpenedData.train()`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

CLASSES, PER_CLASS, TEST_PER_CLASS = 64, 100, 2
CLASS_MB = PER_CLASS * 3 * 64 * 64 / 2**20  # decoded bytes of one class: 1.2 MB


def margin_mb(classes: int, loop: bool = False) -> float:
    """Allowed growth for `classes` more classes: a few MB of noise and a fifth of those
    classes' decoded pixels (a held split, or one kept copy of each class, is 5x that); in a
    class loop, also the growth it lets pass before it gives free heap back (dream_dist.memory)."""
    from dream_dist.memory import SLACK_MB

    return 6 + 0.2 * classes * CLASS_MB + (SLACK_MB if loop else 0)


@pytest.fixture(scope="module")
def pack(tiny_dir, tmp_path_factory):
    """The first CLASSES classes of the TinyImageNet subset, packed (PNG, one shard a class)."""
    from dream_dist.data.folder import FileSource, tinyimagenet_source
    from dream_dist.data.stream import pack_files

    out = tmp_path_factory.mktemp("pack")
    train, val = tinyimagenet_source(tiny_dir, "train"), tinyimagenet_source(tiny_dir, "val")
    tr = FileSource("tinyimagenet", train.classes[:CLASSES], [f[:PER_CLASS] for f in train.files[:CLASSES]])
    te = FileSource("tinyimagenet", val.classes[:CLASSES], [f[:TEST_PER_CLASS] for f in val.files[:CLASSES]])
    index = pack_files(tr, out, "train", size=64, progress=False)
    pack_files(te, out, "test", size=64, mean_std=(index["mean"], index["std"]), progress=False)
    return out


def overrides(tiny_dir, pack, classes: int, *extra: str) -> list[str]:
    return ["dataset=tinyimagenet", f"dataset.root={tiny_dir}", f"dataset.packed={pack}",
            f"dataset.classes=[{','.join(map(str, range(classes)))}]", "progress=false", "threads=1", *extra]


# One measurement in a fresh process: argv[1] is the JSON job, the last stdout line the answer.
PROBE = r"""
import json, sys
from pathlib import Path
import torch
from dream_dist.memory import peak_rss_mb, rss_mb

job = json.loads(sys.argv[1])
torch.set_num_threads(1)
from dream_dist.data.prepare import open_data
from dream_dist.methods import METHODS
from dream_dist.tasks import compose

cfg = compose(job["overrides"])
method = METHODS[cfg.task]
out = Path(job["out"])
out.mkdir(parents=True, exist_ok=True)
data = open_data(cfg, method.memory_budget_mb(cfg))
if job["what"] == "driver":
    # What the driver of a fan-out run does before its tasks: open the data, prepare. The peak
    # is taken before RDED's observer check on the test split: a forward batch of up to 1024 test
    # images, which grows with the test split here (2 images a class), not with the train split.
    import dream_dist.evaluation.protocol as protocol

    peak, accuracy = [], protocol.test_accuracy

    def test_accuracy(*args, **kwargs):
        peak.append(peak_rss_mb())
        return accuracy(*args, **kwargs)

    protocol.test_accuracy = test_accuracy
    method.prepare(cfg, data, out)
    print(json.dumps({"peak": (peak or [peak_rss_mb()])[0], "held_split": data._train is not None}))
else:
    # One Ray task's body (dream_dist.distributed.fanout), in process: RSS before each class.
    from dream_dist.data.shards import PackedReader
    from dream_dist.distributed.fanout import _group_task
    from dream_dist.models import build_model

    if cfg.task == "rded":  # the observer's training is not what is measured here
        from dream_dist.methods.rded import RDEDPrep

        observer = build_model("convnet_tiny", data.channels, len(data.names), data.image_size).eval()
        prep = RDEDPrep(observer, {}, cfg.rded.resolved_factor(data.image_size), data.mean, data.std)
    else:
        prep = method.prepare(cfg, data, out)
    rss, load = [], PackedReader.load_class

    def load_class(self, c):
        rss.append(rss_mb())
        return load(self, c)

    PackedReader.load_class = load_class
    _group_task(method, cfg, method.remote_prep(cfg, prep), str(data.root), data.classes, 1)
    rss.append(rss_mb())
    print(json.dumps({"rss": rss, "peak": peak_rss_mb()}))
"""


def probe(what: str, args: list[str], out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps({"what": what, "overrides": args, "out": str(out)})],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


LOOPS = {
    "ddoq": ["task=ddoq", "ddoq.encoder=identity", "ddoq.ipc=1", "ddoq.kmeans_iterations=10"],  # as the stress run
    "rded": ["task=rded", "rded.ipc=1"],
}


@pytest.mark.parametrize("task", list(LOOPS))
def test_a_class_loop_holds_no_more_after_n_classes_than_after_half(task, pack, tiny_dir, tmp_path):
    # RSS between classes, the median over a quarter of the classes: a class's own spike, or
    # the dip when the loop gives free heap back, does not move it; what the loop keeps (or
    # leaves resident) from class to class raises every reading after it.
    import statistics

    n = CLASSES
    rss = probe("loop", overrides(tiny_dir, pack, n, *LOOPS[task]), tmp_path)["rss"]
    half, full = statistics.median(rss[n // 4: n // 2 + 1]), statistics.median(rss[3 * n // 4:])
    allowed = margin_mb(n // 2, loop=True)
    assert full - half <= allowed, (
        f"{task}: RSS {half:.0f} MB around {n // 2} classes, {full:.0f} MB around {n} "
        f"(+{full - half:.1f} MB; allowed {allowed:.1f}); per class {[round(r) for r in rss]}")


# The same subsample and small batches at both sizes: the same steps, whose peak is then small,
# and so is its run-to-run noise.
DRIVERS = {
    # The observer RDED scores crops with.
    "rded": ["task=rded", "rded.ipc=1", "observer.model=convnet_tiny", "observer.epochs=1",
             "observer.max_images=256", "observer.batch_size=32"],
    # An autoencoder and a soft-label observer.
    "ddoq": ["task=ddoq", "ddoq.ipc=1", "ddoq.soft_labels=true", "ddoq.autoencoder.width=8",
             "ddoq.autoencoder.epochs=1", "ddoq.autoencoder.max_images=256", "ddoq.autoencoder.batch_size=32",
             "observer.model=convnet_tiny", "observer.epochs=1", "observer.max_images=256", "observer.batch_size=32"],
    # Herding's feature net.
    "coreset": ["task=coreset", "coreset.ipc=1", "coreset.methods=[herding]", "coreset.feature_model=convnet_tiny",
                "coreset.feature_max_images=64"],
}


@pytest.mark.parametrize("task", list(DRIVERS))
def test_a_driver_that_trains_on_the_split_never_holds_it(task, pack, tiny_dir, tmp_path):
    peak, held = {}, False
    for n in (CLASSES // 4, CLASSES):
        runs = [probe("driver", overrides(tiny_dir, pack, n, *DRIVERS[task]), tmp_path / f"{n}-{i}") for i in range(2)]
        peak[n] = min(r["peak"] for r in runs)  # the lower of two runs: a training step's peak is noisy
        held |= any(r["held_split"] for r in runs)
    grew, more = peak[CLASSES] - peak[CLASSES // 4], CLASSES - CLASSES // 4
    assert grew <= margin_mb(more), (
        f"{task}: driver peak RSS {peak[CLASSES // 4]:.0f} MB at {CLASSES // 4} classes, {peak[CLASSES]:.0f} MB at "
        f"{CLASSES} (+{grew:.1f} MB; allowed {margin_mb(more):.1f}; the {more} more classes decode to "
        f"{more * CLASS_MB:.0f} MB; train split loaded: {held})")
    assert not held, f"{task}: the driver loaded the train split"


def test_streamed_training_gives_the_in_memory_weights(pack, tiny_dir):
    """The same batches from the shards as from the loaded split (classes in dataset.classes'
    order, not sorted): the feature net / observer trainer and the autoencoder end bit-equal."""
    from dream_dist.data.base import StreamedSet
    from dream_dist.data.prepare import open_data
    from dream_dist.encoders import AutoencoderConfig, train_autoencoder
    from dream_dist.tasks import compose
    from dream_dist.training import train_feature_net

    cfg = compose(["dataset=tinyimagenet", f"dataset.root={tiny_dir}", f"dataset.packed={pack}",
                   "dataset.classes=[5,1,2,7,30]", "progress=false"])
    data = open_data(cfg)
    stream = data.train_stream()
    assert isinstance(stream, StreamedSet) and data._train is None
    memory = data.reader.load_classes(data.selected)
    assert torch.equal(stream.labels, memory.labels) and len(stream) == len(memory)
    idx = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))[:64]
    assert torch.equal(stream.batch(idx), memory.images[idx])

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    for kw in ({}, {"max_images": 200}):  # every image, and a class-balanced subsample
        nets = [train_feature_net(s, data.mean, data.std, model="convnet_tiny", epochs=2, batch_size=64, seed=3,
                                  progress=False, **kw) for s in (memory, stream)]
        assert same(*nets), kw
    ae = AutoencoderConfig(width=8, epochs=1, batch_size=64, max_images=300)
    aes = [train_autoencoder(s, data.mean, data.std, ae, seed=1, progress=False) for s in (memory, stream)]
    assert same(*aes) and aes[0].losses == aes[1].losses
