"""TensorBoard for distillation runs: step scalars, image grids of the synthetic set, and a
quick evaluation (one short run) as a progress signal.

    tb = TensorBoardLogger(out / "tb" / "distill", mean, std, grid_every=10, ipc=10)
    tb.scalars(step, {"loss/total": 0.3})
    tb.grid(step, images)                       # normalised images, one row per class
    acc = quick_eval(cfg.eval, 100, test, mean, std, images, labels, factor, "mnist")
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dream_dist.data.base import denormalize


class TensorBoardLogger:
    """Scalars every step, image grids every `grid_every` steps, quick evaluations."""

    def __init__(self, log_dir: Path, mean, std, grid_every: int, ipc: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.mean, self.std = mean, std
        self.grid_every, self.ipc = grid_every, ipc

    def scalars(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def grid(self, step: int, images: torch.Tensor, tag: str = "synthetic") -> None:
        from dream_dist.viz import grid

        arr = grid(denormalize(images, self.mean, self.std), nrow=self.ipc, upscale=1)
        self.writer.add_image(tag, arr, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def quick_eval(eval_cfg, epochs: int, test, mean, std, images: torch.Tensor, labels: torch.Tensor, factor: int,
               dataset: str | None = None) -> float:
    """One short evaluation run (`epochs` epochs of eval_cfg's protocol) of a synthetic set."""
    from dream_dist.evaluation.protocol import evaluate

    quick = dataclasses.replace(eval_cfg, epochs=epochs, runs=1, curve_every=0)
    return evaluate(images, labels, test, mean, std, quick, factor=factor, progress=False, dataset=dataset).mean
