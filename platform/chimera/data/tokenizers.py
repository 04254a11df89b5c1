"""Tokenizers: `gpt2` (tiktoken BPE), `char` (vocabulary built from text), `byte` (UTF-8) and
`bpe` (a byte-level BPE trained on the data).

    from chimera.data.tokenizers import get_tokenizer, Tokenizer
    tok = get_tokenizer("gpt2")                  # vocab 50257, eot_id 50256
    tok = get_tokenizer("char", vocab="abc\\n")   # vocab = the symbols, in id order
    tok = CharTokenizer.from_text(text)          # sorted set of the text's characters
    tok = get_tokenizer("byte")                  # vocab 256
    tok = BPETokenizer.train(texts, vocab_size=8192)   # eot_id 8191 (the last id)
    ids = tok.encode("Hello world"); text = tok.decode(ids)
    info = tok.to_dict(); tok = Tokenizer.from_dict(info)   # travels in manifests/checkpoints

Common interface: `name`, `vocab_size`, `eot_id`, `encode(str) -> list[int]`,
`encode_batch(list[str]) -> list[list[int]]`, `encode_to_numpy(str) -> np.ndarray (uint32)`,
`decode(list[int]) -> str`, `to_dict()` / `Tokenizer.from_dict()`, `token_bytes()`,
`id_bytes(id) -> bytes` (one token's bytes) and `encode_with_special(str)` (the server's
encoding: special-token text becomes its id).

Bytes per token (bits per byte, chimera.train.measure): `token_bytes(info)` is the (vocab,)
table of how many UTF-8 bytes of text each id stands for, built once per process and tokenizer
from a manifest's / checkpoint's tokenizer dict: gpt2 the length of each BPE token's bytes
(its byte-level tokens concatenate to exactly the text's UTF-8), char len(ch.encode('utf-8')),
byte 1, bpe the length of each token's bytes. Ids that are no text count 0 bytes: gpt2's and
bpe's `<|endoftext|>` (their only special id); char and byte have no such ids. Padded model
vocabularies (ids >= vocab_size) never occur in data.

End of text: gpt2 has `<|endoftext|>` = 50256, bpe `<|endoftext|>` = its last id (as gpt2's:
prepare appends it after every document). char and byte have none (`eot_id is None`):
their vocabularies are exactly the text's symbols / the 256 byte values, as in nanoGPT's
shakespeare_char, so documents are simply concatenated when prepared with them.
`encode` never turns the literal text "<|endoftext|>" into the special token (ordinary encoding).

bpe: HF `tokenizers` (the Rust library behind transformers' fast tokenizers) trains and runs
it, rather than rustbpe or code of our own: its trainer is fast Rust, deterministic (no seed: the
same text and vocab_size give a byte-identical JSON; tests/test_bpe.py), its byte-level
pre-tokenizer (GPT-2's split pattern, so prepare's piece cuts stay neutral) maps every byte to a
symbol, so any text round-trips, and its tokenizer JSON is what transformers
(PreTrainedTokenizerFast) and vLLM load, so an HF export ships it as it is. rustbpe
(nanochat's) only trains: encoding then needs a tiktoken Encoding built from its ranks, a
second library and a second format to keep equal; hand-written Python would be orders of
magnitude slower to train. `to_dict()` carries that JSON (and its sha256), so manifests,
progress.json and every checkpoint's tokenizer.json rebuild it exactly.

gpt2 offline: tiktoken reads its BPE files from $TIKTOKEN_CACHE_DIR (see
../shared/data/SOURCES.md); without them and without network `get_tokenizer("gpt2")` raises a
TokenizerError that says how to fix it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np


class TokenizerError(ValueError):
    """Unknown tokenizer, bad vocabulary, text or ids it cannot handle, BPE files unavailable."""


class Tokenizer:
    """Base class; subclasses set `name`, `vocab_size`, `eot_id` and implement the codecs."""

    name: ClassVar[str] = ""
    vocab_size: int
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return self.encode_to_numpy(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:  # (N,) uint32
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:  # (vocab_size,) int64
        """UTF-8 bytes of text each id stands for; 0 for ids that are no text."""
        raise NotImplementedError

    def id_bytes(self, i: int) -> bytes:
        """The bytes id i stands for (a special token: its text). Serving shows tokens with it."""
        raise NotImplementedError

    def encode_with_special(self, text: str) -> list[int]:
        """Like encode, but special-token text (gpt2's "<|endoftext|>") becomes its id: what a
        server's /tokenize and text prompts do, as HF tokenizers and vLLM do. Data preparation
        keeps `encode` (special-token text in a corpus stays text)."""
        return self.encode(text)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Tokenizer":
        """Rebuild a tokenizer from `to_dict()` output (manifest or checkpoint config)."""
        if not isinstance(d, Mapping) or "name" not in d:
            raise TokenizerError(f"tokenizer info must be a dict with a 'name', got {d!r}")
        if d["name"] == BPETokenizer.name:            # trained: rebuilt from its own JSON
            tok: Tokenizer = BPETokenizer.from_info(d)
        else:
            tok = get_tokenizer(d["name"], vocab=d.get("vocab"))
        for key in ("vocab_size", "eot_id"):
            if key in d and d[key] != getattr(tok, key):
                raise TokenizerError(f"tokenizer info says {key}={d[key]!r} but the {d['name']} "
                                     f"tokenizer has {key}={getattr(tok, key)!r}")
        return tok

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class GPT2Tokenizer(Tokenizer):
    """tiktoken's `gpt2` encoding; ordinary encoding (special-token text stays text)."""

    name = "gpt2"

    def __init__(self) -> None:
        self._enc = _load_tiktoken("gpt2")
        self.vocab_size = self._enc.n_vocab            # 50257
        self.eot_id = self._enc.eot_token              # 50256

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        # list -> array is as fast as tiktoken's own encode_to_numpy and keeps the documented
        # ordinary-encoding path (the tiktoken core releases the GIL, so threads scale)
        return np.array(self._enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"gpt2 ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self._enc.decode(ids)  # invalid UTF-8 across token boundaries -> U+FFFD

    def token_bytes(self) -> np.ndarray:
        n = np.array([len(self._enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
                     dtype=np.int64)
        for s in self._enc.special_tokens_set:           # {"<|endoftext|>"}: no text
            n[self._enc.encode_single_token(s)] = 0
        return n

    def id_bytes(self, i: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(i))

    def encode_with_special(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def __getstate__(self) -> dict:  # rebuilt from tiktoken's cache in the receiving process
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class CharTokenizer(Tokenizer):
    """Character-level: id i is the i-th symbol of `vocab` (nanoGPT's shakespeare_char)."""

    name = "char"

    def __init__(self, vocab: str | Sequence[str]) -> None:
        symbols = list(vocab)
        if not symbols:
            raise TokenizerError("char vocabulary is empty")
        if any(not isinstance(s, str) or len(s) != 1 for s in symbols):
            raise TokenizerError("char vocabulary must be single characters")
        if len(set(symbols)) != len(symbols):
            raise TokenizerError("char vocabulary has repeated characters")
        self.chars = "".join(symbols)
        self.vocab_size = len(symbols)
        self.eot_id = None
        codes = np.array([ord(c) for c in symbols], dtype=np.uint32)
        self._order = np.argsort(codes, kind="stable")   # ids sorted by code point
        self._codes = codes[self._order]

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        """Vocabulary = sorted set of the characters of `text` (a string or chunks of one)."""
        chars: set[str] = set()
        for chunk in ([text] if isinstance(text, str) else text):
            chars.update(chunk)
        return cls(sorted(chars))

    def encode_to_numpy(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._codes, codes)
        pos_c = np.minimum(pos, len(self._codes) - 1)
        missing = self._codes[pos_c] != codes
        if missing.any():
            c = chr(int(codes[np.argmax(missing)]))
            raise TokenizerError(f"character {c!r} (U+{ord(c):04X}) is not in the char "
                                 f"vocabulary of {self.vocab_size} symbols")
        return self._order[pos_c].astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"char ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return "".join(map(self.chars.__getitem__, ids))

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int64)

    def id_bytes(self, i: int) -> bytes:
        return self.chars[int(i)].encode("utf-8", "surrogatepass")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "vocab": self.chars}


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding; no vocabulary file."""

    name = "byte"
    vocab_size = 256

    def encode_to_numpy(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8", "surrogatepass")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        except ValueError:  # bytes() rejects values outside [0, 256)
            raise TokenizerError("byte ids must be in [0, 256)") from None

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def id_bytes(self, i: int) -> bytes:
        return bytes([int(i)])


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the data (HF `tokenizers`; see the module docstring): ids
    0..vocab_size-2 are the 256 byte symbols and the merges, vocab_size-1 is `<|endoftext|>`."""

    name = "bpe"
    EOT = "<|endoftext|>"

    def __init__(self, json_str: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            conf = json.loads(json_str)
            hf = HFTokenizer.from_str(json_str)
        except Exception as e:  # json.JSONDecodeError, TypeError, the Rust parser's Exception
            raise TokenizerError(f"not a tokenizers JSON: {type(e).__name__}: "
                                 f"{str(e)[:200]}") from None
        model = conf.get("model") or {}
        if (model.get("type") != "BPE" or (conf.get("pre_tokenizer") or {}).get("type") != "ByteLevel"
                or conf.get("normalizer") is not None):
            raise TokenizerError("a bpe tokenizer JSON must be a byte-level BPE without a "
                                 "normalizer (what BPETokenizer.train writes)")
        self.json = json_str
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eot_id = hf.token_to_id(self.EOT)
        if self.eot_id != self.vocab_size - 1:
            raise TokenizerError(f"a bpe tokenizer's {self.EOT} must be its last id "
                                 f"{self.vocab_size - 1}, got {self.eot_id}")
        hf.encode_special_tokens = True               # ordinary encoding: the text stays text
        self._hf = hf
        sym = {c: b for b, c in _byte_symbols().items()}
        pieces = [hf.id_to_token(i) for i in range(self.vocab_size - 1)]
        try:
            self._bytes = [bytes(sym[c] for c in p) for p in pieces] + [self.EOT.encode()]
        except (KeyError, TypeError):
            raise TokenizerError("a bpe tokenizer's vocabulary must be byte-level symbols "
                                 "without gaps in its ids") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on `texts` (an iterable of strings, streamed): vocab_size - 1 byte symbols and
        merges, then `<|endoftext|>`. Fewer when the text has fewer distinct pairs to merge."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        check_bpe_vocab_size(vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        hf.add_special_tokens([cls.EOT])
        return cls(hf.to_str())

    @classmethod
    def from_info(cls, d: Mapping[str, Any]) -> "BPETokenizer":
        if not isinstance(d.get("json"), str):
            raise TokenizerError("bpe tokenizer info needs its 'json' (the trained tokenizer): "
                                 "prepare stores it in manifest.json")
        if "sha256" in d and d["sha256"] != _sha256(d["json"]):
            raise TokenizerError("bpe tokenizer info: the sha256 of its json does not match")
        return cls(d["json"])

    def encode_to_numpy(self, text: str) -> np.ndarray:
        # the batch call releases the GIL (threads scale) and skips the offsets
        return np.array(self.encode_batch([text])[0], dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]
        except TypeError as e:              # a lone surrogate has no UTF-8
            raise TokenizerError(f"bpe cannot encode this text: {e}") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"bpe ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return b"".join(map(self._bytes.__getitem__, ids)).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        n = np.array([len(b) for b in self._bytes], dtype=np.int64)
        n[self.eot_id] = 0
        return n

    def id_bytes(self, i: int) -> bytes:
        return self._bytes[int(i)]

    def encode_with_special(self, text: str) -> list[int]:
        parts = text.split(self.EOT)
        out = self.encode(parts[0])
        for p in parts[1:]:
            out += [self.eot_id] + self.encode(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sha256": _sha256(self.json), "json": self.json}

    def __getstate__(self) -> dict:     # the JSON only (Ray, pickles): rebuilt on arrival
        return {"json": self.json}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"])



def check_bpe_vocab_size(vocab_size: Any, flag: str = "--vocab_size") -> None:
    """bpe's vocabulary: > 256 byte symbols + `<|endoftext|>`, and ids that fit uint16 shards."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 258 <= vocab_size <= 65535:
        raise TokenizerError(f"{flag}={vocab_size!r}: a bpe vocabulary needs an integer in "
                             f"[258, 65535] (256 byte symbols, at least one merge and "
                             f"<|endoftext|>; ids must fit uint16 shards)")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-symbol map (what tokenizers' ByteLevel uses): printable bytes stand for
    themselves, the other 68 are shifted to 256 + k so that no symbol is whitespace/control."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


TOKENIZERS: dict[str, type[Tokenizer]] = {"gpt2": GPT2Tokenizer, "char": CharTokenizer,
                                          "byte": ByteTokenizer, "bpe": BPETokenizer}


def get_tokenizer(name: str, vocab: str | Sequence[str] | None = None) -> Tokenizer:
    """Build tokenizer `name`; `vocab` (the symbols in id order) is required for `char` only."""
    if name not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}; choose from {', '.join(TOKENIZERS)}")
    if name == "char":
        if vocab is None:
            raise TokenizerError("the char tokenizer needs its vocabulary: prepare builds it from "
                                 "the training text and stores it in manifest.json")
        return CharTokenizer(vocab)
    if name == "bpe":
        raise TokenizerError("the bpe tokenizer is trained on the data: prepare trains it "
                             "(--tokenizer bpe --vocab_size N) and stores it in manifest.json; "
                             "rebuild it with Tokenizer.from_dict(manifest['tokenizer'])")
    if vocab is not None:
        raise TokenizerError(f"the {name} tokenizer has a fixed vocabulary; do not pass vocab")
    return TOKENIZERS[name]()


def token_bytes(info: Mapping[str, Any]) -> np.ndarray:
    """(vocab_size,) int64, read-only: UTF-8 bytes of text of each id of the tokenizer `info`
    describes (a manifest's or checkpoint's `tokenizer` dict; see the module docstring).
    Built once per process and tokenizer (gpt2 needs its BPE files, as preparing did)."""
    if not isinstance(info, Mapping) or "name" not in info:
        raise TokenizerError(f"tokenizer info must be a dict with a 'name', got {info!r}")
    return _token_bytes(tuple(sorted((k, info[k]) for k in ("name", "vocab", "vocab_size", "eot_id", "json")
                                     if k in info)))


@functools.lru_cache(maxsize=8)
def _token_bytes(info: tuple) -> np.ndarray:
    n = Tokenizer.from_dict(dict(info)).token_bytes()
    n.setflags(write=False)
    return n


def _load_tiktoken(encoding: str):
    """tiktoken.get_encoding, with a fix-it message instead of a deep download traceback."""
    import tiktoken

    try:
        return tiktoken.get_encoding(encoding)
    except Exception as e:  # requests/urllib/OSError/hash mismatch, all mean "files unavailable"
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = (f"TIKTOKEN_CACHE_DIR={cache!r} does not hold them" if cache
                 else "TIKTOKEN_CACHE_DIR is not set")
        raise TokenizerError(
            f"cannot load the {encoding} BPE files: {where}, and downloading them failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
            f"Set TIKTOKEN_CACHE_DIR to a writable copy of ../shared/data/tiktoken_cache "
            f"(see shared/data/SOURCES.md), or run once with internet access.") from None
