"""Greedy self-speculative decoding with the first MTP module as the draft model.

    out, stats = speculative_generate(model, idx, 64)       # == model.generate(idx, 64, temperature=0)
    stats   # {"drafted": 40, "accepted": 23, "acceptance_rate": 0.575, "main_passes": 41}

Per row, with the main model's KV cache and one for the MTP block: the MTP module drafts token
n+1 from the main hidden state at n-1 and token n; one main pass over [token n, draft] then
gives the true token n+1 and, when the draft was right, token n+2 as well. A rejected draft
costs nothing but its cache entry at n+1, which the next pass overwrites (in a sliding-window
ring that slot stands for position n+1-W, outside every later query's window). Every token emitted is the
main model's own argmax, so the output is plain greedy decoding's (up to float rounding of a
2-token pass against 1-token passes, which could only matter at exact ties). Once a row no
longer fits in block_size the rest is plain decoding (the window rule of models/context.py
re-prefills every step there; nothing to speculate with). Rows run one at a time.
"""
from __future__ import annotations

import torch

from models.attention.cache import KVCache
from models.sampling import SamplingParams, limit_vocab, sample_next


@torch.no_grad()
def speculative_generate(model, idx: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                         vocab_limit: int | None = None) -> tuple[torch.Tensor, dict]:
    """(idx (B, T) + up to max_new_tokens greedy tokens (B, T + n), stats); rows that
    produced eos_id are padded with it, as model.generate does."""
    from models.generation import check_idx
    SamplingParams(max_new_tokens, 0.0, None, None)
    idx = check_idx(model, idx)
    if model.mtp is None:
        raise ValueError("speculative decoding drafts with the MTP modules: the model has mtp_depth=0")
    was_training = model.training
    model.eval()
    try:
        stats = {"drafted": 0, "accepted": 0, "main_passes": 0}
        rows = [_row(model, idx[b:b + 1], max_new_tokens, eos_id, vocab_limit, stats)
                for b in range(idx.size(0))]
    finally:
        model.train(was_training)
    n = max(len(r) for r in rows)
    pad = eos_id if eos_id is not None else 0             # only finished rows are short
    new = torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long, device=idx.device)
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return torch.cat([idx, new.view(idx.size(0), n)], dim=1), stats


def _row(model, row: torch.Tensor, max_new: int, eos_id, vocab_limit, stats) -> list[int]:
    """One row (1, n): its new tokens, up to max_new, cut after the first eos_id."""
    from models.generation import generate
    window, mod = model.cfg.block_size, model.mtp[0]
    n = row.size(1)

    def greedy(h: torch.Tensor) -> torch.Tensor:           # (1, C) -> (1, 1)
        return sample_next(limit_vocab(model.lm_head(model.ln_f(h)), vocab_limit), 0.0)

    def done(out: list[int]) -> bool:
        return len(out) >= max_new or (eos_id is not None and eos_id in out)

    out: list[int] = []
    if n + 2 <= window:
        p = next(model.parameters())
        cache = model.new_cache(1)
        mcache = KVCache([mod.block.attn.cache_shapes()], 1, window, p.dtype, p.device,
                         layer_lens=[mod.block.attn.cache_len])

        def draft(h: torch.Tensor, toks: torch.Tensor, start: int) -> torch.Tensor:
            """h (1, L, C) main states at start.., toks (1, L) the tokens one ahead of them."""
            x, _ = mod(h, model.wte(toks), mcache.layers[0], start)
            return greedy(x[:, -1])

        h, _ = model._stack(row, cache, 0)                 # (1, n, C)
        stats["main_passes"] += 1
        a = greedy(h[:, -1])                               # token n
        out.append(int(a))
        d = draft(h, torch.cat([row[:, 1:], a], dim=1), 0)   # the guess for token n+1
        while not done(out) and n + 2 <= window:
            h, _ = model._stack(torch.cat([a, d], dim=1), cache, n)   # positions n, n+1
            stats["main_passes"] += 1
            stats["drafted"] += 1
            g = greedy(h[:, 0])
            if int(g) == int(d):                           # accepted: token n+2 comes free
                stats["accepted"] += 1
                g2 = greedy(h[:, 1])
                out += [int(d), int(g2)]
                d, a, n = draft(h, torch.cat([d, g2], dim=1), n), g2, n + 2
            else:                                          # the cache entry at n+1 is stale
                out.append(int(g))
                d, a, n = draft(h[:, :1], g, n), g, n + 1
    if not done(out):                                      # past the window: plain decoding
        seq = torch.cat([row, torch.tensor([out], dtype=torch.long, device=row.device)], dim=1)
        more = generate(model, seq, max_new - len(out), temperature=0.0, eos_id=eos_id,
                        vocab_limit=vocab_limit)
        out = more[0, row.size(1):].tolist()
    out = out[:max_new]
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out
