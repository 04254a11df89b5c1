"""A prepared dataset on object storage (`jobs/prepare.py --out s3://...`, or any scheme
chimera.storage opens): prepare into a local staging folder, upload, manifest last.

    pub = Publisher("s3://bucket/data/fw", stage)   # stage: default_stage(uri) or --stage_dir
    m = remote_manifest(uri)                        # None: no finished dataset there
    pub.submit(stage / "train_000000.bin")          # upload as soon as a shard is final
    pub.finish(manifest)                            # the rest, stale shards out, manifest last

Why staging: the local pipeline (chimera.data.prepare) is already resumable and writes each
shard with a streaming sha256; object stores have no rename and no append, so a shard is
uploaded once it is final (its upload overlaps the tokenization of the next ones), and an
interrupted preparation resumes from the stage with no tokenization redone. A crash during
the upload leaves shards without a manifest: never a finished dataset, to prepare (this code)
or to the loader (`read_manifest`: no manifest.json). The remote `progress.json` says so while
the upload runs. Order on the store:
  1. `--overwrite` deletes the remote manifest.json FIRST, so no reader takes old + new
     shards for a dataset; other settings without --overwrite are refused before any write.
  2. shards, each checked by size after its upload (every one again when a re-run finds no
     manifest: uploads are not resumed, tokenization is).
  3. shard objects the new manifest does not list are deleted (a larger old dataset).
  4. manifest.json (the local bytes, one PUT: the completion marker), then progress.json goes.
After that the staged shards are removed; a downloaded default source (`source/`) stays, so a
re-run sees the same source fingerprint and finds the dataset finished (checked by size).
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from chimera import storage
from chimera.data.sources import DataError
from chimera.data.shards import (MANIFEST, PROGRESS, SPLITS, ShardError, is_shard_file,
                                 read_manifest, verify_shards)

UPLOAD_THREADS = 4


def default_stage(uri: str) -> Path:
    """<cache_root>/stage/<sha of the URI>: the staging folder of one remote dataset."""
    return storage.cache_root() / "stage" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def remote_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest at `uri`, or None when there is none (nothing, or a half-written upload).
    ShardError when there is a manifest.json that is not one of ours."""
    if not storage.is_file(storage.join(uri, MANIFEST)):
        return None
    return read_manifest(uri)


def drop_manifest(uri: str) -> None:
    """Before anything else is written: the dataset at `uri` stops being 'finished'."""
    storage.remove(storage.join(uri, MANIFEST))


def check_remote(uri: str, settings: dict, overwrite: bool,
                 refuse_other: Callable[[str, dict, dict], None], log) -> dict | None:
    """The manifest of a finished dataset at `uri` made with `settings`, its shards all there
    by size (nothing to do), else None. Other settings: refuse_other raises (DataError);
    a manifest.json that is not ours is refused too. With overwrite, or when listed shards
    are missing, the remote manifest is deleted here, before anything is written."""
    if overwrite:
        drop_manifest(uri)
        return None
    try:
        m = remote_manifest(uri)
    except ShardError as e:
        raise DataError(f"{e}: pass --overwrite to replace what is at {uri}, or choose another "
                        f"--out") from None
    if m is None:
        return None
    refuse_other(uri, m, settings)
    try:
        verify_shards(uri, m)                    # sizes, from one listing of the prefix
    except ShardError as e:
        log(f"{e}: a shard listed in {MANIFEST} is missing or damaged; preparing again")
        drop_manifest(uri)
        return None
    log(f"{uri} is already prepared with these settings; nothing to do")
    return m


class Publisher:
    """Uploads the shards of one staged preparation to `uri`, then its manifest."""

    def __init__(self, uri: str, stage: Path, log: Callable[[str], None] = print):
        self.uri, self.stage, self.log = uri, Path(stage), log
        self._ex: ThreadPoolExecutor | None = None
        self._jobs: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._started = False

    def submit(self, path: Path) -> None:
        """Upload a finished shard in the background (once per file name)."""
        with self._lock:
            if path.name in self._jobs:
                return
            if not self._started:
                self._start()
            self._jobs[path.name] = self._ex.submit(self._upload, Path(path))

    def finish(self, manifest: dict[str, Any]) -> None:
        files = [s["file"] for sp in SPLITS for s in manifest["splits"][sp]["shards"]]
        for f in files:
            self.submit(self.stage / f)
        for f in files:
            self._jobs[f].result()                       # StorageError of a failed upload
        keep = set(files)
        for name in storage.listdir(self.uri):
            if is_shard_file(name) and name not in keep:
                storage.remove(storage.join(self.uri, name))
        self._put(MANIFEST, (self.stage / MANIFEST).read_bytes())
        storage.remove(storage.join(self.uri, PROGRESS))
        self.close()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def _start(self) -> None:
        self._started = True
        self._put(PROGRESS, json.dumps({
            "state": "uploading: no manifest.json yet, so this is not a finished dataset",
            "from": f"{socket.gethostname()}:{self.stage}"}, indent=1).encode())
        self._ex = ThreadPoolExecutor(UPLOAD_THREADS)

    def _upload(self, path: Path) -> None:
        dest = storage.join(self.uri, path.name)
        storage.upload_file(path, dest)
        want, got = path.stat().st_size, storage.size(dest)
        if got != want:
            raise storage.StorageError(f"{dest}: upload of {path} stored {got} bytes, "
                                       f"not {want}")

    def _put(self, name: str, data: bytes) -> None:
        dest = storage.join(self.uri, name)
        storage.write_bytes(dest, data)
        if storage.size(dest) != len(data):
            raise storage.StorageError(f"{dest}: stored {storage.size(dest)} bytes, "
                                       f"not {len(data)}")
