"""Grouped-query attention, which also covers multi-head (n_kv_heads == n_head) and
multi-query (n_kv_heads == 1) attention, on `F.scaled_dot_product_attention`.

Shapes: C = n_embd, H = n_head, K = n_kv_heads, D = C // H (head dim).
Cache per layer: k and v, each (B, S, K, D)  ->  2*K*D values per token.

Sliding window (`window` W < block_size): a query at position p sees keys p-W+1 .. p, and the
cache is a ring of W slots per row (models/attention/cache.py), so S = W. A window of block_size
or more is full attention (no query is further than block_size - 1 from its keys).
ALiBi (pos_emb 'alibi'): -slope_h * (p - s) is added to head h's scores (models/attention/masks.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.cache import KVCache, causal_mask, ring_positions, ring_write, write_slots
from models.attention.masks import attention_mask
from models.config import AttnConfig, ModelConfig
from models.positions import Rotary, alibi_slopes, position_ids


class GQA(nn.Module):
    def __init__(self, model: ModelConfig, cfg: AttnConfig, dropout: float = 0.0):
        super().__init__()
        n_embd = model.n_embd
        self.cfg = cfg
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_heads
        self.head_dim = n_embd // cfg.n_head
        # one fused projection for q, k, v: a single large matmul is what the CPU/GPU likes
        self.c_attn = nn.Linear(n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim,
                                bias=model.bias != "none")
        self.c_proj = nn.Linear(n_embd, n_embd, bias=model.bias in ("attn", "all"))
        self.c_proj.residual_scale = True
        self.rotary = Rotary(self.head_dim, model.block_size, model.rope_theta, model.rope_scaling) \
            if model.pos_emb == "rope" else None
        if model.pos_emb == "alibi":
            self.register_buffer("alibi", alibi_slopes(self.n_head).float(), persistent=False)
        else:
            self.alibi = None
        # a window that covers the whole context is full attention (and a full-size cache)
        self.window = cfg.window if cfg.window is not None and cfg.window < model.block_size else None
        self.cache_len = self.window or model.block_size            # positions the cache keeps
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv, self.head_dim), "v": (self.n_kv, self.head_dim)}

    def kv_values_per_token(self) -> int:
        """Values one cached position holds (the layer keeps cache_len positions)."""
        return 2 * self.n_kv * self.head_dim

    def attn_flops_per_token(self, T: int) -> int:
        """Training FLOPs (fwd+bwd) of QK^T and AV for one token attending over T positions
        (a windowed layer counts them all too: SDPA with a mask computes every score)."""
        return 6 * self.n_head * T * (self.head_dim + self.head_dim)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0, ends: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions start.. -> (B, T, C). ends (B,): one past each row's last real
        token in a right-padded pass (a ring cache must not keep the pads), None: all T."""
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)                      # (B, H, T, D)
        k = k.view(B, T, K, D)                                      # (B, T, K, D)
        v = v.view(B, T, K, D)
        if self.rotary is not None:
            q = self.rotary(q, start)
            k = self.rotary(k.transpose(1, 2), start).transpose(1, 2)
        mask, is_causal = None, T > 1
        plain = self.window is None and self.alibi is None          # causal only: SDPA's fast paths
        if cache is None:
            if not plain:
                pos = torch.arange(T, device=x.device)
                mask, is_causal = attention_mask(pos, pos, self.window, self.alibi, q.dtype), False
        elif self.window is not None:                               # ring of W slots
            q_pos = position_ids(start, T, x.device)                # (T,) or (B, T)
            ring = ring_positions(start, self.window, x.device)     # (W,) or (B, W)
            k_pos = torch.cat([ring.expand(*q_pos.shape[:-1], -1), q_pos], dim=-1)   # (.., W+T)
            keys = torch.cat([cache["k"], k], dim=1)                # (B, W+T, K, D): read first,
            vals = torch.cat([cache["v"], v], dim=1)                # then the ring is overwritten
            ring_write(cache["k"], k, start, ends)
            ring_write(cache["v"], v, start, ends)
            k, v = keys, vals
            mask, is_causal = attention_mask(q_pos, k_pos, self.window, self.alibi, q.dtype), False
        else:
            k = KVCache.write(cache["k"], k, start)                 # (B, S, K, D), S = start+T
            v = KVCache.write(cache["v"], v, start)
            if plain:
                mask = causal_mask(T, start, x.device)
            else:
                mask = attention_mask(position_ids(start, T, x.device), torch.arange(k.size(1), device=x.device),
                                      None, self.alibi, q.dtype)
            is_causal = T > 1 and mask is None
        k, v = k.transpose(1, 2), v.transpose(1, 2)                 # (B, K, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))

    def decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor], pos: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """The static-shape step (models/decode.py): x (B, 1, C), row b's token at position
        pos[b] -> (B, 1, C). Writes k, v into slot pos (a ring: pos % W) in place and attends
        over all cache_len slots, masked from pos: the shapes never change between steps.
        A ring is read after the write: the slot overwritten held pos - W, outside the window."""
        B, _, C = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, 1, H, D).transpose(1, 2)                      # (B, H, 1, D)
        k = k.view(B, 1, K, D)
        if self.rotary is not None:
            q = self.rotary(q, pos)
            k = self.rotary(k.transpose(1, 2), pos).transpose(1, 2)
        if self.window is None:
            slot, k_pos = pos, torch.arange(self.cache_len, device=x.device)        # (S,)
        else:
            slot, k_pos = pos % self.window, ring_positions(pos + 1, self.window, x.device)  # (B, W)
        write_slots(cache["k"], k[:, 0], slot, valid)
        write_slots(cache["v"], v.reshape(B, K, D), slot, valid)
        mask = attention_mask(pos.unsqueeze(1), k_pos, self.window, self.alibi, q.dtype)
        y = F.scaled_dot_product_attention(
            q, cache["k"].transpose(1, 2), cache["v"].transpose(1, 2), attn_mask=mask,
            enable_gqa=K != H)                                      # (B, H, 1, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, 1, C))
