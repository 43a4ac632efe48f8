"""Where bytes live: local paths and object storage (s3://, gs://, any fsspec URL), one API.

    import dream_dist.data.storage as storage
    storage.read_text("s3://bucket/packed/index-train.json")
    cache = storage.ShardCache("/tmp/dream_dist/shards", max_bytes=2 << 30)
    path = cache.fetch("s3://bucket/packed/train-c00003-00000.tar", size=123456)   # a local file

- A local path (or `file://`) goes through plain Python file calls: no fsspec on the hot path.
- Any other `<scheme>://` goes through fsspec (s3fs for s3://). The S3 endpoint comes from
  `DREAM_DIST_S3_ENDPOINT`, else `AWS_ENDPOINT_URL` (MinIO, Ceph, a loopback test server);
  credentials from the usual AWS chain (environment, profile, instance role).
- Writes are atomic: a local file is written beside its name and renamed; an object store
  publishes an object whole when its upload ends. A reader never sees half a shard or index.
- Failures end in one line naming the URL (`StorageError`, a DataNotFoundError): missing
  credentials, a missing bucket, a missing key, or access denied.

`ShardCache` is how a class-shard worker reads packed shards from object storage: each shard
of its own classes is downloaded whole on first use into a local directory bounded in size
(least recently used shards leave first), then read by offset like a local shard. It counts
the requests and the bytes it fetched, so a benchmark can compare them with what was needed.
"""
from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from dream_dist.errors import DataNotFoundError

ENDPOINT_VARS = ("DREAM_DIST_S3_ENDPOINT", "AWS_ENDPOINT_URL")


class StorageError(DataNotFoundError):
    """Object storage refused or lacked what a URL names (credentials, bucket, key)."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage (a `<scheme>://` other than file://)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def join(base: str | os.PathLike, *names: str) -> str:
    """`base`/`names`, for a URL or a path (a URL keeps its scheme and forward slashes)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(local(base).joinpath(*names))


def local_dir(kind: str, env: str, url: str) -> Path:
    """A local directory kept for object-storage URL `url`: $<env> (default
    ~/.cache/dream_dist/<kind>)/<hash of the URL> (the shard cache, the staging of uploads)."""
    import hashlib

    base = Path(os.environ.get(env, Path.home() / ".cache" / "dream_dist" / kind))
    return base / hashlib.sha256(str(url).encode()).hexdigest()[:16]


def endpoint() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


_FS: dict[tuple, object] = {}
_FS_LOCK = threading.Lock()


def filesystem(url: str):
    """(fsspec filesystem, path within it) of `url`; one filesystem object per protocol and
    endpoint in this process."""
    import fsspec

    protocol = str(url).split("://", 1)[0]
    options = {}
    if protocol in ("s3", "s3a") and endpoint():
        options["endpoint_url"] = endpoint()
    key = (protocol, tuple(sorted(options.items())))
    with _FS_LOCK:
        if key not in _FS:
            try:
                _FS[key] = fsspec.filesystem(protocol, **options)
            except ImportError as e:
                raise StorageError(f"{url}: no filesystem for {protocol}:// ({e}); for s3:// install s3fs") from e
    fs = _FS[key]
    return fs, fs._strip_protocol(url)


