"""No pickle runs on load (issue 11, part 1): a planted checkpoint at the resume path or at a
Ray per-rank path is refused before anything in it runs; foreign or old checkpoints are
refused with what differs; resume still works."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dream_dist.methods.dream.config import preset
from dream_dist.methods.dream.engine import (CHECKPOINT_FORMAT, CheckpointError, Distiller, load_checkpoint)
from dream_dist.methods.dream.shard import ClassShard

PKG = Path(__file__).resolve().parents[1] / "dream_dist"
TINY = dict(model="convnet_tiny", init_images=256, batch_real=16, net_images=64, net_batch=32)


class _Payload:
    """Unpickling this calls open(marker, 'w'): the file appears iff the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "it": 0, "step": 1, "evil": _Payload(marker)}, path)


def test_malicious_resume_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoint.pt"
    _plant(ckpt, marker)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: refused.*weights_only=True"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_malicious_ray_rank_file_is_refused_and_not_run(tmp_path):
    from dream_dist.distributed.train import _load_merged

    marker = tmp_path / "pwned"
    _plant(tmp_path / "ckpt" / "rank0000.pt", marker)
    with pytest.raises(CheckpointError, match=r"rank0000\.pt: refused"):
        _load_merged(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_the_cli_resume_path_refuses_a_planted_checkpoint(tmp_path, digits):
    """What `dream-dist distill.resume=true out_dir=DIR` does with DIR/checkpoint.pt."""
    from dream_dist.methods.dream.method import make_distiller, prepare
    from dream_dist.run import compose

    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    _plant(out / "checkpoint.pt", marker)
    cfg = compose([f"out_dir={out}", "distill.resume=true", f"pack.out={tmp_path / 'packed'}",
                   "distill.overrides.width=8", "distill.overrides.iterations=1", "distill.overrides.inner_steps=1"])
    p = prepare(cfg)
    with pytest.raises(CheckpointError, match="refused"):
        make_distiller(cfg, p, out)
    assert not marker.exists()


@pytest.mark.parametrize("payload,msg", [
    ({"it": 0}, "not a dream_dist distillation checkpoint"),
    ([1, 2, 3], "not a dream_dist distillation checkpoint .format 'list'"),
    ({"format": CHECKPOINT_FORMAT, "version": 1}, "checkpoint version 1, this dream_dist reads version 2"),
])
def test_foreign_and_old_checkpoints_are_refused(tmp_path, payload, msg):
    path = tmp_path / "c.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path, digits):
    train = digits[0]
    cfg = preset("idc", iterations=1, inner_steps=1, **TINY).resolved("digits")
    mean, std = train.mean_std()
    real = {c: train.of_class(c) for c in range(10)}
    d = Distiller(cfg, [ClassShard(list(range(10)), real, cfg, mean, std, 10)], train.counts(), 1, 28,
                  out_dir=tmp_path, progress=False)
    d.initialize()
    d.run()
    good = load_checkpoint(d.checkpoint_path)  # a real checkpoint loads safely
    assert good["format"] == CHECKPOINT_FORMAT and good["it"] == 1
    data = d.checkpoint_path.read_bytes()
    d.checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(d.checkpoint_path)


def test_no_unsafe_torch_load_in_the_package():
    """Every torch.load in dream_dist passes weights_only=True (read with ast, not grep)."""
    bad = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"
