"""The config root: typed sections built from mappings, validated before any compute starts.

Hydra composes YAML from `conf/`; `build(cls, mapping)` turns the composed mapping into
dataclasses (the run's RunConfig, in dream_dist.tasks, gathers every section: the data and
pack sections here, each method's own next to the method). Unknown keys and bad values
raise `ConfigError` with the offending path, so a typo such as `coreset.ipcs=10` fails at once instead of after an hour.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from dream_dist.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"
    """Source name: digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder, tinyimagenet."""
    root: str | None = None
    """Directory of the source; None = $DREAM_DIST_DATA/<default dir> (digits needs none)."""
    packed: str | None = None
    """Directory of packed shards to read (written by task=pack); None = read the source."""
    classes: list[int] | None = None
    """Restrict to these class ids (None = all)."""
    on_corrupt: str = "error"
    """A corrupt sample (an undecodable source image, or a bad sample in a packed shard): error
    (stop, naming it) or skip (leave it out; the count and keys are logged)."""
    urls: str | list[str] | None = None
    """dataset=webdataset: the train shards: a brace pattern (/d/train-{0000..1023}.tar), a list,
    or a directory; local paths, s3://, https://, pipe: (dream_dist/data/ingest.py)."""
    test_urls: str | list[str] | None = None
    """dataset=webdataset: the test shards, as `urls`."""
    image_key: str = "auto"
    """dataset=webdataset: the image's extension; auto = the first of jpg, jpeg, png, webp."""
    label_key: str = "cls"
    """dataset=webdataset: where the label is: cls (or another extension holding an integer),
    or json:<field> (an integer or a class name)."""
    class_names: str | None = None
    """dataset=webdataset: a file (or URL) of class names in label order, one per line (first
    word); None = labels 0..K-1 named by their number."""
    like: str | None = None
    """Resolve the per-dataset hyperparameters and evaluation protocol (docs/fidelity.md) as for
    this built-in dataset, e.g. dataset=webdataset dataset.like=tinyimagenet; None = `name`'s."""
    shard_cache_dir: str | None = None
    """Packed shards on object storage (dataset.packed or pack.out = s3://...): local directory
    of the fetched shards; None = $DREAM_DIST_SHARD_CACHE or ~/.cache/dream_dist/shards."""
    shard_cache_mb: float = 4096.0
    """Local disk the fetched shards may take (least recently used leave first)."""

    @property
    def kind(self) -> str:
        """The dataset the hyperparameters and the protocol are resolved for (`like`, else `name`)."""
        return self.like or self.name

    def __post_init__(self) -> None:
        from dream_dist.data import SOURCES, _register_builtin

        if self.like is not None and self.like not in SOURCES:
            _register_builtin()
            if self.like not in SOURCES:
                raise ConfigError(f"dataset.like: unknown dataset {self.like!r}; known: {', '.join(sorted(SOURCES))}")
        if self.shard_cache_mb <= 0:
            raise ConfigError("dataset.shard_cache_mb must be > 0")
        if self.name == "webdataset" and not self.packed:
            for key in ("urls", "test_urls"):
                if not getattr(self, key):
                    raise ConfigError(f"dataset.{key}: dataset=webdataset needs dataset.{key}=<brace pattern, "
                                      f"list or directory of .tar shards>")

        _register_builtin()
        if self.name not in SOURCES:
            raise ConfigError(f"dataset.name: unknown dataset {self.name!r}; known: {', '.join(sorted(SOURCES))}")
        if self.on_corrupt not in ("error", "skip"):
            raise ConfigError(f"dataset.on_corrupt: unknown {self.on_corrupt!r}; choose one of error, skip")


@dataclass
class PackConfig:
    out: str | None = None
    """Where the shards and index files go; None = outputs/packed/<dataset.name>."""
    encoding: str = "png"
    """Sample encoding: png (smaller) or npy (faster to write)."""
    max_per_shard: int = 2000
    """Samples per tar shard; each shard holds one class (also the most images an image-file
    source holds decoded at once while packing)."""
    size: int | None = None
    """Image-file sources (imagefolder, tinyimagenet, imagenet): resize to size x size while
    packing (None = keep; mixed sizes then fail with a hint)."""
    resize: str = "shorter"
    """How `size` is reached: shorter (shorter side to size, centre crop) or square (stretch)."""
    jpeg_draft: bool = True
    """With `size`: decode JPEGs of at least 2 x size at libjpeg's reduced DCT scale (1/2, 1/4
    or 1/8, never below size) before the resize: about half the decode time of an
    ImageNet-sized photo, slightly different pixels from a full decode (false = full decode)."""
    workers: int = 0
    """Image-file sources: 0 = pack in this process; N = classes fan out to N Ray tasks at a
    time (same bytes; `pack.out` must be storage every node sees)."""

    def __post_init__(self) -> None:
        if self.encoding not in ("png", "npy"):
            raise ConfigError(f"pack.encoding must be png or npy, got {self.encoding!r}")
        if self.max_per_shard < 1:
            raise ConfigError("pack.max_per_shard must be >= 1")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"pack.size must be >= 1 or null, got {self.size}")
        if self.resize not in ("shorter", "square"):
            raise ConfigError(f"pack.resize: unknown {self.resize!r}; choose one of shorter, square")
        if self.workers < 0:
            raise ConfigError(f"pack.workers must be >= 0, got {self.workers}")


def build(cls: type, values: Mapping[str, Any] | None, path: str = "") -> Any:
    """Construct dataclass `cls` from a (possibly nested) mapping, rejecting unknown keys."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{path or cls.__name__}: unknown key(s) {unknown}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = build(hint, value, f"{path}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(_keyed(str(e), path, names)) from None


def _keyed(msg: str, path: str, names: set[str]) -> str:
    """`msg` led by its full key path: a message that starts with a field name of the section
    gets the section's path ('epochs must be ...' in eval -> 'eval.epochs must be ...');
    others get the section ('eval: ...')."""
    if not path or msg.startswith(path):
        return msg
    head = re.match(r"[A-Za-z_]\w*", msg)
    if head and head.group(0) in names:
        return path + msg
    return f"{path.rstrip('.')}: {msg}"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
