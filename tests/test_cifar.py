"""No pickle runs from a CIFAR batch (issue 21, item 4): the official layout still reads, a
crafted data_batch_1 is refused with its file and global named, and its payload never runs,
through load_dataset and through the command line."""
from __future__ import annotations

import os
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dream_dist.data import load_dataset
from dream_dist.data.cifar import CifarUnpickler
from dream_dist.errors import DataError

NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are Python 2 protocol-2 pickles


def _batch(rng, name: str, n: int = 3) -> dict:
    """A batch laid out as the official ones: bytes keys, (N, 3072) uint8, Python int labels."""
    return {b"batch_label": f"{name} of 5".encode(), b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}


def _cifar10(root: Path) -> list[dict]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = [_batch(rng, name) for name in BATCHES]
    for name, b in zip(BATCHES, batches):
        _dump(b, root / name)
    _dump({b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072},
          root / "batches.meta")
    return batches


def _globals(data: bytes) -> set[str]:
    """The module.name of every global a protocol-2 pickle names."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


class _Payload:
    """Unpickling this calls `fn(*args)`: the marker file appears iff the pickle ran."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker: Path):
    return {"os.system": _Payload(os.system, (f"touch {marker}",)),
            "open": _Payload(open, (str(marker), "w"))}


def test_official_style_batch_names_only_numpy_array_globals():
    """What a protocol-2 batch needs: numpy's array reconstruction, plus _codecs.encode for
    bytes written by Python 3 (Python 2 wrote them as opcodes)."""
    data = pickle.dumps(_batch(np.random.default_rng(0), "data_batch_1"), protocol=2)
    rebuild = np.zeros(1, np.uint8).__reduce__()[0]  # numpy.core (1.x) or numpy._core (2.x)
    assert _globals(data) == {f"{rebuild.__module__}._reconstruct", "numpy.ndarray", "numpy.dtype", "_codecs.encode"}


def test_reads_the_official_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = _cifar10(root)
    train = load_dataset("cifar10", "train", root=root)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == NAMES
    assert train.labels.tolist() == [v for b in batches[:5] for v in b[b"labels"]]
    # CHW order: the first 1024 bytes of a row are the red plane of that image.
    assert torch.equal(train.images[0, 0].flatten(), torch.from_numpy(batches[0][b"data"][0, :1024]))
    rows = np.concatenate([b[b"data"] for b in batches[:5]])
    assert torch.equal(train.images.reshape(15, -1), torch.from_numpy(rows))
    test = load_dataset("cifar10", "test", root=root)
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(batches[5][b"data"]))
    assert test.labels.tolist() == batches[5][b"labels"]


@pytest.mark.parametrize("kind", ["os.system", "open"])
def test_crafted_batch_is_refused_and_its_payload_never_runs(tmp_path, kind):
    root = tmp_path / "cifar-10-batches-py"
    _cifar10(root)
    marker = tmp_path / "pwned"
    batch = _batch(np.random.default_rng(1), "data_batch_1")
    batch[b"labels"] = [_payloads(marker)[kind], *batch[b"labels"][1:]]
    _dump(batch, root / "data_batch_1")
    refused = _globals((root / "data_batch_1").read_bytes()) - _globals((root / "test_batch").read_bytes())
    assert len(refused) == 1, refused  # posix.system or io.open, as this Python writes it
    with pytest.raises(DataError, match=rf"data_batch_1: refused to unpickle global {re.escape(refused.pop())}:"):
        load_dataset("cifar10", "train", root=root)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """The same crafted batch does create the file under plain pickle: the test above checks
    something."""
    marker = tmp_path / "pwned"
    data = pickle.dumps({b"labels": [_payloads(marker)["open"]]}, protocol=2)
    pickle.loads(data)[b"labels"][0].close()
    assert marker.exists()


class _Reduce:
    """Pickles as `fn(*args)` with BUILD `state`: writes the pickles numpy would never write."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _flagged_uint8() -> _Reduce:
    """A uint8 array whose dtype state sets numpy's 'holds objects' flags: numpy's own unpickler
    accepts it (and its internals then fail); no CIFAR batch has it."""
    rebuild = np.zeros(1, np.uint8).__reduce__()[0]
    dtype = _Reduce(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63))
    return _Reduce(rebuild, (np.ndarray, (0,), b"b"), (1, (4,), dtype, False, [1, 2, 3, 4]))


@pytest.mark.parametrize("data,words", [
    (np.array([b"x", 1], dtype=object), "dtype 'O"),
    (np.zeros((2, 3072), np.int64), "dtype 'i8'"),
    (np.zeros(2, [("a", "u1")]), "dtype 'V1'"),
    (_flagged_uint8(), "not a plain uint8"),
    ([np.int64(3)], "global numpy"),  # a numpy scalar: the real batches hold Python ints
], ids=["object", "int64", "structured", "flagged uint8", "numpy scalar"])
def test_non_uint8_arrays_are_refused(tmp_path, data, words):
    path = tmp_path / "data_batch_1"
    _dump({b"data": data, b"labels": [0, 1]}, path)
    with pytest.raises(DataError, match="data_batch_1") as e:
        with open(path, "rb") as f:
            CifarUnpickler(f, path).load()
    assert words in str(e.value)


def test_truncated_and_missing_batches_keep_their_errors(tmp_path):
    from dream_dist.errors import DataNotFoundError

    root = tmp_path / "c"
    _cifar10(root)
    whole = (root / "data_batch_2").read_bytes()
    (root / "data_batch_2").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR pickle batch"):
        load_dataset("cifar10", "train", root=root)
    (root / "data_batch_2").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_2 not found"):
        load_dataset("cifar10", "train", root=root)


def test_the_cli_exits_2_and_the_payload_never_runs(tmp_path, capsys, monkeypatch):
    """`dream-dist dataset=cifar10 dataset.root=DIR` with a planted DIR/data_batch_1."""
    from dream_dist.run import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = tmp_path / "cifar-10-batches-py"
    _cifar10(root)
    marker = tmp_path / "pwned"
    _dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_payloads(marker)["os.system"]]},
          root / "data_batch_1")
    with pytest.raises(SystemExit) as exc:
        cli(["dataset=cifar10", f"dataset.root={root}", f"out_dir={tmp_path}/run", f"pack.out={tmp_path}/packed",
             "progress=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dream-dist: error: "), err
    assert "data_batch_1: refused to unpickle global" in err[0] and "system" in err[0], err[0]
    assert not marker.exists() and not (tmp_path / "packed" / "index-train.json").exists()
