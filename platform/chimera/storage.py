"""Files wherever they live: a local path or an object-store URI (s3://, gs://, hdfs://,
abfs://: every scheme pyarrow's filesystems know), through one set of functions.

    from chimera import storage
    storage.is_uri("s3://bucket/runs")                  # True; "runs", "/abs" -> False
    storage.join("s3://bucket/runs", "r1", "meta.json") # s3://bucket/runs/r1/meta.json
    storage.write_text(uri, text); storage.read_text(uri)   # whole objects (one PUT / GET)
    storage.listdir(uri)                                # names of the direct children
    storage.upload_dir(local_dir, uri); storage.download_dir(uri, local_dir)
    storage.cached_dir(uri)                             # a verified local copy (serving)
    f = storage.open_ranged(uri); f.read_at(nbytes, offset)    # ranged reads (the loader)

Credentials and endpoints come from the standard settings of each store (for S3: the AWS
variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION, an
instance profile, ~/.aws), exactly as pyarrow and Ray's own storage read them, so the same
URI means the same bytes to the jobs, Ray Train and Ray Tune. A scheme pyarrow cannot open is
a StorageError naming it, never a local folder called "s3:" (which is what Path("s3://b/x")
would silently make).

Writes of one object are atomic on object stores (a PUT is all or nothing) and made atomic on
local disks (a temporary file, then os.replace); a *directory* is never atomic: writers that
need "complete or absent" write a marker object last (the dataset manifest, a checkpoint's
weights before its config).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_ENV = "CHIMERA_CACHE"          # where cached_dir keeps its copies (default ~/.cache/chimera)


class StorageError(ValueError):
    """A path or URI that cannot be used: unknown scheme, missing object, unreadable store."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for `scheme://...` (file:// included); False for local paths and None."""
    return path is not None and bool(_SCHEME.match(str(path)))


def resolve(path: str | os.PathLike) -> str:
    """A URI as it is (its scheme checked), a local path made absolute. A local path that looks
    like a mistyped URI ("s3:/bucket", "s3:bucket/x") is a StorageError, not a folder "s3:"."""
    text = str(path)
    if is_uri(text):
        check_uri(text)
        return text
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", text)
    if m:
        raise StorageError(f"{text!r} looks like a URI without '//': write {m.group(1)}://...")
    return str(_local(text).resolve())


# the schemes pyarrow.fs.FileSystem.from_uri opens (S3 and GCS need pyarrow built with them)
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
BUCKET_SCHEMES = ("s3", "gs", "gcs")


def check_uri(uri: str) -> None:
    """A URI this module can open, checked without touching the network: a known scheme and,
    for bucket stores, a bucket. StorageError naming the problem otherwise."""
    m = _SCHEME.match(uri)
    if not m:
        raise StorageError(f"{uri!r} is not a URI (scheme://...)")
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{uri}: cannot open {m.group(1)}:// storage (pyarrow's filesystems "
                           f"know {', '.join(s + '://' for s in SCHEMES)})")
    if scheme in ("s3", "gs", "gcs", "abfs", "abfss") and not uri[m.end():].strip("/"):
        raise StorageError(f"{uri}: a URI needs a bucket, e.g. {scheme}://BUCKET/chimera")


