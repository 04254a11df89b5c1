"""`jobs/prepare.py --out s3://...` on the tests' real S3 server (SeaweedFS): the shards and the
manifest read back are byte-identical (sha256) to a local preparation; a crash leaves a
half-written dataset that is never taken for a finished one and resumes from the stage;
re-runs do nothing; other settings are refused, --overwrite deletes the manifest first;
mistyped URIs and conflicting flags are errors that name them."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chimera import storage
from chimera.data.prepare import prepare
from chimera.data.publish import default_stage, remote_manifest
from chimera.data.shards import MANIFEST, PROGRESS, ShardError, file_sha256, read_manifest
from chimera.data.sources import DataError
from chimera.paths import resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("created", "command")          # the only manifest fields that differ between runs


def quiet(logs: list | None = None, **kw):
    return dict(progress=False, log=(logs.append if logs is not None else lambda *_: None), **kw)


def shard_files(m: dict) -> list[dict]:
    return [s for split in ("train", "val") for s in m["splits"][split]["shards"]]


def stable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in VOLATILE}


def assert_same_as_local(uri: str, local: Path) -> dict:
    """Every object at `uri` is one the local preparation wrote, with its bytes (sha256 of what
    is read back == the manifest's == the local file's), and the manifest matches."""
    m = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    mloc = json.loads((local / MANIFEST).read_text())
    assert stable(m) == stable(mloc)
    assert sorted(storage.listdir(uri)) == sorted([MANIFEST] + [s["file"] for s in shard_files(m)])
    for s in shard_files(m):
        obj = storage.join(uri, s["file"])
        assert storage.sha256(obj) == s["sha256"] == file_sha256(local / s["file"])
        assert storage.read_bytes(obj) == (local / s["file"]).read_bytes()
    return m


@pytest.fixture
def cli_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("jobs_prepare", ROOT / "jobs" / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_out_s3_is_byte_identical_to_a_local_prepare(cli_main, tmp_path, s3_prefix,
                                                           shakespeare_path, tiktoken_cache,
                                                           capsys):
    for tok in ("char", "gpt2"):
        uri, local = f"{s3_prefix}/{tok}", tmp_path / tok
        prepare("shakespeare", sources=[shakespeare_path], tokenizer=tok, out=local,
                shard_size=150_000, **quiet())
        argv = ["--dataset", "shakespeare", "--source", str(shakespeare_path), "--tokenizer",
                tok, "--shard_size", "150000", "--out", uri, "--no_progress"]
        assert cli_main(argv) == 0
        out = capsys.readouterr().out
        assert f"manifest {uri}/{MANIFEST}" in out
        m = assert_same_as_local(uri, local)
        assert len(shard_files(m)) >= 3 and m["command"].endswith("--no_progress")
        assert m["splits"]["train"]["tokens"] == {"char": 1003854, "gpt2": 301966}[tok]
        stage = default_stage(uri)                      # under the fresh HOME's cache
        assert stage.parent == storage.cache_root() / "stage"
        assert not [p for p in stage.iterdir() if p.name != "source"]   # shards uploaded, gone

    # a re-run of the finished remote dataset does nothing: no object is written again
    import pyarrow.fs as pafs
    fs, path = storage.fs_path(f"{s3_prefix}/char")
    before = {i.path: i.mtime for i in fs.get_file_info(pafs.FileSelector(path))}
    argv[argv.index("gpt2")] = "char"
    argv[argv.index(f"{s3_prefix}/gpt2")] = f"{s3_prefix}/char"
    assert cli_main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {i.path: i.mtime for i in fs.get_file_info(pafs.FileSelector(path))} == before


def test_killed_upload_is_never_finished_and_resumes(tmp_path, s3_prefix, shakespeare_path):
    uri, ref = f"{s3_prefix}/ds", tmp_path / "ref"
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", shard_size=100_000,
            out=ref, **quiet())
    stage = tmp_path / "stage"
    cmd = [sys.executable, str(ROOT / "jobs" / "prepare.py"), "--dataset", "shakespeare",
           "--source", str(shakespeare_path), "--tokenizer", "char", "--shard_size", "100000",
           "--no_progress", "--out", uri, "--stage_dir", str(stage)]
    slow = {**os.environ, "CHIMERA_PREPARE_THROTTLE_S": "0.5"}      # sleep after each batch
    proc = subprocess.Popen(cmd, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while not storage.is_file(f"{uri}/train_000001.bin"):       # uploaded while preparing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard was uploaded"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)                            # a real crash, mid-run
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    names = storage.listdir(uri)
    assert "train_000000.bin" in names and MANIFEST not in names and PROGRESS in names
    assert remote_manifest(uri) is None                             # not a finished dataset
    with pytest.raises(ShardError, match="holds an unfinished preparation"):   # the loader's view
        read_manifest(uri)
    assert "not a finished dataset" in storage.read_text(f"{uri}/{PROGRESS}")

    env = {k: v for k, v in os.environ.items() if k != "CHIMERA_PREPARE_THROTTLE_S"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split("resuming: ")[1].split()[0]) >= 1  # tokenization kept
    assert_same_as_local(uri, ref)
    assert not list(stage.glob("*.bin")) and not list(stage.glob("*.json"))


def test_interrupted_upload_resumes_from_the_finished_stage(tmp_path, s3_prefix,
                                                            shakespeare_path, monkeypatch):
    uri, ref, stage = f"{s3_prefix}/ds", tmp_path / "ref", tmp_path / "stage"
    kw = dict(sources=[shakespeare_path], tokenizer="char", shard_size=200_000)
    prepare("shakespeare", out=ref, **kw, **quiet())
    real, calls = storage.upload_file, []

    def flaky(local, dest):
        calls.append(dest)
        if len(calls) == 3:
            raise storage.StorageError(f"{dest}: connection reset (test)")
        real(local, dest)
    monkeypatch.setattr(storage, "upload_file", flaky)
    with pytest.raises(storage.StorageError, match="connection reset"):
        prepare("shakespeare", out=uri, stage_dir=stage, **kw, **quiet())
    assert remote_manifest(uri) is None and storage.is_file(f"{uri}/{PROGRESS}")
    assert (stage / MANIFEST).is_file()                              # tokenization finished

    monkeypatch.setattr(storage, "upload_file", real)
    logs: list[str] = []
    r = prepare("shakespeare", out=uri, stage_dir=stage, **kw, **quiet(logs))
    assert not r.skipped and r.out_dir == uri
    assert any("holds the finished shards" in x for x in logs), logs   # nothing re-tokenized
    assert_same_as_local(uri, ref)


def test_other_settings_refused_and_overwrite_drops_the_manifest_first(
        tmp_path, s3_prefix, shakespeare_path, monkeypatch):
    uri = f"{s3_prefix}/ds"
    kw = dict(sources=[shakespeare_path], stage_dir=tmp_path / "stage")
    prepare("shakespeare", out=uri, tokenizer="char", shard_size=100_000, **kw, **quiet())
    before = storage.read_bytes(f"{uri}/{MANIFEST}")
    with pytest.raises(DataError, match=r"s3://.* already holds a prepared dataset made with "
                                        r"other settings \(shard_size: 100000 -> 600000; "
                                        r"tokenizer: 'char' -> 'byte'\).*"
                                        r"--overwrite"):
        prepare("shakespeare", out=uri, tokenizer="byte", shard_size=600_000, **kw, **quiet())
    assert storage.read_bytes(f"{uri}/{MANIFEST}") == before and len(storage.listdir(uri)) == 14

    real, seen = storage.upload_file, []

    def spy(local, dest):                    # is the old manifest still there at each upload?
        seen.append(storage.is_file(f"{uri}/{MANIFEST}"))
        real(local, dest)
    monkeypatch.setattr(storage, "upload_file", spy)
    prepare("shakespeare", out=uri, tokenizer="byte", shard_size=600_000, overwrite=True,
            **kw, **quiet())
    assert seen == [False, False, False]
    prepare("shakespeare", out=tmp_path / "ref", sources=[shakespeare_path], tokenizer="byte",
            shard_size=600_000, **quiet())
    m = assert_same_as_local(uri, tmp_path / "ref")            # the 11 old char shards are gone
    assert m["tokenizer"]["name"] == "byte" and len(shard_files(m)) == 3

    # a shard damaged in the store: the re-run sees it by size and prepares again
    storage.write_bytes(f"{uri}/train_000001.bin", b"\0\0")
    logs: list[str] = []
    r = prepare("shakespeare", out=uri, tokenizer="byte", shard_size=600_000, **kw,
                **quiet(logs))
    assert not r.skipped and any("missing or damaged" in x for x in logs)
    assert_same_as_local(uri, tmp_path / "ref")

    # a manifest.json that is not ours is not replaced without --overwrite
    other = f"{s3_prefix}/foreign"
    storage.write_text(f"{other}/{MANIFEST}", '{"hello": 1}')
    with pytest.raises(DataError, match=r"is not a chimera-token-shards manifest: pass "
                                        r"--overwrite"):
        prepare("shakespeare", out=other, tokenizer="byte", **kw, **quiet())


def test_bad_uris_and_flags_are_one_line_errors(cli_main, capsys, tmp_path, shakespeare_path,
                                                object_store):
    base = ["--dataset", "shakespeare", "--source", str(shakespeare_path), "--tokenizer",
            "char", "--no_progress"]
    cases = [
        (["--out", "s3:/chimera-test/x"], "'s3:/chimera-test/x' looks like a URI without '//': "
                                          "write s3://..."),
        (["--out", "s3:chimera-test/x"], "looks like a URI without '//'"),
        (["--out", "nosuch://bucket/x"], "nosuch://bucket/x: cannot open nosuch:// storage"),
        (["--out", "s3://"], "a URI needs a bucket, e.g. s3://BUCKET/chimera"),
        (["--out", str(tmp_path / "o"), "--stage_dir", str(tmp_path / "s")],
         "stage_dir is for an object-store out"),
        (["--out", "s3://chimera-test/x", "--stage_dir", "s3://chimera-test/s"],
         "stage_dir must be a local folder"),
        (["--out", str(tmp_path / "o"), "--num_workers", "0"], "num_workers must be an integer "
                                                                ">= 1, got 0"),
        (["--out", str(tmp_path / "o"), "--num_proc", "0"], "num_proc must be an integer >= 1"),
        (["--out", str(tmp_path / "o"), "--num_proc", "2", "--num_workers", "2"],
         "num_proc=2 and num_workers=2 both given"),
    ]
    for argv, want in cases:
        assert cli_main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and want in err and err.count("\n") == 1, err
    assert not (Path.cwd() / "s3:").exists() and not (ROOT / "s3:").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_resolve_data_dir_keeps_uris_as_strings(tmp_path, monkeypatch):
    assert resolve_data_dir("s3://b/data/x", "shakespeare", "char") == "s3://b/data/x"
    assert isinstance(resolve_data_dir("s3://b/x", "shakespeare", None), str)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel", "shakespeare", None) == tmp_path.resolve() / "rel"
    with pytest.raises(storage.StorageError, match="looks like a URI without '//'"):
        resolve_data_dir("s3:/b/x", "shakespeare", None)
    with pytest.raises(storage.StorageError, match="cannot open nosuch:// storage"):
        resolve_data_dir("nosuch://b/x", "shakespeare", None)
