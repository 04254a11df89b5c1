"""Tokenizers: gpt2 ids offline, char/byte round-trips, dict round-trips, fix-it errors."""
from __future__ import annotations

import numpy as np
import pytest

from chimera.data.tokenizers import (ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer,
                                     TokenizerError, get_tokenizer)

SAMPLE = "Hello world! Ünïcödé — 漢字 🙂\n\tend <|endoftext|> after"


def test_gpt2_known_ids(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    # ordinary encoding: the literal text never becomes the special token
    assert 50256 not in tok.encode("<|endoftext|>")
    assert tok.encode_batch(["Hello world", SAMPLE]) == [tok.encode("Hello world"), tok.encode(SAMPLE)]
    arr = tok.encode_to_numpy(SAMPLE)
    assert arr.dtype == np.uint32 and arr.tolist() == tok.encode(SAMPLE)
    with pytest.raises(TokenizerError, match=r"gpt2 ids must be in \[0, 50257\)"):
        tok.decode([50257])


def test_gpt2_dict_round_trip(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    d = tok.to_dict()
    assert d == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    back = Tokenizer.from_dict(d)
    assert isinstance(back, GPT2Tokenizer) and back.encode(SAMPLE) == tok.encode(SAMPLE)


def test_gpt2_offline_without_files_says_how_to_fix(tmp_path, monkeypatch):
    import requests
    import tiktoken.registry

    calls = []

    def no_network(url, *a, **k):
        calls.append(url)
        raise requests.ConnectionError(f"network is unreachable (test): {url}")

    empty = tmp_path / "empty_cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})   # forget encodings loaded earlier
    with pytest.raises(TokenizerError, match="TIKTOKEN_CACHE_DIR") as e:
        get_tokenizer("gpt2")
    msg = str(e.value)
    assert "tiktoken_cache" in msg and "ConnectionError" in msg and str(empty) in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__   # no chained traceback
    assert calls, "the download path was not exercised"


def test_char_round_trip_and_vocab(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 and tok.eot_id is None
    assert tok.chars == "".join(sorted(set(text)))          # nanoGPT's shakespeare_char order
    ids = tok.encode(text[:5000])
    assert ids[:3] == [tok.chars.index(c) for c in text[:3]]
    assert tok.decode(ids) == text[:5000]
    assert tok.encode_to_numpy(text).shape == (1115394,)
    uni = CharTokenizer.from_text(SAMPLE)
    assert uni.decode(uni.encode(SAMPLE)) == SAMPLE
    with pytest.raises(TokenizerError, match=r"'€' \(U\+20AC\) is not in the char vocabulary"):
        tok.encode("price: €")
    with pytest.raises(TokenizerError, match=r"char ids must be in \[0, 65\)"):
        tok.decode([65])


def test_char_dict_round_trip():
    tok = CharTokenizer.from_text(SAMPLE)
    d = tok.to_dict()
    assert d["name"] == "char" and d["vocab"] == tok.chars and d["eot_id"] is None
    back = Tokenizer.from_dict(d)
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    assert get_tokenizer("char", vocab=d["vocab"]).encode(SAMPLE) == tok.encode(SAMPLE)


def test_byte_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eot_id) == (256, None)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert Tokenizer.from_dict(tok.to_dict()).encode(SAMPLE) == ids
    with pytest.raises(TokenizerError, match=r"byte ids must be in \[0, 256\)"):
        tok.decode([256])


def test_bad_tokenizer_requests():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'wordpiece'; choose from gpt2, char, byte, bpe"):
        get_tokenizer("wordpiece")
    with pytest.raises(TokenizerError, match="char tokenizer needs its vocabulary"):
        get_tokenizer("char")
    with pytest.raises(TokenizerError, match="fixed vocabulary"):
        get_tokenizer("byte", vocab="ab")
    with pytest.raises(TokenizerError, match="repeated characters"):
        CharTokenizer("abca")
    with pytest.raises(TokenizerError, match="vocab_size=3 but the char tokenizer has vocab_size=2"):
        Tokenizer.from_dict({"name": "char", "vocab": "ab", "vocab_size": 3})
    with pytest.raises(TokenizerError, match="must be a dict with a 'name'"):
        Tokenizer.from_dict({"vocab_size": 3})
