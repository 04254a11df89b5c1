"""ShardLoader on object storage (the session's SeaweedFS, conftest.object_store): the same
batches as the local memmap loader (several ranks, epoch wraps, resumed states), windows read
through the bounded chunk cache without a local copy, verification from the listing, the
manifest as completion marker, clear errors for bad URIs, and plan_run keeping a URI a URI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chimera import storage
from chimera.data.loader import ShardLoader
from chimera.data.prepare import prepare
from chimera.data.remote import CACHE_ENV, ChunkCache, RemoteShard, cache_budget
from chimera.data.shards import MANIFEST, ShardError, read_manifest
from chimera.paths import resolve_data_dir
from chimera.train.config import TrainConfigError, load_train_config
from chimera.train.plan import plan_run

KB = 1 << 10


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory, shakespeare_path):
    """Tiny Shakespeare, char, 100k-token shards: 11 train shards, 2 val shards."""
    out = tmp_path_factory.mktemp("shakespeare_char_100k")
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out,
            shard_size=100_000, progress=False, log=lambda *_: None)
    return out


def upload(local, uri: str) -> str:
    """upload_dir, then every object's sha256 compared with the local file's."""
    storage.upload_dir(local, uri)
    files = storage.walk_files(local)
    assert files and storage.walk_files(uri) == files
    for name in files:
        assert storage.sha256(storage.join(uri, name)) == storage.sha256(local / name), name
    return uri


@pytest.fixture
def s3_shards(char_shards, s3_prefix):
    return upload(char_shards, s3_prefix + "/shakespeare_char")


def same_stream(a: ShardLoader, b: ShardLoader, batches: int) -> None:
    for k in range(batches):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {k}"
    assert a.state_dict() == b.state_dict()


def crosses_chunk(loader: ShardLoader, ids, chunk: int) -> bool:
    T = loader.block_size
    for g in ids:
        _, start = loader.locate(int(g))
        if (2 * start) // chunk != (2 * (start + T + 1) - 1) // chunk:
            return True
    return False


@pytest.mark.parametrize("split,world,batch,block,cache_mb",
                         [("train", 3, 8, 256, 0.25), ("val", 2, 16, 512, 0.125)])
def test_s3_batches_equal_the_local_loader_incl_epoch_wrap_and_resume(
        char_shards, s3_shards, split, world, batch, block, cache_mb):
    chunk = 64 * KB         # small chunks, a budget below the split: boundaries, misses, evictions
    kw = dict(split=split, batch_size=batch, block_size=block, world_size=world, seed=7,
              shuffle=True)
    for rank in range(world):
        local = ShardLoader(char_shards, rank=rank, **kw)
        remote = ShardLoader(s3_shards, rank=rank, cache_mb=cache_mb, chunk_bytes=chunk, **kw)
        assert remote.remote and remote.windows == local.windows
        n = local.windows // batch + 3                       # one epoch and then some
        same_stream(local, remote, n)
        assert remote.epoch == 1 and remote.position > 0      # the stream wrapped an epoch
        state = json.loads(json.dumps(remote.state_dict()))
        expected = [local.next_batch() for _ in range(5)]
        resumed = ShardLoader(s3_shards, rank=rank, cache_mb=cache_mb, chunk_bytes=chunk, **kw)
        resumed.load_state_dict(state)
        for (xe, ye), (xr, yr) in zip(expected, (resumed.next_batch() for _ in range(5))):
            assert torch.equal(xe, xr) and torch.equal(ye, yr)
    c = remote.cache.stats()
    assert c["misses"] > 0 and c["hits"] > 0 and c["evictions"] > 0 and c["held"] <= c["budget"]
    assert crosses_chunk(remote, rank + world * np.arange(remote.windows), chunk)
    # unshuffled val, as the Trainer's eval loader reads it
    same_stream(ShardLoader(char_shards, split="val", batch_size=4, block_size=64),
                ShardLoader(s3_shards, split="val", batch_size=4, block_size=64), 10)


def test_a_small_dataset_is_fetched_once(s3_shards):
    chunk = 256 * KB
    loader = ShardLoader(s3_shards, "val", batch_size=32, block_size=64, shuffle=True,
                         cache_mb=4, chunk_bytes=chunk)
    cache = loader.cache
    before = cache.stats()
    for _ in range(3 * loader.windows // 32):                 # three epochs
        loader.next_batch()
    shards = loader.manifest["splits"]["val"]["shards"]
    nbytes = sum(2 * s["tokens"] for s in shards)
    chunks = sum(-(-2 * s["tokens"] // chunk) for s in shards)
    after = cache.stats()
    assert after["fetched"] - before["fetched"] == nbytes       # every byte once, no more
    assert after["gets"] - before["gets"] == chunks
    assert after["evictions"] == before["evictions"]
    # another loader of this process with the same budget shares the chunks: no GET at all
    twin = ShardLoader(s3_shards, "val", batch_size=32, block_size=64, cache_mb=4,
                       chunk_bytes=chunk)
    assert twin.cache is cache
    for _ in range(10):
        twin.next_batch()
    assert cache.stats()["gets"] == after["gets"]


def test_a_dataset_bigger_than_the_cache_costs_one_get_per_window(char_shards, s3_shards):
    chunk = 4 * KB
    loader = ShardLoader(s3_shards, batch_size=8, block_size=128, seed=3, cache_mb=0,
                         chunk_bytes=chunk)
    probe = ShardLoader(char_shards, batch_size=8, block_size=128, seed=3)
    g0, f0 = loader.cache.gets, loader.cache.fetched
    spans = 0
    for _ in range(10):
        chunks = set()                 # the distinct chunks this batch's windows touch
        for g in probe.next_windows():
            i, start = probe.locate(int(g))
            first, last = (2 * start) // chunk, (2 * (start + 129) - 1) // chunk
            chunks |= {(i, c) for c in range(first, last + 1)}
        spans += len(chunks)
        loader.next_batch()
    gets = loader.cache.gets - g0
    assert gets == spans and 70 <= gets <= 2 * 80       # ~1 per window (2 across a boundary)
    assert loader.cache.held == 0
    total = sum(2 * s["tokens"] for s in loader.manifest["splits"]["train"]["shards"])
    assert loader.cache.fetched - f0 <= gets * chunk < total / 2   # nothing like a full copy


def test_remote_shard_slices_like_a_memmap(char_shards, s3_shards):
    raw = np.memmap(char_shards / "val_000001.bin", dtype="<u2", mode="r")
    shard = RemoteShard(storage.join(s3_shards, "val_000001.bin"), len(raw),
                        ChunkCache(budget=64 * KB, chunk_bytes=4 * KB))
    for a, b in [(0, 10), (2047, 2049), (4000, 9000), (len(raw) - 5, len(raw) + 10),
                 (len(raw), len(raw) + 3), (-7, None), (10, 5)]:
        assert np.array_equal(shard[a:b], raw[a:b]), (a, b)
    with pytest.raises(TypeError, match="contiguous slices only"):
        shard[0:10:2]


def test_verification_from_the_listing_and_the_manifest_as_completion_marker(s3_shards):
    ShardLoader(s3_shards, block_size=64, verify_checksum=True)            # intact: fine
    obj = storage.join(s3_shards, "train_000003.bin")
    data = bytearray(storage.read_bytes(obj))
    data[1000] ^= 1
    storage.write_bytes(obj, bytes(data))                                  # same size
    assert storage.sha256(obj) != read_manifest(s3_shards)["splits"]["train"]["shards"][3]["sha256"]
    ShardLoader(s3_shards, block_size=64)                                  # size check passes
    with pytest.raises(ShardError, match="train_000003.bin does not match its sha256"):
        ShardLoader(s3_shards, block_size=64, verify_checksum=True)
    storage.write_bytes(obj, bytes(data[:150_000]))
    with pytest.raises(ShardError, match=r"s3://.*/train_000003.bin is truncated: 150000 bytes, "
                                         r"manifest says 100000 tokens = 200000 bytes"):
        ShardLoader(s3_shards, block_size=64)
    storage.remove(storage.join(s3_shards, "val_000001.bin"))
    with pytest.raises(ShardError, match="val_000001.bin listed in manifest.json is missing"):
        ShardLoader(s3_shards, split="val", block_size=64)
    storage.remove(storage.join(s3_shards, MANIFEST))
    with pytest.raises(ShardError, match=r"s3://.* holds an unfinished preparation \(no "
                                         r"manifest.json yet\)"):
        ShardLoader(s3_shards, block_size=64)
    with pytest.raises(TrainConfigError, match="unfinished preparation"):
        plan_run(load_train_config({"data_dir": s3_shards, "n_layer": 1, "n_embd": 32,
                                    "n_head": 4, "block_size": 32, "batch_size": 8,
                                    "total_batch_size_str": "8*32"}))


def test_bad_uris_are_clear_errors(s3_prefix):
    with pytest.raises(ShardError, match=r"s3://chimera-test/.*nothing is stored under this "
                                         r"prefix \(no manifest.json\): prepare the data first"):
        ShardLoader(s3_prefix + "/nothing", block_size=64)
    with pytest.raises(ShardError, match="bucket s3://no-such-bucket-16 does not exist"):
        ShardLoader("s3://no-such-bucket-16/data/x", block_size=64)
    with pytest.raises(storage.StorageError, match="cannot open nosuch:// storage"):
        ShardLoader("nosuch://bucket/data", block_size=64)
    with pytest.raises(storage.StorageError, match=r"looks like a URI without '//': write s3://"):
        ShardLoader("s3:/chimera-test/data", block_size=64)
    with pytest.raises(storage.StorageError, match="a URI needs a bucket"):
        read_manifest("s3://")
    storage.write_text(storage.join(s3_prefix, "bad", MANIFEST), "{not json")
    with pytest.raises(ShardError, match=r"s3://.*/bad/manifest.json is not valid JSON"):
        read_manifest(storage.join(s3_prefix, "bad"))


def test_plan_run_keeps_a_uri_and_rejects_bad_ones(s3_shards, tmp_path):
    assert resolve_data_dir(s3_shards + "/", "shakespeare", "char") == s3_shards + "/"
    assert resolve_data_dir(tmp_path, "x", None) == tmp_path.resolve()
    flags = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32, "batch_size": 8,
             "total_batch_size_str": "8*32", "storage_path": str(tmp_path)}
    plan = plan_run(load_train_config({"data_dir": s3_shards, **flags}))
    assert plan.data_dir == s3_shards and plan.worker_config["train"]["data_dir"] == s3_shards
    assert plan.tokenizer["name"] == "char"
    with pytest.raises(TrainConfigError, match=r"data_dir: 's3:/b/x' looks like a URI without"):
        plan_run(load_train_config({"data_dir": "s3:/b/x", **flags}))
    with pytest.raises(TrainConfigError, match=r"data_dir s3://.*/missing: .*nothing is stored"):
        plan_run(load_train_config({"data_dir": s3_shards + "/missing", **flags}))
    with pytest.raises(TrainConfigError, match="bucket s3://no-such-bucket-16 does not exist"):
        plan_run(load_train_config({"data_dir": "s3://no-such-bucket-16/x", **flags}))


def test_cache_budget_setting(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_budget() == 512 << 20 and cache_budget(1.5) == 3 << 19 and cache_budget(0) == 0
    monkeypatch.setenv(CACHE_ENV, "64")
    assert cache_budget() == 64 << 20 and cache_budget(2) == 2 << 20
    for bad in ("lots", "-1", "inf", "nan"):
        monkeypatch.setenv(CACHE_ENV, bad)
        with pytest.raises(ValueError, match=f"CHIMERA_DATA_CACHE_MB='{bad}': the data chunk "
                                             f"cache budget must be a number of MiB >= 0"):
            cache_budget()
    with pytest.raises(ValueError, match="cache_mb=-2: the data chunk cache budget"):
        cache_budget(-2)
    with pytest.raises(ValueError, match="chunk_bytes must be an even integer"):
        ChunkCache(0, chunk_bytes=3)
