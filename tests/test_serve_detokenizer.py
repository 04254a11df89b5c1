"""serve/detokenizer.py: the text a stream shows is, in the end, exactly the decoded tokens up to
the first stop string; meanwhile nothing is shown that could still turn out to be part of a
stop string or of a multi-byte character. No model."""
from __future__ import annotations

import itertools

import pytest

from chimera.data.tokenizers import get_tokenizer
from serve.detokenizer import Detokenizer

CHAR = get_tokenizer("char", vocab="abcdefgh\n")
BYTE = get_tokenizer("byte")


def stream(tok, text: str, stop=()) -> tuple[list[str], bool]:
    d, pieces = Detokenizer(tok, tuple(stop)), []
    for t in tok.encode(text):
        piece, hit = d.push(t)
        pieces.append(piece)
        if hit:
            return pieces, True
    pieces.append(d.flush())
    return pieces, False


def test_partial_stop_string_is_held_back_then_released():
    d = Detokenizer(CHAR, ("abc",))
    assert [d.push(t) for t in CHAR.encode("ab")] == [("", False), ("", False)]   # "a", "ab" held
    assert d.push(CHAR.encode("d")[0]) == ("abd", False)         # not "abc" after all: released
    d = Detokenizer(CHAR, ("abc",))
    assert [d.push(t)[0] for t in CHAR.encode("ab")] == ["", ""]
    assert d.push(CHAR.encode("c")[0]) == ("", True)             # the stop string is not shown
    assert d.flush() == "abc"                                    # (flush is for ends without a stop)


def test_longest_held_tail_over_several_stop_strings():
    d = Detokenizer(CHAR, ("hh", "ghc"))
    out = [d.push(t)[0] for t in CHAR.encode("agh")]
    assert out == ["a", "", ""]                                  # "gh" may become "ghc"
    assert d.push(CHAR.encode("h")[0]) == ("g", True)           # "ghh": "hh" completes at 1


def test_a_split_utf8_character_is_held_until_complete():
    d = Detokenizer(BYTE, ())
    got = [d.push(t)[0] for t in BYTE.encode("a€b")]
    assert got == ["a", "", "", "€", "b"]                        # no U+FFFD is ever shown


@pytest.mark.parametrize("text", ["".join(p) for p in itertools.product("ab\n", repeat=5)])
def test_streamed_text_is_the_text_before_the_first_stop(text):
    pieces, hit = stream(CHAR, text, stop=("\n\n", "ba"))
    cuts = [i for i in (text.find("\n\n"), text.find("ba")) if i >= 0]
    want = text[:min(cuts)] if cuts else text
    assert "".join(pieces) == want and hit == bool(cuts)


def test_without_a_tokenizer_there_is_no_text():
    d = Detokenizer(None, ("x",))
    assert d.push(3) == ("", False) and d.flush() == ""
