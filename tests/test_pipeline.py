"""The one pipeline: class-independent methods give the same sets on Ray tasks as in process,
and task=evaluate reads a distilled set from any of its four sources, with the producing
run's accuracies."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dream_dist.data.prepare import ensure_packed, open_data
from dream_dist.errors import ConfigError, DataError
from dream_dist.methods import METHODS
from dream_dist.tasks import compose, main

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY_EVAL = ["eval=cpu", "eval.width=8", "eval.epochs=3", "eval.runs=2"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_packed")
    return ensure_packed(compose([f"pack.out={out}", "progress=false"]))


def _parts_equal(a, b) -> None:
    assert sorted(a) == sorted(b)
    for c in a:
        x, y = a[c], b[c]
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), c
        else:
            assert torch.equal(x[0], y[0]), c


@pytest.mark.parametrize("task,overrides", [
    ("coreset", ["coreset.ipc=3", "coreset.feature_width=8", "coreset.feature_max_images=300"]),
    ("ddoq", ["ddoq.ipc=3", "ddoq.encoder=identity", "ddoq.kmeans_iterations=10", "ddoq.kmeans_batch_size=32"]),
])
def test_class_fanout_on_ray_gives_the_in_process_parts(task, overrides, packed, tmp_path, local_ray):
    from dream_dist.distributed.fanout import map_classes

    cfg = compose([f"task={task}", f"dataset.packed={packed}", "progress=false", "seed=2",
                   f"out_dir={tmp_path}", *overrides])
    method = METHODS[task]
    data = open_data(cfg)
    prep = method.prepare(cfg, data, tmp_path)
    here = method.distill_group(cfg, prep, data.classes, data.class_images)
    there, envs = map_classes(method, cfg, prep, data, workers=3)
    _parts_equal(here, there)
    # Each task reports where it ran: 3 tasks, on the CPU (device=cpu reserves no GPU).
    assert len(envs) == 3 and all(e["device"] == "cpu" and e["gpu"] is None for e in envs)
    sets, _ = method.assemble(cfg, prep, data, there, tmp_path)
    assert sets[0].images.shape[0] == 3 * 10 and sets[0].labels.tolist() == [c for c in range(10) for _ in range(3)]


def test_coreset_task_on_ray_workers_equals_in_process(packed, tmp_path, local_ray):
    base = ["task=coreset", f"dataset.packed={packed}", "progress=false", "coreset.ipc=2",
            "coreset.methods=[random,herding]", "coreset.feature_width=8", "coreset.feature_max_images=300",
            *TINY_EVAL]
    here = main([*base, f"out_dir={tmp_path}/here"])
    there = main([*base, f"out_dir={tmp_path}/there", "coreset.workers=2"])
    assert [r["method"] for r in here["rows"]] == ["random", "herding"]
    assert [r["accs"] for r in here["rows"]] == [r["accs"] for r in there["rows"]]
    from dream_dist.artifact import load_distilled

    for m in ("random", "herding"):
        a, b = load_distilled(tmp_path / "here" / f"{m}_ipc2.pt"), load_distilled(tmp_path / "there" / f"{m}_ipc2.pt")
        assert torch.equal(a.stored.images, b.stored.images)


@pytest.fixture(scope="module")
def distilled_run(packed, tmp_path_factory):
    """A tiny DREAM+ run on digits: its distilled.pt and its own evaluation."""
    out = tmp_path_factory.mktemp("pipeline_distill")
    summary = main([f"out_dir={out}", f"dataset.packed={packed}", "progress=false", "seed=1",
                    "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=2",
                    "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
                    "distill.overrides.init_images=200", "distill.baseline=false", *TINY_EVAL])
    return out, summary


def _evaluate(tmp_path, packed, name, *extra):
    return main(["task=evaluate", f"dataset.packed={packed}", "progress=false", f"out_dir={tmp_path}/{name}",
                 *TINY_EVAL, *extra])


def test_evaluate_a_distilled_pt_reproduces_the_producing_runs_accuracies(distilled_run, packed, tmp_path):
    out, produced = distilled_run
    got = _evaluate(tmp_path, packed, "pt", f"evaluate.set={out / 'distilled.pt'}", "eval.epochs=1", "seed=9")
    # The protocol (epochs, seed, runs...) is the one the set records, not this run's eval.
    assert got["protocol"] == "the producing run's" and got["kind"] == "distilled" and got["factor"] == 2
    assert got["rows"][0]["accs"] == produced["rows"][0]["accs"]
    assert (tmp_path / "pt" / "results.json").exists()


def test_evaluate_exported_imagefolder_webdataset_and_tensors(distilled_run, packed, tmp_path):
    from dream_dist.artifact import export_imagefolder, export_webdataset, load_distilled

    out, _ = distilled_run
    ds = load_distilled(out / "distilled.pt")  # decoded: factor² images per stored image
    export_imagefolder(ds, tmp_path / "folder")
    export_webdataset(ds, tmp_path / "wds")
    decoded = ds.images.clone()
    torch.save({"images": ds.uint8(), "labels": ds.labels}, tmp_path / "set_uint8.pt")
    torch.save({"data": [[decoded, ds.labels]]}, tmp_path / "set_dc.pt")  # DC's layout, normalised floats
    results = {}
    for name, path in (("folder", tmp_path / "folder"), ("wds", tmp_path / "wds"),
                       ("uint8", tmp_path / "set_uint8.pt"), ("dc", tmp_path / "set_dc.pt")):
        results[name] = _evaluate(tmp_path, packed, f"ev_{name}", f"evaluate.set={path}")  # the run's eval
    kinds = {k: r["kind"] for k, r in results.items()}
    assert kinds == {"folder": "imagefolder", "wds": "webdataset", "uint8": "tensors", "dc": "tensors"}
    # The same 400 decoded images (PNG and uint8 are lossless) -> the same training -> the same accuracies.
    accs = {k: r["rows"][0]["accs"] for k, r in results.items()}
    assert accs["folder"] == accs["wds"] == accs["uint8"], accs
    assert all(0 <= a <= 100 for v in accs.values() for a in v)
    assert results["dc"]["rows"][0]["ipc"] == 40


def test_evaluate_cross_architecture_table(distilled_run, packed, tmp_path):
    out, _ = distilled_run
    got = _evaluate(tmp_path, packed, "xarch", f"evaluate.set={out / 'distilled.pt'}",
                    "evaluate.models=[convnet_tiny,resnet_tiny]")
    assert [r["method"] for r in got["rows"]] == ["convnet_tiny", "resnet_tiny"]
    assert {json.loads((tmp_path / "xarch" / f"distilled_{m}.json").read_text())["config"]["model"]
            for m in ("convnet_tiny", "resnet_tiny")} == {"convnet_tiny", "resnet_tiny"}


def test_a_named_protocol_is_the_published_one():
    from dream_dist.pipeline import named_protocol

    cfg = compose(["task=evaluate", "evaluate.protocol=dm", "eval.runs=2", "seed=4", *TINY_EVAL[1:3]])
    dm = named_protocol(cfg).resolved("digits")
    assert (dm.protocol, dm.epochs, dm.batch_size, dm.runs, dm.seed) == ("dm", 1000, 256, 2, 4)
    idc = named_protocol(compose(["task=evaluate", "evaluate.protocol=idc"])).resolved("mnist", 2)
    assert (idc.batch_size, idc.cutmix_prob, idc.aug_strategy) == (64, 0.0, "color_crop_scale_rotate")


def test_evaluate_refuses_bad_input_in_one_line(packed, tmp_path):
    with pytest.raises(ConfigError, match="evaluate.set: give the set"):
        _evaluate(tmp_path, packed, "none")
    with pytest.raises(DataError, match="does not exist"):
        _evaluate(tmp_path, packed, "missing", f"evaluate.set={tmp_path}/nope.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(DataError, match="holds no image and label tensors"):
        _evaluate(tmp_path, packed, "odd", f"evaluate.set={tmp_path}/odd.pt")
    with pytest.raises(ConfigError, match="evaluate.models: unknown"):
        compose(["task=evaluate", "evaluate.models=[vgg99]"])


def test_the_tinyimagenet_subset_gets_no_published_figure():
    """Published TinyImageNet numbers belong to the full 500-per-class set only."""
    from types import SimpleNamespace

    from dream_dist.pipeline import is_subset

    def data(n, k):
        return SimpleNamespace(counts_all=[n] * k, classes=list(range(k)))

    tiny = SimpleNamespace(dataset=SimpleNamespace(name="tinyimagenet", kind="tinyimagenet"))
    assert "subset" in is_subset(tiny, data(100, 200))
    assert is_subset(tiny, data(500, 200)) == ""
    assert is_subset(SimpleNamespace(dataset=SimpleNamespace(name="mnist", kind="mnist")), data(100, 10)) == ""
