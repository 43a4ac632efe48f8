"""Ray Tune sweeps (ASHA, results table, best.yaml, TensorBoard with HParams) and evaluation
runs as Ray tasks. One module-scoped local Ray for the whole file."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from dream_dist.config import ConfigError
from dream_dist.run import compose, main

# 1 x 4 inner steps at width 8, quick accuracy (3 epochs) reported at steps 2 and 4.
TINY = ["progress=false", "distill.overrides.width=8", "distill.overrides.iterations=1",
        "distill.overrides.inner_steps=4", "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
        "distill.overrides.init_images=256", "distill.quick_eval_epochs=3", "distill.baseline=false",
        "eval.width=8", "eval.epochs=3", "eval.runs=1"]
SWEEP = ["task=tune", "tune.num_samples=4", "tune.report_every=2", "tune.max_concurrent_trials=2",
         "tune.tau=[1,2]", "tune.samples_per_cluster=[1,2]", "tune.clusters=[4,8]",
         "tune.lambda_grad=[loguniform,0.1,10.0]", "tune.lambda_feat=[loguniform,0.1,10.0]",
         "tune.lr_img={10:[0.001,0.005,0.02]}"]
TOTAL = 4




@pytest.fixture(scope="module")
def sweep(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "sweep"
    summary = main([f"out_dir={out}", f"pack.out={tmp}/packed", *TINY, *SWEEP])
    return out, summary


def test_sweep_runs_asha_and_writes_table(sweep):
    out, summary = sweep
    rows = summary["trials"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert summary["scheduler"] == {"name": "ASHA", "time_attr": "step", "max_t": TOTAL, "grace_period": 2,
                                    "reduction_factor": 2.0}
    for r in rows:
        hp = r["hparams"]
        assert hp["tau"] in (1, 2) and hp["samples_per_cluster"] in (1, 2) and hp["clusters"] in (4, 8)
        assert 0.1 <= hp["lambda_grad"] <= 10 and 0.1 <= hp["lambda_feat"] <= 10
        assert hp["lr_img"] in (0.001, 0.005, 0.02)  # the IPC-10 choices
        steps = [s for s, _ in r["curve"]]
        assert steps == list(range(2, r["step"] + 1, 2)) and r["curve"][-1][1] == pytest.approx(r["metric"])
        assert r["stopped_early"] == (r["step"] < TOTAL) and r["finished"] == (r["step"] == TOTAL)
        assert 0 <= r["metric"] <= 100
    # ASHA's rule: a trial stopped at the rung (step 2) was behind another trial there.
    at_rung = {r["trial_id"]: r["curve"][0][1] for r in rows}
    for r in rows:
        if r["stopped_early"]:
            assert r["step"] == 2 and at_rung[r["trial_id"]] < max(at_rung.values())
    # The table: one row per trial, the same values.
    with open(out / "tune_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial_id"] for t in table] == [r["trial_id"] for r in rows]
    assert set(table[0]) >= {"tau", "samples_per_cluster", "clusters", "lambda_grad", "lambda_feat", "lr_img",
                             "step", "quick_acc", "stopped_early", "seconds"}
    for t, r in zip(table, rows):
        assert int(t["step"]) == r["step"] and float(t["quick_acc"]) == pytest.approx(r["metric"], abs=1e-4)
        assert t["stopped_early"] == str(r["stopped_early"])
    assert json.loads((out / "tune_results.json").read_text())["best"]["trial_id"] == summary["best"]["trial_id"]
    assert (out / "tune_curves.png").stat().st_size > 5000
    assert any((out / "ray" / "tune").iterdir())  # Tune's own results under out_dir
    # The best trial ran the whole schedule and has the highest final quick accuracy of those that did.
    done = [r for r in rows if r["finished"]]
    assert summary["best"]["metric"] == max(r["metric"] for r in done) and summary["best"]["step"] == TOTAL


def test_event_files_hold_scalars_grids_and_hparams(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_meta
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out, summary = sweep
    runs = sorted(p.name for p in (out / "tb").iterdir() if p.is_dir())
    assert runs == sorted(f"trial_{r['trial_id']}" for r in summary["trials"])
    # The log root holds the HParams experiment: the searched knobs with their domains, the metric.
    root = EventAccumulator(str(out / "tb"))
    root.Reload()
    exp = HParamsPluginData.FromString(root.PluginTagToContent(hp_meta.PLUGIN_NAME)[hp_meta.EXPERIMENT_TAG]).experiment
    infos = {h.name: h for h in exp.hparam_infos}
    assert set(infos) == {"tau", "samples_per_cluster", "clusters", "lambda_grad", "lambda_feat", "lr_img"}
    assert [v.number_value for v in infos["tau"].domain_discrete.values] == [1, 2]
    assert (infos["lambda_grad"].domain_interval.min_value, infos["lambda_grad"].domain_interval.max_value) == (0.1, 10)
    assert [m.name.tag for m in exp.metric_infos] == ["eval/quick_acc"]
    for r in summary["trials"]:
        ev = EventAccumulator(r["tb"], size_guidance={"images": 0, "scalars": 0})
        ev.Reload()
        tags = ev.Tags()
        # Scalars of every inner step and the quick accuracy reported to Tune.
        assert [e.step for e in ev.Scalars("loss/total")] == list(range(1, r["step"] + 1))
        quick = [(e.step, e.value) for e in ev.Scalars("eval/quick_acc")]
        assert [s for s, _ in quick] == [s for s, _ in r["curve"]]
        assert [v for _, v in quick] == pytest.approx([a for _, a in r["curve"]], abs=1e-3)
        # An image grid of the synthetic set at every report: 10 classes x IPC 10 cells.
        grids = ev.Images("synthetic")
        assert [g.step for g in grids] == [s for s, _ in r["curve"]] and grids[0].width > 10 * 28
        # HParams: this run is a session with the trial's sampled values (ended when it finished).
        content = ev.PluginTagToContent(hp_meta.PLUGIN_NAME)
        start = HParamsPluginData.FromString(content[hp_meta.SESSION_START_INFO_TAG]).session_start_info
        assert {k: v.number_value for k, v in start.hparams.items()} == pytest.approx(r["hparams"])
        assert (hp_meta.SESSION_END_INFO_TAG in content) == r["finished"]
        assert "images" in tags and "eval/quick_acc" in tags["scalars"]


def test_best_yaml_composes_to_the_best_trial_and_runs(sweep, tmp_path):
    out, summary = sweep
    best_yaml = out / "best.yaml"
    text = best_yaml.read_text()
    assert text.startswith("# @package _global_") and f"dream-dist experiment_file={best_yaml}" in text
    cfg = compose([f"experiment_file={best_yaml}"])
    best = summary["best"]
    hp = best["hparams"]
    assert cfg.task == "distill" and cfg.dataset.name == "digits" and cfg.distill.method == "dream_plus"
    assert cfg.distill.overrides == best["overrides"]
    o = cfg.distill.overrides
    assert (o["tau"], o["samples_per_cluster"], o["lr_img"]) == (hp["tau"], hp["samples_per_cluster"], hp["lr_img"])
    assert o["batch_real"] == hp["clusters"] * hp["samples_per_cluster"]
    assert (o["lambda_grad"], o["lambda_feat"]) == pytest.approx((hp["lambda_grad"], hp["lambda_feat"]))
    assert o["width"] == 8 and o["inner_steps"] == 4 and cfg.eval.epochs == 3  # the sweep's base run
    # It really runs: a distill run of the best trial, with a CLI override on top.
    result = main([f"experiment_file={best_yaml}", f"out_dir={tmp_path}/best"])
    assert result["distill"]["tau"] == hp["tau"] and result["distill"]["batch_real"] == o["batch_real"]
    assert (tmp_path / "best" / "distilled.pt").exists() and 0 <= result["rows"][0]["mean"] <= 100


def test_trial_on_ray_train_workers_equals_in_process_trial(sweep, tmp_path):
    """workers_per_trial=1: the trial drives distill_on_ray and quick-evaluates its checkpoints;
    same seed, same first sample, same synthetic sets -> the in-process trial's curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = sweep
    first = summary["trials"][0]
    res = main([f"out_dir={tmp_path}/w", f"pack.out={out.parent}/packed", *TINY, *SWEEP,
                "tune.num_samples=1", "tune.workers_per_trial=1"])
    (row,) = res["trials"]
    assert row["hparams"] == pytest.approx(first["hparams"]) and row["finished"]
    common = min(len(row["curve"]), len(first["curve"]))
    assert [s for s, _ in row["curve"][:common]] == [s for s, _ in first["curve"][:common]]
    # Same synthetic set up to float tolerance: at most one test image (of 360) may flip.
    assert [a for _, a in row["curve"][:common]] == pytest.approx([a for _, a in first["curve"][:common]], abs=0.3)
    ev = EventAccumulator(row["tb"])
    ev.Reload()
    assert "loss/total" in ev.Tags()["scalars"]  # rank 0's step scalars, in the trial's run
    assert [e.step for e in ev.Scalars("eval/quick_acc")] == [2, 4] and "synthetic" in ev.Tags()["images"]
    assert list((tmp_path / "w" / "trials" / row["trial_id"] / "ray").iterdir())  # Ray Train's run, per trial


