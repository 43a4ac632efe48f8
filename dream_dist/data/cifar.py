"""CIFAR-10 / CIFAR-100 from the python pickle batches (`cifar-10-batches-py` layout).

CIFAR-10: data_batch_1..5, test_batch, batches.meta (label_names).
CIFAR-100: train, test, meta (fine_label_names); we use the fine labels.
Each batch is a pickled dict with b'data' (N, 3072) uint8 in CHW order.

The batches are read by `CifarUnpickler`, never by `pickle.load`: a pickle is a program, and
a crafted `data_batch_1` would run its payload on load. The official files (Python 2,
protocol 2) hold only dicts, lists, bytes, strings, ints (opcodes, no globals) and one uint8
numpy array, which pickles through three globals: numpy's `_reconstruct`, `ndarray` and
`dtype`. Those three, plus the two that Python 3 uses to write bytes at protocol 2
(`_codecs.encode` with latin1, `bytes()` for b''), map to stand-ins here that check their
arguments and build the array with `np.frombuffer`; every other global is refused with a
`DataError` naming the file and the global. numpy itself never sees the pickle's dtype state:
a dtype's `__setstate__` accepts flags (e.g. "holds objects") that no uint8 has.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch

from dream_dist.data.base import ImageSet
from dream_dist.errors import DataError, DataNotFoundError


class _BadBatch(ValueError):
    """An allowed global called with arguments that no CIFAR batch has (CifarUnpickler.load
    turns it into a DataError naming the file)."""


class _NdarrayType:
    """Stands for the `numpy.ndarray` global, which numpy pickles only as `_reconstruct`'s
    first argument. Not callable, and no attributes to set (a BUILD on it fails)."""

    __slots__ = ()


class _Dtype:
    """A checked `numpy.dtype('u1', ...)`: its pickled state (BUILD) must be a plain uint8's."""

    __slots__ = ("ok",)

    def __init__(self):
        self.ok = False

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment,
        # flags[, metadata]); a uint8 has no subarray, no fields and no flags.
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[2] is None and state[3] is None and state[4] is None and state[7] == 0
                and (len(state) == 8 or state[8] is None)):
            raise _BadBatch(f"numpy dtype state {str(state)[:200]} is not a plain uint8's")
        self.ok = True


class _Array:
    """What `_reconstruct` returns: the array is built from its BUILD state, uint8 bytes only."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        # numpy's ndarray state: ([version,] shape, dtype, is_fortran, raw bytes).
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _BadBatch("numpy array state is not (shape, dtype, is_fortran, data)")
        shape, dtype, fortran, raw = state
        if not (isinstance(dtype, _Dtype) and dtype.ok):
            raise _BadBatch("numpy array without a uint8 dtype")
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise _BadBatch(f"numpy array shape {str(shape)[:80]} is not a tuple of sizes")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape):
            raise _BadBatch(f"numpy array data is not {math.prod(shape)} bytes for shape {shape}")
        self.array = np.frombuffer(raw, dtype=np.uint8).reshape(shape, order="F" if fortran else "C")


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what an official CIFAR batch holds and nothing else (see the module docstring).

    The globals a pickle may name resolve to bound methods and a slot-only object: a BUILD
    opcode on them cannot rebind what they do (on a plain function it could set __defaults__)."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the batches expect
        self.path = path
        self._ndarray = _NdarrayType()
        reconstruct, dtype = self._reconstruct, self._dtype
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # numpy 1 (and Python 2)
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy 2
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): dtype,
            ("_codecs", "encode"): self._latin1,  # bytes at protocol 2, written by Python 3
            ("__builtin__", "bytes"): self._empty_bytes,  # b'' at protocol 2 (Python 3)
            ("builtins", "bytes"): self._empty_bytes,
        }

    def find_class(self, module: str, name: str):
        # No fix_imports mapping here: every name the batches use is listed as written.
        found = self._allowed.get((module, name))
        if found is None:
            raise DataError(f"{self.path}: refused to unpickle global {module}.{name}: a CIFAR batch "
                            f"holds only dicts, lists, bytes, ints and uint8 numpy arrays, and no code "
                            f"from a data file is run")
        return found

    def persistent_load(self, pid):
        raise DataError(f"{self.path}: refused: the pickle asks for a persistent object, which a "
                        f"CIFAR batch never holds")

    def _reconstruct(self, subtype, shape=None, dtype=None):
        # numpy writes _reconstruct(ndarray, (0,), b'b'): an empty placeholder that BUILD fills.
        if subtype is not self._ndarray:
            raise _BadBatch("numpy _reconstruct of something other than numpy.ndarray")
        return _Array()

    def _dtype(self, spec, align=False, copy=False):
        name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
        if name not in ("u1", "|u1", "uint8"):
            raise _BadBatch(f"numpy dtype {str(spec)[:40]!r}: a CIFAR batch holds uint8 arrays only")
        return _Dtype()

    def _latin1(self, text, encoding="utf-8"):
        # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, 'latin1').
        if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
            raise _BadBatch(f"_codecs.encode(..., {str(encoding)[:20]!r}): bytes are pickled as latin1 text only")
        return text.encode("latin1")

    def _empty_bytes(self, *args):
        if args:
            raise _BadBatch("bytes() with arguments: only b'' is pickled that way")
        return b""

    def load(self):
        try:
            return _resolve(super().load())
        except _BadBatch as e:  # raised by a stand-in, in the middle of the pickle
            raise DataError(f"{self.path}: refused: {e}") from None


def _resolve(obj):
    """The unpickled value with each checked array in place of its stand-in."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise _BadBatch("numpy array without its data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    if isinstance(obj, (_Dtype, _NdarrayType)) or callable(obj):
        raise _BadBatch(f"unexpected {type(obj).__name__} in the batch")
    return obj


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataNotFoundError(f"CIFAR batch {path} not found")
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, path).load()
    except DataError:
        raise  # a refused global: its message already names the file and the global
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: not a readable CIFAR pickle batch ({e})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR batch (a pickled {type(d).__name__}, expected a dict)")
    return d


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d[key]


def _names(meta: dict, key: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, key)]


def _stack(root: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        data = np.asarray(_get(d, "data"), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{root / name}: data has shape {data.shape}, expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(_get(d, label_key), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: Path, split: str) -> ImageSet:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    x, y = _stack(root, files, "labels")
    classes = _names(_unpickle(root / "batches.meta"), "label_names")
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes)


def load_cifar100(root: Path, split: str) -> ImageSet:
    x, y = _stack(root, ["train" if split == "train" else "test"], "fine_labels")
    classes = _names(_unpickle(root / "meta"), "fine_label_names")
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes)
