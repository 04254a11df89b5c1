"""`prepare(num_workers=N)`: tokenization in N Ray workers gives the same bytes (every shard,
its sha256, the manifest but `created`/`command`) as 1 worker and as the thread pool, for gpt2
and char, locally and into the object store; --num_proc/--num_workers validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chimera import storage
from chimera.data.parallel import check_workers
from chimera.data.prepare import prepare
from chimera.data.shards import MANIFEST, file_sha256
from chimera.data.sources import DataError

VOLATILE = ("created", "command")


def run(out, tok, shakespeare_path, logs=None, **kw) -> tuple[dict, dict[str, bytes]]:
    prepare("shakespeare", sources=[shakespeare_path], tokenizer=tok, out=out,
            shard_size=40_000 if tok == "gpt2" else 150_000, progress=False,
            log=(logs.append if logs is not None else lambda *_: None), **kw)
    if storage.is_uri(out):
        m = json.loads(storage.read_text(storage.join(out, MANIFEST)))
        files = {n: storage.read_bytes(storage.join(out, n)) for n in storage.listdir(out)
                 if n.endswith(".bin")}
    else:
        m = json.loads((Path(out) / MANIFEST).read_text())
        files = {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.bin"))}
    return {k: v for k, v in m.items() if k not in VOLATILE}, files


@pytest.mark.ray
@pytest.mark.parametrize("tok", ["gpt2", "char"])
def test_ray_workers_give_the_bytes_of_one_worker_and_of_threads(ray_cluster, tmp_path, tok,
                                                                 shakespeare_path,
                                                                 tiktoken_cache):
    logs: list[str] = []
    m2, f2 = run(tmp_path / "w2", tok, shakespeare_path, logs, num_workers=2)
    assert any("on 2 Ray worker(s) on 1 node(s)" in x for x in logs), logs
    assert any(x.startswith("the 2 Ray worker(s) tokenized for ") and x.endswith(" of 2 CPUs busy")
               for x in logs), logs
    m1, f1 = run(tmp_path / "w1", tok, shakespeare_path, num_workers=1)
    mt, ft = run(tmp_path / "threads", tok, shakespeare_path, num_proc=2)
    assert len(f2) >= 3 and f2 == f1 == ft
    assert m2 == m1 == mt
    for s in (s for sp in m2["splits"].values() for s in sp["shards"]):
        assert file_sha256(tmp_path / "w2" / s["file"]) == s["sha256"]
    assert m2["splits"]["train"]["tokens"] == {"gpt2": 301966, "char": 1003854}[tok]


@pytest.mark.ray
def test_ray_workers_into_the_object_store(ray_cluster, tmp_path, s3_prefix, shakespeare_path,
                                           tiktoken_cache):
    mr, fr = run(f"{s3_prefix}/w2", "gpt2", shakespeare_path, num_workers=2,
                 stage_dir=tmp_path / "stage")
    ml, fl = run(tmp_path / "local", "gpt2", shakespeare_path)
    assert fr == fl and mr == ml and len(fr) >= 3


@pytest.mark.ray
def test_more_workers_than_the_local_instance_has_cpus_is_refused(ray_cluster, tmp_path,
                                                                  shakespeare_path):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(DataError, match=rf"num_workers={cpus + 1} needs {cpus + 1} CPUs but the "
                                        rf"local Ray instance has {cpus}: lower --num_workers"):
        run(tmp_path / "o", "char", shakespeare_path, num_workers=cpus + 1)
    assert ray.is_initialized()                      # the session's instance is left running


@pytest.mark.ray
def test_a_worker_that_cannot_build_the_tokenizer_is_a_clear_error(ray_cluster):
    from chimera.data.parallel import RayEncoder
    from chimera.data.tokenizers import CharTokenizer

    class Broken(CharTokenizer):               # what a worker gets cannot be rebuilt there
        def to_dict(self):
            return {**super().to_dict(), "vocab_size": 99}

    with pytest.raises(DataError, match=r"the Ray workers cannot build the char tokenizer: .*"
                                        r"vocab_size=99 but the char tokenizer has "
                                        r"vocab_size=2"):
        RayEncoder(Broken("ab"), 1, log=lambda *_: None)


def test_num_proc_and_num_workers_are_checked():
    check_workers(None, None)
    check_workers(4, None)
    check_workers(None, 3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(DataError, match=r"num_workers must be an integer >= 1, got "):
            check_workers(None, bad)
        with pytest.raises(DataError, match=r"num_proc must be an integer >= 1, got "):
            check_workers(bad, None)
    with pytest.raises(DataError, match=r"num_proc=2 and num_workers=3 both given: num_proc is "
                                        r"the number of tokenizer threads in this process"):
        check_workers(2, 3)
