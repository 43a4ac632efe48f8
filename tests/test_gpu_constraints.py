"""The GPU stack that launch/cluster-aws-gpu.yaml installs: constraints-gpu.txt and
launch/requirements-gpu.txt.

Offline: the requirement list is pyproject's with faiss-cpu swapped for faiss-gpu-cu12, and
every package is pinned. Online (slow; skipped when PyPI cannot be reached): pip resolves the
list for CPython 3.12 on manylinux x86_64 against the lock, metadata only, and the result is the
lock itself, with one CUDA major across torch, faiss-gpu-cu12 and every nvidia-* runtime.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints-gpu.txt"
REQS = REPO / "launch" / "requirements-gpu.txt"
# antlr4-python3-runtime (hydra-core's dependency) is an sdist only: pip cannot resolve it for a
# foreign platform, so the online check resolves everything but these three (see the lock's header).
SDIST_CHAIN = {"hydra-core", "omegaconf", "antlr4-python3-runtime"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(req: str) -> str:
    return _norm(re.split(r"[\[<>=!~;\s]", req.strip(), maxsplit=1)[0])


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for ln in _lines(LOCK):
        name, sep, version = ln.partition("==")
        assert sep and version and not re.search(r"[<>!~,;\s]", version), f"not an exact pin: {ln!r}"
        assert _norm(name) not in pins, f"pinned twice: {ln!r}"
        pins[_norm(name)] = version
    return pins


def test_requirements_are_pyprojects_with_faiss_gpu_in_place_of_faiss_cpu():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu = [_name(d) for d in deps]
    gpu = [_name(r) for r in _lines(REQS)]
    assert "faiss-cpu" in cpu and "faiss-cpu" not in gpu and "faiss-gpu" not in gpu
    assert gpu == [("faiss-gpu-cu12" if n == "faiss-cpu" else n) for n in cpu]
    # Ray's extras are what the CPU side installs.
    ray_cpu = next(d for d in deps if _name(d) == "ray")
    ray_gpu = next(r for r in _lines(REQS) if _name(r) == "ray")
    assert ray_cpu.split("]")[0] + "]" == ray_gpu


def test_lock_pins_every_requirement_and_one_cuda_major():
    pins = _lock()
    for name in (_name(r) for r in _lines(REQS)):
        assert name in pins, f"{name} is not pinned in constraints-gpu.txt"
    assert "faiss-cpu" not in pins and "faiss-gpu" not in pins
    assert pins["torch"] == "2.10.0" and pins["faiss-gpu-cu12"].startswith("1.14")
    # Head and GPU workers install this same lock (setup_commands), so they run one Ray version.
    assert re.fullmatch(r"2\.\d+\.\d+", pins["ray"])
    nvidia = [n for n in pins if n.startswith("nvidia-")]
    assert nvidia and all(n.endswith("-cu12") for n in nvidia), nvidia
    assert not any(re.search(r"-cu1[013-9]$", n) for n in pins), "a second CUDA major in the lock"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_lock_is_what_pip_resolves_for_python312_manylinux(tmp_path):
    if not _pypi_reachable():
        pytest.skip("pypi.org:443 unreachable: cannot resolve the GPU stack")
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("\n".join(r for r in _lines(REQS) if _name(r) not in SDIST_CHAIN) + "\n")
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "--python-version", "3.12", "--only-binary=:all:",
           "--target", str(tmp_path / "target"), "-c", str(LOCK), "-r", str(reqs)]
    for p in platforms:
        cmd += ["--platform", p]
    # The machine's pip config may cap versions (a CPU torch pin); the lock is the only constraint.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_CONSTRAINT", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    print("resolved:", " ".join(f"{n}=={v}" for n, v in sorted(resolved.items())))
    lock = _lock()
    expected = {n: v for n, v in lock.items() if n not in SDIST_CHAIN}
    assert resolved == expected
    for i in installs:
        wheel = i["download_info"]["url"].rsplit("/", 1)[1]
        assert wheel.endswith(".whl"), wheel
        _, _, py, abi, plat = wheel[:-4].rsplit("-", 4)
        assert py in {"cp312", "py3", "py2.py3"} or py.startswith("cp3") and abi == "abi3", wheel
        assert plat == "any" or "manylinux" in plat and "x86_64" in plat, wheel
    # torch's own runtime pins are the lock's cu12 runtimes, and faiss-gpu-cu12 takes them too.
    torch = next(i for i in installs if _norm(i["metadata"]["name"]) == "torch")
    for req in torch["metadata"].get("requires_dist", []):
        if _name(req).startswith("nvidia-") and "linux" in req.lower():
            assert _name(req).endswith("-cu12") and _name(req) in lock, req
