"""The trained byte-level BPE (`--tokenizer bpe --vocab_size N`): every string round-trips
(seeded random strings and edge cases), training is deterministic (in this process and in
another), the tokenizer is trained on the train split only and travels in the manifest and
every checkpoint, bad flags are refused, Ray workers give the shards of threads, bits per byte
counts each token's bytes, and serving's detokenizer shows exact text."""
from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chimera.data.prepare import prepare
from chimera.data.shards import MANIFEST
from chimera.data.tokenizers import (BPETokenizer, Tokenizer, TokenizerError, get_tokenizer,
                                     token_bytes)
from serve.detokenizer import Detokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400

EDGE_CASES = [
    "", " ", "\x00", "\x00" * 1000, "a\x00b\x00\x00c", " " * 10_000, "\n" * 5000, "a" * 100_000,
    "\t\r\n\v\f\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000\u200b\ufeff",
    "e\u0301\u0301\u0301 n\u0303 \u0915\u094d\u0937 a\u20dd", "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈 🇫🇷",
    "<|endoftext|>", "x<|endoftext|>y <|endoftext|><|endoftext|>", "\ufffd\uffff\U0010ffff",
    "It's  don't   we'll\n\n\n  \n\tx", "ünïcödé 你好世界 Привет مرحبا שלום", "\r\n" * 300,
    "12345678901234567890 3.14159 -0 1e10", "  leading and trailing  ", "🙂" * 3000,
]
ALPHABET_RANGES = [(0x00, 0x7F), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
                   (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x3000, 0x30FF),
                   (0x4E00, 0x4FFF), (0xAC00, 0xAC80), (0xE000, 0xE010), (0xFFF0, 0xFFFF),
                   (0x1F300, 0x1FAFF), (0x10000, 0x10100), (0x10FF00, 0x10FFFF)]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded random strings of any code point but surrogates: mostly ASCII and whitespace
    runs (what merges are made of) mixed with other scripts, combining marks, emoji, controls."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 120)):
            r = rng.random()
            if r < 0.35:
                chars.append(rng.choice("etaoin shrdlu\n"))
            elif r < 0.45:
                chars.append(rng.choice(" \t\n\r\x00") * rng.randint(1, 20))
            else:
                lo, hi = rng.choice(ALPHABET_RANGES)
                chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path) -> str:
    with open(shakespeare_path, encoding="utf-8") as f:     # universal newlines, as prepare
        return f.read()


@pytest.fixture(scope="module")
def tok(shakespeare_text) -> BPETokenizer:
    return BPETokenizer.train([shakespeare_text[:300_000]], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, shakespeare_path) -> Path:
    out = tmp_path_factory.mktemp("shakespeare_bpe")
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="bpe", vocab_size=VOCAB,
            out=out, progress=False, log=lambda *_: None)
    return out


# --- the codec -----------------------------------------------------------------------------
def test_every_string_round_trips_byte_for_byte(tok):
    assert (tok.vocab_size, tok.eot_id) == (VOCAB, VOCAB - 1)
    n_bytes = tok.token_bytes()
    strings = EDGE_CASES + random_strings(400)
    batch = tok.encode_batch(strings)
    for s, ids_b in zip(strings, batch):
        ids = tok.encode(s)
        assert ids == ids_b and tok.encode_to_numpy(s).tolist() == ids
        assert tok.decode(ids) == s, s[:80]
        raw = s.encode("utf-8")
        assert b"".join(tok.id_bytes(i) for i in ids) == raw      # exact bytes, not just text
        assert int(n_bytes[ids].sum()) == len(raw)                # what bits per byte counts
        assert tok.eot_id not in ids                               # ordinary encoding
    assert tok.encode("hello") != [ord(c) for c in "hello"]        # merges happen at all
    assert max(map(len, tok.encode_batch(["the king", " and the"]))) < 8


