"""Data sources, packing and the class-wise shard reader, on the real shared datasets."""
from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from dream_dist.data import load_dataset
from dream_dist.data.idx import IDXError, read_idx
from dream_dist.data.shards import ClassCache, PackedReader, ShardError, pack
from dream_dist.errors import ConfigError


def test_digits_split_is_fixed_and_disjoint(digits):
    train, test = digits
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    # Seeded split: a second load gives the very same pixels.
    again = load_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # Stratified: every class is in both splits.
    assert min(test.counts()) >= 35 and min(train.counts()) >= 139


def test_mnist_reads_the_original_files(mnist_dir):
    train = load_dataset("mnist", "train", root=mnist_dir)
    test = load_dataset("mnist", "test", root=mnist_dir)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    # Known facts of the original MNIST: first training label is 5, class 1 has 6742 images.
    assert int(train.labels[0]) == 5 and train.counts()[1] == 6742


def test_fashion_mnist_has_named_balanced_classes(fashion_dir):
    train = load_dataset("fashion_mnist", "train", root=fashion_dir)
    assert train.counts() == [6000] * 10 and train.classes[9] == "Ankle boot"


def test_unknown_dataset_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnits'.*mnist"):
        load_dataset("mnits")


def test_malformed_idx_header_is_named(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 2049, 2, 28, 28) + bytes(2 * 784))  # label magic on images
    with pytest.raises(IDXError, match="bad IDX magic number 2049.*expected 2051"):
        read_idx(bad, 2051)
    short = tmp_path / "short-idx3-ubyte.gz"
    with gzip.open(short, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 5, 28, 28) + bytes(3 * 784))
    with pytest.raises(IDXError, match="short-idx3-ubyte.*header says"):
        read_idx(short, 2051)


def test_cifar_pickle_reader(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()  # Python ints, as in the real batches
        batches.append((data, labels))
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    train = load_dataset("cifar10", "train", root=root)
    assert train.images.shape == (20, 3, 32, 32) and train.classes[0] == "airplane"
    # CHW order: the first 1024 bytes are the red plane of image 0.
    assert torch.equal(train.images[0, 0].flatten(), torch.from_numpy(batches[0][0][0, :1024]))
    assert train.labels.tolist() == [int(v) for _, ls in batches[:5] for v in ls]
    test = load_dataset("cifar10", "test", root=root)
    assert torch.equal(test.images.reshape(4, -1), torch.from_numpy(batches[5][0]))


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "c100"
    root.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for split in ("train", "test"):
        with open(root / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [99, 3], b"coarse_labels": [1, 2]}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    s = load_dataset("cifar100", "train", root=root)
    assert s.labels.tolist() == [99, 3] and s.num_classes == 100


def test_imagefolder_reads_classes_sorted_and_converts_gray(tmp_path):
    from PIL import Image

    for cls, color in (("b_cat", 200), ("a_dog", 50)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("L", (16, 16), color).save(tmp_path / "train" / cls / "x.png")
    s = load_dataset("imagefolder", "train", root=tmp_path)
    assert s.classes == ["a_dog", "b_cat"] and s.images.shape == (2, 3, 16, 16)
    assert int(s.images[0, 1, 0, 0]) == 50 and int(s.images[1, 2, 5, 5]) == 200


def test_an_eps_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    """PIL opens a file by its content: EPS in x.png would be rendered by Ghostscript (a
    program from the data directory). decode_image opens the listed raster formats only."""
    from PIL import EpsImagePlugin, Image

    from dream_dist.data.folder import decode_image
    from dream_dist.errors import DataError

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or Image.new("RGB", (4, 4)))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True, raising=False)
    (tmp_path / "train" / "a").mkdir(parents=True)
    eps = tmp_path / "train" / "a" / "x.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\nshowpage\n%%EOF\n")
    with Image.open(eps) as im:  # what PIL does unrestricted
        assert im.format == "EPS"
    with pytest.raises(DataError, match=r"x\.png: cannot decode image"):
        decode_image(eps)
    with pytest.raises(DataError, match=r"x\.png: cannot decode image"):
        load_dataset("imagefolder", "train", root=tmp_path)
    assert ran == []


def test_tinyimagenet_layout(tiny_dir):
    val = load_dataset("tinyimagenet", "val", root=tiny_dir)
    wnids = (tiny_dir / "wnids.txt").read_text().split()
    assert val.classes == wnids and val.images.shape == (10000, 3, 64, 64)
    assert val.counts() == [50] * 200
    # The label of a val image comes from val_annotations.txt; images are loaded class by class.
    from dream_dist.data.folder import tinyimagenet_source

    first = (tiny_dir / "val" / "val_annotations.txt").read_text().splitlines()[0].split("\t")
    src = tinyimagenet_source(tiny_dir, "val")
    c = next(c for c, files in enumerate(src.files) if any(p.name == first[0] for p in files))
    assert src.classes[c] == first[1]
    assert val.labels.tolist() == [k for k, files in enumerate(src.files) for _ in files]


