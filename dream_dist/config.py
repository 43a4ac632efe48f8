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

    def __post_init__(self) -> None:
        from dream_dist.data import SOURCES, _register_builtin

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