def _explain(url: str, e: Exception) -> StorageError:
    """One line naming `url` and what is wrong with it."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "credential" in low or "nocredentialserror" in low:
        why = "no credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)"
    elif "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket" in low:
        why = f"bucket {url.split('://', 1)[1].split('/', 1)[0]!r} does not exist"
    elif isinstance(e, PermissionError) or "accessdenied" in low or "forbidden" in low or "403" in low:
        why = "access denied"
    elif isinstance(e, FileNotFoundError) or "nosuchkey" in low or "not found" in low or "404" in low:
        why = "no such key"
    else:
        why = " ".join(text.split())[:300]
    return StorageError(f"{url}: {why}")


def _remote(url: str, op, *args, **kwargs):
    fs, path = filesystem(url)
    try:
        return op(fs, path, *args, **kwargs)
    except StorageError:
        raise
    except Exception as e:  # botocore / aiohttp / fsspec errors: one line naming the URL
        raise _explain(url, e) from e


def exists(url: str) -> bool:
    if not is_url(url):
        return local(url).exists()
    return _remote(url, lambda fs, p: fs.exists(p))


def size(url: str) -> int:
    if not is_url(url):
        p = local(url)
        if not p.exists():
            raise DataNotFoundError(f"{p}: no such file")
        return p.stat().st_size
    return int(_remote(url, lambda fs, p: fs.info(p)["size"]))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of `url`, or those in [start, end) (one ranged request on object storage)."""
    if not is_url(url):
        with open(local(url), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    return _remote(url, lambda fs, p: fs.cat_file(p, start=start, end=end))


def read_text(url: str) -> str:
    if not is_url(url):
        p = local(url)
        if not p.exists():
            raise DataNotFoundError(f"{p}: no such file")
        return p.read_text()
    return read_bytes(url).decode()


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` atomically (see the module docstring)."""
    if not is_url(url):
        p = local(url)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return

    def put(fs, p):
        fs.pipe_file(p, data)
        fs.invalidate_cache(p)

    _remote(url, put)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def put_file(path: str | os.PathLike, url: str) -> None:
    """Copy local file `path` to `url` (atomically, as write_bytes)."""
    if not is_url(url):
        dst = local(url)
        if dst.resolve() == Path(path).resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        import shutil

        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
        return

    def put(fs, p):
        fs.put_file(str(path), p)
        fs.invalidate_cache(p)

    _remote(url, put)


def get_file(url: str, path: str | os.PathLike) -> None:
    """Copy `url` to local file `path`, atomically."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if is_url(url):
            _remote(url, lambda fs, p: fs.get_file(p, str(tmp)))
        else:
            import shutil

            shutil.copyfile(local(url), tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def remove(url: str) -> None:
    if not is_url(url):
        local(url).unlink(missing_ok=True)
        return

    def rm(fs, p):
        if fs.exists(p):
            fs.rm_file(p)
        fs.invalidate_cache(p)

    _remote(url, rm)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under `url`; [] when it does not exist."""
    if not is_url(url):
        p = local(url)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def ls(fs, p):
        fs.invalidate_cache(p)
        try:
            return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []

    return _remote(url, ls)


def upload_tree(directory: str | os.PathLike, url: str) -> int:
    """Upload every file under local `directory` to `url`/<relative path>; returns the count."""
    base = Path(directory)
    n = 0
    for f in sorted(base.rglob("*")):
        if f.is_file() and not f.name.endswith(".tmp"):
            put_file(f, join(url, *f.relative_to(base).parts))
            n += 1
    return n


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path) of `url`, for libraries that take one (Ray Train's
    storage_filesystem): fsspec's filesystem wrapped, so endpoint and credentials are ours."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def check_bucket(url: str) -> None:
    """Raise StorageError (one line) unless `url`'s bucket exists and answers: what a task
    checks before any work, so a typo in a bucket name fails in a second, not after a pack."""
    if not is_url(url):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False, refresh=True)
    except Exception as e:
        raise _explain(f"{url.split('://', 1)[0]}://{bucket}", e) from e


class ShardCache:
    """Shards of object storage as local files, within `max_bytes` of local disk.

    fetch(url, size): the local copy of `url` (downloaded whole on first use, checked against
    the `size` the index records); least recently used copies are deleted while the cache
    holds more than max_bytes, never the one just fetched. `requests` and `bytes_fetched`
    count what was downloaded (a cache hit costs nothing).
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.requests = 0
        self.bytes_fetched = 0
        self.evictions = 0
        self._held: OrderedDict[str, int] = OrderedDict()  # local name -> bytes, oldest first
        self._lock = threading.Lock()

    @staticmethod
    def _name(url: str) -> str:
        import hashlib

        return hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + url.rsplit("/", 1)[-1]

    @property
    def held_bytes(self) -> int:
        return sum(self._held.values())

    def fetch(self, url: str, size: int | None = None) -> Path:
        name = self._name(url)
        path = self.dir / name
        with self._lock:
            if name in self._held and (size is None or self._held[name] == size):
                self._held.move_to_end(name)
                return path
            if path.exists() and (size is None or path.stat().st_size == size):  # left by an earlier run
                self._held[name] = path.stat().st_size
                self._evict(keep=name)
                return path
        get_file(url, path)
        got = path.stat().st_size
        if size is not None and got != size:
            path.unlink(missing_ok=True)
            raise StorageError(f"{url}: {got} bytes, but its index says {size}: truncated or replaced")
        with self._lock:
            self.requests += 1
            self.bytes_fetched += got
            self._held[name] = got
            self._held.move_to_end(name)
            self._evict(keep=name)
        return path

    def _evict(self, keep: str) -> None:
        while self.held_bytes > self.max_bytes and len(self._held) > 1:
            old = next(iter(self._held))
            if old == keep:
                self._held.move_to_end(old)
                continue
            self._held.pop(old)
            (self.dir / old).unlink(missing_ok=True)  # a reader holding it open keeps its data (POSIX)
            self.evictions += 1
