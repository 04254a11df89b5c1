"""Attention masks over explicit key positions: causal, sliding-window, and ALiBi's score bias.

The plain causal case keeps SDPA's `is_causal` or models/attention/cache.py `causal_mask` (a
boolean mask over keys 0..S-1). A layer with a sliding window or ALiBi builds its mask here from
the positions of its queries and keys, which a ring-buffer cache (cache.py `ring_positions`)
does not hold in order:

    mask = attention_mask(q_pos, k_pos, window=W, slopes=alibi, dtype=q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

Query q at position p sees key k at position s iff 0 <= s <= p (a negative position is an empty
slot) and, with a window W, s > p - W. ALiBi adds -slope_h * (p - s) to the scores of head h.
"""
from __future__ import annotations

import torch


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
                   slopes: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """q_pos (T,) or (B, T), k_pos (S,) or (B, S) (negative: no key there).

    Without slopes: a boolean mask (T, S), or (B, 1, T, S) for per-row positions (True: attend).
    With ALiBi slopes (H,): a float mask (H, T, S) or (B, H, T, S) in `dtype`, the bias where
    attending and -inf elsewhere. Both broadcast to SDPA's (B, H, T, S); every query sees at
    least itself, so no row is all -inf.
    """
    batched = q_pos.dim() == 2 or k_pos.dim() == 2
    q = q_pos.unsqueeze(-1)                                          # (..., T, 1)
    k = k_pos.unsqueeze(-2)                                          # (..., 1, S)
    allowed = (k >= 0) & (k <= q)                                    # (..., T, S)
    if window is not None:
        allowed = allowed & (k > q - window)
    if batched:
        allowed = allowed.unsqueeze(1)                               # (B, 1, T, S)
    if slopes is None:
        return allowed
    dist = (q - k).to(dtype)                                         # (..., T, S)
    if batched:
        dist = dist.unsqueeze(1)                                     # (B, 1, T, S)
    bias = -slopes.to(dtype).view(-1, 1, 1) * dist                   # (H, T, S) or (B, H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))
