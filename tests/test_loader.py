"""ShardLoader: memmapped (x, y) batches, disjoint ranks, resumable state, deterministic val,
verification against the manifest."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from chimera.data.loader import ShardLoader
from chimera.data.prepare import prepare
from chimera.data.shards import MANIFEST, ShardError


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_path):
    """Tiny Shakespeare, char tokenizer, 100k-token shards: 11 train shards, 2 val shards."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out,
            shard_size=100_000, progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def data_copy(char_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(char_data, dst)
    return dst


def epoch_windows(loader: ShardLoader, epoch: int = 0) -> np.ndarray:
    """The global window ids, in order, that `loader` visits in `epoch` (moves the loader)."""
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "position": 0})
    ids = np.concatenate([loader.next_windows()
                          for _ in range(-(-loader.windows // loader.batch_size))])
    return ids[:loader.windows]


def test_batches_are_windows_of_the_shards(char_data, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    loader = ShardLoader(char_data, split="train", batch_size=4, block_size=64, seed=1)
    twin = ShardLoader(char_data, split="train", batch_size=4, block_size=64, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    m = loader.manifest
    vocab = m["tokenizer"]["vocab"]
    assert loader.vocab_size == 65 and loader.tokenizer_info["name"] == "char"
    for row, g in zip(range(4), twin.next_windows()):
        shard, start = loader.locate(int(g))
        raw = np.fromfile(char_data / m["splits"]["train"]["shards"][shard]["file"], dtype="<u2")
        assert x[row].tolist() == raw[start:start + 64].tolist()
        assert y[row].tolist() == raw[start + 1:start + 65].tolist()
        offset = shard * 100_000 + start                            # train = text[:1003854]
        assert "".join(vocab[i] for i in x[row].tolist()) == text[offset:offset + 64]
    assert all(isinstance(mm, np.memmap) for mm in loader._maps.values())   # never read whole


def test_one_epoch_predicts_every_window_once(char_data):
    loader = ShardLoader(char_data, batch_size=7, block_size=128, seed=3)
    per_shard = [(s["tokens"] - 1) // 128 for s in loader.manifest["splits"]["train"]["shards"]]
    assert loader.windows == sum(per_shard)
    ids = epoch_windows(loader)
    assert sorted(ids.tolist()) == list(range(loader.windows))
    assert not np.array_equal(ids, np.arange(loader.windows))        # shuffled
    assert not np.array_equal(epoch_windows(loader, 1), ids)           # reshuffled next epoch
    assert np.array_equal(epoch_windows(loader, 0), ids)


def test_two_ranks_draw_disjoint_windows(char_data):
    r0 = ShardLoader(char_data, batch_size=8, block_size=256, rank=0, world_size=2, seed=5)
    r1 = ShardLoader(char_data, batch_size=8, block_size=256, rank=1, world_size=2, seed=5)
    assert r0.windows == r1.windows
    for epoch in range(2):
        w0, w1 = epoch_windows(r0, epoch), epoch_windows(r1, epoch)
        assert len(set(w0.tolist()) & set(w1.tolist())) == 0
        assert sorted(np.concatenate([w0, w1]).tolist()) == list(range(2 * r0.windows))
        # the token ranges the x of each window covers never overlap across ranks
        spans0 = {r0.locate(int(g)) for g in w0}
        spans1 = {r1.locate(int(g)) for g in w1}
        assert not spans0 & spans1
    xa, _ = ShardLoader(char_data, batch_size=8, block_size=256, rank=0, world_size=2).next_batch()
    xb, _ = ShardLoader(char_data, batch_size=8, block_size=256, rank=1, world_size=2).next_batch()
    assert not torch.equal(xa, xb)


def test_state_round_trip_resumes_the_stream(char_data):
    kw = dict(split="val", batch_size=16, block_size=512, seed=11, shuffle=True)
    a = ShardLoader(char_data, **kw)          # val: 217 windows -> epochs roll over quickly
    for _ in range(10):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))   # checkpoints store it as JSON
    assert state["epoch"] == 0 and state["position"] == 160
    expected = [a.next_batch() for _ in range(30)]    # crosses two epoch boundaries
    assert a.epoch == 2
    b = ShardLoader(char_data, **kw)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(30))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.state_dict() == a.state_dict()
    # batch_size may change on resume: the window stream continues where it stopped
    c = ShardLoader(char_data, **{**kw, "batch_size": 32})
    c.load_state_dict(state)
    x, _ = c.next_batch()
    assert torch.equal(x[:16], expected[0][0]) and torch.equal(x[16:], expected[1][0])


def test_rank0_state_restores_every_rank(char_data):
    kw = dict(batch_size=4, block_size=128, world_size=2, seed=2)
    r0, r1 = ShardLoader(char_data, rank=0, **kw), ShardLoader(char_data, rank=1, **kw)
    for _ in range(25):
        r0.next_batch()
        r1.next_batch()
    state = r0.state_dict()                  # Ray Train checkpoints usually come from rank 0
    resumed = ShardLoader(char_data, rank=1, **kw)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(resumed.next_batch()[0], r1.next_batch()[0])


def test_seeds_and_validation_are_deterministic(char_data):
    def first(**kw):
        return ShardLoader(char_data, batch_size=4, block_size=32, **kw).next_batch()[0]
    assert torch.equal(first(seed=1), first(seed=1))
    assert not torch.equal(first(seed=1), first(seed=2))
    val = ShardLoader(char_data, split="val", batch_size=4, block_size=32, seed=1)
    assert not val.shuffle
    run1 = [val.next_batch()[0] for _ in range(3)]
    val.reset()
    run2 = [val.next_batch()[0] for _ in range(3)]
    other = ShardLoader(char_data, split="val", batch_size=4, block_size=32, seed=1)
    run3 = [other.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(run1, run2, run3))
    shuffled = [ShardLoader(char_data, split="val", batch_size=4, block_size=32, seed=9,
                            shuffle=True).next_batch()[0] for _ in range(2)]
    assert torch.equal(*shuffled) and not torch.equal(shuffled[0], run1[0])


def test_truncated_missing_and_corrupted_shards(data_copy):
    ShardLoader(data_copy, block_size=64, verify_checksum=True)          # intact: fine
    shard = data_copy / "train_000003.bin"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 1
    shard.write_bytes(bytes(raw))                                          # same size, wrong data
    ShardLoader(data_copy, block_size=64)                                  # size check passes
    with pytest.raises(ShardError, match="train_000003.bin does not match its sha256"):
        ShardLoader(data_copy, block_size=64, verify_checksum=True)
    shard.write_bytes(bytes(raw[:150_000]))
    with pytest.raises(ShardError, match=r"train_000003.bin is truncated: 150000 bytes, manifest "
                                         r"says 100000 tokens = 200000 bytes"):
        ShardLoader(data_copy, block_size=64)
    ShardLoader(data_copy, split="val", block_size=64)                     # other split: fine
    (data_copy / "val_000001.bin").unlink()
    with pytest.raises(ShardError, match="val_000001.bin listed in manifest.json is missing"):
        ShardLoader(data_copy, split="val", block_size=64)
    (data_copy / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no manifest.json in .*prepare the data first"):
        ShardLoader(data_copy, block_size=64)


def test_bad_loader_arguments(char_data):
    with pytest.raises(ShardError, match=r"val split \(111540 tokens in 2 shard\(s\)\) has 1 "
                                         r"window\(s\).*fewer than world_size=2"):
        ShardLoader(char_data, split="val", block_size=60_000, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        ShardLoader(char_data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ShardLoader(char_data, split="test")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        ShardLoader(char_data, block_size=0)
    state = ShardLoader(char_data, block_size=64, world_size=2).state_dict()
    loader = ShardLoader(char_data, block_size=64, world_size=4)
    n = state["windows"]
    with pytest.raises(ValueError, match=f"another stream: windows={n + 1}, this data has {n} per "
                                         f"rank at world_size=2"):
        loader.load_state_dict({**state, "windows": n + 1})
    with pytest.raises(ValueError, match="invalid world_size=0"):
        loader.load_state_dict({**state, "world_size": 0})
    with pytest.raises(ValueError, match="another stream: seed=0, this loader has seed=1"):
        ShardLoader(char_data, block_size=64, world_size=2, seed=1).load_state_dict(state)


def test_another_world_size_resumes_at_the_next_whole_epoch(char_data):
    """An elastic resize (2 ranks -> 1 -> 2): the stream restarts at the start of the next
    epoch, dealt to the new world size, and says so; the same world size resumes exactly."""
    kw = dict(block_size=64, batch_size=16, seed=3)
    two = [ShardLoader(char_data, rank=r, world_size=2, **kw) for r in (0, 1)]
    for loader in two:
        for _ in range(5):
            loader.next_batch()
    state = two[0].state_dict()
    assert (state["epoch"], state["position"]) == (0, 80)
    one = ShardLoader(char_data, world_size=1, **kw)
    note = one.load_state_dict(state)
    assert note and "world size 2 -> 1" in note and "start of epoch 1" in note
    assert (one.epoch, one.position) == (1, 0)
    fresh = ShardLoader(char_data, world_size=1, **kw)
    assert fresh.load_state_dict({**fresh.state_dict(), "epoch": 1, "position": 0}) is None
    assert torch.equal(one.next_batch()[0], fresh.next_batch()[0])    # epoch 1 of 1 rank, whole
    # a state at the very start of an epoch loses nothing: that epoch, re-dealt
    one.load_state_dict({**state, "epoch": 4, "position": 0})
    assert (one.epoch, one.position) == (4, 0)
    # growing back 1 -> 2: the two ranks' epochs are disjoint and together the whole split
    back = [ShardLoader(char_data, rank=r, world_size=2, **kw) for r in (0, 1)]
    notes = [b.load_state_dict(one.state_dict()) for b in back]
    assert all("world size 1 -> 2" in n and "epoch 4" in n for n in notes)
    ids = [set(epoch_windows(b, 4).tolist()) for b in back]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 2 * back[0].windows
    # the same world size continues at the exact position, with no note
    again = ShardLoader(char_data, rank=0, world_size=2, **kw)
    assert again.load_state_dict(state) is None and (again.epoch, again.position) == (0, 80)
    assert torch.equal(again.next_batch()[0], two[0].next_batch()[0])
