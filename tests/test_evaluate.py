"""dream_dist.evaluation.protocol: the evaluation protocol on real (scikit-learn digits) data."""
import json
import math

import pytest
import torch

import dream_dist.evaluation.protocol as ev
from dream_dist.data import normalize
from dream_dist.evaluation.protocol import EvalConfig, EvalResult, evaluate, train_network
from dream_dist.models import build_model


@pytest.fixture(scope="module")
def data(digits):
    """(normalised train images, train labels, test ImageSet, mean, std)."""
    train, test = digits
    mean, std = train.mean_std()
    return normalize(train.images, mean, std), train.labels, test, mean, std


def small(data, per_class=5):
    """The first `per_class` images of each class: a distilled-set-sized training set."""
    x, y, *_ = data
    idx = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    return x[idx], y[idx]


def tiny_cfg(**kw):
    return EvalConfig(**{"model": "convnet_tiny", "epochs": 3, "runs": 1, **kw})


def test_convnet_tiny_learns_digits(data):
    x, y, test, mean, std = data
    cfg = EvalConfig(model="convnet_tiny", epochs=20, lr=0.05, batch_size=128,
                     schedule="cosine", dsa=False, runs=1)
    result = evaluate(x, y, test, mean, std, cfg, progress=False)
    assert result.mean > 90.0, result
    assert result.num_images == len(x) and not result.soft_labels


def test_same_seed_same_accs(data):
    x, y = small(data)
    _, _, test, mean, std = data
    cfg = tiny_cfg(runs=2, dsa=True, cutmix_prob=0.5, epochs=4)
    a = evaluate(x, y, test, mean, std, cfg, progress=False)
    b = evaluate(x, y, test, mean, std, cfg, progress=False)
    assert a.accs == b.accs and a.final_losses == b.final_losses
    # The two runs are different networks, and another seed gives other runs.
    assert a.final_losses[0] != a.final_losses[1]
    c = evaluate(x, y, test, mean, std, tiny_cfg(runs=2, dsa=True, cutmix_prob=0.5, epochs=4,
                                                 seed=1), progress=False)
    assert c.final_losses != a.final_losses
    # Run i of seed s is run i-1 of seed s+1: runs are independent of each other.
    assert c.final_losses[0] == a.final_losses[1]


