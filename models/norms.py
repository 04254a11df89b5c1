"""Normalisation layers: LayerNorm and RMSNorm, picked by `ModelConfig.norm`; `eps` None is
each one's own default (LayerNorm 1e-5, RMSNorm 1e-6), a number is `ModelConfig.norm_eps`."""
from __future__ import annotations

from torch import nn

DEFAULT_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


def make_norm(kind: str, dim: int, eps: float | None = None) -> nn.Module:
    if kind not in DEFAULT_EPS:
        raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")
    eps = DEFAULT_EPS[kind] if eps is None else eps
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)
