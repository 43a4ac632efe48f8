"""The cluster launch files: both cluster YAMLs pass Ray's own config preparation, run.py works
copied alone (as `ray submit` runs it), the wheel the nodes install carries the configs, and
launch/loopback.py stops one head's processes only and checks a run's outputs.

The full loopback check (ray start + job submit, ray up + submit + down) is the slow test at
the end: `pytest -m slow tests/test_launch.py`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
# Subprocesses: one thread (shared 2-core machine), and never the checkout on sys.path by accident.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def _run(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _loopback():
    spec = importlib.util.spec_from_file_location("loopback", LAUNCH / "loopback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prepared(name: str) -> dict:
    """The YAML as Ray's launcher sees it: defaults filled in, then checked against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((LAUNCH / name).read_text())
    prepared = prepare_config(cfg)
    validate_config(prepared)
    return prepared


def _setup(cfg: dict) -> str:
    return "\n".join(cfg["setup_commands"])


def test_local_cluster_yaml_is_an_on_prem_cluster_that_installs_dream_dist():
    raw = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] == "127.0.0.1" and raw["provider"]["worker_ips"] == []
    assert raw["auth"]["ssh_user"] and raw["auth"]["ssh_private_key"].endswith("dream_dist_loopback")
    cfg = _prepared("cluster.yaml")
    # The local provider has one node type, which is the head's too.
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # The nodes get the wheel (never the checkout, whose .venv Ray would hash file by file).
    assert cfg["file_mounts"]["~/dream_dist_dist"] == "dist"
    setup = _setup(cfg)
    assert "pip install" in setup and "dream_dist_dist/dream_dist-*.whl" in setup
    assert "constraints.txt" in setup  # the CPU torch pin on real on-prem nodes
    assert "import dream_dist" in setup  # setup fails loudly when the install did not work
    start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "ray start" in " ".join(cfg["worker_start_ray_commands"])