def test_special_text_and_broken_utf8(tok):
    s = "a<|endoftext|>b"
    assert tok.encode_with_special(s) == tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.decode(tok.encode_with_special(s)) == s
    assert tok.id_bytes(tok.eot_id) == b"<|endoftext|>" and tok.token_bytes()[tok.eot_id] == 0
    ids = tok.encode("😀")                                    # 4 bytes, split across ids
    assert len(ids) > 1 and tok.decode(ids[:-1]).endswith("\ufffd")
    with pytest.raises(TokenizerError, match=r"bpe ids must be in \[0, 400\), got \[400\]"):
        tok.decode([1, 400])
    with pytest.raises(TokenizerError, match="bpe cannot encode"):
        tok.encode("lone \ud800 surrogate")


def test_the_byte_symbols_are_gpt2s(tok):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from chimera.data.tokenizers import _byte_symbols
    assert _byte_symbols() == bytes_to_unicode()
    assert sorted(tok.id_bytes(i) for i in range(VOCAB - 1) if len(tok.id_bytes(i)) == 1) == \
        [bytes([b]) for b in range(256)]                            # every byte has an id


# --- training ------------------------------------------------------------------------------
def test_training_is_deterministic_here_and_in_another_process(tok, shakespeare_text,
                                                               shakespeare_path):
    again = BPETokenizer.train([shakespeare_text[:300_000]], vocab_size=VOCAB)
    assert again.json == tok.json
    code = ("import sys, hashlib; sys.path.insert(0, 'platform');"
            "from chimera.data.tokenizers import BPETokenizer;"
            f"t = open({str(shakespeare_path)!r}, encoding='utf-8').read()[:300_000];"
            f"print(BPETokenizer.train([t], vocab_size={VOCAB}).to_dict()['sha256'])")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True, env={"PATH": "/usr/bin:/bin",
                                                       "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == tok.to_dict()["sha256"]
    assert BPETokenizer.train([shakespeare_text[:300_000]], vocab_size=VOCAB + 1).json != tok.json


def test_to_dict_from_dict_and_pickle_rebuild_it_exactly(tok):
    d = json.loads(json.dumps(tok.to_dict()))                 # as the manifest stores it
    assert set(d) == {"name", "vocab_size", "eot_id", "sha256", "json"}
    for back in (Tokenizer.from_dict(d), pickle.loads(pickle.dumps(tok))):
        assert isinstance(back, BPETokenizer) and back.json == tok.json
        assert back.encode(EDGE_CASES[14]) == tok.encode(EDGE_CASES[14])
    assert len(pickle.dumps(tok)) < len(tok.json.encode()) + 200          # the JSON only
    assert token_bytes(d).tolist() == tok.token_bytes().tolist()
    with pytest.raises(TokenizerError, match="sha256 of its json does not match"):
        Tokenizer.from_dict({**d, "sha256": "0" * 64})
    with pytest.raises(TokenizerError, match="needs its 'json'"):
        Tokenizer.from_dict({"name": "bpe", "vocab_size": VOCAB})
    with pytest.raises(TokenizerError, match="says vocab_size=401 but"):
        Tokenizer.from_dict({**d, "vocab_size": 401})
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        Tokenizer.from_dict({"name": "bpe", "json": "{nope"})
    with pytest.raises(TokenizerError, match="trained on the data: prepare trains it"):
        get_tokenizer("bpe")


def test_token_bytes_is_cached_per_trained_tokenizer(tok, shakespeare_text):
    other = BPETokenizer.train([shakespeare_text[300_000:600_000]], vocab_size=VOCAB)
    assert other.json != tok.json
    assert token_bytes(other.to_dict()).tolist() == other.token_bytes().tolist()
    assert token_bytes(tok.to_dict()).tolist() == tok.token_bytes().tolist()


# --- flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"tokenizer": "bpe"}, "--tokenizer bpe needs --vocab_size N"),
    ({"tokenizer": "bpe", "vocab_size": 257}, r"--vocab_size=257: a bpe vocabulary needs an "
                                              r"integer in \[258, 65535\]"),
    ({"tokenizer": "bpe", "vocab_size": 65536}, r"--vocab_size=65536: .*fit uint16 shards"),
    ({"tokenizer": "bpe", "vocab_size": "512"}, r"--vocab_size='512'"),
    ({"tokenizer": "gpt2", "vocab_size": 512}, "--vocab_size=512 is for --tokenizer bpe"),
    ({"tokenizer": "char", "vocab_size": 512}, "the char tokenizer's vocabulary is not chosen"),
])
def test_bad_vocab_size_is_refused_before_anything_is_written(kw, match, tmp_path,
                                                              shakespeare_path):
    with pytest.raises(TokenizerError, match=match):
        prepare("shakespeare", sources=[shakespeare_path], out=tmp_path / "o", progress=False,
                log=lambda *_: None, **kw)
    assert not (tmp_path / "o").exists()


