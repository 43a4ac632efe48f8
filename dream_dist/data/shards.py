"""Class-grouped WebDataset shards: `pack` writes them, `PackedReader` reads them by class.

Layout of a packed directory:

    <out>/index-<split>.json                the index (see `pack`)
    <out>/<split>-c<class:05d>-<k:05d>.tar  shards; every shard holds ONE class only

Because a shard never mixes classes, a worker that owns classes {3, 150} opens exactly the
shards listed for 3 and 150 in the index and nothing else. Samples are lossless uint8:
`<key>.png` (default, smallest) or `<key>.npy` (fastest to decode), plus `<key>.cls`.

Integrity: the index records each shard's sample count and byte size. A missing shard, a
size mismatch (truncation), a tar that fails to parse, an undecodable sample or a count
that disagrees with the index raises `ShardError` naming the shard and the sample key.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dream_dist.data.base import ImageSet
from dream_dist.errors import ConfigError, DataError, DataNotFoundError

FORMAT = "dream_dist.packed"
VERSION = 1
ENCODINGS = ("png", "npy")
ON_CORRUPT = ("error", "skip")
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")
log = logging.getLogger(__name__)


class ShardError(DataError, RuntimeError):
    """A packed shard is missing, truncated, corrupt, or disagrees with its index."""


DEFAULT_CACHE_MB = 4096.0  # local disk for shards fetched from object storage, per reader


def index_path(root: str | Path, split: str) -> Path | str:
    """The index file of `split` under `root` (a URL stays a URL)."""
    import dream_dist.data.storage as storage

    if storage.is_url(root):
        return storage.join(root, f"index-{split}.json")
    return Path(root) / f"index-{split}.json"


def default_cache_dir(url: str) -> Path:
    """Where shards fetched from `url` are kept: $DREAM_DIST_SHARD_CACHE (default
    ~/.cache/dream_dist/shards)/<hash of the URL>. Readers of one packed URL on one node share it."""
    import dream_dist.data.storage as storage

    return storage.local_dir("shards", "DREAM_DIST_SHARD_CACHE", url)


def checksum(data: ImageSet) -> str:
    """sha256 of the decoded uint8 pixels and labels: identifies the source content
    independently of its file format."""
    h = hashlib.sha256()
    h.update(str(tuple(data.images.shape)).encode())
    for chunk in data.images.reshape(len(data), -1).split(8192):
        h.update(chunk.contiguous().numpy().tobytes())
    h.update(data.labels.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _encode(img: np.ndarray, encoding: str) -> bytes:
    """uint8 (C, H, W) -> bytes."""
    buf = io.BytesIO()
    if encoding == "npy":
        np.save(buf, img, allow_pickle=False)
    else:
        from PIL import Image

        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        # compress_level 1: 3-4x faster to write than the default, ~5 % larger files.
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode(data: bytes, encoding: str, channels: int) -> np.ndarray:
    if encoding == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image

    # PNG only: PIL picks a decoder by content, and an EPS payload would reach Ghostscript.
    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        arr = np.asarray(im, dtype=np.uint8)
    # Contiguous (C, H, W): a transposed view would make whole-class loads channels-last in
    # memory while per-sample reads are not, and the two layouts take different conv kernels
    # (different float rounding), so the distilled set depended on the cache (issue 21).
    arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    if arr.shape[0] != channels:
        raise DataError(f"decoded {arr.shape[0]} channels, index says {channels}")
    return arr


def member_offsets(path: str | Path, encoding: str) -> list[list[int]]:
    """[byte offset, size] of each sample's image payload in tar shard `path`, in sample
    order: the per-sample access table kept in the index (headers only are read)."""
    import tarfile

    with tarfile.open(path) as tar:
        return [[m.offset_data, m.size] for m in tar.getmembers() if m.name.endswith("." + encoding)]


def pack(
    data: ImageSet,
    out: str | Path,
    split: str,
    source: str = "unknown",
    encoding: str = "png",
    max_per_shard: int = 2000,
    mean_std: tuple[list[float], list[float]] | None = None,
    progress: bool = True,
) -> dict:
    """Write `data` as class-grouped WebDataset shards plus `index-<split>.json` in `out`.

    mean_std: the normalisation to record; defaults to this split's own statistics (pass
    the train split's values when packing the test split). Returns the index.
    """
    import webdataset as wds

    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    if max_per_shard < 1:
        raise ValueError("max_per_shard must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = mean_std if mean_std is not None else data.mean_std()
    shards: dict[str, list[dict]] = {}
    counts = data.counts()
    bar = tqdm(total=len(data), desc=f"pack {source}/{split}", unit="img", disable=not progress)
    for c in range(data.num_classes):
        imgs = data.of_class(c).numpy()
        shards[str(c)] = []
        for k, start in enumerate(range(0, len(imgs), max_per_shard)):
            name = f"{split}-c{c:05d}-{k:05d}.tar"
            tmp = out / (name + ".tmp")
            chunk = imgs[start : start + max_per_shard]
            with wds.TarWriter(str(tmp), encoder=False) as sink:
                for i, img in enumerate(chunk):
                    sink.write({
                        "__key__": f"c{c:05d}_{start + i:08d}",
                        encoding: _encode(img, encoding),
                        "cls": str(c).encode(),
                    })
            os.replace(tmp, out / name)  # a crash never leaves a half-written shard under its name
            shards[str(c)].append({"file": name, "count": len(chunk), "bytes": (out / name).stat().st_size,
                                   "offsets": member_offsets(out / name, encoding)})
            bar.update(len(chunk))
    bar.close()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "split": split,
        "source_checksum": checksum(data),
        "classes": list(data.classes),
        "num_classes": data.num_classes,
        "counts": counts,
        "image_size": data.size,
        "channels": data.channels,
        "encoding": encoding,
        "mean": list(mean),
        "std": list(std),
        "shards": shards,
    }
    path = index_path(out, split)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return index


class PackedReader:
    """Reads a packed split class by class, streaming one shard at a time.

    `opened` lists every shard file this reader has opened, so callers (and tests) can
    check that a worker touched only its own classes' shards.
    """

    def __init__(self, root: str | Path, split: str = "train", on_corrupt: str = "error",
                 cache_dir: str | Path | None = None, cache_mb: float | None = None):
        import dream_dist.data.storage as storage

        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"dataset.on_corrupt: unknown {on_corrupt!r}; choose one of {', '.join(ON_CORRUPT)}")
        # Object storage (s3://...): shards are fetched whole into a bounded local cache on first
        # use and read there by offset (storage.ShardCache); the index is read once.
        self.remote = storage.is_url(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.shard_cache = None
        if self.remote:
            self.shard_cache = storage.ShardCache(cache_dir or default_cache_dir(self.root),
                                                  int((cache_mb if cache_mb is not None else DEFAULT_CACHE_MB) * 2**20))
        self.split = split
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []  # on_corrupt="skip": keys of the skipped samples, once each
        self.bytes_read = 0  # shard bytes read: whole shards by load_class, payloads by read_samples
        self._skip_keys: set[str] = set()
        path = index_path(self.root, split)
        if not storage.exists(path):
            raise DataNotFoundError(f"no index {path}: run `dream-dist task=pack` first")
        try:
            self.index = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise ShardError(f"{path}: index is not valid JSON ({e})") from e
        if self.index.get("format") != FORMAT:
            raise ShardError(f"{path}: not a dream_dist packed index")
        self.index_file = path
        self.opened: list[str] = []  # each shard once, in first-opened order (bounded by the pack)
        self._opened: set[str] = set()
        for c, entries in self.index["shards"].items():
            for e in entries:
                # A bare file name: never a path out of the root, nor a webdataset URL such as
                # "pipe:<command>" (which gopen would run).
                if not (isinstance(e.get("file"), str) and SHARD_NAME.fullmatch(e["file"])):
                    raise ShardError(f"{path}: shard name {str(e.get('file'))[:80]!r} of class {c} is not a "
                                     f"bare .tar file name")
            if sum(e["count"] for e in entries) != self.index["counts"][int(c)]:
                raise ShardError(f"{path}: shard counts of class {c} do not add up to its count")
        if on_corrupt == "skip":
            self._count_readable()

    def _note_opened(self, path: Path) -> None:
        if str(path) not in self._opened:  # per-sample reads reopen shards every batch
            self._opened.add(str(path))
            self.opened.append(str(path))

    def _count_readable(self) -> None:
        """on_corrupt="skip": one decoding pass over the split, so that every consumer sees the
        counts of the readable samples (the index's counts include the corrupt ones)."""
        counts = [sum(1 for _ in self.iter_class(c)) for c in range(self.index["num_classes"])]
        self.index = {**self.index, "counts": counts}
        if self.skipped:
            shown = ", ".join(self.skipped[:20]) + (" ..." if len(self.skipped) > 20 else "")
            log.warning("%s: skipped %d corrupt sample(s) (dataset.on_corrupt=skip): %s",
                        self.index_file, len(self.skipped), shown)

    def _corrupt(self, err: ShardError, key: str) -> None:
        """A corrupt sample: raise (on_corrupt="error"), or record its key and go on."""
        if self.on_corrupt == "error":
            raise err
        if key not in self._skip_keys:
            self._skip_keys.add(key)
            self.skipped.append(key)

    @property
    def classes(self) -> list[str]:
        return self.index["classes"]

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        return self.index["mean"], self.index["std"]

    def shard_files(self, classes: Iterable[int]) -> list[Path | str]:
        """The shards of `classes` where they are stored (paths, or URLs on object storage)."""
        return [self._where(e) for c in classes for e in self._entries(c)]

    def _where(self, entry: dict) -> Path | str:
        import dream_dist.data.storage as storage

        return storage.join(self.root, entry["file"]) if self.remote else self.root / entry["file"]

    def _local(self, entry: dict) -> Path:
        """A local file holding the shard `entry`: itself, or its copy in the shard cache
        (fetched now if absent; checked against the index's byte count)."""
        if not self.remote:
            return self.root / entry["file"]
        return self.shard_cache.fetch(self._where(entry), entry["bytes"])

    @property
    def fetched(self) -> dict:
        """What was downloaded from object storage: {"requests", "bytes"} (zeros when local)."""
        c = self.shard_cache
        return {"requests": c.requests if c else 0, "bytes": c.bytes_fetched if c else 0}

    def _entries(self, c: int) -> list[dict]:
        if not 0 <= int(c) < self.index["num_classes"]:
            raise ValueError(f"class {c} out of range [0, {self.index['num_classes']})")
        return self.index["shards"][str(int(c))]

    def iter_class(self, c: int) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (key, uint8 (C, H, W)) for every sample of class `c`, shard by shard."""
        from dream_dist.data.storage import StorageError

        for entry in self._entries(c):
            try:
                path = self._local(entry)
            except (StorageError, ShardError) as e:  # object storage: missing or short shard
                self._corrupt(e if isinstance(e, ShardError) else ShardError(str(e)),
                              f"{entry['file']}:<missing shard>")
                continue
            yield from self._iter_shard(path, entry, int(c))

    def _iter_shard(self, path: Path, entry: dict, c: int) -> Iterator[tuple[str, np.ndarray]]:
        import webdataset as wds

        if not path.exists():
            self._corrupt(ShardError(f"shard {path} listed in {self.index_file} for class {c} is missing"),
                          f"{path.name}:<missing shard>")
            return
        size = path.stat().st_size
        if size != entry["bytes"]:
            self._corrupt(ShardError(f"shard {path} has {size} bytes but {self.index_file} says "
                                     f"{entry['bytes']}: truncated or replaced"), f"{path.name}:<size>")
        self._note_opened(self._where(entry))
        enc, channels = self.index["encoding"], self.index["channels"]
        key, n = "<start of shard>", 0
        # An absolute path: webdataset treats "pipe:..." and "<scheme>://..." strings as commands/URLs.
        pipe = wds.DataPipeline(wds.SimpleShardList([str(path.resolve())]), wds.tarfile_to_samples())
        try:
            for sample in pipe:
                key = sample["__key__"]
                if enc not in sample or int(sample.get("cls", b"-1")) != c:
                    self._corrupt(ShardError(f"shard {path}: sample {key} lacks .{enc} or is not of class {c}"),
                                  f"{path.name}:{key}")
                    continue
                try:
                    img = _decode(sample[enc], enc, channels)
                except Exception as e:
                    self._corrupt(ShardError(f"shard {path}: sample {key} cannot be decoded ({e})"),
                                  f"{path.name}:{key}")
                    continue
                n += 1
                yield key, img
        except ShardError:
            raise
        except Exception as e:  # tarfile/webdataset errors on corrupt or truncated data
            # The rest of the shard is unreadable: under skip, it counts as skipped.
            self._corrupt(ShardError(f"shard {path}: corrupt after sample {key} ({type(e).__name__}: {e})"),
                          f"{path.name}:<after {key}>")
            return
        if n != entry["count"] and self.on_corrupt == "error":
            raise ShardError(f"shard {path}: read {n} samples after {key}, index says {entry['count']}")

    def per_sample(self, c: int) -> bool:
        """Whether class c's samples can be read one by one: its shards carry byte offsets
        (packs since issue 12) and no corrupt sample is to be skipped (the offsets count those)."""
        return self.on_corrupt == "error" and all("offsets" in e for e in self._entries(c))

    def read_samples(self, c: int, idx: torch.Tensor | list[int]) -> torch.Tensor:
        """Images `idx` (positions within class `c`) as uint8 (len(idx), C, H, W), reading only
        those samples' bytes when the index has offsets (packs since issue 12), else the
        class's shards once. Same pixels as load_class(c)[idx]."""
        idx = [int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx)]
        entries = self._entries(c)
        s, ch = self.index["image_size"], self.index["channels"]
        if not idx:
            return torch.zeros(0, ch, s, s, dtype=torch.uint8)
        if not self.per_sample(c):
            return self.load_class(c)[torch.tensor(idx)]
        starts = np.cumsum([0] + [e["count"] for e in entries])
        n = int(starts[-1])
        # Each distinct sample once, in file order (a batch drawn with replacement repeats some).
        wanted, inverse = np.unique(np.asarray(idx, dtype=np.int64), return_inverse=True)
        out = np.empty((len(wanted), ch, s, s), dtype=np.uint8)
        handles: dict[int, object] = {}
        try:
            for j, i in enumerate(wanted.tolist()):
                if not 0 <= i < n:
                    raise IndexError(f"sample {i} of class {c} out of range [0, {n})")
                k = int(np.searchsorted(starts, i, side="right") - 1)
                entry = entries[k]
                if k not in handles:
                    path = self._local(entry)
                    if not path.exists() or path.stat().st_size != entry["bytes"]:
                        raise ShardError(f"shard {path} is missing or not the {entry['bytes']} bytes "
                                         f"{self.index_file} says: truncated or replaced")
                    handles[k] = open(path, "rb")  # noqa: SIM115 - closed below
                    self._note_opened(self._where(entry))
                off, size = entry["offsets"][i - starts[k]]
                f = handles[k]
                f.seek(off)
                try:
                    out[j] = _decode(f.read(size), self.index["encoding"], ch)
                except Exception as e:
                    raise ShardError(f"shard {self._where(entry)}: sample {i} of class {c} "
                                     f"cannot be decoded ({e})") from e
                self.bytes_read += size
        finally:
            for f in handles.values():
                f.close()
        return torch.from_numpy(out[inverse.reshape(-1)])

    def load_class(self, c: int) -> torch.Tensor:
        """All images of class `c` as uint8 (n, C, H, W)."""
        arrays = [img for _, img in self.iter_class(c)]
        self.bytes_read += sum(e["bytes"] for e in self.index["shards"].get(str(c), []))
        s, ch = self.index["image_size"], self.index["channels"]
        if not arrays:
            return torch.zeros(0, ch, s, s, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays))

    def load_classes(self, classes: Iterable[int] | None = None) -> ImageSet:
        """An ImageSet of the given classes (all when None). Labels keep the global class
        ids and `classes` keeps the full name list, so shards from different workers agree."""
        classes = range(self.index["num_classes"]) if classes is None else list(classes)
        xs, ys = [], []
        for c in classes:
            x = self.load_class(c)
            xs.append(x)
            ys.append(torch.full((len(x),), int(c), dtype=torch.int64))
        s, ch = self.index["image_size"], self.index["channels"]
        images = torch.cat(xs) if xs else torch.zeros(0, ch, s, s, dtype=torch.uint8)
        labels = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
        return ImageSet(images, labels, list(self.classes))


