"""From a configured dataset to readable data: pack freshness, then the opened splits.

    from dream_dist.data.prepare import ensure_packed, open_data
    root = ensure_packed(cfg)        # packs cfg.dataset into cfg.pack.out unless an up-to-date copy is there
    data = open_data(cfg)            # readers, counts, statistics, the test split; train read on demand

Every task starts here. `open_data` never loads the training split: a trainer reads it batch
by batch from `data.train_stream()`; class-sharded and per-class methods read their classes only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dream_dist.data import default_root
from dream_dist.data.base import ImageSet, StreamedSet
from dream_dist.errors import ConfigError


def source_fingerprint(name: str, root: str | None) -> str | None:
    """A cheap identity of a file-based source: its files' paths, sizes and mtimes (no pixel
    read). None for sources without a directory (digits), which are checksummed instead."""
    import hashlib

    from dream_dist.data import default_root

    path = Path(root) if root is not None else default_root(name)
    if path is None or not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{name}:{h.hexdigest()}"


def ensure_packed(cfg, mapper=None) -> Path:
    """Packed shards of cfg.dataset: the given `dataset.packed`, or packed now into pack.out.

    A packed copy is reused when its index records the same source: the same file
    fingerprint (paths, sizes, mtimes: no image is read, which matters for big datasets), or
    else the same pixel checksum. mapper: runs an image-file source's classes elsewhere
    (dream_dist.distributed.tasks.ray_mapper for pack.workers > 0; None = this process)."""
    from dream_dist.data import load_dataset
    from dream_dist.data.shards import checksum, index_path, pack
    from dream_dist.data.stream import FILE_SOURCES

    import dream_dist.data.storage as storage

    if cfg.dataset.packed is not None:
        if storage.is_url(cfg.dataset.packed):
            storage.check_bucket(cfg.dataset.packed)
            return cfg.dataset.packed
        return Path(cfg.dataset.packed)
    if cfg.dataset.name == "webdataset":
        return _ensure_ingested(cfg, mapper)  # writes to pack.out itself, local or object storage
    if storage.is_url(cfg.pack.out):
        return _pack_and_upload(cfg, mapper)
    if cfg.dataset.name in FILE_SOURCES:
        return _ensure_packed_files(cfg, mapper)
    out = Path(cfg.pack.out)
    fp = source_fingerprint(cfg.dataset.name, cfg.dataset.root)
    idx = {s: index_path(out, s) for s in ("train", "test")}
    if fp is not None and all(p.exists() and json.loads(p.read_text()).get("source_fingerprint") == fp
                              for p in idx.values()):
        return out
    # Image-file sources can leave out undecodable files (dataset.on_corrupt=skip).
    opts = {"on_corrupt": cfg.dataset.on_corrupt} if cfg.dataset.name in ("imagefolder", "tinyimagenet") else {}
    train = load_dataset(cfg.dataset.name, "train", root=cfg.dataset.root, **opts)
    test = load_dataset(cfg.dataset.name, "test", root=cfg.dataset.root, **opts)
    stats = train.mean_std()
    for split, data in (("train", train), ("test", test)):
        p = idx[split]
        if not (p.exists() and json.loads(p.read_text()).get("source_checksum") == checksum(data)):
            pack(data, out, split, source=cfg.dataset.name, encoding=cfg.pack.encoding,
                 max_per_shard=cfg.pack.max_per_shard, mean_std=stats, progress=cfg.progress)
        if fp is not None:
            index = json.loads(p.read_text())
            index["source_fingerprint"] = fp
            tmp = p.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(index, indent=2))
            tmp.replace(p)  # atomic: a reader never sees half an index
    return out


def staging_dir(url: str) -> Path:
    """The local directory where shards bound for object storage URL `url` are packed first:
    $DREAM_DIST_STAGING (default ~/.cache/dream_dist/staging)/<hash of the URL>. Kept, so a
    rerun finds the pack up to date without reading the source again."""
    import dream_dist.data.storage as storage

    return storage.local_dir("staging", "DREAM_DIST_STAGING", url)


def _pack_and_upload(cfg, mapper=None) -> str:
    """pack.out on object storage, for the sources that pack through local files: pack into
    the staging directory (up to date there = nothing packed), then upload every shard that is
    not already there with its size, and each split's index last: a reader of the URL sees the
    old index or the new one, never an index whose shards are missing."""
    import dataclasses

    import dream_dist.data.storage as storage
    from dream_dist.data.shards import index_path

    url = cfg.pack.out.rstrip("/")
    storage.check_bucket(url)
    local = staging_dir(url)
    ensure_packed(dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, out=str(local))), mapper)
    for split in ("train", "test"):
        index = json.loads(index_path(local, split).read_text())
        files = [e for entries in index["shards"].values() for e in entries]
        for e in files:
            dst = storage.join(url, e["file"])
            if not (storage.exists(dst) and storage.size(dst) == e["bytes"]):
                storage.put_file(local / e["file"], dst)
        storage.put_file(index_path(local, split), str(index_path(url, split)))
    return url


def _ensure_ingested(cfg, mapper=None):
    """dataset=webdataset: each split ingested into pack.out (dream_dist/data/ingest.py),
    unless its index there records the same shards (URLs and sizes), settings and classes."""
    import dream_dist.data.ingest as ingest
    import dream_dist.data.storage as storage
    from dream_dist.data.shards import index_path

    d, p = cfg.dataset, cfg.pack
    out = p.out.rstrip("/") if storage.is_url(p.out) else Path(p.out)
    storage.check_bucket(str(out))
    settings = ingest.settings_of(d.image_key, d.label_key, p.size, p.resize, p.jpeg_draft)
    names = ingest.read_class_names(d.class_names) if d.class_names else None
    mean_std, k = None, None
    for split, spec in (("train", d.urls), ("test", d.test_urls)):
        urls = ingest.expand_urls(spec)
        if not urls:
            raise ConfigError(f"dataset.{'urls' if split == 'train' else 'test_urls'}: no shards in {spec!r}")
        idx = str(index_path(out, split))
        index = json.loads(storage.read_text(idx)) if storage.exists(idx) else {}
        fp = ingest.source_fingerprint(urls, {**settings, "on_corrupt": d.on_corrupt}, names)
        if not (index.get("source_fingerprint") == fp and index.get("encoding") == p.encoding
                and index.get("max_per_shard") == p.max_per_shard
                and (mean_std is None or [index.get("mean"), index.get("std")] == list(mean_std))):
            index = ingest.ingest(urls, str(out), split, settings, on_corrupt=d.on_corrupt, class_names=names,
                                  encoding=p.encoding, max_per_shard=p.max_per_shard, mean_std=mean_std,
                                  num_classes=k, mapper=mapper, progress=cfg.progress)
        mean_std, k = (index["mean"], index["std"]), index["num_classes"]  # the test split: train's
    return out


def reader_for(cfg, root, split: str):
    """PackedReader of `split` under `root` (a directory or an object-storage URL) with the
    run's dataset settings (corrupt samples, the local shard cache)."""
    from dream_dist.data.shards import PackedReader

    d = cfg.dataset
    return PackedReader(root, split, on_corrupt=d.on_corrupt, cache_dir=d.shard_cache_dir,
                        cache_mb=d.shard_cache_mb)


