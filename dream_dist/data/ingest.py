"""Bring your own WebDataset: shuffled tar shards in, class-grouped packed shards out.

    dream-dist task=pack dataset=webdataset dataset.urls='/data/imagenet-train-{0000..1023}.tar' \
        dataset.test_urls='/data/imagenet-val-{00..63}.tar' pack.size=64 pack.workers=8

ImageNet as WebDataset is usually shuffled: any class in any shard, samples `<key>.jpg`
(or .jpeg / .png / .webp) with `<key>.cls` or a label inside `<key>.json`. Packing needs every
class's samples together, in an order that does not depend on the shuffle. Holding a class per
open writer would hold up to 1,000 writers (and their buffers) at once, so the pass is a
map-and-merge, as an external sort is:

1. map, one task per input shard (`ingest_shard`): stream the tar, decode and resize each
   sample exactly as the folder pack does (`folder.decode_image`), sort the shard's samples
   by (class, key) and write them as ONE run file of raw uint8 records, class-contiguous, plus a
   small JSON with each class's byte segment. One writer open, one input shard held: memory
   does not grow with the class count or the shuffle. The JSON is written last, so a finished
   run is recognisable: a rerun skips every input shard whose run is there with the same
   settings (resumable per input shard).
2. merge, one task per class (`merge_class`): read that class's segment of every run (byte
   ranges), order the samples by key, and write the class's shards through
   `stream.write_class`, the writer of the folder pack. Memory: one class.

The samples of a class are ordered by key, and the map's output is a pure function of its
shard, so the packed bytes are the same for any number of workers (`pack.workers`) and any
shuffle. Keys that are the files' stems order as the folder pack orders file names, so a
WebDataset made from a folder packs to the same pixels and statistics as the folder.

Bad input ends in one line naming the shard and the sample key (a sample without an image or a
label, a label outside the class list, a truncated tar, an image that does not decode); the
runs already written stay, so the rerun after the fix does only the rest. `on_corrupt=skip`
leaves such samples out instead, and counts and logs them (the index lists them).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import resource
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import dream_dist.data.storage as storage
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
RUN_VERSION = 1
_HEADER = struct.Struct("<HHHH")  # key length, C, H, W; then the key (utf-8), then C*H*W bytes
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- inputs


def expand_urls(spec) -> list[str]:
    """The input shards of `spec`: a brace pattern (`/d/train-{0000..1023}.tar`), a list of
    them, or a directory (local or object storage) whose `*.tar` files are taken in name order."""
    from braceexpand import braceexpand

    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = str(item)
        if not item.startswith("pipe:") and (storage.is_url(item) and item.endswith("/")
                                             or not storage.is_url(item) and storage.local(item).is_dir()):
            found = [storage.join(item, n) for n in storage.listdir(item) if n.endswith(".tar")]
            if not found:
                raise DataNotFoundError(f"dataset.urls: no .tar files in {item}")
            urls.extend(found)
        else:
            urls.extend(braceexpand(item))
    return urls


def read_class_names(path: str) -> list[str]:
    """Class names in label order, one per line (the first word of a line, so ImageNet's
    `LOC_synset_mapping.txt` lines `n01440764 tench, Tinca tinca` give the wnids)."""
    names = [line.split()[0] for line in storage.read_text(path).splitlines() if line.strip()]
    if not names:
        raise DataError(f"dataset.class_names: {path} lists no classes")
    if len(set(names)) != len(names):
        raise DataError(f"dataset.class_names: {path} names a class twice")
    return names


def _open_stream(url: str):
    """A readable binary stream of an input shard: a local file, `pipe:<command>` or an
    http(s) URL through webdataset's gopen, any other URL through fsspec."""
    if url.startswith("pipe:") or url.startswith(("http://", "https://")):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if storage.is_url(url):
        fs, path = storage.filesystem(url)
        try:
            return fs.open(path, "rb", block_size=8 << 20)
        except Exception as e:
            raise storage._explain(url, e) from e
    p = storage.local(url)
    if not p.exists():
        raise DataNotFoundError(f"dataset.urls: shard {url} does not exist")
    return open(p, "rb")  # noqa: SIM115 - closed by iter_samples


