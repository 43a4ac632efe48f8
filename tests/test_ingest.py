"""dataset=webdataset: shuffled WebDataset shards ingested into class-grouped shards.

On a slice of the TinyImageNet subset, written as shuffled tars with keys = file stems: the
ingest writes the same bytes as the folder pack of the same images, for any shuffle, any shard
count and any number of workers; bad input names the shard and the key, keeps what was done,
and a rerun does only the rest."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from dream_dist.data import ingest
from dream_dist.data.folder import tinyimagenet_source
from dream_dist.data.shards import PackedReader
from dream_dist.data.stream import pack_files
from dream_dist.errors import DataError, DataNotFoundError
from wds_helpers import tiny_slice, write_wds

SETTINGS = ingest.settings_of("auto", "cls", None, "shorter", True)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    """(slice root, train FileSource, folder-packed directory)."""
    tmp = tmp_path_factory.mktemp("tiny")
    root = tiny_slice(tiny_dir, tmp / "slice")
    src = tinyimagenet_source(root, "train")
    pack_files(src, tmp / "folder", "train", progress=False)
    return root, src, tmp / "folder"


def shard_bytes(packed: Path) -> dict[str, bytes]:
    index = json.loads((packed / "index-train.json").read_text())
    return {e["file"]: (packed / e["file"]).read_bytes() for v in index["shards"].values() for e in v}


def test_ingest_writes_the_folder_packs_bytes(tiny, tmp_path):
    root, src, folder = tiny
    urls = [str(p) for p in write_wds(src, tmp_path / "wds", "train", shards=3, seed=0)]
    index = ingest.ingest(urls, str(tmp_path / "out"), "train", SETTINGS, class_names=src.classes, progress=False)
    ref = json.loads((folder / "index-train.json").read_text())
    assert index["counts"] == ref["counts"] == [24] * 4
    assert index["mean"] == ref["mean"] and index["std"] == ref["std"]  # the same float64 sums, same order
    assert index["classes"] == ref["classes"] == src.classes
    assert shard_bytes(tmp_path / "out") == shard_bytes(folder)
    a, b = PackedReader(folder).load_classes(), PackedReader(tmp_path / "out").load_classes()
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    report = json.loads((tmp_path / "out" / "ingest-train.json").read_text())
    assert report["input_shards"] == 3 and report["samples"] == 96 and report["peak_rss_mb_driver"] > 0
    assert not list((tmp_path / "out" / "_ingest" / "train").iterdir())  # runs removed once indexed


def test_output_does_not_depend_on_shuffle_shard_count_or_workers(tiny, tmp_path, local_ray):
    from dream_dist.distributed.tasks import ray_mapper

    root, src, folder = tiny
    urls = [str(p) for p in write_wds(src, tmp_path / "wds", "train", shards=5, seed=7)]
    ingest.ingest(urls, str(tmp_path / "out"), "train", SETTINGS, class_names=src.classes, mapper=ray_mapper(2),
                  progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(folder)


def test_json_labels_by_class_name_and_a_class_names_file(tiny, tmp_path):
    root, src, folder = tiny
    urls = [str(p) for p in write_wds(src, tmp_path / "wds", "train", shards=2, label="json")]
    names = ingest.read_class_names(str(root / "wnids.txt"))
    ingest.ingest(urls, str(tmp_path / "out"), "train", ingest.settings_of("jpeg", "json:label", None, "shorter", True),
                  class_names=names, progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(folder)


def test_brace_patterns_lists_and_directories_expand_alike(tmp_path):
    for k in range(3):
        (tmp_path / f"s-{k:02d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    want = [str(tmp_path / f"s-{k:02d}.tar") for k in range(3)]
    assert ingest.expand_urls(str(tmp_path / "s-{00..02}.tar")) == want
    assert ingest.expand_urls(str(tmp_path)) == want
    assert ingest.expand_urls([str(tmp_path / "s-00.tar"), str(tmp_path / "s-{01..02}.tar")]) == want
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no .tar files"):
        ingest.expand_urls(str(tmp_path / "empty"))


def _tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)
    return str(path)


@pytest.fixture
def good_and_bad(tiny, tmp_path):
    """Two good shards of the slice, and a factory for a third shard with one bad sample."""
    root, src, folder = tiny
    urls = [str(p) for p in write_wds(src, tmp_path / "wds", "train", shards=2)]
    jpeg = src.files[0][0].read_bytes()

    def third(kind: str) -> str:
        members = {
            "no_image": [("zz_a.txt", b"hello"), ("zz_a.cls", b"1")],
            "no_label": [("zz_a.jpeg", jpeg)],
            "outside": [("zz_a.jpeg", jpeg), ("zz_a.cls", b"7")],
            "undecodable": [("zz_a.jpeg", b"\xff\xd8 not a jpeg"), ("zz_a.cls", b"1")],
            "truncated": [("zz_0.jpeg", jpeg), ("zz_0.cls", b"1"), ("zz_a.jpeg", jpeg * 3), ("zz_a.cls", b"1")],
        }[kind]
        return _tar(tmp_path / "wds" / f"bad-{kind}.tar", members, cut=len(jpeg) + 3000 if kind == "truncated" else None)

    return src, urls, third


@pytest.mark.parametrize("kind, message", [
    ("no_image", "sample zz_a: no image"),
    ("no_label", "sample zz_a: no label"),
    ("outside", "sample zz_a: label 7 is outside the 4 classes"),
    ("undecodable", "sample zz_a: .jpeg does not decode"),
    ("truncated", "truncated or corrupt tar after sample zz_0"),
])
def test_bad_input_is_one_line_naming_shard_and_key(good_and_bad, tmp_path, kind, message):
    src, urls, third = good_and_bad
    bad = third(kind)
    with pytest.raises(DataError) as e:
        ingest.ingest([*urls, bad], str(tmp_path / "out"), "train", SETTINGS, class_names=src.classes, progress=False)
    assert bad in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_nothing_done_is_lost_and_the_rerun_does_only_the_rest(good_and_bad, tmp_path):
    src, urls, third = good_and_bad
    bad = third("undecodable")
    out = str(tmp_path / "out")
    with pytest.raises(DataError):
        ingest.ingest([*urls, bad], out, "train", SETTINGS, class_names=src.classes, progress=False)
    runs = tmp_path / "out" / "_ingest" / "train"
    assert sorted(p.name for p in runs.glob("*.json")) == ["run-000000.json", "run-000001.json"]
    Path(bad).unlink()  # the user removes (or fixes) the bad shard
    ingest.ingest(urls, out, "train", SETTINGS, class_names=src.classes, progress=False)
    assert json.loads((tmp_path / "out" / "ingest-train.json").read_text())["reused_shards"] == 2


def test_on_corrupt_skip_counts_and_logs(good_and_bad, tmp_path, caplog):
    src, urls, third = good_and_bad
    bads = [third(k) for k in ("no_image", "undecodable", "truncated")]
    with caplog.at_level(logging.WARNING):
        index = ingest.ingest([*urls, *bads], str(tmp_path / "out"), "train", SETTINGS, on_corrupt="skip",
                              class_names=src.classes, progress=False)
    assert sum(index["counts"]) == 96 + 1  # the good samples, and zz_0 before the truncation
    assert len(index["skipped"]) == 3 and any("zz_a" in s for s in index["skipped"])
    assert "skipped 3 bad sample(s)" in caplog.text


def test_task_pack_dataset_webdataset_from_the_command_line(tiny, tmp_path):
    from dream_dist.run import main

    root, src, folder = tiny
    write_wds(src, tmp_path / "train", "train", shards=3)
    write_wds(tinyimagenet_source(root, "val"), tmp_path / "val", "val", shards=2)
    args = ["task=pack", "dataset=webdataset", "progress=false", f"dataset.urls={tmp_path}/train",
            f"dataset.test_urls='{tmp_path}/val/val-{{0000..0001}}.tar'", f"dataset.class_names={root}/wnids.txt",
            f"pack.out={tmp_path}/packed", f"out_dir={tmp_path}/run"]
    main(args)
    assert shard_bytes(tmp_path / "packed") == shard_bytes(folder)
    test = json.loads((tmp_path / "packed" / "index-test.json").read_text())
    assert test["counts"] == [6] * 4 and test["mean"] == json.loads((folder / "index-train.json").read_text())["mean"]
    stamp = (tmp_path / "packed" / "index-train.json").stat().st_mtime_ns
    main(args)  # up to date: nothing ingested again
    assert (tmp_path / "packed" / "index-train.json").stat().st_mtime_ns == stamp
