"""Shared helpers of the benchmark scripts: machine description and table output."""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def machine() -> str:
    from dream_dist.environment import cpu_model

    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def markdown(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def save(name: str, payload: dict, table: str) -> Path:
    """Write docs/results/<name>.json and .md (with date, machine and command) and print."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = (f"date: {datetime.date.today().isoformat()}  \nmachine: {machine()}  \n"
              f"command: `{command()}`\n\n")
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
         "command": command(), **payload}, indent=2, default=str))
    print("\n" + header + table)
    return RESULTS / f"{name}.md"
