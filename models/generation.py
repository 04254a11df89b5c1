"""Autoregressive sampling with the KV cache.

Context policy: the model always conditions on the last `block_size` tokens (a prompt longer
than that is cut to its last block_size tokens). With the cache on:
  * while the sequence fits in block_size, each step feeds only the newest token;
  * once it no longer fits, every step resets the cache and re-prefills the last block_size
    tokens. That keeps cached decoding exactly equal to uncached decoding, for every attention
    and position type: when the window slides, every kept token's hidden states change (its
    oldest context is gone, and absolute positions shift), so no cached entry stays valid.
    Cost: past block_size each new token costs one block_size-token prefill — the same as
    uncached decoding — instead of one token's worth of work.
"""
from __future__ import annotations

import math

import torch


def check_sampling_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def limit_vocab(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """logits (B, V) with ids >= vocab_limit made impossible (-inf): the embedding may be
    padded past the tokenizer's vocabulary (e.g. 65 chars in a 128-row table), and a padded id
    has no text."""
    if vocab_limit is None or vocab_limit >= logits.size(-1):
        return logits
    return logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= vocab_limit,
                              float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             vocab_limit: int | None = None) -> torch.Tensor:
    """Append up to max_new_tokens tokens to idx (B, T); returns (B, T + n).

    With eos_id, a row that produced it is padded with eos_id afterwards, and generation stops
    early once every row has finished. With vocab_limit, only ids < vocab_limit are sampled
    (a tokenizer smaller than the model's padded vocabulary; see `limit_vocab`).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) < 1 \
            or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError("idx must be an integer tensor of shape (batch, T) with T >= 1")
    V = model.cfg.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= V:
        raise ValueError(f"idx holds token ids outside [0, vocab_size={V})")
    idx = idx.long()
    window = model.cfg.block_size
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(idx.size(0)) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        seq = idx
        for step in range(max_new_tokens):
            if cache is None:
                logits = model.next_logits(seq[:, -window:])
            elif step == 0 or seq.size(1) > window:
                cache.reset()                                       # (re)prefill the window
                logits = model.next_logits(seq[:, -window:], cache, 0)
            else:
                logits = model.next_logits(seq[:, -1:], cache, cache.length)
            nxt = sample_next(limit_vocab(logits, vocab_limit), temperature, top_k, top_p,
                              generator)                            # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished.unsqueeze(1), eos_id)
                finished |= nxt.squeeze(1) == eos_id
            seq = torch.cat([seq, nxt], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return seq
    finally:
        model.train(was_training)