def fs_path(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; StorageError when pyarrow cannot open it.
    Bucket stores get one FileSystem per bucket and credentials (opening one asks the store
    for the bucket's region: a request per call otherwise)."""
    check_uri(uri)
    m = _SCHEME.match(uri)
    if m.group(1).lower() not in BUCKET_SCHEMES:
        return _open(uri)
    bucket, _, key = uri[m.end():].partition("/")
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_"))))
    fs = _bucket_fs(f"{m.group(0)}{bucket}", settings)
    return fs, f"{bucket}/{key.strip('/')}" if key.strip("/") else bucket


@functools.lru_cache(maxsize=32)
def _bucket_fs(root: str, settings: tuple):
    return _open(root)[0]


def _open(uri: str):
    import pyarrow.fs as pafs
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:             # pyarrow.ArrowInvalid is a ValueError
        raise StorageError(f"{uri}: cannot open its storage ({e})") from None


def _local(path) -> Path:
    return Path(path).expanduser()


def join(base: str | os.PathLike, *names: str) -> str:
    """base/names... : URIs with '/', local paths with the OS separator."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(base).joinpath(*names))


def parent(path: str) -> str:
    if is_uri(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _info(uri: str):
    fs, p = fs_path(uri)
    try:
        return fs.get_file_info(p)
    except OSError as e:
        raise StorageError(f"{uri}: {e}") from None


def exists(path: str | os.PathLike) -> bool:
    if not is_uri(path):
        return _local(path).exists()
    import pyarrow.fs as pafs
    return _info(str(path)).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    if not is_uri(path):
        return _local(path).is_file()
    import pyarrow.fs as pafs
    return _info(str(path)).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A local folder, or a URI prefix holding at least one object (object stores have no
    empty directories; a bucket counts)."""
    if not is_uri(path):
        return _local(path).is_dir()
    import pyarrow.fs as pafs
    info = _info(str(path))
    if info.type == pafs.FileType.Directory:
        return True
    return info.type == pafs.FileType.NotFound and bool(listdir(str(path)))


def size(path: str | os.PathLike) -> int:
    """Bytes of a file; StorageError when it is not there."""
    if not is_uri(path):
        try:
            return _local(path).stat().st_size
        except OSError as e:
            raise StorageError(f"{path}: {e.strerror}") from None
    import pyarrow.fs as pafs
    info = _info(str(path))
    if info.type != pafs.FileType.File:
        raise StorageError(f"{path}: no such object")
    return int(info.size)


def listdir(path: str | os.PathLike) -> list[str]:
    """Sorted names of the direct children (files and folders); [] when there is nothing."""
    if not is_uri(path):
        p = _local(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    import pyarrow.fs as pafs
    fs, p = fs_path(str(path))
    try:
        infos = fs.get_file_info(pafs.FileSelector(p.rstrip("/"), allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{path}: {e}") from None
    return sorted(i.base_name for i in infos)


def walk_files(path: str | os.PathLike) -> dict[str, int]:
    """{relative path: size} of every file under path (recursive)."""
    if not is_uri(path):
        root = _local(path)
        return {str(f.relative_to(root)): f.stat().st_size
                for f in sorted(root.rglob("*")) if f.is_file()} if root.is_dir() else {}
    import pyarrow.fs as pafs
    fs, p = fs_path(str(path))
    p = p.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{path}: {e}") from None
    return {i.path[len(p) + 1:]: int(i.size) for i in infos if i.type == pafs.FileType.File}


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError when it is not there."""
    if not is_uri(path):
        return _local(path).read_bytes()
    fs, p = fs_path(str(path))
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "NoSuchKey" in str(e):
            raise FileNotFoundError(f"{path}: no such object") from None
        raise StorageError(f"{path}: {e}") from None


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike):
    return json.loads(read_text(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file whole: one PUT on object stores, a temp file + os.replace locally."""
    if not is_uri(path):
        p = _local(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, p = fs_path(str(path))
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"{path}: cannot write ({e})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it is there."""
    if not is_uri(path):
        _local(path).unlink(missing_ok=True)
        return
    fs, p = fs_path(str(path))
    _delete(path, fs.delete_file, p)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder / prefix and everything under it, if it is there."""
    if not is_uri(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    fs, p = fs_path(str(path))
    _delete(path, fs.delete_dir, p.rstrip("/"))


def _delete(path, delete, p: str) -> None:
    """delete(p); what is already gone is not an error, anything else a StorageError."""
    try:
        delete(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "not found" not in str(e).lower():
            raise StorageError(f"{path}: cannot delete ({e})") from None


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not hours into a run: for a URI, write and delete a probe object under it
    (a missing bucket, wrong credentials or an unreachable endpoint are a StorageError naming
    the URI); local folders are left to the writer (they are created on demand)."""
    if not is_uri(path):
        return
    probe = join(str(path), f".chimera_probe_{os.getpid()}")
    write_bytes(probe, b"")
    remove(probe)


def upload_file(local: str | os.PathLike, uri: str) -> None:
    import pyarrow.fs as pafs
    fs, p = fs_path(uri)
    try:
        pafs.copy_files(str(Path(local).resolve()), p, destination_filesystem=fs)
    except OSError as e:
        raise StorageError(f"{uri}: cannot upload {local} ({e})") from None


def upload_dir(local: str | os.PathLike, uri: str, replace: bool = True) -> None:
    """Copy local folder `local` to `uri` (everything under it); `replace`: delete what was
    at `uri` first. Sizes are compared after the copy; a mismatch is a StorageError."""
    import pyarrow.fs as pafs
    if replace:
        remove_dir(uri)
    fs, p = fs_path(uri)
    try:
        pafs.copy_files(str(Path(local).resolve()), p.rstrip("/"), destination_filesystem=fs,
                        use_threads=True)
    except OSError as e:
        raise StorageError(f"{uri}: cannot upload {local} ({e})") from None
    want, got = walk_files(local), walk_files(uri)
    bad = [k for k, v in want.items() if got.get(k) != v]
    if bad:
        raise StorageError(f"{uri}: upload of {local} incomplete ({', '.join(bad[:5])})")


def download_dir(uri: str, local: str | os.PathLike) -> Path:
    """Copy everything under `uri` into local folder `local` (created); sizes checked."""
    import pyarrow.fs as pafs
    fs, p = fs_path(uri)
    dst = _local(local).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    want = walk_files(uri)
    if not want:
        raise StorageError(f"{uri}: nothing there to download")
    try:
        pafs.copy_files(p.rstrip("/"), str(dst), source_filesystem=fs, use_threads=True)
    except OSError as e:
        raise StorageError(f"{uri}: cannot download ({e})") from None
    got = walk_files(dst)
    bad = [k for k, v in want.items() if got.get(k) != v]
    if bad:
        raise StorageError(f"{uri}: download incomplete ({', '.join(bad[:5])})")
    return dst


def _download_file(uri: str, local: Path, chunk: int = 1 << 24) -> None:
    with open(local, "wb") as f:
        for block in _stream(uri, chunk):
            f.write(block)


def sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """hex sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    for block in _stream(path, chunk):
        h.update(block)
    return h.hexdigest()


def _stream(path, chunk: int) -> Iterator[bytes]:
    if not is_uri(path):
        with open(_local(path), "rb") as f:
            while b := f.read(chunk):
                yield b
        return
    fs, p = fs_path(str(path))
    with fs.open_input_stream(p) as f:
        while b := f.read(chunk):
            yield b


def open_ranged(path: str | os.PathLike):
    """A random-access file: `.read_at(nbytes, offset)` (one ranged GET on object stores),
    `.size()`, `.close()`."""
    import pyarrow as pa
    if not is_uri(path):
        return pa.memory_map(str(_local(path)), "r")
    fs, p = fs_path(str(path))
    try:
        return fs.open_input_file(p)
    except OSError as e:
        raise StorageError(f"{path}: cannot open ({e})") from None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chimera")


def cached_dir(uri: str, what: str = "objects", only: tuple[str, ...] | None = None) -> Path:
    """A local copy of the folder at `uri` (only the files named in `only`, when given), kept
    under <cache_root>/<what>/<sha of uri>/ and reused while every file there has the size the
    store lists (a re-written checkpoint, whose listing differs, is downloaded again). The copy appears whole or not at all (a temp
    folder, then a rename). Local paths are returned as they are."""
    if not is_uri(uri):
        return _local(uri).resolve()
    listing = walk_files(uri)
    if only is not None:
        listing = {k: v for k, v in listing.items() if k in only}
    if not listing:
        raise StorageError(f"{uri}: no such folder (nothing stored under it)")
    key = hashlib.sha256(f"{uri.rstrip('/')}|{only}".encode()).hexdigest()[:16]
    dst = cache_root() / what / key
    stamp = dst / ".chimera_listing.json"

    def valid() -> bool:
        return (stamp.is_file() and json.loads(stamp.read_text()) == listing and
                all((dst / k).is_file() and (dst / k).stat().st_size == v for k, v in listing.items()))
    if valid():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if only is None:
        download_dir(uri, tmp)               # sizes checked against the listing
    else:
        tmp.mkdir(parents=True)
        for rel in listing:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _download_file(join(uri, rel), tmp / rel)
            if (tmp / rel).stat().st_size != listing[rel]:
                raise StorageError(f"{join(uri, rel)}: download incomplete")
    (tmp / stamp.name).write_text(json.dumps(listing))
    # another process (a second replica on this node) may have finished first: keep its copy
    # when it is current; a stale copy is moved aside before the new one takes its name
    if dst.exists():
        if valid():
            shutil.rmtree(tmp, ignore_errors=True)
            return dst
        old = dst.with_name(dst.name + f".old{os.getpid()}")
        os.replace(dst, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, dst)
    except OSError:                          # lost a race to another process's rename
        shutil.rmtree(tmp, ignore_errors=True)
        if not valid():
            raise StorageError(f"{uri}: the local copy in {dst} is being replaced; retry") from None
    return dst
