"""Streaming, resumable, parallel packing of image-file sources (ImageNet scale).

`pack` in shards.py packs an in-memory ImageSet (digits, MNIST, CIFAR: small by nature).
Image-file sources can be far larger than memory, so `pack_files` never holds more than one
shard's worth of decoded images (`max_per_shard`):

    source layout -> FileSource (class names + each class's file list; nothing decoded)
                  -> per class, per chunk: decode + resize -> encode -> write one shard
                  -> index-<split>.json (the same format `PackedReader` reads)

- Sources: any ImageFolder (mixed sizes allowed), TinyImageNet, and ImageNet's standard
  layouts: train `<root>/train/<wnid>/*.JPEG`; val either as `<root>/val/<wnid>/*` or flat
  `<root>/val/*.JPEG` labelled by `LOC_val_solution.csv` or by the devkit's
  `ILSVRC2012_validation_ground_truth.txt` + `meta.mat`. Class order: a synset list
  (`LOC_synset_mapping.txt`, one `<wnid> <words>` per line) when present, else sorted wnids.
- Resize (`size`, `resize`): "shorter" scales the shorter side to `size` and centre-crops a
  square (ImageNet's usual preparation); "square" stretches to size x size. Large JPEGs are
  decoded at a reduced DCT scale first (`jpeg_draft`, see folder.decode_image). Recorded in
  the index under "resize".
- Resumable: after every class, one line is appended to the journal
  `index-<split>.partial.jsonl` (its first line the settings, then one finished class per
  line: shards, counts, pixel sums), so recording a class costs the same at class 1000 as at
  class 1. A rerun with the same settings keeps those shards and packs only the rest (a line
  cut short by a crash is ignored); the final index replaces the journal.
- Incremental: every class records a fingerprint of its own files (names, sizes, mtimes) in
  the index. When the source changes, a rerun repacks only the classes whose files changed
  and keeps the others' shards (`FileSource.class_fingerprint`).
- Parallel: `pack.workers=N` fans the classes out to Ray tasks (a mapper handed in by the
  Ray package; locally or on a cluster; `out` must be storage every node sees). Each class is
  packed by the same function either way and the index is assembled in class order, so the
  output is byte-for-byte the serial one.
- Statistics: the train split's mean/std come from float64 per-class pixel sums, combined in
  class order (so they do not depend on `workers` either).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet
from dream_dist.data.folder import (  # noqa: F401  (FileSource & co. are part of this module's API)
    FileSource,
    _images_in,
    decode_image,
    decode_source,
    imagefolder_source,
    read_synsets,
    tinyimagenet_source,
)
from dream_dist.data.shards import FORMAT, VERSION
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

RESIZE = ("shorter", "square")
log = logging.getLogger(__name__)


def read_val_solution(path: str | Path) -> dict[str, str]:
    """{image id: wnid} from Kaggle's LOC_val_solution.csv (ImageId, PredictionString whose
    first token is the wnid)."""
    labels = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DataError(f"{path}: expected the header ImageId,PredictionString, got {header}")
        for row in rows:
            if len(row) >= 2 and row[1].split():
                labels[row[0].strip()] = row[1].split()[0]
    return labels


def read_devkit_labels(devkit: str | Path, images: list[Path]) -> dict[str, str]:
    """{image id: wnid} from the ILSVRC2012 devkit: data/ILSVRC2012_validation_ground_truth.txt
    (one 1-based ILSVRC2012_ID per line, for the val images in file-name order) and
    data/meta.mat (ILSVRC2012_ID -> WNID)."""
    from scipy.io import loadmat

    data = Path(devkit) / "data"
    gt_file, meta_file = data / "ILSVRC2012_validation_ground_truth.txt", data / "meta.mat"
    for f in (gt_file, meta_file):
        if not f.exists():
            raise DataNotFoundError(f"{f} not found: not an ILSVRC2012 devkit")
    synsets = loadmat(str(meta_file), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = [int(v) for v in gt_file.read_text().split()]
    if len(ids) != len(images):
        raise DataError(f"{gt_file}: {len(ids)} labels for {len(images)} val images")
    return {p.stem: id_to_wnid[i] for p, i in zip(sorted(images), ids)}


def imagenet_source(root: str | Path, split: str) -> FileSource:
    """ImageNet's standard layouts (see the module docstring). split: train | val | test
    (test = val, the split every paper reports)."""
    root = Path(root)
    split = "val" if split == "test" else split
    train = root / "train"
    synset_file = next((p for p in (root / "LOC_synset_mapping.txt", root / "synsets.txt") if p.exists()), None)
    if synset_file is not None:
        wnids = read_synsets(synset_file)
    elif train.is_dir():
        wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    else:
        raise DataNotFoundError(f"{root}: neither LOC_synset_mapping.txt nor train/<wnid>/ folders")
    index = {w: i for i, w in enumerate(wnids)}
    folder = root / split
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder} not found")
    if any(p.is_dir() for p in folder.iterdir()):  # <split>/<wnid>/*
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise DataError(f"{folder}: class folders {unknown[:5]} are not in the synset list")
        return FileSource("imagenet", wnids, [_images_in(folder / w) for w in wnids])
    images = _images_in(folder)
    csv_file = root / "LOC_val_solution.csv"
    devkit = next((p for p in root.glob("ILSVRC2012_devkit*") if p.is_dir()), None)
    if csv_file.exists():
        labels = read_val_solution(csv_file)
    elif devkit is not None:
        labels = read_devkit_labels(devkit, images)
    else:
        raise DataNotFoundError(f"{folder} is flat but there is no LOC_val_solution.csv or ILSVRC2012_devkit* "
                                f"in {root} to label it")
    files: list[list[Path]] = [[] for _ in wnids]
    for p in images:
        wnid = labels.get(p.stem)
        if wnid is None:
            raise DataError(f"{p.name}: no label in {csv_file if csv_file.exists() else devkit}")
        if wnid not in index:
            raise DataError(f"{p.name}: label {wnid!r} is not in the synset list")
        files[index[wnid]].append(p)
    return FileSource("imagenet", wnids, files)


FILE_SOURCES = {"imagefolder": imagefolder_source, "imagenet": imagenet_source, "tinyimagenet": tinyimagenet_source}


def pack_class(files: list[Path], c: int, out: str | Path, split: str, size: int | None, resize: str,
               mode: str, encoding: str, max_per_shard: int, on_corrupt: str = "error", jpeg_draft: bool = True) -> dict:
    """Pack one class: decode `max_per_shard` files at a time, write its shards. Returns its
    index entry with float64 pixel sums (for the mean/std) and the skipped files.
    The same function runs in process and as a Ray task, so both write the same bytes."""
    skipped: list[str] = []

    def chunks():
        for start in range(0, len(files), max_per_shard):
            chunk = []
            for p in files[start: start + max_per_shard]:
                try:
                    chunk.append((str(p), decode_image(p, mode, size, resize, jpeg_draft)))
                except DataError:
                    if on_corrupt == "error":
                        raise
                    skipped.append(str(p))
            yield chunk

    entry = write_class(chunks(), c, out, split, encoding)
    return {**entry, "skipped": skipped}


def write_class(chunks, c: int, out: str | Path, split: str, encoding: str) -> dict:
    """Write class `c`'s shards `<split>-c<c>-<k>.tar` into local directory `out`, one per
    chunk of `chunks` (an iterable of lists of (name, uint8 (C, H, W))), and return its index
    entry: shards with counts, bytes and offsets, the shape, and float64 pixel sums. Every
    pack path (folders, WebDataset ingest) writes through here, so equal pixels in equal order
    give equal bytes. A chunk left empty (all skipped) writes no shard."""
    import webdataset as wds

    from dream_dist.data.shards import _encode, member_offsets

    out = Path(out)
    for old in out.glob(f"{split}-c{c:05d}-*.tar"):  # a repacked class may need fewer shards than before
        old.unlink()
    entries, n, k = [], 0, 0
    shape = total = sq = None
    for chunk in chunks:
        for name, img in chunk:
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DataError(f"{name}: {tuple(img.shape)} differs from {tuple(shape)}; pass pack.size=N to resize")
        if not chunk:
            k += 1
            continue
        # Filled into a C-ordered array: numpy's sums round by memory order, and a decoded image
        # may be a transposed view (PIL's HWC) or contiguous (a WebDataset run's record).
        arr = np.empty((len(chunk), *shape), dtype=np.float64)
        for i, (_, img) in enumerate(chunk):
            arr[i] = img
        s = arr.sum(axis=(0, 2, 3)) / 255
        q = np.square(arr / 255).sum(axis=(0, 2, 3))
        total, sq = (s, q) if total is None else (total + s, sq + q)
        name = f"{split}-c{c:05d}-{k:05d}.tar"
        tmp = out / (name + ".tmp")
        # mtime fixed: the tar bytes depend on the pixels only, not on when or where they were written.
        # An int: a float mtime makes tarfile add a 1 KiB PAX header to every member, which more
        # than doubled the shard bytes of small PNGs (what a reader fetches from object storage).
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for i, (_, img) in enumerate(chunk):
                sink.write({"__key__": f"c{c:05d}_{n + i:08d}", encoding: _encode(img, encoding),
                            "cls": str(c).encode()})
        os.replace(tmp, out / name)  # never a half-written shard under its name
        entries.append({"file": name, "count": len(chunk), "bytes": (out / name).stat().st_size,
                        "offsets": member_offsets(out / name, encoding)})
        n += len(chunk)
        k += 1
    return {"shards": entries, "count": n, "shape": list(shape) if shape else None,
            "sum": None if total is None else total.tolist(), "sumsq": None if sq is None else sq.tolist()}


def index_fields(name: str, split: str, classes: list[str], entries: list[dict], encoding: str,
                 mean_std: tuple[list[float], list[float]] | None) -> dict:
    """The index fields every streamed pack writes, from its per-class entries (`write_class`'s,
    plus "skipped"), in class order: one square shape, counts, shards, the skipped samples,
    and the mean/std (this split's own from the float64 pixel sums when mean_std is None)."""
    shapes = {tuple(e["shape"]) for e in entries if e["shape"]}
    if len(shapes) != 1:
        raise DataError(f"{name}/{split}: classes decode to different shapes {sorted(shapes)[:3]}; "
                        f"pass pack.size=N to resize")
    channels, h, w = shapes.pop()
    if h != w:
        raise DataError(f"{name}/{split}: images are {h}x{w}, not square; pass pack.size=N")
    skipped = [s for e in entries for s in e["skipped"]]
    if skipped:
        log.warning("skipped %d corrupt image(s) (dataset.on_corrupt=skip): %s", len(skipped),
                    ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    if mean_std is None:
        n = sum(e["count"] for e in entries) * h * w
        s = sum((np.array(e["sum"]) for e in entries if e["sum"]), np.zeros(channels))
        q = sum((np.array(e["sumsq"]) for e in entries if e["sumsq"]), np.zeros(channels))
        mean = s / n
        mean_std = (mean.tolist(), np.sqrt(np.maximum(q / n - mean ** 2, 0)).tolist())
    return {"format": FORMAT, "version": VERSION, "source": name, "split": split,
            "classes": list(classes), "num_classes": len(classes),
            "counts": [e["count"] for e in entries], "image_size": h, "channels": channels,
            "encoding": encoding, "mean": list(mean_std[0]), "std": list(mean_std[1]),
            "shards": {str(c): e["shards"] for c, e in enumerate(entries)}, "skipped": skipped}


def resize_record(size: int | None, resize: str, jpeg_draft: bool) -> dict:
    """The index's "resize" entry (what the freshness check compares)."""
    if size is None:
        return {"size": None, "mode": None}
    return {"size": size, "mode": resize, "jpeg_draft": jpeg_draft}


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _read_journal(path: Path) -> tuple[dict, dict] | None:
    """(settings, {class: entry}) of an interrupted pack's journal; None when there is none. A
    last line cut short by a crash is ignored (its class is packed again)."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    try:
        settings = json.loads(lines[0])["settings"]
    except (IndexError, ValueError, KeyError):
        return None
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        done[rec["class"]] = rec["entry"]
    return settings, done


def _shards_intact(out: Path, entry: dict) -> bool:
    return all((out / e["file"]).exists() and (out / e["file"]).stat().st_size == e["bytes"] for e in entry["shards"])


def pack_files(source: FileSource, out: str | Path, split: str, size: int | None = None, resize: str = "shorter",
               mode: str = "RGB", encoding: str = "png", max_per_shard: int = 2000,
               mean_std: tuple[list[float], list[float]] | None = None, mapper=None,
               progress: bool = True, on_corrupt: str = "error", jpeg_draft: bool = True) -> dict:
    """Pack `source` class by class into `out` (see the module docstring). Returns the index.

    mean_std: the normalisation to record (pass the train split's for the test split);
    None = this split's own, from the pixel sums. mapper: None = the classes in this process;
    else mapper(fn, {key: args}) yields (key, fn(*args)) as they finish, anywhere (the Ray
    package's `dream_dist.distributed.tasks.ray_mapper(workers)` runs them as Ray tasks)."""
    if resize not in RESIZE:
        raise ConfigError(f"pack.resize: unknown {resize!r}; choose one of {', '.join(RESIZE)}")
    if max_per_shard < 1:
        raise ConfigError("pack.max_per_shard must be >= 1")
    if size is not None and size < 1:
        raise ConfigError(f"pack.size must be >= 1 or null, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": source.name, "split": split, "size": size,
                "resize": resize if size is not None else None, "mode": mode, "encoding": encoding,
                "max_per_shard": max_per_shard, "on_corrupt": on_corrupt,
                "jpeg_draft": jpeg_draft if size is not None else None}
    fps = [source.class_fingerprint(c) for c in range(len(source.classes))]
    partial_path = out / f"index-{split}.partial.jsonl"
    index_file = out / f"index-{split}.json"

    def reusable(entries: dict) -> dict:
        """Entries of classes whose files are unchanged and whose shards are intact."""
        return {c: e for c, e in entries.items()
                if int(c) < len(fps) and e.get("fingerprint") == fps[int(c)] and _shards_intact(out, e)}

    done: dict[str, dict] = {}
    if index_file.exists():  # a finished pack of an earlier version of the source
        state = json.loads(index_file.read_text())
        if state.get("settings") == settings:
            done.update(reusable({c: {**e, "shards": state["shards"][c]} for c, e in state.get("packed", {}).items()}))
    journal = _read_journal(partial_path)  # an interrupted pack
    if journal is not None and journal[0] == settings:
        done.update(reusable(journal[1]))
    if done:
        log.warning("%s: %d of %d classes already packed and unchanged; packing the rest", out, len(done),
                    len(source.classes))
    todo = [c for c in range(len(source.classes)) if str(c) not in done]
    bar = tqdm(total=len(source.classes), initial=len(done), desc=f"pack {source.name}/{split}", unit="class",
               disable=not progress)

    # The journal restarts with what is reusable now, then grows by one line per class.
    sink = open(partial_path, "w")  # noqa: SIM115 - closed in the finally below
    sink.write(json.dumps({"settings": settings}) + "\n")
    sink.writelines(json.dumps({"class": c, "entry": e}) + "\n" for c, e in done.items())
    sink.flush()  # on disk before any packing: a crash now keeps what an earlier journal held
    os.fsync(sink.fileno())

    def record(c: int, entry: dict) -> None:
        done[str(c)] = {**entry, "fingerprint": fps[c]}
        sink.write(json.dumps({"class": str(c), "entry": done[str(c)]}) + "\n")
        sink.flush()
        os.fsync(sink.fileno())
        bar.update(1)

    args = (split, size, resize, mode, encoding, max_per_shard, on_corrupt, jpeg_draft)
    try:
        if mapper is not None and todo:
            for c, entry in mapper(pack_class, {c: (source.files[c], c, str(out.resolve()), *args) for c in todo}):
                record(c, entry)
        else:
            for c in todo:
                record(c, pack_class(source.files[c], c, out, *args))
    finally:
        sink.close()
        bar.close()

    entries = [done[str(c)] for c in range(len(source.classes))]
    index = {
        **index_fields(source.name, split, source.classes, entries, encoding, mean_std),
        "source_fingerprint": source.fingerprint(fps),
        "resize": resize_record(size, resize, jpeg_draft),
        # What a later run needs to repack only changed classes (see "Incremental" above).
        "settings": settings,
        "packed": {str(c): {k: v for k, v in done[str(c)].items() if k != "shards"} for c in range(len(source.classes))},
    }
    _atomic_json(out / f"index-{split}.json", index)
    partial_path.unlink(missing_ok=True)
    return index


def load_imagenet(root: Path, split: str, size: int | None = None, resize: str = "shorter",
                  on_corrupt: str = "error") -> ImageSet:
    """ImageNet-1K in one of its standard layouts, decoded in memory: only for small subsets;
    `dream-dist task=pack dataset=imagenet pack.size=64` streams the full set to shards."""
    return decode_source(imagenet_source(root, split), size, resize, on_corrupt)