def test_cli_names_the_flag(tmp_path, shakespeare_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import prepare as prepare_job

    base = ["--dataset", "shakespeare", "--source", str(shakespeare_path), "--out",
            str(tmp_path / "o"), "--no_progress"]
    assert prepare_job.main(base + ["--tokenizer", "byte", "--vocab_size", "300"]) == 2
    assert "--vocab_size=300 is for --tokenizer bpe" in capsys.readouterr().err
    assert prepare_job.main(base + ["--tokenizer", "bpe", "--vocab_size", "70000"]) == 2
    assert "--vocab_size=70000" in capsys.readouterr().err
    assert prepare_job.main(base + ["--tokenizer", "bpe", "--vocab_size", "300"]) == 0
    assert "prepared: shakespeare with bpe (vocab 300, eot 299)" in capsys.readouterr().out


# --- preparation ---------------------------------------------------------------------------
def _tokens(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / MANIFEST).read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype="<u2")
                           for s in m["splits"][split]["shards"]])


def test_prepared_bpe_is_trained_on_the_train_split_and_decodes_to_the_text(
        bpe_data, shakespeare_text):
    m = json.loads((bpe_data / MANIFEST).read_text())
    info = m["tokenizer"]
    assert (info["name"], info["vocab_size"], info["eot_id"]) == ("bpe", VOCAB, VOCAB - 1)
    assert m["settings"]["vocab_size"] == VOCAB
    tok = Tokenizer.from_dict(info)
    cut = m["split"]["split_at_char"]
    train_text, val_text = shakespeare_text[:cut], shakespeare_text[cut:]
    # the same tokenizer as one trained on the train text alone: val text never seen
    assert tok.json == BPETokenizer.train([train_text], VOCAB).json
    assert tok.json != BPETokenizer.train([shakespeare_text], VOCAB).json
    train, val = _tokens(bpe_data, "train"), _tokens(bpe_data, "val")
    assert tok.decode(train.tolist()) == train_text
    assert val[-1] == tok.eot_id and tok.eot_id not in val[:-1]   # the document's end
    assert tok.decode(val[:-1].tolist()) == val_text
    # bits per byte: the token bytes of the val tokens are the val text's UTF-8 bytes
    assert int(token_bytes(info)[val].sum()) == len(val_text.encode("utf-8"))


def test_another_vocab_size_is_another_preparation(bpe_data, shakespeare_path):
    from chimera.data.sources import DataError

    with pytest.raises(DataError, match=rf"other settings \(vocab_size: {VOCAB} -> 300\)"):
        prepare("shakespeare", sources=[shakespeare_path], tokenizer="bpe", vocab_size=300,
                out=bpe_data, progress=False, log=lambda *_: None)


