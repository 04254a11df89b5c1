"""Log-probabilities for the OpenAI `logprobs` and `echo` fields, and how a token is shown.

    scores = score(logits, tokens, k)          # (n, V), n ids -> n TokenLogprob (chosen + top k)
    prompt = prompt_scores(hidden, head, ids, k)   # (T, C) of a prompt -> [None, TokenLogprob, ...]
    token_string(tok, id)                      # "ing", "bytes:\\xe2\\x80", "<|id_50300|>"

What is scored: the raw model's log-softmax over its full output row, in fp32 — the
distribution the training loss uses, including the rows that pad the vocabulary past the
tokenizer's size — never the sampling distribution after temperature / top-k / top-p. So a
prompt scored with `echo` gives exactly the per-token losses of evaluation, and lm-eval's
loglikelihoods are the model's own.

Top entries follow vLLM: the k most likely ids (most likely first) plus the chosen id when it
is not among them, so `top_logprobs` has k or k+1 entries (k = 0: the chosen id alone).
A token's string is its bytes as UTF-8; a token that is only part of a character shows as
"bytes:" and its bytes escaped (as vLLM does), an id past the tokenizer (vocabulary padding)
as "<|id_N|>".
"""
from __future__ import annotations

import codecs
from typing import NamedTuple

import torch

MAX_LOGPROBS = 5                # the largest `logprobs` / `top_logprobs` a request may ask for
CHUNK = 256                     # prompt positions scored at once (bounds the (T, V) logits)


class TokenLogprob(NamedTuple):
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]          # (id, logprob): the k most likely, then the chosen


def score(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row i of logits (n, V) scores tokens[i], with the ks[i] most likely ids."""
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    k = max(ks)
    vals, ids = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))   # (n, k)
    vals, ids = vals.tolist(), ids.tolist()
    out = []
    for i, t in enumerate(tokens):
        top = tuple(zip(ids[i][:ks[i]], vals[i][:ks[i]]))
        if t not in ids[i][:ks[i]]:
            top += ((t, chosen[i]),)
        out.append(TokenLogprob(t, chosen[i], top))
    return out


def prompt_scores(hidden: torch.Tensor, head, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """hidden (T, C) of a prompt's positions and the LM head -> one entry per prompt token:
    None for the first (nothing predicts it), then position t's score of ids[t + 1]. The head
    runs on CHUNK positions at a time: (CHUNK, V) logits at most, whatever the prompt."""
    out: list[TokenLogprob | None] = [None]
    for a in range(0, len(ids) - 1, CHUNK):
        b = min(a + CHUNK, len(ids) - 1)
        out += score(head(hidden[a:b]), ids[a + 1:b + 1], [k] * (b - a))    # (b - a, V)
    return out


def token_string(tok, i: int) -> str:
    if tok is None or not 0 <= i < tok.vocab_size:
        return f"<|id_{i}|>"
    raw = tok.id_bytes(i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_raw(tok, i: int) -> bytes:
    """The bytes a token stands for (empty past the tokenizer)."""
    return tok.id_bytes(i) if tok is not None and 0 <= i < tok.vocab_size else b""


def pieces(tok, ids: list[int]) -> list[str]:
    """The text of a token sequence split per token (an incomplete character goes to the token
    that completes it): "".join(pieces) is the sequence's text, and the cumulative lengths are
    each token's text offset."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    out = [dec.decode(token_raw(tok, i)) for i in ids]
    if out:
        out[-1] += dec.decode(b"", final=True)
    return out