def test_last_epoch_and_test_set_touched_once(data, monkeypatch):
    x, y = small(data)
    _, _, test, mean, std = data
    cfg = tiny_cfg(lr=0.0, runs=2, epochs=2)
    calls = []
    real = ev.test_accuracy
    monkeypatch.setattr(ev, "test_accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = evaluate(x, y, test, mean, std, cfg, progress=False)
    # One test pass per run, after training: nothing to select a "best epoch" from.
    assert len(calls) == cfg.runs
    # lr 0 leaves every fresh network as initialised (GroupNorm keeps no running stats).
    for run, acc in enumerate(result.accs):
        torch.manual_seed(cfg.seed + run)
        net = build_model("convnet_tiny", 1, 10, 28)
        assert acc == real(net, test, mean, std)


def test_factor_decodes_images_labels_weights(data, monkeypatch):
    x, y = small(data, per_class=2)
    _, _, test, mean, std = data
    seen = {}
    real = ev.train_network

    def spy(model, images, targets, cfg, weights=None, **kw):
        seen.update(images=images, targets=targets, weights=weights)
        return real(model, images, targets, cfg, weights=weights, **kw)

    monkeypatch.setattr(ev, "train_network", spy)
    soft = torch.softmax(torch.randn(20, 10), 1)
    w = torch.arange(1.0, 21.0)
    result = evaluate(x, y, test, mean, std, tiny_cfg(epochs=1), factor=2, soft_labels=soft,
                      weights=w, progress=False)
    assert result.num_images == 80 and result.config["factor"] == 2
    assert seen["images"].shape == (80, 1, 28, 28)
    assert torch.equal(seen["targets"], soft.repeat_interleave(4, 0))
    assert torch.equal(seen["weights"], w.repeat_interleave(4))
    assert result.soft_labels and "soft labels" in str(result)


def test_weights_give_weighted_mean(data):
    """Zero weight on half the set trains exactly as the other half alone (full batch)."""
    x, y = small(data)
    keep = torch.arange(len(x)) % 2 == 0
    cfg = tiny_cfg(dsa=False, epochs=3, lr=0.05)
    nets = []
    for images, labels, weights in ((x, y, keep.float()), (x[keep], y[keep], None)):
        torch.manual_seed(0)
        net = build_model("convnet_tiny", 1, 10, 28)
        losses = train_network(net, images, labels, cfg, weights=weights,
                               generator=torch.Generator().manual_seed(0))
        nets.append((net, losses))
    (a, la), (b, lb) = nets
    assert la == pytest.approx(lb, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_input_errors(data):
    x, y = small(data)
    _, _, test, mean, std = data
    cfg = tiny_cfg(epochs=1)
    base = dict(images=x, labels=y, test=test, mean=mean, std=std, cfg=cfg, progress=False)
    run = lambda **kw: evaluate(**{**base, **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"soft_labels must be \(50, 10\)"):
        run(soft_labels=torch.rand(50, 9))
    with pytest.raises(ValueError, match="probabilities"):
        run(soft_labels=torch.rand(50, 10) + 0.1)
    with pytest.raises(ValueError, match=r"weights must have shape \(50,\)"):
        run(weights=torch.ones(49))
    with pytest.raises(ValueError, match="non-negative"):
        run(weights=-torch.ones(50))
    with pytest.raises(ValueError, match="float"):
        run(images=(x * 10).to(torch.uint8))
    with pytest.raises(ValueError, match="test set is"):
        run(images=x.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="integer class ids"):
        run(labels=y.float())
    with pytest.raises(ValueError, match="labels must lie"):
        run(labels=y + 5)
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        run(factor=3)


def test_log_dir_json_and_tensorboard(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = small(data)
    _, _, test, mean, std = data
    result = evaluate(x, y, test, mean, std, tiny_cfg(runs=2, epochs=3), log_dir=tmp_path,
                      name="digits_ipc5", progress=False)
    saved = json.loads((tmp_path / "digits_ipc5.json").read_text())
    assert saved["accs"] == result.accs and saved["name"] == "digits_ipc5"
    assert saved["config"]["epochs"] == 3
    for run in range(2):
        acc = EventAccumulator(str(tmp_path / "tb" / "digits_ipc5" / f"run{run}"))
        acc.Reload()
        (test_acc,) = acc.Scalars("test/acc")
        assert test_acc.value == pytest.approx(result.accs[run]) and test_acc.step == 3
        assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]


def test_result_summary():
    r = EvalResult.from_runs([97.0, 97.5, 96.86], 1.0, {}, soft_labels=False)
    assert r.std == pytest.approx(torch.tensor([97.0, 97.5, 96.86]).std().item())  # ddof=1
    assert str(r) == f"{r.mean:.2f} ± {r.std:.2f} (3 runs, last epoch)"
    one = EvalResult.from_runs([50.0], 1.0, {}, soft_labels=True)
    assert str(one) == "50.00 ± 0.00 (1 run, last epoch, soft labels)"
    assert r.to_dict()["accs"] == [97.0, 97.5, 96.86]


def test_schedules():
    f = ev._lr_factor
    assert [f("dc", e, 10) for e in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]
    # IDC: x0.2 at 2/3 (epoch 600 of 900) and again at 5/6 (epoch 750).
    assert [f("idc", e, 900) for e in (599, 600, 749, 750)] == pytest.approx([1, 0.2, 0.2, 0.04])
    assert f("cosine", 0, 10) == 1.0 and f("cosine", 5, 10) == pytest.approx(0.5)
    assert f("dc", 0, 1) == 1.0  # a 1-epoch run is not decayed from the start


def test_config_validation_and_presets():
    for bad in (dict(epochs=0), dict(runs=0), dict(schedule="step"), dict(cutmix_prob=1.5),
                dict(lr=-1.0), dict(model="vgg"), dict(norm="layer"), dict(momentum=1.0),
                dict(device="gpu0")):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    idc = EvalConfig.preset("idc").resolved("cifar10", factor=2)
    assert (idc.schedule, idc.cutmix_prob, idc.dsa, idc.epochs, idc.batch_size) == ("idc", 0.5, True, 1000, 64)
    assert EvalConfig.preset("dc", runs=3).runs == 3 and EvalConfig.preset("dm").cutmix_prob == 0
    with pytest.raises(ValueError, match="presets"):
        EvalConfig.preset("rded")
    assert math.isclose(EvalConfig().weight_decay, 5e-4)
