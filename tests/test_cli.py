"""The `dream-dist` command line: one line and exit status 2 for every mistake a user can make,
tracebacks only with HYDRA_FULL_ERROR=1, and Hydra's conventions (--help, --cfg, -m, run and
sweep directories)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dream_dist.data.prepare import ensure_packed
from dream_dist.run import cli, compose

REPO = Path(__file__).resolve().parents[1]
# A distillation that takes seconds (used by the -m and run-directory tests).
TINY = ["progress=false", "threads=1", "distill.overrides.width=8", "distill.overrides.iterations=1",
        "distill.overrides.inner_steps=2", "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
        "distill.overrides.init_images=256", "eval.width=8", "eval.epochs=2", "eval.runs=1",
        "distill.baseline=false"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_packed")
    return ensure_packed(compose([f"pack.out={out}", "progress=false"]))


def _truncated_copy(packed: Path, dest: Path) -> Path:
    shutil.copytree(packed, dest)
    index = json.loads((dest / "index-train.json").read_text())
    shard = dest / index["shards"]["0"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return dest


def _bare_state_dict(path: Path) -> Path:
    torch.save({"conv.weight": torch.zeros(8, 1, 3, 3)}, path)
    return path


# (case, overrides built from tmp/packed, words the one line must contain)
CASES = [
    ("unknown method", lambda t, p: ["distill.method=nope"], ["distill.method: unknown 'nope'", "dream_plus"]),
    ("bad eval value", lambda t, p: ["eval.epochs=0"], ["eval.epochs must be a positive int"]),
    ("bad nested value", lambda t, p: ["distill.overrides.tau=0"], ["distill.overrides.tau must be"]),
    ("unknown override key", lambda t, p: ["distill.overrides.taus=3"], ["distill.overrides: unknown key(s) ['taus']", "tau"]),
    ("unknown top-level key", lambda t, p: ["foo=1"], ["foo: unknown key"]),
    ("unknown group option", lambda t, p: ["dataset=nope"], ["dataset/nope", "digits", "mnist"]),
    ("bad override syntax", lambda t, p: ["eval.epochs=[1"], ["eval.epochs=[1"]),
    ("sweep without -m", lambda t, p: ["eval.epochs=1,2"], ["--multirun"]),
    ("bad on_corrupt", lambda t, p: ["dataset.on_corrupt=ignore"], ["dataset.on_corrupt: unknown 'ignore'", "skip"]),
    ("missing dataset directory", lambda t, p: ["dataset=mnist", f"dataset.root={t}/nowhere"],
     ["does not exist", "nowhere"]),
    ("ipc larger than a class", lambda t, p: [f"dataset.packed={p}", "distill.overrides.ipc=50"],
     ["distill.overrides.ipc", "only"]),
    ("truncated shard", lambda t, p: [f"dataset.packed={_truncated_copy(p, t / 'cut')}", "task=coreset",
                                      "coreset.methods=[random]", "eval.epochs=1", "eval.runs=1"],
     ["truncated or replaced", "index-train.json"]),
    ("missing observer file", lambda t, p: [f"dataset.packed={p}", "task=rded", f"observer.path={t}/none.pt"],
     ["observer checkpoint", "none.pt", "does not exist"]),
    ("observer class-order mismatch", lambda t, p: [
        f"dataset.packed={p}", "task=rded", f"observer.path={_bare_state_dict(t / 'sd.pt')}",
        f"observer.classes_file={(t / 'names.txt').write_text(chr(10).join('9876543210')) and t / 'names.txt'}"],
     ["class order mismatch at index 0"]),
    ("missing encoder file", lambda t, p: [f"dataset.packed={p}", "task=ddoq", f"ddoq.encoder_path={t}/ae.pt"],
     ["ae.pt", "no autoencoder file"]),
]


@pytest.mark.parametrize("case,make,words", CASES, ids=[c[0] for c in CASES])
def test_user_mistakes_exit_2_with_one_line(case, make, words, tmp_path, packed, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli([f"out_dir={tmp_path}/run", *make(tmp_path, packed), "progress=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dream-dist: error: "), err
    for w in words:
        assert w in err[0], (w, err[0])


def _console(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dream_dist.run", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}, timeout=300)


def test_console_exit_status_and_full_error_traceback():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    r = subprocess.run([sys.executable, "-m", "dream_dist.run", "eval.epochs=0"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "dream-dist: error: eval.epochs must be a positive int, got 0"
    r = _console("eval.epochs=0", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "eval.epochs must be a positive int" in r.stderr


def test_help_lists_groups_and_options(capsys):
    cli(["--help"])
    out = capsys.readouterr().out
    assert "== Configuration groups ==" in out and "-m" in out
    for line in ("dataset: cifar10, cifar100, digits", "eval: cpu, dc, dsa, idc"):
        assert line in out
    assert "experiment: " in out and "mnist_reference" in out


def test_cfg_job_prints_the_resolved_config(capsys):
    cli(["--cfg", "job", "--resolve", "dataset=mnist", "distill.overrides.tau=5"])
    out = capsys.readouterr().out
    assert "out_dir: outputs/distill/mnist" in out and "tau: 5" in out and "hydra:" not in out
    cli(["--cfg", "all"])
    assert "hydra:" in capsys.readouterr().out


def test_run_dir_and_multirun_sweep(tmp_path, packed, capsys):
    run_dir = tmp_path / "single"
    assert cli([*TINY, f"dataset.packed={packed}", f"hydra.run.dir={run_dir}"]) == 0
    assert (run_dir / "results.json").exists() and (run_dir / ".hydra" / "overrides.yaml").exists()
    capsys.readouterr()

    sweep = tmp_path / "sweep"
    assert cli(["-m", *TINY, f"dataset.packed={packed}", "distill.overrides.tau=1,2", "seed=0,1",
                f"hydra.sweep.dir={sweep}"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for job in range(4):
        assert json.loads((sweep / str(job) / "results.json").read_text())["rows"][0]["method"] == "dream_plus"
    table = out[out.index(f"sweep {sweep}: 4 jobs"):].splitlines()
    assert table[1].split() == ["job", "overrides", "method", "accuracy", "%"]
    assert table[2].startswith("0") and "distill.overrides.tau=1 seed=0" in table[2]
    assert table[5].startswith("3") and "distill.overrides.tau=2 seed=1" in table[5]


def test_a_bad_value_in_the_last_job_stops_the_sweep_before_the_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["-m", *TINY, "eval.epochs=1,0", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert exc.value.code == 2 and "eval.epochs must be" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_plain_script_runs(tmp_path):
    """`python dream_dist/run.py` as `ray submit` / `ray job submit` run it."""
    r = subprocess.run([sys.executable, "dream_dist/run.py", "--cfg", "job"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0 and "task: distill" in r.stdout


@pytest.mark.parametrize("body", [
    "hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      file: {marker}\n      mode: w\n",
    "distill:\n  overrides:\n    width: {{_target_: builtins.open, file: {marker}, mode: w}}\n",
])
def test_an_experiment_file_that_names_code_is_refused(body, tmp_path, capsys):
    """An experiment file may come from a shared sweep directory: Hydra would call a
    `_target_` or a callback it names."""
    marker = tmp_path / "PWNED"
    exp = tmp_path / "best.yaml"
    exp.write_text("# @package _global_\n" + body.format(marker=marker))
    with pytest.raises(SystemExit) as e:
        cli([f"experiment_file={exp}", f"out_dir={tmp_path}/run"])
    assert e.value.code == 2 and "may not name code" in capsys.readouterr().err
    assert not marker.exists()
