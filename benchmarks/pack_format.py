"""Packed-shard encodings compared: PNG vs npy, size on disk and read speed.

    python benchmarks/pack_format.py

Packs MNIST train and TinyImageNet-sub100 val with both encodings and reads two classes
back through PackedReader (the path a class-shard worker takes). npy is the baseline.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, save  # noqa: E402

from dream_dist.data import load_dataset  # noqa: E402
from dream_dist.data.shards import PackedReader, pack  # noqa: E402


def main() -> None:
    rows = []
    for name, split in (("mnist", "train"), ("tinyimagenet", "val")):
        data = load_dataset(name, split)
        raw = data.images.numel()
        base = None
        for enc in ("npy", "png"):
            out = Path(tempfile.mkdtemp())
            t0 = time.perf_counter()
            pack(data, out, "train", source=name, encoding=enc, progress=False)
            write = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.glob("*.tar"))
            r = PackedReader(out, "train")
            t0 = time.perf_counter()
            got = r.load_classes(range(data.num_classes))
            read = time.perf_counter() - t0
            speed = len(got) / read
            base = speed if enc == "npy" else base
            rows.append({"dataset": f"{name} {split}", "encoding": enc, "images": len(data),
                         "size MB": f"{size / 1e6:.1f}", "size / raw uint8": f"{size / raw:.2f}",
                         "write s": f"{write:.1f}", "read img/s": f"{speed:.0f}",
                         "read vs npy": f"{speed / base:.2f}x"})
            shutil.rmtree(out)
    save("pack_format", {"rows": rows}, markdown(rows, list(rows[0].keys())))


if __name__ == "__main__":
    main()