def _ensure_packed_files(cfg, mapper=None) -> Path:
    """Image-file sources: streamed class by class (bounded memory, resumable, optionally on
    Ray tasks); a split is reused when its index records the same files and resize."""
    from dream_dist.data.shards import index_path
    from dream_dist.data.stream import FILE_SOURCES, pack_files, resize_record

    name, p = cfg.dataset.name, cfg.pack
    root = cfg.dataset.root if cfg.dataset.root is not None else default_root(name)
    if root is None:
        raise ConfigError(f"dataset.root: dataset {name!r} needs dataset.root=<directory>")
    out = Path(p.out)
    want = resize_record(p.size, p.resize, p.jpeg_draft)
    mean_std = None
    for split in ("train", "test"):
        src = FILE_SOURCES[name](root, split)
        idx = index_path(out, split)
        index = json.loads(idx.read_text()) if idx.exists() else {}
        if not (index.get("source_fingerprint") == src.fingerprint() and index.get("resize") == want
                and index.get("encoding") == p.encoding):
            index = pack_files(src, out, split, size=p.size, resize=p.resize, jpeg_draft=p.jpeg_draft,
                               encoding=p.encoding,
                               max_per_shard=p.max_per_shard, mean_std=mean_std, mapper=mapper,
                               progress=cfg.progress, on_corrupt=cfg.dataset.on_corrupt)
        mean_std = (index["mean"], index["std"])  # the test split records the train statistics
    return out


def load_packed_splits(cfg):
    """(train, test, mean, std) read from the packed shards."""
    root = ensure_packed(cfg)
    train_r, test_r = reader_for(cfg, root, "train"), reader_for(cfg, root, "test")
    train = train_r.load_classes(cfg.dataset.classes)
    test = test_r.load_classes(cfg.dataset.classes)
    mean, std = train_r.mean_std
    return train, test, mean, std


