"""Normalisation layers: LayerNorm and RMSNorm, picked by `ModelConfig.norm`."""
from __future__ import annotations

from torch import nn


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; choose layernorm or rmsnorm")

