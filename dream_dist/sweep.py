"""The summary table printed after a Hydra multirun (`dream-dist -m ...`).

conf/config.yaml registers `SweepSummary` under hydra.callbacks. Every job of a sweep runs in
its own numbered directory (hydra.sweep.dir/<job>) and writes results.json there; at the end
this reads them back and prints one table: job number, the job's overrides, and each row
(method, accuracy) of its results. A job that failed or wrote no results shows as such.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

HEADER = ("job", "overrides", "method", "accuracy %")


def sweep_rows(sweep_dir: str | Path) -> list[tuple[str, str, str, str]]:
    """(job, overrides, method, accuracy) for every numbered job directory under `sweep_dir`;
    overrides shared by every job are left out."""
    sweep = Path(sweep_dir)
    jobs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    per_job = {}
    for job in jobs:
        ov = job / ".hydra" / "overrides.yaml"
        per_job[job.name] = [str(v).lstrip("+~") for v in OmegaConf.load(ov)] if ov.exists() else []
    # Show what tells the jobs apart: the overrides that are not the same in every job.
    common = set.intersection(*(set(v) for v in per_job.values())) if len(per_job) > 1 else set()
    rows = []
    for job in jobs:
        overrides = " ".join(v for v in per_job[job.name] if v not in common)
        res = job / "results.json"
        if not res.exists():
            rows.append((job.name, overrides, "-", "no results.json"))
            continue
        for r in json.loads(res.read_text()).get("rows") or [{}]:
            acc = f"{r['mean']:.2f} ± {r['std']:.2f}" if "mean" in r else "-"
            rows.append((job.name, overrides, str(r.get("method", "-")), acc))
    return rows


def format_rows(rows: list[tuple[str, ...]]) -> str:
    table = [HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in table)


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        rows = sweep_rows(sweep) if sweep.is_dir() else []
        if rows:
            print(f"\nsweep {sweep}: {len({r[0] for r in rows})} jobs\n{format_rows(rows)}\n")
