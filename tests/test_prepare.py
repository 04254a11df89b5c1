"""Dataset preparation: exact token counts, manifest, local jsonl/parquet/txt and (mocked) hub
sources, interrupt + resume to identical shards, re-runs, and every bad-input error."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from chimera.data.sources import DataError
from chimera.data.sources import PIECE_CHARS
from chimera.data.prepare import parse_count, prepare
from chimera.data.shards import MANIFEST, PROGRESS, ShardError, file_sha256, read_manifest
from chimera.data.tokenizers import TokenizerError

ROOT = Path(__file__).resolve().parents[1]
N_CHARS = 1115394                 # Tiny Shakespeare
SPLIT_AT = int(N_CHARS * 0.9)     # 1003854: nanoGPT's shakespeare split point


def quiet(**kw):
    return dict(progress=False, log=lambda *_: None, **kw)


def tokens(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / MANIFEST).read_text())
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


# --- Tiny Shakespeare: exact counts ------------------------------------------------------------
def test_shakespeare_char_counts_and_manifest(tmp_path, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    out = tmp_path / "char"
    r = prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out,
                command="python jobs/prepare.py --dataset shakespeare --tokenizer char", **quiet())
    m = json.loads((out / MANIFEST).read_text())
    assert m == r.manifest and not r.skipped
    assert m["format"] == "chimera-token-shards" and m["dtype"] == "uint16"
    assert m["tokenizer"]["name"] == "char" and m["tokenizer"]["vocab_size"] == 65
    assert m["tokenizer"]["vocab"] == "".join(sorted(set(text)))
    assert m["splits"]["train"]["tokens"] == 1003854 and m["splits"]["val"]["tokens"] == 111540
    assert m["split"] == {"method": "tail", "val_fraction": 0.1, "total_chars": N_CHARS,
                          "split_at_char": SPLIT_AT}
    assert m["command"].endswith("--tokenizer char")
    assert m["source"]["files"][0]["path"] == str(shakespeare_path.resolve())
    for split in ("train", "val"):
        for s in m["splits"][split]["shards"]:
            assert file_sha256(out / s["file"]) == s["sha256"]
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    vocab = m["tokenizer"]["vocab"]
    decode = lambda a: "".join(vocab[i] for i in a)  # noqa: E731
    assert decode(tokens(out, "train")) == text[:SPLIT_AT]
    assert decode(tokens(out, "val")) == text[SPLIT_AT:]
    assert not (out / PROGRESS).exists() and not list(out.glob("*.tmp"))


def test_shakespeare_gpt2_counts(tmp_path, shakespeare_path, tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    text = shakespeare_path.read_text(encoding="utf-8")
    assert len(enc.encode_ordinary(text)) == 338025            # shared/data/SOURCES.md
    out = tmp_path / "gpt2"
    m = prepare("shakespeare", sources=[shakespeare_path], out=out, **quiet()).manifest
    # the text is one document: train = text[:1003854] (no end-of-text, the document goes
    # on), val = text[1003854:] + <|endoftext|>; nanoGPT prints 301,966 / 36,059 for the halves
    assert m["splits"]["train"]["tokens"] == 301966
    assert m["splits"]["val"]["tokens"] == 36060
    assert m["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert tokens(out, "train").tolist() == enc.encode_ordinary(text[:SPLIT_AT])
    assert tokens(out, "val").tolist() == enc.encode_ordinary(text[SPLIT_AT:]) + [50256]
    # no val: the whole file + one end-of-text, identical to encoding it in one piece, also
    # when the file arrives as a single 1.1 MB jsonl document (cut into pieces internally)
    assert N_CHARS > 4 * PIECE_CHARS
    whole = enc.encode_ordinary(text) + [50256]
    m = prepare("shakespeare", sources=[shakespeare_path], out=tmp_path / "all", val_fraction=0,
                **quiet()).manifest
    assert m["splits"]["train"]["tokens"] == 338026 and m["splits"]["val"]["tokens"] == 0
    assert tokens(tmp_path / "all", "train").tolist() == whole
    doc = tmp_path / "one.jsonl"
    doc.write_text(json.dumps({"text": text}) + "\n")
    prepare("shakespeare", sources=[doc], out=tmp_path / "jsonl", val_fraction=0, **quiet())
    assert tokens(tmp_path / "jsonl", "train").tolist() == whole


def test_shakespeare_byte_counts(tmp_path, shakespeare_path):
    m = prepare("shakespeare", sources=[shakespeare_path], tokenizer="byte", out=tmp_path,
                **quiet()).manifest
    assert m["tokenizer"] == {"name": "byte", "vocab_size": 256, "eot_id": None}
    assert (m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]) == (1003854, 111540)


def test_shard_size_and_threads_do_not_change_the_tokens(tmp_path, shakespeare_path):
    one = prepare("shakespeare", sources=[shakespeare_path], tokenizer="char",
                  out=tmp_path / "one", num_proc=1, **quiet()).manifest
    many = prepare("shakespeare", sources=[shakespeare_path], tokenizer="char",
                   out=tmp_path / "many", shard_size=100_000, num_proc=2, **quiet()).manifest
    assert [s["tokens"] for s in many["splits"]["train"]["shards"]] == [100_000] * 10 + [3854]
    assert [s["tokens"] for s in many["splits"]["val"]["shards"]] == [100_000, 11540]
    assert [s["file"] for s in many["splits"]["val"]["shards"]] == ["val_000000.bin",
                                                                     "val_000001.bin"]
    for split in ("train", "val"):
        assert many["splits"][split]["tokens"] == one["splits"][split]["tokens"]
        assert np.array_equal(tokens(tmp_path / "one", split), tokens(tmp_path / "many", split))


def test_pieces_cut_only_at_tokenization_neutral_line_breaks():
    from chimera.data.sources import pieces

    doc = "word, word.\n\n  indented line\nnext line\n" * 20_000
    out = list(pieces([(doc, True)]))
    assert len(out) > 5 and "".join(t for t, _ in out) == doc
    assert [e for _, e in out] == [False] * (len(out) - 1) + [True]
    for (a, _), (b, _) in zip(out, out[1:]):
        assert len(a) >= PIECE_CHARS and a[-1] == "\n" and not a[-2].isspace()
        assert not b[0].isspace()
    assert list(pieces([("", True), ("short", True), ("", True)])) == [("short", True)]


def test_parse_count():
    assert parse_count("100M") == 100_000_000 and parse_count("1e8") == 10**8
    assert parse_count("64_000") == 64000 and parse_count("2k") == 2000
    with pytest.raises(ValueError, match="not a count"):
        parse_count("lots")


# --- local jsonl / parquet / txt sources --------------------------------------------------------
def _stories(shared_data, n=300) -> list[str]:
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
    return [s for s in text.split("\n\n") if s.strip()][:n]


def test_prepare_from_jsonl(tmp_path, shared_data, tiktoken_cache):
    docs = _stories(shared_data)
    src = tmp_path / "stories.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "story": d}) + "\n")
        f.write("\n")                                       # blank lines are skipped
    out = tmp_path / "out"
    m = prepare("tinystories", sources=[src], text_column="story", out=out, **quiet()).manifest
    train, val = tokens(out, "train"), tokens(out, "val")
    assert m["source"]["files"][0]["format"] == "jsonl" and m["source"]["text_column"] == "story"
    assert int((train == 50256).sum() + (val == 50256).sum()) == len(docs)
    assert m["documents"]["train"] + m["documents"]["val"] == len(docs)
    assert val[-1] == 50256 and m["split"]["total_chars"] == sum(map(len, docs))

    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = np.concatenate([train, val]).tolist()
    split_docs, cur = [], []
    for t in ids:
        if t == 50256:
            split_docs.append(cur)
            cur = []
        else:
            cur.append(t)
    # every document outside the one cut by the tail split encodes exactly as on its own
    exact = [enc.decode(d) == s for d, s in zip(split_docs, docs)]
    assert sum(exact) >= len(docs) - 1


def test_prepare_fineweb_edu_from_parquet(tmp_path, shared_data, tiktoken_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _stories(shared_data, 200)
    texts = [None if i % 50 == 7 else d for i, d in enumerate(docs)]   # null cells are skipped
    table = pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(len(docs))],
                      "score": np.linspace(2.5, 5.0, len(docs))})
    src = tmp_path / "fineweb" / "000_00000.parquet"
    src.parent.mkdir()
    pq.write_table(table, src, row_group_size=64)
    out = tmp_path / "out"
    m = prepare("fineweb-edu", sources=[src.parent], out=out, shard_size=4096,
                **quiet()).manifest                                   # a folder source
    n_docs = sum(t is not None for t in texts)
    assert m["source"]["files"][0]["format"] == "parquet"
    assert m["documents"]["train"] + m["documents"]["val"] == n_docs
    assert m["split"]["val_fraction"] == 0.005                          # fineweb-edu default
    all_ids = np.concatenate([tokens(out, "train"), tokens(out, "val")])
    assert int((all_ids == 50256).sum()) == n_docs
    assert len(m["splits"]["train"]["shards"]) > 1
    assert all(s["tokens"] == 4096 for s in m["splits"]["train"]["shards"][:-1])


def test_txt_documents_end_at_markers_and_wikitext_headings(tmp_path, shared_data, tiktoken_cache):
    sample = shared_data / "tinystories" / "tinystories_sample.txt"
    text = sample.read_text(encoding="utf-8")
    stories = [s for s in text.split("<|endoftext|>\n") if s]
    m = prepare("tinystories", sources=[sample], out=tmp_path / "ts", val_fraction=0,
                **quiet()).manifest
    ids = tokens(tmp_path / "ts", "train")
    assert m["documents"]["train"] == len(stories) == int((ids == 50256).sum())

    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    assert ids.tolist() == [t for s in stories for t in enc.encode_ordinary(s) + [50256]]

    raw = shared_data / "wikitext" / "wikitext-2-raw" / "wiki.test.raw"
    m = prepare("wikitext", sources=[raw], tokenizer="byte", out=tmp_path / "wt",
                **quiet()).manifest
    lf = raw.read_bytes().replace(b"\r\n", b"\n")                      # universal newlines
    # one document per top-level heading line ' = Title = ' (62 lines; two more lines start
    # with ' = ' but are table footnotes without the closing ' = ')
    assert m["documents"]["train"] + m["documents"]["val"] == 62
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == len(lf)
    assert bytes(np.concatenate([tokens(tmp_path / "wt", s) for s in ("train", "val")])
                 .astype(np.uint8)) == lf
    # wikitext rows exported as parquet are lines too (one row per line, as on the hub)
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [" = A = \n", " a1\n", "", " = = Sub = = \n", " a2\n", " = B = \n", " b\n"]
    pq.write_table(pa.table({"text": rows}), tmp_path / "wt.parquet")
    m = prepare("wikitext", sources=[tmp_path / "wt.parquet"], tokenizer="byte", val_fraction=0,
                out=tmp_path / "wtp", **quiet()).manifest
    assert m["documents"]["train"] == 2
    assert bytes(tokens(tmp_path / "wtp", "train").astype(np.uint8)) == "".join(rows).encode()


# --- hub sources (the `datasets` module is replaced: no network) --------------------------------
def _fake_hub(monkeypatch, rows: dict, fail: Exception | None = None):
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        if fail is not None:
            raise fail
        return list(rows[split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_sources_use_their_splits(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, {"train": [{"text": f"story {i}."} for i in range(20)],
                                    "validation": [{"text": f"val {i}."} for i in range(5)]})
    m = prepare("tinystories", out=tmp_path / "ts", tokenizer="byte", **quiet()).manifest
    assert ("roneneldan/TinyStories", None, "train", True) in calls
    assert m["split"] == {"method": "hub"} and m["documents"] == {"train": 20, "val": 5}
    assert bytes(tokens(tmp_path / "ts", "val").astype(np.uint8)) == b"".join(
        f"val {i}.".encode() for i in range(5))

    _fake_hub(monkeypatch, {"train": [{"text": t} for t in (
        " = A = \n", " a1\n", "", " = = Sub = = \n", " a2\n", " = B = \n", " b\n")],
        "validation": [{"text": " = V = \n"}, {"text": " v\n"}]})
    m = prepare("wikitext", out=tmp_path / "wt", tokenizer="char", **quiet()).manifest
    assert m["documents"] == {"train": 2, "val": 1}                     # articles, not rows
    assert m["source"]["name"] == "wikitext-103-raw-v1"

    calls = _fake_hub(monkeypatch, {"train": [{"text": f"doc {i} "} for i in range(8)]})
    m = prepare("fineweb-edu", out=tmp_path / "fw", tokenizer="byte", val_fraction=0.25,
                **quiet()).manifest
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert m["split"] == {"method": "interleave", "val_fraction": 0.25}
    assert bytes(tokens(tmp_path / "fw", "val").astype(np.uint8)) == b"doc 3 doc 7 "


# --- interruption, re-runs ---------------------------------------------------------------------
def test_killed_prepare_resumes_to_identical_shards(tmp_path, shakespeare_path):
    args = ["--dataset", "shakespeare", "--source", str(shakespeare_path), "--tokenizer", "char",
            "--shard_size", "100000", "--no_progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", shard_size=100_000,
            out=ref, **quiet())
    cmd = [sys.executable, str(ROOT / "jobs" / "prepare.py"), *args, "--out", str(out)]
    slow = {**os.environ, "CHIMERA_PREPARE_THROTTLE_S": "0.5"}     # sleep after each batch
    proc = subprocess.Popen(cmd, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not (out / "train_000001.bin").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)                            # a real crash, mid-run
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists() and (out / PROGRESS).exists()
    with pytest.raises(ShardError, match="unfinished preparation"):   # what the loader reads
        read_manifest(out)

    env = {k: v for k, v in os.environ.items() if k != "CHIMERA_PREPARE_THROTTLE_S"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept = int(done.stdout.split("resuming: ")[1].split()[0])
    assert kept >= 1                                                # finished work was kept
    assert shard_bytes(out) == shard_bytes(ref)
    m, mref = (json.loads((d / MANIFEST).read_text()) for d in (out, ref))
    assert m["splits"] == mref["splits"] and m["tokenizer"] == mref["tokenizer"]
    assert not (out / PROGRESS).exists() and not list(out.glob("*.tmp"))


def test_rerun_skips_and_other_settings_are_refused(tmp_path, shakespeare_path):
    out = tmp_path / "d"
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out, **quiet())
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out, **quiet())
    assert r.skipped and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(DataError, match=r"other settings \(tokenizer: 'char' -> 'byte'\).*"
                                        r"--overwrite"):
        prepare("shakespeare", sources=[shakespeare_path], tokenizer="byte", out=out, **quiet())
    m = prepare("shakespeare", sources=[shakespeare_path], tokenizer="byte", out=out,
                overwrite=True, shard_size=600_000, **quiet()).manifest
    assert m["tokenizer"]["name"] == "byte"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "train_000000.bin",
                                                     "train_000001.bin", "val_000000.bin"]
    # a damaged shard of a finished dataset: the re-run prepares it again
    (out / "train_000001.bin").write_bytes(b"\0\0")
    r = prepare("shakespeare", sources=[shakespeare_path], tokenizer="byte", out=out,
                shard_size=600_000, **quiet())
    assert not r.skipped and (out / "train_000001.bin").stat().st_size == 2 * 403854


def test_stale_temporary_and_unrecorded_shards_are_never_trusted(tmp_path, shakespeare_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "train_000000.bin").write_bytes(b"\1\0" * 10)    # looks like a shard, no record
    (out / "train_000001.bin.tmp").write_bytes(b"\1\0" * 10)
    m = prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out,
                **quiet()).manifest
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "train_000000.bin",
                                                     "val_000000.bin"]
    assert (out / "train_000000.bin").stat().st_size == 2 * m["splits"]["train"]["tokens"]


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_errors(tmp_path, shakespeare_path, monkeypatch):
    import urllib.request

    out = tmp_path / "out"
    p = lambda *a, **k: prepare(*a, out=k.pop("out", out), **quiet(**k))  # noqa: E731
    with pytest.raises(DataError, match="unknown dataset 'shakespear'; choose from shakespeare, "
                                        "wikitext, tinystories, fineweb-edu"):
        p("shakespear", sources=[shakespeare_path])
    with pytest.raises(DataError, match="unknown tokenizer 'wordpiece'; choose from gpt2, char, "
                                        "byte, bpe"):
        p("shakespeare", sources=[shakespeare_path], tokenizer="wordpiece")
    with pytest.raises(DataError, match=r"source .*nope.txt does not exist"):
        p("shakespeare", sources=[tmp_path / "nope.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"source .*empty.txt is empty"):
        p("shakespeare", sources=[empty])
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match="the sources contain no text"):
        p("tinystories", sources=[blank], tokenizer="byte")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="has no .txt/.jsonl/.parquet files"):
        p("tinystories", sources=[folder])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"story": "a"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:1: no text column 'text' \(fields: story\); "
                                        r"set --text_column"):
        p("tinystories", sources=[rows], tokenizer="byte")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON line"):
        p("tinystories", sources=[bad_json], tokenizer="byte")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="holds int, not text"):
        p("tinystories", sources=[numbers], tokenizer="byte")

    import pyarrow as pa
    import pyarrow.parquet as pq
    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), pqf)
    with pytest.raises(DataError, match=r"t.parquet has no column 'text' \(columns: content\); "
                                        r"set --text_column"):
        p("fineweb-edu", sources=[pqf], tokenizer="byte")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match=r"cannot read parquet file .*junk.parquet"):
        p("fineweb-edu", sources=[junk], tokenizer="byte")
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\xfd" * 50)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        p("shakespeare", sources=[binary], tokenizer="byte")

    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        p("shakespeare", sources=[shakespeare_path], val_fraction=1.0)
    with pytest.raises(DataError, match="shard_size must be a positive number"):
        p("shakespeare", sources=[shakespeare_path], shard_size=0)

    def offline(*a, **k):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"cannot download https://raw.githubusercontent.com/"
                                        r".*input.txt .*pass --source"):
        p("shakespeare", out=tmp_path / "dl")
    _fake_hub(monkeypatch, {}, fail=ConnectionError("no route to huggingface.co (test)"))
    with pytest.raises(DataError, match=r"cannot load roneneldan/TinyStories \(train\) from the "
                                        r"Hugging Face hub: ConnectionError.*--source"):
        p("tinystories", out=tmp_path / "hub")
    _fake_hub(monkeypatch, {"train": [{"story": "x"}]})
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: story\)"):
        p("tinystories", out=tmp_path / "hub2", tokenizer="byte")


def test_vocab_of_65536_is_refused(tmp_path):
    codes = [c for c in range(0x21, 0x21 + 70000) if not 0xD800 <= c < 0xE000]
    ok, big = tmp_path / "ok.txt", tmp_path / "big.txt"
    ok.write_text("".join(map(chr, codes[:65535])), encoding="utf-8")
    big.write_text("".join(map(chr, codes[:65536])), encoding="utf-8")
    m = prepare("shakespeare", sources=[ok], tokenizer="char", out=tmp_path / "a",
                **quiet()).manifest
    assert m["tokenizer"]["vocab_size"] == 65535 and tokens(tmp_path / "a", "val").max() > 60000
    with pytest.raises(DataError, match=r"vocabulary has 65536 symbols.*>= 65536 is refused"):
        prepare("shakespeare", sources=[big], tokenizer="char", out=tmp_path / "b", **quiet())


def test_gpt2_without_bpe_files_is_a_clear_error(tmp_path, shakespeare_path, monkeypatch):
    import requests
    import tiktoken.registry

    empty = tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(*a, **k):
        raise requests.ConnectionError("network is unreachable (test)")
    monkeypatch.setattr(requests, "get", no_network)
    with pytest.raises(TokenizerError, match="Set TIKTOKEN_CACHE_DIR"):
        prepare("shakespeare", sources=[shakespeare_path], out=tmp_path / "o", **quiet())


# --- the command line ---------------------------------------------------------------------------
@pytest.fixture
def cli_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("jobs_prepare", ROOT / "jobs" / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_bad_input_is_one_line(cli_main, capsys, tmp_path, shakespeare_path):
    cases = [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "shakespeare", "--source", str(tmp_path / "missing.txt")], "does not exist"),
        (["--dataset", "shakespeare", "--source", str(shakespeare_path), "--tokenizer", "wordpiece"],
         "unknown tokenizer 'wordpiece'"),
        (["--dataset", "shakespeare", "--source", str(shakespeare_path), "--tokenizer", "bpe"],
         "--tokenizer bpe needs --vocab_size N"),
        (["--dataset", "tinystories", "--source", str(shakespeare_path), "--val_fraction", "2"],
         "val_fraction must be in"),
    ]
    for argv, want in cases:
        assert cli_main([*argv, "--out", str(tmp_path / "o"), "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and want in err and err.count("\n") == 1, err


def test_cli_runs_as_a_new_user_would(tmp_path, shakespeare_path, _tiktoken_cache_copy):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(_tiktoken_cache_copy)}
    for tok, train, val in (("gpt2", 301966, 36060), ("char", 1003854, 111540)):
        out = tmp_path / tok
        r = subprocess.run([sys.executable, "jobs/prepare.py", "--dataset", "shakespeare",
                            "--source", str(shakespeare_path), "--tokenizer", tok,
                            "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "tok/s" in r.stderr                                   # the progress bar
        assert f"{train:,} tokens" in r.stdout and f"{val:,} tokens" in r.stdout
        assert str(out / MANIFEST) in r.stdout
        m = json.loads((out / MANIFEST).read_text())
        assert m["command"].startswith("python jobs/prepare.py --dataset shakespeare")


def test_cli_default_out_is_under_the_repository(cli_main, monkeypatch, tmp_path):
    import chimera.data.prepare

    seen = {}

    def fake_prepare(dataset, *, out, **kw):
        seen[kw["tokenizer"]] = Path(out)
        raise DataError("stop here")
    monkeypatch.setattr(chimera.data.prepare, "prepare", fake_prepare)
    monkeypatch.chdir(tmp_path)                       # not the cwd: the file's location
    for tok in ("gpt2", "char"):
        assert cli_main(["--dataset", "shakespeare", "--tokenizer", tok]) == 2
    assert seen == {"gpt2": ROOT / "data" / "shakespeare_gpt2", "char": ROOT / "data" / "shakespeare_char"}