CACHE_POLICIES = ("resident", "lru")


class ClassCache:
    """Decoded uint8 images per class, within a memory budget.

    policy "resident" (default, scan-resistant): the first classes requested that fit the
    budget stay resident for the whole run; every other class is never held whole. Its
    samples are read per sample by offset (`take`), and a whole-class pass streams it in
    chunks (`stream`). A worker visits all its classes every step, which is LRU's worst case:
    under LRU each class is evicted just before its next visit, so every visit re-reads whole
    classes. policy "lru" keeps that behaviour, as the benchmark's baseline.

    Bytes are counted per period (the engine opens one per step, `new_period`): `bytes_read`,
    what was read from the shards, and `min_bytes`, the least any policy that keeps the same
    resident classes must read: the distinct samples of the non-resident classes that the
    period used, plus each resident class once, when it is first loaded.
    """

    def __init__(self, reader: PackedReader, budget_bytes: int, policy: str = "resident"):
        if policy not in CACHE_POLICIES:
            raise ConfigError(f"distill.cache_policy: unknown {policy!r}; choose one of {', '.join(CACHE_POLICIES)}")
        self.reader = reader
        self.budget = int(budget_bytes)
        self.policy = policy
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._resident: dict[int, bool] = {}  # policy "resident": the decision per class, once
        self.used = 0  # bytes held (lru) or reserved for the resident classes
        self.reads = 0  # whole-class shard passes, for diagnostics
        self.min_bytes = 0
        self._seen: dict[int, set[int]] = {}  # this period's non-resident samples, per class

    # ------------------------------------------------------------------ accounting

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def new_period(self) -> None:
        """Start a new accounting period (one engine step): samples used again count again."""
        self._seen = {}

    def _payload(self, c: int) -> list[int]:
        """Payload bytes of each sample of class c, in sample order (the index's offsets)."""
        entries = self.reader._entries(c)
        if self.reader.per_sample(c):
            return [size for e in entries for _, size in e["offsets"]]
        per = sum(e["bytes"] for e in entries) / max(1, self.reader.index["counts"][c])
        return [int(per)] * self.reader.index["counts"][c]  # old packs: whole shards only

    def _need(self, c: int, idx) -> None:
        seen = self._seen.setdefault(c, set())
        new = {int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx)} - seen
        if new:
            sizes = self._payload(c)
            self.min_bytes += sum(sizes[i] for i in new)
            seen |= new

    # ------------------------------------------------------------------ residency

    def _nbytes(self, c: int) -> int:
        ix = self.reader.index
        return ix["counts"][c] * ix["channels"] * ix["image_size"] ** 2

    def resident(self, c: int) -> bool:
        """Whether class c is (or will be) held whole. policy "resident": decided at the
        class's first request, for good: it fits in what the classes before it left."""
        c = int(c)
        if self.policy == "lru":
            return c in self._cache or self._nbytes(c) <= self.budget
        if c not in self._resident:
            fits = self.used + self._nbytes(c) <= self.budget
            self._resident[c] = fits
            self.used += self._nbytes(c) if fits else 0
        return self._resident[c]

    def _load(self, c: int) -> torch.Tensor:
        """The whole class, read once: per sample by offset (payload bytes only) when the
        index has offsets, else its shards."""
        self.reads += 1
        n = self.reader.index["counts"][c]
        if self.reader.per_sample(c):
            return self.reader.read_samples(c, range(n))
        return self.reader.load_class(c)

    def get(self, c: int) -> torch.Tensor:
        """All images of class c. A non-resident class is read whole and not kept: callers
        that pass over a whole class should use `stream`."""
        c = int(c)
        if c in self._cache:
            if self.policy == "lru":
                self._cache.move_to_end(c)
            return self._cache[c]
        if self.policy == "resident":
            keep = self.resident(c)
            x = self._load(c)
            if keep:
                self._cache[c] = x
                self.min_bytes += sum(self._payload(c))  # each resident class once
            else:
                self._need(c, range(len(x)))
            return x
        x = self._load(c)
        self._need(c, range(len(x)))  # the minimum, as for any class LRU does not keep
        size = x.numel()
        if size <= self.budget:
            while self.used + size > self.budget and self._cache:
                _, old = self._cache.popitem(last=False)
                self.used -= old.numel()
            self._cache[c] = x
            self.used += size
        return x

    def take(self, c: int, idx: torch.Tensor) -> torch.Tensor:
        """Images `idx` of class c: from memory for a resident class (loaded at its first
        request), else only those samples' bytes are read from its shards (a matching step
        reads its batch, not the class). Same pixels as get(c)[idx]."""
        c = int(c)
        if self.resident(c):
            return self.get(c)[idx]
        self._need(c, idx)
        return self.reader.read_samples(c, idx)

    def stream(self, c: int, idx: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
        """Images `idx` of class c in chunks of `chunk` samples: a whole-class pass over a
        non-resident class reads each sample once and holds one chunk at a time."""
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        for part in torch.as_tensor(idx).split(chunk):
            yield self.take(c, part)


def load_packed(root: Path, split: str, classes: list[int] | None = None, on_corrupt: str = "error") -> ImageSet:
    if root is None:
        raise ConfigError("dataset.root: dataset 'packed' needs root=<directory written by pack>")
    return PackedReader(root, split, on_corrupt=on_corrupt).load_classes(classes)
