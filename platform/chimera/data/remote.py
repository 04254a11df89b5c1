"""Shards in object storage, read without a local copy: ranged reads through a bounded chunk cache.

    cache = ChunkCache.shared()                          # this process's cache (budget below)
    shard = RemoteShard("s3://b/data/train_000000.bin", tokens=N, cache=cache, key=sha256)
    w = shard[start:start + T + 1]                       # (T+1,) uint16, like np.memmap's slice

A shard object is cut into fixed-size chunks (CHUNK_BYTES, 4 MiB; the last one shorter). A read
fetches the chunks its byte range touches that the cache does not hold, each with one ranged
GET (`chimera.storage.open_ranged(uri).read_at(nbytes, offset)`), so a window that crosses a
chunk boundary reads both. The cache keeps chunks in least-recently-used order up to a byte
budget: a dataset smaller than the budget is read once and then served from memory; a bigger
one costs about one ranged GET per window (a miss fetches a whole chunk).

Budget: `ShardLoader(..., cache_mb=...)`, else the environment variable CHIMERA_DATA_CACHE_MB
(a number >= 0; 0 caches nothing), else DEFAULT_CACHE_MB. One cache per (budget, chunk size)
is shared by the loaders of a process (a Trainer's train loader and its train-split eval
loader read the same chunks); chunks are keyed by the object's URI and the sha256 the manifest
lists, so a re-prepared dataset at the same URI is never served from old chunks. Every Ray
Train worker has its own cache and reads the store itself: nothing is copied to the nodes.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from chimera import storage
from chimera.data.shards import DTYPE, ShardError

CHUNK_BYTES = 4 << 20
DEFAULT_CACHE_MB = 512
CACHE_ENV = "CHIMERA_DATA_CACHE_MB"


def cache_budget(cache_mb: float | None = None) -> int:
    """Bytes of the chunk cache: `cache_mb`, else $CHIMERA_DATA_CACHE_MB, else DEFAULT_CACHE_MB.
    ValueError naming the setting when it is not a number >= 0."""
    if cache_mb is not None:
        where, value = "cache_mb", cache_mb
    elif os.environ.get(CACHE_ENV, "").strip():
        where, value = CACHE_ENV, os.environ[CACHE_ENV]
    else:
        return DEFAULT_CACHE_MB << 20
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = float("nan")
    if isinstance(value, bool) or not mb >= 0 or mb == float("inf"):
        raise ValueError(f"{where}={value!r}: the data chunk cache budget must be a number of "
                         f"MiB >= 0 (0 caches nothing)")
    return int(mb * (1 << 20))


class ChunkCache:
    """Fixed-size chunks of remote objects, least recently used first out, at most `budget`
    bytes held. Counters: gets (ranged GETs issued), fetched (bytes they returned), hits and
    misses (chunk look-ups), evictions."""

    _shared: dict[tuple[int, int], "ChunkCache"] = {}

    def __init__(self, budget: int, chunk_bytes: int = CHUNK_BYTES):
        if not isinstance(chunk_bytes, int) or chunk_bytes < 2 or chunk_bytes % DTYPE.itemsize:
            raise ValueError(f"chunk_bytes must be an even integer >= 2, got {chunk_bytes!r}")
        self.budget, self.chunk_bytes = int(budget), chunk_bytes
        self._chunks: OrderedDict[tuple, bytes] = OrderedDict()
        self.held = 0
        self.gets = self.fetched = self.hits = self.misses = self.evictions = 0

    @classmethod
    def shared(cls, budget: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> "ChunkCache":
        """This process's cache of that budget (default: cache_budget()) and chunk size."""
        key = (cache_budget() if budget is None else int(budget), chunk_bytes)
        c = cls._shared.get(key)
        if c is None:
            c = cls._shared[key] = cls(*key)
        return c

    def read(self, f, key: tuple, size: int, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the object `f` (open_ranged) of `size` bytes, known as `key`."""
        C = self.chunk_bytes
        parts = []
        for c in range(start // C, (stop - 1) // C + 1):
            data = self._chunk(f, key, size, c)
            parts.append(data[max(start - c * C, 0):min(stop - c * C, len(data))])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunk(self, f, key: tuple, size: int, c: int) -> bytes:
        k = (*key, c)
        data = self._chunks.get(k)
        if data is not None:
            self.hits += 1
            self._chunks.move_to_end(k)
            return data
        self.misses += 1
        offset = c * self.chunk_bytes
        want = min(self.chunk_bytes, size - offset)
        data = f.read_at(want, offset)                       # one ranged GET
        self.gets += 1
        self.fetched += len(data)
        if len(data) != want:
            raise ShardError(f"{key[0]}: read {len(data)} bytes at offset {offset}, expected "
                             f"{want} (the object changed after the loader opened it?)")
        if want <= self.budget:
            while self.held + want > self.budget:
                _, old = self._chunks.popitem(last=False)
                self.held -= len(old)
                self.evictions += 1
            self._chunks[k] = data
            self.held += want
        return data

    def clear(self) -> None:
        self._chunks.clear()
        self.held = 0

    def stats(self) -> dict[str, int]:
        return {"gets": self.gets, "fetched": self.fetched, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "held": self.held,
                "budget": self.budget, "chunk_bytes": self.chunk_bytes}


class RemoteShard:
    """One shard object, sliced like the np.memmap of a local shard: shard[a:b] is the uint16
    tokens [a, b) (clipped to the shard, as numpy does), read through `cache`."""

    def __init__(self, uri: str, tokens: int, cache: ChunkCache, key: str = ""):
        self.uri, self.tokens, self.cache = uri, int(tokens), cache
        self.nbytes = self.tokens * DTYPE.itemsize
        self._key = (uri, key)
        self._f = None

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError(f"RemoteShard supports contiguous slices only, got {s!r}")
        a, b, _ = s.indices(self.tokens)
        if b <= a:
            return np.empty(0, dtype=DTYPE)
        if self._f is None:
            self._f = storage.open_ranged(self.uri)
        raw = self.cache.read(self._f, self._key, self.nbytes, a * DTYPE.itemsize,
                              b * DTYPE.itemsize)
        return np.frombuffer(raw, dtype=DTYPE)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __repr__(self) -> str:
        return f"RemoteShard({self.uri!r}, tokens={self.tokens})"
