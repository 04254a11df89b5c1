"""Grouped-query attention, which also covers multi-head (n_kv_heads == n_head) and
multi-query (n_kv_heads == 1) attention, on `F.scaled_dot_product_attention`.

Shapes: C = n_embd, H = n_head, K = n_kv_heads, D = C // H (head dim).
Cache per layer: k and v, each (B, S, K, D)  ->  2*K*D values per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.cache import KVCache, causal_mask
from models.config import AttnConfig, ModelConfig
from models.positions import Rotary


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
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv, self.head_dim), "v": (self.n_kv, self.head_dim)}

    def kv_values_per_token(self) -> int:
        return 2 * self.n_kv * self.head_dim

    def attn_flops_per_token(self, T: int) -> int:
        """Training FLOPs (fwd+bwd) of QK^T and AV for one token attending over T positions."""
        return 6 * self.n_head * T * (self.head_dim + self.head_dim)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0) -> torch.Tensor:
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
        if cache is not None:
            k = KVCache.write(cache["k"], k, start)                 # (B, S, K, D), S = start+T
            v = KVCache.write(cache["v"], v, start)
            mask = causal_mask(T, start, x.device)
            is_causal = T > 1 and mask is None
        k, v = k.transpose(1, 2), v.transpose(1, 2)                 # (B, K, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))
