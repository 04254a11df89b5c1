"""model.generate: autoregressive sampling with the KV cache, a batch of rows in step.

    out = model.generate(idx, 50, temperature=0.8, top_k=100, generator=g)   # (B, T) -> (B, T + 50)

Which tokens each step feeds is the context-window rule of models/context.py (the serving
engine follows the same rule): the last block_size tokens, re-prefilled every step once the
sequence no longer fits. Sampling arguments are checked by models/sampling.py SamplingParams.
A step inside the window runs the decode step of `decode` (models/decode.py: eager, static or
compiled; None = the device's default); prefills are eager.
"""
from __future__ import annotations

import torch

import models.context as context
from models.decode import check_decode, decode_step
from models.sampling import SamplingParams, limit_vocab, sample_next


def check_idx(model, idx) -> torch.Tensor:
    """idx as int64 (B, T), or ValueError: not 2-D integer, empty, or ids outside the vocab."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) < 1 \
            or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError("idx must be an integer tensor of shape (batch, T) with T >= 1")
    V = model.cfg.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= V:
        raise ValueError(f"idx holds token ids outside [0, vocab_size={V})")
    return idx.long()


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             vocab_limit: int | None = None, decode: str | None = None) -> torch.Tensor:
    """Append up to max_new_tokens tokens to idx (B, T); returns (B, T + n).

    (Self-speculative greedy decoding: model.generate(..., speculative=True), models/speculative.py.)

    With eos_id, a row that produced it is padded with eos_id afterwards, and generation stops
    early once every row has finished. With vocab_limit, only ids < vocab_limit are sampled
    (a tokenizer smaller than the model's padded vocabulary; see `limit_vocab`).
    """
    SamplingParams(max_new_tokens, temperature, top_k, top_p)          # ValueError if bad
    idx = check_idx(model, idx)
    mode = check_decode(decode, idx.device)
    step = decode_step(model, mode) if use_cache else None
    window = model.cfg.block_size
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(idx.size(0)) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        seq, nxt = idx, None
        for _ in range(max_new_tokens):
            if cache is None:
                logits = model.next_logits(seq[:, context.next_input(seq.size(1), 0, window).lo:])
            else:
                feed = context.next_input(seq.size(1), cache.length, window)
                if feed.start == 0:
                    cache.reset()                                   # (re)prefill the window
                if step is not None and feed.start > 0:             # one token, in the window
                    pos = torch.full((seq.size(0),), feed.start, device=seq.device)   # (B,)
                    logits = step(nxt, cache, pos)                  # nxt (B, 1): a fresh tensor
                    # (a slice of seq would change strides every step: a recompile)
                    cache.length = feed.start + 1
                else:
                    logits = model.next_logits(seq[:, feed.lo:], cache, feed.start)
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
