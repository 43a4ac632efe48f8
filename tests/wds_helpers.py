"""Test helpers: a small slice of the TinyImageNet subset, and a shuffled WebDataset of it."""
from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path


def tiny_slice(tiny_dir: Path, out: Path, classes: int = 4, per_class: int = 24, val_per_class: int = 6) -> Path:
    """The first `classes` classes of the TinyImageNet subset, `per_class` train images and
    `val_per_class` val images each, in TinyImageNet's own layout (copied, so fingerprints are
    this slice's)."""
    wnids = (tiny_dir / "wnids.txt").read_text().split()[:classes]
    (out / "val" / "images").mkdir(parents=True, exist_ok=True)
    (out / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = [line.split("\t") for line in (tiny_dir / "val" / "val_annotations.txt").read_text().splitlines()]
    lines = []
    for w in wnids:
        d = out / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted((tiny_dir / "train" / w / "images").iterdir())[:per_class]:
            shutil.copyfile(f, d / f.name)
        for row in [r for r in ann if r[1] == w][:val_per_class]:
            shutil.copyfile(tiny_dir / "val" / "images" / row[0], out / "val" / "images" / row[0])
            lines.append("\t".join(row))
    (out / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return out


def write_wds(source, out: Path, prefix: str, shards: int, seed: int = 0, label: str = "cls") -> list[Path]:
    """`source` (a FileSource) as `shards` shuffled WebDataset tars `<prefix>-<k>.tar`: each
    sample `<file stem>.<suffix>` (the file's own bytes) with `<stem>.cls`, or with label="json"
    `<stem>.json` = {"label": <class name>}."""
    import json

    items = [(p, c) for c, files in enumerate(source.files) for p in files]
    random.Random(seed).shuffle(items)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shards):
        path = out / f"{prefix}-{k:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for p, c in items[k::shards]:
                meta = str(c).encode() if label == "cls" else json.dumps({"label": source.classes[c]}).encode()
                for name, data in ((f"{p.stem}{p.suffix.lower()}", p.read_bytes()),
                                   (f"{p.stem}.{label}", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