def balance_classes(counts: list[int], k: int, classes: list[int] | None = None) -> list[list[int]]:
    """Split classes into k shards of near-equal image counts (largest first, each to the
    lightest shard so far). Each shard's classes are returned sorted."""
    classes = list(range(len(counts))) if classes is None else list(classes)
    if not 1 <= k <= len(classes):
        raise ValueError(f"cannot split {len(classes)} classes into {k} shards")
    shards: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for c in sorted(classes, key=lambda c: (-counts[c], c)):
        j = min(range(k), key=lambda i: (load[i], i))
        shards[j].append(c)
        load[j] += counts[c]
    return [sorted(s) for s in shards]


@dataclass
class OpenedData:
    """A packed dataset opened for a run: what every method reads, nothing loaded wholesale."""

    root: Path | str
    """The packed directory (absolute), or its object-storage URL."""
    reader: object
    """PackedReader of the train split."""
    test_reader: object
    classes: list[int]
    """The run's class ids (dataset.classes, else all)."""
    counts_all: list[int]
    """Images per class of ALL classes of the index."""
    mean: list[float]
    std: list[float]
    cache: object
    """ClassCache over `reader` within the memory budget."""
    selected: list[int] | None = None
    """dataset.classes as given (None = all), what load_classes takes."""
    _train: ImageSet | None = field(default=None, repr=False)
    _test: ImageSet | None = field(default=None, repr=False)

    @property
    def counts(self) -> list[int]:
        """Per-class counts with unselected classes at 0."""
        return [n if c in self.classes else 0 for c, n in enumerate(self.counts_all)]

    @property
    def names(self) -> list[str]:
        return list(self.reader.classes)

    @property
    def image_size(self) -> int:
        return int(self.reader.index["image_size"])

    @property
    def channels(self) -> int:
        return int(self.reader.index["channels"])

    def meta(self):
        """What describes the train split without reading it: classes, channels, size."""
        from types import SimpleNamespace

        return SimpleNamespace(classes=self.names, channels=self.channels, size=self.image_size,
                               num_classes=len(self.names))

    def test(self) -> ImageSet:
        """The test split of the run's classes (read once)."""
        if self._test is None:
            self._test = self.test_reader.load_classes(self.selected)
        return self._test

    def train(self) -> ImageSet:
        """The whole train split of the run's classes in memory, read once. The trainers take
        `train_stream()` instead; this is for small data and tests that want the tensors."""
        if self._train is None:
            self._train = self.reader.load_classes(self.selected)
        return self._train

    def train_stream(self) -> StreamedSet | ImageSet:
        """The train split of the run's classes as the trainers (feature nets, observers,
        autoencoders) read it: a StreamedSet that reads each batch's samples by offset from
        the shards, so the process holds a batch, never the split (issue 21: an RDED driver
        held 7.4 GB at 1000 stress classes). The samples and their order are those of
        `train()`, so a seeded training gives the same weights either way.

        It reads through the reader, not the class cache: the cache would keep whole classes
        up to the memory budget in a driver that has no other use for them. The split
        already in memory is returned as it is; a pack without per-sample offsets, or read with
        on_corrupt=skip, has no per-sample reads (a batch would decode whole classes), so it is
        loaded whole."""
        if self._train is not None:
            return self._train
        if not all(self.reader.per_sample(c) for c in self.classes):
            return self.train()
        return StreamedSet(self.reader.read_samples, self.classes, [self.counts_all[c] for c in self.classes],
                           self.names, self.channels, self.image_size)

    def class_images(self, c: int) -> torch.Tensor:
        """uint8 images of class `c`: from the loaded train split when it is in memory, else
        through the class cache."""
        if self._train is not None:
            return self._train.images[self._train.labels == c]
        return self.cache.get(c)


def open_data(cfg, memory_budget_mb: float | None = None, mapper=None) -> OpenedData:
    """Pack (or reuse) cfg.dataset and open it; `memory_budget_mb` bounds the class cache
    (default distill.memory_budget_mb); `mapper`: as in ensure_packed."""
    import dream_dist.data.storage as storage
    from dream_dist.data.shards import ClassCache

    root = ensure_packed(cfg, mapper)
    root = root if storage.is_url(root) else Path(root).resolve()
    reader, test_reader = reader_for(cfg, root, "train"), reader_for(cfg, root, "test")
    classes = list(cfg.dataset.classes or range(len(reader.classes)))
    budget = memory_budget_mb if memory_budget_mb is not None else cfg.distill.memory_budget_mb
    mean, std = reader.mean_std
    return OpenedData(root, reader, test_reader, classes, list(reader.index["counts"]), list(mean), list(std),
                      ClassCache(reader, budget * 2**20, cfg.distill.cache_policy), cfg.dataset.classes)
