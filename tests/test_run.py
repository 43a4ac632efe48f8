"""The CLI: one compose() per experiment file, bad configs refused, and end-to-end runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dream_dist.config import ConfigError
from dream_dist.errors import DataError
from dream_dist.run import compose, conf_dir, main

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    from dream_dist.tasks import TASKS

    assert cfg.task in TASKS
    if cfg.task == "distill":
        from dream_dist.methods.dream.method import resolve

        resolve(cfg)  # the preset + overrides resolve for the experiment's dataset


def test_defaults_are_the_digits_main_job():
    cfg = compose([])
    assert cfg.task == "distill" and cfg.dataset.name == "digits" and cfg.distill.method == "dream_plus"


@pytest.mark.parametrize("override,msg", [
    ("task=distil", "unknown 'distil'"),
    ("distill.method=dream++", "distill.method: unknown 'dream\\+\\+'"),
    ("distill.overrides.tau=0", "distill.overrides.tau must be a positive"),
    ("+distill.overrides.taus=3", "distill.overrides: unknown key"),
    ("eval.epochs=0", "eval.epochs must be a positive"),
    ("coreset.ipc=0", "coreset.ipc must be >= 1"),
    ("eval.schedule=step", "eval.schedule: unknown .step."),
])
def test_bad_config_is_refused_before_compute(override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose([override])


def test_ipc_larger_than_class_refused_before_compute(tmp_path):
    # Digits classes have ~140 training images: IPC 50 x f² 4 = 200 cannot be initialised.
    with pytest.raises(DataError, match="distill.overrides.ipc.*only"):
        main([f"out_dir={tmp_path}/run", f"pack.out={tmp_path}/packed", "progress=false",
              "+distill.overrides.ipc=50"])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_distill_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"pack.out={tmp_path}/packed", "progress=false",
            "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=2",
            "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
            "distill.overrides.init_images=256", "distill.grid_every=1",
            "eval.width=8", "eval.epochs=3", "eval.runs=1", "distill.shards=2"]
    summary = main(args)
    assert [r["method"] for r in summary["rows"]] == ["dream_plus", "random coreset"]
    assert all(0 <= r["mean"] <= 100 for r in summary["rows"])
    for f in ("distilled.pt", "distilled.png", "checkpoint.pt", "history.json", "results.json"):
        assert (out / f).exists(), f
    from dream_dist import load_distilled

    ds = load_distilled(out / "distilled.pt")
    assert len(ds) == 10 * 10 * 4 and ds.factor == 2 and ds.stored.images.shape == (100, 1, 28, 28)
    # TensorBoard has scalars and image grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(next((out / "tb" / "distill").glob("events*"))))
    ev.Reload()
    assert "loss/total" in ev.Tags()["scalars"] and "synthetic" in ev.Tags()["images"]
    # Resume from the finished run's checkpoint: nothing left to do, same set.
    again = main(args + ["distill.resume=true", "distill.baseline=false"])
    assert again["metrics"]["steps"] == 2
    torch.testing.assert_close(load_distilled(out / "distilled.pt").stored.images, ds.stored.images)


def test_pack_task(tmp_path):
    main(["task=pack", f"pack.out={tmp_path}", "progress=false"])
    idx = json.loads(Path(tmp_path, "index-train.json").read_text())
    assert idx["source"] == "digits" and sum(idx["counts"]) == 1437


def test_ensure_packed_reuses_a_packed_copy_without_reading_the_source(tmp_path, monkeypatch):
    """A file-based source whose files are unchanged is not read again (fingerprint of paths,
    sizes and mtimes); changing a file repacks its class only."""
    import numpy as np
    from PIL import Image

    import dream_dist.data as data
    from dream_dist.data.prepare import ensure_packed

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "src" / split / c / f"{i}.png")
    cfg = compose(["dataset=imagefolder", f"dataset.root={tmp_path / 'src'}", f"pack.out={tmp_path / 'packed'}",
                   "progress=false"])
    import dream_dist.data.stream as stream

    reads = []  # (split, class) of every class decoded
    real_pack_class = stream.pack_class
    monkeypatch.setattr(stream, "pack_class", lambda files, c, out, split, *a, **k:
                        reads.append((split, c)) or real_pack_class(files, c, out, split, *a, **k))
    real_load = data.load_dataset
    out = ensure_packed(cfg)
    assert sorted(reads) == [("test", 0), ("test", 1), ("train", 0), ("train", 1)]  # each class read once
    assert ensure_packed(cfg) == out and len(reads) == 4  # unchanged: no read at all
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "src" / "train" / "a" / "0.png")
    ensure_packed(cfg)
    assert sorted(reads[4:]) == [("train", 0)]  # a changed train file of class a: that class again
    from dream_dist.data.shards import PackedReader

    assert torch.equal(PackedReader(out, "train").load_classes([0]).images[0],
                       real_load("imagefolder", "train", root=tmp_path / "src").images[0])


def test_console_script_exits_zero(monkeypatch, capsys):
    """`dream-dist` is sys.exit(cli()): it must return 0, not the result dict (status 1)."""
    import sys

    from dream_dist.run import cli

    monkeypatch.setattr(sys, "argv", ["dream-dist", "--help"])
    assert cli() == 0
    assert "dream-dist" in capsys.readouterr().out


def test_same_settings_give_a_bit_identical_set_and_accuracies(tmp_path):
    """The README's promise: same seed, settings and thread count on one machine -> the same
    distilled.pt bytes-for-values and the same table. results.json names the environment."""
    args = [f"pack.out={tmp_path}/packed", "progress=false", "threads=1", "seed=3",
            "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=3",
            "distill.overrides.tau=2", "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
            "distill.overrides.init_images=256", "eval.width=8", "eval.epochs=3", "eval.runs=2"]
    a = main([f"out_dir={tmp_path}/a", *args])
    b = main([f"out_dir={tmp_path}/b", *args])
    sa = torch.load(tmp_path / "a" / "distilled.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "distilled.pt", weights_only=True)
    for k in ("images", "labels"):
        assert torch.equal(sa[k], sb[k]), k
    assert [(r["method"], r["accs"]) for r in a["rows"]] == [(r["method"], r["accs"]) for r in b["rows"]]
    env = json.loads((tmp_path / "a" / "results.json").read_text())["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"] and env["faiss"]


def test_seed_and_device_reach_evaluation_and_kd_unless_set_there():
    cfg = compose(["seed=3"])
    assert (cfg.eval.seed, cfg.kd.seed, cfg.eval.device, cfg.kd.device) == (3, 3, "cpu", "cpu")
    cfg = compose(["seed=3", "eval.seed=5", "eval=idc"])
    assert (cfg.eval.seed, cfg.kd.seed) == (5, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("override", ["device=cuda", "eval.device=cuda:0", "kd.device=cuda"])
def test_absent_cuda_is_an_error_not_a_silent_cpu_fallback(override):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        compose([override])


def test_a_tiny_memory_budget_gives_the_same_set(tmp_path):
    """Over the budget no class is cached: matching batches and network batches are read per
    sample from the shards, clustering streams each class, the baseline reads its picks."""
    args = [f"pack.out={tmp_path}/packed", "progress=false", "threads=1", "distill.overrides.width=8",
            "distill.overrides.iterations=1", "distill.overrides.inner_steps=2", "distill.overrides.batch_real=16",
            "distill.overrides.net_images=64", "distill.overrides.init_images=256", "eval.width=8",
            "eval.epochs=2", "eval.runs=1"]
    big = main([f"out_dir={tmp_path}/big", *args])
    tiny = main([f"out_dir={tmp_path}/tiny", *args, "distill.memory_budget_mb=0.05"])  # < one digits class
    a = torch.load(tmp_path / "big" / "distilled.pt", weights_only=True)
    b = torch.load(tmp_path / "tiny" / "distilled.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"])
    assert [r["accs"] for r in big["rows"]] == [r["accs"] for r in tiny["rows"]]  # the baseline too
