"""Multi-head latent attention (DeepSeek-V2), with or without decoupled RoPE.

Shapes: C = n_embd, H = n_head, D = qk_nope_head_dim, Dv = v_head_dim (both C // H unless
given), Lq = q_latent_dim, Lkv = kv_latent_dim, R = rope_head_dim (0 without RoPE).

  c_q  = norm(x W_dq)            (B, T, Lq)       q_nope = c_q W_uq  (B, H, T, D)
                                                  q_rope = RoPE(c_q W_qr)  (B, H, T, R)
     (q_latent_dim None: q_nope, q_rope = x W_q, no query latent — DeepSeek-V2-Lite)
  c_kv = norm(x W_dkv)           (B, T, Lkv)      k_nope = c_kv W_uk (B, H, T, D), v = c_kv W_uv (Dv)
  k_rope = RoPE(x W_kr)          (B, T, R)        one rotary key shared by all heads
  score  = (q_nope . k_nope + q_rope . k_rope) / sqrt(D + R)   (times YaRN's mscale^2, DeepSeek)

Training (no cache) materialises per-head K and V and runs SDPA. With a cache only c_kv and
k_rope are stored (Lkv + R values per token) and attention runs in the latent space with the
up-projections absorbed: q_nope . (c_kv W_uk) = (q_nope W_uk^T) . c_kv, and the output is
(attn @ c_kv) W_uv, so per-head keys and values are never built during decoding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.cache import KVCache, causal_mask, write_slots
from models.attention.masks import attention_mask
from models.config import AttnConfig, ModelConfig
from models.norms import make_norm
from models.positions import Rotary, yarn_mscale


# the latent RMSNorms' epsilon, whatever the model's norm_eps: DeepSeek-V2/V3 (and transformers'
# port) keep q_a_layernorm / kv_a_layernorm at 1e-6 while rms_norm_eps sets the other norms
LATENT_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, model: ModelConfig, cfg: AttnConfig, dropout: float = 0.0):
        super().__init__()
        n_embd = model.n_embd
        self.cfg = cfg
        H = self.n_head = cfg.n_head
        D = self.head_dim = cfg.qk_nope_head_dim
        Dv = self.v_head_dim = cfg.v_head_dim
        Lq, Lkv = cfg.q_latent_dim, cfg.kv_latent_dim
        R = self.rope_dim = cfg.rope_head_dim if model.pos_emb == "rope" else 0
        self.kv_latent = Lkv
        if Lq is None:                                          # no query latent
            self.W_q = nn.Linear(n_embd, H * (D + R), bias=False)
        else:
            self.W_dq = nn.Linear(n_embd, Lq, bias=False)
            self.q_norm = make_norm("rmsnorm", Lq, LATENT_EPS)
            self.W_uq = nn.Linear(Lq, H * (D + R), bias=False)  # q_nope and q_rope together
        # x -> c_kv and x -> k_rope in one matmul
        self.W_dkv = nn.Linear(n_embd, Lkv + R, bias=False)
        self.kv_norm = make_norm("rmsnorm", Lkv, LATENT_EPS)
        self.W_uk = nn.Linear(Lkv, H * D, bias=False)
        self.W_uv = nn.Linear(Lkv, H * Dv, bias=False)
        self.c_proj = nn.Linear(H * Dv, n_embd, bias=False)
        self.c_proj.residual_scale = True
        rs = model.rope_scaling
        self.rotary = Rotary(R, model.block_size, model.rope_theta, rs) if R else None
        self.scale = 1.0 / math.sqrt(D + R)
        if R and rs is not None and rs.type == "yarn" and rs.mscale_all_dim:
            self.scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2   # DeepSeek's convention
        self.cache_len = model.block_size                           # positions the cache keeps
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"c_kv": (self.kv_latent,)}
        if self.rope_dim:
            shapes["k_rope"] = (self.rope_dim,)
        return shapes

    def kv_values_per_token(self) -> int:
        return self.kv_latent + self.rope_dim

    def attn_flops_per_token(self, T: int) -> int:
        """Training FLOPs (fwd+bwd) of QK^T (width D+R) and AV (width Dv) over T positions."""
        return 6 * self.n_head * T * ((self.head_dim + self.rope_dim) + self.v_head_dim)

    def _queries(self, x: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        q = self.W_q(x) if self.cfg.q_latent_dim is None else self.W_uq(self.q_norm(self.W_dq(x)))
        q = q.view(B, T, H, D + R).transpose(1, 2)
        q_nope, q_rope = q.split([D, R], dim=-1)                    # (B, H, T, D), (B, H, T, R)
        if self.rotary is not None:
            return q_nope, self.rotary(q_rope, start)
        return q_nope, None

    def _latents(self, x: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor | None]:
        c_kv, k_rope = self.W_dkv(x).split([self.kv_latent, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)                                   # (B, T, Lkv)
        if self.rotary is not None:                                 # (B, T, R)
            return c_kv, self.rotary(k_rope.unsqueeze(1), start).squeeze(1)
        return c_kv, None

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None,
                start: int | torch.Tensor = 0, ends: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions start.. -> (B, T, C). `ends` (a right-padded pass's real
        lengths) is not needed here: pads sit after a row's positions and are overwritten later."""
        B, T, C = x.shape
        H, Dv = self.n_head, self.v_head_dim
        q_nope, q_rope = self._queries(x, start)
        c_kv, k_rope = self._latents(x, start)
        if cache is None:
            y = self._expanded(q_nope, q_rope, c_kv, k_rope)
        else:
            c_kv = KVCache.write(cache["c_kv"], c_kv, start)        # (B, S, Lkv)
            if k_rope is not None:
                k_rope = KVCache.write(cache["k_rope"], k_rope, start)
            y = self._absorbed(q_nope, q_rope, c_kv, k_rope, causal_mask(T, start, x.device))
        y = y.transpose(1, 2).reshape(B, T, H * Dv)
        return self.resid_drop(self.c_proj(y))

    def decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor], pos: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """The static-shape step (models/decode.py): x (B, 1, C) at positions pos (B,) ->
        (B, 1, C); the latents go into slot pos in place, attention covers every slot, masked."""
        B = x.size(0)
        q_nope, q_rope = self._queries(x, pos)
        c_kv, k_rope = self._latents(x, pos)
        write_slots(cache["c_kv"], c_kv[:, 0], pos, valid)
        if k_rope is not None:
            write_slots(cache["k_rope"], k_rope[:, 0], pos, valid)
        mask = attention_mask(pos.unsqueeze(1), torch.arange(self.cache_len, device=x.device))
        y = self._absorbed(q_nope, q_rope, cache["c_kv"], cache.get("k_rope"), mask)  # (B, H, 1, Dv)
        return self.c_proj(y.transpose(1, 2).reshape(B, 1, self.n_head * self.v_head_dim))

    def _expanded(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        """Training path: per-head K and V, SDPA with a causal mask."""
        B, T, _ = c_kv.shape
        H, D, Dv = self.n_head, self.head_dim, self.v_head_dim
        k = self.W_uk(c_kv).view(B, T, H, D).transpose(1, 2)        # (B, H, T, D)
        v = self.W_uv(c_kv).view(B, T, H, Dv).transpose(1, 2)       # (B, H, T, Dv)
        if q_rope is not None:
            q = torch.cat([q_nope, q_rope], dim=-1)                 # (B, H, T, D+R)
            k = torch.cat([k, k_rope.unsqueeze(1).expand(B, H, T, self.rope_dim)], dim=-1)
        else:
            q = q_nope
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=T > 1, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0)       # (B, H, T, Dv)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Cached path: attention in the latent space over S cached positions."""
        B, H, T, D = q_nope.shape
        S, Lkv = c_kv.size(1), self.kv_latent
        w_uk = self.W_uk.weight.view(H, D, Lkv)
        w_uv = self.W_uv.weight.view(H, self.v_head_dim, Lkv)
        q_lat = torch.einsum("bhtd,hdl->bhtl", q_nope, w_uk)        # (B, H, T, Lkv)
        keys = c_kv.unsqueeze(1)                                    # (B, 1, S, Lkv)
        if q_rope is not None:
            q_lat = torch.cat([q_lat, q_rope], dim=-1)              # (B, H, T, Lkv+R)
            keys = torch.cat([keys, k_rope.unsqueeze(1)], dim=-1)   # (B, 1, S, Lkv+R)
        o_lat = F.scaled_dot_product_attention(
            q_lat, keys.expand(B, H, S, keys.size(-1)), c_kv.unsqueeze(1).expand(B, H, S, Lkv),
            attn_mask=mask, is_causal=T > 1 and mask is None, scale=self.scale)  # (B, H, T, Lkv)
        return torch.einsum("bhtl,hdl->bhtd", o_lat, w_uv)          # (B, H, T, Dv)
