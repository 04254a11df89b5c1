"""Token shards on disk: the file layout, the manifest, the writer and verification.

A prepared dataset is a folder:
    train_000000.bin, train_000001.bin, ...   uint16 token ids, raw little-endian, no header
    val_000000.bin, ...                       (read with np.memmap(path, dtype="<u2", mode="r"))
    manifest.json                             written last: its presence means "complete"
    progress.json                             only while a preparation is unfinished
Shards are written as `<name>.tmp` and renamed when complete, so a file with a final name is
always whole; the manifest lists every shard with its token count and sha256.

manifest.json (format "chimera-token-shards", version 1):
    {"format": ..., "version": 1, "dtype": "uint16", "byte_order": "little",
     "dataset": "shakespeare", "tokenizer": {"name": "char", "vocab_size": 65, "eot_id": null,
     "vocab": "\\n !$&',-.3:;?ABC..."}, "source": {...}, "split": {"method": "tail",
     "val_fraction": 0.1, ...}, "shard_size": 100000000, "command": "python jobs/prepare.py ...",
     "created": "2025-...Z", "documents": {"train": n, "val": n}, "settings": {...},
     "splits": {"train": {"tokens": N, "shards": [{"file": "train_000000.bin", "tokens": N,
                                                   "sha256": "..."}]},
                "val": {...}}}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chimera import storage
from chimera.data.sources import DataError

FORMAT = "chimera-token-shards"
VERSION = 1
DTYPE = np.dtype("<u2")           # uint16, little-endian
MAX_VOCAB = 65535                 # ids must fit uint16; vocab >= 65536 is refused (issue 3)
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")


class ShardError(DataError):
    """A prepared dataset is missing, incomplete, truncated or does not match its manifest."""


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def is_shard_file(name: str) -> bool:
    """Names this package writes into a dataset folder (shards and their temporaries)."""
    base = name[:-4] if name.endswith(".tmp") else name
    return base.endswith(".bin") and base.split("_", 1)[0] in SPLITS


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset: a local folder or a URI prefix (s3://b/data/x, any
    scheme chimera.storage opens). The manifest is the completion marker: shards (or a
    progress.json) without it are an unfinished preparation. ShardError saying what is wrong;
    a URI that cannot be used (unknown scheme, "s3:/x") is a StorageError."""
    if storage.is_uri(data_dir):
        d = storage.resolve(str(data_dir)).rstrip("/")
        path = storage.join(d, MANIFEST)
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise _no_manifest(d, storage.listdir(d)) from None
        except UnicodeDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e})") from None
    else:
        storage.resolve(data_dir)                # "s3:/x" is a mistyped URI, not a folder
        d = Path(data_dir)
        path = d / MANIFEST
        if not path.is_file():
            raise _no_manifest(d, storage.listdir(d))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e})") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise ShardError(f"{path} has version {m.get('version')}, this code reads {VERSION}")
    return m


def _no_manifest(d, names: list[str]) -> ShardError:
    shards = storage.is_uri(d) and any(is_shard_file(n) for n in names)   # (no progress.json)
    if PROGRESS in names or shards:
        return ShardError(f"{d} holds an unfinished preparation (no {MANIFEST} yet): "
                          f"re-run jobs/prepare.py with the same arguments to finish it")
    if not names and storage.is_uri(d):
        scheme, rest = str(d).split("://", 1)
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        if bucket != d and not storage.is_dir(bucket):
            return ShardError(f"{d}: bucket {bucket} does not exist (or these credentials "
                              f"cannot see it)")
        return ShardError(f"{d}: nothing is stored under this prefix (no {MANIFEST}): prepare "
                          f"the data first, e.g. python jobs/prepare.py --dataset shakespeare "
                          f"--out {d}")
    return ShardError(f"no {MANIFEST} in {d}: prepare the data first, e.g. "
                      f"python jobs/prepare.py --dataset shakespeare --out {d}")


def verify_shards(data_dir: str | Path, manifest: dict[str, Any], splits=SPLITS,
                  checksum: bool = False) -> None:
    """Every listed shard exists with exactly tokens*2 bytes (and, optionally, its sha256,
    streamed). For a URI the sizes come from one listing of the prefix."""
    remote = storage.is_uri(data_dir)
    d = str(data_dir).rstrip("/") if remote else Path(data_dir)
    listing = storage.walk_files(d) if remote else None
    for split in splits:
        for s in manifest["splits"][split]["shards"]:
            p = storage.join(d, s["file"]) if remote else d / s["file"]
            if remote:
                got = listing.get(s["file"])
            else:
                got = p.stat().st_size if p.is_file() else None
            if got is None:
                raise ShardError(f"shard {p} listed in {MANIFEST} is missing")
            want = s["tokens"] * DTYPE.itemsize
            if got != want:
                raise ShardError(f"shard {p} is {'truncated' if got < want else 'too long'}: "
                                 f"{got} bytes, manifest says {s['tokens']} tokens = {want} bytes")
            if checksum and (storage.sha256(p) if remote else file_sha256(p)) != s["sha256"]:
                raise ShardError(f"shard {p} does not match its sha256 in {MANIFEST} "
                                 f"(corrupted or rewritten)")


class ShardWriter:
    """Appends one split's tokens to shards of exactly `shard_size` tokens (the last may be
    shorter). Tokens arrive per item of the preparation stream; the writer remembers where the
    open shard starts (`next_item`, `next_offset`) so a resumed run can skip finished shards."""

    def __init__(self, out_dir: Path, split: str, shard_size: int,
                 done: list[dict[str, Any]] | None = None, next_item: int = 0,
                 next_offset: int = 0, on_shard: Callable[["ShardWriter"], None] | None = None):
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, int(shard_size)
        self.shards: list[dict[str, Any]] = list(done or [])
        self.next_item, self.next_offset = next_item, next_offset
        self.on_shard = on_shard
        self.finished = False          # closed for good (its last shard is written)
        self._f = None
        self._hash = None
        self._count = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count

    def write(self, tokens: np.ndarray, items: np.ndarray, starts: np.ndarray,
              offsets: np.ndarray) -> None:
        """Append `tokens` (uint16), the concatenated tokens of items `items`: item items[j]
        begins at tokens[starts[j]] with its own token number offsets[j] (non-zero only for
        an item cut by a resume point)."""
        pos, n = 0, len(tokens)
        while pos < n:
            if self._f is None:
                self._open()
            take = min(self.shard_size - self._count, n - pos)
            chunk = tokens[pos:pos + take]
            self._f.write(chunk)
            self._hash.update(chunk)
            self._count += take
            pos += take
            if self._count == self.shard_size:
                j = int(np.searchsorted(starts, pos, side="right")) - 1
                self.next_item = int(items[j])
                self.next_offset = int(offsets[j]) + pos - int(starts[j])
                self._finish()

    def close(self) -> None:
        """Finish the last (partial) shard."""
        if self._f is not None and self._count:
            self._finish()
        elif self._f is not None:
            self.abort()

    def abort(self) -> None:
        """Close without finishing; the temporary file stays until the next run cleans it."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / (name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        final = self._tmp.with_name(self._tmp.name[:-4])
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "tokens": self._count,
                            "sha256": self._hash.hexdigest()})
        self._count = 0
        if self.on_shard is not None:
            self.on_shard(self)
