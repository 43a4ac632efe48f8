"""Object storage end to end, against a real S3-compatible server on 127.0.0.1 (moto).

- errors: missing credentials, bucket or key end in one line naming the URL;
- pack.out=s3://..., and a reader that fetches only its own classes' shards, within a bound;
- the source does not change the result: a TinyImageNet slice distilled from the folder, from
  its shuffled WebDataset ingested, and from its packed shards served by S3 gives torch.equal
  sets, in process and on 2 Ray workers (those with out_dir and checkpoints on S3).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from dream_dist.data import storage
from dream_dist.data.folder import tinyimagenet_source
from dream_dist.data.shards import PackedReader
from dream_dist.data.storage import StorageError
from dream_dist.errors import DataNotFoundError
from dream_dist.run import main
from wds_helpers import tiny_slice, write_wds

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def test_missing_bucket_key_and_credentials_are_one_line_naming_the_url(s3_server, tmp_path, monkeypatch):
    url = s3_server()
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-x: bucket 'no-such-bucket-x' does not exist$"):
        main(["task=distill", f"dataset.packed=s3://no-such-bucket-x/packed", f"out_dir={tmp_path}/run"])
    with pytest.raises(StorageError, match=rf"^{url}/none.json: no such key$"):
        storage.read_text(f"{url}/none.json")
    with pytest.raises(DataNotFoundError, match=rf"no index {url}/packed/index-train.json"):
        main(["task=distill", f"dataset.packed={url}/packed", f"out_dir={tmp_path}/run"])
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-y: bucket"):
        main(["task=pack", f"pack.out=s3://no-such-bucket-y/p", f"out_dir={tmp_path}/run"])
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-z: bucket"):
        main(["task=pack", f"pack.out={tmp_path}/p", "out_dir=s3://no-such-bucket-z/run"])
    # No credentials anywhere (environment, files, instance metadata): one line, not a traceback.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import s3fs

    storage._FS.clear()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageError, match=rf"^{url}/x.json: no credentials"):
            storage.read_text(f"{url}/x.json")
    finally:
        storage._FS.clear()
        s3fs.S3FileSystem.clear_instance_cache()


def test_pack_to_s3_and_a_reader_fetches_only_its_classes_within_a_bound(s3_server, tmp_path):
    url = s3_server()
    main(["task=pack", "progress=false", f"pack.out={url}/digits", "pack.max_per_shard=64", f"out_dir={tmp_path}/run"])
    main(["task=pack", "progress=false", f"pack.out={tmp_path}/local", "pack.max_per_shard=64",
          f"out_dir={tmp_path}/run"])
    ref = PackedReader(tmp_path / "local")
    mine = [3, 7]
    want = {e["file"]: e["bytes"] for c in mine for e in ref.index["shards"][str(c)]}
    bound = max(want.values()) * 2  # room for two shards: the third fetch evicts the first
    r = PackedReader(f"{url}/digits", cache_dir=tmp_path / "cache", cache_mb=bound / 2**20)
    for c in mine:
        assert torch.equal(r.load_class(c), ref.load_class(c))
    assert sorted(p.rsplit("/", 1)[1] for p in r.opened) == sorted(want)  # its own classes' shards only
    assert r.fetched == {"requests": len(want), "bytes": sum(want.values())}
    assert r.shard_cache.held_bytes <= bound and r.shard_cache.evictions == len(want) - 2
    idx = torch.tensor([5, 0, 63, 64, 5])
    assert torch.equal(r.read_samples(3, idx), ref.load_class(3)[idx])  # by offset, after a refetch


@pytest.fixture(scope="module")
def sources(tiny_dir, tmp_path_factory, s3_server):
    """The same TinyImageNet slice three ways: the folder, a shuffled WebDataset of it, and its
    packed shards on S3. Returns {name: the dataset overrides}."""
    tmp = tmp_path_factory.mktemp("sources")
    root = tiny_slice(tiny_dir, tmp / "slice", classes=4, per_class=20, val_per_class=5)
    write_wds(tinyimagenet_source(root, "train"), tmp / "wds" / "train", "train", shards=3, seed=1)
    write_wds(tinyimagenet_source(root, "val"), tmp / "wds" / "val", "val", shards=2, seed=2)
    url = s3_server("src")
    folder = ["dataset=tinyimagenet", f"dataset.root={root}"]
    main(["task=pack", "progress=false", *folder, f"pack.out={url}/tiny", f"out_dir={tmp}/pack"])
    return tmp, url, {
        "folder": [*folder, f"pack.out={tmp}/packed-folder"],
        "webdataset": ["dataset=webdataset", f"dataset.urls={tmp}/wds/train", f"dataset.test_urls={tmp}/wds/val",
                       f"dataset.class_names={root}/wnids.txt", "dataset.like=tinyimagenet", f"pack.out={tmp}/packed-wds"],
        "s3": ["dataset=tinyimagenet", f"dataset.packed={url}/tiny", f"dataset.shard_cache_dir={tmp}/cache"],
    }


TINY = ["task=distill", "progress=false", "distill.overrides.width=8", "distill.overrides.iterations=1",
        "distill.overrides.inner_steps=2", "distill.overrides.batch_real=8", "distill.overrides.net_images=32",
        "distill.overrides.init_images=64", "distill.overrides.ipc=1", "distill.checkpoint_every=2",
        "distill.baseline=false", "eval.width=8", "eval.epochs=1", "eval.runs=1"]


def _distilled(out: str, tmp) -> torch.Tensor:
    from dream_dist import load_distilled

    if storage.is_url(out):
        storage.get_file(f"{out}/distilled.pt", tmp / "fetched.pt")
        return load_distilled(tmp / "fetched.pt").stored
    return load_distilled(f"{out}/distilled.pt").stored


def test_folder_webdataset_and_s3_distil_to_equal_sets_in_process(sources):
    tmp, url, srcs = sources
    sets = {}
    for name, args in srcs.items():
        main([*TINY, *args, f"out_dir={tmp}/run-{name}"])
        sets[name] = _distilled(f"{tmp}/run-{name}", tmp)
    for name in ("webdataset", "s3"):
        assert torch.equal(sets[name].images, sets["folder"].images), name
        assert torch.equal(sets[name].labels, sets["folder"].labels), name


def test_folder_webdataset_and_s3_distil_to_equal_sets_on_two_ray_workers(sources, local_ray, tmp_path):
    tmp, url, srcs = sources
    sets = {}
    for name, args in srcs.items():
        # The S3 run keeps its outputs and Ray Train checkpoints on S3 too: no shared file system.
        out = f"{url}/runs/ray-{name}" if name == "s3" else f"{tmp}/ray-{name}"
        main([*TINY, *args, "distill.workers=2", f"out_dir={out}"])
        sets[name] = _distilled(out, tmp_path)
    for name in ("webdataset", "s3"):
        assert torch.equal(sets[name].images, sets["folder"].images), name
        assert torch.equal(sets[name].labels, sets["folder"].labels), name
    ckpts = [p for p in storage.listdir(f"{url}/runs/ray-s3/ray/distill") if p.startswith("checkpoint_")]
    assert ckpts, "Ray Train wrote no checkpoint to S3"
    results = json.loads(storage.read_text(f"{url}/runs/ray-s3/results.json"))
    assert results  # the run directory was uploaded


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
