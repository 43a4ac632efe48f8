"""benchmarks/gpu_check.py, the script a GPU machine runs: its dry run on the CPU here, the
same run without FAISS (the lent device has none), and the real run where CUDA is present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Runs the script with faiss, ray, hydra and webdataset unimportable (the lent GPU machine's set).
WITHOUT = ("import importlib.abc, runpy, sys\n"
           "class Block(importlib.abc.MetaPathFinder):\n"
           "    def find_spec(self, name, path, target=None):\n"
           "        if name.split('.')[0] in {'faiss', 'ray', 'hydra', 'omegaconf', 'webdataset'}:\n"
           "            raise ImportError('absent here: ' + name)\n"
           "sys.meta_path.insert(0, Block())\n"
           "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _run(tmp_path, mnist_dir, *args: str, block: bool = False):
    data = mnist_dir.parent
    pre = [sys.executable, "-c", WITHOUT, str(SCRIPT)] if block else [sys.executable, str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = subprocess.run(pre + ["--data", str(data), "--out", str(tmp_path), "--quiet", *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return out, {r["check"]: r for r in report["checks"]}, report


def test_dry_run_on_the_cpu_runs_every_check_and_passes(tmp_path, mnist_dir):
    out, checks, report = _run(tmp_path, mnist_dir, "--device", "cpu", "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert list(checks) == ["env", "step_equal", "bit_stable", "no_atomics", "host_reads", "faiss_gpu", "accuracy"]
    status = {k: r["status"] for k, r in checks.items()}
    assert status == {**{k: "pass" for k in checks}, "faiss_gpu": "skip"}, status
    # The figures are measured: the dry run compares the CPU with itself, so exactly 0, and the
    # host reads are one per step at both class counts.
    assert checks["step_equal"]["data"]["worst_share"] == 0.0
    reads = checks["host_reads"]["data"]["reads"]
    assert reads["10"] == reads["40"] and max(reads["40"]) == 1
    assert 0 <= checks["accuracy"]["data"]["accuracy"] <= 100
    assert "| step_equal | pass |" in (tmp_path / "gpu_check.md").read_text()
    assert report["device"] == "cpu" and report["quick"] is True


def test_without_faiss_the_engine_checks_run_on_idc_and_faiss_checks_skip(tmp_path, mnist_dir):
    out, checks, _ = _run(tmp_path, mnist_dir, "--device", "cpu", "--quick", "--skip", "bit_stable", "host_reads",
                          block=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert set(checks["env"]["data"]["absent"]) == {"faiss", "ray", "hydra", "webdataset"}
    assert checks["step_equal"]["status"] == "pass" and "dream_plus" not in checks["step_equal"]["detail"]
    assert checks["no_atomics"]["status"] == "pass" and checks["no_atomics"]["detail"].startswith("idc step")
    assert checks["faiss_gpu"]["status"] == "skip" and checks["accuracy"]["status"] == "skip"


def test_a_cuda_request_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--quick"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "sees no CUDA device" in out.stderr


@pytest.mark.gpu
def test_quick_check_on_cuda(tmp_path, mnist_dir):
    out, checks, _ = _run(tmp_path, mnist_dir, "--device", "cuda", "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert all(r["status"] in ("pass", "skip") for r in checks.values())
    assert checks["env"]["data"]["cuda"] is True
