"""Shards in object storage, read without a local copy: ranged reads through a bounded chunk cache.

    cache = ChunkCache.shared()                          # this process's cache (budget below)
    shard = RemoteShard("s3://b/data/train_000000.bin", tokens=N, cache=cache, key=sha256)
    w = shard[start:start + T + 1]                       # (T+1,) uint16, like np.memmap's slice
    ws = read_slices([(shard, a, a + T + 1), ...])       # a batch's windows in one call

A shard object is cut into fixed-size chunks (CHUNK_BYTES, 4 MiB; the last one shorter). A read
fetches the chunks its byte range touches that the cache does not hold, each with one ranged
GET (`chimera.storage.open_ranged(uri).read_at(nbytes, offset)`), so a window that crosses a
chunk boundary reads both. The loader reads a batch's B windows in one call (read_slices), and
their missing chunks are fetched concurrently (FETCH_THREADS GETs at a time). The cache keeps
chunks in least-recently-used order up to a byte budget: a dataset smaller than the budget is
read once and then served from memory; a bigger one costs about one ranged GET per window (a
miss fetches a whole chunk: smaller chunks cost less per miss, larger ones fewer GETs).

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
FETCH_THREADS = 8                  # concurrent ranged GETs of one batch's missing chunks


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
        self._threads = None

    @classmethod
    def shared(cls, budget: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> "ChunkCache":
        """This process's cache of that budget (default: cache_budget()) and chunk size."""
        key = (cache_budget() if budget is None else int(budget), chunk_bytes)
        c = cls._shared.get(key)
        if c is None:
            c = cls._shared[key] = cls(*key)
        return c

    def read_many(self, reads: list[tuple["RemoteShard", int, int]]) -> list[bytes]:
        """Bytes [start, stop) of each (shard, start, stop). The chunks they touch that the
        cache does not hold are fetched concurrently (one ranged GET each, FETCH_THREADS at a
        time: a batch's misses cost about one GET's latency, not B of them)."""
        C = self.chunk_bytes
        chunks: dict[tuple, bytes | None] = {}       # this call's chunks, even if none is kept
        missing = []
        for shard, a, b in reads:
            for c in range(a // C, (b - 1) // C + 1):
                k = (*shard.key, c)
                if k in chunks:
                    continue
                data = chunks[k] = self._chunks.get(k)
                if data is None:
                    missing.append((k, shard.file(), shard.nbytes, c))
                else:
                    self.hits += 1
                    self._chunks.move_to_end(k)
        if missing:
            got = (self._pool().map(self._fetch, missing) if len(missing) > 1
                   else [self._fetch(missing[0])])
            for (k, *_), data in zip(missing, got):
                chunks[k] = data
                self.misses += 1
                self.gets += 1
                self.fetched += len(data)
                self._keep(k, data)
        out = []
        for shard, a, b in reads:
            parts = [chunks[(*shard.key, c)] for c in range(a // C, (b - 1) // C + 1)]
            first = (a // C) * C
            out.append(parts[0][a - first:b - first] if len(parts) == 1 else
                       b"".join(parts)[a - first:b - first])
        return out

    def _fetch(self, job) -> bytes:
        k, f, size, c = job
        offset = c * self.chunk_bytes
        want = min(self.chunk_bytes, size - offset)
        data = f.read_at(want, offset)                 # one ranged GET (releases the GIL)
        if len(data) != want:
            raise ShardError(f"{k[0]}: read {len(data)} bytes at offset {offset}, expected "
                             f"{want} (the object changed after the loader opened it?)")
        return data

    def _keep(self, k: tuple, data: bytes) -> None:
        if len(data) > self.budget:
            return
        while self.held + len(data) > self.budget:
            _, old = self._chunks.popitem(last=False)
            self.held -= len(old)
            self.evictions += 1
        self._chunks[k] = data
        self.held += len(data)

    def _pool(self):
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor
            self._threads = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="chimera-chunks")
        return self._threads

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
        self.key = (uri, key)
        self._f = None

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError(f"RemoteShard supports contiguous slices only, got {s!r}")
        a, b, _ = s.indices(self.tokens)
        if b <= a:
            return np.empty(0, dtype=DTYPE)
        return read_slices([(self, a, b)])[0]

    def file(self):
        """The object, opened once for ranged reads."""
        if self._f is None:
            self._f = storage.open_ranged(self.uri)
        return self._f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __repr__(self) -> str:
        return f"RemoteShard({self.uri!r}, tokens={self.tokens})"


def read_slices(parts: list[tuple[RemoteShard, int, int]]) -> list[np.ndarray]:
    """Tokens [a, b) of each (shard, a, b) (0 <= a < b <= len(shard)), in one ChunkCache call:
    a batch's windows, their missing chunks fetched concurrently."""
    cache = parts[0][0].cache
    if any(p[0].cache is not cache for p in parts):
        raise ValueError("read_slices: the shards must share one ChunkCache")
    n = DTYPE.itemsize
    raws = cache.read_many([(shard, a * n, b * n) for shard, a, b in parts])
    return [np.frombuffer(r, dtype=DTYPE) for r in raws]