def test_aws_gpu_yaml_has_gpu_workers_with_faiss_gpu_instead_of_faiss_cpu():
    raw = yaml.safe_load((LAUNCH / "cluster-aws-gpu.yaml").read_text())
    assert raw["provider"]["type"] == "aws"
    cfg = _prepared("cluster-aws-gpu.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in workers)
    setup = _setup(cfg)
    assert "dream_dist_dist/dream_dist-*.whl" in setup
    # The locked GPU stack: every dependency install goes through constraints-gpu.txt, and the
    # dream_dist wheel goes in without its dependencies (faiss-cpu would shadow faiss-gpu-cu12).
    assert "latest_dlami" not in setup and "ImageId" not in setup
    installs = [c for c in setup.split("\n") if "pip install" in c]
    assert installs, setup
    for cmd in installs:
        assert "-c ~/dd-constraints-gpu.txt" in cmd or "--no-deps" in cmd, cmd
        assert "faiss-cpu" not in cmd and "constraints.txt " not in cmd, cmd
    assert any("-r ~/dd-requirements-gpu.txt" in c for c in installs)
    mounts = cfg["file_mounts"]
    assert Path(mounts["~/dd-constraints-gpu.txt"]).name == "constraints-gpu.txt"
    assert Path(mounts["~/dd-requirements-gpu.txt"]).name == "requirements-gpu.txt"
    for name, t in types.items():
        image = t["node_config"]["ImageId"]
        assert image.startswith("resolve:ssm:/aws/service/") and "24.04" in image, (name, image)


def test_aws_gpu_worker_check_refuses_a_node_without_cuda():
    """The GPU worker's setup check, run here (no CUDA): it must fail, so ray up marks the node failed."""
    cfg = _prepared("cluster-aws-gpu.yaml")
    checks = [c for c in cfg["worker_setup_commands"] if "torch.cuda.is_available()" in c]
    assert len(checks) == 1
    code = checks[0].split('python -c "', 1)[1].rsplit('"', 1)[0]
    pytest.importorskip("faiss")
    out = _run(sys.executable, "-c", code, cwd=REPO)
    assert out.returncode != 0
    assert "GPU node check failed: torch.cuda.is_available()=False" in out.stderr


def test_run_py_copied_alone_finds_the_package_configs(tmp_path):
    """`ray submit` copies run.py alone to ~/run.py: no conf/ beside it, configs from the package."""
    script = tmp_path / "run.py"
    shutil.copy(REPO / "dream_dist" / "run.py", script)
    assert not (tmp_path.parent / "conf").exists()
    out = _run(sys.executable, str(script), "--info", "searchpath", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    conf = Path(next(ln for ln in out.stdout.splitlines() if "| main" in ln).split("file://")[1].strip(" |"))
    assert conf.name == "conf" and conf.parent.name == "dream_dist" and (conf / "config.yaml").exists()
    # A composition from that copy: the override is validated against the package's configs.
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('run', sys.argv[1]); "
            "run = importlib.util.module_from_spec(spec); spec.loader.exec_module(run); "
            "cfg = run.compose(['distill.workers=2', 'experiment=mnist_cpu']); "
            "print(run.conf_dir(), cfg.distill.workers, cfg.dataset.name)")
    out = _run(sys.executable, "-c", code, str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(conf), "2", "mnist"]
    # A bad key is still refused with the config error, not a missing-file error.
    out = _run(sys.executable, str(script), "task=nope", cwd=tmp_path)
    assert out.returncode == 2 and "dream-dist: error: task: unknown 'nope'" in out.stderr


def test_wheel_carries_the_configs(tmp_path):
    """The wheel cluster.yaml installs holds dream_dist/conf (the symlink to conf/ is followed)."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "conf", src / "conf", ignore=skip)
    shutil.copytree(REPO / "dream_dist", src / "dream_dist", symlinks=True, ignore=skip)
    assert (src / "dream_dist" / "conf").is_symlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=ENV, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dream_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"dream_dist/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert "dream_dist/conf/config.yaml" in names and expected <= names


def test_stop_ends_one_heads_processes_and_spares_the_rest(tmp_path):
    """`stop DIR` ends the processes naming DIR or the head's GCS address, and their children."""
    lb = _loopback()
    head_dir = tmp_path / "ray"
    head_dir.mkdir()
    (head_dir / "ray_current_cluster").write_text("10.9.9.9:6555\n")  # as `ray start` writes it
    sleeper = "import time; time.sleep(120)"
    # A "daemon" naming the temp dir, with a child that does not (like raylet and its workers).
    daemon = subprocess.Popen(["bash", "-c", f'{sys.executable} -c "{sleeper}" & wait',
                               "raylet", f"--temp_dir={head_dir}"])
    # Like the Ray client server: names only the head's GCS address.
    client = subprocess.Popen([sys.executable, "-c", sleeper, "--address=10.9.9.9:6555"])
    # Other Ray instances: a temp dir / an address that merely start with the same characters.
    others = [subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={head_dir}2"]),
              subprocess.Popen([sys.executable, "-c", sleeper, "--address=10.9.9.9:65550"])]
    try:
        deadline = time.time() + 30
        while len(found := lb.head_processes(str(head_dir))) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert {daemon.pid, client.pid} <= {p.pid for p in found} and len(found) == 3
        assert lb.stop(str(head_dir), grace=5) == 3
        assert daemon.wait(timeout=10) is not None and client.wait(timeout=10) is not None
        assert all(p.poll() is None for p in others)  # spared
    finally:
        for p in (daemon, client, *others):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_verify_checks_a_real_runs_outputs(tmp_path):
    from dream_dist.run import main

    out = tmp_path / "run"
    main([f"out_dir={out}", f"pack.out={tmp_path}/packed", "progress=false", "threads=1",
          "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=2",
          "distill.overrides.batch_real=16", "distill.overrides.net_images=64",
          "distill.overrides.init_images=256", "distill.baseline=false",
          "eval.width=8", "eval.epochs=1", "eval.runs=1"])
    lb = _loopback()
    assert lb.verify(out, workers=0) == []
    assert any("metrics.workers is 0, expected 2" in p for p in lb.verify(out, workers=2))
    shutil.rmtree(out / "tb")
    assert any("no TensorBoard event files" in p for p in lb.verify(out))
    (out / "results.json").unlink()
    assert lb.verify(out) == [f"{out / 'results.json'} is missing"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="starts an sshd on 127.0.0.1:22 and may apt-get install it: root on Linux only")
def test_loopback_check_both_paths():
    """The scripted check for real: a head + ray job submit, then ray up/submit/down over ssh."""
    out = _run("bash", str(LAUNCH / "check_loopback.sh"), cwd=REPO, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "job: PASS" in out.stdout and "up:  PASS" in out.stdout
