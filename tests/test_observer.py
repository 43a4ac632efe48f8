"""The observer: train + save + reload, class-order checks, weights_only loading, soft labels."""
from __future__ import annotations

import json

import pytest
import torch

from dream_dist.config import ConfigError
from dream_dist.data import normalize
from dream_dist.evaluation.protocol import test_accuracy
from dream_dist.evaluation.observer import (
    ObserverConfig,
    load_observer,
    save_observer,
    soft_labels,
    train_observer,
)
from dream_dist.run import compose, main


@pytest.fixture(scope="module")
def observer_ckpt(tmp_path_factory, digits):
    """A tiny observer trained on digits and saved in our checkpoint format."""
    train, _ = digits
    mean, std = train.mean_std()
    net = train_observer(train, mean, std, ObserverConfig(model="convnet_tiny", epochs=3),
                         progress=False)
    path = tmp_path_factory.mktemp("obs") / "observer.pt"
    save_observer(path, net, train.classes, model_name="convnet_tiny", width=None,
                  channels=train.channels, image_size=train.size, mean=mean, std=std)
    return path, net, mean, std


def test_train_observer_task_writes_a_checkpoint_that_reloads(tmp_path, digits):
    train, test = digits
    out = tmp_path / "run"
    main([f"out_dir={out}", f"pack.out={tmp_path}/packed", "progress=false", "task=train_observer",
          "observer.model=convnet_tiny", "observer.width=16", "observer.epochs=4"])
    res = json.loads((out / "results.json").read_text())
    raw = torch.load(out / "observer.pt", weights_only=True)  # a plain dict of safe types
    assert raw["classes"] == train.classes and raw["model"] == "convnet_tiny" and raw["width"] == 16
    net = load_observer(out / "observer.pt", train.classes)
    acc = test_accuracy(net, test, raw["mean"], raw["std"])
    assert acc == pytest.approx(res["test_acc"])  # the reloaded weights are the trained ones
    assert acc > 70.0  # chance is 10 %


def test_class_order_mismatch_is_refused(observer_ckpt, digits):
    path = observer_ckpt[0]
    names = list(digits[0].classes)
    swapped = names.copy()
    swapped[3], swapped[7] = swapped[7], swapped[3]
    with pytest.raises(ValueError, match=r"mismatch at index 3: the observer's class 3 is '3' but "
                                         r"the dataset's class 3 is '7'"):
        load_observer(path, swapped)
    with pytest.raises(ValueError, match="10 classes but the dataset has 9"):
        load_observer(path, names[:9])
    load_observer(path, names)  # the right order loads


def test_bare_state_dict_needs_class_names(tmp_path, observer_ckpt, digits):
    _, net, mean, std = observer_ckpt
    names = digits[0].classes
    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    with pytest.raises(ValueError, match="carries no class names.*classes_file"):
        load_observer(bare, names, model="convnet_tiny", image_size=28)
    good = tmp_path / "classes.txt"
    good.write_text("\n".join(names) + "\n")
    loaded = load_observer(bare, names, classes_file=good, model="convnet_tiny", image_size=28)
    x = normalize(digits[1].images[:16], mean, std)
    assert torch.allclose(loaded(x), net(x))
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(reversed(names)))
    with pytest.raises(ValueError, match="index 0: the observer's class 0 is '9'"):
        load_observer(bare, names, classes_file=bad, model="convnet_tiny", image_size=28)


class _Payload:
    """Unpickling this runs open(marker, 'w'): proof that pickled code was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused(tmp_path, observer_ckpt, digits):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "dream_dist.observer", "state_dict": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_observer(evil, digits[0].classes)
    assert not marker.exists()  # nothing ran
    torch.load(evil, weights_only=False)  # the unsafe load WOULD have run it
    assert marker.exists()


def test_other_normalisation_is_bridged(observer_ckpt, digits):
    path, net, mean, std = observer_ckpt
    other_mean, other_std = [0.5], [0.25]
    loaded = load_observer(path, digits[0].classes, mean=other_mean, std=other_std)
    imgs = digits[1].images[:32]
    assert torch.allclose(loaded(normalize(imgs, other_mean, other_std)),
                          net(normalize(imgs, mean, std)), atol=1e-4)


def test_soft_labels(observer_ckpt, digits):
    _, net, mean, std = observer_ckpt
    x = normalize(digits[1].images[:50], mean, std)
    p = soft_labels(net, x, batch_size=16)
    assert p.shape == (50, 10) and torch.allclose(p.sum(1), torch.ones(50), atol=1e-5)
    assert torch.equal(p.argmax(1), net(x).argmax(1))
    flat = soft_labels(net, x, temperature=20.0)
    assert flat.max(1).values.mean() < p.max(1).values.mean()
    with pytest.raises(ValueError, match="temperature"):
        soft_labels(net, x, temperature=0)


@pytest.mark.parametrize("override,msg", [
    ("observer.epochs=0", "observer.*epochs must be a positive int"),
    ("observer.model=vgg", "observer.model: unknown 'vgg'"),
    ("observer.classes_file=x.txt", "observer.*classes_file is only used with observer.path"),
])
def test_bad_observer_config_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose(["task=train_observer", override])