def test_experiment_file_option(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("# @package _global_\ndefaults:\n  - override /eval: protocol\n"
                 "distill:\n  method: idc\n  overrides: {iterations: 3}\neval:\n  runs: 2\n")
    cfg = compose([f"experiment_file={f}", "eval.runs=4"])
    assert cfg.distill.method == "idc" and cfg.distill.overrides == {"iterations": 3}
    assert cfg.eval.epochs == 1000 and cfg.eval.runs == 4  # its defaults list applied; the CLI wins
    assert compose([]).distill.overrides != {"iterations": 3}  # nothing leaks into later compositions
    with pytest.raises(ConfigError, match="no such file"):
        compose([f"experiment_file={tmp_path}/missing.yaml"])
    with pytest.raises(ConfigError, match="no experiment=NAME"):
        compose([f"experiment_file={f}", "experiment=digits"])


def test_tune_digits_preset_composes():
    cfg = compose(["task=tune", "experiment=tune_digits"])
    assert cfg.task == "tune" and cfg.dataset.name == "digits"
    t = cfg.tune
    assert t.num_samples >= 4 and t.max_concurrent_trials == 2 and t.clusters and t.lr_img[10]
    from dream_dist.methods.dream.method import resolve

    d = resolve(cfg)
    assert t.report_every <= d.iterations * d.inner_steps


@pytest.mark.parametrize("override,msg", [
    ("tune.tau=[0,5]", "tune.tau: choices must be positive integers"),
    ("tune.lambda_grad=[loguniform,1.0,0.1]", "tune.lambda_grad: a range is"),
    ("tune.samples_per_cluster=[uniform,1,2]", "tune.samples_per_cluster: choices must be"),
    ("tune.tau=[loguniform,1.5,8]", "bounds of an integer knob"),
    ("tune.lr_img={10:[-1.0]}", "tune.lr_img.10"),
    ("tune.reduction_factor=1", "reduction_factor must be > 1"),
    ("tune.metric=loss", "tune.metric: unknown"),
])
def test_bad_tune_config_refused(override, msg):
    with pytest.raises(ConfigError, match=msg):
        compose(["task=tune", override])


def test_impossible_combination_refused_before_any_trial(tmp_path):
    # 100 clusters x 2 samples = a real batch of 200, more than a digits class holds (~140).
    with pytest.raises(ConfigError, match="sampled values .*clusters.*exceeds"):
        main([f"out_dir={tmp_path}/run", f"pack.out={tmp_path}/packed", *TINY, *SWEEP,
              "tune.clusters=[4,100]"])
    assert not (tmp_path / "run" / "ray").exists()


def test_ray_eval_equals_sequential_evaluate(local_ray, digits, tmp_path):
    from dream_dist.methods.coreset import build_coreset
    from dream_dist.data import normalize
    from dream_dist.evaluation.protocol import EvalConfig, evaluate
    from dream_dist.distributed.evaluate import evaluate_on_ray

    train, test = digits
    mean, std = train.mean_std()
    core = build_coreset("random", train, 2, seed=0)
    images = normalize(core.images, mean, std)
    cfgs = [EvalConfig(model="convnet_tiny", epochs=4, runs=3, cutmix_prob=0.5, seed=3),
            EvalConfig(model="resnet_tiny", epochs=2, runs=2)]
    got = evaluate_on_ray(images, core.labels, test, mean, std, cfgs, factor=2, log_dir=tmp_path, progress=False)
    assert list(got) == ["convnet_tiny", "resnet_tiny"]
    for name, cfg in zip(got, cfgs):
        ref = evaluate(images, core.labels, test, mean, std, cfg, factor=2, progress=False)
        assert got[name].accs == ref.accs  # identical, run for run (seed cfg.seed + run)
        assert got[name].final_losses == pytest.approx(ref.final_losses, rel=1e-6)
        assert (got[name].mean, got[name].std, got[name].num_images) == (ref.mean, ref.std, ref.num_images)
        assert json.loads((tmp_path / f"{name}.json").read_text())["accs"] == ref.accs
        assert sorted(p.name for p in (tmp_path / "tb" / name).iterdir()) == [f"run{i}" for i in range(cfg.runs)]
    assert len(set(got["convnet_tiny"].accs)) > 1 or got["convnet_tiny"].std == 0  # three separate runs
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate_on_ray(images, core.labels, test, mean, std, cfgs, names=["a", "a"])
    with pytest.raises(ValueError, match="cfgs is empty"):
        evaluate_on_ray(images, core.labels, test, mean, std, [])


def test_ray_eval_soft_labels_and_weights_match(local_ray, digits):
    from dream_dist.methods.coreset import build_coreset
    from dream_dist.data import normalize
    from dream_dist.evaluation.protocol import EvalConfig, evaluate
    from dream_dist.distributed.evaluate import evaluate_on_ray

    train, test = digits
    mean, std = train.mean_std()
    core = build_coreset("random", train, 1, seed=1)
    images = normalize(core.images, mean, std)
    soft = torch.softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)), 1)
    w = torch.linspace(0.5, 2.0, 10)
    cfg = EvalConfig(model="convnet_tiny", epochs=3, runs=2)
    got = evaluate_on_ray(images, core.labels, test, mean, std, [cfg], soft_labels=soft, weights=w, progress=False)
    ref = evaluate(images, core.labels, test, mean, std, cfg, soft_labels=soft, weights=w, progress=False)
    assert got["convnet_tiny"].accs == ref.accs and got["convnet_tiny"].soft_labels
