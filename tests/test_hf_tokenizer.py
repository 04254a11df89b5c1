"""chimera.hf.tokenizer: Chimera's gpt2 / char / byte / bpe tokenizers as HF tokenizer files that
AutoTokenizer loads and that encode and decode exactly like Chimera's; only Chimera's gpt2 is
recognised back as a Chimera tokenizer."""
from __future__ import annotations

import pytest

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "  It's 12345 --- you're\t\r\n")
MORE = " ünïcödé 你好 😀 <endoftext> \x00\x7f"


def _tok(name):
    from chimera.data.tokenizers import BPETokenizer, CharTokenizer, get_tokenizer
    if name == "bpe":
        return BPETokenizer.train([TEXT * 3 + MORE], vocab_size=300)
    return CharTokenizer.from_text(TEXT + MORE) if name == "char" else get_tokenizer(name)


@pytest.mark.parametrize("name", ["gpt2", "char", "byte", "bpe"])
def test_written_tokenizer_loads_and_matches_chimera(name, tmp_path, tiktoken_cache):
    from transformers import AutoTokenizer
    from chimera.hf.tokenizer import chimera_tokenizer, write_tokenizer

    tok = _tok(name)
    notes = write_tokenizer(tok, tmp_path, block_size=64)
    assert notes[0].startswith(f"Tokenizer: Chimera's `{name}`")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXT + MORE
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf(text)["input_ids"] == ids                       # no BOS/EOS added by default
    assert hf.decode(ids) == text == tok.decode(ids)
    assert hf.eos_token_id == tok.eot_id
    assert chimera_tokenizer(tmp_path) == (tok.to_dict() if name == "gpt2" else None)


def test_byte_decoding_of_broken_utf8_is_chimeras(tmp_path):
    from transformers import AutoTokenizer
    from chimera.hf.tokenizer import write_tokenizer

    tok = _tok("byte")
    write_tokenizer(tok, tmp_path, block_size=64)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for ids in ([0xE2, 0x82], [0x61, 0xFF, 0x62], [0xF0, 0x9F, 0x98]):
        assert hf.decode(ids) == tok.decode(ids)


def test_a_folder_without_tokenizer_files_has_no_chimera_tokenizer(tmp_path):
    from chimera.hf.tokenizer import chimera_tokenizer
    assert chimera_tokenizer(tmp_path) is None
