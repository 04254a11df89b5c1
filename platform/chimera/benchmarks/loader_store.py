"""The object-store rows of `python jobs/bench.py data`: ShardLoader reading `s3://` ÷ a train
step, measured in the same run as the memmap loader row and against the same train step.

The store is a SeaweedFS S3 server started here (chimera.localstore.ObjectStore, loopback, signed
requests); the prepared benchmark shards are uploaded to it (sha256 of every object compared
with the local file) and read back by ShardLoader(s3://...) at B=8, T=1024:
  * first pass: an empty chunk cache, so the batches timed include fetching every chunk once;
  * warm: the same loader afterwards, the split held by the cache (steady state);
  * cold: a 128 MiB split (the prepared tokens tiled, 32 MiB shards) with a cache of a quarter
    of it (LRU steady state: most windows miss), and with no cache at all (every window a miss:
    the limit of a dataset much bigger than the cache), one ranged GET of a whole chunk per
    miss (two across a chunk boundary), with the default 4 MiB chunks and with 256 KiB chunks.
Each row names its GETs and bytes fetched per batch. On a loopback store a GET costs what the
store's CPU does; a remote bucket adds its latency per GET.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

BUCKET = "chimera-bench"
B, T = 8, 1024


def _timed(loader, n: int, sync) -> tuple[float, dict]:
    """(seconds per batch, cache counters' change) over n batches."""
    before = loader.cache.stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    sync()
    dt = (time.perf_counter() - t0) / n
    after = loader.cache.stats()
    return dt, {k: after[k] - before[k] for k in ("gets", "fetched", "hits", "misses")}


def _big_dataset(data_dir: Path, out: Path, mb: int) -> Path:
    """`mb` MiB of train tokens in 32 MiB shards: the prepared train tokens tiled (real tokens,
    a real manifest), for the rows that need a split much bigger than a batch's chunks."""
    import shutil

    import numpy as np

    from chimera.data.shards import MANIFEST, ShardWriter, write_json_atomic

    m = json.loads((data_dir / MANIFEST).read_text())
    base = np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2")
                           for s in m["splits"]["train"]["shards"]])
    n = (mb << 20) // 2
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, "train", 16 << 20)
    done = 0
    while done < n:
        part = base[:n - done]
        w.write(part, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
        done += len(part)
    w.close()
    for s in m["splits"]["val"]["shards"]:
        shutil.copyfile(data_dir / s["file"], out / s["file"])
    m["splits"]["train"] = {"tokens": n, "shards": w.shards}
    write_json_atomic(out / MANIFEST, m)
    return out


def _upload(local: Path, uri: str) -> str:
    from chimera import storage
    storage.upload_dir(local, uri)
    for name in storage.walk_files(local):
        if storage.sha256(storage.join(uri, name)) != storage.sha256(local / name):
            raise RuntimeError(f"{uri}/{name}: the uploaded object's sha256 differs")
    return uri


def store_rows(data_dir: Path, fetches: int, device, sync, t_step: float, step_name: str,
               big_mb: int = 128):
    """The rows (name, measured, reference, ratio, target) for `data_dir`'s shards in a store,
    and for a `big_mb` MiB split (bigger than the cache: cold rows)."""
    import tempfile

    from chimera.data.loader import ShardLoader
    from chimera.data.remote import CHUNK_BYTES
    from chimera.localstore import ObjectStore

    rows = []
    saved = dict(os.environ)
    with ObjectStore() as store, tempfile.TemporaryDirectory(prefix="chimera_bench_s3_") as tmp:
        store.make_bucket(BUCKET)
        os.environ.update(store.env)
        try:
            uri = _upload(Path(data_dir), f"s3://{BUCKET}/small")
            big = _upload(_big_dataset(Path(data_dir), Path(tmp) / "big", big_mb),
                          f"s3://{BUCKET}/big")
            loader = ShardLoader(uri, "train", B, T, seed=0, device=device)
            loader.cache.clear()
            split_mb = sum(2 * s["tokens"] for s in loader._shards) / 2**20
            budget_mb = loader.cache.budget / 2**20
            cases = [(f"first pass ({split_mb:.1f} MiB split, empty {budget_mb:.0f} MiB cache)",
                      loader, fetches),
                     ("warm (the split held by the cache)", loader, fetches)]
            n_cold = max(10, fetches // 4)
            for cache_mb, chunk in ((big_mb // 4, CHUNK_BYTES), (0, CHUNK_BYTES), (0, 256 << 10)):
                cold = ShardLoader(big, "train", B, T, seed=1, device=device, cache_mb=cache_mb,
                                   chunk_bytes=chunk)
                cold.cache.clear()
                for _ in range(2 if cache_mb == 0 else max(10, 2 * cache_mb // 8)):
                    cold.next_batch()      # warm-up; a budget > 0 is filled (LRU steady state)
                cases.append((f"cold ({big_mb} MiB split, {cache_mb} MiB cache, "
                              f"{chunk >> 10} KiB chunks)", cold, n_cold))
            for label, ld, n in cases:
                dt, d = _timed(ld, n, sync)
                rows.append((f"s3 loader batch {B}x{T}, {label}: {d['gets'] / n:.2f} GETs, "
                             f"{d['fetched'] / n / 2**20:.2f} MiB per batch ÷ train step "
                             f"({step_name})", f"{dt * 1e3:.3f} ms", f"{t_step * 1e3:.1f} ms",
                             dt / t_step, "<= 0.02"))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return rows
