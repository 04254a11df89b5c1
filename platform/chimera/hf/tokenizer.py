"""Tokenizer files for an HF export, and recognising Chimera's gpt2 tokenizer in an HF folder.

    notes = write_tokenizer(tok, out_dir, block_size)   # tokenizer.json + tokenizer_config.json
    info = chimera_tokenizer(hf_dir)                    # {"name": "gpt2", ...} or None

What each Chimera tokenizer becomes is NOTES below (also written into the export's README.md).
Every one loads with AutoTokenizer.from_pretrained(out) as a `tokenizers`-backed fast tokenizer
that adds no special tokens when encoding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

NOTES = {
    "gpt2": "tiktoken's gpt2 BPE as an HF byte-level BPE (transformers' TikTokenConverter fed "
            "tiktoken's ranks): the same ids as Chimera's encode for any text; the text "
            "'<|endoftext|>' becomes id 50256, as in Chimera's encode_with_special (the server's).",
    "char": "a BPE over the vocabulary's characters with no merges (each character one token, ids "
            "in vocabulary order) and a decoder that concatenates: exact on text made of the "
            "vocabulary's characters. Chimera refuses a character outside the vocabulary; this HF "
            "tokenizer drops it (there is no unknown token).",
    "byte": "byte level: the 256 byte values are ids 0..255 (GPT-2's byte-to-unicode alphabet, no "
            "merges); decoding invalid UTF-8 gives U+FFFD, as Chimera's decode does.",
    "bpe": "the byte-level BPE trained on the dataset, its `tokenizers` JSON as trained (the "
           "manifest's): the same ids as Chimera's encode_with_special (the text "
           "'<|endoftext|>' becomes the last id).",
}
PADDING_NOTE = ("The model's vocab_size may exceed the tokenizer's (Chimera pads it to a multiple "
                "of 64); the extra ids are never text.")
_PROBES = ("Hello world! It's  a test:\n\n\tdon't 12345 ünïcödé 你好 😀 <|endoftext|> end.",
           " leading space", "x" * 40 + " " * 9 + "\r\n")


def _gpt2_hf(tok) -> Any:
    """A `tokenizers.Tokenizer` equal to tiktoken's gpt2 encoding (ranks = ids)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tok._enc                                   # chimera.data.tokenizers.GPT2Tokenizer's

    class _InMemory(TikTokenConverter):
        def load_tiktoken_bpe(self, url):            # the ranks tiktoken already holds
            return enc._mergeable_ranks

    return _InMemory(pattern=enc._pat_str, extra_special_tokens=enc._special_tokens).converted()


def _char_hf(chars) -> Any:
    from tokenizers import Tokenizer, decoders, models

    hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], fuse_unk=False))
    hf.decoder = decoders.Fuse()
    return hf


def _byte_hf() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()                    # byte value -> printable character
    hf = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def hf_tokenizer(tok) -> Any:
    """The `tokenizers.Tokenizer` for Chimera tokenizer `tok` (chimera.data.tokenizers)."""
    if tok.name == "gpt2":
        return _gpt2_hf(tok)
    if tok.name == "char":
        return _char_hf(tok.chars)
    if tok.name == "byte":
        return _byte_hf()
    if tok.name == "bpe":
        from tokenizers import Tokenizer
        return Tokenizer.from_str(tok.json)
    raise ValueError(f"no HF tokenizer for Chimera tokenizer {tok.name!r}")


def special_ids(tok) -> dict[str, int | None]:
    """bos/eos/pad ids for the HF model config (gpt2, bpe: <|endoftext|>; char/byte: none)."""
    return {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": None}


def write_tokenizer(tok, out: str | Path, block_size: int) -> list[str]:
    """Write tokenizer.json + tokenizer_config.json for `tok` into `out`; returns README lines."""
    out = Path(out)
    hf = hf_tokenizer(tok)
    hf.save(str(out / "tokenizer.json"))
    conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                            "clean_up_tokenization_spaces": False, "add_bos_token": False,
                            "add_eos_token": False}
    if tok.eot_id is not None:
        eot = tok.id_bytes(tok.eot_id).decode("utf-8")
        conf.update(bos_token=eot, eos_token=eot, unk_token=eot)
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return [f"Tokenizer: Chimera's `{tok.name}` (vocabulary {tok.vocab_size}) in tokenizer.json: "
            f"{NOTES[tok.name]}", PADDING_NOTE]


def chimera_tokenizer(path: str | Path) -> dict | None:
    """Chimera's tokenizer dict when the HF folder's tokenizer is exactly Chimera's gpt2 (the same
    vocabulary and the same ids on probe texts), else None (no tokenizer files, or another one).
    Needs the gpt2 BPE files (TIKTOKEN_CACHE_DIR) only when the folder's tokenizer looks like it."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    try:
        hf = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    from chimera.data.tokenizers import get_tokenizer

    if len(hf) != 50257 or hf.convert_tokens_to_ids("<|endoftext|>") != 50256:
        return None
    gpt2 = get_tokenizer("gpt2")
    alphabet = _alphabet()
    want = {"".join(alphabet[b] for b in gpt2.id_bytes(i)): i for i in range(gpt2.vocab_size - 1)}
    got = hf.get_vocab()
    if any(got.get(k) != v for k, v in want.items()):
        return None
    if any(hf.encode(s, add_special_tokens=False) != gpt2.encode_with_special(s) for s in _PROBES):
        return None
    return gpt2.to_dict()


def _alphabet() -> Mapping[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()