def test_an_interrupted_preparation_resumes_with_its_tokenizer_not_a_new_one(
        tmp_path, shakespeare_path, monkeypatch):
    import chimera.data.prepare as prep

    kw = dict(sources=[shakespeare_path], tokenizer="bpe", vocab_size=VOCAB, progress=False,
              shard_size=100_000, log=lambda *_: None)
    ref = prepare("shakespeare", out=tmp_path / "ref", **kw)
    calls = []

    def crash(_s):                     # the throttle's sleep after each batch: die at the 3rd
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setenv("CHIMERA_PREPARE_THROTTLE_S", "1")
    monkeypatch.setattr(prep.time, "sleep", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare("shakespeare", out=tmp_path / "o", **kw)
    monkeypatch.delenv("CHIMERA_PREPARE_THROTTLE_S")

    def no_training(*a, **k):
        raise AssertionError("a resumed preparation must not train again")
    monkeypatch.setattr(BPETokenizer, "train", no_training)
    r = prepare("shakespeare", out=tmp_path / "o", **kw)
    assert r.resumed_shards >= 1
    assert r.manifest["tokenizer"] == ref.manifest["tokenizer"]
    assert r.manifest["splits"] == ref.manifest["splits"]


@pytest.mark.ray
def test_ray_workers_and_the_object_store_give_the_shards_of_threads(
        ray_cluster, tmp_path, s3_prefix, shakespeare_path, bpe_data):
    from chimera import storage

    kw = dict(sources=[shakespeare_path], tokenizer="bpe", vocab_size=VOCAB, progress=False,
              shard_size=100_000, log=lambda *_: None)

    def files(out):
        if storage.is_uri(out):
            m = json.loads(storage.read_text(storage.join(out, MANIFEST)))
            return m, {n: storage.read_bytes(storage.join(out, n)) for n in storage.listdir(out)
                       if n.endswith(".bin")}
        m = json.loads((Path(out) / MANIFEST).read_text())
        return m, {p.name: p.read_bytes() for p in Path(out).glob("*.bin")}

    prepare("shakespeare", out=tmp_path / "threads", num_proc=1, **kw)
    prepare("shakespeare", out=tmp_path / "w2", num_workers=2, **kw)
    prepare("shakespeare", out=f"{s3_prefix}/w2", num_workers=2, stage_dir=tmp_path / "st", **kw)
    (mt, ft), (mw, fw), (ms, fs) = (files(tmp_path / "threads"), files(tmp_path / "w2"),
                                    files(f"{s3_prefix}/w2"))
    assert len(ft) >= 6 and ft == fw == fs
    assert mt["tokenizer"] == mw["tokenizer"] == ms["tokenizer"]
    assert mt["splits"] == mw["splits"] == ms["splits"]


# --- training and serving on it --------------------------------------------------------------
def test_train_on_bpe_data_and_load_model_decodes(bpe_data, tmp_path, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import train as train_job

    from chimera.checkpoint import load_model

    assert train_job.main([
        "--data_dir", str(bpe_data), "--storage_path", str(tmp_path), "--run_name", "bpe",
        "--num_workers", "1", "--n_layer", "2", "--n_embd", "64", "--n_head", "4",
        "--block_size", "32", "--batch_size", "4", "--total_batch_size_str", "4*32",
        "--max_iters", "4", "--eval", "--eval_interval", "4", "--eval_iters", "1",
        "--save_model", "--warmup_steps", "1"]) == 0
    model, tok, _meta = load_model(tmp_path / "bpe")
    manifest = json.loads((bpe_data / MANIFEST).read_text())
    assert tok.to_dict() == manifest["tokenizer"]
    prompt = tok.encode("ROMEO:\n")
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=20, temperature=1.0)[0]
    new = [int(i) for i in ids[len(prompt):] if int(i) < tok.vocab_size]
    text = tok.decode(new)
    d = Detokenizer(tok, stop=())
    assert "".join(d.push(i)[0] for i in new) + d.flush() == text


def test_detokenizer_holds_back_split_utf8_and_shows_exact_text(tok):
    text = "héllo 😀 wörld 👨‍👩‍👧 done\n\nnext"
    ids = tok.encode(text)
    assert len(ids) > len(text) / 2          # many ids are pieces of a character
    d = Detokenizer(tok, stop=("\n\n",))
    shown, stopped = [], False
    for i in ids:
        out, stopped = d.push(i)
        assert "\ufffd" not in out
        shown.append(out)
        if stopped:
            break
    assert stopped and "".join(shown) == "héllo 😀 wörld 👨‍👩‍👧 done"
