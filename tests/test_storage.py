"""chimera.storage against a real S3-compatible store (SeaweedFS, conftest.object_store) and
local folders: round trips compared by sha256, listings, the local cache, and refusals."""
from __future__ import annotations

import hashlib
import os

import pytest

from chimera import storage


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_remove_round_trip(where, tmp_path, request):
    base = str(tmp_path / "x") if where == "local" else request.getfixturevalue("s3_prefix")
    data = os.urandom(3_000_001)                  # not a multiple of any chunk size
    storage.write_bytes(storage.join(base, "a", "w.bin"), data)
    storage.write_text(storage.join(base, "b.json"), '{"k": 1}')
    assert _sha(storage.read_bytes(storage.join(base, "a", "w.bin"))) == _sha(data)
    assert storage.sha256(storage.join(base, "a", "w.bin")) == _sha(data)
    assert storage.read_json(storage.join(base, "b.json")) == {"k": 1}
    assert storage.listdir(base) == ["a", "b.json"]
    assert storage.walk_files(base) == {"a/w.bin": len(data), "b.json": 8}
    assert storage.is_dir(base) and storage.is_file(storage.join(base, "b.json"))
    assert storage.size(storage.join(base, "a", "w.bin")) == len(data)
    f = storage.open_ranged(storage.join(base, "a", "w.bin"))
    assert f.read_at(1000, 2_999_500) == data[2_999_500:3_000_500]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing"))
    with pytest.raises(storage.StorageError, match="missing"):
        storage.size(storage.join(base, "missing"))
    storage.remove(storage.join(base, "b.json"))
    assert not storage.exists(storage.join(base, "b.json"))
    storage.remove_dir(base)
    assert storage.walk_files(base) == {} and not storage.is_dir(base)


def test_upload_download_and_cache_keep_every_byte(tmp_path, s3_prefix, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"sub/w.bin": os.urandom(1_500_000), "c.json": b"{}", "t.pt": os.urandom(10)}
    for rel, b in files.items():
        (src / rel).write_bytes(b)
    storage.upload_dir(src, s3_prefix)
    assert {k: storage.sha256(storage.join(s3_prefix, k)) for k in files} == \
        {k: _sha(b) for k, b in files.items()}
    back = storage.download_dir(s3_prefix, tmp_path / "back")
    assert {k: _sha((back / k).read_bytes()) for k in files} == {k: _sha(b) for k, b in files.items()}
    c = storage.cached_dir(s3_prefix, "t", only=("sub/w.bin", "c.json"))
    assert sorted(p.name for p in c.rglob("*") if p.is_file() and not p.name.startswith(".")) == \
        ["c.json", "w.bin"]
    assert _sha((c / "sub/w.bin").read_bytes()) == _sha(files["sub/w.bin"])
    (c / "sub/w.bin").write_bytes(b"tampered")          # a damaged copy is fetched again
    again = storage.cached_dir(s3_prefix, "t", only=("sub/w.bin", "c.json"))
    assert again == c and _sha((c / "sub/w.bin").read_bytes()) == _sha(files["sub/w.bin"])
    storage.write_bytes(storage.join(s3_prefix, "c.json"), b'{"new": 1}')   # rewritten upstream
    assert (storage.cached_dir(s3_prefix, "t", only=("sub/w.bin", "c.json")) / "c.json").read_bytes() == b'{"new": 1}'


@pytest.mark.parametrize("bad,match", [
    ("s3:/bucket/x", "looks like a URI without '//'"),
    ("s3:bucket", "looks like a URI without '//'"),
    ("nosuch://bucket/x", "cannot open nosuch:// storage"),
    ("s3://", "needs a bucket"),
])
def test_mistyped_or_unknown_uris_are_refused_not_made_local_folders(bad, match, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match=match):
        storage.resolve(bad)
    assert list(tmp_path.iterdir()) == []


def test_a_bucket_that_does_not_exist_is_an_error(object_store):
    with pytest.raises(storage.StorageError, match="no-such-bucket-chimera/x.json: cannot write"):
        storage.write_text("s3://no-such-bucket-chimera/x.json", "{}")
    with pytest.raises(FileNotFoundError):
        storage.read_text("s3://no-such-bucket-chimera/x.json")
    assert not storage.exists("s3://no-such-bucket-chimera/x.json")