def iter_samples(url: str):
    """Yield (key, {extension: bytes}) for each sample of tar shard `url`, in tar order.
    WebDataset's convention: a sample is the consecutive files sharing a key, the path up to
    the first dot of the file name. A tar that ends early raises DataError naming the last key."""
    key, parts, last = None, {}, "<start of shard>"
    stream = _open_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    continue
                k = f"{d}/{stem}" if d else stem
                if k != key:  # the sample before is whole: out before this member is read
                    if key is not None:
                        yield key, parts
                        last = key
                    key, parts = k, {}
                parts[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{url}: truncated or corrupt tar after sample {last} ({type(e).__name__}: {e})") from e
    finally:
        stream.close()
    if key is not None:
        yield key, parts


def parse_label(parts: dict, label_key: str, names: dict[str, int] | None) -> int:
    """The class id of a sample from `<key>.cls` (label_key=cls), `<key>.json`'s field
    (label_key=json:<field>) or any other extension holding an integer. A class name (in a
    json field) is looked up in `names`. Raises KeyError (no label) or ValueError (bad label)."""
    if label_key.startswith("json:"):
        if "json" not in parts:
            raise KeyError("json")
        value = json.loads(parts["json"])
        for f in label_key[5:].split("."):
            value = value[f]
    else:
        value = parts[label_key].decode().strip()
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if names is None or value not in names:
            raise ValueError(f"label {value!r} is not a class name of dataset.class_names")
        return names[value]
    return int(value)


# ---------------------------------------------------------------------------- map


def run_name(n: int) -> str:
    return f"run-{n:06d}"


def ingest_shard(url: str, n: int, runs: str, settings: dict, num_classes: int | None,
                 names: dict[str, int] | None) -> dict:
    """Map one input shard to its run (see the module docstring); returns the run's record:
    per-class segments, the samples read and skipped, the largest label, this process's peak RSS.
    An existing run with the same settings and input size is returned as it is."""
    from dream_dist.data.folder import decode_image

    meta_url = storage.join(runs, run_name(n) + ".json")
    source_size = None if url.startswith(("pipe:", "http://", "https://")) else storage.size(url)
    if storage.exists(meta_url):
        meta = json.loads(storage.read_text(meta_url))
        if meta.get("settings") == settings and meta.get("url") == url and meta.get("source_size") == source_size:
            return {**meta, "reused": True}
    on_corrupt, image_key, label_key = settings["on_corrupt"], settings["image_key"], settings["label_key"]
    records: list[tuple[int, str, np.ndarray]] = []
    skipped: list[str] = []

    def bad(msg: str, key: str) -> None:
        if on_corrupt == "error":
            raise DataError(f"{url}: sample {key}: {msg}")
        skipped.append(f"{url}:{key}")

    try:
        for key, parts in iter_samples(url):
            keys = IMAGE_KEYS if image_key == "auto" else (image_key,)
            ext = next((k for k in keys if k in parts), None)
            if ext is None:
                bad(f"no image (.{' / .'.join(keys)}); it has {', '.join('.' + p for p in sorted(parts))}", key)
                continue
            try:
                c = parse_label(parts, label_key, names)
            except KeyError:
                bad(f"no label ({label_key})", key)
                continue
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                bad(f"bad label ({e})", key)
                continue
            if c < 0 or (num_classes is not None and c >= num_classes):
                bad(f"label {c} is outside the {num_classes} classes of dataset.class_names"
                    if num_classes is not None else f"label {c} is negative", key)
                continue
            try:
                img = decode_image(io.BytesIO(parts[ext]), settings["mode"], settings["size"], settings["resize"],
                                   settings["jpeg_draft"])
            except DataError as e:
                bad(f".{ext} does not decode ({str(e).split('cannot decode image', 1)[-1].strip(' ()')})", key)
                continue
            records.append((c, key, img))
    except DataError as e:
        if on_corrupt == "error" or "truncated or corrupt tar" not in str(e):
            raise
        skipped.append(f"{url}:<rest of shard: {e}>")

    records.sort(key=lambda r: (r[0], r[1]))
    segments: dict[str, list[int]] = {}
    with tempfile.NamedTemporaryFile(delete=False, suffix=".run") as f:
        pos = 0
        for c, key, img in records:
            k = key.encode()
            blob = _HEADER.pack(len(k), *img.shape) + k + np.ascontiguousarray(img).tobytes()
            seg = segments.setdefault(str(c), [pos, 0, 0])
            seg[1] += len(blob)
            seg[2] += 1
            f.write(blob)
            pos += len(blob)
        tmp = f.name
    try:
        storage.put_file(tmp, storage.join(runs, run_name(n) + ".bin"))
    finally:
        os.unlink(tmp)
    meta = {"version": RUN_VERSION, "url": url, "source_size": source_size, "settings": settings,
            "count": len(records), "skipped": skipped, "segments": segments,
            "max_label": max((r[0] for r in records), default=-1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    storage.write_text(meta_url, json.dumps(meta))  # last: its presence marks the run finished
    return meta


# ---------------------------------------------------------------------------- merge


def parse_records(blob: bytes):
    """(key, uint8 (C, H, W)) for each record of a run segment."""
    pos = 0
    while pos < len(blob):
        kl, ch, h, w = _HEADER.unpack_from(blob, pos)
        pos += _HEADER.size
        key = blob[pos:pos + kl].decode()
        pos += kl
        n = ch * h * w
        yield key, np.frombuffer(blob, dtype=np.uint8, count=n, offset=pos).reshape(ch, h, w)
        pos += n


def merge_class(c: int, pieces: list[tuple[str, int, int]], out: str, split: str, encoding: str,
                max_per_shard: int) -> dict:
    """Merge class `c`'s segments [(run url, offset, length)] into its packed shards under
    `out` (written in a local staging directory and uploaded when `out` is object storage).
    Returns its index entry, as stream.write_class."""
    from dream_dist.data.stream import write_class

    samples = []
    for url, off, length in pieces:
        samples.extend(parse_records(storage.read_bytes(url, off, off + length)))
    samples.sort(key=lambda s: s[0])
    for a, b in zip(samples, samples[1:]):
        if a[0] == b[0]:
            raise DataError(f"dataset.urls: sample key {a[0]!r} of class {c} appears in more than one sample; "
                            f"keys must be unique")
    chunks = (samples[i:i + max_per_shard] for i in range(0, max(len(samples), 1), max_per_shard))
    if not storage.is_url(out):
        return {**write_class(chunks, c, out, split, encoding), "skipped": []}
    with tempfile.TemporaryDirectory(prefix="dream_dist-merge-") as tmp:
        entry = write_class(chunks, c, tmp, split, encoding)
        for e in entry["shards"]:
            storage.put_file(Path(tmp) / e["file"], storage.join(out, e["file"]))
    return {**entry, "skipped": []}


# ---------------------------------------------------------------------------- driver


def settings_of(image_key: str, label_key: str, size: int | None, resize: str, jpeg_draft: bool,
                mode: str = "RGB") -> dict:
    """What a run depends on (a rerun with other settings maps every shard again)."""
    if image_key != "auto" and not image_key.isidentifier():
        raise ConfigError(f"dataset.image_key: {image_key!r} is not an extension such as jpg")
    if not (label_key.startswith("json:") and len(label_key) > 5 or label_key.replace("_", "").isalnum()):
        raise ConfigError(f"dataset.label_key: {label_key!r}: use cls (or another extension) or json:<field>")
    return {"image_key": image_key, "label_key": label_key, "size": size,
            "resize": resize if size is not None else None, "mode": mode,
            "jpeg_draft": jpeg_draft if size is not None else None}


def source_fingerprint(urls: list[str], settings: dict, class_names: list[str] | None) -> str:
    """The identity of an ingest: the shard URLs, their sizes, the settings and the class list."""
    h = hashlib.sha256(json.dumps([settings, class_names]).encode())
    for u in urls:
        s = None if u.startswith(("pipe:", "http://", "https://")) else storage.size(u)
        h.update(f"{u}\0{s}\n".encode())
    return f"webdataset:{h.hexdigest()}"


def ingest(urls: list[str], out: str, split: str, settings: dict, on_corrupt: str = "error",
           class_names: list[str] | None = None, encoding: str = "png", max_per_shard: int = 2000,
           mean_std: tuple[list[float], list[float]] | None = None, num_classes: int | None = None,
           mapper=None, progress: bool = True) -> dict:
    """Ingest the shards `urls` of `split` into packed shards + index under `out` (a directory
    or an object-storage URL). Returns the index (its "ingest" entry reports the shards, the
    samples, the skipped ones and the peak RSS of the driver and of the map tasks).

    num_classes: the class count when there is no class_names (the test split takes the train
    split's); None = the largest label + 1. mapper: as in stream.pack_files."""
    from dream_dist.data.shards import index_path
    from dream_dist.data.stream import index_fields

    if not urls:
        raise ConfigError(f"dataset.{'urls' if split == 'train' else 'test_urls'}: no input shards")
    if on_corrupt not in ("error", "skip"):
        raise ConfigError(f"dataset.on_corrupt: unknown {on_corrupt!r}; choose one of error, skip")
    settings = {**settings, "on_corrupt": on_corrupt}
    names = {n: i for i, n in enumerate(class_names)} if class_names else None
    if class_names:
        num_classes = len(class_names)
    runs = storage.join(out, "_ingest", split)
    if not storage.is_url(out):
        storage.local(runs).mkdir(parents=True, exist_ok=True)

    # 1. map: input shards -> runs
    metas: dict[int, dict] = {}
    bar = tqdm(total=len(urls), desc=f"ingest {split}: shards", unit="shard", disable=not progress)
    args = {n: (u, n, runs, settings, num_classes, names) for n, u in enumerate(urls)}
    try:
        results = mapper(ingest_shard, args) if mapper is not None else ((n, ingest_shard(*a)) for n, a in args.items())
        for n, meta in results:
            # Kept compact: a (classes, 3) int64 array per shard, not a dict of lists.
            seg = meta["segments"]
            table = np.array([[int(c), *v] for c, v in seg.items()], dtype=np.int64).reshape(-1, 4)
            metas[n] = {"table": table[np.argsort(table[:, 0])], "count": meta["count"],
                        "skipped": meta["skipped"], "max_label": meta["max_label"],
                        "peak_rss_mb": meta["peak_rss_mb"], "reused": meta.get("reused", False)}
            bar.update(1)
    finally:
        bar.close()
    k = num_classes if num_classes is not None else 1 + max(m["max_label"] for m in metas.values())
    if k < 1:
        raise DataError(f"dataset.urls: no readable sample in {len(urls)} shard(s) of {split}")
    reused = sum(m["reused"] for m in metas.values())
    if reused:
        log.warning("%s: %d of %d input shards already ingested with these settings; mapped the rest",
                    runs, reused, len(urls))

    # 2. merge: runs -> each class's shards
    def pieces(c: int) -> list[tuple[str, int, int]]:
        out_ = []
        for n in range(len(urls)):
            t = metas[n]["table"]
            i = int(np.searchsorted(t[:, 0], c))
            if i < len(t) and t[i, 0] == c:
                out_.append((storage.join(runs, run_name(n) + ".bin"), int(t[i, 1]), int(t[i, 2])))
        return out_

    entries: dict[int, dict] = {}
    margs = {c: (c, pieces(c), str(out), split, encoding, max_per_shard) for c in range(k)}
    bar = tqdm(total=k, desc=f"ingest {split}: classes", unit="class", disable=not progress)
    try:
        results = mapper(merge_class, margs) if mapper is not None else ((c, merge_class(*a)) for c, a in margs.items())
        for c, entry in results:
            entries[c] = entry
            bar.update(1)
    finally:
        bar.close()
    ordered = [entries[c] for c in range(k)]
    names_list = list(class_names) if class_names else [str(c) for c in range(k)]
    index = index_fields("webdataset", split, names_list, ordered, encoding, mean_std)
    skipped = [s for n in range(len(urls)) for s in metas[n]["skipped"]]
    if skipped:
        log.warning("skipped %d bad sample(s) (dataset.on_corrupt=skip): %s", len(skipped),
                    ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    index["skipped"] = skipped
    index["source_fingerprint"] = source_fingerprint(urls, settings, class_names)
    index["resize"] = {"size": settings["size"], "mode": settings["resize"], "jpeg_draft": settings["jpeg_draft"]} \
        if settings["size"] is not None else {"size": None, "mode": None}
    index["settings"] = settings
    index["max_per_shard"] = max_per_shard
    storage.write_text(str(index_path(out, split)), json.dumps(index, indent=1))
    report = {"split": split, "input_shards": len(urls), "reused_shards": reused,
              "samples": int(sum(m["count"] for m in metas.values())), "skipped": len(skipped), "classes": k,
              "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_rss_mb_map_task": max(m["peak_rss_mb"] for m in metas.values())}
    storage.write_text(storage.join(out, f"ingest-{split}.json"), json.dumps(report, indent=1))
    for n in range(len(urls)):  # the runs are as large as the decoded data: gone once the index is
        for ext in (".bin", ".json"):
            storage.remove(storage.join(runs, run_name(n) + ext))
    return index


def load_webdataset(root: str | None, split: str, test_urls=None, image_key: str = "auto", label_key: str = "cls",
                    class_names: str | None = None, size: int | None = None, resize: str = "shorter",
                    on_corrupt: str = "error"):
    """WebDataset shards in memory (small sets; `task=pack dataset=webdataset` streams big ones):
    `root` = the train split's urls (a brace pattern or a directory), `test_urls` the test
    split's. Ingested into a temporary directory, then read whole."""
    from dream_dist.data.shards import PackedReader

    spec = root if split == "train" else test_urls
    if spec is None:
        raise ConfigError(f"dataset webdataset: no urls for split {split!r} (root=<train urls>, test_urls=...)")
    names = read_class_names(class_names) if class_names else None
    with tempfile.TemporaryDirectory(prefix="dream_dist-wds-") as tmp:
        ingest(expand_urls(spec), tmp, "train", settings_of(image_key, label_key, size, resize, True),
               on_corrupt=on_corrupt, class_names=names, progress=False)
        return PackedReader(tmp, "train").load_classes()
