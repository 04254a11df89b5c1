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

import torch

from models.sampling import SamplingParams, limit_vocab, sample_next


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
    SamplingParams(max_new_tokens, temperature, top_k, top_p)          # ValueError if bad
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
