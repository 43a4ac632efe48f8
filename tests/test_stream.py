"""Streaming pack of image-file sources: resize, ImageNet layouts, resume, Ray == serial."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dream_dist.data import load_dataset
from dream_dist.data.shards import PackedReader
from dream_dist.data import stream
from dream_dist.data.stream import imagefolder_source, imagenet_source, pack_files

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _folder(root: Path, classes=3, per_class=5, seed=0) -> Path:
    """An ImageFolder of mixed-size RGB JPEGs and PNGs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 60, 2))
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            img.save(root / f"k{c}" / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_mixed_sizes_resize_shorter_side_crop_or_square(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    wide = np.zeros((20, 60), np.uint8)
    wide[:, 20:40] = 255  # a white middle third
    Image.fromarray(wide).save(tmp_path / "src" / "a" / "wide.png")
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(tmp_path / "src" / "a" / "small.png")
    src = imagefolder_source(tmp_path / "src", "train")
    with pytest.raises(ValueError, match="pack.size"):
        pack_files(src, tmp_path / "none", "train", progress=False)  # mixed sizes need a size
    idx = pack_files(src, tmp_path / "crop", "train", size=16, progress=False)
    assert idx["image_size"] == 16 and idx["resize"] == {"size": 16, "mode": "shorter", "jpeg_draft": True} and idx["channels"] == 3
    crop = PackedReader(tmp_path / "crop", "train").load_class(0)
    assert crop.shape == (2, 3, 16, 16) and crop[1].float().mean() > 245  # the centre crop: the white third
    pack_files(src, tmp_path / "square", "train", size=16, resize="square", progress=False)
    square = PackedReader(tmp_path / "square", "train").load_class(0)
    assert 60 < square[1].float().mean() < 110  # stretched: a third white
    assert torch.equal(crop[0], torch.full((3, 16, 16), 7, dtype=torch.uint8))


def test_statistics_and_pixels_match_the_in_memory_loader(tmp_path):
    src = imagefolder_source(_folder(tmp_path / "src"), "train")
    idx = pack_files(src, tmp_path / "out", "train", size=24, max_per_shard=2, progress=False)
    ref = stream.decode_source(src, size=24)
    got = PackedReader(tmp_path / "out", "train").load_classes()
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    mean, std = ref.mean_std()
    assert np.allclose(idx["mean"], mean, atol=1e-6) and np.allclose(idx["std"], std, atol=1e-6)
    assert [len(v) for v in idx["shards"].values()] == [3, 3, 3]  # 5 images, 2 per shard


def test_an_interrupted_pack_resumes_and_keeps_finished_shards(tmp_path, monkeypatch):
    src = imagefolder_source(_folder(tmp_path / "src", classes=4), "train")
    whole = pack_files(src, tmp_path / "whole", "train", size=16, max_per_shard=2, progress=False)
    real = stream.pack_class
    calls = []

    def crash_on_class_2(files, c, *a, **k):
        calls.append(c)
        if c == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt  # the machine went away mid-pack
        return real(files, c, *a, **k)

    monkeypatch.setattr(stream, "pack_class", crash_on_class_2)
    with pytest.raises(KeyboardInterrupt):
        pack_files(src, tmp_path / "out", "train", size=16, max_per_shard=2, progress=False)
    journal = (tmp_path / "out" / "index-train.partial.jsonl").read_text().splitlines()
    assert [json.loads(line)["class"] for line in journal[1:]] == ["0", "1"]  # one line per finished class
    assert not (tmp_path / "out" / "index-train.json").exists()
    with open(tmp_path / "out" / "index-train.partial.jsonl", "a") as f:
        f.write('{"class": "2", "entry": {"shar')  # a crash in the middle of writing a line
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-c0000[01]-*.tar")}
    again = pack_files(src, tmp_path / "out", "train", size=16, max_per_shard=2, progress=False)
    assert calls == [0, 1, 2, 2, 3]  # classes 0 and 1 were not packed again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-c0000[01]-*.tar")} == kept
    assert again == whole and _tree_bytes(tmp_path / "out") == _tree_bytes(tmp_path / "whole")


def test_a_changed_class_alone_is_repacked(tmp_path, monkeypatch):
    """Per-class fingerprints: after one file of class 1 changes (and class 2 loses a file),
    a rerun repacks classes 1 and 2 only, and its output equals a fresh pack of the new files."""
    root = _folder(tmp_path / "src", classes=4, per_class=5)
    pack_files(imagefolder_source(root, "train"), tmp_path / "out", "train", size=16, max_per_shard=2,
               progress=False)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-c0000[03]-*.tar")}
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(root / "k1" / "0.png")
    (root / "k2" / "4.png").unlink()  # 5 -> 4 images: 2 shards instead of 3
    real, calls = stream.pack_class, []

    def counting(files, c, *a, **k):
        calls.append(c)
        return real(files, c, *a, **k)

    monkeypatch.setattr(stream, "pack_class", counting)
    src = imagefolder_source(root, "train")
    again = pack_files(src, tmp_path / "out", "train", size=16, max_per_shard=2, progress=False)
    assert calls == [1, 2]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-c0000[03]-*.tar")} == kept
    assert not (tmp_path / "out" / "train-c00002-00002.tar").exists()  # the stale third shard is gone
    monkeypatch.setattr(stream, "pack_class", real)
    fresh = pack_files(src, tmp_path / "fresh", "train", size=16, max_per_shard=2, progress=False)
    assert again == fresh and again["counts"] == [5, 5, 4, 5]
    assert _tree_bytes(tmp_path / "out") == _tree_bytes(tmp_path / "fresh")


def test_ray_pack_workers_write_the_serial_bytes(tmp_path, local_ray):
    from dream_dist.distributed.tasks import ray_mapper

    src = imagefolder_source(_folder(tmp_path / "src", classes=5, per_class=4), "train")
    serial = pack_files(src, tmp_path / "serial", "train", size=16, max_per_shard=3, progress=False)
    parallel = pack_files(src, tmp_path / "parallel", "train", size=16, max_per_shard=3,
                          mapper=ray_mapper(2), progress=False)
    assert parallel == serial
    assert _tree_bytes(tmp_path / "parallel") == _tree_bytes(tmp_path / "serial")


def _imagenet(root: Path, val: str) -> Path:
    """A 3-class ImageNet layout: train/<wnid>/*.JPEG, LOC_synset_mapping.txt, and a val
    split flat + labelled (csv or devkit) or in per-wnid folders."""
    root.mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    for i, w in enumerate(WNIDS):
        (root / "train" / w).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * i + k, np.uint8)).save(root / "train" / w / f"{w}_{k}.JPEG")
    labels = [2, 0, 1, 2]  # class of val image j
    (root / "val").mkdir()
    for j, c in enumerate(labels):
        img = Image.fromarray(np.full((24, 24, 3), 60 * c + 1, np.uint8))
        if val == "folders":
            (root / "val" / WNIDS[c]).mkdir(exist_ok=True)
            img.save(root / "val" / WNIDS[c] / f"ILSVRC2012_val_{j + 1:08d}.JPEG")
        else:
            img.save(root / "val" / f"ILSVRC2012_val_{j + 1:08d}.JPEG")
    if val == "csv":
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_{j + 1:08d},{WNIDS[c]} 1 2 3 4\n" for j, c in enumerate(labels)))
    elif val == "devkit":
        from scipy.io import savemat

        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        ilsvrc_id = {WNIDS[0]: 3, WNIDS[1]: 1, WNIDS[2]: 2}  # the devkit's own numbering, not ours
        synsets = np.array([(i, w) for w, i in ilsvrc_id.items()], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        savemat(str(data / "meta.mat"), {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ilsvrc_id[WNIDS[c]]}\n" for c in labels))
    return root


@pytest.mark.parametrize("val", ["csv", "devkit", "folders"])
def test_imagenet_val_labels(tmp_path, val):
    root = _imagenet(tmp_path / "imagenet", val)
    src = imagenet_source(root, "val")
    assert src.classes == WNIDS
    assert [[p.stem for p in f] for f in src.files] == [["ILSVRC2012_val_00000002"], ["ILSVRC2012_val_00000003"],
                                                         ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000004"]]
    test = load_dataset("imagenet", "test", root=root, size=16)
    assert test.labels.tolist() == [0, 1, 2, 2] and test.images[0].float().mean() == 1  # class 0 is 60*0+1
    train = imagenet_source(root, "train")
    assert [len(f) for f in train.files] == [2, 2, 2]


def test_imagenet_flat_val_without_labels_is_refused(tmp_path):
    root = _imagenet(tmp_path / "imagenet", "none")
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        imagenet_source(root, "val")


def test_pack_task_on_imagenet_layout(tmp_path):
    from dream_dist.run import main

    root = _imagenet(tmp_path / "imagenet", "csv")
    main(["task=pack", "dataset=imagenet", f"dataset.root={root}", f"pack.out={tmp_path}/packed", "pack.size=16",
          "progress=false"])
    tr, te = PackedReader(tmp_path / "packed", "train"), PackedReader(tmp_path / "packed", "test")
    assert tr.index["counts"] == [2, 2, 2] and te.index["counts"] == [1, 1, 2]
    assert te.index["mean"] == tr.index["mean"]  # the test split records the train statistics
    assert tr.index["resize"] == {"size": 16, "mode": "shorter", "jpeg_draft": True}


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale(tmp_path):
    """A 500 x 375 JPEG (ImageNet's usual size) to 64 px: the draft decode reads a reduced DCT
    scale (pixels close to, not equal to, a full decode); a PNG decodes the same either way;
    and a pack records the choice, so changing pack.jpeg_draft repacks."""
    from dream_dist.data.folder import decode_image
    from dream_dist.run import main

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    img = np.stack([(xx * 255 // 500), (yy * 255 // 375), np.full_like(xx, 90)], -1).astype(np.uint8)
    img[150:230, 200:300] = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "src" / "a" / "big.jpg", quality=90)
    Image.fromarray(img).save(tmp_path / "src" / "a" / "big.png")
    with Image.open(tmp_path / "src" / "a" / "big.jpg") as im:
        im.draft("RGB", (64, 64))
        assert im.size == (125, 94)  # 1/4 scale: the largest reduction that keeps both sides >= 64
    jd, jf = (decode_image(tmp_path / "src" / "a" / "big.jpg", size=64, resize="shorter", jpeg_draft=d) for d in (1, 0))
    pd, pf = (decode_image(tmp_path / "src" / "a" / "big.png", size=64, resize="shorter", jpeg_draft=d) for d in (1, 0))
    assert jd.shape == jf.shape == (3, 64, 64) and np.array_equal(pd, pf)
    diff = np.abs(jd.astype(int) - jf.astype(int))
    assert diff.max() > 0 and diff.mean() < 6  # a different, close picture
    assert np.abs(jf.astype(int) - pf.astype(int)).mean() < 6  # the full decode matches the PNG's

    args = ["task=pack", "dataset=imagefolder", f"dataset.root={tmp_path / 'src'}", f"pack.out={tmp_path}/p",
            "pack.size=64", "progress=false"]
    main(args)
    first = PackedReader(tmp_path / "p", "train").load_class(0)
    main([*args, "pack.jpeg_draft=false"])
    full = PackedReader(tmp_path / "p", "train")
    assert full.index["resize"]["jpeg_draft"] is False
    got = full.load_class(0)
    order = sorted(p.name for p in (tmp_path / "src" / "a").iterdir())  # big.jpg, big.png
    j = order.index("big.jpg")
    assert torch.equal(got[j], torch.from_numpy(jf.copy())) and torch.equal(first[j], torch.from_numpy(jd.copy()))
