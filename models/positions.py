"""Positions: learned and sinusoidal absolute embeddings (added to token embeddings), RoPE
(rotary, applied to queries and keys inside attention) and ALiBi's per-head slopes (a score
bias -slope * (q_pos - k_pos), added to the attention mask: models/attention/masks.py).

RoPE uses the "rotate half" layout: a head vector (..., d) is split into two halves that are
rotated as the real and imaginary parts of d/2 complex numbers. Its frequencies take a base
(`rope_theta`) and optional long-context scaling (`rope_scaling`: llama3 or YaRN), computed
with transformers' formulas (modeling_rope_utils) so imported checkpoints match to rounding.
"""
from __future__ import annotations

import math

import torch
from torch import nn


SIN_SCALE = 0.02          # the token embeddings' init std (models.model.LLM.reset_parameters)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) table of Vaswani et al.: sin on even channels, cos on odd channels."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)                 # (P, 1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table.float()


class AbsolutePositions(nn.Module):
    """Learned (`learn`) or fixed sinusoidal (`sin`) position embeddings, (T,) -> (T, C) or
    per-row (B, T) -> (B, T, C)."""

    def __init__(self, kind: str, block_size: int, n_embd: int):
        super().__init__()
        self.kind = kind
        if kind == "learn":
            self.wpe = nn.Embedding(block_size, n_embd)
        elif kind == "sin":
            # scaled to the token embeddings' init (N(0, 0.02)): the raw table (entries of
            # magnitude up to 1) is ~35x larger and drowns them; on Tiny Shakespeare char
            # (4 layers, n_embd 64) the raw table kept val loss at the unigram level (3.37)
            # for 300 steps, the scaled one reached 2.39 (RoPE: 2.10) — see docs/sweeps.md
            self.register_buffer("table", SIN_SCALE * sinusoidal_table(block_size, n_embd),
                                 persistent=False)
        else:
            raise ValueError(f"AbsolutePositions does not handle pos_emb={kind!r}")

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.kind == "learn":
            return self.wpe(pos)
        return self.table[pos]


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, base: float = 10000.0, scaling=None) -> tuple[torch.Tensor, float]:
    """(dim/2,) float64 inverse frequencies and the factor cos/sin are multiplied by, for a
    models.config.RopeScaling (or None)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))     # (dim/2,)
    if scaling is None:
        return inv, 1.0
    f, old = scaling.factor, scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)      # long waves: interpolated
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled), 1.0
    # yarn: blend interpolated (inv / f) and original frequencies over a ramp of dimensions
    def corr_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr_dim(scaling.beta_fast), corr_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                               # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                                 # 1: original frequency
    inv = (inv / f) * (1 - keep) + inv * keep
    att = scaling.attention_factor
    if att is None:
        if scaling.mscale and scaling.mscale_all_dim:
            att = yarn_mscale(f, scaling.mscale) / yarn_mscale(f, scaling.mscale_all_dim)
        else:
            att = yarn_mscale(f)
    return inv, float(att)


def rope_tables(n_pos: int, dim: int, base: float = 10000.0, scaling=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (n_pos, dim) for rotate-half RoPE over `dim` channels
    (scaled by YaRN's attention factor when `scaling` asks for it)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {dim}")
    inv, att = rope_inv_freq(dim, base, scaling)
    ang = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv)               # (P, dim/2)
    ang = torch.cat([ang, ang], dim=-1)                                            # (P, dim)
    return (ang.cos() * att).float(), (ang.sin() * att).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) by the tables cos/sin (T, d), broadcast over leading dims."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """(n_head,) float64 ALiBi slopes (Press et al. 2022, "Train Short, Test Long"): for n heads a
    power of two, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the slopes of
    the closest smaller power of two m, followed by every other slope of 2m heads (the odd
    terms 2^(-4/m), 2^(-12/m), ...) until there are n_head of them."""
    if n_head < 1:
        raise ValueError(f"alibi needs n_head >= 1, got {n_head}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    m = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(m) + geometric(2 * m)[0::2][:n_head - m]
    return torch.tensor(slopes, dtype=torch.float64)


def position_ids(start: int | torch.Tensor, T: int, device) -> torch.Tensor:
    """Positions of T new tokens: (T,) for an int start shared by the batch, (B, T) for
    per-row starts (B,) (continuous batching: rows of one batch at different lengths)."""
    if isinstance(start, torch.Tensor):
        return start.to(device).unsqueeze(1) + torch.arange(T, device=device)
    return torch.arange(start, start + T, device=device)


class Rotary(nn.Module):
    """Holds the cos/sin tables for one head width; `forward(x, start)` rotates positions
    start .. start+T-1 of x (B, H, T, d); start is an int or per-row starts (B,)."""

    def __init__(self, dim: int, block_size: int, base: float = 10000.0, scaling=None):
        super().__init__()
        cos, sin = rope_tables(block_size, dim, base, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        T = x.size(-2)
        if isinstance(start, torch.Tensor):
            pos = position_ids(start, T, x.device)                 # (B, T)
            return apply_rope(x, self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1))
        return apply_rope(x, self.cos[start:start + T], self.sin[start:start + T])
