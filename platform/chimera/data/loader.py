"""ShardLoader: (x, y) token batches from token shards (a local folder, memory-mapped, or an
object-store prefix, read with ranged GETs), disjoint per rank, resumable.

    loader = ShardLoader(data_dir, split="train", batch_size=B, block_size=T,
                         rank=r, world_size=w, seed=s)
    x, y = loader.next_batch()          # int64 (B, T) each; y[:, t] is the token after x[:, t]
    state = loader.state_dict()         # small dict of ints/strings: save with the checkpoint
    loader.load_state_dict(state)       # continue that stream (any rank's state fits every rank)
    loader.reset()                      # back to the stream's start (e.g. before each eval)

Constructor: ShardLoader(data_dir, split="train", batch_size=8, block_size=1024, *, rank=0,
world_size=1, seed=0, shuffle=None (True for train, False for val), verify_checksum=False,
device=None, cache_mb=None, chunk_bytes=4 MiB). `data_dir` holds manifest.json (see shards.py);
on open every shard of the split is checked against it (exists, exact size; sha256 too with
verify_checksum=True) and any mismatch raises ShardError naming the file.

Windows. Each shard of the split is cut into non-overlapping windows of block_size + 1 tokens
at stride block_size (window k of a shard = tokens [kT, kT + T + 1); x = its first T, y = its
last T), so every token is predicted once per epoch; windows never cross shards. Window g
(numbered across the split's shards) belongs to rank g % world_size; the first
world_size * (n // world_size) windows are used so that every rank has the same count and ranks
stay in lock-step. Each epoch a rank visits its windows in the order of a permutation drawn
from np.random.default_rng([seed, rank, epoch]) (shuffle=False: in order). Batches take the
next batch_size windows of that endless stream, crossing into the next epoch when needed, so
next_batch() never runs dry. Shards are opened with np.memmap: a batch reads B windows only.

Object storage. `data_dir` may be a URI (s3://bucket/data/shakespeare_char, gs://..., any scheme
chimera.storage opens). The manifest is read from the store, shard sizes are checked against
one listing of the prefix (sha256 streamed with verify_checksum=True), and windows are read
without a local copy: each shard is a RemoteShard (chimera.data.remote), whose slices are
ranged reads through this process's chunk cache (4 MiB chunks, least recently used out, at
most `cache_mb` MiB, else $CHIMERA_DATA_CACHE_MB, else 512). A dataset within the budget is
fetched once; a bigger one costs about one ranged GET per window. Same windows, same order,
same state: batches are byte-identical to the local loader's for the same arguments.

Validation: split="val" defaults to shuffle=False, so a val loader yields the same batches for
the same arguments every time (call reset() before each evaluation); shuffle=True gives seeded,
still deterministic, random val windows.

State: {"version": 1, "split", "epoch", "position" (windows of this epoch already consumed),
"seed", "world_size", "block_size", "shuffle", "windows" (per rank), "data" (sha256 of the
split's shard list)}. load_state_dict refuses a state of a different stream (other data,
split, seed, block size or shuffle); batch_size may change.

Another world size (an elastic run that lost or gained workers, chimera.train.config
min_workers): the windows are dealt to the ranks anew, so no position inside the old epoch means
the same thing in the new one, and the old epoch's remaining windows cannot be told apart per
rank. The stream resumes at the start of the first epoch the old stream had not begun (its epoch
+ 1, or its epoch when it stood at position 0), dealt to the new world size: no window is seen
twice in one epoch and every epoch from there on is whole; what the old workers had not yet
read of their current epoch is skipped. load_state_dict returns a note saying so (None when the
world size is the same), which the Trainer prints.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chimera import storage
from chimera.data.remote import CHUNK_BYTES, ChunkCache, RemoteShard, cache_budget, read_slices
from chimera.data.shards import DTYPE, ShardError, read_manifest, verify_shards

STATE_VERSION = 1


class ShardLoader:
    def __init__(self, data_dir: str | Path, split: str = "train", batch_size: int = 8,
                 block_size: int = 1024, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool | None = None, verify_checksum: bool = False,
                 device: str | torch.device | None = None, cache_mb: float | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for name, v, lo in (("batch_size", batch_size, 1), ("block_size", block_size, 1),
                            ("world_size", world_size, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.remote = storage.is_uri(data_dir)
        self.data_dir = (storage.resolve(str(data_dir)).rstrip("/") if self.remote
                         else Path(data_dir))
        # object storage: ranged reads through this process's chunk cache (chimera.data.remote)
        self.cache = ChunkCache.shared(cache_budget(cache_mb), chunk_bytes) if self.remote else None
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.device = None if device is None else torch.device(device)

        self.manifest = read_manifest(self.data_dir)
        verify_shards(self.data_dir, self.manifest, splits=(split,), checksum=verify_checksum)
        shards = self.manifest["splits"][split]["shards"]
        self.tokenizer_info: dict[str, Any] = self.manifest["tokenizer"]
        self.vocab_size: int = self.tokenizer_info["vocab_size"]
        self._shards = shards
        self._files = [storage.join(self.data_dir, s["file"]) if self.remote
                       else self.data_dir / s["file"] for s in shards]
        self._maps: dict[int, np.memmap | RemoteShard] = {}
        per_shard = np.array([max(0, (s["tokens"] - 1) // block_size) for s in shards], np.int64)
        self._first = np.concatenate([[0], np.cumsum(per_shard)])    # first window of each shard
        total = int(self._first[-1])
        self.windows = total // world_size                            # per rank
        if self.windows == 0:
            tokens = self.manifest["splits"][split]["tokens"]
            raise ShardError(f"{self.data_dir}: the {split} split ({tokens} tokens in "
                             f"{len(shards)} shard(s)) has {total} window(s) of block_size+1="
                             f"{block_size + 1} tokens, fewer than world_size={world_size}: "
                             f"use a smaller block_size or prepare more data")
        self._mine = rank + world_size * np.arange(self.windows, dtype=np.int64)  # global ids
        self._data_id = hashlib.sha256(
            "|".join(f"{s['file']}:{s['tokens']}:{s['sha256']}" for s in shards).encode()
        ).hexdigest()[:16]
        self.reset()

    # --- the stream -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.epoch, self.position = 0, 0
        self._order_epoch = -1

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.rank, self.epoch])
                self._perm = self._mine[rng.permutation(self.windows)]
            else:
                self._perm = self._mine
            self._order_epoch = self.epoch
        return self._perm

    def next_windows(self) -> np.ndarray:
        """Global ids of the next batch_size windows (advances the stream)."""
        out = np.empty(self.batch_size, dtype=np.int64)
        got = 0
        while got < self.batch_size:
            if self.position == self.windows:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(self.batch_size - got, self.windows - self.position)
            out[got:got + take] = self._order()[self.position:self.position + take]
            got += take
            self.position += take
        return out

    def locate(self, g: int) -> tuple[int, int]:
        """(shard index, first token offset) of global window g."""
        i = int(np.searchsorted(self._first, g, side="right")) - 1
        return i, int(g - self._first[i]) * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 (B, T); y is x shifted left by one token."""
        T = self.block_size
        x = np.empty((self.batch_size, T), dtype=np.int64)
        y = np.empty((self.batch_size, T), dtype=np.int64)
        spans = [self.locate(g) for g in self.next_windows()]
        if self.remote:           # one call: the batch's missing chunks are fetched concurrently
            windows = read_slices([(self._map(i), s, s + T + 1) for i, s in spans])
        else:
            windows = (self._map(i)[s:s + T + 1] for i, s in spans)    # from the page cache
        for b, w in enumerate(windows):                                 # w: (T+1,) uint16
            x[b] = w[:-1]
            y[b] = w[1:]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.device is not None and self.device.type != "cpu":
            if self.device.type == "cuda":
                xt, yt = xt.pin_memory(), yt.pin_memory()
            xt = xt.to(self.device, non_blocking=True)
            yt = yt.to(self.device, non_blocking=True)
        return xt, yt

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def _map(self, i: int) -> np.memmap | RemoteShard:
        m = self._maps.get(i)
        if m is None:
            if self.remote:
                s = self._shards[i]
                m = RemoteShard(self._files[i], s["tokens"], self.cache, key=s["sha256"])
            else:
                m = np.memmap(self._files[i], dtype=DTYPE, mode="r")
            self._maps[i] = m
        return m

    # --- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch,
                "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "block_size": self.block_size, "shuffle": self.shuffle,
                "windows": self.windows, "data": self._data_id}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Continue the stream `state` describes; ValueError for another stream. Another
        world size resumes at the next whole epoch (module docstring): a note saying so."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}")
        mine = self.state_dict()
        for key in ("data", "split", "seed", "block_size", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state is for another stream: {key}={state.get(key)!r}, "
                                 f"this loader has {key}={mine[key]!r}")
        old_world = state.get("world_size")
        if not isinstance(old_world, int) or isinstance(old_world, bool) or old_world < 1:
            raise ValueError(f"loader state has an invalid world_size={old_world!r}")
        old_windows = self.windows if old_world == self.world_size else \
            (int(self._first[-1]) // old_world)
        if state.get("windows") != old_windows:
            raise ValueError(f"loader state is for another stream: windows={state.get('windows')!r}, "
                             f"this data has {old_windows} per rank at world_size={old_world}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= old_windows:
            raise ValueError(f"loader state has an invalid position: epoch={epoch}, "
                             f"position={position} of {old_windows} windows")
        if old_world == self.world_size:
            self.epoch, self.position = epoch, position
            return None
        self.epoch, self.position = (epoch if position == 0 else epoch + 1), 0
        return (f"{self.split} data: world size {old_world} -> {self.world_size}: windows dealt "
                f"anew, resuming at the start of epoch {self.epoch} (the old stream stood at "
                f"epoch {epoch}, window {position} of {old_windows} per rank)")

    def __repr__(self) -> str:
        return (f"ShardLoader({str(self.data_dir)!r}, split={self.split!r}, "
                f"batch_size={self.batch_size}, block_size={self.block_size}, rank={self.rank}, "
                f"world_size={self.world_size}, seed={self.seed}, windows={self.windows})")