def _packed_mnist(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("packed_mnist")
    train = load_dataset("mnist", "train", root=mnist_dir)
    # Small shards so that a class spans several and truncation tests have something to cut.
    sub = train.subset(torch.arange(6000))
    pack(sub, out, "train", source="mnist", max_per_shard=250, progress=False)
    return out, sub


@pytest.fixture(scope="module")
def packed_mnist(tmp_path_factory, mnist_dir):
    return _packed_mnist(tmp_path_factory, mnist_dir)


def test_pack_mnist_roundtrip_classes_0_and_7(packed_mnist):
    out, src = packed_mnist
    reader = PackedReader(out, "train")
    got = reader.load_classes([0, 7])
    want_idx = torch.cat([torch.nonzero(src.labels == 0)[:, 0], torch.nonzero(src.labels == 7)[:, 0]])
    assert torch.equal(got.images, src.images[want_idx])
    assert torch.equal(got.labels, src.labels[want_idx])
    # Only the shards of classes 0 and 7 were opened.
    opened = {p.split("/")[-1].split("-")[1] for p in reader.opened}
    assert opened == {"c00000", "c00007"}
    idx = json.loads((out / "index-train.json").read_text())
    assert idx["counts"] == src.counts() and idx["image_size"] == 28 and idx["channels"] == 1
    assert abs(idx["mean"][0] - src.images.float().mean().item() / 255) < 1e-4
    assert len(idx["source_checksum"]) == 64 and idx["split"] == "train"


def test_pack_tinyimagenet_roundtrip_classes_3_and_150(tmp_path, tiny_dir):
    val = load_dataset("tinyimagenet", "val", root=tiny_dir)
    pack(val, tmp_path, "test", source="tinyimagenet", progress=False)
    got = load_dataset("packed", "test", root=tmp_path, classes=[3, 150])
    want = torch.cat([val.of_class(3), val.of_class(150)])
    assert torch.equal(got.images, want)
    assert got.labels.tolist() == [3] * 50 + [150] * 50
    assert got.classes == val.classes


def test_npy_encoding_roundtrip(tmp_path, digits):
    train, _ = digits
    pack(train, tmp_path, "train", source="digits", encoding="npy", progress=False)
    assert torch.equal(load_dataset("packed", "train", root=tmp_path).images[: train.counts()[0]],
                       train.of_class(0))


def test_truncated_shard_names_the_file(packed_mnist, tmp_path):
    import shutil

    out, _ = packed_mnist
    copy = tmp_path / "p"
    shutil.copytree(out, copy)
    reader = PackedReader(copy, "train")
    shard = reader.shard_files([7])[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=shard.name):
        reader.load_class(7)
    # Same truncation, with the index edited to agree on the size: the tar parser or the
    # count check must still catch it, naming the shard and the last good sample key.
    idx = json.loads((copy / "index-train.json").read_text())
    for e in idx["shards"]["7"]:
        if e["file"] == shard.name:
            e["bytes"] = len(data) // 2
    (copy / "index-train.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match=rf"{shard.name}.*(sample c00007_|after)"):
        PackedReader(copy, "train").load_class(7)


def test_index_naming_a_missing_shard(packed_mnist, tmp_path):
    import shutil

    out, _ = packed_mnist
    copy = tmp_path / "p"
    shutil.copytree(out, copy)
    reader = PackedReader(copy, "train")
    victim = reader.shard_files([3])[0]
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name}.*missing"):
        reader.load_class(3)
    # Other classes are unaffected: a worker that does not own class 3 never notices.
    assert len(reader.load_class(4)) > 0


def test_index_counts_must_match(packed_mnist, tmp_path):
    import shutil

    out, _ = packed_mnist
    copy = tmp_path / "p"
    shutil.copytree(out, copy)
    idx = json.loads((copy / "index-train.json").read_text())
    idx["shards"]["2"][0]["count"] += 1
    idx["counts"][2] += 1
    (copy / "index-train.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="index says"):
        PackedReader(copy, "train").load_class(2)


def test_class_cache_respects_budget_and_streams_again(packed_mnist):
    out, src = packed_mnist
    reader = PackedReader(out, "train")
    one_class = src.counts()[0] * 28 * 28
    cache = ClassCache(reader, budget_bytes=int(one_class * 1.5))
    a = cache.get(0)
    assert cache.get(0) is a and cache.reads == 1  # resident
    assert torch.equal(cache.get(1), src.of_class(1)) and cache.reads == 2  # does not fit: read, not kept
    cache.get(1)
    assert cache.reads == 3 and cache.get(0) is a and cache.used <= cache.budget  # class 0 never evicted
    assert cache.resident(0) and not cache.resident(1)
    lru = ClassCache(reader, budget_bytes=int(one_class * 1.5), policy="lru")
    a = lru.get(0)
    lru.get(1)  # evicts class 0 (the budget fits ~1 class)
    b = lru.get(0)
    assert lru.reads == 3 and torch.equal(a, b) and lru.used <= lru.budget  # read again, same pixels
    tiny = ClassCache(reader, budget_bytes=10)  # nothing fits: always streams, never fails
    assert torch.equal(tiny.get(5), src.of_class(5)) and tiny.used == 0
    with pytest.raises(ConfigError, match="cache_policy"):
        ClassCache(reader, 10, policy="fifo")


def test_pack_cifar_imagefolder_and_repack_of_packed(tmp_path):
    """pack accepts every source: CIFAR pickles, an ImageFolder, and packed shards themselves."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b", b"c"]}, f)
    folder = tmp_path / "folder"
    for c in ("x", "y"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    for name, src_root in (("cifar10", root), ("imagefolder", folder)):
        src = load_dataset(name, "train", root=src_root)
        pack(src, tmp_path / f"p_{name}", "train", source=name, progress=False)
        again = load_dataset("packed", "train", root=tmp_path / f"p_{name}")
        order = torch.argsort(src.labels, stable=True)  # packed data comes back class-major
        assert torch.equal(again.images, src.images[order]) and torch.equal(again.labels, src.labels[order])
        # Re-packing packed data (the WebDataset source) is lossless too.
        pack(again, tmp_path / f"pp_{name}", "train", source="packed", progress=False)
        assert torch.equal(load_dataset("packed", "train", root=tmp_path / f"pp_{name}").images, again.images)


def _zero_sample_payload(shard, member_index: int) -> str:
    """Overwrite one sample's image bytes with zeros in place (same file size, valid tar)."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".png")]
    m = members[member_index]
    with open(shard, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\0" * m.size)
    return m.name.rsplit(".", 1)[0]


def test_on_corrupt_skip_leaves_a_bad_sample_out_and_logs_it(tmp_path, digits, caplog):
    train, _ = digits
    pack(train, tmp_path, "train", source="digits", progress=False)
    reader = PackedReader(tmp_path, "train")
    shard = tmp_path / reader.index["shards"]["3"][0]["file"]
    whole = reader.load_class(3)
    key = _zero_sample_payload(shard, 5)

    with pytest.raises(ShardError, match=f"sample {key} cannot be decoded"):
        PackedReader(tmp_path, "train").load_class(3)  # the default stays "error"
    with caplog.at_level("WARNING"):
        skip = PackedReader(tmp_path, "train", on_corrupt="skip")
    assert skip.skipped == [f"{shard.name}:{key}"]
    assert "skipped 1 corrupt sample" in caplog.text and key in caplog.text
    assert skip.index["counts"][3] == reader.index["counts"][3] - 1  # every consumer sees the readable count
    got = skip.load_class(3)
    assert torch.equal(got, torch.cat([whole[:5], whole[6:]]))
    assert torch.equal(skip.load_class(4), reader.load_class(4))


def test_on_corrupt_skip_for_an_image_folder(tmp_path, caplog):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="1.png: cannot decode"):
        load_dataset("imagefolder", "train", root=tmp_path)
    with caplog.at_level("WARNING"):
        ds = load_dataset("imagefolder", "train", root=tmp_path, on_corrupt="skip")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and "skipped 1 corrupt image" in caplog.text
    assert ds.images[4].float().mean() == 80  # b/2.png, after b/0.png: b/1.png is left out


def test_per_sample_reads_return_the_whole_class_pixels(tmp_path, digits):
    train, _ = digits
    pack(train, tmp_path, "train", source="digits", max_per_shard=50, progress=False)
    reader = PackedReader(tmp_path, "train")
    whole = reader.load_class(5)
    idx = torch.tensor([0, 49, 50, 51, len(whole) - 1, 7, 7])  # across shard boundaries, repeats
    fresh = PackedReader(tmp_path, "train")
    assert torch.equal(fresh.read_samples(5, idx), whole[idx])
    per_image = reader.index["shards"]["5"][0]["offsets"][0][1]
    assert fresh.bytes_read < 10 * per_image * 2  # only those samples' bytes, not the class
    cache = ClassCache(fresh, budget_bytes=1000)  # smaller than one class: never cached
    assert torch.equal(cache.take(5, idx), whole[idx]) and cache.used == 0 and cache.reads == 0


def test_an_index_naming_a_command_or_a_path_out_of_the_root_is_refused(tmp_path, digits):
    """webdataset opens "pipe:<cmd>" shard names by running them; an index is a data file."""
    train, _ = digits
    pack(train, tmp_path, "train", source="digits", progress=False)
    marker = tmp_path / "PWNED"
    for bad in (f"pipe:touch {marker}", "../elsewhere.tar", "/etc/passwd"):
        idx = json.loads((tmp_path / "index-train.json").read_text())
        idx["shards"]["0"][0]["file"] = bad
        (tmp_path / "index-train.json").write_text(json.dumps(idx))
        with pytest.raises(ShardError, match="not a bare .tar file name"):
            PackedReader(tmp_path, "train").load_class(0)
    assert not marker.exists()


def test_a_shard_payload_that_is_not_png_is_refused(tmp_path):
    """PIL picks a decoder by content: an EPS payload would reach Ghostscript."""
    from dream_dist.data.shards import _decode

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(Exception, match="cannot identify image file"):
        _decode(eps, "png", 3)
