"""Helpers of launch/check_loopback.sh: stop ONE Ray head, and check a run's outputs.

    python launch/loopback.py stop /tmp/ddj                  # the head whose Ray temp dir is under /tmp/ddj
    python launch/loopback.py list /tmp/ddj                  # its processes (exit 1 when there are none)
    python launch/loopback.py verify /tmp/dd_launch/job --workers 2

Why `stop` exists: `ray stop` (and `ray down`, which runs `ray stop` on the head over ssh)
terminates every Ray process of the machine it runs on, whoever started it. On a dedicated
cluster node that is right; on a shared machine it would also kill other users' Ray
instances. A head started with its own temp dir (`ray start --temp-dir=DIR`, or
RAY_TMPDIR=DIR) names DIR in the command line of each of its daemons (gcs_server, raylet,
dashboard, monitors) but one, the Ray client server, which names the head's GCS address
(recorded in DIR); its workers and job drivers are their descendants. `stop` ends those
processes and nothing else.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
from pathlib import Path


def _psutil():
    try:
        import psutil
    except ImportError:  # Ray ships its own copy and puts it on sys.path when imported
        import ray  # noqa: F401

        psutil = importlib.import_module("psutil")
    return psutil


def head_processes(temp_dir: str) -> list:
    """Processes of the Ray head whose temp dir is `temp_dir`: daemons naming it or the head's GCS
    address, plus their descendants."""
    psutil = _psutil()

    root = temp_dir.rstrip("/")
    # DIR as a whole path component: "--temp-dir=/tmp/ddj", "/tmp/ddj/session_.../sockets/raylet",
    # but not "/tmp/ddj2".
    patterns = [re.compile(rf"(^|[=:,\s]){re.escape(root)}(/|$)")]
    # The Ray client server names neither, only "--address=<the head's GCS address>", which
    # `ray start` wrote into ray_current_cluster (under DIR, or DIR/ray when DIR is RAY_TMPDIR).
    for f in (Path(root) / "ray_current_cluster", Path(root) / "ray" / "ray_current_cluster"):
        if f.exists() and (gcs := f.read_text().strip()):
            patterns.append(re.compile(rf"^--(gcs-)?address={re.escape(gcs)}$"))
    me = psutil.Process()
    spared = {me.pid} | {p.pid for p in me.parents()}  # never this helper or the shells that called it
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid in spared or not any(pat.search(arg) for arg in cmdline for pat in patterns):
            continue
        found[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    return [p for pid, p in found.items() if pid not in spared]


def _names(procs: list) -> str:
    psutil = _psutil()
    counts: dict[str, int] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            name = p.name()
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counts.items()))


def stop(temp_dir: str, grace: float = 10.0) -> int:
    """SIGTERM the head's processes, SIGKILL what is left after `grace` seconds. Returns the count."""
    psutil = _psutil()

    procs = head_processes(temp_dir)
    names = _names(procs)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    killed = _names(alive)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    print(f"stopped {len(procs)} processes of the Ray head in {temp_dir}" + (f": {names}" if names else "")
          + (f"; after {grace:.0f} s, SIGKILL for {killed}" if killed else ""))
    return len(procs)


def verify(out_dir: str | Path, workers: int | None = None) -> list[str]:
    """Problems with the outputs of a `task=distill` run in `out_dir` (empty list = all there).

    Checks results.json (rows with accuracies in [0, 100], and the Ray worker count when
    given), distilled.pt, and TensorBoard event files holding at least one scalar.
    """
    out = Path(out_dir)
    problems = []
    results = out / "results.json"
    if not results.exists():
        return [f"{results} is missing"]
    summary = json.loads(results.read_text())
    rows = summary.get("rows") or []
    if not rows:
        problems.append(f"{results} has no result rows")
    for r in rows:
        if not 0 <= r.get("mean", -1) <= 100:
            problems.append(f"{results}: accuracy {r.get('mean')!r} of {r.get('method')} outside [0, 100]")
    got = summary.get("metrics", {}).get("workers")
    if workers is not None and got != workers:
        problems.append(f"{results}: metrics.workers is {got!r}, expected {workers}")
    if not (out / "distilled.pt").exists():
        problems.append(f"{out / 'distilled.pt'} is missing")
    events = sorted(out.glob("tb/**/events.out.tfevents.*"))
    if not events:
        problems.append(f"no TensorBoard event files under {out / 'tb'}")
    else:
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        tags = set()
        for ev in events:
            acc = EventAccumulator(str(ev))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        if not tags:
            problems.append(f"the {len(events)} TensorBoard event files under {out / 'tb'} hold no scalars")
    if not problems:
        where = f"{got} Ray workers" if got else "in-process"
        accs = ", ".join(f"{r['method']} {r['mean']:.1f}%" for r in rows)
        print(f"outputs OK in {out}: results.json ({accs}; distilled on {where}), distilled.pt, "
              f"{len(events)} TensorBoard event files with scalars {', '.join(sorted(tags)[:4])}...")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_stop = sub.add_parser("stop", help="stop the Ray head whose temp dir is TEMP_DIR (nothing else)")
    p_stop.add_argument("temp_dir")
    p_list = sub.add_parser("list", help="list the processes `stop` would end; exit 1 when there are none")
    p_list.add_argument("temp_dir")
    p_verify = sub.add_parser("verify", help="check results.json, distilled.pt and TensorBoard files")
    p_verify.add_argument("out_dir")
    p_verify.add_argument("--workers", type=int, default=None, help="expected distill.workers of the run")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        procs = head_processes(args.temp_dir)
        for p in procs:
            with contextlib.suppress(_psutil().Error):
                print(p.pid, " ".join(p.cmdline())[:160])
        return 0 if procs else 1
    if args.cmd == "stop":
        if not os.path.isabs(args.temp_dir) or args.temp_dir.rstrip("/") in ("", "/tmp", "/tmp/ray"):
            # /tmp/ray is Ray's shared default: stopping "its" head would stop everyone's.
            parser.error(f"temp_dir must be an absolute directory of this head alone, got {args.temp_dir!r}")
        stop(args.temp_dir)
        return 0
    problems = verify(args.out_dir, args.workers)
    for p in problems:
        print(f"MISSING: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
